//! The emulator's control API under `/emulator/`: what tests, demos and benchmarks use to
//! steer the fake org (inspect subscriptions, expire tokens, drop streams).
//!
//! It is not part of Salesforce's surface and needs no token: the emulator is a local tool.

use super::pubsub::SubscriptionRecord;
use super::rest::RestState;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value as J, json};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Handles into the Pub/Sub side that the control API steers.
#[derive(Clone)]
pub struct ControlState {
    pub subscriptions: Arc<Mutex<Vec<SubscriptionRecord>>>,
    pub drop_streams: Arc<Mutex<CancellationToken>>,
}

pub fn router() -> Router<Arc<RestState>> {
    Router::new()
        .route("/emulator/stats", get(stats))
        .route("/emulator/expire-tokens", post(expire_tokens))
        .route("/emulator/drop-streams", post(drop_streams))
}

/// Subscriptions opened so far, events per channel, records per object.
async fn stats(State(st): State<Arc<RestState>>) -> Json<J> {
    let subscriptions = st
        .control
        .subscriptions
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let records: serde_json::Map<String, J> = st
        .org
        .objects
        .keys()
        .map(|o| (o.clone(), J::from(st.org.records(o).len())))
        .collect();
    Json(json!({
        "org_id": st.org.org_id,
        "subscriptions": subscriptions,
        "channel_events": st.org.bus.counts(),
        "records": records,
        "tip_replay_id": st.org.bus.tip(),
    }))
}

/// Invalidates every issued token: REST answers 401 INVALID_SESSION_ID, Pub/Sub an auth error.
async fn expire_tokens(State(st): State<Arc<RestState>>) -> Json<J> {
    st.org.expire_tokens();
    Json(json!({"expired": true}))
}

/// Ends every open Subscribe stream with UNAVAILABLE.
async fn drop_streams(State(st): State<Arc<RestState>>) -> Json<J> {
    if let Ok(mut token) = st.control.drop_streams.lock() {
        token.cancel();
        *token = CancellationToken::new();
    }
    Json(json!({"dropped": true}))
}
