//! The composite resources: sObject Collections create / update / delete
//! (`composite/sobjects`, with `allOrNone`), `composite` (subrequests in order, with
//! `@{referenceId.path}` references to earlier answers), `composite/batch` (independent
//! subrequests) and `composite/tree/{Object}` (records with nested children, all or none:
//! checked first, then created in one transaction).
//!
//! It owns the request and response shapes of these resources. Subrequests of `composite`
//! and `composite/batch` run through the same session routes a client calls ([`CompositeState::api`],
//! set once the router is built), so each behaves exactly as its standalone resource; they
//! count as one API call, as Salesforce counts them. Collections and trees write through the
//! store. A request that is all or none runs as one store transaction
//! ([`Org::atomically`]): when a part fails, what the others changed is undone and their
//! change events are never published, as Salesforce rolls the transaction back.

use super::query::api_version;
use super::rest::{comma_list, json_body, normalize_id, origin};
use super::store::{ApiError, Org};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value as J, json};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

/// Records one sObject Collections or tree request may carry.
pub const MAX_RECORDS: usize = 200;
/// Subrequests one `composite` or `composite/batch` request may carry.
pub const MAX_SUBREQUESTS: usize = 25;

pub struct CompositeState {
    pub org: Arc<Org>,
    /// The session routes subrequests run through; set once the router is built.
    pub api: OnceLock<Router>,
}

pub fn routes(state: Arc<CompositeState>) -> Router {
    Router::new()
        .route("/services/data/{version}/composite", post(composite))
        .route("/services/data/{version}/composite/batch", post(batch))
        .route(
            "/services/data/{version}/composite/sobjects",
            post(collection_create)
                .patch(collection_update)
                .delete(collection_delete),
        )
        .route(
            "/services/data/{version}/composite/tree/{object}",
            post(tree),
        )
        .with_state(state)
}

type S = State<Arc<CompositeState>>;

/// An error inside a collection or tree result: `statusCode` rather than `errorCode`.
fn result_error(e: &ApiError) -> J {
    json!({"statusCode": e.code, "message": e.message, "fields": e.fields})
}

fn rolled_back() -> ApiError {
    ApiError::new(
        400,
        "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "Record rolled back because not all records were valid and the request was using \
         AllOrNone header",
    )
}

fn missing(what: &str) -> ApiError {
    ApiError::new(
        400,
        "JSON_PARSER_ERROR",
        format!("The request body must carry '{what}'"),
    )
}

fn too_many(n: usize, max: usize, what: &str) -> ApiError {
    ApiError::new(
        400,
        "EXCEEDED_ID_LIMIT",
        format!("{n} {what} were sent; one request takes at most {max}"),
    )
}

/// A record of a collection: its object and its fields.
type Typed = (String, Map<String, J>);

/// A collection record: its object (`attributes.type`) and its fields.
fn typed_record(record: &J) -> Result<Typed, ApiError> {
    let object = record
        .get("attributes")
        .and_then(|a| a.get("type"))
        .and_then(J::as_str)
        .ok_or_else(|| {
            ApiError::new(
                400,
                "INVALID_TYPE",
                "Each record must name its type in attributes.type",
            )
        })?;
    let mut fields = record.as_object().cloned().unwrap_or_default();
    fields.remove("attributes");
    Ok((object.to_string(), fields))
}

fn records_of(body: &J) -> Result<Vec<J>, ApiError> {
    let records = body
        .get("records")
        .and_then(J::as_array)
        .cloned()
        .ok_or_else(|| missing("records"))?;
    if records.len() > MAX_RECORDS {
        return Err(too_many(records.len(), MAX_RECORDS, "records"));
    }
    Ok(records)
}

fn save_results(results: Vec<(Option<String>, Result<(), ApiError>)>) -> Response {
    let out: Vec<J> = results
        .into_iter()
        .map(|(id, r)| {
            let mut j = match r {
                Ok(()) => json!({"success": true, "errors": []}),
                Err(e) => json!({"success": false, "errors": [result_error(&e)]}),
            };
            if let Some(id) = id {
                j["id"] = J::String(id);
            }
            j
        })
        .collect();
    Json(out).into_response()
}

