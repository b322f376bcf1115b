//! The source side: everything that talks to Salesforce.
//!
//! # Modules
//!
//! - [`client`]: one set of clients built from config (HTTP, auth, REST, Bulk, Pub/Sub).
//! - [`auth`]: OAuth flows and the current session (token, instance URL, org id).
//! - [`rest`]: REST calls (describe, query, sObject Collections), with re-authentication on
//!   `INVALID_SESSION_ID`.
//! - [`bulk`]: Bulk API 2.0 query jobs and their CSV results.
//! - [`pubsub`]: the Pub/Sub API client: `Subscribe` with flow control, `GetSchema`.
//! - [`event`] and [`avro`]: writer-schema decoding of change events and their bitmaps.
//! - [`soql`]: SOQL literals and the query shapes sfmirror sends.
//!
//! This module produces [`crate::model`] values and never touches Postgres.

pub mod auth;
pub mod avro;
pub mod bulk;
pub mod client;
pub mod event;
pub mod pubsub;
pub mod rest;
pub mod soql;

pub use client::Salesforce;

/// Errors of the source side, each either transient (retry with backoff) or definite (stop
/// that channel or object and tell the operator).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{api} request to {url} failed: {source}")]
    Http {
        api: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{api} request to {url} answered HTTP {status} {code}: {message}")]
    Status {
        api: &'static str,
        url: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{api} answer from {url} is not understood: {message}")]
    BadResponse {
        api: &'static str,
        url: String,
        message: String,
    },
    #[error("authentication failed: {message}")]
    Auth { message: String, transient: bool },
    #[error("Pub/Sub {call} on {topic} failed: {code:?} {error_code}: {message}")]
    Grpc {
        call: &'static str,
        topic: String,
        code: tonic::Code,
        error_code: String,
        message: String,
    },
    #[error("Pub/Sub endpoint {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error(transparent)]
    Event(#[from] event::EventError),
}

impl SourceError {
    /// Whether a retry with backoff can succeed without operator action. A refused session
    /// is: the retry logs in again first ([`Self::needs_reauth`]); if that login fails, its
    /// own error says whether to go on.
    pub fn is_transient(&self) -> bool {
        if self.needs_reauth() {
            return true;
        }
        match self {
            SourceError::Http { .. } | SourceError::Connect { .. } => true,
            SourceError::Status { status, code, .. } => {
                *status >= 500
                    || *status == 429
                    || code == "INVALID_SESSION_ID"
                    || code == "REQUEST_LIMIT_EXCEEDED"
            }
            SourceError::BadResponse { .. } | SourceError::Event(_) => false,
            SourceError::Auth { transient, .. } => *transient,
            SourceError::Grpc {
                code, error_code, ..
            } => {
                if error_code.ends_with("topic.not.found")
                    || error_code.ends_with("subscription.limit.exceeded")
                    || error_code.ends_with("permission")
                    || error_code.ends_with("cannot.subscribe")
                    || error_code.ends_with("tenant.license")
                {
                    return false;
                }
                matches!(
                    code,
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Internal
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::ResourceExhausted
                        | tonic::Code::Aborted
                        | tonic::Code::Cancelled
                        | tonic::Code::Unauthenticated
                )
            }
        }
    }

    /// Whether the session should be refreshed before the retry.
    pub fn needs_reauth(&self) -> bool {
        match self {
            SourceError::Status { status, code, .. } => {
                *status == 401 || code == "INVALID_SESSION_ID"
            }
            SourceError::Grpc {
                code, error_code, ..
            } => *code == tonic::Code::Unauthenticated || error_code.ends_with("auth.error"),
            _ => false,
        }
    }

    /// Salesforce refused to deliver more events: the org's event delivery allocation (shared
    /// by every subscriber, counted over a rolling 24 hours) is spent.
    pub fn is_delivery_limit(&self) -> bool {
        matches!(self, SourceError::Grpc { error_code, .. }
            if error_code.ends_with("subscription.limit.exceeded"))
    }

    /// The stored replay id was refused (expired past retention or unknown).
    pub fn is_replay_rejected(&self) -> bool {
        matches!(self, SourceError::Grpc { error_code, .. }
            if error_code.ends_with("replayid.corrupted")
                || error_code.ends_with("replayid.validation.failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::SourceError;

    fn grpc(code: tonic::Code, error_code: &str) -> SourceError {
        SourceError::Grpc {
            call: "Subscribe",
            topic: "/data/AccountChangeEvent".to_string(),
            code,
            error_code: error_code.to_string(),
            message: String::new(),
        }
    }

    #[test]
    fn an_auth_error_is_retried_after_a_login_whatever_its_status_code() {
        // Which gRPC code Salesforce pairs with `auth.error` is not pinned down.
        for code in [
            tonic::Code::Unauthenticated,
            tonic::Code::PermissionDenied,
            tonic::Code::InvalidArgument,
            tonic::Code::FailedPrecondition,
        ] {
            let e = grpc(code, "sfdc.platform.eventbus.grpc.service.auth.error");
            assert!(e.needs_reauth(), "{code:?}");
            assert!(e.is_transient(), "{code:?}");
        }
        let e = SourceError::Status {
            api: "describe",
            url: "https://x/y".to_string(),
            status: 401,
            code: "SOMETHING_ELSE".to_string(),
            message: String::new(),
        };
        assert!(e.needs_reauth() && e.is_transient());
    }

    #[test]
    fn definite_errors_stay_definite() {
        for error_code in [
            "sfdc.platform.eventbus.grpc.subscription.topic.not.found",
            "sfdc.platform.eventbus.grpc.subscription.permission",
        ] {
            let e = grpc(tonic::Code::PermissionDenied, error_code);
            assert!(!e.is_transient(), "{error_code}");
        }
        let e = SourceError::Auth {
            message: "the configured access_token was refused".to_string(),
            transient: false,
        };
        assert!(!e.is_transient());
    }
}
