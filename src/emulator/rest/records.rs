//! sObject records over REST: create, get (`?fields=`, `attributes` first, fields in describe
//! order), update and delete by id (15 or 18 characters, MALFORMED_ID otherwise), get /
//! upsert / delete by external id, and getUpdated / getDeleted with their window rules; plus
//! the request and record helpers the composite resources share (JSON bodies, ids, origins).
//! What a record may hold, and the events a change publishes, are the store's.

use super::{S, check_version, not_found, object_def};
use crate::emulator::soql;
use crate::emulator::store::{ApiError, ObjectDef, Org, Record};
use crate::model::id::id18;
use crate::model::time::{datetime_ms, format_datetime};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value as J, json};
use std::collections::HashMap;

/// `changeOrigin` for a REST change: the API and version, plus the client id when the caller
/// sent `Sforce-Call-Options: client=...`.
pub fn origin(version: &str, headers: &HeaderMap) -> String {
    let mut o = format!(
        "com/salesforce/api/rest/{}",
        version.trim_start_matches('v')
    );
    if let Some(client) = headers
        .get("sforce-call-options")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').find_map(|p| p.trim().strip_prefix("client=")))
    {
        o.push_str(";client=");
        o.push_str(client);
    }
    o
}

/// A JSON request body: 415 for a content type that is not JSON, `JSON_PARSER_ERROR` for text
/// that is not JSON.
pub fn json_body(headers: &HeaderMap, body: &[u8]) -> Result<J, ApiError> {
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        && !ct.to_ascii_lowercase().contains("json")
    {
        return Err(ApiError::new(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            format!("Content type '{ct}' is not supported: send application/json"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!("The request body is not valid JSON: {e}"),
        )
    })
}

fn body_object(body: J) -> Result<Map<String, J>, ApiError> {
    match body {
        J::Object(m) => Ok(m),
        _ => Err(ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            "The request body must be a JSON object",
        )),
    }
}

/// A 15- or 18-character id in its 18-character form (the case checksum recomputed, so an
/// 18-character id is accepted in any case of its suffix); `None` if it is not an id.
pub fn normalize_id(id: &str) -> Option<String> {
    if !id.bytes().all(|b| b.is_ascii_alphanumeric()) || !matches!(id.len(), 15 | 18) {
        return None;
    }
    id.get(..15).map(id18)
}

/// A record id from a path: MALFORMED_ID unless it is a 15- or 18-character id.
pub fn path_id(object: &str, id: &str) -> Result<String, ApiError> {
    normalize_id(id).ok_or_else(|| ApiError {
        status: 400,
        code: "MALFORMED_ID",
        message: format!("{object} ID: id value of incorrect type: {id}"),
        fields: vec!["Id".to_string()],
    })
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json;charset=UTF-8")],
        body,
    )
        .into_response()
}

/// `{"id", "success", "errors"}` (plus `created` for an upsert).
fn save_result(id: &str, created: Option<bool>) -> J {
    let mut r = json!({"id": id, "success": true, "errors": []});
    if let Some(c) = created {
        r["created"] = J::Bool(c);
    }
    r
}