/// Runs a collection's writes, in order; with `allOrNone` as one transaction that a failure
/// rolls back: then every result is a failure, the failing ones with their error, the others
/// `ALL_OR_NONE_OPERATION_ROLLED_BACK` (a rolled-back create has no id).
async fn run_collection(
    org: &Org,
    all_or_none: bool,
    created: bool,
    run: impl FnOnce() -> Vec<(Option<String>, Result<(), ApiError>)>,
) -> Response {
    if !all_or_none {
        return save_results(run());
    }
    let results = org
        .atomically(async {
            let results = run();
            let ok = results.iter().all(|(_, r)| r.is_ok());
            (results, ok)
        })
        .await;
    if results.iter().all(|(_, r)| r.is_ok()) {
        return save_results(results);
    }
    save_results(
        results
            .into_iter()
            .map(|(id, r)| match r {
                Ok(()) => ((!created).then_some(id).flatten(), Err(rolled_back())),
                Err(e) => (id, Err(e)),
            })
            .collect(),
    )
}

/// `POST composite/sobjects`: creates up to 200 records of any objects, in order.
async fn collection_create(
    State(st): S,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let body = json_body(&headers, &body)?;
    let all_or_none = body.get("allOrNone").and_then(J::as_bool).unwrap_or(false);
    let items: Vec<Result<Typed, ApiError>> = records_of(&body)?.iter().map(typed_record).collect();
    let origin = origin(&version, &headers);
    let run = || {
        items
            .into_iter()
            .map(
                |it| match it.and_then(|(o, f)| st.org.create(&o, &f, &origin)) {
                    Ok(id) => (Some(id), Ok(())),
                    Err(e) => (None, Err(e)),
                },
            )
            .collect()
    };
    Ok(run_collection(&st.org, all_or_none, true, run).await)
}

/// `PATCH composite/sobjects`: updates up to 200 records, each with its `id`.
async fn collection_update(
    State(st): S,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let body = json_body(&headers, &body)?;
    let all_or_none = body.get("allOrNone").and_then(J::as_bool).unwrap_or(false);
    type Item = (
        Option<String>,
        Result<(String, String, Map<String, J>), ApiError>,
    );
    let items: Vec<Item> = records_of(&body)?
        .iter()
        .map(|r| {
            let raw_id = r.get("id").or_else(|| r.get("Id")).and_then(J::as_str);
            let id = raw_id.and_then(normalize_id);
            let item = typed_record(r).and_then(|(object, mut fields)| {
                fields.remove("id");
                fields.remove("Id");
                let id = id.clone().ok_or_else(|| {
                    ApiError::new(
                        400,
                        "MALFORMED_ID",
                        format!("invalid record id: {}", raw_id.unwrap_or_default()),
                    )
                })?;
                Ok((object, id, fields))
            });
            (id.or(raw_id.map(str::to_string)), item)
        })
        .collect();
    let origin = origin(&version, &headers);
    let run = || {
        items
            .into_iter()
            .map(|(id, it)| {
                let r = it.and_then(|(o, i, f)| st.org.update(&o, &i, &f, &origin));
                (id, r)
            })
            .collect()
    };
    Ok(run_collection(&st.org, all_or_none, false, run).await)
}

