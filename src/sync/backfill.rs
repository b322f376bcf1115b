//! One-shot snapshots of configured objects into the replica (`sfmirror backfill`).
//!
//! # Data flow
//!
//! For each object: describe it, make sure its table has a column for every field, note the
//! time, then read `SELECT Id, <every column's field> FROM X [WHERE SystemModstamp >= since]`
//! through the org reader ([`super::reader`]: counted, over Bulk API 2.0 above the threshold,
//! REST query paging below, one chunk read ahead, `queryAll` so that records in the recycle
//! bin arrive as deletions). Each chunk is one transaction holding the version-guarded
//! snapshot merge, the record repairs the merge asks for, and the object's progress in
//! `object_sync_state` (start time, Bulk job id, and the locator of the next chunk).
//!
//! # Why this is safe while the daemon runs
//!
//! Every row goes through
//! [`crate::replica::snapshot::apply_snapshot`], which never replaces a row with an older
//! version and never resurrects a tombstoned record, so the stream and the snapshot can
//! interleave in any order (invariant 3). Rows changed in the snapshot's own second are queued
//! for one more read in the chunk's transaction. A chunk holds its row locks only until it
//! commits, and no table lock is taken unless columns are missing (then the table gets them,
//! as the daemon would do itself). An advisory lock keeps two backfills of one object apart;
//! the daemon never takes it. In hard delete mode a chunk also holds the object's write lock
//! exclusively ([`crate::replica::locks`]): stream batches writing the object wait for the
//! chunk to commit (a fraction of a second), so that neither side can bring back a record
//! the other deleted.
//!
//! # Why resuming is safe
//!
//! The locator recorded with a chunk is the one of the next chunk, and
//! it commits with the chunk's rows, so after an interruption the job is read again from
//! exactly the first chunk not applied (and re-applying a chunk would be harmless anyway). A
//! job that no longer exists, or whose columns no longer cover the table, restarts the object.
//! Only full snapshots record their job: a `--since` window is short by nature, and resuming
//! another run's job could read a narrower window than asked for.
//!
//! # What completion records
//!
//! `snapshot_started_at` is the time taken before the count, so
//! every change made before it is in the replica. A `--since` run only moves it when its
//! window reaches back to the previous complete snapshot's start (otherwise older changes
//! might be missing); it always records `snapshot_completed_at` and `snapshot_rows`.
//! Records purged from the org (hard-deleted) are never seen by a snapshot: `verify` finds
//! them.

use crate::backoff::Backoff;
use crate::config::{Config, UnknownObject};
use crate::replica::ApplySettings;
use crate::replica::schema::TableSchema;
use crate::replica::snapshot::{SnapshotRow, apply_snapshot};
use crate::replica::{self, ReplicaError, locks, repair_queue, sync_state};
use crate::salesforce::SourceError;
use crate::salesforce::bulk::{self, JobState, Operation};
use crate::salesforce::soql::Query;
use crate::sync::reader::{
    OrgReader, Read, ReadError, ReadOptions, SnapshotRows, Via, snapshot_fields,
};
use crate::sync::setup::{self, Setup};
use crate::telemetry;
use chrono::{DateTime, Utc};
use std::fmt;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Objects with more records than this are read over Bulk API 2.0; smaller ones over REST.
pub const DEFAULT_BULK_THRESHOLD: u64 = 10_000;
/// Rows per transaction (and per Bulk result chunk).
pub const DEFAULT_CHUNK_ROWS: u32 = 10_000;
/// Attempts per object when errors are transient; each resumes where the last one stopped.
const MAX_ATTEMPTS: u32 = 5;
/// Interval of progress log lines when stderr is not a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// The `channel` noted on repairs a backfill queues.
const REPAIR_ORIGIN: &str = "backfill";

/// Errors of a backfill, transient (retried with backoff, resuming) or definite.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    UnknownObject(#[from] UnknownObject),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{object}: {message}")]
    Unsupported { object: String, message: String },
    #[error("{object}: Bulk API result not understood: {message}")]
    BadResult { object: String, message: String },
    #[error(
        "{object}: another backfill of this object is running against this replica; wait for \
         it to finish"
    )]
    Busy { object: String },
    #[error("{object}: interrupted; run the backfill again to resume")]
    Interrupted { object: String },
}

