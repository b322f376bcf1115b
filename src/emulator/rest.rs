//! The emulator's OAuth and sObject REST API (axum), with Salesforce's paths, shapes and error
//! envelopes: `[{"message", "errorCode", "fields"}]` for REST, `{"error", "error_description"}`
//! for OAuth. It owns the logins the emulator accepts ([`Credentials`]), token issue, revoke
//! and introspection, the identity URL, the version list and index, describe and basic
//! information, records by id (15 or 18 characters) and by external id (get, upsert,
//! delete), and getUpdated / getDeleted.
//!
//! It serves its routes and nothing else: queries and Bulk jobs are [`super::query`]'s, the
//! session check and `Sforce-Limit-Info` are applied around every route by [`super::http`],
//! and what a record may hold is the store's to decide.

use super::soql;
use super::store::{ApiError, ObjectDef, Org, Record};
use crate::model::id::id18;
use crate::model::time::{datetime_ms, format_datetime};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
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

async fn create(
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

async fn update(
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

async fn delete(
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

async fn retrieve(
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

async fn get_by_external_id(
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

async fn delete_by_external_id(
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
async fn upsert(
    State(st): S,
    Path((version, object, field, value)): Path<(String, String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let v = super::query::api_version(&version)?;
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
async fn updated(
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
async fn deleted(
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
