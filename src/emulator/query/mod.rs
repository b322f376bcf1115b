//! The emulator's read side over HTTP: REST `query` / `queryAll` with query locators, sObject
//! Collections retrieve, `limits`, and Bulk API 2.0 query jobs with CSV results. It owns
//! paging, snapshots, wire shapes and errors; what a query *means* belongs to
//! [`super::soql`], and it never changes a record.
//!
//! # Layout
//!
//! - `rest`: `query` / `queryAll` and their next pages, sObject Collections retrieve,
//!   `limits`;
//! - `bulk`: Bulk API 2.0 query jobs and their result chunks;
//! - `csv`: how a result chunk is written;
//! - `exec`: a bound query run over the org (parents for relationship paths, children for
//!   subqueries, aggregate rows), one object scan at a time;
//! - `shape`: REST's record layout (nested parents, nested subquery results,
//!   `AggregateResult`s), written by hand in SELECT order;
//! - here: the state they share ([`QueryState`]), their routes, and the helpers both use to
//!   prepare and run a query.
//!
//! # Faithful to Salesforce where clients can tell
//!
//! - REST records start with `attributes` and then carry the selected fields in SELECT order
//!   (this crate's `serde_json` sorts object keys, so records are serialized by hand); a
//!   relationship path is a nested parent record (or `null`), a subquery a nested query
//!   result (or `null`), an aggregate query's rows `AggregateResult`s.
//! - A query's result is a snapshot taken at the first call: later pages (`nextRecordsUrl`,
//!   always under `/query/` even for `queryAll`) and Bulk result chunks do not move when
//!   records change afterwards.
//! - Bulk jobs check their query at creation (refusing what Bulk API 2.0 refuses) and are
//!   reported `UploadComplete`; the query runs at the first poll (`InProgress`, or `Failed`
//!   with its `errorMessage` when the org can no longer run it) and the next poll reports
//!   `JobComplete`, so clients' polling loops run as they would against an org; results are
//!   refused until then.
//! - Bulk results are CSV written as Salesforce writes them: every field quoted, `"` doubled,
//!   null as an empty field, datetimes in UTC with `Z`. Each chunk is written from the stored
//!   values when asked for, never the whole result at once.
//!
//! # Memory
//!
//! Snapshots live in memory and are bounded: the newest [`MAX_CURSORS`] query locators and
//! [`MAX_JOBS`] jobs are kept.

mod bulk;
mod csv;
mod exec;
mod rest;
mod shape;

use crate::emulator::soql::{self, Query as Soql, SoqlError};
use crate::emulator::store::{ApiError, ObjectDef, Org, new_id};
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use self::csv::{CsvColumn, CsvFormat, CsvKind, DELIMITERS, csv_chunk, csv_header, csv_row};
pub use bulk::{decode_locator, encode_locator};
pub use rest::batch_size;

/// REST page size without `Sforce-Query-Options`, and the largest a client may ask for.
pub const MAX_BATCH_SIZE: usize = 2000;
/// The smallest page size; smaller requests are raised to it, as Salesforce does.
pub const MIN_BATCH_SIZE: usize = 200;
/// Query locators kept; the oldest is forgotten beyond this.
pub const MAX_CURSORS: usize = 100;
/// Bulk query jobs kept; finished ones are forgotten first beyond this.
pub const MAX_JOBS: usize = 50;
/// Rows per Bulk result chunk when the client sends no `maxRecords`.
pub const DEFAULT_CHUNK_ROWS: usize = 50_000;
/// Ids one sObject Collections retrieve accepts.
pub const MAX_RETRIEVE_IDS: usize = 2000;

const JSON_TYPE: &str = "application/json;charset=UTF-8";

/// The query side's state: the org it reads, and in memory its query locators and Bulk jobs.
pub struct QueryState {
    org: Arc<Org>,
    cursors: Mutex<Bounded<rest::Cursor>>,
    jobs: Mutex<Bounded<bulk::Job>>,
    next_id: AtomicU64,
    jobs_created: AtomicI64,
    result_bytes: AtomicI64,
}

impl QueryState {
    pub fn new(org: Arc<Org>) -> QueryState {
        QueryState {
            org,
            cursors: Mutex::default(),
            jobs: Mutex::default(),
            next_id: AtomicU64::default(),
            jobs_created: AtomicI64::default(),
            result_bytes: AtomicI64::default(),
        }
    }

