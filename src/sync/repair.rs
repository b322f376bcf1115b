//! The repair worker: drains the repair queue by reading the truth over REST.
//!
//! # Data flow
//!
//! Record repairs fetch exactly the queued ids with sObject Collections (up to 2,000 a call,
//! per object); ids it cannot return are looked up with queryAll to tell a deleted record
//! (recycle bin, `IsDeleted`) from one that is gone for good. Entity repairs re-read every
//! record of the object whose `SystemModstamp` falls in the window, deleted ones included:
//! through the org reader ([`super::reader`]): REST query paging, or a Bulk API 2.0
//! `queryAll` job when the window holds more than `repair_bulk_threshold` records, a chunk
//! per transaction.
//!
//! # Why nothing is lost or undone
//!
//! A repair is claimed with a lease and deleted from the queue
//! in the transaction that applies its rows, and only if nobody asked for it again after the
//! claim; a crash mid-repair leaves it queued. Rows go through the snapshot merge, whose
//! version guard keeps any newer change the stream has already applied. The worker runs beside
//! the channel tasks and never holds a lock they wait on while it talks to Salesforce.
//!
//! # What a failure does
//!
//! The error policy decides ([`super::policy::repair`]): a transient failure puts the repair
//! back, due after the backoff of its attempts; a definite one (an object or field the user
//! cannot read, a value that does not fit) parks it with its error, shown by `status` and
//! `sfmirror_repairs_parked`, until `sfmirror requeue` or a start under a changed
//! configuration.

use crate::model::{ChangeEvent, ChangeHeader, ChangeType};
use crate::replica::ApplySettings;
use crate::replica::apply::apply_events;
use crate::replica::repair_queue::{self, Repair, RepairKind};
use crate::replica::schema::TableSchema;
use crate::replica::snapshot::{SnapshotRow, apply_snapshot, row_from_json};
use crate::replica::{self, ReplicaError, repair_queue::enqueue};
use crate::salesforce::soql::Query;
use crate::sync::SyncError;
use crate::sync::policy::{self, RepairAction};
use crate::sync::reader::{OrgReader, ReadOptions, SnapshotRows, Via, min_floor, snapshot_fields};
use crate::telemetry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most ids sObject Collections retrieve takes in one call.
pub const RETRIEVE_MAX_IDS: usize = 2_000;
/// Ids per queryAll `WHERE Id IN (...)` lookup (keeps the URL short).
const LOOKUP_IDS: usize = 200;
/// How long a claim lasts before another worker may take the repair over.
const LEASE_SECS: i64 = 600;

pub struct RepairWorker {
    reader: OrgReader,
    /// Entity windows above `bulk_threshold` records are read over Bulk API 2.0,
    /// `chunk_rows` rows per chunk (and per transaction).
    read: ReadOptions,
    pool: deadpool_postgres::Pool,
    settings: ApplySettings,
    /// Tables from describe, with when they were described (see [`Self::table`]).
    tables: super::DescribedTables,
    idle: Duration,
    /// The fingerprint of the configuration, kept with repairs it parks.
    config: String,
    /// Objects whose repair gauges were set, so that a drained one is set back to 0.
    reported: HashSet<String>,
    /// Where the total pending is reported (systemd's status line).
    health: Option<crate::telemetry::health::Health>,
}

/// Records of one chunk that fail alone (a value that cannot be stored) and are set aside
/// before the rest of the chunk is settled together.
const SINGLED_OUT: usize = 10;

/// The record a failure is about, when it names one.
fn record_of(e: &SyncError) -> Option<&str> {
    use crate::sync::reader::ReadError;
    match e {
        SyncError::Replica(ReplicaError::Data { id, .. })
        | SyncError::Read(ReadError::Replica(ReplicaError::Data { id, .. })) => Some(id),
        _ => None,
    }
}

/// How long a describe serves record repairs. Fields come and go in the org: a stale table
/// would leave new columns empty, or ask for a deleted field and fail every repair of the
/// object.
const DESCRIBE_TTL: Duration = Duration::from_secs(60);

