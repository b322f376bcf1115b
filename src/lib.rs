//! sfmirror keeps a PostgreSQL replica of a Salesforce org current through Change Data Capture.
//!
//! # Layout
//!
//! Data flows one way: the source produces change events and snapshot records, the sink
//! applies them, and only the orchestration knows both.
//!
//! - [`salesforce`]: the source side. OAuth, the Pub/Sub `Subscribe` stream, Avro decoding of
//!   change events, REST and Bulk API 2.0, SOQL text. Produces [`model`] values; knows
//!   nothing of Postgres.
//! - [`replica`]: the sink side. Control-schema migrations and every statement on the control
//!   tables, tables from describe, the version-guarded merge, snapshots. Consumes [`model`]
//!   values; knows nothing of Salesforce.
//! - [`sync`]: orchestration, the only module that knows both: the set-up every command
//!   shares, one task per channel, the repair worker, the org reader, backfill, verify,
//!   status, the error policy, and the supervisor that runs the daemon.
//! - [`emulator`]: a fake Salesforce org (OAuth, REST, Bulk API 2.0, Pub/Sub with CDC) that
//!   shares only [`proto`] and [`model`] with the rest.
//! - [`model`]: plain data every side shares (describe metadata, change events, replay ids,
//!   the bitmap codec, Salesforce's time forms, record ids). No I/O.
//! - [`proto`]: the Pub/Sub API's generated gRPC code.
//! - [`config`]: the layered configuration and its validation.
//! - [`telemetry`]: logs, and every metric with its HELP text.
//! - [`backoff`]: the one retry schedule every retrying loop uses.
//! - [`cli`], [`demo`], [`init`], [`shutdown`]: the command line, the one-command demo, the
//!   first config file, and the signal that stops long-running commands.
//!
//! The allocator (mimalloc, tuned before its first allocation) is set up in a private module
//! of its own, so every binary linking the crate runs with it.
//!
//! # Rules the layout keeps
//!
//! `replica` never imports `salesforce` or `sync`; `salesforce` never imports `replica` or
//! `sync`; the emulator imports nothing but `model` and `proto`; `sync` holds no SQL text;
//! only `telemetry` calls the `metrics` macros. `tests/layering.rs` fails when one of these
//! is broken.

mod allocator;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod demo;
pub mod emulator;
pub mod init;
pub mod model;
pub mod proto;
pub mod replica;
pub mod salesforce;
pub mod shutdown;
pub mod sync;
pub mod telemetry;
