//! One channel's replication loop: subscribe -> decode -> batch -> apply + checkpoint.
//!
//! ```text
//!  Subscribe stream ──> decode (schema cache, GetSchema on a new id)
//!        ^                  │  new schema id: describe -> table / new columns
//!        │                  v
//!  resume after the     batch (size / time bound)
//!  committed replay id      │
//!        │                  v  bounded queue (PIPELINE_DEPTH batches), stream order
//!        │              apply task
//!        │                  │
//!        └──── one Postgres transaction per batch: rows + repairs + dead letters + checkpoint
//! ```
//!
//! Decoding and applying run as two tasks joined by a bounded queue, so the next batch is
//! received and decoded while Postgres commits the previous one; the queue's bound is what
//! keeps memory flat when Postgres is the slower side. Batch size follows the load: while the
//! apply task is busy, batches grow to the size or time bound (few large transactions); while
//! it waits for work, complete Salesforce transactions go to it at once and the trailing one
//! after `batch_linger_ms` of quiet, so a steady trickle of changes is applied within
//! milliseconds.
//!
//! Why the checkpoint is safe: the replay id saved is that of the last event in the batch, and
//! it is saved in the transaction that applies the batch, so the stored position never runs
//! ahead of the rows (invariant 1). One apply task takes batches (and keepalive positions) in
//! the order the stream delivered them, so the stored position only ever moves forward over
//! applied batches, however far the decode side has run ahead. Under a backlog two batches are
//! in flight: the next one's transaction starts while the one before still runs, but writes
//! only records that one does not write until it has ended (so the two never wait for each
//! other's row locks, and every record sees its changes in stream order); only then does it
//! write the shared records, queue its repairs and move the checkpoint, from the position that
//! batch committed and from no other. It cannot commit unless the batch before did. It waits
//! for that batch inside Postgres, on an advisory lock the batch holds, so a lock cycle through
//! a third transaction (a repair, a backfill, DDL) is one the deadlock detector sees and
//! breaks, as a transient error. A keepalive position, and an idle channel, wait for the batch
//! in flight.
//!
//! Nothing in a batch is dropped without trace: an event is applied, turned into a repair
//! request, or dead-lettered with a repair, all in that same transaction (invariant 2). When the stream fails, what was already received is queued and committed
//! before reconnecting; when applying fails, the queued batches are discarded. Either way the
//! stream is reopened after the committed position (read back from Postgres), so uncommitted
//! events are simply delivered again; the version guard makes the re-delivery of committed
//! ones harmless.

use super::policy::{self, ChannelAction};
use super::{AbortOnDrop, SyncError};
use crate::config::{ChannelConfig, SyncConfig};
use crate::model::{ChangeEvent, ReplayId};
use crate::replica::ApplySettings;
use crate::replica::apply::{MergePlan, RecordKeys, execute, plan_events};
use crate::replica::repair_queue::RepairRequest;
use crate::replica::schema::TableSchema;
use crate::replica::{ReplicaError, checkpoint, dead_letters, locks, repair_queue, sync_state};
use crate::salesforce::SourceError;
use crate::salesforce::event::SchemaCache;
use crate::salesforce::pubsub::{PubSub, StartAt};
use crate::salesforce::rest::RestClient;
use crate::telemetry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};
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
}

struct DeadLetter {
    /// The event as it is kept.
    letter: dead_letters::DeadLetter,
    /// How many applicable events of the batch arrived before it.
    position: usize,
    /// A commit time (epoch ms) no later than the event's own, which cannot be read: that of
    /// the last event decoded before it on this channel, or of the position the stream
    /// resumed from. The repair that covers it re-reads from there, minus the margin.
    not_before_ms: i64,
}

/// Events received but not yet committed, and the position they bring the channel to.
#[derive(Default)]
struct Batch {
    events: Vec<ChangeEvent>,
    /// Payload bytes of each event, and their sum (the batch's memory grows with it).
    sizes: Vec<u32>,
    bytes: usize,
    dead: Vec<DeadLetter>,
    /// Position of the newest event received, applicable or not.
    last_replay: Option<ReplayId>,
    last_commit_ms: Option<i64>,
    started: Option<Instant>,
    /// When the newest event arrived.
    last_event_at: Option<Instant>,
}

