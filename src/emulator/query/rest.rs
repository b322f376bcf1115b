//! The REST read API: `query` / `queryAll` with query locators and `queryMore` pages, sObject
//! Collections retrieve, and `limits`. REST records start with `attributes` and then carry
//! the selected fields in SELECT order (this crate's `serde_json` sorts object keys, so
//! records are serialized by hand). A query's result is a snapshot taken at the first call:
//! later pages (`nextRecordsUrl`, always under `/query/` even for `queryAll`) do not move when
//! records change afterwards. It reads the org and must not change it.

use super::shape::{Row, RowJson, Shape};
use super::{
    MAX_BATCH_SIZE, MAX_CURSORS, MAX_RETRIEVE_IDS, MIN_BATCH_SIZE, Params, S, api_version, exec,
    find_object, internal, json_response, not_found, prepare, selects_compound, soql_error,
    to_json,
};
use crate::emulator::soql;
use crate::emulator::store::ApiError;
use crate::model::id::id18;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value as J, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

const DAILY_BULK_QUERY_JOBS: i64 = 10_000;
const DAILY_BULK_QUERY_STORAGE_MB: i64 = 976_562;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct QueryPage<'a> {
    total_size: usize,
    done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_records_url: Option<String>,
    records: Vec<RowJson<'a>>,
}

/// A query result kept for its locator: the snapshot taken at the first call.
pub(super) struct Cursor {
    shape: Arc<Shape>,
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

pub(super) async fn query(
    st: S,
    Path(version): Path<String>,
    params: Params,
    headers: HeaderMap,
) -> Response {
    run_query(st, version, params, headers, false)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

pub(super) async fn query_all(
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
    type Answer = (Shape, Result<Vec<Row>, usize>);
    let (shape, rows) = tokio::task::spawn_blocking(move || -> Result<Answer, ApiError> {
        let (q, _) = prepare(&org, &soql)?;
        let shape = Shape::of(&q);
        if q.count_only {
            return Ok((shape, Err(exec::count(&org, &q, all))));
        }
        let rows = shape.rows(exec::run(&org, &q, all));
        Ok((shape, Ok(rows)))
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
        shape: Arc::new(shape),
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
            .map(|row| RowJson {
                shape: &c.shape,
                row,
                version,
            })
            .collect(),
    };
    to_json(&page)
}

/// `GET .../query/{locator}-{offset}` (or under `queryAll/`): the next page of a snapshot.
pub(super) async fn query_more(
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
            shape: c.shape.clone(),
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

fn missing(what: &str) -> ApiError {
    ApiError::new(
        400,
        "MISSING_ARGUMENT",
        format!("The '{what}' parameter is required and must list at least one value"),
    )
}

/// `POST .../composite/sobjects/{Object}` with `{"ids": [...], "fields": [...]}`.
pub(super) async fn retrieve_post(
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
pub(super) async fn retrieve_get(
    st: S,
    Path((version, object)): Path<(String, String)>,
    Query(params): Params,
) -> Result<Response, ApiError> {
    let list = |key| crate::emulator::rest::comma_list(&params, key);
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
    let shape = Shape::of(&q);
    let rows: Vec<Option<Row>> = ids
        .iter()
        .map(|id| {
            let id = normalize_id(id)?;
            let mut record = st.org.get(&def.describe.name, &id).ok()?;
            if compound {
                let projected = q.project(&def.describe, &record);
                record.extend(projected);
            }
            Some(shape.plain_row(&record))
        })
        .collect();
    let records: Vec<Option<RowJson>> = rows
        .iter()
        .map(|r| {
            r.as_ref().map(|row| RowJson {
                shape: &shape,
                row,
                version: &version,
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, to_json(&records)?))
}

pub(super) async fn limits(State(st): S, Path(version): Path<String>) -> Result<Json<J>, ApiError> {
    api_version(&version)?;
    // The middleware has already counted this call, as Salesforce counts it.
    let (used, max) = st.org.api_usage();
    let jobs = st.jobs_created.load(Ordering::Relaxed);
    let mb = st.result_bytes.load(Ordering::Relaxed) / (1024 * 1024);
    let limit = |max: i64, used: i64| json!({"Max": max, "Remaining": (max - used).max(0)});
    let deliveries = st.org.delivery_usage();
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Ok(Json(json!({
        "DailyApiRequests": limit(max, used),
        "DailyBulkApiBatches": limit(15_000, 0),
        "DailyDeliveredPlatformEvents":
            limit(count(deliveries.daily_max), count(deliveries.daily_used)),
        "MonthlyPlatformEventsUsageEntitlement":
            limit(count(deliveries.monthly_max), count(deliveries.monthly_used)),
        "DailyBulkV2QueryJobs": limit(DAILY_BULK_QUERY_JOBS, jobs),
        "DailyBulkV2QueryFileStorageMB": limit(DAILY_BULK_QUERY_STORAGE_MB, mb),
        "DataStorageMB": limit(5, 0),
        "FileStorageMB": limit(20, 0),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

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
}
