//! The emulator's control API under `/emulator/`: what tests, demos and benchmarks use to
//! steer the fake org: reset, seed, a workload at a rate, gap and overflow events, schema
//! changes, token expiry, dropped or refused streams, corrupt payloads, the clock, stats.
//!
//! It is not part of Salesforce's surface and needs no token: the emulator is a local tool.
//! Each handler reads its request and calls the store, the workload or the Pub/Sub handles;
//! it must not change the org any other way, so every change still publishes its event.

use super::pubsub::SubscriptionRecord;
use super::store::{ApiError, Org, TxnStep};
use super::workload::{self, Workload};
use crate::model::ChangeType;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value as J, json};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// What the control API steers: the org, and handles into the Pub/Sub side and the workload.
#[derive(Clone)]
pub struct ControlState {
    pub org: Arc<Org>,
    pub subscriptions: Arc<Mutex<Vec<SubscriptionRecord>>>,
    pub drop_streams: Arc<Mutex<CancellationToken>>,
    pub workload: Arc<Workload>,
}

/// The `/emulator/*` routes.
pub fn routes(state: Arc<ControlState>) -> Router {
    Router::new()
        .route("/emulator/stats", get(stats))
        .route("/emulator/expire-tokens", post(expire_tokens))
        .route("/emulator/drop-streams", post(drop_streams))
        .route("/emulator/undelete", post(undelete))
        .route("/emulator/mass-update", post(mass_update))
        .route("/emulator/gap", post(gap))
        .route("/emulator/add-field", post(add_field))
        .route("/emulator/remove-field", post(remove_field))
        .route("/emulator/corrupt", post(corrupt))
        .route("/emulator/refuse", post(refuse))
        .route("/emulator/advance-clock", post(advance_clock))
        .route("/emulator/reset", post(reset))
        .route("/emulator/seed", post(seed))
        .route("/emulator/workload", post(start_workload))
        .route("/emulator/workload/stop", post(stop_workload))
        .route("/emulator/transaction", post(transaction))
        .route("/emulator/settings", post(settings))
        .with_state(state)
}

/// Empties the org (records and stored events) and stops the workload; objects, schemas and
/// tokens stay. Replay ids from before are refused afterwards, like purged ones.
async fn reset(State(st): S) -> Json<J> {
    st.workload.stop();
    st.org.reset();
    if let Ok(mut subs) = st.subscriptions.lock() {
        subs.clear();
    }
    Json(json!({"reset": true, "tip_replay_id": st.org.bus.tip()}))
}

/// `{"object": "Account", "count": N, "seed": 1, "events": true, "ids": true}`: creates N
/// records with random valid values, each with its CREATE event unless `events` is false (a
/// large org to snapshot, without a backlog); returns their ids unless `ids` is false.
async fn seed(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let object = text(&body, "object")?;
    let count = count(&body, "count")?;
    let seed = body.get("seed").and_then(J::as_u64).unwrap_or(1);
    let events = body.get("events").and_then(J::as_bool).unwrap_or(true);
    let org = st.org.clone();
    let name = object.to_string();
    // Large seeds take a while: keep the server's threads free meanwhile.
    let ids = tokio::task::spawn_blocking(move || workload::seed(&org, &name, count, seed, events))
        .await
        .map_err(|e| ApiError::new(500, "UNKNOWN_EXCEPTION", e.to_string()))??;
    if body.get("ids").and_then(J::as_bool) == Some(false) {
        return Ok(Json(json!({"object": object, "created": ids.len()})));
    }
    Ok(Json(
        json!({"object": object, "created": ids.len(), "ids": ids}),
    ))
}

/// `{"rate": 500, "objects": ["Account", ...]}`: random creates, updates, deletes and
/// undeletes at `rate` changes a second until stopped (replaces a running workload).
async fn start_workload(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let rate = field(&body, "rate")?
        .as_f64()
        .ok_or_else(|| ApiError::new(400, "JSON_PARSER_ERROR", "`rate` must be a number"))?;
    let objects = match body.get("objects") {
        Some(_) => strings(&body, "objects")?,
        None => workload::DEFAULT_OBJECTS
            .iter()
            .map(|o| o.to_string())
            .collect(),
    };
    st.workload.start(st.org.clone(), rate, objects)?;
    Ok(Json(st.workload.status()))
}