/// What the commit needs of a planned batch's events.
struct Applied {
    replay_ids: Vec<ReplayId>,
    commit_ms: Vec<i64>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.last_replay.is_none()
    }

    /// Whether the batch holds more than its trailing Salesforce transaction: then every
    /// transaction before that one is known to be complete.
    fn has_complete_transactions(&self) -> bool {
        match self.events.last() {
            Some(last) if !last.header.transaction_key.is_empty() => self
                .events
                .iter()
                .any(|e| e.header.transaction_key != last.header.transaction_key),
            _ => false,
        }
    }

    /// Splits off the trailing Salesforce transaction, which may still be arriving, so that a
    /// size-bound flush does not cut it (invariant 6). The returned tail is the next batch.
    /// A batch that is one single transaction is not split: the size bound wins.
    fn split_open_transaction(&mut self) -> Batch {
        let Some(last_key) = self.events.last().map(|e| e.header.transaction_key.clone()) else {
            return Batch::default();
        };
        let start = self
            .events
            .iter()
            .rposition(|e| e.header.transaction_key != last_key)
            .map(|i| i + 1)
            .unwrap_or(0);
        if start == 0 || last_key.is_empty() {
            return Batch::default();
        }
        let tail_events = self.events.split_off(start);
        let tail_sizes = if start <= self.sizes.len() {
            self.sizes.split_off(start)
        } else {
            Vec::new()
        };
        let tail_bytes: usize = tail_sizes.iter().map(|s| *s as usize).sum();
        self.bytes = self.bytes.saturating_sub(tail_bytes);
        let (keep, carry): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dead)
            .into_iter()
            .partition(|d| d.position < start);
        self.dead = keep;
        let head_last = &self.events[start - 1];
        let tail = Batch {
            events: tail_events,
            sizes: tail_sizes,
            bytes: tail_bytes,
            dead: carry
                .into_iter()
                .map(|mut d| {
                    d.position -= start;
                    d
                })
                .collect(),
            last_replay: self.last_replay.take(),
            last_commit_ms: self.last_commit_ms,
            started: Some(Instant::now()),
            last_event_at: self.last_event_at,
        };
        self.last_replay = Some(head_last.replay_id.clone());
        self.last_commit_ms = Some(head_last.header.commit_timestamp);
        tail
    }
}

/// One channel: its config, schema cache and tables.
pub struct ChannelTask {
    cfg: ChannelConfig,
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
}

/// What the decode side hands the apply side, in stream order.
enum Work {
    /// A batch to commit, with its rows already planned.
    Batch(Box<(Batch, Applied, MergePlan)>),
    /// A keepalive: everything up to this topic position was delivered.
    Position(ReplayId),
}

/// The apply side of one `Subscribe` call: commits what the decode side queued, in order.
struct Applier {
    name: String,
    objects: Vec<String>,
    pool: deadpool_postgres::Pool,
    settings: ApplySettings,
    observer: Option<broadcast::Sender<AppliedBatch>>,
    started_after: Option<ReplayId>,
    /// The position committed last (by a batch or a keepalive).
    committed: Option<ReplayId>,
    /// Whether the task is waiting for work, and the signal that it just started to.
    idle: Arc<Idle>,
    /// Batches started so far: picks each batch's advisory lock.
    started: u64,
}

/// The apply task's idleness, watched by the decode side to apply at once what it can.
#[derive(Default)]
struct Idle {
    waiting: std::sync::atomic::AtomicBool,
    became: tokio::sync::Notify,
}

