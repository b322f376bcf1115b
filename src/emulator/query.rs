//! The emulator's read side over HTTP: REST `query` / `queryAll` with query locators, sObject
//! Collections retrieve, `limits`, and Bulk API 2.0 query jobs with CSV results.
//!
//! What a query *means* belongs to [`super::soql`]; this module owns paging, snapshots, wire
//! shapes and errors. Faithful to Salesforce where clients can tell:
//! - REST records start with `attributes` and then carry the selected fields in SELECT order
//!   (this crate's `serde_json` sorts object keys, so records are serialized by hand).
//! - A query's result is a snapshot taken at the first call: later pages (`nextRecordsUrl`,
//!   always under `/query/` even for `queryAll`) and Bulk result chunks do not move when
//!   records change afterwards.
//! - Bulk jobs run at creation but are reported `UploadComplete`, then `InProgress` on the
//!   first poll and `JobComplete` on the next, so clients' polling loops run as they would
//!   against an org; results are refused until then.
//! - Bulk results are CSV written as Salesforce writes them: every field quoted, `"` doubled,
//!   null as an empty field, datetimes in UTC with `Z`. Each chunk is written from the stored
//!   values when asked for, never the whole result at once.
//!
//! Snapshots live in memory and are bounded: the newest [`MAX_CURSORS`] query locators and
//! [`MAX_JOBS`] jobs are kept.

use super::soql::{self, Query as Soql, SoqlError};
use super::store::{ApiError, ObjectDef, Org, Record};
use crate::model::FieldType;
use crate::model::id::id18;
use crate::model::time::{datetime_ms, format_datetime};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Value as J, json};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

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

const DAILY_BULK_QUERY_JOBS: i64 = 10_000;
const DAILY_BULK_QUERY_STORAGE_MB: i64 = 976_562;

const JSON_TYPE: &str = "application/json;charset=UTF-8";

/// The query side's state: the org it reads, and in memory its query locators and Bulk jobs.
pub struct QueryState {
    org: Arc<Org>,
    cursors: Mutex<Bounded<Cursor>>,
    jobs: Mutex<Bounded<Job>>,
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

    /// An 18-character id with `prefix` (`01g` query locators, `750` jobs).
    fn new_id(&self, prefix: &str) -> String {
        const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut digits = [b'0'; 10];
        for d in digits.iter_mut().rev() {
            *d = BASE62[(n % 62) as usize];
            n /= 62;
        }
        let digits: String = digits.iter().map(|&b| char::from(b)).collect();
        id18(&format!("{prefix}5g{digits}"))
    }

    fn cursors(&self) -> MutexGuard<'_, Bounded<Cursor>> {
        self.cursors.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn jobs(&self) -> MutexGuard<'_, Bounded<Job>> {
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
        .route("/services/data/{version}/query", get(query))
        .route("/services/data/{version}/queryAll", get(query_all))
        .route("/services/data/{version}/query/{locator}", get(query_more))
        .route(
            "/services/data/{version}/queryAll/{locator}",
            get(query_more),
        )
        .route(
            "/services/data/{version}/composite/sobjects/{object}",
            get(retrieve_get).post(retrieve_post),
        )
        .route("/services/data/{version}/limits", get(limits))
        .route("/services/data/{version}/limits/", get(limits))
        .route(
            "/services/data/{version}/jobs/query",
            get(list_jobs).post(create_job),
        )
        .route(
            "/services/data/{version}/jobs/query/{job}",
            get(job_info).patch(abort_job).delete(delete_job),
        )
        .route(
            "/services/data/{version}/jobs/query/{job}/results",
            get(job_results),
        )
        .with_state(state)
}

type S = State<Arc<QueryState>>;
type Params = Query<HashMap<String, String>>;

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// The numeric API version of a `vXX.X` path segment; unknown versions are 404 like any
/// unknown resource.
fn api_version(version: &str) -> Result<f64, ApiError> {
    version
        .strip_prefix('v')
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| (20.0..=70.0).contains(v))
        .ok_or_else(not_found)
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

/// Parses and binds `soql`: MALFORMED_QUERY, then INVALID_TYPE, then the binding's errors.
fn prepare(org: &Org, soql: &str) -> Result<(Soql, Arc<ObjectDef>), ApiError> {
    let mut q = soql::parse(soql).map_err(soql_error)?;
    let def =
        find_object(org, &q.object).ok_or_else(|| soql_error(soql::invalid_type(&q.object)))?;
    q.bind(&def.describe).map_err(soql_error)?;
    Ok((q, def))
}