impl BackfillError {
    pub fn is_transient(&self) -> bool {
        match self {
            BackfillError::Source(e) => e.is_transient(),
            BackfillError::Replica(e) => e.is_transient(),
            BackfillError::Read(e) => e.is_transient(),
            BackfillError::UnknownObject(_)
            | BackfillError::Unsupported { .. }
            | BackfillError::BadResult { .. }
            | BackfillError::Busy { .. }
            | BackfillError::Interrupted { .. } => false,
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A progress bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// Periodic `info` log lines with rows and rate.
    Log,
    /// Nothing but the start and end of each object.
    Quiet,
}

/// What a chunk hook is told after each committed chunk.
#[derive(Debug, Clone)]
pub struct ChunkProgress {
    pub object: String,
    /// Rows of this chunk.
    pub rows: usize,
    /// Rows applied for this object so far in this run.
    pub applied: u64,
    /// Rows the whole snapshot reads (Bulk job size or REST count).
    pub total: u64,
    /// The Bulk job being read, if any.
    pub job_id: Option<String>,
}

/// Called after each committed chunk (progress reporting, tests).
pub type ChunkHook = Arc<dyn Fn(&ChunkProgress) + Send + Sync>;

/// Everything a backfill run can be told.
#[derive(Clone)]
pub struct BackfillOptions {
    /// Objects to snapshot; empty means every object of every channel.
    pub objects: Vec<String>,
    /// Only records with `SystemModstamp` at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Objects with more records than this go over Bulk API 2.0.
    pub bulk_threshold: u64,
    /// Rows per transaction and per Bulk result chunk.
    pub chunk_rows: u32,
    pub progress: Progress,
    /// Stops between chunks; the object is reported interrupted and resumes next time.
    pub cancel: CancellationToken,
    pub on_chunk: Option<ChunkHook>,
    /// First and longest delay between Bulk job polls.
    pub bulk_poll: (Duration, Duration),
}

impl BackfillOptions {
    pub fn new(objects: Vec<String>, since: Option<DateTime<Utc>>) -> BackfillOptions {
        BackfillOptions {
            objects,
            since,
            bulk_threshold: DEFAULT_BULK_THRESHOLD,
            chunk_rows: DEFAULT_CHUNK_ROWS,
            progress: Progress::Auto,
            cancel: CancellationToken::new(),
            on_chunk: None,
            bulk_poll: (Duration::from_millis(250), Duration::from_secs(10)),
        }
    }
}

/// How an object's records were read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Rest,
    Bulk,
}

/// What happened to one object.
#[derive(Debug)]
pub struct ObjectReport {
    pub object: String,
    pub method: Option<Method>,
    pub job_id: Option<String>,
    /// Rows applied by this run (a resumed run counts only what it applied).
    pub rows_applied: u64,
    /// Rows of the whole snapshot.
    pub total_rows: u64,
    /// Record repairs queued for rows the stream changed while they were being read.
    pub repairs_queued: u64,
    /// Whether an interrupted run's Bulk job was picked up.
    pub resumed: bool,
    pub attempts: u32,
    pub elapsed: Duration,
    /// `None` when the object completed.
    pub error: Option<BackfillError>,
}

impl ObjectReport {
    fn new(object: &str) -> ObjectReport {
        ObjectReport {
            object: object.to_string(),
            method: None,
            job_id: None,
            rows_applied: 0,
            total_rows: 0,
            repairs_queued: 0,
            resumed: false,
            attempts: 0,
            elapsed: Duration::ZERO,
            error: None,
        }
    }

    pub fn completed(&self) -> bool {
        self.error.is_none()
    }

    /// Rows applied per second of this run.
    pub fn rows_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.rows_applied as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for ObjectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.error {
            return write!(
                f,
                "{}: failed after {} attempt(s), {} rows applied: {e}",
                self.object, self.attempts, self.rows_applied
            );
        }
        write!(
            f,
            "{}: {} rows via {} in {:.1} s ({:.0} rows/s)",
            self.object,
            self.rows_applied,
            match (self.method, &self.job_id) {
                (Some(Method::Bulk), Some(job)) => format!("Bulk API 2.0 (job {job})"),
                (Some(Method::Bulk), None) => "Bulk API 2.0".to_string(),
                _ => "REST query".to_string(),
            },
            self.elapsed.as_secs_f64(),
            self.rows_per_sec()
        )?;
        if self.resumed {
            write!(f, ", resumed ({} rows in the snapshot)", self.total_rows)?;
        }
        if self.repairs_queued > 0 {
            write!(f, ", {} record repairs queued", self.repairs_queued)?;
        }
        Ok(())
    }
}