impl RepairWorker {
    pub fn new(
        reader: OrgReader,
        pool: deadpool_postgres::Pool,
        settings: ApplySettings,
        idle: Duration,
    ) -> RepairWorker {
        RepairWorker {
            reader,
            read: ReadOptions {
                bulk_threshold: crate::config::DEFAULT_REPAIR_BULK_THRESHOLD,
                chunk_rows: 10_000,
            },
            pool,
            settings,
            tables: super::DescribedTables::new(DESCRIBE_TTL, "repair"),
            idle,
            config: String::new(),
            reported: HashSet::new(),
            health: None,
        }
    }

    /// Reports the total of pending repairs to `health`.
    pub fn with_health(mut self, health: crate::telemetry::health::Health) -> RepairWorker {
        self.health = Some(health);
        self
    }

    /// Parks repairs that fail definitely under the configuration `fingerprint`
    /// ([`crate::config::Config::fingerprint`]).
    pub fn with_config(mut self, fingerprint: String) -> RepairWorker {
        self.config = fingerprint;
        self
    }

    /// Reads entity windows above `threshold` records over Bulk API 2.0, `chunk_rows` rows at
    /// a time.
    pub fn with_bulk(mut self, threshold: u64, chunk_rows: u32) -> RepairWorker {
        self.read = ReadOptions {
            bulk_threshold: threshold,
            chunk_rows: chunk_rows.max(1),
        };
        self
    }