/// The records `q` selects, filtered, ordered and limited; with `all`, deleted ones too.
fn matching(org: &Org, q: &Soql, all: bool) -> Vec<Record> {
    let mut out = org.scan(&q.object, all, |r| q.matches(r).then(|| Record::clone(r)));
    q.sort(&mut out);
    if let Some(n) = q.limit() {
        out.truncate(n);
    }
    out
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

/// One result row of a REST query or retrieve: the record's id (for `attributes.url`) and
/// the selected values in SELECT order.
struct Row {
    id: String,
    values: Vec<J>,
}

/// Takes the selected values out of `record` (compound fields as REST's nested objects).
fn project_row(q: &Soql, def: &ObjectDef, compound: bool, mut record: Record) -> Row {
    let id = match record.get("Id") {
        Some(J::String(s)) => s.clone(),
        _ => String::new(),
    };
    if compound {
        record = q.project(&def.describe, &record);
    }
    let values = q
        .fields
        .iter()
        .map(|f| record.remove(f).unwrap_or(J::Null))
        .collect();
    Row { id, values }
}

/// A record as REST writes it: `attributes` first, then fields in SELECT order.
struct RecordJson<'a> {
    object: &'a str,
    version: &'a str,
    fields: &'a [String],
    row: &'a Row,
}

#[derive(Serialize)]
struct Attributes<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    url: String,
}

impl Serialize for RecordJson<'_> {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        let mut map = s.serialize_map(Some(self.fields.len() + 1))?;
        map.serialize_entry(
            "attributes",
            &Attributes {
                kind: self.object,
                url: format!(
                    "/services/data/{}/sobjects/{}/{}",
                    self.version, self.object, self.row.id
                ),
            },
        )?;
        for (name, value) in self.fields.iter().zip(&self.row.values) {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct QueryPage<'a> {
    total_size: usize,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_records_url: Option<String>,
    records: Vec<RecordJson<'a>>,
}

// ---------------------------------------------------------------------------------------------
// REST query
// ---------------------------------------------------------------------------------------------

/// A query result kept for its locator: the snapshot taken at the first call.
struct Cursor {
    object: String,
    fields: Arc<Vec<String>>,
    rows: Arc<Vec<Row>>,
    batch: usize,
}

/// The page size a request asks for with `Sforce-Query-Options: batchSize=N`, clamped to
/// 200..=2000.
pub fn batch_size(headers: &HeaderMap) -> Option<usize> {
    let options = headers.get("sforce-query-options")?.to_str().ok()?;
    let n = options.split(',').find_map(|o| {
        let (k, v) = o.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("batchSize"))
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    })?;
    Some(n.clamp(MIN_BATCH_SIZE, MAX_BATCH_SIZE))
}