/// The outcome of a backfill run, one entry per object in the order they ran.
#[derive(Debug, Default)]
pub struct BackfillReport {
    pub objects: Vec<ObjectReport>,
}

impl BackfillReport {
    /// Whether every object completed.
    pub fn is_complete(&self) -> bool {
        self.objects.iter().all(ObjectReport::completed)
    }

    pub fn failed(&self) -> impl Iterator<Item = &ObjectReport> {
        self.objects.iter().filter(|o| !o.completed())
    }

    pub fn object(&self, name: &str) -> Option<&ObjectReport> {
        self.objects.iter().find(|o| o.object == name)
    }
}

/// Snapshots `objects` (every configured object when empty) with default options.
pub async fn backfill(
    cfg: &Config,
    objects: &[String],
    since: Option<DateTime<Utc>>,
) -> Result<BackfillReport, BackfillError> {
    backfill_with(cfg, &BackfillOptions::new(objects.to_vec(), since)).await
}

/// Snapshots the objects `opts` names. Fails as a whole only when nothing can start (unknown
/// object, replica or login unreachable); per-object failures are in the report.
pub async fn backfill_with(
    cfg: &Config,
    opts: &BackfillOptions,
) -> Result<BackfillReport, BackfillError> {
    let objects = cfg.select_objects(&opts.objects)?;
    let replica = Setup::connect(cfg).await?;
    replica.migrate().await?;
    let salesforce = setup::login(cfg)
        .await?
        .with_bulk_polling(opts.bulk_poll.0, opts.bulk_poll.1);
    let runner = Runner {
        reader: OrgReader::new(
            salesforce.rest,
            salesforce.bulk,
            cfg.sync.retry_backoff(),
            opts.cancel.clone(),
        ),
        pool: replica.pool,
        settings: replica.settings,
        opts: opts.clone(),
        retry: cfg.sync.retry_backoff(),
    };
    let mut report = BackfillReport::default();
    for object in objects {
        if opts.cancel.is_cancelled() {
            let mut r = ObjectReport::new(&object);
            r.error = Some(BackfillError::Interrupted { object });
            report.objects.push(r);
            continue;
        }
        report.objects.push(runner.object(&object).await);
    }
    Ok(report)
}

struct Runner {
    reader: OrgReader,
    pool: deadpool_postgres::Pool,
    settings: ApplySettings,
    opts: BackfillOptions,
    /// Between attempts at one object.
    retry: Backoff,
}

/// A snapshot being read.
struct Plan {
    started_ms: i64,
    read: Read<SnapshotRow>,
    /// Whether its Bulk job is recorded for resuming (full snapshots only).
    recorded: bool,
    /// Rows the snapshot reads (the count, or the job's size when resumed).
    total: u64,
    /// A full snapshot (no `since` window).
    full: bool,
    resumed: bool,
}

enum Outcome {
    Done,
    Restart(String),
}

impl Runner {
    /// One object, retrying transient failures with backoff (each attempt resumes).
    async fn object(&self, object: &str) -> ObjectReport {
        let mut report = ObjectReport::new(object);
        let t0 = Instant::now();
        let mut backoff = self.retry.clone();
        loop {
            report.attempts += 1;
            match self.run_object(object, &mut report).await {
                Ok(()) => break,
                // Whatever a Ctrl-C cut short (a count, a retry's wait) is an interruption.
                Err(_) if self.opts.cancel.is_cancelled() => {
                    report.error = Some(BackfillError::Interrupted {
                        object: object.to_string(),
                    });
                    break;
                }
                Err(e) if e.is_transient() && report.attempts < MAX_ATTEMPTS => {
                    let delay = backoff.next_delay();
                    tracing::warn!(object, attempt = report.attempts, error = %e,
                        retry_in_ms = delay.as_millis() as u64, "backfill failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.opts.cancel.cancelled() => {}
                    }
                }
                Err(e) => {
                    tracing::error!(object, error = %e, "backfill failed");
                    report.error = Some(e);
                    break;
                }
            }
        }
        report.elapsed = t0.elapsed();
        if report.completed() {
            tracing::info!(
                object,
                rows = report.rows_applied,
                total = report.total_rows,
                secs = report.elapsed.as_secs_f64(),
                rows_per_sec = report.rows_per_sec() as u64,
                "backfill complete"
            );
        }
        report
    }

