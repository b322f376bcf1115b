//! Salesforce REST calls sfmirror needs (describe, and later query and sObject Collections).
//!
//! Every call carries the current session's bearer token; a 401 / `INVALID_SESSION_ID` renews
//! the session once and repeats the call. Error envelopes (`[{"errorCode","message"}]`) become
//! [`SourceError::Status`] naming the URL and Salesforce's code. `Sforce-Limit-Info` feeds the
//! API usage gauge.

use super::SourceError;
use super::auth::Authenticator;
use crate::model::ObjectDescribe;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;

#[derive(Clone)]
pub struct RestClient {
    auth: Arc<Authenticator>,
    http: reqwest::Client,
    api_version: String,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default, rename = "errorCode")]
    error_code: String,
    #[serde(default)]
    message: String,
}

impl RestClient {
    pub fn new(auth: Arc<Authenticator>, http: reqwest::Client, api_version: &str) -> RestClient {
        RestClient {
            auth,
            http,
            api_version: api_version.to_string(),
        }
    }

    pub fn auth(&self) -> &Arc<Authenticator> {
        &self.auth
    }

    /// `/services/data/vXX.X/sobjects/{object}/describe`.
    pub async fn describe(&self, object: &str) -> Result<ObjectDescribe, SourceError> {
        let path = format!(
            "/services/data/v{}/sobjects/{object}/describe",
            self.api_version
        );
        self.get_json("describe", &path).await
    }

    /// GETs `path` (relative to the instance URL) and parses the JSON answer.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        api: &'static str,
        path: &str,
    ) -> Result<T, SourceError> {
        let mut session = self.auth.session().await?;
        let mut renewed = false;
        loop {
            let url = format!("{}{path}", session.instance_url);
            let resp = self
                .http
                .get(&url)
                .bearer_auth(session.access_token.expose())
                .send()
                .await
                .map_err(|source| SourceError::Http {
                    api,
                    url: url.clone(),
                    source,
                })?;
            let status = resp.status().as_u16();
            crate::telemetry::record_salesforce_request(api, status);
            record_limits(resp.headers());
            let body = resp.bytes().await.map_err(|source| SourceError::Http {
                api,
                url: url.clone(),
                source,
            })?;
            if (200..300).contains(&status) {
                return serde_json::from_slice(&body).map_err(|e| SourceError::BadResponse {
                    api,
                    url,
                    message: e.to_string(),
                });
            }
            let err = status_error(api, &url, status, &body);
            if err.needs_reauth() && !renewed {
                renewed = true;
                session = self.auth.renew(Some(&session)).await?;
                continue;
            }
            return Err(err);
        }
    }
}

/// Builds the error for a non-2xx answer from Salesforce's error envelope.
pub fn status_error(api: &'static str, url: &str, status: u16, body: &[u8]) -> SourceError {
    let (code, message) = match serde_json::from_slice::<Vec<ErrorItem>>(body) {
        Ok(items) if !items.is_empty() => (items[0].error_code.clone(), items[0].message.clone()),
        _ => (
            String::new(),
            String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned(),
        ),
    };
    SourceError::Status {
        api,
        url: url.to_string(),
        status,
        code,
        message,
    }
}

fn record_limits(headers: &reqwest::header::HeaderMap) {
    let Some(v) = headers
        .get("sforce-limit-info")
        .and_then(|v| v.to_str().ok())
    else {
        return;
    };
    if let Some((used, max)) = parse_limit_info(v) {
        crate::telemetry::record_api_usage(used, max);
    }
}

/// Parses `api-usage=25/15000` out of a `Sforce-Limit-Info` value.
pub fn parse_limit_info(value: &str) -> Option<(u64, u64)> {
    value.split(',').find_map(|part| {
        let usage = part.trim().strip_prefix("api-usage=")?;
        let (used, max) = usage.split_once('/')?;
        Some((used.trim().parse().ok()?, max.trim().parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_info() {
        assert_eq!(parse_limit_info("api-usage=25/15000"), Some((25, 15000)));
        assert_eq!(
            parse_limit_info("per-app-api-usage=1/2(appName=x), api-usage=3/4"),
            Some((3, 4))
        );
        assert_eq!(parse_limit_info("nonsense"), None);
    }

    #[test]
    fn error_envelope() {
        let e = status_error(
            "describe",
            "http://x/y",
            401,
            br#"[{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]"#,
        );
        assert!(e.needs_reauth());
        assert!(e.to_string().contains("INVALID_SESSION_ID"), "{e}");
        let e = status_error("describe", "http://x/y", 404, b"not json");
        assert!(!e.is_transient());
        assert!(e.to_string().contains("not json"));
    }
}