pub(super) async fn create(
    State(st): S,
    Path((version, object)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let input = body_object(json_body(&headers, &body)?)?;
    let id = st
        .org
        .create(&def.describe.name, &input, &origin(&version, &headers))?;
    Ok((StatusCode::CREATED, Json(save_result(&id, None))).into_response())
}

pub(super) async fn update(
    State(st): S,
    Path((version, object, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let id = path_id(&def.describe.name, &id)?;
    let input = body_object(json_body(&headers, &body)?)?;
    st.org
        .update(&def.describe.name, &id, &input, &origin(&version, &headers))?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn delete(
    State(st): S,
    Path((version, object, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let id = path_id(&def.describe.name, &id)?;
    st.org
        .delete(&def.describe.name, &id, &origin(&version, &headers))?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn retrieve(
    State(st): S,
    Path((version, object, id)): Path<(String, String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let id = path_id(&def.describe.name, &id)?;
    let fields = selected_fields(&def, params.get("fields").map(String::as_str))?;
    let record = st.org.get(&def.describe.name, &id)?;
    record_response(&version, &def, &record, &fields)
}

/// The fields a single-record GET answers with, in describe order: those `?fields=` lists
/// (`INVALID_FIELD` for one the object does not have), else every field, compound ones
/// included.
fn selected_fields(def: &ObjectDef, list: Option<&str>) -> Result<Vec<String>, ApiError> {
    let Some(list) = list.filter(|l| !l.trim().is_empty()) else {
        return Ok(def.describe.fields.iter().map(|f| f.name.clone()).collect());
    };
    let mut wanted = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let Some(f) = def
            .describe
            .fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
        else {
            return Err(ApiError {
                status: 400,
                code: "INVALID_FIELD",
                message: format!(
                    "No such column '{name}' on entity '{}'. If you are attempting to use a \
                     custom field, be sure to append the '__c' after the custom field name. \
                     Please reference your WSDL or the describe call for the appropriate names.",
                    def.describe.name
                ),
                fields: vec![name.to_string()],
            });
        };
        wanted.push(f.name.clone());
    }
    Ok(def
        .describe
        .fields
        .iter()
        .filter(|f| wanted.contains(&f.name))
        .map(|f| f.name.clone())
        .collect())
}

/// A JSON object written in the order given (this crate's `serde_json` would sort the keys):
/// records start with `attributes`, then their fields in describe order.
pub struct Ordered(pub Vec<(String, J)>);

impl Serialize for Ordered {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A record as REST returns it: `attributes`, then `fields` (compound ones as REST's nested
/// objects, through the SOQL engine's projection).
pub fn rest_record(
    version: &str,
    def: &ObjectDef,
    record: &Record,
    fields: &[String],
) -> Result<Ordered, ApiError> {
    let soql_error = |e: soql::SoqlError| ApiError::new(400, e.code, e.message);
    let mut q = soql::parse(&format!(
        "SELECT {} FROM {}",
        fields.join(", "),
        def.describe.name
    ))
    .map_err(soql_error)?;
    q.bind(&def.describe).map_err(soql_error)?;
    let mut projected = q.project(&def.describe, record);
    let id = record.get("Id").and_then(J::as_str).unwrap_or_default();
    let mut out = vec![(
        "attributes".to_string(),
        json!({"type": def.describe.name,
               "url": format!("/services/data/{version}/sobjects/{}/{id}", def.describe.name)}),
    )];
    for f in fields {
        out.push((f.clone(), projected.remove(f).unwrap_or(J::Null)));
    }
    Ok(Ordered(out))
}

fn record_response(
    version: &str,
    def: &ObjectDef,
    record: &Record,
    fields: &[String],
) -> Result<Response, ApiError> {
    let body = serde_json::to_vec(&rest_record(version, def, record, fields)?)
        .map_err(|e| ApiError::new(500, "UNKNOWN_EXCEPTION", format!("emulator failure: {e}")))?;
    Ok(json_response(StatusCode::OK, body))
}

/// The field a `/sobjects/{Object}/{Field}/{value}` path names, if records may be found by it:
/// `Id`, an External ID field, or on a standard object an `idLookup` field, as Salesforce
/// allows.
fn external_id_field(def: &ObjectDef, name: &str) -> Result<String, ApiError> {
    let raw = def
        .raw
        .get("fields")
        .and_then(J::as_array)
        .and_then(|fields| {
            fields.iter().find(|f| {
                f.get("name")
                    .and_then(J::as_str)
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
        });
    let flag = |f: &J, k: &str| f.get(k).and_then(J::as_bool).unwrap_or(false);
    let usable = raw.is_some_and(|f| {
        f.get("name").and_then(J::as_str) == Some("Id")
            || flag(f, "externalId")
            || (!def.describe.custom && flag(f, "idLookup"))
    });
    match raw.and_then(|f| f.get("name")).and_then(J::as_str) {
        Some(canonical) if usable => Ok(canonical.to_string()),
        _ => Err(ApiError::new(
            404,
            "NOT_FOUND",
            format!("Provided external ID field does not exist or is not accessible: {name}"),
        )),
    }
}

/// Ids of the live records whose `field` holds `value` (text compared ignoring case, as
/// External ID fields are by default; ids in their 18-character form).
fn find_by_field(org: &Org, object: &str, field: &str, value: &str) -> Vec<String> {
    let wanted = if field == "Id" {
        normalize_id(value).unwrap_or_default()
    } else {
        value.to_string()
    };
    org.scan(object, false, |r| {
        let hit = match r.get(field) {
            Some(J::String(s)) => s.eq_ignore_ascii_case(&wanted),
            Some(J::Number(n)) => n.to_string() == wanted,
            Some(J::Bool(b)) => b.to_string() == wanted,
            _ => false,
        };
        hit.then(|| {
            r.get("Id")
                .and_then(J::as_str)
                .unwrap_or_default()
                .to_string()
        })
    })
}

/// HTTP 300 with the URLs of every record an external id matched.
fn multiple_choices(version: &str, object: &str, ids: &[String]) -> Response {
    let urls: Vec<String> = ids
        .iter()
        .map(|id| format!("/services/data/{version}/sobjects/{object}/{id}"))
        .collect();
    (StatusCode::MULTIPLE_CHOICES, Json(urls)).into_response()
}

pub(super) async fn get_by_external_id(
    State(st): S,
    Path((version, object, field, value)): Path<(String, String, String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let field = external_id_field(&def, &field)?;
    let fields = selected_fields(&def, params.get("fields").map(String::as_str))?;
    let ids = find_by_field(&st.org, &def.describe.name, &field, &value);
    match ids.as_slice() {
        [] => Err(not_found()),
        [id] => record_response(
            &version,
            &def,
            &st.org.get(&def.describe.name, id)?,
            &fields,
        ),
        _ => Ok(multiple_choices(&version, &def.describe.name, &ids)),
    }
}

pub(super) async fn delete_by_external_id(
    State(st): S,
    Path((version, object, field, value)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let field = external_id_field(&def, &field)?;
    let ids = find_by_field(&st.org, &def.describe.name, &field, &value);
    match ids.as_slice() {
        [] => Err(not_found()),
        [id] => {
            st.org
                .delete(&def.describe.name, id, &origin(&version, &headers))?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        _ => Ok(multiple_choices(&version, &def.describe.name, &ids)),
    }
}

/// `PATCH /sobjects/{Object}/{Field}/{value}`: creates the record (201, `created: true`) when
/// no record has that value, updates it when one has (200 with `created: false` from API
/// 46.0, 204 before), and answers 300 with the candidates when several have.
pub(super) async fn upsert(
    State(st): S,
    Path((version, object, field, value)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let v = crate::emulator::query::api_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let field = external_id_field(&def, &field)?;
    let mut input = body_object(json_body(&headers, &body)?)?;
    // The path carries the key; the body may repeat it only with the same value.
    if let Some((k, sent)) = input
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(&field))
        .map(|(k, v)| (k.clone(), v.clone()))
    {
        if sent
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case(&value))
        {
            input.remove(&k);
        } else {
            return Err(ApiError {
                status: 400,
                code: "INVALID_FIELD",
                message: format!(
                    "The value of the external ID field {field} in the body does not match the \
                     value in the URL"
                ),
                fields: vec![field.clone()],
            });
        }
    }
    let name = def.describe.name.clone();
    let origin = origin(&version, &headers);
    let ids = find_by_field(&st.org, &name, &field, &value);
    match ids.as_slice() {
        [] => {
            if field == "Id" {
                return Err(not_found());
            }
            input.insert(field.clone(), J::String(value.clone()));
            let id = st.org.create(&name, &input, &origin)?;
            Ok((StatusCode::CREATED, Json(save_result(&id, Some(true)))).into_response())
        }
        [id] => {
            st.org.update(&name, id, &input, &origin)?;
            if v >= 46.0 {
                Ok((StatusCode::OK, Json(save_result(id, Some(false)))).into_response())
            } else {
                Ok(StatusCode::NO_CONTENT.into_response())
            }
        }
        _ => Ok(multiple_choices(&version, &name, &ids)),
    }
}

/// The window a getUpdated / getDeleted call asks for, as Salesforce reads it: seconds are
/// dropped, `start` must precede `end`, and nothing older than 30 days is available.
struct Window {
    start_ms: i64,
    end_ms: i64,
    latest_covered_ms: i64,
}

const MINUTE_MS: i64 = 60_000;
const REPLICATION_DAYS: i64 = 30;

fn replication_window(org: &Org, params: &HashMap<String, String>) -> Result<Window, ApiError> {
    let bad = |message: String| ApiError::new(400, "INVALID_REPLICATION_DATE", message);
    let when = |key: &str| -> Result<i64, ApiError> {
        let text = params.get(key).ok_or_else(|| {
            ApiError::new(
                400,
                "MISSING_ARGUMENT",
                format!("The '{key}' parameter is required"),
            )
        })?;
        let ms = datetime_ms(text.trim()).ok_or_else(|| {
            ApiError::new(
                400,
                "INVALID_DATE_FORMAT",
                format!("'{text}' is not a valid ISO 8601 date and time"),
            )
        })?;
        Ok(ms - ms.rem_euclid(MINUTE_MS))
    };
    let start_ms = when("start")?;
    let end_ms = when("end")?;
    if start_ms >= end_ms {
        return Err(bad("startDate must chronologically precede endDate".into()));
    }
    let now = org.now_ms();
    let now_minute = now - now.rem_euclid(MINUTE_MS);
    if start_ms < now - REPLICATION_DAYS * 24 * 3600 * 1000 {
        return Err(bad(format!(
            "startDate cannot be more than {REPLICATION_DAYS} days ago"
        )));
    }
    Ok(Window {
        start_ms,
        end_ms,
        latest_covered_ms: end_ms.min(now_minute),
    })
}

fn stamp_ms(record: &Record) -> Option<i64> {
    record
        .get("SystemModstamp")
        .or_else(|| record.get("LastModifiedDate"))
        .and_then(J::as_str)
        .and_then(datetime_ms)
}

/// `GET /sobjects/{Object}/updated?start=&end=`: live records whose `SystemModstamp` falls in
/// the window.
pub(super) async fn updated(
    State(st): S,
    Path((version, object)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let w = replication_window(&st.org, &params)?;
    let ids = st.org.scan(&def.describe.name, false, |r| {
        let t = stamp_ms(r)?;
        (t >= w.start_ms && t < w.end_ms)
            .then(|| r.get("Id").and_then(J::as_str).map(str::to_string))
            .flatten()
    });
    Ok(Json(json!({
        "ids": ids,
        "latestDateCovered": format_datetime(w.latest_covered_ms),
    })))
}

/// How long the recycle bin keeps what it holds: the earliest deletion getDeleted can report.
const RECYCLE_BIN_DAYS: i64 = 15;

/// `GET /sobjects/{Object}/deleted?start=&end=`: records in the recycle bin deleted within the
/// window, with their deletion time.
pub(super) async fn deleted(
    State(st): S,
    Path((version, object)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    let w = replication_window(&st.org, &params)?;
    let records = st.org.scan(&def.describe.name, true, |r| {
        if r.get("IsDeleted") != Some(&J::Bool(true)) {
            return None;
        }
        let t = stamp_ms(r)?;
        (t >= w.start_ms && t < w.end_ms).then(|| {
            json!({"id": r.get("Id").cloned().unwrap_or(J::Null),
                   "deletedDate": format_datetime(t)})
        })
    });
    let now = st.org.now_ms();
    let earliest = now - RECYCLE_BIN_DAYS * 24 * 3600 * 1000;
    Ok(Json(json!({
        "deletedRecords": records,
        "earliestDateAvailable": format_datetime(earliest - earliest.rem_euclid(MINUTE_MS)),
        "latestDateCovered": format_datetime(w.latest_covered_ms),
    })))
}