    async fn run_object(
        &self,
        object: &str,
        report: &mut ObjectReport,
    ) -> Result<(), BackfillError> {
        let _lock = self.lock(object).await?;
        let table = Arc::new(self.prepare_table(object).await?);
        let fields = select_fields(&table)?;
        let state = self.load_state(object).await?;
        if let Some(plan) = self.resumable(&table, &state).await? {
            match self.execute(&table, plan, report).await? {
                Outcome::Done => return Ok(()),
                Outcome::Restart(why) => {
                    tracing::info!(object, reason = %why, "restarting the snapshot");
                }
            }
        }
        let plan = self.fresh(&table, &fields).await?;
        match self.execute(&table, plan, report).await? {
            Outcome::Done => Ok(()),
            Outcome::Restart(why) => Err(BackfillError::BadResult {
                object: object.to_string(),
                message: why,
            }),
        }
    }

    /// The object's backfill lock, held until dropped.
    async fn lock(&self, object: &str) -> Result<locks::BackfillLock, BackfillError> {
        locks::try_backfill(&self.pool, &self.settings.data_schema, object)
            .await?
            .ok_or_else(|| BackfillError::Busy {
                object: object.to_string(),
            })
    }

    /// Describe -> table; columns are added only when some are missing, so a run against an
    /// up-to-date table takes no table lock.
    async fn prepare_table(&self, object: &str) -> Result<TableSchema, BackfillError> {
        let describe = self.reader.rest().describe(object).await?;
        let table = TableSchema::from_describe(describe)?;
        let client = self.pool.get().await.map_err(ReplicaError::from)?;
        // `ensure` only takes a lock when columns are missing. A full snapshot reads every
        // record itself; a `--since` window leaves older records to the re-read that
        // `ensure_table` queues for columns it adds.
        if self.opts.since.is_some() {
            super::ensure_table(&client, &self.settings, &table, REPAIR_ORIGIN).await?;
        } else {
            table.ensure(&client, &self.settings.data_schema).await?;
        }
        Ok(table)
    }

    async fn load_state(&self, object: &str) -> Result<sync_state::Running, BackfillError> {
        let client = self.pool.get().await.map_err(ReplicaError::from)?;
        Ok(sync_state::load_running(&client, &self.settings.control_schema, object).await?)
    }

