//! Bulk API 2.0 query jobs: create (the query is checked at once), poll (`UploadComplete`,
//! then `InProgress`, then `JobComplete`, one step per poll, so clients' polling loops run as
//! they would against an org; the query runs at the first poll and its records are kept as
//! they were, or the job is `Failed` with its `errorMessage` when the org can no longer run
//! it, e.g. a field was removed meanwhile), abort, delete, list, and results
//! in CSV chunks with `Sforce-Locator` / `Sforce-NumberOfRecords`, each written from the kept
//! records when asked for, never the whole result at once.
//!
//! What a query means is [`crate::emulator::soql`]'s and how a value is written in CSV is
//! [`super::csv`]'s; this module owns the job's life and the chunking, and it must not
//! change records.

use super::csv::{CsvColumn, CsvFormat, CsvKind, DELIMITERS, csv_records};
use super::{
    DEFAULT_CHUNK_ROWS, MAX_JOBS, Params, S, api_version, exec, find_object, internal,
    json_response, not_found, prepare, selects_compound, to_json,
};
use crate::emulator::soql::{PARENT_TO_CHILD, Query as Soql};
use crate::emulator::store::{ApiError, ObjectDef, Org, Record};
use crate::model::FieldType;
use crate::model::time::format_datetime;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use serde_json::{Value as J, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    UploadComplete,
    InProgress,
    JobComplete,
    Aborted,
    Failed,
}

impl JobState {
    fn name(self) -> &'static str {
        match self {
            JobState::UploadComplete => "UploadComplete",
            JobState::InProgress => "InProgress",
            JobState::JobComplete => "JobComplete",
            JobState::Aborted => "Aborted",
            JobState::Failed => "Failed",
        }
    }

    fn finished(self) -> bool {
        matches!(
            self,
            JobState::JobComplete | JobState::Aborted | JobState::Failed
        )
    }
}

pub(super) struct Job {
    id: String,
    operation: &'static str,
    object: String,
    created_ms: i64,
    modstamp_ms: i64,
    state: JobState,
    api_version: f64,
    delimiter: &'static str,
    line_ending: &'static str,
    /// The query, run at the first poll.
    soql: String,
    columns: Arc<Vec<CsvColumn>>,
    /// The selected records as they were when the job ran (shared with the org, copied only
    /// if they change meanwhile); columns are read from them when results are fetched.
    rows: Arc<Vec<Arc<Record>>>,
    processing_ms: i64,
    /// Why a `Failed` job failed.
    error_message: Option<String>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    error_message: Option<&'a str>,
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
            error_message: self.error_message.as_deref(),
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
pub(super) async fn create_job(
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
    let checked = soql.clone();
    let object = tokio::task::spawn_blocking(move || plan(&org, &checked).map(|p| p.0.object))
        .await
        .map_err(internal)??;
    st.jobs_created.fetch_add(1, Ordering::Relaxed);
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
        soql,
        columns: Arc::new(Vec::new()),
        rows: Arc::new(Vec::new()),
        processing_ms: 0,
        error_message: None,
    };
    let body = to_json(&job.info(&st.org.user_id, false))?;
    st.jobs()
        .insert(job.id.clone(), job, MAX_JOBS, |j| j.state.finished());
    Ok(json_response(StatusCode::OK, body))
}

/// Prepares a Bulk query: parsed and bound against the org, refused (400
/// `FUNCTIONALITY_NOT_ENABLED`) when it uses what Bulk API 2.0 does not take, with its CSV
/// columns.
///
/// What is refused follows the Bulk API 2.0 developer guide ("Understanding Bulk API 2.0
/// Query", SOQL considerations): GROUP BY, OFFSET and TYPEOF clauses, aggregate functions
/// such as COUNT(), compound address and geolocation fields, and parent-to-child
/// relationship queries (child-to-parent relationship fields are supported). The guide gives
/// no error code; `FUNCTIONALITY_NOT_ENABLED` is the code Salesforce's Bulk query answers
/// carry for such queries (e.g. "Selecting compound data not supported in Bulk Query").
fn plan(org: &Org, soql: &str) -> Result<(Soql, Vec<CsvColumn>), ApiError> {
    let refuse = |what: String| {
        ApiError::new(
            400,
            "FUNCTIONALITY_NOT_ENABLED",
            format!("{what} not supported in Bulk API 2.0 query"),
        )
    };
    let (q, def) = prepare(org, soql).map_err(|e| {
        // TYPEOF is valid SOQL the emulator does not parse at all; Bulk refuses it anyway.
        if e.message.contains("TYPEOF") {
            refuse("TYPEOF".to_string())
        } else {
            e
        }
    })?;
    if let Some(what) = q.bulk_unsupported() {
        if what == PARENT_TO_CHILD {
            // The words Salesforce answers a subquery with, as clients report them.
            return Err(ApiError::new(
                400,
                "FUNCTIONALITY_NOT_ENABLED",
                "Aggregate Relationships not supported in Bulk V2 Query with CSV content type",
            ));
        }
        return Err(refuse(what.to_string()));
    }
    if q.offset().is_some() {
        return Err(refuse("OFFSET".to_string()));
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
            kind: match field_type(org, &q, &def, name) {
                Some(FieldType::Datetime) => CsvKind::Datetime,
                _ => CsvKind::Plain,
            },
        })
        .collect();
    Ok((q, columns))
}

