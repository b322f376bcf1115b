//! The integration suite, one test binary: the library is linked once for every test, not once
//! per file. Each module below is one area, tested the way a user meets it, against the
//! in-process emulator on `127.0.0.1:0` and a real Postgres (one database per test, see
//! [`common`]).
//!
//! - `auth`: the OAuth flows.
//! - `backfill`, `verify`: the one-shot commands over REST and Bulk API 2.0.
//! - `cli`: the binary as an operator runs it (exit codes, config errors, metrics listener).
//! - `demo`, `init`: the first five minutes: `sfmirror demo` end to end in its short mode,
//!   and `sfmirror init` writing a first config from the org.
//! - `conformance`: real third-party Salesforce clients from npm against the emulator.
//! - `emulator_clients`, `emulator_features`, `emulator_pubsub`, `emulator_rest`,
//!   `emulator_soql`, `emulator_transactions`: the emulator as a client sees it.
//! - `end_to_end`, `streaming`, `randomized`: the daemon replicating, faults and kills.
//! - `merge_properties`, `snapshot`: the merge against Postgres, by property and by case.
//! - `setup`: the set-up every command shares, and the error policy at its edges.
//! - `signals`: metrics, readiness and systemd notifications, seen from outside the process.
//! - `privileges`: the README's least-privilege roles, run as written.
//! - `tls`: the replica connection's `sslmode`s against a cluster with TLS on.
//! - `layering`: the layout rules of `src/lib.rs`, checked on the source text.
//! - `deploy`: the alert rules and dashboard under `deploy/`, checked with promtool and
//!   against the metrics `telemetry` exports; the systemd units under `systemd/`, checked with
//!   systemd-analyze.

mod common;

mod auth;
mod backfill;
mod cli;
mod conformance;
mod demo;
mod deploy;
mod derived;
mod emulator_clients;
mod emulator_features;
mod emulator_pubsub;
mod emulator_rest;
mod emulator_soql;
mod emulator_transactions;
mod end_to_end;
mod ha;
mod init;
mod layering;
mod merge_properties;
mod privileges;
mod randomized;
mod setup;
mod signals;
mod snapshot;
mod streaming;
mod tls;
mod verify;