    /// The interrupted snapshot to finish, if its Bulk job still exists.
    async fn resumable(
        &self,
        table: &Arc<TableSchema>,
        state: &sync_state::Running,
    ) -> Result<Option<Plan>, BackfillError> {
        let object = table.object.as_str();
        let (Some(started_ms), Some(job_id)) = (state.started_ms, &state.job_id) else {
            return Ok(None);
        };
        let info = match self.reader.bulk().info(job_id).await {
            Ok(info) => info,
            Err(e) if bulk::is_job_gone(&e) || matches!(e, SourceError::BadResponse { .. }) => {
                tracing::info!(object, job = %job_id, error = %e,
                    "the interrupted snapshot's Bulk job is gone; starting again");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let usable = info.object.eq_ignore_ascii_case(object)
            && info.operation == Operation::QueryAll.as_str()
            && !matches!(info.job_state(), JobState::Failed | JobState::Aborted);
        if !usable {
            tracing::info!(object, job = %job_id, state = %info.state,
                "the interrupted snapshot's Bulk job cannot be resumed; starting again");
            return Ok(None);
        }
        // The job may still be running (interrupted while it was): its size is known once done.
        let info = tokio::select! {
            r = self.reader.bulk().wait(job_id) => r?,
            _ = self.opts.cancel.cancelled() => {
                return Err(BackfillError::Interrupted { object: object.to_string() });
            }
        };
        tracing::info!(object, job = %job_id, locator = ?state.locator,
            "resuming the interrupted snapshot");
        let read = self.reader.read_job(
            job_id.clone(),
            state.locator.clone(),
            self.opts.chunk_rows,
            None,
            SnapshotRows::new(table.clone()),
        );
        Ok(Some(Plan {
            started_ms,
            read,
            recorded: true,
            total: info.number_records_processed.unwrap_or(0),
            full: true,
            resumed: true,
        }))
    }

    /// A new snapshot: note the time, count, pick REST or Bulk, and record the start.
    async fn fresh(
        &self,
        table: &Arc<TableSchema>,
        fields: &[String],
    ) -> Result<Plan, BackfillError> {
        let object = &table.object;
        let started_ms = Utc::now().timestamp_millis();
        let mut query = Query::select(fields, object);
        if let Some(since) = self.opts.since {
            query = query.since("SystemModstamp", since.timestamp_millis());
        }
        let counted = self.reader.count(&query).await?;
        let full = self.opts.since.is_none();
        let options = ReadOptions {
            bulk_threshold: self.opts.bulk_threshold,
            chunk_rows: self.opts.chunk_rows,
        };
        let read = self
            .reader
            .open(&counted, options, SnapshotRows::new(table.clone()))
            .await?;
        // Only a full snapshot's job is resumed: a `--since` window is short by nature, and
        // another run's job could read a narrower window than asked for.
        let recorded = full && read.job_id().is_some();
        let job = read.job_id().filter(|_| recorded).map(str::to_string);
        self.record_running(object, started_ms, job.as_deref(), None)
            .await?;
        Ok(Plan {
            started_ms,
            read,
            recorded,
            total: counted.records,
            full,
            resumed: false,
        })
    }

    async fn record_running(
        &self,
        object: &str,
        started_ms: i64,
        job_id: Option<&str>,
        locator: Option<&str>,
    ) -> Result<(), BackfillError> {
        let client = self.pool.get().await.map_err(ReplicaError::from)?;
        sync_state::record_running(
            &client,
            &self.settings.control_schema,
            object,
            started_ms,
            job_id,
            locator,
        )
        .await?;
        Ok(())
    }

    /// Reads the plan's source and applies it chunk by chunk.
    async fn execute(
        &self,
        table: &Arc<TableSchema>,
        mut plan: Plan,
        report: &mut ObjectReport,
    ) -> Result<Outcome, BackfillError> {
        let object = table.object.clone();
        report.method = Some(match plan.read.via() {
            Via::Bulk { .. } => Method::Bulk,
            Via::Rest => Method::Rest,
        });
        report.job_id = plan.read.job_id().map(str::to_string);
        report.resumed = plan.resumed;
        report.total_rows = plan.total;
        let recorded_job = report.job_id.clone().filter(|_| plan.recorded);
        let mut meter = Meter::new(&object, plan.total, self.opts.progress);
        let mut applied: u64 = 0;
        loop {
            let waiting = Instant::now();
            let item = tokio::select! {
                item = plan.read.next() => item,
                _ = self.opts.cancel.cancelled() => None,
            };
            if self.opts.cancel.is_cancelled() {
                meter.abandon();
                return Err(BackfillError::Interrupted { object });
            }
            let chunk = match item {
                Some(Ok(chunk)) => chunk,
                None => break,
                // A resumed job that cannot fill the table's columns, or is gone before a
                // row of it was applied: start the object again.
                Some(Err(e @ ReadError::MissingColumns { .. })) if plan.resumed => {
                    meter.abandon();
                    return Ok(Outcome::Restart(e.to_string()));
                }
                Some(Err(e @ ReadError::JobGone { .. })) if plan.resumed && applied == 0 => {
                    meter.abandon();
                    return Ok(Outcome::Restart(e.to_string()));
                }
                Some(Err(e)) => {
                    meter.abandon();
                    return Err(e.into());
                }
            };
            let last = chunk.last;
            if !chunk.rows.is_empty() {
                let locator = recorded_job.as_ref().and(chunk.next_locator.as_deref());
                let wait = waiting.elapsed();
                let applying = Instant::now();
                let repairs = self
                    .apply_chunk(
                        table,
                        &chunk.rows,
                        chunk.read_floor_ms,
                        plan.started_ms,
                        recorded_job.as_deref(),
                        locator,
                    )
                    .await?;
                let n = chunk.rows.len() as u64;
                tracing::debug!(
                    object,
                    rows = n,
                    wait_ms = wait.as_millis() as u64,
                    apply_ms = applying.elapsed().as_millis() as u64,
                    "chunk applied"
                );
                applied += n;
                report.rows_applied += n;
                report.repairs_queued += repairs as u64;
                telemetry::record_backfill_rows(&object, n);
                meter.add(n);
                if let Some(hook) = &self.opts.on_chunk {
                    hook(&ChunkProgress {
                        object: object.clone(),
                        rows: chunk.rows.len(),
                        applied,
                        total: plan.total,
                        job_id: report.job_id.clone(),
                    });
                }
            }
            if last {
                break;
            }
        }
        meter.finish();
        let total = match plan.read.via() {
            Via::Rest => applied,
            Via::Bulk { .. } => plan.total.max(applied),
        };
        report.total_rows = total;
        self.complete(&object, &plan, total).await?;
        plan.read.delete_job().await;
        Ok(Outcome::Done)
    }

    /// One chunk in one transaction: rows, their repairs, and the object's progress.
    async fn apply_chunk(
        &self,
        table: &TableSchema,
        rows: &[SnapshotRow],
        read_floor_ms: Option<i64>,
        started_ms: i64,
        job_id: Option<&str>,
        locator: Option<&str>,
    ) -> Result<usize, BackfillError> {
        let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
        let tx = replica::begin(&mut client, &format!("snapshot of {}", table.object)).await?;
        // A row is as new as the later of its SystemModstamp and the read's floor; records the
        // stream changed after the read began come back as re-reads.
        let outcome = apply_snapshot(&tx, &self.settings, table, rows, read_floor_ms).await?;
        repair_queue::enqueue(
            &tx,
            &self.settings.control_schema,
            REPAIR_ORIGIN,
            None,
            &outcome.repairs,
        )
        .await?;
        sync_state::record_running(
            &tx,
            &self.settings.control_schema,
            &table.object,
            started_ms,
            job_id,
            locator,
        )
        .await?;
        tx.commit().await.map_err(ReplicaError::pg(format!(
            "commit snapshot of {}",
            table.object
        )))?;
        Ok(outcome.repairs.len())
    }

    /// Records the completed snapshot and clears the running fields.
    async fn complete(&self, object: &str, plan: &Plan, total: u64) -> Result<(), BackfillError> {
        let since_ms: Option<i64> = if plan.full {
            None
        } else {
            self.opts.since.map(|s| s.timestamp() * 1000)
        };
        let rows = i64::try_from(total).unwrap_or(i64::MAX);
        let client = self.pool.get().await.map_err(ReplicaError::from)?;
        sync_state::record_completed(
            &client,
            &self.settings.control_schema,
            object,
            plan.started_ms,
            since_ms,
            rows,
        )
        .await?;
        Ok(())
    }
}

/// `Id` and the field of every column, for an object whose rows can be versioned.
fn select_fields(table: &TableSchema) -> Result<Vec<String>, BackfillError> {
    if !table.columns.iter().any(|c| c.field == "SystemModstamp") {
        return Err(BackfillError::Unsupported {
            object: table.object.clone(),
            message: "describe lists no SystemModstamp field, so snapshot rows cannot be \
                      versioned against the stream; this object can only be kept by the stream"
                .to_string(),
        });
    }
    Ok(snapshot_fields(table))
}

/// Progress of one object: a bar on a terminal, or log lines with rows and rate.
struct Meter {
    object: String,
    total: u64,
    rows: u64,
    started: Instant,
    last_log: Instant,
    log: bool,
    bar: Option<indicatif::ProgressBar>,
}

impl Meter {
    fn new(object: &str, total: u64, mode: Progress) -> Meter {
        let terminal = std::io::stderr().is_terminal();
        let bar = (mode == Progress::Auto && terminal).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let style = indicatif::ProgressStyle::with_template(
                "{prefix:>16} [{bar:40}] {human_pos}/{human_len} rows {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(object.to_string());
            bar
        });
        let now = Instant::now();
        Meter {
            object: object.to_string(),
            total,
            rows: 0,
            started: now,
            last_log: now,
            log: mode == Progress::Log || (mode == Progress::Auto && !terminal),
            bar,
        }
    }

    fn rate(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64();
        if secs > 0.0 {
            (self.rows as f64 / secs) as u64
        } else {
            0
        }
    }

    fn add(&mut self, n: u64) {
        self.rows += n;
        if let Some(bar) = &self.bar {
            if self.rows > self.total {
                bar.set_length(self.rows);
            }
            bar.inc(n);
        }
        if self.log && self.last_log.elapsed() >= LOG_INTERVAL {
            self.last_log = Instant::now();
            tracing::info!(object = %self.object, rows = self.rows, total = self.total,
                rows_per_sec = self.rate(), "backfill progress");
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }

    fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}