impl ChannelTask {
    pub fn new(cfg: ChannelConfig, deps: ChannelDeps) -> ChannelTask {
        ChannelTask {
            objects: cfg.objects.iter().cloned().collect(),
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
        let name = self.cfg.name.clone();
        let mut backoff = self.deps.sync.retry_backoff();
        let (_, max_delay) = backoff.bounds();
        // Refusals in a row of sessions fresh from a login (see below).
        let mut refused_fresh = 0u32;
        loop {
            let started = Instant::now();
            let result = self.stream(&shutdown).await;
            telemetry::record_connected(&name, false);
            let err = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let action = policy::channel(&err);
            match action {
                ChannelAction::ResumeAtLatest => {
                    // Past retention (or unknown to this org): never jump silently. The marker
                    // makes the next stream start at LATEST and re-read everything since the
                    // checkpoint.
                    tracing::warn!(channel = %name, error = %err,
                        "stored replay id refused (past the retention window?); resuming at \
                         LATEST and re-reading the channel's objects since the last checkpoint");
                    telemetry::record_replay_reset(&name);
                    let client = self.deps.pool.get().await.map_err(ReplicaError::from)?;
                    checkpoint::to_marker(&client, &self.deps.apply.control_schema, &name).await?;
                    continue;
                }
                ChannelAction::Stop => {
                    tracing::error!(channel = %name, error = %err,
                        "channel stopped: this error needs operator action; other channels go on");
                    return Err(err);
                }
                ChannelAction::LogInAgain | ChannelAction::Retry => {}
            }
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
        let saved = {
            let client = self.deps.pool.get().await.map_err(ReplicaError::from)?;
            checkpoint::load(&client, &self.deps.apply.control_schema, &name).await?
        };
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
        telemetry::record_connected(&name, true);
        if let Some(since) = covered_since {
            self.cover_jump_to_latest(since, subscribed_at).await?;
        }
        let (work_tx, work_rx) = mpsc::channel(PIPELINE_DEPTH);
        let idle = Arc::new(Idle::default());
        let applier = Applier {
            idle: idle.clone(),
            name: name.clone(),
            objects: self.cfg.objects.clone(),
            pool: self.deps.pool.clone(),
            settings: self.deps.apply.clone(),
            observer: self.deps.observer.clone(),
            committed: started_after.clone(),
            started_after,
            started: 0,
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

    /// Reads the stream, decodes and batches, and queues batches for the apply task until
    /// shutdown, a stream error, or the apply task stopping. The last partial batch is always
    /// queued: events already received are valid and are committed before reconnecting.
    async fn receive(
        &mut self,
        sub: &mut crate::salesforce::pubsub::Subscription,
        shutdown: &CancellationToken,
        work: mpsc::Sender<Work>,
        idle: &Idle,
    ) -> Result<(), SyncError> {
        let name = self.cfg.name.clone();
        let mut batch = Batch::default();
        let max_wait = self.deps.sync.batch_max_wait();
        let linger = Duration::from_millis(self.deps.sync.batch_linger_ms);
        let stale_after = Duration::from_secs(self.deps.sync.stale_stream_secs);
        let mut last_heard = Instant::now();
        loop {
            // Latency: while the apply task waits for work, every transaction known to be
            // complete goes to it now, and the trailing one after `linger` of quiet. While it
            // is busy, batches grow instead (fewer, larger transactions: throughput).
            let apply_idle = || {
                idle.waiting.load(std::sync::atomic::Ordering::Acquire)
                    && work.capacity() == work.max_capacity()
            };
            if apply_idle() && batch.has_complete_transactions() {
                let tail = batch.split_open_transaction();
                if !self.queue(&mut batch, &work).await? {
                    return Ok(());
                }
                batch = tail;
            }
            let mut deadline = batch.started.map(|t| t + max_wait);
            if apply_idle()
                && let Some(quiet) = batch.last_event_at.map(|t| t + linger)
            {
                deadline = deadline.map(|d| d.min(quiet));
            }
            let response = tokio::select! {
                // The apply task ran out of work: look again at what can go now.
                _ = idle.became.notified(), if !batch.is_empty() => continue,
                _ = shutdown.cancelled() => {
                    self.queue(&mut batch, &work).await?;
                    return Ok(());
                }
                // The apply task stopped (it failed): its error is what the caller reports.
                _ = work.closed() => return Ok(()),
                // Neither an event nor a keepalive for too long: the stream is dead even if
                // the connection looks open.
                _ = tokio::time::sleep_until((last_heard + stale_after).into()) => {
                    self.queue(&mut batch, &work).await?;
                    return Err(SyncError::StaleStream(stale_after));
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    // The time bound is there so that a quiet stream's events do not wait for
                    // a full batch. While earlier batches are still queued, the apply task is
                    // the bottleneck and a small batch would only add a transaction: keep
                    // filling this one and look again a period later.
                    if work.capacity() < work.max_capacity() {
                        batch.started = Some(Instant::now());
                        continue;
                    }
                    if !self.queue(&mut batch, &work).await? {
                        return Ok(());
                    }
                    continue;
                }
                r = sub.next() => r,
            };
            let response = match response {
                Ok(Some(r)) => {
                    last_heard = Instant::now();
                    r
                }
                Ok(None) => {
                    self.queue(&mut batch, &work).await?;
                    return Err(SyncError::StreamEnded);
                }
                Err(e) => {
                    // Events already received are valid: commit them before reconnecting.
                    self.queue(&mut batch, &work).await?;
                    return Err(e.into());
                }
            };
            if response.events.is_empty() {
                // Keepalive: everything was delivered. The apply task persists the topic
                // position so a later resubscribe does not start from a very old id.
                if !self.queue(&mut batch, &work).await? {
                    return Ok(());
                }
                let latest = ReplayId(response.latest_replay_id);
                if work.send(Work::Position(latest)).await.is_err() {
                    return Ok(());
                }
                continue;
            }
            for consumer_event in response.events {
                let replay_id = ReplayId(consumer_event.replay_id);
                let Some(event) = consumer_event.event else {
                    return Err(SyncError::BadAnswer {
                        channel: name.clone(),
                        message: format!("event {replay_id} has no body"),
                    });
                };
                self.decode_into(&mut batch, replay_id, event).await?;
                if batch.started.is_none() {
                    batch.started = Some(Instant::now());
                }
                batch.last_event_at = Some(Instant::now());
            }
            if batch.events.len() >= self.deps.sync.batch_max_events
                || batch.bytes >= self.deps.sync.batch_max_bytes
            {
                let tail = batch.split_open_transaction();
                if !self.queue(&mut batch, &work).await? {
                    return Ok(());
                }
                if !tail.is_empty() {
                    batch = tail;
                }
            }
        }
    }

    /// Plans the batch's rows (here, so that this work overlaps the previous batch's commit)
    /// and hands the batch, if any, to the apply task, waiting while the queue is full.
    /// `Ok(false)` when the apply task has stopped.
    async fn queue(&self, batch: &mut Batch, work: &mpsc::Sender<Work>) -> Result<bool, SyncError> {
        if batch.is_empty() {
            batch.started = None;
            return Ok(true);
        }
        let mut b = std::mem::take(batch);
        let plan = plan_events(&self.deps.apply, &self.tables, &mut b.events)?;
        // The plan holds the rows; only the events' positions and commit times are needed
        // from here on, so their decoded bodies are freed before the batch waits in the queue.
        let applied = Applied {
            replay_ids: b.events.iter().map(|e| e.replay_id.clone()).collect(),
            commit_ms: b.events.iter().map(|e| e.header.commit_timestamp).collect(),
        };
        b.events = Vec::new();
        Ok(work
            .send(Work::Batch(Box::new((b, applied, plan))))
            .await
            .is_ok())
    }

    /// The channel now starts at LATEST: queue entity repairs for its objects since `since`
    /// (minus the margin) — or, on a first start, since the object's last snapshot, or
    /// everything — and leave a marker at `subscribed_at`, in one transaction.
    async fn cover_jump_to_latest(
        &mut self,
        since: Option<i64>,
        subscribed_at: i64,
    ) -> Result<(), SyncError> {
        let settings = &self.deps.apply;
        let margin = settings.repair_margin_ms;
        let mut client = self.deps.pool.get().await.map_err(ReplicaError::from)?;
        let tx = client
            .transaction()
            .await
            .map_err(ReplicaError::pg("begin start-up repairs"))?;
        let mut repairs = Vec::new();
        for object in &self.cfg.objects {
            let from = match since {
                Some(ms) => Some(ms),
                None => {
                    sync_state::snapshot_started_ms(&tx, &settings.control_schema, object).await?
                }
            };
            let since_ms = from.map(|ms| (ms - margin).max(0)).unwrap_or(0);
            repairs.push(RepairRequest::Entity {
                object: object.clone(),
                since_ms,
                reason: if since.is_some() {
                    format!("{} resumed at LATEST", self.cfg.name)
                } else {
                    format!("first start of {}", self.cfg.name)
                },
            });
        }
        repair_queue::enqueue(
            &tx,
            &settings.control_schema,
            &self.cfg.name,
            None,
            &repairs,
        )
        .await?;
        let marker = checkpoint::Checkpoint {
            replay_id: ReplayId::default(),
            commit_timestamp_ms: Some(subscribed_at),
        };
        checkpoint::save(&tx, &settings.control_schema, &self.cfg.name, &marker).await?;
        tx.commit()
            .await
            .map_err(ReplicaError::pg("commit start-up repairs"))?;
        tracing::info!(channel = %self.cfg.name, objects = repairs.len(), since = ?since,
            "started at LATEST; queued re-reads covering what came before");
        Ok(())
    }

    /// Decodes one event into the batch; undecodable payloads become dead letters.
    async fn decode_into(
        &mut self,
        batch: &mut Batch,
        replay_id: ReplayId,
        event: crate::proto::ProducerEvent,
    ) -> Result<(), SyncError> {
        batch.last_replay = Some(replay_id.clone());
        let plan = match self.schemas.get(&event.schema_id) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                self.dead_letter(batch, replay_id.clone(), &event, e);
                None
            }
            None => match self.deps.pubsub.get_schema(&event.schema_id).await {
                Ok(json) => match self.schemas.insert(&event.schema_id, &json) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        self.dead_letter(batch, replay_id.clone(), &event, e.to_string());
                        None
                    }
                },
                // No session (credentials refused): a channel problem, not this event's.
                Err(e) if e.is_transient() || matches!(e, SourceError::Auth { .. }) => {
                    return Err(e.into());
                }
                Err(e) => {
                    self.dead_letter(batch, replay_id.clone(), &event, e.to_string());
                    None
                }
            },
        };
        let Some(plan) = plan else { return Ok(()) };
        match plan.decode(replay_id.clone(), &event.payload) {
            Ok((decoded, warnings)) => {
                for w in warnings {
                    tracing::warn!(channel = %self.cfg.name, replay_id = %replay_id, "{w}");
                }
                self.decoded_ms = decoded.header.commit_timestamp;
                let entity = decoded.header.entity_name.clone();
                if !self.objects.contains(&*entity) {
                    return Ok(());
                }
                let due = match self.checked_schemas.get(&event.schema_id) {
                    None => true,
                    Some(None) => false,
                    Some(Some(at)) => Instant::now() >= *at,
                };
                if due {
                    let mapped = self.prepare_table(&entity, plan.field_paths()).await?;
                    self.checked_schemas.insert(
                        event.schema_id.clone(),
                        (!mapped).then(|| Instant::now() + UNMAPPED_RECHECK),
                    );
                }
                batch.last_commit_ms = Some(decoded.header.commit_timestamp);
                batch.events.push(decoded);
                let size = u32::try_from(event.payload.len()).unwrap_or(u32::MAX);
                batch.sizes.push(size);
                batch.bytes += size as usize;
            }
            Err(e) => self.dead_letter(batch, replay_id, &event, e.to_string()),
        }
        Ok(())
    }

