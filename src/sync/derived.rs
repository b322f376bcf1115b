//! The derived-column worker: re-reads derived columns (formulas, person-name `name`, fields
//! never sent in change events) that change events cannot carry.
//!
//! # Data flow
//!
//! ```text
//!  channel batch: the row's _sfm_version moves past _sfm_derived_seen (same statement)
//!                                              │  every window (sync.derived_refresh_window_secs)
//!                                              v  rows waiting, found by a partial index
//!  sObject Collections retrieve (2,000 ids, derived fields only) ──> replica::derived::refresh
//!                                              + mark each row read for the version it saw
//!  every sync.derived_sweep_interval_secs, per object:
//!  count + REST or Bulk API 2.0 read of Id and the derived fields ──> replica::derived::apply
//! ```
//!
//! While a channel catches up a backlog (more than a window behind), passes wait: the stream's
//! changes come first, and a record the backlog changes many times is read once, after it.
//!
//! Waiting coalesces: a record changed a hundred times in a window is read once, and the cost
//! is ceil(changed records / 2,000) calls per object per window. The sweep (first due one
//! interval after the object is first seen, not at every start) catches what no event on the
//! record announces: formulas reading a parent's fields or the clock
//! (TODAY, NOW), and fields Salesforce derives from other records.
//!
//! # Why it cannot lose or undo anything
//!
//! It writes only derived columns, under their own version (Salesforce's `Date` of the read;
//! for a sweep, the `Date` known before the read began), never over a newer re-read or a
//! deleted row (see `replica::derived`). A row is marked read in the transaction that writes
//! what was read, and only for the stream version it had before the read was asked for; a
//! crash or a failed call leaves it waiting. A sweep that fails is retried at the next
//! window; one that is killed half-way wrote only values at least as new as those it replaced.

use super::SyncError;
use super::reader::{OrgReader, ReadOptions, SnapshotRows};
use crate::config::DerivedRefresh;
use crate::replica::schema::TableSchema;
use crate::replica::snapshot::row_from_json;
use crate::replica::{self, ApplySettings, ReplicaError, derived};
use crate::salesforce::soql::Query;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Most ids sObject Collections retrieve takes in one call.
const RETRIEVE_MAX_IDS: i64 = super::repair::RETRIEVE_MAX_IDS as i64;
/// How long a describe is trusted before the object is described again.
const DESCRIBE_TTL: Duration = Duration::from_secs(600);

pub struct DerivedWorker {
    reader: OrgReader,
    pool: deadpool_postgres::Pool,
    settings: ApplySettings,
    /// Each replicated object and how its derived columns are kept fresh.
    objects: Vec<(String, DerivedRefresh)>,
    window: Duration,
    /// `None`: no sweeps.
    sweep_every: Option<Duration>,
    /// Sweeps at or below this many records read over REST, above it over Bulk API 2.0.
    read: ReadOptions,
    tables: super::DescribedTables,
    /// The daemon's channels: re-reads wait while one catches up a backlog.
    health: Option<crate::telemetry::health::Health>,
    /// Objects whose leftovers in the first queue were moved into their rows.
    adopted: std::collections::HashSet<String>,
}

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Queued records whose derived columns were read again.
    pub refreshed: u64,
    /// Objects swept.
    pub swept: u64,
}

impl DerivedWorker {
    pub fn new(
        reader: OrgReader,
        pool: deadpool_postgres::Pool,
        settings: ApplySettings,
        cfg: &crate::config::Config,
    ) -> DerivedWorker {
        let sync = &cfg.sync;
        DerivedWorker {
            reader,
            pool,
            settings,
            objects: cfg
                .objects()
                .into_iter()
                .map(|o| {
                    let mode = cfg.derived_refresh(&o);
                    (o, mode)
                })
                .collect(),
            window: Duration::from_secs(sync.derived_refresh_window_secs.max(1)),
            sweep_every: (sync.derived_sweep_interval_secs > 0)
                .then(|| Duration::from_secs(sync.derived_sweep_interval_secs)),
            read: ReadOptions {
                bulk_threshold: sync.repair_bulk_threshold,
                chunk_rows: sync.repair_chunk_rows,
            },
            tables: super::DescribedTables::new(DESCRIBE_TTL, "derived columns"),
            health: None,
            adopted: Default::default(),
        }
    }

