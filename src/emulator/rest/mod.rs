//! The emulator's OAuth and sObject REST API (axum), with Salesforce's paths, shapes and error
//! envelopes: `[{"message", "errorCode", "fields"}]` for REST, `{"error", "error_description"}`
//! for OAuth. It owns the logins the emulator accepts ([`Credentials`]), token issue, revoke
//! and introspection, the identity URL, the version list and index, describe and basic
//! information, records by id (15 or 18 characters) and by external id (get, upsert,
//! delete), and getUpdated / getDeleted.
//!
//! Records themselves (CRUD by id and external id, getUpdated / getDeleted) are in `records`.
//!
//! It serves its routes and nothing else: queries and Bulk jobs are [`super::query`]'s, the
//! session check and `Sforce-Limit-Info` are applied around every route by [`super::http`],
//! and what a record may hold is the store's to decide.

mod records;

use super::store::{ApiError, ObjectDef, Org};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use records::{
    create, delete, delete_by_external_id, deleted, get_by_external_id, retrieve, update, updated,
    upsert,
};
use serde_json::{Map, Value as J, json};
use std::collections::HashMap;
use std::sync::Arc;

pub use records::{Ordered, json_body, normalize_id, origin, path_id, rest_record};

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
        .route("/services/oauth2/revoke", post(revoke).get(revoke))
        .route("/services/oauth2/introspect", post(introspect))
        .route("/services/data", get(versions))
        .with_state(state)
}

/// The routes that need a session: discovery, describe, sObject records, identity.
pub fn session_routes(state: Arc<RestState>) -> Router {
    Router::new()
        .route("/services/data/{version}", get(resources))
        .route("/services/data/{version}/sobjects", get(global_describe))
        .route(
            "/services/data/{version}/sobjects/{object}/describe",
            get(describe),
        )
        .route(
            "/services/data/{version}/sobjects/{object}/updated",
            get(updated),
        )
        .route(
            "/services/data/{version}/sobjects/{object}/deleted",
            get(deleted),
        )
        .route(
            "/services/data/{version}/sobjects/{object}",
            get(basic_info).post(create),
        )
        .route(
            "/services/data/{version}/sobjects/{object}/{id}",
            get(retrieve).patch(update).delete(delete),
        )
        .route(
            "/services/data/{version}/sobjects/{object}/{field}/{value}",
            get(get_by_external_id)
                .patch(upsert)
                .delete(delete_by_external_id),
        )
        .route("/services/oauth2/userinfo", get(userinfo))
        .route("/id/{org}/{user}", get(identity))
        .with_state(state)
}

fn check_version(version: &str) -> Result<(), ApiError> {
    super::query::api_version(version).map(|_| ())
}

/// Every version served, oldest first, as `GET /services/data` lists them.
async fn versions() -> Json<J> {
    use super::query::{NEWEST_VERSION, OLDEST_VERSION};
    let list: Vec<J> = (OLDEST_VERSION..=NEWEST_VERSION)
        .map(|v| {
            json!({"label": release_name(v), "url": format!("/services/data/v{v}.0"),
                   "version": format!("{v}.0")})
        })
        .collect();
    Json(J::Array(list))
}

/// The release a version came with: three a year, Spring / Summer / Winter, 31.0 being
/// Summer '14; the Winter release carries the next year.
fn release_name(version: u32) -> String {
    let n = version.saturating_sub(30); // 1 = Summer '14
    let season = ["Spring", "Summer", "Winter"][(n % 3) as usize];
    let year = 14 + (n + 1) / 3;
    format!("{season} '{year:02}")
}

/// The items of a comma-separated query parameter (`?ids=a,b`), trimmed, empty ones dropped;
/// none when the parameter is absent.
pub fn comma_list(params: &HashMap<String, String>, key: &str) -> Vec<String> {
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
}