    fn dead_letter(
        &self,
        batch: &mut Batch,
        replay_id: ReplayId,
        event: &crate::proto::ProducerEvent,
        error: String,
    ) {
        tracing::error!(channel = %self.cfg.name, replay_id = %replay_id, schema_id = %event.schema_id,
            error = %error, "undecodable event: dead-lettered, its objects queued for repair");
        batch.dead.push(DeadLetter {
            letter: dead_letters::DeadLetter {
                replay_id,
                schema_id: event.schema_id.clone(),
                payload: event.payload.to_vec(),
                error,
            },
            position: batch.events.len(),
            not_before_ms: self.decoded_ms,
        });
    }

    /// Makes sure `object`'s table exists with a column for every field path of a schema;
    /// describes again (and adds columns) when the schema has fields the table lacks. Returns
    /// whether every path has a column.
    async fn prepare_table(&mut self, object: &str, paths: &[Arc<str>]) -> Result<bool, SyncError> {
        let missing = |t: &TableSchema| -> Vec<String> {
            paths
                .iter()
                .filter(|p| t.column_for(p).is_none())
                .map(|p| p.to_string())
                .collect()
        };
        if let Some(t) = self.tables.get(object)
            && missing(t).is_empty()
        {
            return Ok(true);
        }
        let mut describe = self.deps.rest.describe(object).await?;
        // A field deleted from the org keeps its column, and events written before the
        // deletion still carry it: keep writing it there for as long as this task knows where.
        if let Some(old) = self.tables.get(object) {
            let gone: Vec<_> = old
                .describe()
                .fields
                .iter()
                .filter(|f| describe.field(&f.name).is_none())
                .cloned()
                .collect();
            describe.fields.extend(gone);
        }
        let table = Arc::new(TableSchema::from_describe(describe)?);
        let still_missing = missing(&table);
        if !still_missing.is_empty() {
            // Real event schemas carry fields no describe lists (the Address record's `Xyz`),
            // and a field deleted from the org before a restart is no longer described. Such
            // a field has no column to go to; the rest of the event still replicates.
            tracing::warn!(
                channel = %self.cfg.name,
                object,
                fields = %still_missing.join(", "),
                "change events carry fields that describe does not list; their values are not \
                 replicated (if a field should be, check the integration user's field-level \
                 security)"
            );
        }
        let client = self.deps.pool.get().await.map_err(ReplicaError::from)?;
        super::ensure_table(&client, &self.deps.apply, &table, &self.cfg.name).await?;
        tracing::info!(object, table = %table.table, columns = table.columns.len(), "table ready");
        self.tables.insert(object.to_string(), table);
        Ok(still_missing.is_empty())
    }
}

