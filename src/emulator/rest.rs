//! The emulator's OAuth and sObject REST API (axum), with Salesforce's paths, shapes and error
//! envelopes: `[{"message", "errorCode", "fields"}]` for REST, `{"error", "error_description"}`
//! for OAuth. It owns the logins the emulator accepts ([`Credentials`]), token issue, the
//! version list, describe, and single-record create / retrieve / update / delete.
//!
//! It serves its routes and nothing else: queries and Bulk jobs are [`super::query`]'s, the
//! session check and `Sforce-Limit-Info` are applied around every route by [`super::http`],
//! and what a record may hold is the store's to decide.

use super::store::{ApiError, Org};
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Map, Value as J, json};
use std::collections::HashMap;
use std::sync::Arc;

/// The credentials the emulator accepts. The defaults are public and safe only because the
/// emulator listens locally.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub client_id: String,
    pub client_secret: String,
    pub username: String,
    pub password: String,
    pub refresh_token: String,
    /// PEM public key of the connected app's certificate, to verify JWT bearer assertions.
    pub jwt_public_key_pem: Option<String>,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            client_id: "sfmirror-emulator-client".to_string(),
            client_secret: "sfmirror-emulator-secret".to_string(),
            username: "admin@sfmirror.emulator".to_string(),
            password: "emulator-password".to_string(),
            refresh_token: "sfmirror-emulator-refresh-token".to_string(),
            jwt_public_key_pem: None,
        }
    }
}

/// What the OAuth and sObject routes share.
pub struct RestState {
    pub org: Arc<Org>,
    pub creds: Credentials,
    pub rest_url: String,
    /// Lifetime of issued tokens, if they expire.
    pub token_ttl_ms: Option<i64>,
}

type S = State<Arc<RestState>>;

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// The routes anyone may call: OAuth and the version list.
pub fn open_routes(state: Arc<RestState>) -> Router {
    Router::new()
        .route("/services/oauth2/token", post(token))
        .route("/services/data", get(versions))
        .route("/services/data/", get(versions))
        .with_state(state)
}

/// The routes that need a session: describe, sObject records, userinfo.
pub fn session_routes(state: Arc<RestState>) -> Router {
    Router::new()
        .route("/services/data/{version}/sobjects", get(global_describe))
        .route(
            "/services/data/{version}/sobjects/{object}/describe",
            get(describe),
        )
        .route("/services/data/{version}/sobjects/{object}", post(create))
        .route(
            "/services/data/{version}/sobjects/{object}/{id}",
            get(retrieve).patch(update).delete(delete),
        )
        .route("/services/oauth2/userinfo", get(userinfo))
        .with_state(state)
}

fn check_version(version: &str) -> Result<(), ApiError> {
    let ok = version
        .strip_prefix('v')
        .and_then(|v| v.parse::<f32>().ok())
        .is_some_and(|v| (20.0..=70.0).contains(&v));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            404,
            "NOT_FOUND",
            "The requested resource does not exist",
        ))
    }
}

async fn versions(State(st): S) -> Json<J> {
    let list: Vec<J> = (55..=62)
        .map(|v| {
            json!({"label": format!("API {v}.0"), "url": format!("/services/data/v{v}.0"),
                   "version": format!("{v}.0")})
        })
        .collect();
    let _ = &st;
    Json(J::Array(list))
}

async fn token(State(st): S, Form(form): Form<HashMap<String, String>>) -> Response {
    let f = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let c = &st.creds;
    let granted = match f("grant_type") {
        "client_credentials" => {
            if f("client_id") != c.client_id || f("client_secret") != c.client_secret {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_client",
                    "invalid client credentials",
                );
            }
            true
        }
        "password" => {
            if f("client_id") != c.client_id {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_client_id",
                    "client identifier invalid",
                );
            }
            if f("username") != c.username || f("password") != c.password {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "authentication failure",
                );
            }
            true
        }
        "urn:ietf:params:oauth:grant-type:jwt-bearer" => {
            if let Err(description) = verify_jwt(&st, f("assertion")) {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", &description);
            }
            true
        }
        "refresh_token" => {
            if f("client_id") != c.client_id {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_client_id",
                    "client identifier invalid",
                );
            }
            if f("refresh_token") != c.refresh_token {
                return oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "expired access/refresh token",
                );
            }
            true
        }
        "" => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is required",
            );
        }
        _ => false,
    };
    if !granted {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant type not supported",
        );
    }
    let access_token = st.org.issue_token(st.token_ttl_ms);
    let issued_at = st.org.now_ms().to_string();
    let mut body = json!({
        "access_token": access_token,
        "instance_url": st.rest_url,
        "id": format!("{}/id/{}/{}", st.rest_url, st.org.org_id, st.org.user_id),
        "token_type": "Bearer",
        "issued_at": issued_at,
        "signature": "c2ZtaXJyb3ItZW11bGF0b3I=",
        "scope": "api refresh_token",
    });
    if f("grant_type") == "password" || f("grant_type") == "refresh_token" {
        body["refresh_token"] = J::String(c.refresh_token.clone());
    }
    (StatusCode::OK, Json(body)).into_response()
}

