//! The generated `eventbus.v1` Pub/Sub API types, client and server (from
//! `proto/pubsub_api.proto`, compiled by `build.rs`). Shared by the client and the emulator so
//! both speak exactly one contract.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("eventbus.v1");