impl Applier {
    /// Commits what the decode side queues, in order, until the queue closes.
    ///
    /// While batches are queued, two are in flight: the next one's transaction starts at
    /// once and writes the records the one before does not write, while that one still runs;
    /// it writes the others, queues its repairs and moves the checkpoint only once that one
    /// has committed, and moves it only from the position that one committed
    /// ([`checkpoint::advance`]). With nothing queued, the task waits for whichever comes
    /// first, the end of the batch in flight or the next batch; it goes idle only with nothing
    /// in flight.
    async fn run(mut self, mut work: mpsc::Receiver<Work>) -> Result<(), SyncError> {
        let mut in_flight: Option<InFlight> = None;
        loop {
            let w = match work.try_recv() {
                Ok(w) => w,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => match in_flight.as_mut() {
                    None => {
                        self.idle
                            .waiting
                            .store(true, std::sync::atomic::Ordering::Release);
                        self.idle.became.notify_one();
                        let next = work.recv().await;
                        self.idle
                            .waiting
                            .store(false, std::sync::atomic::Ordering::Release);
                        match next {
                            Some(w) => w,
                            None => break,
                        }
                    }
                    // Record the batch in flight when it ends, or start the next one beside
                    // it if that comes first (this one may be waiting for a lock).
                    Some(f) => {
                        let next = tokio::select! {
                            biased;
                            joined = &mut f.done.0 => Err(joined),
                            w = work.recv() => Ok(w),
                        };
                        match next {
                            Err(joined) => {
                                in_flight = None;
                                self.record(joined)?;
                                continue;
                            }
                            Ok(Some(w)) => w,
                            Ok(None) => break,
                        }
                    }
                },
            };
            match w {
                Work::Batch(planned) => {
                    let (b, applied, plan) = *planned;
                    let Some(last) = b.last_replay.clone() else {
                        continue;
                    };
                    let before = in_flight.as_mut().map(InFlight::successor);
                    let mut next = self.start(b, applied, plan, last, before);
                    // The batch after this one will wait on this one's advisory lock: it
                    // must be held first.
                    next.lock_held().await;
                    if let Some(f) = in_flight.take() {
                        self.finish(f).await?;
                    }
                    in_flight = Some(next);
                }
                Work::Position(latest) => {
                    if let Some(f) = in_flight.take() {
                        self.finish(f).await?;
                    }
                    self.keepalive(latest).await?
                }
            }
        }
        if let Some(f) = in_flight.take() {
            self.finish(f).await?;
        }
        Ok(())
    }