/// `DELETE composite/sobjects?ids=a,b&allOrNone=true`.
async fn collection_delete(
    State(st): S,
    Path(version): Path<String>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let all_or_none = params.get("allOrNone").is_some_and(|v| v == "true");
    let ids = comma_list(&params, "ids");
    if ids.is_empty() {
        return Err(ApiError::new(
            400,
            "MISSING_ARGUMENT",
            "The 'ids' parameter is required",
        ));
    }
    if ids.len() > MAX_RECORDS {
        return Err(too_many(ids.len(), MAX_RECORDS, "ids"));
    }
    // An id says its object through its key prefix.
    // (the id as sent, then its object and 18-character id)
    type Target = (String, Result<(String, String), ApiError>);
    let targets: Vec<Target> = ids
        .iter()
        .map(|raw| {
            let target = normalize_id(raw)
                .ok_or_else(|| ApiError::new(400, "MALFORMED_ID", format!("malformed id {raw}")))
                .and_then(|id| {
                    object_of(&st.org, &id)
                        .map(|o| (o, id))
                        .ok_or_else(|| ApiError::new(404, "ENTITY_IS_DELETED", "entity is deleted"))
                });
            (raw.clone(), target)
        })
        .collect();
    let origin = origin(&version, &headers);
    let run = || {
        targets
            .into_iter()
            .map(|(raw, t)| {
                let r = t.and_then(|(o, id)| st.org.delete(&o, &id, &origin));
                (Some(raw), r)
            })
            .collect()
    };
    Ok(run_collection(&st.org, all_or_none, false, run).await)
}

/// The object whose key prefix starts `id`.
fn object_of(org: &Org, id: &str) -> Option<String> {
    org.object_names().into_iter().find(|n| {
        org.object(n).ok().is_some_and(|d| {
            d.describe
                .key_prefix
                .as_deref()
                .is_some_and(|p| id.starts_with(p))
        })
    })
}

/// One subrequest's answer: status, `Location` when it created a record, body.
struct SubAnswer {
    status: u16,
    location: Option<String>,
    body: J,
}

/// Runs one subrequest through the session routes, with the caller's session.
async fn dispatch(
    st: &CompositeState,
    headers: &HeaderMap,
    method: &str,
    url: &str,
    body: Option<&J>,
) -> SubAnswer {
    let refuse = |status: u16, code: &str, message: String| SubAnswer {
        status,
        location: None,
        body: json!([{"errorCode": code, "message": message, "fields": []}]),
    };
    let Ok(method) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else {
        return refuse(400, "INVALID_REQUEST", format!("unknown method {method}"));
    };
    let url = if url.starts_with('/') {
        url.to_string()
    } else {
        format!("/services/data/{url}")
    };
    // The front layer (which drops trailing slashes) does not see subrequests.
    let url = match url.split_once('?') {
        Some((path, query)) => format!("{}?{query}", path.trim_end_matches('/')),
        None => url.trim_end_matches('/').to_string(),
    };
    let Some(api) = st.api.get() else {
        return refuse(500, "UNKNOWN_EXCEPTION", "composite is not wired".into());
    };
    let mut req = Request::builder()
        .method(method)
        .uri(&url)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        req = req.header(header::AUTHORIZATION, auth);
    }
    if let Some(options) = headers.get("sforce-call-options") {
        req = req.header("sforce-call-options", options);
    }
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let req = match req.body(Body::from(bytes)) {
        Ok(r) => r,
        Err(e) => return refuse(400, "INVALID_REQUEST", format!("bad subrequest url: {e}")),
    };
    let resp = match api.clone().oneshot(req).await {
        Ok(r) => r,
        Err(e) => match e {},
    };
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let body: J = if bytes.is_empty() {
        J::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| J::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    let location = (status == 201)
        .then(|| {
            body.get("id")
                .and_then(J::as_str)
                .map(|id| format!("{url}/{id}"))
        })
        .flatten();
    SubAnswer {
        status,
        location,
        body,
    }
}

/// The value `@{ref.path}` names in the answers so far (`path` as `id`, `records[0].Id`).
fn lookup_reference(expr: &str, done: &HashMap<String, J>) -> Option<String> {
    let mut parts = expr.split('.');
    let mut value = done.get(parts.next()?)?;
    for part in parts {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.strip_suffix(']')?.parse::<usize>().ok()),
            None => (part, None),
        };
        if !name.is_empty() {
            value = value.get(name)?;
        }
        if let Some(i) = index {
            value = value.get(i)?;
        }
    }
    match value {
        J::String(s) => Some(s.clone()),
        J::Null => None,
        other => Some(other.to_string()),
    }
}