async fn query(st: S, Path(version): Path<String>, params: Params, headers: HeaderMap) -> Response {
    run_query(st, version, params, headers, false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn query_all(
    st: S,
    Path(version): Path<String>,
    params: Params,
    headers: HeaderMap,
) -> Response {
    run_query(st, version, params, headers, true)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn run_query(
    State(st): S,
    version: String,
    Query(params): Params,
    headers: HeaderMap,
    all: bool,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let soql = params
        .get("q")
        .filter(|q| !q.trim().is_empty())
        .cloned()
        .ok_or_else(|| {
            ApiError::new(400, "MALFORMED_QUERY", "A query string has to be specified")
        })?;
    let batch = batch_size(&headers).unwrap_or(MAX_BATCH_SIZE);
    let org = st.org.clone();
    type Answer = (Soql, Result<Vec<Row>, usize>);
    let (q, rows) = tokio::task::spawn_blocking(move || -> Result<Answer, ApiError> {
        let (q, def) = prepare(&org, &soql)?;
        if q.count_only {
            let n = org
                .scan(&q.object, all, |r| q.matches(r).then_some(()))
                .len();
            let n = q.limit().map_or(n, |l| n.min(l));
            return Ok((q, Err(n)));
        }
        let records = matching(&org, &q, all);
        let compound = selects_compound(&q, &def).is_some();
        let rows: Vec<Row> = records
            .into_iter()
            .map(|r| project_row(&q, &def, compound, r))
            .collect();
        Ok((q, Ok(rows)))
    })
    .await
    .map_err(internal)??;
    let rows = match rows {
        Ok(rows) => rows,
        Err(count) => {
            let body = to_json(&QueryPage {
                total_size: count,
                done: true,
                next_records_url: None,
                records: Vec::new(),
            })?;
            return Ok(json_response(StatusCode::OK, body));
        }
    };
    let cursor = Cursor {
        object: q.object,
        fields: Arc::new(q.fields),
        rows: Arc::new(rows),
        batch,
    };
    let end = batch.min(cursor.rows.len());
    let locator = (end < cursor.rows.len()).then(|| st.new_id("01g"));
    let body = render_page(&cursor, &version, 0, end, locator.as_deref())?;
    if let Some(id) = locator {
        st.cursors().insert(id, cursor, MAX_CURSORS, |_| true);
    }
    Ok(json_response(StatusCode::OK, body))
}

fn render_page(
    c: &Cursor,
    version: &str,
    start: usize,
    end: usize,
    locator: Option<&str>,
) -> Result<Vec<u8>, ApiError> {
    let rows = c.rows.get(start..end).unwrap_or_default();
    let page = QueryPage {
        total_size: c.rows.len(),
        done: locator.is_none(),
        next_records_url: locator.map(|l| format!("/services/data/{version}/query/{l}-{end}")),
        records: rows
            .iter()
            .map(|row| RecordJson {
                object: &c.object,
                version,
                fields: &c.fields,
                row,
            })
            .collect(),
    };
    to_json(&page)
}

/// `GET .../query/{locator}-{offset}` (or under `queryAll/`): the next page of a snapshot.
async fn query_more(
    State(st): S,
    Path((version, locator)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let invalid = || ApiError::new(400, "INVALID_QUERY_LOCATOR", "invalid query locator");
    let (id, offset) = locator.rsplit_once('-').ok_or_else(invalid)?;
    let offset: usize = offset.parse().map_err(|_| invalid())?;
    let cursor = {
        let cursors = st.cursors();
        let c = cursors.map.get(id).ok_or_else(invalid)?;
        Cursor {
            object: c.object.clone(),
            fields: c.fields.clone(),
            rows: c.rows.clone(),
            batch: c.batch,
        }
    };
    if offset >= cursor.rows.len() {
        return Err(invalid());
    }
    let batch = batch_size(&headers).unwrap_or(cursor.batch);
    let end = offset.saturating_add(batch).min(cursor.rows.len());
    let more = end < cursor.rows.len();
    let body = render_page(&cursor, &version, offset, end, more.then_some(id))?;
    Ok(json_response(StatusCode::OK, body))
}

// ---------------------------------------------------------------------------------------------
// sObject Collections retrieve
// ---------------------------------------------------------------------------------------------

fn missing(what: &str) -> ApiError {
    ApiError::new(
        400,
        "MISSING_ARGUMENT",
        format!("The '{what}' parameter is required and must list at least one value"),
    )
}

/// `POST .../composite/sobjects/{Object}` with `{"ids": [...], "fields": [...]}`.
async fn retrieve_post(
    st: S,
    Path((version, object)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: J = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!("The request body is not valid JSON: {e}"),
        )
    })?;
    let list = |key: &str| -> Result<Vec<String>, ApiError> {
        let items = body
            .get(key)
            .and_then(J::as_array)
            .ok_or_else(|| missing(key))?;
        items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::new(
                        400,
                        "JSON_PARSER_ERROR",
                        format!("'{key}' must be an array of strings"),
                    )
                })
            })
            .collect()
    };
    let ids = list("ids")?;
    let fields = list("fields")?;
    retrieve(st, version, object, ids, fields).await
}