    /// Persists a keepalive's topic position (nothing is pending before it).
    async fn keepalive(&mut self, latest: ReplayId) -> Result<(), SyncError> {
        telemetry::record_batch(&self.name, 0.0, 0.0);
        if latest.0.is_empty() || self.committed.as_ref() == Some(&latest) {
            return Ok(());
        }
        let client = self.pool.get().await.map_err(ReplicaError::from)?;
        let cp = checkpoint::Checkpoint {
            replay_id: latest.clone(),
            commit_timestamp_ms: None,
        };
        checkpoint::save(&client, &self.settings.control_schema, &self.name, &cp).await?;
        self.committed = Some(latest);
        Ok(())
    }

    /// Starts the batch's transaction as a task of its own. `before` is the batch still in
    /// flight ahead of it, if any.
    fn start(
        &mut self,
        b: Batch,
        applied: Applied,
        plan: MergePlan,
        last: ReplayId,
        before: Option<Before>,
    ) -> InFlight {
        let (committed_tx, committed) = oneshot::channel();
        let (locked_tx, locked) = oneshot::channel();
        let records = Arc::new(plan.record_keys());
        let lock = batch_lock(&self.name, self.started);
        self.started += 1;
        let job = BatchJob {
            name: self.name.clone(),
            objects: self.objects.clone(),
            pool: self.pool.clone(),
            settings: self.settings.clone(),
        };
        let done = AbortOnDrop(tokio::spawn(job.run(
            b,
            applied,
            plan,
            last.clone(),
            (lock, locked_tx),
            before,
            committed_tx,
        )));
        InFlight {
            checkpoint: last,
            records,
            lock,
            locked: Some(locked),
            committed: Some(committed),
            done,
        }
    }

    /// Waits for the batch's commit, then records it: the committed position, metrics, and
    /// observers.
    async fn finish(&mut self, mut f: InFlight) -> Result<(), SyncError> {
        let joined = (&mut f.done.0).await;
        self.record(joined)
    }

    /// Records how a batch's task ended: its error, or its commit (the committed position,
    /// metrics, observers).
    fn record(
        &mut self,
        joined: Result<Result<Committed, SyncError>, tokio::task::JoinError>,
    ) -> Result<(), SyncError> {
        let c = match joined {
            Ok(r) => r?,
            Err(e) => {
                return Err(SyncError::TaskFailed {
                    task: format!("a batch of {}", self.name),
                    message: e.to_string(),
                });
            }
        };
        let name = &self.name;
        self.committed = Some(c.last.clone());
        let now_ms = chrono::Utc::now().timestamp_millis();
        for (kind, n) in &c.events {
            telemetry::record_events(name, kind.symbol(), *n);
        }
        for ms in &c.applied.commit_ms {
            telemetry::record_apply_delay((now_ms - ms).max(0) as f64 / 1e3);
        }
        if c.dead > 0 {
            telemetry::record_dead_letters(name, c.dead);
        }
        let lag = c
            .last_commit_ms
            .map(|ms| (now_ms - ms).max(0) as f64 / 1e3)
            .unwrap_or(0.0);
        telemetry::record_batch(name, c.started.elapsed().as_secs_f64(), lag);
        if let Some(ms) = c.last_commit_ms {
            telemetry::record_retention_headroom(name, ms, now_ms);
        }
        tracing::debug!(channel = %name, events = c.applied.replay_ids.len(),
            statements = c.statements, repairs = c.repairs, checkpoint = %c.last,
            apply_ms = c.statements_took.as_millis() as u64,
            commit_ms = (c.started.elapsed() - c.statements_took).as_millis() as u64,
            "batch committed");
        if let Some(obs) = &self.observer {
            let _ = obs.send(AppliedBatch {
                channel: name.clone(),
                replay_ids: c.applied.replay_ids,
                checkpoint: c.last,
                started_after: self.started_after.clone(),
            });
        }
        Ok(())
    }
}