    /// Re-reads wait while a channel of `health` is catching up: the stream's own changes
    /// come first, and records changed many times during a backlog are then read once.
    pub fn with_health(mut self, health: crate::telemetry::health::Health) -> DerivedWorker {
        self.health = Some(health);
        self
    }

    /// Runs until `shutdown`: a pass every window.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.window) => {}
            }
            if self
                .health
                .as_ref()
                .is_some_and(|h| h.catching_up(self.window))
            {
                continue;
            }
            self.pass().await;
        }
    }

    /// Re-reads every queued record, then sweeps the objects whose sweep is due. Failures are
    /// logged and retried at the next pass; one object's failure does not hold up the others.
    pub async fn pass(&mut self) -> Pass {
        let mut done = Pass::default();
        let objects = self.objects.clone();
        for (object, mode) in &objects {
            if *mode == DerivedRefresh::Off {
                continue;
            }
            // Changed records are re-read only in on_change mode; otherwise the sweep marks
            // them read.
            if *mode == DerivedRefresh::OnChange {
                match self.refresh(object).await {
                    Ok(n) => done.refreshed += n,
                    Err(e) => tracing::warn!(object = %object, error = %e,
                        "re-reading derived columns failed; retrying at the next window"),
                }
            }
            match self.sweep_if_due(object).await {
                Ok(true) => done.swept += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(object = %object, error = %e,
                    "sweeping derived columns failed; retrying at the next window"),
            }
        }
        done
    }

    /// The table of `object` (described again after [`DESCRIBE_TTL`], or when `fresh`).
    async fn table(&mut self, object: &str, fresh: bool) -> Result<Arc<TableSchema>, SyncError> {
        let rest = self.reader.rest().clone();
        self.tables
            .get(&rest, &self.pool, &self.settings, object, fresh)
            .await
    }

    /// Re-reads the derived columns of `object`'s records that the stream changed since
    /// their last read, 2,000 per call; returns how many records were marked read.
    pub async fn refresh(&mut self, object: &str) -> Result<u64, SyncError> {
        let table = self.table(object, false).await?;
        if !table.changes_derive() {
            return Ok(0);
        }
        if self.adopted.insert(object.to_string()) {
            let client = self.pool.get().await.map_err(ReplicaError::from)?;
            let moved = derived::adopt_queue(&client, &self.settings, &table).await?;
            if moved > 0 {
                tracing::info!(
                    object,
                    records = moved,
                    "re-reads queued by an earlier version moved into their rows"
                );
            }
        }
        let projection = table.derived_projection();
        let mut total = 0;
        loop {
            let stale = {
                let client = self.pool.get().await.map_err(ReplicaError::from)?;
                derived::stale(
                    &client,
                    &self.settings.data_schema,
                    &table.table,
                    RETRIEVE_MAX_IDS,
                )
                .await?
            };
            if stale.is_empty() {
                return Ok(total);
            }
            let ids: Vec<String> = stale.iter().map(|q| q.id.clone()).collect();
            // A table that follows changes has a formula or a person name: never no fields.
            let mut fields = vec!["Id".to_string()];
            fields.extend(projection.columns.iter().map(|c| c.field.clone()));
            let retrieved = self
                .reader
                .rest()
                .retrieve(object, &ids, &fields)
                .await
                .map_err(SyncError::Source)?;
            // An answer without a `Date` cannot be ordered against other reads: write
            // nothing rather than guess, and leave the records waiting.
            let Some(version_ms) = retrieved.answered_ms.or(retrieved.read_floor_ms) else {
                return Err(SyncError::BadAnswer {
                    channel: object.to_string(),
                    message: "sObject Collections answered without a Date header".to_string(),
                });
            };
            let rows = retrieved
                .records
                .into_iter()
                .flatten()
                .map(|record| row_from_json(&projection, &record))
                .collect::<Result<Vec<_>, _>>()
                .map_err(SyncError::Replica)?;
            let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
            let tx = replica::begin(&mut client, "derived re-read").await?;
            let (written, settled) =
                derived::refresh(&tx, &self.settings, &projection, &rows, version_ms, &stale)
                    .await?;
            tx.commit()
                .await
                .map_err(ReplicaError::pg("commit derived re-read"))?;
            tracing::debug!(
                object,
                waiting = stale.len(),
                written,
                settled,
                "derived columns re-read"
            );
            total += settled;
            // Rows a batch held locked or changed meanwhile wait for the next window.
            if (stale.len() as i64) < RETRIEVE_MAX_IDS || settled == 0 {
                return Ok(total);
            }
        }
    }

    /// Sweeps `object` when its mode sweeps and the last sweep started longer ago than the
    /// interval; returns whether it swept.
    async fn sweep_if_due(&mut self, object: &str) -> Result<bool, SyncError> {
        let Some(every) = self.sweep_every else {
            return Ok(false);
        };
        let since = {
            let client = self.pool.get().await.map_err(ReplicaError::from)?;
            let ctl = &self.settings.control_schema;
            if derived::schedule_sweeps(&client, ctl, object).await? {
                // First sight: what a backfill or the stream wrote is fresh; sweep later.
                return Ok(false);
            }
            derived::since_last_sweep(&client, ctl, object).await?
        };
        if since.is_some_and(|s| s < every.as_secs_f64()) {
            return Ok(false);
        }
        // Described afresh: a formula field added in the org gets its column here, and the
        // new column is read in full (`ensure_table`).
        let table = self.table(object, true).await?;
        if !table.has_derived() {
            return Ok(false);
        }
        self.sweep(&table).await?;
        Ok(true)
    }

    /// Reads `Id` and the derived fields of every record of `table` and writes them.
    pub async fn sweep(&mut self, table: &TableSchema) -> Result<u64, SyncError> {
        let ctl = self.settings.control_schema.clone();
        let object = table.object.clone();
        {
            let client = self.pool.get().await.map_err(ReplicaError::from)?;
            derived::sweep_started(&client, &ctl, &object).await?;
        }
        let result = self.sweep_rows(table).await;
        let client = self.pool.get().await.map_err(ReplicaError::from)?;
        let outcome = match &result {
            Ok(n) => Ok(*n as i64),
            Err(e) => Err(e.to_string()),
        };
        derived::sweep_ended(&client, &ctl, &object, outcome).await?;
        if let Ok(n) = &result {
            tracing::info!(object = %object, records = n, "derived columns swept");
        }
        result
    }

    async fn sweep_rows(&mut self, table: &TableSchema) -> Result<u64, SyncError> {
        let projection = Arc::new(table.derived_projection());
        let mut fields = vec!["Id".to_string(), "SystemModstamp".to_string()];
        if table.describe().field("IsDeleted").is_some() {
            fields.push("IsDeleted".to_string());
        }
        fields.extend(projection.columns.iter().map(|c| c.field.clone()));
        let query = Query::select(&fields, &table.object);
        let counted = self.reader.count(&query).await?;
        // Every row of this read is at least as new as the count's answer.
        let version_ms = counted
            .read_at_ms
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
        let mut read = self
            .reader
            .open(&counted, self.read, SnapshotRows::new(projection.clone()))
            .await?;
        let mut total = 0;
        while let Some(chunk) = read.next().await {
            let chunk = chunk?;
            let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
            let tx = replica::begin(&mut client, "derived sweep").await?;
            derived::apply(&tx, &self.settings, &projection, &chunk.rows, version_ms).await?;
            tx.commit()
                .await
                .map_err(ReplicaError::pg("commit derived sweep"))?;
            total += chunk.rows.len() as u64;
            if chunk.last {
                break;
            }
        }
        read.delete_job().await;
        Ok(total)
    }
}
