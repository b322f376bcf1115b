//! Orchestration: the only place that knows both the source and the sink.
//!
//! - [`channel`]: one task per Pub/Sub channel (fetch -> decode -> batch -> apply+checkpoint).
//! - [`supervisor`]: builds the shared clients, runs the channel tasks and the metrics
//!   listener, and shuts everything down together.

pub mod backfill;
pub mod channel;
pub mod demo;
pub mod repair;
pub mod status;
pub mod supervisor;
pub mod verify;

use crate::replica::ReplicaError;
use crate::salesforce::SourceError;

/// A spawned task that is aborted when its handle is dropped, so that no task outlives the
/// future that started it (a daemon dropped mid-run leaves nothing behind).
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Errors of a channel task: from either side, or from the stream itself.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Source(SourceError),
    #[error(transparent)]
    Replica(ReplicaError),
    #[error("the server ended the stream")]
    StreamEnded,
    #[error("no event or keepalive for {0:?}: resubscribing")]
    StaleStream(std::time::Duration),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error(
        "checkpoint of {channel} is no longer at {expected}, where the batch before left it: \
         that batch did not commit, or another sfmirror moved it; resuming from the stored position"
    )]
    CheckpointMoved {
        channel: String,
        expected: crate::model::ReplayId,
    },
}

impl SyncError {
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Source(e) => e.is_transient(),
            SyncError::Replica(e) => e.is_transient(),
            SyncError::StreamEnded
            | SyncError::StaleStream(_)
            | SyncError::CheckpointMoved { .. } => true,
            SyncError::Protocol(_) => false,
        }
    }

    /// A short label for the reconnect metric.
    pub fn reason(&self) -> &'static str {
        match self {
            SyncError::Source(e) if e.needs_reauth() => "auth",
            SyncError::Source(_) => "source",
            SyncError::Replica(_) => "replica",
            SyncError::StreamEnded => "stream_ended",
            SyncError::StaleStream(_) => "stale_stream",
            SyncError::Protocol(_) => "protocol",
            SyncError::CheckpointMoved { .. } => "checkpoint_moved",
        }
    }
}
