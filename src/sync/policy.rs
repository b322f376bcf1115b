//! The error policy: what the code that met an error does next, decided in one place from
//! the error alone.
//!
//! Errors are classified where they are made (transient or definite, see each module's
//! error type); this module turns that classification into an action, so that a channel,
//! the repair worker and the one-shot commands agree on it:
//!
//! | error | channel | repair |
//! |---|---|---|
//! | stored replay id refused (expired, corrupt) | resume at LATEST with repairs | — |
//! | event delivery allocation spent (`subscription.limit.exceeded`) | wait long (`sync.delivery_limit_retry_secs`), then resubscribe as usual | — |
//! | another instance took the channel over (fenced) | step down: hand the channel over | — |
//! | session refused (expired token, `INVALID_SESSION_ID`, gRPC auth error) | log in again, then retry | retry later |
//! | other transient (network, 5xx, `UNAVAILABLE`, connection loss, deadlock) | retry after backoff | retry later |
//! | definite, and about the object or record (no such object or field, no access to it, a value that does not fit its column) | stop the channel | park |
//! | other definite (credentials refused, a failed Bulk job, an answer not understood) | stop the channel | retry later |
//!
//! A repair is parked only when retrying it cannot help until someone changes the org, the
//! replica or the configuration: what failed is the object or record itself. Anything else
//! (a login refused while credentials are being fixed, a query cursor that expired, a Bulk job
//! that failed inside Salesforce) is tried again on the repair backoff, which reaches an hour.
//!
//! Keeping it a pure function of the error is what lets the table above be tested case by
//! case, without a stream or a database.

use super::SyncError;

/// What a channel does after an error ended its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelAction {
    /// The stored position was refused: leave a marker so the next stream starts at LATEST
    /// with entity repairs covering the jump, and resubscribe at once.
    ResumeAtLatest,
    /// The session was refused: renew it, then resubscribe after the backoff.
    LogInAgain,
    /// Resubscribe from the committed checkpoint after the backoff.
    Retry,
    /// Stop this channel and tell the operator; the others go on.
    Stop,
    /// Another instance owns the channel now: end the task without error, unsubscribed.
    StepDown,
    /// The org's event delivery allocation is spent: stop subscribing for a long while (the
    /// allocation is counted over a rolling 24 hours), then resubscribe from the checkpoint.
    WaitForAllocation,
}

/// The channel's action for `e`.
pub fn channel(e: &SyncError) -> ChannelAction {
    if let SyncError::Replica(crate::replica::ReplicaError::Fenced { .. }) = e {
        return ChannelAction::StepDown;
    }
    if let SyncError::Source(s) = e {
        if s.is_replay_rejected() {
            return ChannelAction::ResumeAtLatest;
        }
        if s.is_delivery_limit() {
            return ChannelAction::WaitForAllocation;
        }
        if s.needs_reauth() {
            return ChannelAction::LogInAgain;
        }
    }
    if e.is_transient() {
        ChannelAction::Retry
    } else {
        ChannelAction::Stop
    }
}

/// What the repair worker does with a repair whose attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairAction {
    /// Put it back, due after the backoff of its attempt count.
    RetryLater,
    /// Keep it with its error and stop trying until the operator requeues it or the
    /// configuration changes: trying again cannot succeed.
    Park,
}

/// The repair worker's action for `e`.
pub fn repair(e: &SyncError) -> RepairAction {
    if !e.is_transient() && about_the_object(e) {
        RepairAction::Park
    } else {
        RepairAction::RetryLater
    }
}

/// Salesforce's codes for a request about an object or field that this user cannot read or
/// that does not exist.
const OBJECT_CODES: &[&str] = &[
    "NOT_FOUND",
    "INVALID_TYPE",
    "INVALID_FIELD",
    "INVALID_FIELD_FOR_INSERT_UPDATE",
    "INSUFFICIENT_ACCESS",
    "INSUFFICIENT_ACCESS_OR_READONLY",
    "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY",
    "ENTITY_IS_DELETED",
    "INVALID_ID_FIELD",
    "MALFORMED_ID",
];