/// `text` with every `@{...}` reference replaced; the first unresolved reference otherwise.
fn resolve(text: &str, done: &HashMap<String, J>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("@{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let expr = &after[..end];
        out.push_str(&lookup_reference(expr, done).ok_or_else(|| expr.to_string())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve_json(value: &J, done: &HashMap<String, J>) -> Result<J, String> {
    Ok(match value {
        J::String(s) => J::String(resolve(s, done)?),
        J::Array(items) => J::Array(
            items
                .iter()
                .map(|v| resolve_json(v, done))
                .collect::<Result<_, _>>()?,
        ),
        J::Object(map) => J::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), resolve_json(v, done)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn halted(reference: &str, message: String) -> J {
    json!({
        "body": [{"errorCode": "PROCESSING_HALTED", "message": message}],
        "httpHeaders": {},
        "httpStatusCode": 400,
        "referenceId": reference,
    })
}

/// `POST composite`: up to 25 subrequests in order; each may use `@{ref.path}` to take a
/// value from an earlier answer. With `allOrNone`, the first failure halts the rest.
async fn composite(
    State(st): S,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let body = json_body(&headers, &body)?;
    let all_or_none = body.get("allOrNone").and_then(J::as_bool).unwrap_or(false);
    let requests = body
        .get("compositeRequest")
        .and_then(J::as_array)
        .ok_or_else(|| missing("compositeRequest"))?;
    if requests.len() > MAX_SUBREQUESTS {
        return Err(too_many(requests.len(), MAX_SUBREQUESTS, "subrequests"));
    }
    if !all_or_none {
        let (out, _) = subrequests(&st, &headers, requests, false).await?;
        return Ok(Json(json!({"compositeResponse": out})).into_response());
    }
    let answer = st
        .org
        .atomically(async {
            let answer = subrequests(&st, &headers, requests, true).await;
            let ok = matches!(&answer, Ok((_, None)));
            (answer, ok)
        })
        .await;
    let (mut out, failed) = answer?;
    if failed.is_some() {
        // What ran before the failure was rolled back with it.
        for sub in out.iter_mut() {
            if sub["httpStatusCode"].as_u64().is_some_and(|s| s < 400) {
                let reference = sub["referenceId"].as_str().unwrap_or_default().to_string();
                *sub = halted(
                    &reference,
                    "The transaction was rolled back since another operation in the same \
                     transaction failed."
                        .to_string(),
                );
            }
        }
    }
    Ok(Json(json!({"compositeResponse": out})).into_response())
}

/// Runs `composite` subrequests in order: their answers, and the reference of the first that
/// failed when `all_or_none` (the ones after it are halted).
async fn subrequests(
    st: &CompositeState,
    headers: &HeaderMap,
    requests: &[J],
    all_or_none: bool,
) -> Result<(Vec<J>, Option<String>), ApiError> {
    let mut done: HashMap<String, J> = HashMap::new();
    let mut out = Vec::new();
    let mut failed: Option<String> = None;
    for sub in requests {
        let reference = sub
            .get("referenceId")
            .and_then(J::as_str)
            .ok_or_else(|| missing("compositeRequest[].referenceId"))?
            .to_string();
        if let Some(first) = &failed {
            out.push(halted(
                &reference,
                format!(
                    "The transaction was rolled back since another operation in the same \
                     transaction failed ({first})."
                ),
            ));
            continue;
        }
        let method = sub.get("method").and_then(J::as_str).unwrap_or("GET");
        let url = sub
            .get("url")
            .and_then(J::as_str)
            .ok_or_else(|| missing("compositeRequest[].url"))?;
        let resolved = resolve(url, &done).and_then(|u| {
            let b = sub
                .get("body")
                .map(|b| resolve_json(b, &done))
                .transpose()?;
            Ok((u, b))
        });
        let (url, sub_body) = match resolved {
            Ok(r) => r,
            Err(expr) => {
                out.push(halted(
                    &reference,
                    format!("Invalid reference specified. No value for {expr} found"),
                ));
                if all_or_none {
                    failed = Some(reference);
                }
                continue;
            }
        };
        let answer = dispatch(st, headers, method, &url, sub_body.as_ref()).await;
        let mut http_headers = Map::new();
        if let Some(l) = &answer.location {
            http_headers.insert("Location".into(), J::String(l.clone()));
        }
        if answer.status < 400 {
            done.insert(reference.clone(), answer.body.clone());
        } else if all_or_none {
            failed = Some(reference.clone());
        }
        out.push(json!({
            "body": answer.body,
            "httpHeaders": http_headers,
            "httpStatusCode": answer.status,
            "referenceId": reference,
        }));
    }
    Ok((out, failed))
}

/// `POST composite/batch`: up to 25 independent subrequests (URLs relative to
/// `/services/data/`); `haltOnError` stops at the first failure.
async fn batch(
    State(st): S,
    Path(version): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let body = json_body(&headers, &body)?;
    let halt_on_error = body
        .get("haltOnError")
        .and_then(J::as_bool)
        .unwrap_or(false);
    let requests = body
        .get("batchRequests")
        .and_then(J::as_array)
        .ok_or_else(|| missing("batchRequests"))?;
    if requests.len() > MAX_SUBREQUESTS {
        return Err(too_many(requests.len(), MAX_SUBREQUESTS, "subrequests"));
    }
    let mut results = Vec::new();
    let mut has_errors = false;
    for sub in requests {
        if halt_on_error && has_errors {
            results.push(json!({"statusCode": 412, "result": [{
                "errorCode": "BATCH_PROCESSING_HALTED",
                "message": "Batch processing halted per request"}]}));
            continue;
        }
        let method = sub.get("method").and_then(J::as_str).unwrap_or("GET");
        let url = sub
            .get("url")
            .and_then(J::as_str)
            .ok_or_else(|| missing("batchRequests[].url"))?;
        let answer = dispatch(&st, &headers, method, url, sub.get("richInput")).await;
        has_errors |= answer.status >= 400;
        results.push(json!({"statusCode": answer.status, "result": answer.body}));
    }
    Ok(Json(json!({"hasErrors": has_errors, "results": results})).into_response())
}

/// One record of a tree, flattened: parents come before their children.
struct TreeRecord {
    reference: String,
    object: String,
    fields: Map<String, J>,
    /// The parent's index in the flattened list and the field that points to it.
    parent: Option<(usize, String)>,
}

/// Flattens `records` of `object` (children nested under their relationship names).
fn flatten(
    org: &Org,
    object: &str,
    records: &[J],
    parent: Option<(usize, String)>,
    out: &mut Vec<TreeRecord>,
    depth: usize,
) -> Result<(), ApiError> {
    if depth > 5 {
        return Err(ApiError::new(
            400,
            "INVALID_INPUT",
            "A tree is at most five levels deep",
        ));
    }
    for record in records {
        let (kind, fields) = typed_record(record)?;
        if !kind.eq_ignore_ascii_case(object) {
            return Err(ApiError::new(
                400,
                "INVALID_INPUT",
                format!("A record of type {kind} cannot stand where {object} records go"),
            ));
        }
        let reference = record
            .get("attributes")
            .and_then(|a| a.get("referenceId"))
            .and_then(J::as_str)
            .ok_or_else(|| missing("attributes.referenceId"))?
            .to_string();
        let def = org.object(object)?;
        let mut own = Map::new();
        let mut children = Vec::new();
        for (k, v) in fields {
            match v.get("records").and_then(J::as_array) {
                Some(nested) => {
                    let rel = def
                        .raw
                        .get("childRelationships")
                        .and_then(J::as_array)
                        .and_then(|rels| {
                            rels.iter().find(|r| {
                                r.get("relationshipName").and_then(J::as_str) == Some(k.as_str())
                            })
                        })
                        .ok_or_else(|| {
                            ApiError::new(
                                400,
                                "INVALID_FIELD",
                                format!("No such relationship '{k}' on {object}"),
                            )
                        })?;
                    let child = rel.get("childSObject").and_then(J::as_str).unwrap_or("");
                    let field = rel.get("field").and_then(J::as_str).unwrap_or("");
                    children.push((child.to_string(), field.to_string(), nested.clone()));
                }
                None => {
                    own.insert(k, v);
                }
            }
        }
        let index = out.len();
        out.push(TreeRecord {
            reference,
            object: def.describe.name.clone(),
            fields: own,
            parent: parent.clone(),
        });
        for (child, field, nested) in children {
            flatten(org, &child, &nested, Some((index, field)), out, depth + 1)?;
        }
    }
    Ok(())
}

/// `POST composite/tree/{Object}`: creates records with their children, all or none; the
/// answer maps each `referenceId` to its new id (201), or lists the errors (400).
async fn tree(
    State(st): S,
    Path((version, object)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    api_version(&version)?;
    let def = st.org.object(&object)?;
    let body = json_body(&headers, &body)?;
    let records = body
        .get("records")
        .and_then(J::as_array)
        .ok_or_else(|| missing("records"))?;
    let mut flat = Vec::new();
    flatten(&st.org, &def.describe.name, records, None, &mut flat, 1)?;
    if flat.len() > MAX_RECORDS {
        return Err(too_many(flat.len(), MAX_RECORDS, "records"));
    }
    // Check every record first; a child's parent field gets a stand-in id until the parent
    // exists.
    let stand_in = J::String(crate::model::id::id18("000000000000000"));
    let errors: Vec<J> = flat
        .iter()
        .filter_map(|r| {
            let mut fields = r.fields.clone();
            if let Some((_, field)) = &r.parent {
                fields.insert(field.clone(), stand_in.clone());
            }
            st.org
                .check_create(&r.object, &fields)
                .err()
                .map(|e| json!({"referenceId": r.reference, "errors": [result_error(&e)]}))
        })
        .collect();
    if !errors.is_empty() {
        return Ok((
            StatusCode::BAD_REQUEST,
            Json(json!({"hasErrors": true, "results": errors})),
        )
            .into_response());
    }
    let origin = origin(&version, &headers);
    // One transaction: a record that still fails rolls back those created before it.
    let created = st
        .org
        .atomically(async {
            let mut ids: Vec<String> = Vec::with_capacity(flat.len());
            let mut results = Vec::new();
            for r in &flat {
                let mut fields = r.fields.clone();
                if let Some((parent, field)) = &r.parent {
                    let parent_id = ids.get(*parent).cloned().unwrap_or_default();
                    fields.insert(field.clone(), J::String(parent_id));
                }
                match st.org.create(&r.object, &fields, &origin) {
                    Ok(id) => {
                        results.push(json!({"referenceId": r.reference, "id": id}));
                        ids.push(id);
                    }
                    Err(e) => {
                        let failed =
                            json!({"referenceId": r.reference, "errors": [result_error(&e)]});
                        return (Err(failed), false);
                    }
                }
            }
            (Ok(results), true)
        })
        .await;
    match created {
        Ok(results) => Ok((
            StatusCode::CREATED,
            Json(json!({"hasErrors": false, "results": results})),
        )
            .into_response()),
        Err(failed) => Ok((
            StatusCode::BAD_REQUEST,
            Json(json!({"hasErrors": true, "results": [failed]})),
        )
            .into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_into_earlier_answers() {
        let mut done = HashMap::new();
        done.insert("acct".to_string(), json!({"id": "001A", "success": true}));
        done.insert(
            "q".to_string(),
            json!({"records": [{"Id": "003B", "Count": 2}]}),
        );
        assert_eq!(
            resolve("/sobjects/Account/@{acct.id}", &done).as_deref(),
            Ok("/sobjects/Account/001A")
        );
        assert_eq!(
            resolve("@{q.records[0].Id}-@{q.records[0].Count}", &done).as_deref(),
            Ok("003B-2")
        );
        assert_eq!(resolve("@{nope.id}", &done), Err("nope.id".to_string()));
        assert_eq!(
            resolve("@{acct.missing}", &done),
            Err("acct.missing".to_string())
        );
        assert_eq!(resolve("no refs", &done).as_deref(), Ok("no refs"));
        let body = resolve_json(&json!({"AccountId": "@{acct.id}", "n": 1}), &done);
        assert_eq!(body, Ok(json!({"AccountId": "001A", "n": 1})));
    }
}