/// `GET .../composite/sobjects/{Object}?ids=a,b&fields=f1,f2`.
async fn retrieve_get(
    st: S,
    Path((version, object)): Path<(String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let list = |key: &str| -> Vec<String> {
        params
            .get(key)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    retrieve(st, version, object, list("ids"), list("fields")).await
}

/// Normalizes a 15- or 18-character id to the 18-character form; `None` if it is not one.
fn normalize_id(id: &str) -> Option<String> {
    if !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    match id.len() {
        15 => Some(id18(id)),
        18 => Some(id.to_string()),
        _ => None,
    }
}

async fn retrieve(
    State(st): S,
    version: String,
    object: String,
    ids: Vec<String>,
    fields: Vec<String>,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let def = find_object(&st.org, &object).ok_or_else(not_found)?;
    if ids.is_empty() {
        return Err(missing("ids"));
    }
    if fields.is_empty() {
        return Err(missing("fields"));
    }
    if ids.len() > MAX_RETRIEVE_IDS {
        return Err(ApiError::new(
            400,
            "EXCEEDED_ID_LIMIT",
            format!(
                "{} ids were requested; one request retrieves at most {MAX_RETRIEVE_IDS}",
                ids.len()
            ),
        ));
    }
    let mut names: Vec<String> = Vec::new();
    for f in &fields {
        let Some(d) = def
            .describe
            .fields
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(f))
        else {
            return Err(ApiError {
                status: 400,
                code: soql::INVALID_FIELD,
                message: format!(
                    "No such column '{f}' on entity '{}'. If you are attempting to use a custom \
                     field, be sure to append the '__c' after the custom field name. Please \
                     reference your WSDL or the describe call for the appropriate names.",
                    def.describe.name
                ),
                fields: vec![f.clone()],
            });
        };
        if !names.contains(&d.name) {
            names.push(d.name.clone());
        }
    }
    // Projection (compound fields included) is the SOQL engine's: select the fields by name.
    let mut q = soql::parse(&format!(
        "SELECT {} FROM {}",
        names.join(", "),
        def.describe.name
    ))
    .map_err(soql_error)?;
    q.bind(&def.describe).map_err(soql_error)?;
    let compound = selects_compound(&q, &def).is_some();
    let rows: Vec<Option<Row>> = ids
        .iter()
        .map(|id| {
            let id = normalize_id(id)?;
            let record = st.org.get(&def.describe.name, &id).ok()?;
            Some(project_row(&q, &def, compound, record))
        })
        .collect();
    let records: Vec<Option<RecordJson>> = rows
        .iter()
        .map(|r| {
            r.as_ref().map(|row| RecordJson {
                object: &def.describe.name,
                version: &version,
                fields: &q.fields,
                row,
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, to_json(&records)?))
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

async fn limits(State(st): S, Path(version): Path<String>) -> Result<Json<J>, ApiError> {
    api_version(&version)?;
    // The middleware has already counted this call, as Salesforce counts it.
    let (used, max) = st.org.api_usage();
    let jobs = st.jobs_created.load(Ordering::Relaxed);
    let mb = st.result_bytes.load(Ordering::Relaxed) / (1024 * 1024);
    let limit = |max: i64, used: i64| json!({"Max": max, "Remaining": (max - used).max(0)});
    Ok(Json(json!({
        "DailyApiRequests": limit(max, used),
        "DailyBulkApiBatches": limit(15_000, 0),
        "DailyBulkV2QueryJobs": limit(DAILY_BULK_QUERY_JOBS, jobs),
        "DailyBulkV2QueryFileStorageMB": limit(DAILY_BULK_QUERY_STORAGE_MB, mb),
        "DataStorageMB": limit(5, 0),
        "FileStorageMB": limit(20, 0),
    })))
}

// ---------------------------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------------------------

/// How a column's values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsvKind {
    /// REST's `...+0000` becomes `...Z`.
    Datetime,
    Plain,
}

#[derive(Debug, Clone)]
pub struct CsvColumn {
    pub name: String,
    pub kind: CsvKind,
}

/// A job's `columnDelimiter` and `lineEnding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CsvFormat {
    pub delimiter: char,
    pub line_ending: &'static str,
}

/// Bulk API 2.0 `columnDelimiter` names and their characters.
pub const DELIMITERS: &[(&str, char)] = &[
    ("COMMA", ','),
    ("BACKQUOTE", '`'),
    ("CARET", '^'),
    ("PIPE", '|'),
    ("SEMICOLON", ';'),
    ("TAB", '\t'),
];

/// `"text"` with every `"` doubled: Salesforce quotes every field, so delimiters and line
/// breaks inside values need nothing more.
fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    if s.contains('"') {
        for c in s.chars() {
            if c == '"' {
                out.push('"');
            }
            out.push(c);
        }
    } else {
        out.push_str(s);
    }
    out.push('"');
}

fn push_value(out: &mut String, kind: CsvKind, v: &J) {
    match v {
        J::Null => out.push_str("\"\""),
        J::Bool(b) => out.push_str(if *b { "\"true\"" } else { "\"false\"" }),
        J::Number(n) => {
            let _ = write!(out, "\"{n}\"");
        }
        J::String(s) if kind == CsvKind::Datetime => {
            out.push('"');
            if let Some(base) = s.strip_suffix("+0000") {
                out.push_str(base);
                out.push('Z');
            } else if let Some(ms) = datetime_ms(s) {
                let dt = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
                let _ = write!(out, "{}", dt.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
            } else {
                out.push_str(&s.replace('"', "\"\""));
            }
            out.push('"');
        }
        J::String(s) => push_quoted(out, s),
        other => push_quoted(out, &other.to_string()),
    }
}

/// The header row: the column names.
pub fn csv_header(out: &mut String, format: &CsvFormat, columns: &[CsvColumn]) {
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(format.delimiter);
        }
        push_quoted(out, &c.name);
    }
    out.push_str(format.line_ending);
}

/// One data row; values in column order.
pub fn csv_row(out: &mut String, format: &CsvFormat, columns: &[CsvColumn], values: &[J]) {
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push(format.delimiter);
        }
        push_value(out, c.kind, values.get(i).unwrap_or(&J::Null));
    }
    out.push_str(format.line_ending);
}

/// A whole chunk: the header row, then `rows`.
pub fn csv_chunk(format: &CsvFormat, columns: &[CsvColumn], rows: &[Vec<J>]) -> String {
    let mut out = String::with_capacity(64 + rows.len() * columns.len() * 16);
    csv_header(&mut out, format, columns);
    for r in rows {
        csv_row(&mut out, format, columns, r);
    }
    out
}