/// Form fields of a request: the query string's, then the body's (the body wins), as
/// Salesforce's token endpoint takes parameters in either.
fn form_params(query: Option<&str>, body: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for text in [query.unwrap_or_default(), &String::from_utf8_lossy(body)] {
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.insert(url_decode(k), url_decode(v));
        }
    }
    out
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The identity URL of the org's user: the token response's `id`, served by [`identity`].
fn identity_url(st: &RestState) -> String {
    format!("{}/id/{}/{}", st.rest_url, st.org.org_id, st.org.user_id)
}

async fn token(State(st): S, uri: Uri, body: Bytes) -> Response {
    let form = form_params(uri.query(), &body);
    let f = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let c = &st.creds;
    let bad_client = || {
        oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_client",
            "invalid client credentials",
        )
    };
    // A secret that is sent must be the connected app's, whatever the flow (an empty one is
    // no secret: the password and refresh flows may go without).
    if !f("client_secret").is_empty() && f("client_secret") != c.client_secret {
        return bad_client();
    }
    let granted = match f("grant_type") {
        "client_credentials" => {
            if f("client_id") != c.client_id || f("client_secret") != c.client_secret {
                return bad_client();
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
        "id": identity_url(&st),
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

/// `POST /services/oauth2/revoke` with `token=`: an access token stops working; revoking the
/// refresh token (which the emulator cannot retire: it is configured) is accepted. An
/// unknown token is `unsupported_token_type`, as Salesforce answers it.
async fn revoke(State(st): S, uri: Uri, body: Bytes) -> Response {
    let form = form_params(uri.query(), &body);
    let token = form.get("token").map(String::as_str).unwrap_or_default();
    if token.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the token parameter is required",
        );
    }
    if token == st.creds.refresh_token || st.org.revoke_token(token) {
        return StatusCode::OK.into_response();
    }
    oauth_error(
        StatusCode::BAD_REQUEST,
        "unsupported_token_type",
        "this token type is not supported",
    )
}

/// `POST /services/oauth2/introspect` (RFC 7662): the connected app's credentials, then
/// `token=`; `{"active": false}` for a token that is not (or no longer) valid.
async fn introspect(State(st): S, uri: Uri, body: Bytes) -> Response {
    let form = form_params(uri.query(), &body);
    let f = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    if f("client_id") != st.creds.client_id || f("client_secret") != st.creds.client_secret {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "invalid client credentials",
        );
    }
    let token = f("token");
    let (active, kind) = if token == st.creds.refresh_token {
        (true, "refresh_token")
    } else {
        (st.org.token_valid(token), "access_token")
    };
    if !active {
        return Json(json!({"active": false})).into_response();
    }
    let now_s = st.org.now_ms() / 1000;
    Json(json!({
        "active": true,
        "scope": "api refresh_token",
        "client_id": st.creds.client_id,
        "username": st.creds.username,
        "sub": identity_url(&st),
        "token_type": kind,
        "iat": now_s,
        "nbf": now_s,
        "exp": now_s + st.token_ttl_ms.map_or(7200, |ms| ms / 1000),
    }))
    .into_response()
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
        "sub": identity_url(&st),
        "user_id": st.org.user_id,
        "organization_id": st.org.org_id,
        "preferred_username": st.org.username,
        "name": "Emulator Admin",
        "active": true,
        "urls": { "rest": format!("{}/services/data/v{{version}}/", st.rest_url) },
    }))
}