    /// Drains the queue until `shutdown`; sleeps `idle` when nothing is due.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let worked = match self.drain_once().await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::warn!(error = %e, "repair worker: will retry");
                    false
                }
            };
            self.report_pending().await;
            if worked {
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.idle) => {}
            }
        }
    }

    /// Sets the pending and parked gauges of every object, 0 for those that drained.
    async fn report_pending(&mut self) {
        let Ok(client) = self.pool.get().await else {
            return;
        };
        let Ok(pending) = repair_queue::pending(&client, &self.settings.control_schema).await
        else {
            return;
        };
        let mut seen = HashSet::new();
        if let Some(h) = &self.health {
            h.repairs_pending(pending.iter().map(|p| p.pending).sum());
        }
        for p in pending {
            telemetry::record_repairs_pending(&p.object, p.pending, p.parked);
            seen.insert(p.object);
        }
        for drained in self.reported.difference(&seen) {
            telemetry::record_repairs_pending(drained, 0, 0);
        }
        self.reported = seen;
    }

    /// Claims and processes one round of due repairs; returns how many it handled.
    pub async fn drain_once(&mut self) -> Result<usize, SyncError> {
        let claimed = {
            let client = self.pool.get().await.map_err(ReplicaError::from)?;
            repair_queue::claim(
                &client,
                &self.settings.control_schema,
                RETRIEVE_MAX_IDS as i64,
                LEASE_SECS,
            )
            .await?
        };
        let n = claimed.len();
        let mut records: BTreeMap<String, Vec<&Repair>> = BTreeMap::new();
        let mut entities = Vec::new();
        for r in &claimed {
            match &r.kind {
                RepairKind::Record(_) => records.entry(r.object.clone()).or_default().push(r),
                RepairKind::Entity(_) => entities.push(r),
            }
        }
        for (object, group) in records {
            for chunk in group.chunks(RETRIEVE_MAX_IDS) {
                self.repair_record_chunk(&object, chunk.to_vec()).await?;
            }
        }
        for r in entities {
            let outcome = self.repair_entity(r).await;
            self.settle(&[r], "entity", outcome).await?;
        }
        Ok(n)
    }

    /// Repairs a chunk of records of `object`. A record whose value cannot be stored fails the
    /// chunk's transaction; it is settled alone (parked) and the others are repaired without
    /// it, up to [`SINGLED_OUT`] records a chunk, so one bad record does not hold back the rest.
    async fn repair_record_chunk(
        &mut self,
        object: &str,
        mut chunk: Vec<&Repair>,
    ) -> Result<(), SyncError> {
        let mut singled_out = 0;
        loop {
            let outcome = self.repair_records(object, &chunk).await;
            let culprit = match &outcome {
                Err(e) if chunk.len() > 1 && singled_out < SINGLED_OUT => {
                    record_of(e).and_then(|id| {
                        chunk
                            .iter()
                            .position(|r| matches!(&r.kind, RepairKind::Record(x) if x == id))
                    })
                }
                _ => None,
            };
            let Some(at) = culprit else {
                return self.settle(&chunk, "record", outcome).await;
            };
            let bad = chunk.remove(at);
            self.settle(&[bad], "record", outcome).await?;
            singled_out += 1;
        }
    }

    /// Records the outcome of a repair attempt: what failed goes back with a backoff, or is
    /// parked when trying again cannot help ([`policy::repair`]).
    async fn settle(
        &self,
        repairs: &[&Repair],
        kind: &'static str,
        outcome: Result<(), SyncError>,
    ) -> Result<(), SyncError> {
        let e = match outcome {
            Ok(()) => {
                telemetry::record_repairs(kind, "ok", repairs.len());
                return Ok(());
            }
            Err(e) => e,
        };
        let object = repairs.first().map(|r| r.object.as_str()).unwrap_or("?");
        let client = self.pool.get().await.map_err(ReplicaError::from)?;
        let ctl = &self.settings.control_schema;
        match policy::repair(&e) {
            RepairAction::RetryLater => {
                tracing::warn!(object, kind, count = repairs.len(), error = %e,
                    "repair failed; retrying with backoff");
                telemetry::record_repairs(kind, "error", repairs.len());
                repair_queue::fail(&client, ctl, repairs, &e.to_string()).await?;
            }
            RepairAction::Park => {
                tracing::error!(object, kind, count = repairs.len(), error = %e,
                    "repair failed in a way retrying cannot fix: parked; fix the cause, then \
                     `sfmirror requeue` (a restart with a changed configuration requeues it too)");
                telemetry::record_repairs(kind, "parked", repairs.len());
                repair_queue::park(&client, ctl, repairs, &e.to_string(), &self.config).await?;
            }
        }
        Ok(())
    }

    /// `object`'s table as describe has it now: described afresh for an entity repair (`fresh`,
    /// one call beside a whole window of records), and at most [`DESCRIBE_TTL`] old otherwise.
    async fn table(&mut self, object: &str, fresh: bool) -> Result<Arc<TableSchema>, SyncError> {
        let rest = self.reader.rest().clone();
        self.tables
            .get(&rest, &self.pool, &self.settings, object, fresh)
            .await
    }

    async fn repair_records(&mut self, object: &str, repairs: &[&Repair]) -> Result<(), SyncError> {
        let table = self.table(object, false).await?;
        let ids: Vec<String> = repairs
            .iter()
            .filter_map(|r| match &r.kind {
                RepairKind::Record(id) => Some(id.clone()),
                RepairKind::Entity(_) => None,
            })
            .collect();
        let fields = snapshot_fields(&table);
        let retrieved = self.reader.rest().retrieve(object, &ids, &fields).await?;
        let mut read_floor = retrieved.read_floor_ms;
        let found = retrieved.records;
        let mut rows = Vec::new();
        let mut missing = Vec::new();
        for (id, rec) in ids.iter().zip(found) {
            match rec {
                Some(r) => rows.push(row_from_json(&table, &r)?),
                None => missing.push(id.clone()),
            }
        }
        // Not retrievable: deleted (still in the recycle bin) or gone for good.
        let mut gone = Vec::new();
        for chunk in missing.chunks(LOOKUP_IDS) {
            let query = Query::select(&fields, object).ids(chunk);
            let mut read =
                self.reader
                    .open_rest(&query, LOOKUP_IDS as u32, SnapshotRows::new(table.clone()));
            let mut seen = Vec::new();
            while let Some(part) = read.next().await {
                let part = part?;
                read_floor = min_floor(read_floor, part.read_floor_ms);
                seen.extend(part.rows);
            }
            for id in chunk {
                if !seen.iter().any(|r: &SnapshotRow| &r.id == id) {
                    gone.push(id.clone());
                }
            }
            rows.extend(seen);
        }
        let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
        let tx = replica::begin(&mut client, "repair").await?;
        let outcome = apply_snapshot(&tx, &self.settings, &table, &rows, read_floor).await?;
        if !gone.is_empty() {
            // Gone from the org (purged or hard-deleted): delete as of now.
            let now = chrono::Utc::now().timestamp_millis();
            let tables: HashMap<String, Arc<TableSchema>> =
                [(object.to_string(), table.clone())].into();
            let event = synthetic_delete(object, gone, now);
            apply_events(&tx, &self.settings, &tables, vec![event]).await?;
        }
        enqueue(
            &tx,
            &self.settings.control_schema,
            "repair",
            None,
            &outcome.repairs,
        )
        .await?;
        repair_queue::complete(&tx, &self.settings.control_schema, repairs).await?;
        tx.commit()
            .await
            .map_err(ReplicaError::pg("commit repair"))?;
        tracing::info!(object, records = ids.len(), "record repairs applied");
        Ok(())
    }

    /// Re-reads every record of the object changed since the repair's time, chunk by chunk,
    /// each chunk in its own transaction (a crash repeats the repair, which the version guard
    /// makes harmless); the last chunk removes the repair from the queue. A Bulk job is
    /// deleted afterwards whatever happened.
    async fn repair_entity(&mut self, repair: &Repair) -> Result<(), SyncError> {
        let object = repair.object.as_str();
        let RepairKind::Entity(since_ms) = repair.kind else {
            return Ok(());
        };
        let table = self.table(object, true).await?;
        let mut query = Query::select(&snapshot_fields(&table), object);
        // The window is on SystemModstamp; an object without audit fields is re-read whole.
        let window_field = ["SystemModstamp", "LastModifiedDate"]
            .into_iter()
            .find(|f| table.describe().field(f).is_some());
        if let Some(field) = window_field
            && since_ms > 0
        {
            query = query.since(field, since_ms);
        }
        let counted = self.reader.count(&query).await?;
        let mut read = self
            .reader
            .open(&counted, self.read, SnapshotRows::new(table.clone()))
            .await?;
        let applied = async {
            let mut total = 0usize;
            while let Some(chunk) = read.next().await {
                let chunk = chunk?;
                total += chunk.rows.len();
                self.apply_window_rows(
                    repair,
                    &table,
                    &chunk.rows,
                    chunk.read_floor_ms,
                    chunk.last,
                )
                .await?;
            }
            Ok::<usize, SyncError>(total)
        }
        .await;
        read.delete_job().await;
        let total = applied?;
        let via = match read.via() {
            Via::Bulk { .. } => "Bulk API",
            Via::Rest => "REST",
        };
        tracing::info!(object, rows = total, since_ms, via, "entity repair applied");
        Ok(())
    }

    /// Applies rows of an entity window in one transaction, with the record repairs the merge
    /// asks for; the last part of the window also removes the repair from the queue.
    async fn apply_window_rows(
        &self,
        repair: &Repair,
        table: &TableSchema,
        rows: &[SnapshotRow],
        floor: Option<i64>,
        last: bool,
    ) -> Result<(), SyncError> {
        let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
        let tx = replica::begin(&mut client, "repair").await?;
        let outcome = apply_snapshot(&tx, &self.settings, table, rows, floor).await?;
        enqueue(
            &tx,
            &self.settings.control_schema,
            "repair",
            None,
            &outcome.repairs,
        )
        .await?;
        if last {
            repair_queue::complete(&tx, &self.settings.control_schema, &[repair]).await?;
        } else {
            repair_queue::renew(&tx, &self.settings.control_schema, repair, LEASE_SECS).await?;
        }
        tx.commit()
            .await
            .map_err(ReplicaError::pg("commit repair"))?;
        Ok(())
    }
}

/// A DELETE change for records that no longer exist anywhere in the org.
fn synthetic_delete(object: &str, ids: Vec<String>, now_ms: i64) -> ChangeEvent {
    ChangeEvent {
        replay_id: Default::default(),
        schema_id: "".into(),
        header: ChangeHeader {
            entity_name: object.into(),
            record_ids: ids,
            change_type: ChangeType::Delete,
            change_origin: String::new(),
            transaction_key: String::new(),
            sequence_number: 0,
            commit_timestamp: now_ms,
            commit_number: 0,
            commit_user: String::new(),
            changed_fields: Vec::new(),
            nulled_fields: Vec::new(),
            diff_fields: Vec::new(),
        },
        fields: Vec::new(),
        schema_fields: Arc::from(Vec::new()),
    }
}
