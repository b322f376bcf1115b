//! Orchestration: the only place that knows both the source and the sink.
//!
//! # Modules
//!
//! - [`setup`]: what every command starts from: the replica pool and settings, the org's
//!   clients; migrating is a separate, explicit step.
//! - [`supervisor`]: the daemon: runs the coordinator, the repair worker and the metrics
//!   listener, and shuts everything down together.
//! - [`coordinator`]: which channels this instance owns (leases shared with the other
//!   instances of one configuration), one channel task per owned channel.
//! - [`channel`]: one task per Pub/Sub channel (fetch -> decode -> batch -> apply +
//!   checkpoint in one transaction).
//! - [`repair`]: the repair worker, draining the repair queue.
//! - [`derived`]: the derived-column worker (formulas, person names: re-read after changes,
//!   swept on a schedule).
//! - [`limits`]: the org's API and event delivery allocations, read from `/limits`.
//! - [`reader`]: the org reader every snapshot-shaped read goes through (count, REST or Bulk,
//!   chunks read ahead, retries, job clean-up).
//! - [`backfill`], [`verify`], [`status`], [`check`]: the one-shot commands.
//! - [`policy`]: the error policy (what a channel or the repair worker does after an error).
//!
//! The error type of a channel task is [`SyncError`]; each part of it says whether a retry
//! can help.

pub mod backfill;
pub mod channel;
pub mod check;
pub mod coordinator;
pub mod derived;
pub mod limits;
pub mod policy;
pub mod reader;
pub mod repair;
pub mod setup;
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

/// Creates `table` or adds the columns it lacks, for `origin` (a channel, the repair worker,
/// a backfill). Columns added to a table that already existed hold NULL in its rows whatever
/// the records hold (a new checkbox is false on every record at once, a field just made
/// visible had values all along) and no event will bring them, so the object is queued to be
/// read again in full. Every task that prepares a table from a newer describe comes through
/// here: whichever sees the new field first adds the column, and with it the obligation.
pub(crate) async fn ensure_table(
    client: &impl deadpool_postgres::GenericClient,
    settings: &crate::replica::ApplySettings,
    table: &crate::replica::schema::TableSchema,
    origin: &str,
) -> Result<(), ReplicaError> {
    let added = table.ensure(client, &settings.data_schema).await?;
    if added.is_empty() {
        return Ok(());
    }
    let repair = crate::replica::repair_queue::RepairRequest::Entity {
        object: table.object.clone(),
        since_ms: 0,
        reason: format!(
            "columns added ({}): reading existing records for their values",
            added.join(", ")
        ),
    };
    crate::replica::repair_queue::enqueue(
        client,
        &settings.control_schema,
        origin,
        None,
        &[repair],
    )
    .await?;
    tracing::info!(object = %table.object, columns = %added.join(", "), origin,
        "columns added; existing records queued to be read again for their values");
    Ok(())
}

/// Tables as describe has them, each kept for a while: the repair and derived-column workers
/// describe an object once per `ttl`, not once per call, and prepare its table (adding
/// columns, see [`ensure_table`]) whenever they describe it.
pub(crate) struct DescribedTables {
    ttl: std::time::Duration,
    /// Named in the repairs [`ensure_table`] queues.
    origin: &'static str,
    tables: std::collections::HashMap<
        String,
        (
            std::sync::Arc<crate::replica::schema::TableSchema>,
            std::time::Instant,
        ),
    >,
}

impl DescribedTables {
    pub(crate) fn new(ttl: std::time::Duration, origin: &'static str) -> DescribedTables {
        DescribedTables {
            ttl,
            origin,
            tables: Default::default(),
        }
    }

    /// `object`'s table, described afresh when `fresh` or when the one kept is older than the
    /// ttl.
    pub(crate) async fn get(
        &mut self,
        rest: &crate::salesforce::rest::RestClient,
        pool: &deadpool_postgres::Pool,
        settings: &crate::replica::ApplySettings,
        object: &str,
        fresh: bool,
    ) -> Result<std::sync::Arc<crate::replica::schema::TableSchema>, SyncError> {
        if let Some((t, at)) = self.tables.get(object)
            && !fresh
            && at.elapsed() < self.ttl
        {
            return Ok(t.clone());
        }
        let describe = rest.describe(object).await?;
        let table = std::sync::Arc::new(crate::replica::schema::TableSchema::from_describe(
            describe,
        )?);
        let client = pool.get().await.map_err(ReplicaError::from)?;
        ensure_table(&client, settings, &table, self.origin).await?;
        self.tables.insert(
            object.to_string(),
            (table.clone(), std::time::Instant::now()),
        );
        Ok(table)
    }
}

/// Errors of a channel task: from either side, or from the stream itself.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Source(SourceError),
    #[error(transparent)]
    Replica(ReplicaError),
    #[error(transparent)]
    Read(#[from] reader::ReadError),
    #[error("the server ended the stream")]
    StreamEnded,
    #[error("no event or keepalive for {0:?}: resubscribing")]
    StaleStream(std::time::Duration),
    /// The server sent what the protocol does not allow.
    #[error("channel {channel}: answer not understood: {message}")]
    BadAnswer { channel: String, message: String },
    /// A task of the daemon ended without an answer (it panicked): a bug, not retried.
    #[error("{task} failed: {message}")]
    TaskFailed { task: String, message: String },
    /// The metrics listener cannot bind its address.
    #[error("cannot listen for metrics on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    /// Every configured channel stopped with a definite error.
    #[error(
        "every channel stopped with an error that needs operator action ({channels} of them); \
         see the log lines above"
    )]
    AllChannelsStopped { channels: usize },
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
            SyncError::Read(e) => e.is_transient(),
            SyncError::StreamEnded
            | SyncError::StaleStream(_)
            | SyncError::CheckpointMoved { .. } => true,
            SyncError::BadAnswer { .. }
            | SyncError::TaskFailed { .. }
            | SyncError::Listen { .. }
            | SyncError::AllChannelsStopped { .. } => false,
        }
    }

    /// A short label for the reconnect metric.
    pub fn reason(&self) -> &'static str {
        match self {
            SyncError::Source(e) if e.needs_reauth() => "auth",
            SyncError::Source(e) if e.is_delivery_limit() => "delivery_limit",
            SyncError::Source(_) => "source",
            SyncError::Replica(_) => "replica",
            SyncError::Read(_) => "source",
            SyncError::StreamEnded => "stream_ended",
            SyncError::StaleStream(_) => "stale_stream",
            SyncError::BadAnswer { .. } => "protocol",
            SyncError::TaskFailed { .. } => "task_failed",
            SyncError::Listen { .. } => "listen",
            SyncError::AllChannelsStopped { .. } => "stopped",
            SyncError::CheckpointMoved { .. } => "checkpoint_moved",
        }
    }
}

impl From<SourceError> for SyncError {
    fn from(e: SourceError) -> Self {
        SyncError::Source(e)
    }
}

impl From<ReplicaError> for SyncError {
    fn from(e: ReplicaError) -> Self {
        SyncError::Replica(e)
    }
}