/// A whole chunk read from records: the header row, then each record's columns.
fn csv_records(format: &CsvFormat, columns: &[CsvColumn], records: &[Arc<Record>]) -> String {
    let mut out = String::with_capacity(64 + records.len() * columns.len() * 16);
    csv_header(&mut out, format, columns);
    for r in records {
        for (i, c) in columns.iter().enumerate() {
            if i > 0 {
                out.push(format.delimiter);
            }
            push_value(&mut out, c.kind, r.get(&c.name).unwrap_or(&J::Null));
        }
        out.push_str(format.line_ending);
    }
    out
}

/// Bulk result locators: the offset of the chunk, base64 like Salesforce's (`MTAwMDA`).
pub fn encode_locator(offset: usize) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(offset.to_string())
}

pub fn decode_locator(locator: &str) -> Option<usize> {
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(locator.trim_end_matches('='))
        .ok()?;
    std::str::from_utf8(&bytes).ok()?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// Bulk API 2.0 query jobs
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    UploadComplete,
    InProgress,
    JobComplete,
    Aborted,
}

impl JobState {
    fn name(self) -> &'static str {
        match self {
            JobState::UploadComplete => "UploadComplete",
            JobState::InProgress => "InProgress",
            JobState::JobComplete => "JobComplete",
            JobState::Aborted => "Aborted",
        }
    }

    fn finished(self) -> bool {
        matches!(self, JobState::JobComplete | JobState::Aborted)
    }
}

struct Job {
    id: String,
    operation: &'static str,
    object: String,
    created_ms: i64,
    modstamp_ms: i64,
    state: JobState,
    api_version: f64,
    delimiter: &'static str,
    line_ending: &'static str,
    columns: Arc<Vec<CsvColumn>>,
    /// The selected records as they were when the job ran (shared with the org, copied only
    /// if they change meanwhile); columns are read from them when results are fetched.
    rows: Arc<Vec<Arc<Record>>>,
    processing_ms: i64,
}

/// Job info in Salesforce's key order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JobInfo<'a> {
    id: &'a str,
    operation: &'a str,
    object: &'a str,
    created_by_id: &'a str,
    created_date: String,
    system_modstamp: String,
    state: &'a str,
    concurrency_mode: &'a str,
    content_type: &'a str,
    api_version: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    job_type: Option<&'a str>,
    line_ending: &'a str,
    column_delimiter: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    number_records_processed: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retries: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_processing_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_pk_chunking_supported: Option<bool>,
}

impl Job {
    /// The info; `full` adds what polls show (the create response omits it).
    fn info<'a>(&'a self, user_id: &'a str, full: bool) -> JobInfo<'a> {
        let complete = self.state == JobState::JobComplete;
        JobInfo {
            id: &self.id,
            operation: self.operation,
            object: &self.object,
            created_by_id: user_id,
            created_date: format_datetime(self.created_ms),
            system_modstamp: format_datetime(self.modstamp_ms),
            state: self.state.name(),
            concurrency_mode: "Parallel",
            content_type: "CSV",
            api_version: self.api_version,
            job_type: full.then_some("V2Query"),
            line_ending: self.line_ending,
            column_delimiter: self.delimiter,
            number_records_processed: full.then_some(if complete { self.rows.len() } else { 0 }),
            retries: full.then_some(0),
            total_processing_time: full.then_some(if complete { self.processing_ms } else { 0 }),
            is_pk_chunking_supported: full.then_some(true),
        }
    }
}

fn bulk_version(version: &str) -> Result<f64, ApiError> {
    let v = api_version(version)?;
    if v < 47.0 {
        return Err(not_found());
    }
    Ok(v)
}

fn job_not_found(id: &str) -> ApiError {
    ApiError::new(
        404,
        "NOT_FOUND",
        format!("The requested resource does not exist: no query job {id}"),
    )
}

fn bad_job(message: impl Into<String>) -> ApiError {
    ApiError::new(400, "INVALIDJOB", message)
}

/// Whole seconds, as Salesforce stamps jobs.
fn stamp(org: &Org) -> i64 {
    let now = org.now_ms();
    now - now.rem_euclid(1000)
}

/// Sizes a result for `DailyBulkV2QueryFileStorageMB`: roughly its CSV length, estimated from
/// the first rows so a million-row job is not measured value by value.
fn estimated_bytes(rows: &[Arc<Record>], columns: &[CsvColumn]) -> i64 {
    const SAMPLE: usize = 100;
    let sample: usize = rows
        .iter()
        .take(SAMPLE)
        .flat_map(|r| columns.iter().map(|c| r.get(&c.name)))
        .map(|v| match v {
            Some(J::String(s)) => s.len() + 3,
            None | Some(J::Null) => 3,
            Some(_) => 10,
        })
        .sum();
    let per_row = sample / rows.len().clamp(1, SAMPLE);
    i64::try_from(per_row.saturating_mul(rows.len())).unwrap_or(i64::MAX)
}

