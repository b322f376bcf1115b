//! The REST listener's application: every group of routes the emulator serves over HTTP, put
//! together in one place with the middleware that wraps them, and how an [`ApiError`] becomes
//! a response.
//!
//! It only assembles and points down: what a route does, and the state it needs, belong to
//! [`super::rest`] (OAuth, versions, sObjects), [`super::query`] (query, sObject Collections,
//! limits, Bulk API 2.0) and [`super::control`] (`/emulator/*`); none of those knows the
//! others or this module. It must not grow behaviour of its own beyond the two layers every
//! request passes:
//! - every response carries `Sforce-Limit-Info` (the call is counted) and a `Date` on the
//!   org's clock;
//! - Salesforce's authenticated API (sObjects, userinfo, queries, Bulk) refuses a request
//!   without a valid bearer token, as Salesforce does; OAuth, the version list and the
//!   control API need none.

use super::store::{ApiError, Org};
use super::{control, query, rest};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

/// The application of the REST listener, over the state of each part.
pub fn router(
    rest: Arc<rest::RestState>,
    query: Arc<query::QueryState>,
    control: Arc<control::ControlState>,
) -> Router {
    let org = rest.org.clone();
    let api = rest::session_routes(rest.clone())
        .merge(query::routes(query))
        .route_layer(middleware::from_fn_with_state(org.clone(), require_session));
    rest::open_routes(rest)
        .merge(api)
        .merge(control::routes(control))
        .layer(middleware::from_fn_with_state(org, limit_info))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        (
            status,
            Json(
                json!([{ "message": self.message, "errorCode": self.code, "fields": self.fields }]),
            ),
        )
            .into_response()
    }
}

/// Adds `Sforce-Limit-Info` to every response and counts the call.
async fn limit_info(State(org): State<Arc<Org>>, req: Request, next: Next) -> Response {
    let (used, max) = org.count_api_call();
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&format!("api-usage={used}/{max}")) {
        resp.headers_mut().insert("sforce-limit-info", v);
    }
    // The Date header follows the org's clock (which the control API can advance), as
    // clients use it to place reads relative to commit timestamps.
    let date = chrono::DateTime::from_timestamp_millis(org.now_ms())
        .unwrap_or_default()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    if let Ok(v) = HeaderValue::from_str(&date) {
        resp.headers_mut().insert("date", v);
    }
    resp
}

/// Refuses calls without a valid bearer token, as Salesforce does.
async fn require_session(State(org): State<Arc<Org>>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("OAuth "))
        })
        .map(str::trim);
    match token {
        Some(t) if org.token_valid(t) => next.run(req).await,
        _ => ApiError::new(401, "INVALID_SESSION_ID", "Session expired or invalid").into_response(),
    }
}