/// A batch's transaction running as its own task.
struct InFlight {
    /// The position it commits.
    checkpoint: ReplayId,
    /// The records it writes.
    records: Arc<RecordKeys>,
    /// The advisory lock its transaction holds, and the signal that it took it (dropped if
    /// the batch failed first).
    lock: i64,
    locked: Option<oneshot::Receiver<()>>,
    /// Resolves when it has committed; dropped unresolved when it fails. Handed to the batch
    /// after it.
    committed: Option<oneshot::Receiver<()>>,
    done: AbortOnDrop<Result<Committed, SyncError>>,
}

impl InFlight {
    /// Waits until the batch's transaction holds its advisory lock, or has failed.
    async fn lock_held(&mut self) {
        if let Some(locked) = self.locked.take() {
            let _ = locked.await;
        }
    }

    /// What the batch queued behind this one needs to know of it.
    fn successor(&mut self) -> Before {
        Before {
            checkpoint: self.checkpoint.clone(),
            records: self.records.clone(),
            lock: self.lock,
            committed: self.committed.take(),
        }
    }
}

/// The batch in flight ahead of a batch's transaction.
struct Before {
    checkpoint: ReplayId,
    records: Arc<RecordKeys>,
    lock: i64,
    committed: Option<oneshot::Receiver<()>>,
}

/// The transaction-level advisory lock of a channel's `n`-th batch. A batch waits for the one
/// before by asking for that one's lock, so Postgres sees the wait: should a third
/// transaction (a repair, a backfill, another channel, DDL) wait for the later batch while
/// the earlier one waits for it, the deadlock detector sees the whole cycle and breaks it.
/// A wait inside the daemon would leave the three blocked for good. Three keys in turn: a
/// batch holds its own and, shared, the one before's, and the batch that reuses a key starts
/// only after both of those have ended.
fn batch_lock(channel: &str, n: u64) -> i64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ("sfmirror batch", channel, n % 3).hash(&mut h);
    h.finish() as i64
}

/// What a committed batch reports.
struct Committed {
    applied: Applied,
    last: ReplayId,
    last_commit_ms: Option<i64>,
    events: HashMap<crate::model::ChangeType, u64>,
    statements: usize,
    repairs: usize,
    dead: usize,
    started: Instant,
    statements_took: Duration,
}

/// What a batch's task needs: cheap clones of the apply side's handles.
struct BatchJob {
    name: String,
    objects: Vec<String>,
    pool: deadpool_postgres::Pool,
    settings: ApplySettings,
}

