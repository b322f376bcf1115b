//! Salesforce REST calls sfmirror needs: describe, query paging, sObject Collections.
//!
//! Every call carries the current session's bearer token; a 401 / `INVALID_SESSION_ID` renews
//! the session once and repeats the call. Error envelopes (`[{"errorCode","message"}]`) become
//! [`SourceError::Status`] naming the URL and Salesforce's code. `Sforce-Limit-Info` feeds the
//! API usage gauge.
//!
//! # Read floors
//!
//! Snapshot merges need a time, in Salesforce's clock, that a read certainly happened after
//! (see `replica::snapshot`). A response's `Date` has whole seconds and says when it was
//! *answered*, not when the rows were read: a slow query read them earlier. What is certain is
//! that a request sent after an answer arrived is served after that answer's `Date`. The client
//! keeps the latest `Date` it received, and each read returns the one known when it was sent,
//! so floors need neither a guessed slack nor agreement between Salesforce's clock and ours.

use super::SourceError;
use super::auth::Authenticator;
use crate::model::ObjectDescribe;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Clone)]
pub struct RestClient {
    auth: Arc<Authenticator>,
    http: reqwest::Client,
    api_version: String,
    /// The latest `Date` (epoch ms) of any answer received; `i64::MIN` before the first.
    answered_ms: Arc<AtomicI64>,
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
            answered_ms: Arc::new(AtomicI64::new(i64::MIN)),
        }
    }

    /// A time in Salesforce's clock that anything read by a request sent from now on is read
    /// after: the latest answer's `Date`. `None` before any answer carried one.
    pub fn read_floor_ms(&self) -> Option<i64> {
        let ms = self.answered_ms.load(Ordering::Acquire);
        (ms != i64::MIN).then_some(ms)
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

    /// `/services/data/vXX.X/limits`: each of the org's allocations with its `Max` and
    /// `Remaining`.
    pub async fn limits(&self) -> Result<Limits, SourceError> {
        let path = format!("{}/limits", self.data_path());
        let body: serde_json::Value = self.get_json("limits", &path).await?;
        Limits::from_json(&body).map_err(|message| SourceError::BadResponse {
            api: "limits",
            url: path,
            message,
        })
    }

    /// `/services/data/vXX.X/sobjects`: the API names of the org's objects (describeGlobal).
    pub async fn object_names(&self) -> Result<Vec<String>, SourceError> {
        #[derive(Deserialize)]
        struct Global {
            sobjects: Vec<Named>,
        }
        #[derive(Deserialize)]
        struct Named {
            name: String,
        }
        let path = format!("{}/sobjects", self.data_path());
        let global: Global = self.get_json("describeGlobal", &path).await?;
        Ok(global.sobjects.into_iter().map(|o| o.name).collect())
    }

    /// The API version path prefix, `/services/data/vXX.X`.
    pub fn data_path(&self) -> String {
        format!("/services/data/v{}", self.api_version)
    }

    /// One page of a SOQL query (`query`, or `queryAll` to include deleted records); follow
    /// `next_records_url` with [`RestClient::query_more`].
    pub async fn query_page(&self, soql: &str, all: bool) -> Result<QueryPage, SourceError> {
        let path = format!(
            "{}/{}",
            self.data_path(),
            if all { "queryAll" } else { "query" }
        );
        self.dated_page(&path, &[("q", soql)]).await
    }

    /// The page a `nextRecordsUrl` points at, requested exactly as Salesforce gave it.
    pub async fn query_more(&self, next_records_url: &str) -> Result<QueryPage, SourceError> {
        self.dated_page(next_records_url, &[]).await
    }

    /// The page after `page`, or `None` when it was the last. A page that says it is not
    /// done but gives no `nextRecordsUrl` is a bad answer, not an end.
    pub async fn next_page(&self, page: &QueryPage) -> Result<Option<QueryPage>, SourceError> {
        if page.done {
            return Ok(None);
        }
        match &page.next_records_url {
            Some(next) => self.query_more(next).await.map(Some),
            None => Err(SourceError::BadResponse {
                api: "query",
                url: String::new(),
                message: "a query page is not done but has no nextRecordsUrl".to_string(),
            }),
        }
    }

    async fn dated_page(
        &self,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<QueryPage, SourceError> {
        let floor = self.read_floor_ms();
        let reply = self
            .send("query", reqwest::Method::GET, path, query, None, &[])
            .await?;
        let mut page: QueryPage =
            serde_json::from_slice(&reply.body).map_err(|e| SourceError::BadResponse {
                api: "query",
                url: reply.url,
                message: e.to_string(),
            })?;
        page.read_at_ms = response_date_ms(&reply.headers);
        page.read_floor_ms = floor;
        Ok(page)
    }

    /// sObject Collections retrieve: the records of `ids` (at most 2,000) with `fields`, in
    /// the order of `ids`; `None` where the id does not exist or is deleted. Also returns
    /// the read's floor ([`RestClient::read_floor_ms`] as the request was sent) and when
    /// Salesforce answered (its `Date`).
    pub async fn retrieve(
        &self,
        object: &str,
        ids: &[String],
        fields: &[String],
    ) -> Result<Retrieved, SourceError> {
        let path = format!("{}/composite/sobjects/{object}", self.data_path());
        let body = serde_json::json!({ "ids": ids, "fields": fields });
        let read_floor_ms = self.read_floor_ms();
        let reply = self
            .send(
                "composite",
                reqwest::Method::POST,
                &path,
                &[],
                Some(&body),
                &[],
            )
            .await?;
        let records =
            serde_json::from_slice(&reply.body).map_err(|e| SourceError::BadResponse {
                api: "composite",
                url: path.clone(),
                message: e.to_string(),
            })?;
        Ok(Retrieved {
            records,
            read_floor_ms,
            answered_ms: response_date_ms(&reply.headers),
        })
    }

    /// Sends a JSON request and parses the JSON answer, renewing the session once if refused.
    pub async fn send_json<T: DeserializeOwned>(
        &self,
        api: &'static str,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, SourceError> {
        let reply = self.send(api, method, path, &[], body, &[]).await?;
        serde_json::from_slice(&reply.body).map_err(|e| SourceError::BadResponse {
            api,
            url: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Sends a request to `path` (relative to the instance URL, used as given) with `query`
    /// pairs appended to its query string; returns the 2xx answer.
    pub async fn send(
        &self,
        api: &'static str,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, SourceError> {
        let mut session = self.auth.session().await?;
        let mut renewed = false;
        loop {
            let url = format!("{}{path}", session.instance_url);
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(session.access_token.expose());
            if !query.is_empty() {
                req = req.query(query);
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let req = req.build().map_err(|source| SourceError::Http {
                api,
                url: url.clone(),
                source,
            })?;
            // Errors name the URL as sent, query string included.
            let url = req.url().to_string();
            let resp = self
                .http
                .execute(req)
                .await
                .map_err(|source| SourceError::Http {
                    api,
                    url: url.clone(),
                    source,
                })?;
            let status = resp.status().as_u16();
            crate::telemetry::record_salesforce_request(api, status);
            record_limits(resp.headers());
            if let Some(ms) = response_date_ms(resp.headers()) {
                self.answered_ms.fetch_max(ms, Ordering::AcqRel);
            }
            let resp_headers = resp.headers().clone();
            let bytes = resp.bytes().await.map_err(|source| SourceError::Http {
                api,
                url: url.clone(),
                source,
            })?;
            if (200..300).contains(&status) {
                return Ok(Reply {
                    url,
                    headers: resp_headers,
                    body: bytes,
                });
            }
            let err = status_error(api, &url, status, &bytes);
            if err.needs_reauth() && !renewed {
                renewed = true;
                session = self.auth.renew(Some(&session)).await?;
                continue;
            }
            return Err(err);
        }
    }

    /// GETs `path` (relative to the instance URL) and parses the JSON answer.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        api: &'static str,
        path: &str,
    ) -> Result<T, SourceError> {
        self.send_json(api, reqwest::Method::GET, path, None).await
    }
}

/// A 2xx answer from Salesforce.
pub struct Reply {
    /// The URL as sent, query string included.
    pub url: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

/// One allocation of `/limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max: u64,
    pub remaining: u64,
}

impl Limit {
    /// How much of it is used.
    pub fn used(&self) -> u64 {
        self.max.saturating_sub(self.remaining)
    }
}

/// The org's allocations by name (`DailyApiRequests`, `DailyDeliveredPlatformEvents`, ...).
#[derive(Debug, Clone, Default)]
pub struct Limits(pub std::collections::BTreeMap<String, Limit>);

impl Limits {
    /// Reads every top-level `{"Max": n, "Remaining": n}` entry; others are skipped (the
    /// answer has nested per-app entries too). An answer that is not an object is refused.
    pub fn from_json(body: &serde_json::Value) -> Result<Limits, String> {
        let map = body
            .as_object()
            .ok_or_else(|| format!("expected a JSON object, got {body}"))?;
        let mut limits = std::collections::BTreeMap::new();
        for (name, v) in map {
            let number = |key: &str| v.get(key).and_then(serde_json::Value::as_u64);
            if let (Some(max), Some(remaining)) = (number("Max"), number("Remaining")) {
                limits.insert(name.clone(), Limit { max, remaining });
            }
        }
        Ok(Limits(limits))
    }

    pub fn get(&self, name: &str) -> Option<Limit> {
        self.0.get(name).copied()
    }
}

/// What an sObject Collections retrieve returned.
#[derive(Debug)]
pub struct Retrieved {
    /// One per requested id, in order; `None` where it does not exist or is deleted.
    pub records: Vec<Option<serde_json::Value>>,
    /// A time the read certainly happened after, if known (see the module doc).
    pub read_floor_ms: Option<i64>,
    /// When Salesforce answered (its `Date`, whole seconds), if it said.
    pub answered_ms: Option<i64>,
}

/// One page of a query answer.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryPage {
    pub total_size: i64,
    pub done: bool,
    #[serde(default)]
    pub next_records_url: Option<String>,
    #[serde(default)]
    pub records: Vec<serde_json::Value>,
    /// When Salesforce answered (its `Date` header, whole seconds), if it said.
    #[serde(skip)]
    pub read_at_ms: Option<i64>,
    /// A time the page's rows were certainly read after, if known (see the module doc).
    #[serde(skip)]
    pub read_floor_ms: Option<i64>,
}

/// Epoch ms of a response's `Date` header (Salesforce's clock, whole seconds).
pub fn response_date_ms(headers: &reqwest::header::HeaderMap) -> Option<i64> {
    let v = headers.get(reqwest::header::DATE)?.to_str().ok()?;
    chrono::DateTime::parse_from_rfc2822(v)
        .ok()
        .map(|d| d.timestamp_millis())
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
    fn limits_answer() {
        let body = serde_json::json!({
            "DailyApiRequests": {"Max": 15000, "Remaining": 14000, "Ant Migration Tool": {"Max": 0, "Remaining": 0}},
            "DailyDeliveredPlatformEvents": {"Max": 10000, "Remaining": 2500},
            "Odd": {"Max": "x"},
        });
        let l = Limits::from_json(&body).expect("parses");
        assert_eq!(l.get("DailyApiRequests").map(|x| x.used()), Some(1000));
        assert_eq!(
            l.get("DailyDeliveredPlatformEvents").map(|x| x.used()),
            Some(7500)
        );
        assert!(l.get("Odd").is_none());
        assert!(Limits::from_json(&serde_json::json!([1])).is_err());
    }

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
