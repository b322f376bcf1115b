//! The receiving side of one `Subscribe` call: reads the stream, decodes every event with the
//! schema its id names (invariant 5), prepares each object's table against new schemas,
//! dead-letters what cannot be decoded, and hands batches to the apply side in stream order.
//! It never writes rows itself; the only statements it runs are the table preparations and,
//! when the channel starts at LATEST, the repairs that cover the jump.

use super::batch::{Applied, Batch, DeadLetter};
use super::pipeline::{Idle, Work};
use super::{ChannelTask, UNMAPPED_RECHECK};
use crate::model::ReplayId;
use crate::replica::apply::plan_events;
use crate::replica::repair_queue::{self, RepairRequest};
use crate::replica::schema::TableSchema;
use crate::replica::{ReplicaError, checkpoint, dead_letters, sync_state};
use crate::salesforce::SourceError;
use crate::sync::SyncError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

impl ChannelTask {
    /// Reads the stream, decodes and batches, and queues batches for the apply task until
    /// shutdown, a stream error, or the apply task stopping. The last partial batch is always
    /// queued: events already received are valid and are committed before reconnecting.
    pub(super) async fn receive(
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
                self.health
                    .keepalive((!latest.0.is_empty()).then_some(latest.0.as_slice()));
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
            if let Some(last) = &batch.last_replay {
                self.health.received(&last.0);
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
    pub(super) async fn queue(
        &self,
        batch: &mut Batch,
        work: &mpsc::Sender<Work>,
    ) -> Result<bool, SyncError> {
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
    pub(super) async fn cover_jump_to_latest(
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
        checkpoint::save(&tx, &settings.control_schema, &self.fence, &marker).await?;
        tx.commit()
            .await
            .map_err(ReplicaError::pg("commit start-up repairs"))?;
        tracing::info!(channel = %self.cfg.name, objects = repairs.len(), since = ?since,
            "started at LATEST; queued re-reads covering what came before");
        Ok(())
    }

    /// Decodes one event into the batch; undecodable payloads become dead letters.
    pub(super) async fn decode_into(
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

    pub(super) fn dead_letter(
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
    pub(super) async fn prepare_table(
        &mut self,
        object: &str,
        paths: &[Arc<str>],
    ) -> Result<bool, SyncError> {
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
        crate::sync::ensure_table(&client, &self.deps.apply, &table, &self.cfg.name).await?;
        tracing::info!(object, table = %table.table, columns = table.columns.len(), "table ready");
        self.tables.insert(object.to_string(), table);
        Ok(still_missing.is_empty())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
