//! One set of Salesforce clients built from `[salesforce]`: the HTTP client (rustls, system
//! roots plus `ca_file`), the authenticator every call shares, REST, Bulk API 2.0 and the
//! Pub/Sub channel. Every command that talks to the org builds it here, so they all trust the
//! same certificates, send the same user agent and share one login.
//!
//! Building makes no network call; [`Salesforce::login`] is the first one, so that a command
//! can fail early with one clear message when the credentials are refused.

use super::SourceError;
use super::auth::{Authenticator, Session};
use super::bulk::BulkClient;
use super::pubsub::PubSub;
use super::rest::RestClient;
use crate::config::SalesforceConfig;
use std::sync::Arc;
use std::time::Duration;

/// The org's clients, sharing one HTTP client and one session.
#[derive(Clone)]
pub struct Salesforce {
    pub auth: Arc<Authenticator>,
    pub rest: RestClient,
    pub bulk: BulkClient,
    cfg: SalesforceConfig,
}

impl Salesforce {
    /// Builds the clients for `cfg` (no network call yet).
    pub fn new(cfg: &SalesforceConfig) -> Result<Salesforce, SourceError> {
        let http = http_client(cfg)?;
        let auth = Arc::new(Authenticator::new(cfg.clone(), http.clone()));
        let rest = RestClient::new(auth.clone(), http, &cfg.api_version);
        Ok(Salesforce {
            bulk: BulkClient::new(rest.clone()),
            auth,
            rest,
            cfg: cfg.clone(),
        })
    }

    /// Logs in (or returns the current session).
    pub async fn login(&self) -> Result<Arc<Session>, SourceError> {
        self.auth.session().await
    }

    /// A Pub/Sub client on the same session (the channel connects lazily).
    pub fn pubsub(&self) -> Result<PubSub, SourceError> {
        PubSub::connect(&self.cfg, self.auth.clone())
    }

    /// Polls Bulk jobs from `min` doubling up to `max` instead of the defaults.
    pub fn with_bulk_polling(mut self, min: Duration, max: Duration) -> Salesforce {
        self.bulk = self.bulk.with_polling(min, max);
        self
    }
}

/// An HTTP client for Salesforce REST and OAuth: rustls, system roots plus `ca_file`.
pub fn http_client(cfg: &SalesforceConfig) -> Result<reqwest::Client, SourceError> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(cfg.request_timeout_secs))
        .connect_timeout(Duration::from_secs(20))
        .user_agent(concat!("sfmirror/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &cfg.ca_file {
        let pem = std::fs::read(ca).map_err(|e| SourceError::Connect {
            endpoint: cfg.login_url.clone(),
            message: format!("cannot read ca_file {}: {e}", ca.display()),
        })?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| SourceError::Connect {
            endpoint: cfg.login_url.clone(),
            message: format!("ca_file {} is not a PEM certificate: {e}", ca.display()),
        })?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| SourceError::Connect {
        endpoint: cfg.login_url.clone(),
        message: format!("HTTP client: {e}"),
    })
}