/// Whether a definite error is about what the repair reads or writes (so retrying cannot
/// help), not about the session, the transport or Salesforce's side of a job.
fn about_the_object(e: &SyncError) -> bool {
    use crate::replica::ReplicaError;
    use crate::salesforce::SourceError;
    use crate::sync::reader::ReadError;
    let source = |s: &SourceError| {
        matches!(s, SourceError::Status { status, code, .. }
            if (400..500).contains(status) && OBJECT_CODES.contains(&code.as_str()))
    };
    let replica =
        |r: &ReplicaError| matches!(r, ReplicaError::Schema { .. } | ReplicaError::Data { .. });
    match e {
        SyncError::Source(s) => source(s),
        SyncError::Replica(r) => replica(r),
        SyncError::Read(ReadError::Source(s)) => source(s),
        SyncError::Read(ReadError::Replica(r)) => replica(r),
        SyncError::Read(ReadError::MissingColumns { .. }) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::ReplicaError;
    use crate::salesforce::SourceError;

    fn grpc(code: tonic::Code, error_code: &str) -> SyncError {
        SyncError::Source(SourceError::Grpc {
            call: "Subscribe",
            topic: "/data/AccountChangeEvent".to_string(),
            code,
            error_code: error_code.to_string(),
            message: String::new(),
        })
    }

    fn status(status: u16, code: &str) -> SyncError {
        SyncError::Source(SourceError::Status {
            api: "describe",
            url: "https://x/y".to_string(),
            status,
            code: code.to_string(),
            message: String::new(),
        })
    }

    #[test]
    fn a_refused_replay_id_resumes_at_latest() {
        for code in [
            "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted",
            "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.validation.failed",
        ] {
            let e = grpc(tonic::Code::InvalidArgument, code);
            assert_eq!(channel(&e), ChannelAction::ResumeAtLatest, "{code}");
        }
    }

    #[test]
    fn a_spent_delivery_allocation_waits_then_resubscribes() {
        for code in [
            tonic::Code::ResourceExhausted,
            tonic::Code::PermissionDenied,
        ] {
            let e = grpc(
                code,
                "sfdc.platform.eventbus.grpc.subscription.limit.exceeded",
            );
            assert_eq!(channel(&e), ChannelAction::WaitForAllocation);
            assert_eq!(e.reason(), "delivery_limit");
            assert!(!e.is_transient(), "not retried on the short backoff");
        }
    }

    #[test]
    fn a_refused_session_logs_in_again() {
        let e = grpc(
            tonic::Code::Unauthenticated,
            "sfdc.platform.eventbus.grpc.service.auth.error",
        );
        assert_eq!(channel(&e), ChannelAction::LogInAgain);
        assert_eq!(
            channel(&status(401, "INVALID_SESSION_ID")),
            ChannelAction::LogInAgain
        );
        assert_eq!(
            repair(&status(401, "INVALID_SESSION_ID")),
            RepairAction::RetryLater
        );
    }

    #[test]
    fn transient_errors_retry() {
        for e in [
            grpc(
                tonic::Code::Unavailable,
                "sfdc.platform.eventbus.grpc.service.unavailable",
            ),
            status(503, "SERVER_UNAVAILABLE"),
            status(403, "REQUEST_LIMIT_EXCEEDED"),
            SyncError::StreamEnded,
            SyncError::StaleStream(std::time::Duration::from_secs(300)),
        ] {
            assert_eq!(channel(&e), ChannelAction::Retry, "{e}");
            assert_eq!(repair(&e), RepairAction::RetryLater, "{e}");
        }
        {
            let e = SyncError::Replica(crate::replica::ReplicaError::Fenced {
                channel: "/data/AccountChangeEvent".into(),
                epoch: 3,
                current: 4,
                owner: "other".into(),
            });
            assert_eq!(channel(&e), ChannelAction::StepDown);
            assert_eq!(repair(&e), RepairAction::RetryLater, "{e}");
        }
    }

    #[test]
    fn definite_errors_stop_the_channel_and_park_the_repair() {
        for e in [
            grpc(
                tonic::Code::NotFound,
                "sfdc.platform.eventbus.grpc.subscription.topic.not.found",
            ),
            grpc(
                tonic::Code::PermissionDenied,
                "sfdc.platform.eventbus.grpc.subscription.permission",
            ),
        ] {
            assert_eq!(channel(&e), ChannelAction::Stop, "{e}");
        }
        for e in [
            status(404, "NOT_FOUND"),
            status(400, "INVALID_FIELD"),
            SyncError::Replica(ReplicaError::Schema {
                object: "Account".to_string(),
                message: "bad name".to_string(),
            }),
            SyncError::Replica(ReplicaError::Data {
                object: "Account".to_string(),
                id: "001000000000001AAA".to_string(),
                message: "AnnualRevenue: not a number".to_string(),
            }),
        ] {
            assert_eq!(channel(&e), ChannelAction::Stop, "{e}");
            assert_eq!(repair(&e), RepairAction::Park, "{e}");
        }
    }

    #[test]
    fn definite_errors_not_about_the_object_are_retried_later() {
        for e in [
            // Credentials being fixed, a cursor that expired, a job Salesforce failed, a page
            // a proxy sent: another try can work without anyone touching the object.
            SyncError::Source(SourceError::Auth {
                message: "invalid_grant".to_string(),
                transient: false,
            }),
            status(400, "INVALID_QUERY_LOCATOR"),
            status(400, "QUERY_TIMEOUT"),
            status(200, "Failed"),
            SyncError::Source(SourceError::BadResponse {
                api: "query",
                url: "https://x/y".to_string(),
                message: "expected JSON".to_string(),
            }),
            SyncError::Read(crate::sync::reader::ReadError::JobGone {
                object: "Account".to_string(),
                job_id: "750".to_string(),
                source: Box::new(SourceError::Status {
                    api: "bulk",
                    url: "https://x/y".to_string(),
                    status: 404,
                    code: "NOT_FOUND".to_string(),
                    message: String::new(),
                }),
            }),
        ] {
            assert_eq!(repair(&e), RepairAction::RetryLater, "{e}");
        }
    }
}