async fn stop_workload(State(st): S) -> Json<J> {
    let changes = st.workload.stop();
    Json(json!({"running": false, "changes": changes}))
}

/// `{"steps": [{"create": {"object", "count", "fields"}}, {"update_all": {"object",
/// "fields"}}, {"delete_all": {"object"}}]}`: one transaction. Past the overflow threshold
/// the rest is made without events and each entity gets one GAP_OVERFLOW.
async fn transaction(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let steps: Vec<TxnStep> = serde_json::from_value(field(&body, "steps")?.clone())
        .map_err(|e| ApiError::new(400, "JSON_PARSER_ERROR", format!("`steps`: {e}")))?;
    let report = st
        .org
        .large_transaction(&steps, "com/salesforce/api/soap/62.0")?;
    Ok(Json(json!(report)))
}

/// `{"overflow_threshold": N}`: changes per transaction that still get change events;
/// `{"delivery_allocation": N}`: events delivered per rolling 24 hours past which Subscribe
/// is refused and streams end (`null` lifts it).
async fn settings(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    if body.get("overflow_threshold").is_some() {
        st.org
            .set_overflow_threshold(count(&body, "overflow_threshold")?);
    }
    match body.get("delivery_allocation") {
        None => {}
        Some(J::Null) => st.org.set_delivery_allocation(None),
        Some(_) => st
            .org
            .set_delivery_allocation(Some(count(&body, "delivery_allocation")? as u64)),
    }
    Ok(Json(json!({
        "overflow_threshold": st.org.overflow_threshold(),
        "delivery_allocation": st.org.delivery_allocation(),
    })))
}

fn count(body: &J, key: &str) -> Result<usize, ApiError> {
    field(body, key)?
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            ApiError::new(
                400,
                "JSON_PARSER_ERROR",
                format!("`{key}` must be a non-negative integer"),
            )
        })
}

fn strings(body: &J, key: &str) -> Result<Vec<String>, ApiError> {
    field(body, key)?
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            ApiError::new(
                400,
                "JSON_PARSER_ERROR",
                format!("`{key}` must be an array of strings"),
            )
        })
}

/// Event retention on every channel (Salesforce keeps change events 72 hours).
pub const RETENTION_MS: i64 = crate::model::EVENT_RETENTION_SECS * 1000;

/// `{"seconds": N}`: move the org's clock forward, then purge events older than the
/// retention window; a replay id from before the purge is then refused like Salesforce does.
async fn advance_clock(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let secs = field(&body, "seconds")?
        .as_f64()
        .ok_or_else(|| ApiError::new(400, "JSON_PARSER_ERROR", "`seconds` must be a number"))?;
    st.org.advance_clock((secs * 1000.0) as i64);
    let purged = st.org.bus.purge_before(st.org.now_ms() - RETENTION_MS);
    Ok(Json(
        json!({"now_ms": st.org.now_ms(), "purged_events": purged}),
    ))
}

type S = State<Arc<ControlState>>;

fn field<'a>(body: &'a J, key: &str) -> Result<&'a J, ApiError> {
    body.get(key).ok_or_else(|| {
        ApiError::new(
            400,
            "REQUIRED_FIELD_MISSING",
            format!("`{key}` is required"),
        )
    })
}

fn text<'a>(body: &'a J, key: &str) -> Result<&'a str, ApiError> {
    field(body, key)?.as_str().ok_or_else(|| {
        ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            format!("`{key}` must be a string"),
        )
    })
}

fn ids(body: &J) -> Result<Vec<String>, ApiError> {
    field(body, "ids")?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .ok_or_else(|| ApiError::new(400, "JSON_PARSER_ERROR", "`ids` must be an array of ids"))
}

/// `{"object": "Account", "id": "001..."}`: restore a deleted record (UNDELETE event).
async fn undelete(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    st.org.undelete(
        text(&body, "object")?,
        text(&body, "id")?,
        "com/salesforce/api/soap/62.0",
    )?;
    Ok(Json(json!({"undeleted": true})))
}

/// `{"object", "ids": [...], "fields": {...}}`: one transaction setting the same values on
/// several records; identical changes share one event with several recordIds.
async fn mass_update(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let fields = field(&body, "fields")?
        .as_object()
        .ok_or_else(|| ApiError::new(400, "JSON_PARSER_ERROR", "`fields` must be an object"))?;
    st.org.mass_update(
        text(&body, "object")?,
        &ids(&body)?,
        fields,
        "com/salesforce/api/rest/62.0",
    )?;
    Ok(Json(json!({"updated": true})))
}