    /// An 18-character id with `prefix` (`01g` query locators, `750` jobs), laid out as the
    /// org lays out record ids, from one sequence for both.
    fn new_id(&self, prefix: &str) -> String {
        new_id(prefix, self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn cursors(&self) -> MutexGuard<'_, Bounded<rest::Cursor>> {
        self.cursors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn jobs(&self) -> MutexGuard<'_, Bounded<bulk::Job>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Entries by id, remembering insertion order for eviction.
struct Bounded<T> {
    map: HashMap<String, T>,
    order: VecDeque<String>,
}

impl<T> Default for Bounded<T> {
    fn default() -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<T> Bounded<T> {
    /// Inserts, then evicts down to `max`: the oldest entry `evictable` accepts, else the
    /// oldest.
    fn insert(&mut self, id: String, value: T, max: usize, evictable: impl Fn(&T) -> bool) {
        self.order.push_back(id.clone());
        self.map.insert(id, value);
        while self.map.len() > max {
            let pos = self
                .order
                .iter()
                .position(|k| self.map.get(k).is_some_and(&evictable))
                .unwrap_or(0);
            match self.order.remove(pos) {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
    }

    fn remove(&mut self, id: &str) -> Option<T> {
        self.order.retain(|k| k != id);
        self.map.remove(id)
    }
}

/// The routes of the query side; each needs a session.
pub fn routes(state: Arc<QueryState>) -> Router {
    Router::new()
        .route("/services/data/{version}/query", get(rest::query))
        .route("/services/data/{version}/queryAll", get(rest::query_all))
        .route(
            "/services/data/{version}/query/{locator}",
            get(rest::query_more),
        )
        .route(
            "/services/data/{version}/queryAll/{locator}",
            get(rest::query_more),
        )
        .route(
            "/services/data/{version}/composite/sobjects/{object}",
            get(rest::retrieve_get).post(rest::retrieve_post),
        )
        .route("/services/data/{version}/limits", get(rest::limits))
        .route("/services/data/{version}/limits/", get(rest::limits))
        .route(
            "/services/data/{version}/jobs/query",
            get(bulk::list_jobs).post(bulk::create_job),
        )
        .route(
            "/services/data/{version}/jobs/query/{job}",
            get(bulk::job_info)
                .patch(bulk::abort_job)
                .delete(bulk::delete_job),
        )
        .route(
            "/services/data/{version}/jobs/query/{job}/results",
            get(bulk::job_results),
        )
        .with_state(state)
}

type S = State<Arc<QueryState>>;
type Params = Query<HashMap<String, String>>;

/// The newest API version the emulator serves (Winter '26).
pub const NEWEST_VERSION: u32 = 65;
/// The oldest version Salesforce has not retired; older ones answer 410 (Summer '25 retired
/// 21.0 through 30.0).
pub const OLDEST_VERSION: u32 = 31;

/// The numeric API version of a `vXX.X` path segment: versions Salesforce has retired answer
/// 410, versions newer than the newest served are 404 like any unknown resource.
pub fn api_version(version: &str) -> Result<f64, ApiError> {
    let v = version
        .strip_prefix('v')
        .filter(|v| v.contains('.'))
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| *v <= f64::from(NEWEST_VERSION))
        .ok_or_else(not_found)?;
    if v < f64::from(OLDEST_VERSION) {
        return Err(ApiError::new(
            410,
            "UNSUPPORTED_API_VERSION",
            format!("API version {v:.1} is retired and no longer available"),
        ));
    }
    Ok(v)
}

fn not_found() -> ApiError {
    ApiError::new(404, "NOT_FOUND", "The requested resource does not exist")
}

fn soql_error(e: SoqlError) -> ApiError {
    ApiError::new(400, e.code, e.message)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "UNKNOWN_EXCEPTION", format!("emulator failure: {e}"))
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, JSON_TYPE)], body).into_response()
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(internal)
}

/// An object by API name, ignoring case as Salesforce does.
fn find_object(org: &Org, name: &str) -> Option<Arc<ObjectDef>> {
    org.object(name).ok().or_else(|| {
        org.object_names()
            .into_iter()
            .find(|n| n.eq_ignore_ascii_case(name))
            .and_then(|n| org.object(&n).ok())
    })
}

/// Parses and binds `soql` against the org (relationship paths and subqueries reach its
/// other objects): MALFORMED_QUERY, then INVALID_TYPE, then the binding's errors.
fn prepare(org: &Org, soql: &str) -> Result<(Soql, Arc<ObjectDef>), ApiError> {
    let mut q = soql::parse_at(soql, org.now_ms()).map_err(soql_error)?;
    let def =
        find_object(org, &q.object).ok_or_else(|| soql_error(soql::invalid_type(&q.object)))?;
    q.bind_in(&exec::OrgCatalog(org)).map_err(soql_error)?;
    Ok((q, def))
}

fn selects_compound(q: &Soql, def: &ObjectDef) -> Option<String> {
    q.fields
        .iter()
        .find(|f| {
            def.describe
                .field(f)
                .is_some_and(|d| d.kind().is_compound())
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_maps_evict_finished_entries_first() {
        let mut b: Bounded<bool> = Bounded::default();
        b.insert("a".into(), false, 2, |done| *done);
        b.insert("b".into(), true, 2, |done| *done);
        b.insert("c".into(), false, 2, |done| *done);
        assert!(b.map.contains_key("a") && b.map.contains_key("c"));
        b.insert("d".into(), false, 2, |done| *done);
        assert!(
            !b.map.contains_key("a"),
            "the oldest goes when none is finished"
        );
        assert_eq!(b.order, ["c", "d"]);
        assert_eq!(b.remove("c"), Some(false));
        assert_eq!(b.order, ["d"]);
    }
}
