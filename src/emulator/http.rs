//! The REST listener's application: every group of routes the emulator serves over HTTP, put
//! together in one place with the middleware that wraps them, and how an [`ApiError`] becomes
//! a response.
//!
//! It only assembles and points down: what a route does, and the state it needs, belong to
//! [`super::rest`] (OAuth, versions, sObjects), [`super::soap`] (SOAP `login()`),
//! [`super::composite`] (composite resources), [`super::query`] (query, sObject Collections,
//! limits, Bulk API 2.0) and [`super::control`] (`/emulator/*`); none of those knows the
//! others or this module. It must not grow behaviour of its own beyond the layers every
//! request passes:
//! - before routing ([`front`]): a trailing slash is dropped, the body is read whole (so a
//!   refused request's body is drained and the keep-alive connection survives) and gunzipped;
//!   after it, an error answer without a JSON body gets Salesforce's envelope, and the answer
//!   is gzipped when the client accepts it;
//! - every response carries `Sforce-Limit-Info` (the call is counted) and a `Date` on the
//!   org's clock;
//! - Salesforce's authenticated API (sObjects, userinfo, queries, Bulk) refuses a request
//!   without a valid bearer token, as Salesforce does; OAuth, the version list and the
//!   control API need none;
//! - an unknown route is `NOT_FOUND`, a known one with the wrong method `METHOD_NOT_ALLOWED`,
//!   both in the envelope.

use super::store::{ApiError, Org};
use super::{composite, compression, control, query, rest, soap};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
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
    let composite_state = Arc::new(composite::CompositeState {
        org: org.clone(),
        api: std::sync::OnceLock::new(),
    });
    let api = rest::session_routes(rest.clone())
        .merge(query::routes(query))
        .merge(composite::routes(composite_state.clone()))
        .route_layer(middleware::from_fn_with_state(org.clone(), require_session));
    // Composite subrequests run through these same routes (session check included).
    let _ = composite_state.api.set(api.clone());
    let inner = rest::open_routes(rest.clone())
        .merge(soap::routes(rest))
        .merge(api)
        .merge(control::routes(control))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(org, limit_info));
    // Routing happens inside `inner`; `front` runs before it (as the layer of an outer router
    // whose only route is `inner`), so it can rewrite the path that `inner` routes on.
    Router::new()
        .fallback_service(inner)
        .layer(middleware::from_fn(front))
}

/// The largest request body read; Salesforce's own limit for a REST request is lower.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// What every request passes before routing, and every response after:
/// - a trailing slash is dropped (`/query/?q=`, `/sobjects/Account/`), as Salesforce serves
///   both forms and clients such as simple-salesforce use the slash forms;
/// - the body is read whole (and gunzipped when `Content-Encoding: gzip`) before the route
///   sees it, so a refused request's body is still drained and the keep-alive connection
///   survives the error answer;
/// - an error answer without a JSON body gets Salesforce's envelope (OAuth's own shape under
///   `/services/oauth2/`), so no client ever sees an empty or plain-text error.
async fn front(req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    if let Some(uri) = without_trailing_slash(&parts.uri) {
        parts.uri = uri;
    }
    let path = parts.uri.path().to_string();
    let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                413,
                "REQUEST_TOO_LARGE",
                format!("The request body exceeds {MAX_BODY_BYTES} bytes"),
            )
            .into_response();
        }
    };
    let gzipped = parts
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
    let bytes = if gzipped {
        match compression::gunzip(&bytes) {
            Ok(b) => {
                parts.headers.remove(header::CONTENT_ENCODING);
                parts.headers.remove(header::CONTENT_LENGTH);
                axum::body::Bytes::from(b)
            }
            Err(e) => {
                return ApiError::new(
                    400,
                    "INVALID_CONTENT_ENCODING",
                    format!("The request body is not valid gzip: {e}"),
                )
                .into_response();
            }
        }
    } else {
        bytes
    };
    let accepts_gzip = parts
        .headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(compression::accepts_gzip);
    let method = parts.method.clone();
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let resp = if resp.status().is_client_error() || resp.status().is_server_error() {
        enveloped(resp, &path, &method).await
    } else {
        resp
    };
    if accepts_gzip {
        compression::gzip_response(resp).await
    } else {
        resp
    }
}

/// The URI without its trailing slash(es), if it has any (the root stays `/`).
fn without_trailing_slash(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    if path.len() <= 1 || !path.ends_with('/') {
        return None;
    }
    let trimmed = path.trim_end_matches('/');
    let trimmed = if trimmed.is_empty() { "/" } else { trimmed };
    let rebuilt = match uri.query() {
        Some(q) => format!("{trimmed}?{q}"),
        None => trimmed.to_string(),
    };
    rebuilt.parse().ok()
}

/// An error answer as Salesforce sends it, when the route (or axum's own rejection) left it
/// without a JSON body.
async fn enveloped(resp: Response, path: &str, method: &Method) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json") || v.contains("xml"));
    if is_json {
        return resp;
    }
    let status = resp.status();
    let text = axum::body::to_bytes(resp.into_body(), MAX_BODY_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    if path.starts_with("/services/oauth2/") {
        let description = if text.is_empty() {
            "invalid request".to_string()
        } else {
            text
        };
        return (
            status,
            Json(json!({"error": "invalid_request", "error_description": description})),
        )
            .into_response();
    }
    let (status, code, message) = match status.as_u16() {
        404 => (
            404,
            "NOT_FOUND",
            "The requested resource does not exist".to_string(),
        ),
        405 => (
            405,
            "METHOD_NOT_ALLOWED",
            format!("HTTP Method '{method}' not allowed"),
        ),
        415 => (
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            if text.is_empty() {
                "Content type not supported".to_string()
            } else {
                text
            },
        ),
        // axum's JSON rejections: a syntax error (400) or JSON of the wrong shape (422).
        400 | 422 => (
            400,
            "JSON_PARSER_ERROR",
            if text.is_empty() {
                "The request body could not be parsed".to_string()
            } else {
                text
            },
        ),
        401 => (
            401,
            "INVALID_SESSION_ID",
            "Session expired or invalid".to_string(),
        ),
        s => (
            s,
            if s >= 500 {
                "UNKNOWN_EXCEPTION"
            } else {
                "INVALID_REQUEST"
            },
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text
            },
        ),
    };
    ApiError::new(status, code, message).into_response()
}

async fn unknown_route() -> ApiError {
    ApiError::new(404, "NOT_FOUND", "The requested resource does not exist")
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        405,
        "METHOD_NOT_ALLOWED",
        format!("HTTP Method '{method}' not allowed for this resource"),
    )
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
