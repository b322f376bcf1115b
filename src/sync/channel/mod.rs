//! One channel's replication loop: subscribe -> decode -> batch -> apply + checkpoint.
//!
//! # Data flow
//!
//! ```text
//!  Subscribe stream ──> decode (schema cache, GetSchema on a new id)      receive.rs
//!        ^                  │  new schema id: describe -> table / new columns
//!        │                  v
//!  resume after the     batch (size / time bound, Salesforce transactions whole)  batch.rs
//!  committed replay id      │
//!        │                  v  bounded queue (PIPELINE_DEPTH batches), stream order
//!        │              apply task, two batches in flight                 pipeline.rs
//!        │                  │
//!        └──── one Postgres transaction per batch: rows + repairs + dead letters + checkpoint
//! ```
//!
//! - `receive`: reads the stream, decodes each event with its writer schema, prepares tables,
//!   and closes batches by size, time or quiet.
//! - `batch`: a batch being received, and where a size-bound cut may fall (invariant 6).
//! - `pipeline`: the apply side: commits batches in stream order, two in flight under a
//!   backlog. The hardest code of the crate; its safety argument is at its top.
//! - this module: the task itself: one `Subscribe` call after another, from the committed
//!   checkpoint, with what the error policy says between them.
//!
//! # Decoding and applying overlap
//!
//! Decoding and applying run as two tasks joined by a bounded queue, so the next batch is
//! received and decoded while Postgres commits the previous one; the queue's bound is what
//! keeps memory flat when Postgres is the slower side. Batch size follows the load: while the
//! apply task is busy, batches grow to the size or time bound (few large transactions); while
//! it waits for work, complete Salesforce transactions go to it at once and the trailing one
//! after `batch_linger_ms` of quiet, so a steady trickle of changes is applied within
//! milliseconds.
//!
//! # Why the checkpoint is safe
//!
//! The replay id saved is that of the last event in the batch, and it is saved in the
//! transaction that applies the batch, so the stored position never runs ahead of the rows
//! (invariant 1). One apply task takes batches (and keepalive positions) in the order the
//! stream delivered them, so the stored position only ever moves forward over applied
//! batches, however far the decode side has run ahead. How two batches in flight keep that
//! true is argued in `pipeline`.
//!
//! # Nothing is skipped silently
//!
//! An event is applied, turned into a repair request, or dead-lettered with a repair, all in
//! its batch's transaction (invariant 2). When the stream fails, what was already received is
//! queued and committed before reconnecting; when applying fails, the queued batches are
//! discarded. Either way the stream is reopened after the committed position (read back from
//! Postgres), so uncommitted events are simply delivered again; the version guard makes the
//! re-delivery of committed ones harmless. A channel that starts at LATEST (first start, or a
//! refused replay id) queues the entity repairs that cover the jump in the transaction that
//! records it.

mod batch;
mod pipeline;
mod receive;

use self::pipeline::{Applier, Idle};
use super::policy::{self, ChannelAction};
use super::{AbortOnDrop, SyncError};
use crate::config::{ChannelConfig, SyncConfig};
use crate::model::ReplayId;
use crate::replica::ownership::Fence;
use crate::replica::schema::TableSchema;
use crate::replica::{ApplySettings, ReplicaError, checkpoint};
use crate::salesforce::event::SchemaCache;
use crate::salesforce::pubsub::{PubSub, StartAt};
use crate::salesforce::rest::RestClient;
use crate::telemetry;
use crate::telemetry::health::{ChannelHealth, Health};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// Batches decoded and queued for the apply task, besides the (up to two) it has in flight and
/// the one being received: memory holds at most five batches.
const PIPELINE_DEPTH: usize = 2;

/// How often a schema with fields describe does not list makes the object be described again:
/// a field the integration user may not see today may be granted tomorrow, and then its column
/// is added and the object read again.
const UNMAPPED_RECHECK: Duration = Duration::from_secs(15 * 60);

/// Auth refusals of freshly obtained sessions in a row before a channel stops.
const MAX_FRESH_REFUSALS: u32 = 5;