/// `POST .../jobs/query`: validates the request and the query, runs it, keeps the rows.
async fn create_job(
    State(st): S,
    Path(version): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let api_version = bulk_version(&version)?;
    let body: J = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!("The request body is not valid JSON: {e}"),
        )
    })?;
    let text = |key: &str| -> Result<Option<&str>, ApiError> {
        match body.get(key) {
            None | Some(J::Null) => Ok(None),
            Some(J::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(ApiError::new(
                400,
                "JSON_PARSER_ERROR",
                format!("'{key}' must be a string, not {other}"),
            )),
        }
    };
    let enum_error = |key: &str, value: &str, allowed: &str| {
        ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!("Invalid value for '{key}': '{value}'. Allowed values: {allowed}"),
        )
    };
    let operation = match text("operation")? {
        Some("query") => "query",
        Some("queryAll") => "queryAll",
        Some(other) => return Err(enum_error("operation", other, "query, queryAll")),
        None => return Err(bad_job("'operation' is required: query or queryAll")),
    };
    let soql = text("query")?
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| bad_job("'query' is required: the SOQL query to run"))?
        .to_string();
    match text("contentType")? {
        None | Some("CSV") => {}
        Some(other) => return Err(enum_error("contentType", other, "CSV")),
    }
    let delimiter = match text("columnDelimiter")? {
        None => DELIMITERS[0],
        Some(name) => *DELIMITERS.iter().find(|(n, _)| *n == name).ok_or_else(|| {
            enum_error(
                "columnDelimiter",
                name,
                "COMMA, BACKQUOTE, CARET, PIPE, SEMICOLON, TAB",
            )
        })?,
    };
    let line_ending = match text("lineEnding")? {
        None | Some("LF") => "LF",
        Some("CRLF") => "CRLF",
        Some(other) => return Err(enum_error("lineEnding", other, "LF, CRLF")),
    };

    let org = st.org.clone();
    let started = Instant::now();
    type Answer = (String, Vec<CsvColumn>, Vec<Arc<Record>>);
    let (object, columns, rows) =
        tokio::task::spawn_blocking(move || -> Result<Answer, ApiError> {
            let (q, def) = prepare(&org, &soql)?;
            if q.count_only {
                return Err(ApiError::new(
                    400,
                    "FUNCTIONALITY_NOT_ENABLED",
                    "Aggregate queries are not supported in Bulk API 2.0 query: COUNT()",
                ));
            }
            if let Some(f) = selects_compound(&q, &def) {
                return Err(ApiError::new(
                    400,
                    "FUNCTIONALITY_NOT_ENABLED",
                    format!(
                        "Selecting compound data not supported in Bulk Query: {f} is a compound \
                     field; query its component fields instead"
                    ),
                ));
            }
            let columns: Vec<CsvColumn> = q
                .fields
                .iter()
                .map(|name| CsvColumn {
                    name: name.clone(),
                    kind: match def.describe.field(name).map(|f| f.kind()) {
                        Some(FieldType::Datetime) => CsvKind::Datetime,
                        _ => CsvKind::Plain,
                    },
                })
                .collect();
            let all = operation == "queryAll";
            let rows: Vec<Arc<Record>> = if q.has_order() {
                matching(&org, &q, all).into_iter().map(Arc::new).collect()
            } else {
                // Id order, as stored: share the matching records themselves.
                let mut rows = org.scan(&q.object, all, |r| q.matches(r).then(|| r.clone()));
                if let Some(n) = q.limit() {
                    rows.truncate(n);
                }
                rows
            };
            Ok((q.object, columns, rows))
        })
        .await
        .map_err(internal)??;

    st.jobs_created.fetch_add(1, Ordering::Relaxed);
    st.result_bytes
        .fetch_add(estimated_bytes(&rows, &columns), Ordering::Relaxed);
    let now = stamp(&st.org);
    let job = Job {
        id: st.new_id("750"),
        operation,
        object,
        created_ms: now,
        modstamp_ms: now,
        state: JobState::UploadComplete,
        api_version,
        delimiter: delimiter.0,
        line_ending,
        columns: Arc::new(columns),
        rows: Arc::new(rows),
        processing_ms: i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
    };
    let body = to_json(&job.info(&st.org.user_id, false))?;
    st.jobs()
        .insert(job.id.clone(), job, MAX_JOBS, |j| j.state.finished());
    Ok(json_response(StatusCode::OK, body))
}