impl BatchJob {
    /// Applies the batch: rows, repairs, dead letters and the checkpoint in one transaction,
    /// and resolves `committed` once it has committed.
    ///
    /// With a batch `before` it still in flight, this one first writes only the records that
    /// one does not write (no row lock either takes can then be one the other waits for), and
    /// waits for it to commit before the rest: the records both write are read and locked as
    /// that batch left them, the repairs and the checkpoint go after its own, and the
    /// checkpoint moves only from that batch's position.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        self,
        b: Batch,
        applied: Applied,
        plan: MergePlan,
        last: ReplayId,
        (lock, locked): (i64, oneshot::Sender<()>),
        before: Option<Before>,
        committed: oneshot::Sender<()>,
    ) -> Result<Committed, SyncError> {
        let name = &self.name;
        let settings = &self.settings;
        let started = Instant::now();
        let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
        // Read committed, whatever the server's default: the rest of a batch must see what the
        // batch before committed while this transaction ran.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(ReplicaError::pg("begin batch"))?;
        locks::hold_batch(&tx, lock).await?;
        let _ = locked.send(());
        let (after, outcome) = match before {
            None => (None, execute(&tx, settings, plan).await?),
            Some(before) => {
                let (free, rest) = plan.split(&before.records);
                let mut outcome = execute(&tx, settings, free).await?;
                // Until the batch before has ended: a wait Postgres sees (see `batch_lock`).
                locks::wait_for_batch(&tx, before.lock).await?;
                // It has ended in Postgres; its task says whether it committed.
                let before_committed = match before.committed {
                    Some(c) => c.await.is_ok(),
                    None => false,
                };
                if !before_committed {
                    return Err(SyncError::CheckpointMoved {
                        channel: name.clone(),
                        expected: before.checkpoint,
                    });
                }
                outcome.absorb(execute(&tx, settings, rest).await?);
                (Some(before.checkpoint), outcome)
            }
        };
        let mut repairs = outcome.repairs;
        if !b.dead.is_empty() {
            let since = b
                .dead
                .iter()
                .map(|d| d.not_before_ms)
                .min()
                .unwrap_or(0)
                .saturating_sub(settings.repair_margin_ms)
                .max(0);
            for object in &self.objects {
                repairs.push(RepairRequest::Entity {
                    object: object.clone(),
                    since_ms: since,
                    reason: format!("{} undecodable event(s) on {name}", b.dead.len()),
                });
            }
            let letters: Vec<_> = b.dead.iter().map(|d| &d.letter).collect();
            dead_letters::record(&tx, &settings.control_schema, name, &letters).await?;
        }
        repair_queue::enqueue(&tx, &settings.control_schema, name, Some(&last), &repairs).await?;
        let cp = checkpoint::Checkpoint {
            replay_id: last.clone(),
            commit_timestamp_ms: b.last_commit_ms,
        };
        match &after {
            None => checkpoint::save(&tx, &settings.control_schema, name, &cp).await?,
            Some(from) => {
                if !checkpoint::advance(&tx, &settings.control_schema, name, from, &cp).await? {
                    return Err(SyncError::CheckpointMoved {
                        channel: name.clone(),
                        expected: from.clone(),
                    });
                }
            }
        }
        let statements_took = started.elapsed();
        tx.commit()
            .await
            .map_err(ReplicaError::pg("commit batch"))?;
        let _ = committed.send(());
        Ok(Committed {
            applied,
            last,
            last_commit_ms: b.last_commit_ms,
            events: outcome.events,
            statements: outcome.statements,
            repairs: repairs.len(),
            dead: b.dead.len(),
            started,
            statements_took,
        })
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeHeader, ChangeType};

    fn event(replay: u64, tx: &str) -> ChangeEvent {
        ChangeEvent {
            replay_id: ReplayId::from_u64(replay),
            schema_id: "s".into(),
            header: ChangeHeader {
                entity_name: "Account".into(),
                record_ids: vec![format!("001{replay}")],
                change_type: ChangeType::Update,
                change_origin: String::new(),
                transaction_key: tx.into(),
                sequence_number: 1,
                commit_timestamp: replay as i64 * 10,
                commit_number: replay as i64,
                commit_user: String::new(),
                changed_fields: vec![],
                nulled_fields: vec![],
                diff_fields: vec![],
            },
            fields: vec![],
            schema_fields: Arc::from(Vec::<Arc<str>>::new()),
        }
    }

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

    fn dead(replay: u64, position: usize) -> DeadLetter {
        DeadLetter {
            letter: dead_letters::DeadLetter {
                replay_id: ReplayId::from_u64(replay),
                schema_id: "s".into(),
                payload: vec![],
                error: "x".into(),
            },
            position,
            not_before_ms: 0,
        }
    }

    #[test]
    fn a_size_flush_keeps_the_trailing_transaction_whole() {
        let mut b = Batch {
            events: vec![
                event(1, "a"),
                event(2, "a"),
                event(3, "b"),
                event(5, "c"),
                event(6, "c"),
            ],
            sizes: vec![100, 100, 100, 50, 60],
            bytes: 410,
            dead: vec![dead(4, 3), dead(7, 5)],
            last_replay: Some(ReplayId::from_u64(8)),
            last_commit_ms: Some(80),
            started: Some(Instant::now()),
            last_event_at: Some(Instant::now()),
        };
        assert!(b.has_complete_transactions());
        let tail = b.split_open_transaction();
        assert_eq!(b.events.len(), 3);
        assert_eq!(
            b.last_replay,
            Some(ReplayId::from_u64(3)),
            "checkpoint at the cut"
        );
        assert_eq!(b.last_commit_ms, Some(30));
        assert_eq!(b.dead.len(), 0, "dead letter 4 arrived after event 3");
        assert_eq!(tail.events.len(), 2);
        assert_eq!(
            (b.bytes, tail.bytes),
            (300, 110),
            "payload bytes follow the events"
        );
        assert_eq!(
            tail.dead.iter().map(|d| d.position).collect::<Vec<_>>(),
            [0, 2]
        );
        assert_eq!(tail.last_replay, Some(ReplayId::from_u64(8)));
    }

    #[test]
    fn one_transaction_larger_than_the_bound_is_not_split() {
        let mut b = Batch {
            events: vec![event(1, "a"), event(2, "a")],
            last_replay: Some(ReplayId::from_u64(2)),
            ..Default::default()
        };
        assert!(
            !b.has_complete_transactions(),
            "one transaction may still be arriving"
        );
        let tail = b.split_open_transaction();
        assert!(tail.is_empty());
        assert_eq!(b.events.len(), 2);
    }
}