/// The type of a selected field or relationship path (`Account.CreatedDate`).
fn field_type(org: &Org, q: &Soql, def: &ObjectDef, path: &str) -> Option<FieldType> {
    let Some((prefix, last)) = path.rsplit_once('.') else {
        return def.describe.field(path).map(|f| f.kind());
    };
    let target = q.joins().iter().find(|j| j.path == prefix)?;
    let parent = find_object(org, &target.target)?;
    parent.describe.field(last).map(|f| f.kind())
}

/// Runs a job's query over the org as it is now: its columns and rows, or why it failed.
fn execute(
    org: &Org,
    soql: &str,
    all: bool,
) -> Result<(Vec<CsvColumn>, Vec<Arc<Record>>), ApiError> {
    let (q, columns) = plan(org, soql)?;
    let rows: Vec<Arc<Record>> = if q.has_order() || !q.joins().is_empty() {
        exec::run(org, &q, all)
            .records
            .into_iter()
            .map(Arc::new)
            .collect()
    } else {
        // Id order, as stored: share the matching records themselves.
        let mut rows = org.scan(&q.object, all, |r| q.matches(r).then(|| r.clone()));
        if let Some(n) = q.limit() {
            rows.truncate(n);
        }
        rows
    };
    Ok((columns, rows))
}

/// `GET .../jobs/query`: every job kept, newest last.
/// `GET jobs/query`, with the documented filters: `jobType` (every job here is `V2Query`),
/// `concurrencyMode` (`Parallel`), `isPkChunkingEnabled` (never: the emulator does not
/// chunk by primary key).
pub(super) async fn list_jobs(
    State(st): S,
    Path(version): Path<String>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    bulk_version(&version)?;
    let matches = |key: &str, value: &str| params.get(key).is_none_or(|v| v == value);
    let listed = matches("jobType", "V2Query")
        && matches("concurrencyMode", "Parallel")
        && matches("isPkChunkingEnabled", "false");
    let jobs = st.jobs();
    let records: Vec<JobInfo> = jobs
        .order
        .iter()
        .filter(|_| listed)
        .filter_map(|id| jobs.map.get(id))
        .map(|j| j.info(&st.org.user_id, true))
        .collect();
    let body = to_json(&json!({"done": true, "records": records, "nextRecordsUrl": null}))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `GET .../jobs/query/{id}`: each poll moves a running job one state on.
pub(super) async fn job_info(
    State(st): S,
    Path((version, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    bulk_version(&version)?;
    // The first poll runs the query, outside the jobs' lock.
    let pending = {
        let jobs = st.jobs();
        let job = jobs.map.get(&id).ok_or_else(|| job_not_found(&id))?;
        (job.state == JobState::UploadComplete)
            .then(|| (job.soql.clone(), job.operation == "queryAll"))
    };
    let ran = match pending {
        Some((soql, all)) => {
            let org = st.org.clone();
            let started = Instant::now();
            let result = tokio::task::spawn_blocking(move || execute(&org, &soql, all))
                .await
                .map_err(internal)?;
            let ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
            Some((result, ms))
        }
        None => None,
    };
    let now = stamp(&st.org);
    let mut jobs = st.jobs();
    let job = jobs.map.get_mut(&id).ok_or_else(|| job_not_found(&id))?;
    let next = match (job.state, ran) {
        (JobState::UploadComplete, Some((Ok((columns, rows)), ms))) => {
            st.result_bytes
                .fetch_add(estimated_bytes(&rows, &columns), Ordering::Relaxed);
            job.columns = Arc::new(columns);
            job.rows = Arc::new(rows);
            job.processing_ms = ms;
            Some(JobState::InProgress)
        }
        (JobState::UploadComplete, Some((Err(e), _))) => {
            // As Salesforce reports a query that fails while it runs.
            job.error_message = Some(format!("{}: {}", e.code, e.message));
            Some(JobState::Failed)
        }
        (JobState::InProgress, _) => Some(JobState::JobComplete),
        _ => None,
    };
    if let Some(state) = next {
        job.state = state;
        job.modstamp_ms = now;
    }
    let body = to_json(&job.info(&st.org.user_id, true))?;
    Ok(json_response(StatusCode::OK, body))
}

/// `PATCH .../jobs/query/{id}` with `{"state": "Aborted"}`.
pub(super) async fn abort_job(
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
pub(super) async fn delete_job(
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
pub(super) async fn job_results(
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
    .map_err(internal)?
    .map_err(internal)?;
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/csv; charset=UTF-8")],
        csv,
    )
        .into_response();
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
}