/// `GET .../jobs/query`: every job kept, newest last.
async fn list_jobs(State(st): S, Path(version): Path<String>) -> Result<Response, ApiError> {
    bulk_version(&version)?;
    let jobs = st.jobs();
    let records: Vec<JobInfo> = jobs
        .order
        .iter()
        .filter_map(|id| jobs.map.get(id))
        .map(|j| j.info(&st.org.user_id, true))
        .collect();
    let body = to_json(&json!({"done": true, "records": records, "nextRecordsUrl": null}))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `GET .../jobs/query/{id}`: each poll moves a running job one state on.
async fn job_info(
    State(st): S,
    Path((version, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    bulk_version(&version)?;
    let now = stamp(&st.org);
    let mut jobs = st.jobs();
    let job = jobs.map.get_mut(&id).ok_or_else(|| job_not_found(&id))?;
    let next = match job.state {
        JobState::UploadComplete => Some(JobState::InProgress),
        JobState::InProgress => Some(JobState::JobComplete),
        JobState::JobComplete | JobState::Aborted => None,
    };
    if let Some(state) = next {
        job.state = state;
        job.modstamp_ms = now;
    }
    let body = to_json(&job.info(&st.org.user_id, true))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `PATCH .../jobs/query/{id}` with `{"state": "Aborted"}`.
async fn abort_job(
    State(st): S,
    Path((version, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    bulk_version(&version)?;
    let body: J = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!("The request body is not valid JSON: {e}"),
        )
    })?;
    let now = stamp(&st.org);
    let mut jobs = st.jobs();
    let job = jobs.map.get_mut(&id).ok_or_else(|| job_not_found(&id))?;
    match body.get("state").and_then(J::as_str) {
        Some("Aborted") => {}
        other => {
            return Err(ApiError::new(
                400,
                "INVALIDJOBSTATE",
                format!(
                    "A query job can only be changed to state Aborted, not {}",
                    other.unwrap_or("(none)")
                ),
            ));
        }
    }
    if job.state.finished() {
        return Err(ApiError::new(
            400,
            "INVALIDJOBSTATE",
            format!(
                "Aborting a job in state {} is not allowed",
                job.state.name()
            ),
        ));
    }
    job.state = JobState::Aborted;
    job.modstamp_ms = now;
    job.rows = Arc::new(Vec::new());
    let body = to_json(&job.info(&st.org.user_id, true))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `DELETE .../jobs/query/{id}`: allowed unless the job is in progress.
async fn delete_job(
    State(st): S,
    Path((version, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    bulk_version(&version)?;
    let mut jobs = st.jobs();
    let job = jobs.map.get(&id).ok_or_else(|| job_not_found(&id))?;
    if job.state == JobState::InProgress {
        return Err(ApiError::new(
            400,
            "INVALIDJOBSTATE",
            "A job in progress cannot be deleted; abort it first",
        ));
    }
    jobs.remove(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// `GET .../jobs/query/{id}/results[?locator=L&maxRecords=N]`: one CSV chunk.
async fn job_results(
    State(st): S,
    Path((version, id)): Path<(String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let requested = bulk_version(&version)?;
    let (format, columns, rows) = {
        let jobs = st.jobs();
        let job = jobs.map.get(&id).ok_or_else(|| job_not_found(&id))?;
        if job.api_version != requested {
            return Err(ApiError::new(
                409,
                "INVALIDJOB",
                format!(
                    "Job {id} was created with API version {:.1}: get its results with the same \
                     version (/services/data/v{:.1}/jobs/query/{id}/results)",
                    job.api_version, job.api_version
                ),
            ));
        }
        if job.state != JobState::JobComplete {
            return Err(ApiError::new(
                400,
                "INVALIDJOBSTATE",
                format!(
                    "Results are available once the job is JobComplete; job {id} is {}",
                    job.state.name()
                ),
            ));
        }
        let format = CsvFormat {
            delimiter: DELIMITERS
                .iter()
                .find(|(n, _)| *n == job.delimiter)
                .map_or(',', |(_, c)| *c),
            line_ending: if job.line_ending == "CRLF" {
                "\r\n"
            } else {
                "\n"
            },
        };
        (format, job.columns.clone(), job.rows.clone())
    };
    let max = match params.get("maxRecords").map(|m| m.trim().parse::<i64>()) {
        None => DEFAULT_CHUNK_ROWS,
        Some(Ok(n)) if n > 0 => usize::try_from(n).unwrap_or(usize::MAX),
        Some(_) => {
            return Err(ApiError::new(
                400,
                "API_ERROR",
                "maxRecords must be a positive integer",
            ));
        }
    };
    let start = match params.get("locator").map(String::as_str) {
        None | Some("") => 0,
        Some(l) => decode_locator(l)
            .filter(|&o| o < rows.len())
            .ok_or_else(|| {
                ApiError::new(
                    400,
                    "INVALID_QUERY_LOCATOR",
                    format!("invalid locator: {l}"),
                )
            })?,
    };
    let end = start.saturating_add(max).min(rows.len());
    let next = if end < rows.len() {
        encode_locator(end)
    } else {
        "null".to_string()
    };
    let csv = tokio::task::spawn_blocking(move || {
        csv_records(&format, &columns, rows.get(start..end).unwrap_or_default())
    })
    .await
    .map_err(internal)?;
    let mut resp = (StatusCode::OK, [(header::CONTENT_TYPE, "text/csv")], csv).into_response();
    let headers = resp.headers_mut();
    headers.insert("sforce-numberofrecords", HeaderValue::from(end - start));
    if let Ok(v) = HeaderValue::from_str(&next) {
        headers.insert("sforce-locator", v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols(kinds: &[(&str, CsvKind)]) -> Vec<CsvColumn> {
        kinds
            .iter()
            .map(|(n, k)| CsvColumn {
                name: (*n).to_string(),
                kind: *k,
            })
            .collect()
    }

    const COMMA_LF: CsvFormat = CsvFormat {
        delimiter: ',',
        line_ending: "\n",
    };

    #[test]
    fn csv_quotes_every_field_and_doubles_quotes() {
        let c = cols(&[("Id", CsvKind::Plain), ("Name", CsvKind::Plain)]);
        let rows = vec![
            vec![json!("001A"), json!("Acme, \"Inc\"")],
            vec![json!("001B"), json!("two\nlines\r\nhere")],
            vec![json!("001C"), json!("\"")],
        ];
        assert_eq!(
            csv_chunk(&COMMA_LF, &c, &rows),
            "\"Id\",\"Name\"\n\"001A\",\"Acme, \"\"Inc\"\"\"\n\
             \"001B\",\"two\nlines\r\nhere\"\n\"001C\",\"\"\"\"\n"
        );
    }

    #[test]
    fn csv_writes_nulls_booleans_numbers_and_datetimes_like_salesforce() {
        let c = cols(&[
            ("Paid__c", CsvKind::Plain),
            ("Memo__c", CsvKind::Plain),
            ("Line_Count__c", CsvKind::Plain),
            ("Total__c", CsvKind::Plain),
            ("Sent_At__c", CsvKind::Datetime),
            ("Due_Date__c", CsvKind::Plain),
            ("CreatedDate", CsvKind::Datetime),
        ]);
        let mut out = String::new();
        csv_row(
            &mut out,
            &COMMA_LF,
            &c,
            &[
                json!(true),
                J::Null,
                json!(42),
                json!(1000.5),
                json!("2022-01-10T13:01:28.000+0000"),
                json!("2024-04-26"),
                json!("2022-01-10T14:01:28.123+01:00"),
            ],
        );
        assert_eq!(
            out,
            "\"true\",\"\",\"42\",\"1000.5\",\"2022-01-10T13:01:28.000Z\",\"2024-04-26\",\
             \"2022-01-10T13:01:28.123Z\"\n"
        );
        // A short row is padded with nulls rather than misaligned.
        let mut out = String::new();
        csv_row(&mut out, &COMMA_LF, &c[..2], &[json!(false)]);
        assert_eq!(out, "\"false\",\"\"\n");
    }

    #[test]
    fn csv_honours_every_delimiter_and_crlf() {
        let c = cols(&[("A", CsvKind::Plain), ("B", CsvKind::Plain)]);
        for (name, d) in DELIMITERS {
            let f = CsvFormat {
                delimiter: *d,
                line_ending: "\r\n",
            };
            let text = csv_chunk(&f, &c, &[vec![json!(format!("x{d}y")), json!("z")]]);
            assert_eq!(
                text,
                format!("\"A\"{d}\"B\"\r\n\"x{d}y\"{d}\"z\"\r\n"),
                "{name}"
            );
        }
    }

    #[test]
    fn locators_round_trip_and_look_like_salesforce() {
        assert_eq!(encode_locator(10_000), "MTAwMDA");
        for n in [1, 10, 200, 49_999, 1_000_000] {
            assert_eq!(decode_locator(&encode_locator(n)), Some(n));
        }
        assert_eq!(decode_locator("MTAwMDA="), Some(10_000));
        assert_eq!(decode_locator("not a locator"), None);
        assert_eq!(decode_locator("null"), None);
    }

    #[test]
    fn batch_size_is_clamped_to_what_salesforce_accepts() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(
                "sforce-query-options",
                HeaderValue::from_str(v).expect("header"),
            );
            batch_size(&m)
        };
        assert_eq!(h("batchSize=500"), Some(500));
        assert_eq!(h("batchSize=10"), Some(200));
        assert_eq!(h("batchSize=5000"), Some(2000));
        assert_eq!(h("foo=1, batchSize = 300"), Some(300));
        assert_eq!(h("batchSize=abc"), None);
        assert_eq!(batch_size(&HeaderMap::new()), None);
    }

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