/// Checks a JWT bearer assertion as Salesforce does: RS256 signed by the connected app's
/// certificate key, `iss` = client id, `sub` = the username, `aud` = a login URL, not expired.
fn verify_jwt(st: &RestState, assertion: &str) -> Result<(), String> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode};
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: String,
    }
    let pem = st
        .creds
        .jwt_public_key_pem
        .as_deref()
        .ok_or("no certificate is configured for this connected app (--jwt-public-key)")?;
    let key = DecodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|e| format!("the configured public key is unusable: {e}"))?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_issuer(&[&st.creds.client_id]);
    validation.set_audience(&[
        "https://login.salesforce.com",
        "https://test.salesforce.com",
        st.rest_url.as_str(),
    ]);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    validation.leeway = 0;
    let data = decode::<Claims>(assertion, &key, &validation).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        match e.kind() {
            ErrorKind::ExpiredSignature => "expired authorization code".to_string(),
            ErrorKind::InvalidIssuer => "invalid client_id in the assertion".to_string(),
            ErrorKind::InvalidAudience => "audience is invalid".to_string(),
            ErrorKind::InvalidSignature => "invalid assertion: signature".to_string(),
            other => format!("invalid assertion: {other:?}"),
        }
    })?;
    if data.claims.sub != st.creds.username {
        return Err("user hasn't approved this consumer".to_string());
    }
    Ok(())
}

async fn userinfo(State(st): S) -> Json<J> {
    Json(json!({
        "sub": format!("{}/id/{}/{}", st.rest_url, st.org.org_id, st.org.user_id),
        "user_id": st.org.user_id,
        "organization_id": st.org.org_id,
        "preferred_username": st.org.username,
        "name": "Emulator Admin",
        "active": true,
        "urls": { "rest": format!("{}/services/data/v{{version}}/", st.rest_url) },
    }))
}

async fn global_describe(State(st): S, Path(version): Path<String>) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    let sobjects: Vec<J> = st
        .org
        .object_names()
        .iter()
        .filter_map(|n| st.org.object(n).ok())
        .map(|o| {
            let d = &o.describe;
            json!({
                "name": d.name, "label": d.label, "keyPrefix": d.key_prefix, "custom": d.custom,
                "queryable": true, "retrieveable": true, "createable": true, "updateable": true,
                "deletable": true, "replicateable": true,
                "urls": {
                    "sobject": format!("/services/data/{version}/sobjects/{}", d.name),
                    "describe": format!("/services/data/{version}/sobjects/{}/describe", d.name),
                    "rowTemplate": format!("/services/data/{version}/sobjects/{}/{{ID}}", d.name),
                }
            })
        })
        .collect();
    Ok(Json(
        json!({"encoding": "UTF-8", "maxBatchSize": 200, "sobjects": sobjects}),
    ))
}

async fn describe(
    State(st): S,
    Path((version, object)): Path<(String, String)>,
) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    Ok(Json(st.org.object(&object)?.raw.clone()))
}

/// `changeOrigin` for a REST change: the API and version, plus the client id when the caller
/// sent `Sforce-Call-Options: client=...`.
fn origin(version: &str, headers: &HeaderMap) -> String {
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

fn body_object(body: &J) -> Result<&Map<String, J>, ApiError> {
    body.as_object().ok_or_else(|| {
        ApiError::new(
            400,
            "JSON_PARSER_ERROR",
            "The request body must be a JSON object",
        )
    })
}

async fn create(
    State(st): S,
    Path((version, object)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<J>,
) -> Result<Response, ApiError> {
    check_version(&version)?;
    let id = st
        .org
        .create(&object, body_object(&body)?, &origin(&version, &headers))?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "success": true, "errors": []})),
    )
        .into_response())
}

async fn update(
    State(st): S,
    Path((version, object, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    Json(body): Json<J>,
) -> Result<StatusCode, ApiError> {
    check_version(&version)?;
    st.org.update(
        &object,
        &id,
        body_object(&body)?,
        &origin(&version, &headers),
    )?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete(
    State(st): S,
    Path((version, object, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    check_version(&version)?;
    st.org.delete(&object, &id, &origin(&version, &headers))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn retrieve(
    State(st): S,
    Path((version, object, id)): Path<(String, String, String)>,
) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    let record = st.org.get(&object, &id)?;
    let def = st.org.object(&object)?;
    Ok(Json(rest_record(&version, &def, &record)))
}

/// A record as REST returns it: `attributes`, then every non-compound field (nulls included).
pub fn rest_record(
    version: &str,
    def: &super::store::ObjectDef,
    record: &super::store::Record,
) -> J {
    let mut out = Map::new();
    let id = record.get("Id").and_then(J::as_str).unwrap_or_default();
    out.insert(
        "attributes".into(),
        json!({"type": def.describe.name,
               "url": format!("/services/data/{version}/sobjects/{}/{id}", def.describe.name)}),
    );
    for f in &def.describe.fields {
        if f.kind().is_compound() {
            continue;
        }
        out.insert(
            f.name.clone(),
            record.get(&f.name).cloned().unwrap_or(J::Null),
        );
    }
    J::Object(out)
}
