//! The apply side of one `Subscribe` call: commits what the receiving side queued, in stream
//! order, one transaction per batch (rows, repairs, dead letters and the checkpoint).
//!
//! # Two batches in flight
//!
//! Under a backlog the next batch's transaction starts while the one before still runs. It
//! first writes only the records that batch does not write, so the two never wait for each
//! other's row locks and every record sees its changes in stream order. Only once the batch
//! before has ended does it write the shared records, queue its repairs and move the
//! checkpoint, and it moves it only from the position that batch committed
//! ([`checkpoint::advance`]): it cannot commit unless the batch before did, and the stored
//! position never skips a batch.
//!
//! # Why nothing hangs
//!
//! A batch waits for the one before inside Postgres, by asking for that batch's advisory lock
//! ([`batch_lock`]), never on a signal in the daemon. A lock cycle through a third
//! transaction (a repair, a backfill, DDL) is therefore one the deadlock detector sees and
//! breaks, as a transient error, instead of leaving all three waiting. The batch's own task
//! then reports whether the batch before committed.
//!
//! # What an idle channel does
//!
//! A keepalive position, and an idle channel, wait for the batch in flight: with nothing in
//! flight the task says it is idle, which the receiving side uses to apply what it has at
//! once (the latency path).

use super::AppliedBatch;
use super::batch::{Applied, Batch};
use crate::model::ReplayId;
use crate::replica::apply::{MergePlan, RecordKeys, execute, lock_objects};
use crate::replica::ownership::{self, Fence};
use crate::replica::repair_queue::{self, RepairRequest};
use crate::replica::{self, ApplySettings, ReplicaError, checkpoint, dead_letters, locks};
use crate::sync::{AbortOnDrop, SyncError};
use crate::telemetry;
use crate::telemetry::health::ChannelHealth;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot};

/// What the decode side hands the apply side, in stream order.
pub(super) enum Work {
    /// A batch to commit, with its rows already planned.
    Batch(Box<(Batch, Applied, MergePlan)>),
    /// A keepalive: everything up to this topic position was delivered.
    Position(ReplayId),
}

/// The apply side of one `Subscribe` call: commits what the decode side queued, in order.
pub(super) struct Applier {
    pub(super) name: String,
    /// The ownership every commit is checked against.
    pub(super) fence: Fence,
    pub(super) objects: Vec<String>,
    pub(super) pool: deadpool_postgres::Pool,
    pub(super) settings: ApplySettings,
    pub(super) observer: Option<broadcast::Sender<AppliedBatch>>,
    pub(super) started_after: Option<ReplayId>,
    /// The position committed last (by a batch or a keepalive).
    pub(super) committed: Option<ReplayId>,
    /// Whether the task is waiting for work, and the signal that it just started to.
    pub(super) idle: Arc<Idle>,
    /// Batches started so far: picks each batch's advisory lock.
    pub(super) started: u64,
    /// Where commits and the batch in flight are reported.
    pub(super) health: ChannelHealth,
}

/// The apply task's idleness, watched by the decode side to apply at once what it can.
#[derive(Default)]
pub(super) struct Idle {
    pub(super) waiting: std::sync::atomic::AtomicBool,
    pub(super) became: tokio::sync::Notify,
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
    pub(super) async fn run(mut self, mut work: mpsc::Receiver<Work>) -> Result<(), SyncError> {
        let mut in_flight: Option<InFlight> = None;
        loop {
            let w = match work.try_recv() {
                Ok(w) => w,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => match in_flight.as_mut() {
                    None => {
                        // Nothing in flight: waiting for work is not being stuck.
                        self.health.idle();
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

    /// Persists a keepalive's topic position (nothing is pending before it) and that the
    /// channel is caught up now.
    async fn keepalive(&mut self, latest: ReplayId) -> Result<(), SyncError> {
        let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
        checkpoint::caught_up(
            &mut client,
            &self.settings.control_schema,
            &self.fence,
            &latest,
        )
        .await?;
        if !latest.0.is_empty() {
            self.committed = Some(latest);
        }
        let position = self.committed.as_ref().map_or(&[][..], |r| r.0.as_slice());
        self.health.committed(position, None);
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
        self.health.applying();
        let job = BatchJob {
            name: self.name.clone(),
            fence: self.fence.clone(),
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
        self.health.committed(&c.last.0, c.last_commit_ms);
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
        telemetry::record_batch(c.started.elapsed().as_secs_f64());
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
    fence: Fence,
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
        // Read committed: the rest of a batch must see what the batch before committed while
        // this transaction ran.
        let tx = replica::begin(&mut client, "batch").await?;
        locks::hold_batch(&tx, lock).await?;
        // Before any row lock, so every writer takes the object locks in the same order.
        lock_objects(&tx, settings, &plan).await?;
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
        let fence = &self.fence;
        match &after {
            None => checkpoint::save(&tx, &settings.control_schema, fence, &cp).await?,
            Some(from) => {
                if !checkpoint::advance(&tx, &settings.control_schema, fence, from, &cp).await? {
                    return Err(SyncError::CheckpointMoved {
                        channel: name.clone(),
                        expected: from.clone(),
                    });
                }
            }
        }
        if settings.audit_batches {
            let first = applied.replay_ids.first().map(|r| r.0.as_slice());
            let n = applied.replay_ids.len();
            ownership::audit_batch(&tx, &settings.control_schema, fence, first, &last.0, n).await?;
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