/// Counts auth refusals in a row: one that ends a stream which had run a while starts the
/// count over (the session expired), one that comes at once after the last adds to it.
fn refusals_in_a_row(before: u32, refused: bool, at_once: bool) -> u32 {
    match (refused, before > 0 && at_once) {
        (false, _) => 0,
        (true, true) => before + 1,
        (true, false) => 1,
    }
}

/// What a committed batch covered; published to observers (tests, embedding applications).
#[derive(Debug, Clone)]
pub struct AppliedBatch {
    pub channel: String,
    /// Replay ids of the events applied, in order.
    pub replay_ids: Vec<ReplayId>,
    /// The position the batch committed.
    pub checkpoint: ReplayId,
    /// Where the stream this batch came from started (`None` = LATEST).
    pub started_after: Option<ReplayId>,
}

/// Everything a channel task needs; cheap handles shared with the other channels.
#[derive(Clone)]
pub struct ChannelDeps {
    pub pubsub: PubSub,
    pub rest: RestClient,
    pub pool: deadpool_postgres::Pool,
    pub apply: ApplySettings,
    pub sync: SyncConfig,
    pub observer: Option<broadcast::Sender<AppliedBatch>>,
    /// Where the channel reports its stream, positions and commits (lag, readiness).
    pub health: Health,
}

/// One channel: its config, schema cache and tables.
pub struct ChannelTask {
    cfg: ChannelConfig,
    /// The ownership this task replicates under: every checkpoint write checks it.
    fence: Fence,
    objects: HashSet<String>,
    deps: ChannelDeps,
    schemas: SchemaCache,
    /// Schema ids whose tables are prepared: `None` when every field maps to a column, else
    /// when to describe the object again (a field may become visible to the user).
    checked_schemas: HashMap<String, Option<Instant>>,
    tables: HashMap<String, Arc<TableSchema>>,
    /// The commit time of the newest event decoded on this stream, or where it resumed.
    decoded_ms: i64,
    /// The session the last `Subscribe` call used: the one to renew on an auth error.
    session: Option<Arc<crate::salesforce::auth::Session>>,
    health: ChannelHealth,
}

impl ChannelTask {
    pub fn new(cfg: ChannelConfig, fence: Fence, deps: ChannelDeps) -> ChannelTask {
        ChannelTask {
            fence,
            objects: cfg.objects.iter().cloned().collect(),
            health: deps.health.channel(&cfg.name),
            cfg,
            deps,
            schemas: SchemaCache::default(),
            checked_schemas: HashMap::new(),
            tables: HashMap::new(),
            decoded_ms: 0,
            session: None,
        }
    }