/// `{"object", "change_type": "GAP_UPDATE", "ids": [...], "fields": {...}}`: change records
/// without an event, then send the gap event instead. With GAP_CREATE, `create` (an array of
/// field objects) creates the records silently first; their ids are returned. GAP_OVERFLOW
/// changes the records `ids` names but its event carries only the placeholder id a real org
/// sends; `ids: ["001*"]` is a wildcard.
async fn gap(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let object = text(&body, "object")?;
    let symbol = text(&body, "change_type")?;
    let change_type = ChangeType::from_symbol(symbol)
        .filter(|t| t.symbol().starts_with("GAP_"))
        .ok_or_else(|| {
            ApiError::new(400, "INVALID_TYPE", format!("`{symbol}` is not a gap type"))
        })?;
    let mut record_ids = match body.get("ids") {
        Some(_) => ids(&body)?,
        None => Vec::new(),
    };
    if let Some(creates) = body.get("create").and_then(J::as_array) {
        for c in creates {
            let fields = c.as_object().ok_or_else(|| {
                ApiError::new(400, "JSON_PARSER_ERROR", "`create` holds field objects")
            })?;
            record_ids.push(st.org.create_silently(object, fields)?);
        }
    }
    let silent = body.get("fields").and_then(J::as_object);
    st.org.gap(object, change_type, &record_ids, silent)?;
    Ok(Json(json!({"ids": record_ids})))
}

/// `{"object", "field": {describe field}}`: add a field; the object's schema id changes.
async fn add_field(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let schema_id = st
        .org
        .add_field(text(&body, "object")?, field(&body, "field")?.clone())?;
    Ok(Json(json!({"schema_id": schema_id})))
}

/// `{"object", "field": "Name__c"}`: delete a custom field; the object's schema id changes.
async fn remove_field(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let schema_id = st
        .org
        .remove_field(text(&body, "object")?, text(&body, "field")?)?;
    Ok(Json(json!({"schema_id": schema_id})))
}

/// `{"count": N}`: corrupt the next N event payloads.
async fn corrupt(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let n = field(&body, "count")?.as_u64().unwrap_or(1);
    st.org.corrupt_next(u32::try_from(n).unwrap_or(u32::MAX));
    Ok(Json(json!({"corrupting": n})))
}

/// `{"seconds": N}`: end open streams and answer Pub/Sub calls with UNAVAILABLE for N s.
async fn refuse(State(st): S, Json(body): Json<J>) -> Result<Json<J>, ApiError> {
    let secs = field(&body, "seconds")?.as_f64().unwrap_or(1.0);
    st.org.refuse_for((secs * 1000.0) as i64);
    if let Ok(mut token) = st.drop_streams.lock() {
        token.cancel();
        *token = CancellationToken::new();
    }
    Ok(Json(json!({"refusing_seconds": secs})))
}

/// Subscriptions opened so far, events per channel, records per object.
async fn stats(State(st): S) -> Json<J> {
    let subscriptions = st
        .subscriptions
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let records: serde_json::Map<String, J> = st
        .org
        .object_names()
        .into_iter()
        .map(|o| {
            let n = st.org.records(&o).len();
            (o, J::from(n))
        })
        .collect();
    Json(json!({
        "org_id": st.org.org_id,
        "subscriptions": subscriptions,
        "channel_events": st.org.bus.counts(),
        "records": records,
        "tip_replay_id": st.org.bus.tip(),
        "event_channels": st.org.event_channels(),
        "overflow_threshold": st.org.overflow_threshold(),
        "delivery_allocation": st.org.delivery_allocation(),
        "delivered_events_daily": st.org.delivery_usage().daily_used,
        "workload": st.workload.status(),
        "now_ms": st.org.now_ms(),
    }))
}

/// Invalidates every issued token: REST answers 401 INVALID_SESSION_ID, Pub/Sub an auth error.
async fn expire_tokens(State(st): S) -> Json<J> {
    st.org.expire_tokens();
    Json(json!({"expired": true}))
}

/// Ends every open Subscribe stream with UNAVAILABLE.
async fn drop_streams(State(st): S) -> Json<J> {
    if let Ok(mut token) = st.drop_streams.lock() {
        token.cancel();
        *token = CancellationToken::new();
    }
    Json(json!({"dropped": true}))
}