/// `GET /id/{org}/{user}`: the identity the token response's `id` points to.
async fn identity(
    State(st): S,
    Path((org, user)): Path<(String, String)>,
) -> Result<Json<J>, ApiError> {
    if normalize_id(&org).as_deref() != Some(st.org.org_id.as_str())
        || normalize_id(&user).as_deref() != Some(st.org.user_id.as_str())
    {
        return Err(not_found());
    }
    let urls: Map<String, J> = [
        ("enterprise", "/services/Soap/c/{version}/"),
        ("partner", "/services/Soap/u/{version}/"),
        ("rest", "/services/data/v{version}/"),
        ("sobjects", "/services/data/v{version}/sobjects/"),
        ("query", "/services/data/v{version}/query/"),
        ("limits", "/services/data/v{version}/limits/"),
        ("profile", "/services/data/v{version}/sobjects/User/"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), J::String(format!("{}{v}", st.rest_url))))
    .collect();
    let mut urls = urls;
    urls.insert("profile".into(), J::String(identity_url(&st)));
    Ok(Json(json!({
        "id": identity_url(&st),
        "asserted_user": true,
        "user_id": st.org.user_id,
        "organization_id": st.org.org_id,
        "username": st.org.username,
        "nick_name": "emulator-admin",
        "display_name": "Emulator Admin",
        "email": st.org.username,
        "active": true,
        "user_type": "STANDARD",
        "language": "en_US",
        "locale": "en_US",
        "utcOffset": 0,
        "is_app_installed": true,
        "urls": urls,
    })))
}

fn not_found() -> ApiError {
    ApiError::new(404, "NOT_FOUND", "The requested resource does not exist")
}

/// `GET /services/data/vXX.X`: the resources of a version, by name.
async fn resources(Path(version): Path<String>) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    let names = [
        ("sobjects", "sobjects"),
        ("query", "query"),
        ("queryAll", "queryAll"),
        ("composite", "composite"),
        ("limits", "limits"),
        ("jobs", "jobs"),
    ];
    let index: Map<String, J> = names
        .iter()
        .map(|(k, path)| {
            (
                k.to_string(),
                J::String(format!("/services/data/{version}/{path}")),
            )
        })
        .collect();
    Ok(Json(J::Object(index)))
}

/// An object's entry in the global describe: its name, labels and what may be done with it.
fn object_summary(version: &str, def: &ObjectDef) -> J {
    let d = &def.describe;
    let raw = |k: &str| def.raw.get(k).cloned().unwrap_or(J::Null);
    json!({
        "name": d.name, "label": d.label, "labelPlural": raw("labelPlural"),
        "keyPrefix": d.key_prefix, "custom": d.custom,
        "queryable": true, "retrieveable": true, "createable": true, "updateable": true,
        "deletable": true, "replicateable": true, "searchable": true, "undeletable": true,
        "urls": {
            "sobject": format!("/services/data/{version}/sobjects/{}", d.name),
            "describe": format!("/services/data/{version}/sobjects/{}/describe", d.name),
            "rowTemplate": format!("/services/data/{version}/sobjects/{}/{{ID}}", d.name),
        }
    })
}

async fn global_describe(State(st): S, Path(version): Path<String>) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    let sobjects: Vec<J> = st
        .org
        .object_names()
        .iter()
        .filter_map(|n| st.org.object(n).ok())
        .map(|o| object_summary(&version, &o))
        .collect();
    Ok(Json(
        json!({"encoding": "UTF-8", "maxBatchSize": 200, "sobjects": sobjects}),
    ))
}

/// An object by API name, ignoring case as Salesforce does.
fn object_def(org: &Org, name: &str) -> Result<Arc<ObjectDef>, ApiError> {
    org.object(name).or_else(|e| {
        org.object_names()
            .into_iter()
            .find(|n| n.eq_ignore_ascii_case(name))
            .and_then(|n| org.object(&n).ok())
            .ok_or(e)
    })
}

async fn describe(
    State(st): S,
    Path((version, object)): Path<(String, String)>,
) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    Ok(Json(object_def(&st.org, &object)?.raw.clone()))
}

/// `GET /sobjects/{Object}`: the object's summary and the records recently viewed (none: the
/// emulator's user views nothing).
async fn basic_info(
    State(st): S,
    Path((version, object)): Path<(String, String)>,
) -> Result<Json<J>, ApiError> {
    check_version(&version)?;
    let def = object_def(&st.org, &object)?;
    Ok(Json(json!({
        "objectDescribe": object_summary(&version, &def),
        "recentItems": [],
    })))
}