    /// Runs until `shutdown` or a definite error. What each error leads to is the error
    /// policy's ([`policy::channel`]); retries wait on the shared backoff, from the committed
    /// checkpoint.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), SyncError> {
        let stopped = self.subscribe_until_stopped(&shutdown).await;
        // Whatever ended the task with an error, `/readyz` names it from now on.
        if let Err(e) = &stopped {
            self.health.stopped(&e.to_string());
        }
        stopped
    }

    /// One `Subscribe` call after another until shutdown (`Ok`) or an error the policy says
    /// no retry can fix.
    async fn subscribe_until_stopped(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<(), SyncError> {
        let name = self.cfg.name.clone();
        let mut backoff = self.deps.sync.retry_backoff();
        let (_, max_delay) = backoff.bounds();
        // Refusals in a row of sessions fresh from a login (see below).
        let mut refused_fresh = 0u32;
        // Refusals in a row for a spent delivery allocation (the first one is an error).
        let mut allocation_refusals = 0u32;
        loop {
            let started = Instant::now();
            let result = self.stream(shutdown).await;
            self.health.closed();
            let err = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let action = policy::channel(&err);
            if matches!(
                err,
                SyncError::Replica(_) | SyncError::CheckpointMoved { .. }
            ) {
                // Until a batch commits again, `/readyz` names this.
                self.health.failing(&err.to_string());
            }
            match action {
                ChannelAction::ResumeAtLatest => {
                    // Past retention (or unknown to this org): never jump silently. The marker
                    // makes the next stream start at LATEST and re-read everything since the
                    // checkpoint.
                    tracing::warn!(channel = %name, error = %err,
                        "stored replay id refused (past the retention window?); resuming at \
                         LATEST and re-reading the channel's objects since the last checkpoint");
                    telemetry::record_replay_reset(&name);
                    let mut client = self.deps.pool.get().await.map_err(ReplicaError::from)?;
                    checkpoint::to_marker(
                        &mut client,
                        &self.deps.apply.control_schema,
                        &self.fence,
                    )
                    .await?;
                    continue;
                }
                ChannelAction::StepDown => {
                    tracing::warn!(channel = %name, error = %err,
                        "another instance took this channel over; this one no longer replicates it");
                    return Ok(());
                }
                ChannelAction::Stop => {
                    tracing::error!(channel = %name, error = %err,
                        "channel stopped: this error needs operator action; other channels go on");
                    return Err(err);
                }
                ChannelAction::WaitForAllocation => {
                    // A stream that ran a while since the last refusal starts the count over.
                    if started.elapsed() > max_delay {
                        allocation_refusals = 0;
                    }
                    allocation_refusals += 1;
                    let wait = Duration::from_secs(self.deps.sync.delivery_limit_retry_secs);
                    let what = format!(
                        "Salesforce refuses to deliver events: the org's event delivery \
                         allocation (DailyDeliveredPlatformEvents, shared by every subscriber \
                         over a rolling 24 hours) is spent; resubscribing in {} s",
                        wait.as_secs()
                    );
                    self.health.paused(&what);
                    telemetry::record_reconnect(&name, err.reason());
                    if allocation_refusals == 1 {
                        tracing::error!(channel = %name, error = %err, retry_in_secs = wait.as_secs(),
                            "channel paused: the org's event delivery allocation is spent. \
                             Find the subscribers using it (sfmirror_event_delivery_usage_ratio, \
                             Setup > Company Information), stop the ones that are not needed or \
                             buy more allocation; sfmirror resubscribes by itself and repairs \
                             what passed out of retention meanwhile");
                    } else {
                        tracing::warn!(channel = %name, refusals = allocation_refusals,
                            retry_in_secs = wait.as_secs(),
                            "event delivery allocation still spent; waiting again");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
                ChannelAction::LogInAgain | ChannelAction::Retry => {}
            }
            allocation_refusals = 0;
            let refused = action == ChannelAction::LogInAgain;
            // A session refused again and again right after logging in is not an expiry: the
            // user may not use the Pub/Sub API, or the session is locked to an address. Logging
            // in once a backoff for ever would only hide that.
            refused_fresh =
                refusals_in_a_row(refused_fresh, refused, started.elapsed() < max_delay);
            if refused_fresh > MAX_FRESH_REFUSALS {
                tracing::error!(channel = %name, error = %err, refusals = refused_fresh,
                    "channel stopped: Salesforce refuses every new session for this channel; \
                     check that the integration user has the API Enabled and Pub/Sub \
                     permissions and that its sessions are not locked to an IP address");
                return Err(err);
            }
            if refused {
                // Renew the session this stream was refused with: if another channel already
                // replaced it, that login is shared instead of making another.
                let stale = self
                    .session
                    .clone()
                    .or_else(|| self.deps.pubsub.auth().current());
                match self.deps.pubsub.auth().renew(stale.as_deref()).await {
                    Ok(_) => {}
                    Err(e) if !e.is_transient() => {
                        tracing::error!(channel = %name, error = %e,
                            "channel stopped: Salesforce refused the session and a new one \
                             cannot be obtained; fix the credentials");
                        return Err(e.into());
                    }
                    Err(e) => {
                        tracing::warn!(channel = %name, error = %e, "re-authentication failed")
                    }
                }
            }
            // A stream that ran a while before failing starts the backoff over.
            if started.elapsed() > max_delay {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            telemetry::record_reconnect(&name, err.reason());
            tracing::warn!(channel = %name, error = %err, retry_in_ms = delay.as_millis() as u64,
                "stream interrupted; resubscribing after the committed checkpoint");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One `Subscribe` call, from the committed checkpoint until an error or shutdown.
    async fn stream(&mut self, shutdown: &CancellationToken) -> Result<(), SyncError> {
        let name = self.cfg.name.clone();
        let loaded = {
            let client = self.deps.pool.get().await.map_err(ReplicaError::from)?;
            checkpoint::load_with_caught_up(&client, &self.deps.apply.control_schema, &name).await?
        };
        if let Some(l) = &loaded {
            self.health
                .restore(l.checkpoint.commit_timestamp_ms, l.caught_up_ms);
        }
        let saved = loaded.map(|l| l.checkpoint);
        // A marker (empty replay id) or no checkpoint at all: start at LATEST and queue the
        // re-reads that cover everything before it.
        let covered_since = match &saved {
            Some(c) if c.replay_id.0.is_empty() => Some(c.commit_timestamp_ms),
            None => Some(None),
            Some(_) => None,
        };
        let start = match &saved {
            Some(c) if !c.replay_id.0.is_empty() => StartAt::After(c.replay_id.clone()),
            _ => StartAt::Latest,
        };
        let subscribed_at = chrono::Utc::now().timestamp_millis();
        // Every event this stream delivers committed after this (a checkpoint without a
        // commit time gives no bound, so 0: a dead letter then re-reads everything).
        self.decoded_ms = match &saved {
            Some(c) if !c.replay_id.0.is_empty() => c.commit_timestamp_ms.unwrap_or(0),
            _ => subscribed_at,
        };
        tracing::info!(channel = %name, start = ?start, "subscribing");
        let started_after = match &start {
            StartAt::After(r) => Some(r.clone()),
            _ => None,
        };
        let session = self.deps.pubsub.auth().session().await?;
        self.session = Some(session.clone());
        let mut sub = self.deps.pubsub.subscribe_as(session, &name, start).await?;
        // Pub/Sub accepted the stream (its response headers arrived): the channel is
        // subscribed, though its first event or keepalive may take minutes.
        self.health
            .subscribed(started_after.as_ref().map(|r| r.0.as_slice()));
        if let Some(since) = covered_since {
            self.cover_jump_to_latest(since, subscribed_at).await?;
        }
        let (work_tx, work_rx) = mpsc::channel(PIPELINE_DEPTH);
        let idle = Arc::new(Idle::default());
        let applier = Applier {
            idle: idle.clone(),
            name: name.clone(),
            fence: self.fence.clone(),
            objects: self.cfg.objects.clone(),
            pool: self.deps.pool.clone(),
            settings: self.deps.apply.clone(),
            observer: self.deps.observer.clone(),
            committed: started_after.clone(),
            started_after,
            started: 0,
            health: self.health.clone(),
        };
        // Aborted if this future is dropped, so no apply task outlives its stream.
        let mut apply = AbortOnDrop(tokio::spawn(applier.run(work_rx)));
        let received = self.receive(&mut sub, shutdown, work_tx, &idle).await;
        // The queue is closed: the apply task commits what is queued and ends. Its error, if
        // any, is the reason the receiving stopped, so it wins.
        let applied = match (&mut apply.0).await {
            Ok(r) => r,
            Err(e) => Err(SyncError::TaskFailed {
                task: format!("the apply task of {name}"),
                message: e.to_string(),
            }),
        };
        applied.and(received)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_right_after_a_login_add_up() {
        let mut n = 0;
        for _ in 0..MAX_FRESH_REFUSALS {
            n = refusals_in_a_row(n, true, true);
        }
        assert_eq!(n, MAX_FRESH_REFUSALS);
        assert_eq!(refusals_in_a_row(n, true, true), MAX_FRESH_REFUSALS + 1);
        // An expiry after a stream that ran: counted afresh.
        assert_eq!(refusals_in_a_row(n, true, false), 1);
        // Any other error ends the run.
        assert_eq!(refusals_in_a_row(n, false, true), 0);
    }
}
