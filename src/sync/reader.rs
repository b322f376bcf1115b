//! The org reader: every "read an object from the org" of backfill, entity repairs, record
//! repairs and verify goes through here.
//!
//! # What it does
//!
//! 1. Counts what a query selects (`SELECT COUNT()` over `queryAll`, so deleted records
//!    count), noting when Salesforce answered.
//! 2. Picks the transport: REST query paging up to the caller's threshold, a Bulk API 2.0
//!    `queryAll` job above it (one API call per chunk instead of one per 2,000 rows).
//! 3. Reads in a task of its own, one chunk ahead of the caller: REST pages are gathered into
//!    chunks of `chunk_rows` rows, Bulk results are asked for `chunk_rows` at a time and
//!    parsed off the async threads. The queue between the task and the caller holds one
//!    chunk, so memory holds at most three chunks (being parsed, queued, being applied)
//!    whatever the size of the object.
//! 4. Retries what fails transiently (network, 5xx, limits) with the daemon's [`Backoff`],
//!    from the same page or locator, so a retry never reads anything twice or skips anything.
//! 5. Deletes its Bulk job when the caller says it is done with it ([`Read::delete_job`]); a
//!    backfill keeps an unfinished job so that the next run can resume from its locator.
//!
//! What rows are made of is the caller's [`Decode`]: snapshot rows for the merge
//! ([`SnapshotRows`]), or verify's keys.
//!
//! # Chunks and read floors
//!
//! Every chunk carries a read floor: a time in Salesforce's clock no later than when it read
//! the chunk's rows. It is the `Date` of an answer received before the read was asked for
//! (`RestClient::read_floor_ms`): for a REST query, before its first page (later pages may come
//! from a cursor opened then); for Bulk, before the job was created. A snapshot row whose version is older than the floor is known to be current as
//! of the floor, which is what the merge's guard needs to tell a stale read from a record
//! the stream has moved past. The last chunk is marked `last` (it may be empty), so a caller
//! can finish its work in the transaction of the last rows.

use super::AbortOnDrop;
use crate::backoff::Backoff;
use crate::replica::ReplicaError;
use crate::replica::schema::TableSchema;
use crate::replica::snapshot::{CsvLayout, SnapshotRow, row_from_json};
use crate::salesforce::SourceError;
use crate::salesforce::bulk::{self, BulkClient, Operation, ResultChunk};
use crate::salesforce::rest::RestClient;
use crate::salesforce::soql::Query;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Attempts of one call before its transient error is the caller's.
pub const DEFAULT_ATTEMPTS: u32 = 5;

/// Errors of reading the org.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A record that cannot become a row (a value of the wrong type).
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error("{object}: answer not understood: {message}")]
    BadResult { object: String, message: String },
    /// The Bulk result lacks columns the rows need (a job created for other fields).
    #[error("{object}: the Bulk result has no column for {}", fields.join(", "))]
    MissingColumns { object: String, fields: Vec<String> },
    /// The Bulk job no longer exists (deleted, expired, another API version).
    #[error("{object}: Bulk job {job_id} can no longer be read: {source}")]
    JobGone {
        object: String,
        job_id: String,
        source: Box<SourceError>,
    },
}

impl ReadError {
    pub fn is_transient(&self) -> bool {
        match self {
            ReadError::Source(e) => e.is_transient(),
            ReadError::Replica(e) => e.is_transient(),
            ReadError::BadResult { .. }
            | ReadError::MissingColumns { .. }
            | ReadError::JobGone { .. } => false,
        }
    }
}

/// How records of one read become rows.
pub trait Decode: Send + Sync + 'static {
    type Row: Send + 'static;
    /// The object read, for messages.
    fn object(&self) -> &str;
    /// One REST record.
    fn record(&self, record: &serde_json::Value) -> Result<Self::Row, ReadError>;
    /// One Bulk result chunk (CSV with its header row).
    fn chunk(&self, chunk: &ResultChunk) -> Result<Vec<Self::Row>, ReadError>;
}

/// How many records a query selects, and when Salesforce said so.
#[derive(Debug, Clone)]
pub struct Counted {
    pub query: Query,
    pub records: u64,
    /// Epoch ms of the answer (its `Date` header), if given.
    pub read_at_ms: Option<i64>,
}

/// How a read is cut and carried.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// More records than this go over Bulk API 2.0.
    pub bulk_threshold: u64,
    /// Rows per chunk (and per Bulk results call).
    pub chunk_rows: u32,
}

/// Where a read's rows come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    Rest,
    Bulk { job_id: String },
}

/// Rows handed over at once.
#[derive(Debug)]
pub struct Chunk<R> {
    pub rows: Vec<R>,
    /// For Bulk reads, the locator of the chunk after this one (`None` after the last).
    pub next_locator: Option<String>,
    /// A time (epoch ms) no later than Salesforce's read of these rows, if known.
    pub read_floor_ms: Option<i64>,
    /// Whether this is the last chunk of the read.
    pub last: bool,
}

/// Retries of one call, shared by the reader and its task.
#[derive(Clone)]
struct Retry {
    backoff: Backoff,
    attempts: u32,
    cancel: CancellationToken,
}

impl Retry {
    async fn run<T, F, Fut>(&self, object: &str, what: &str, mut call: F) -> Result<T, ReadError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SourceError>>,
    {
        let mut backoff = self.backoff.clone();
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && backoff.attempts() + 1 < self.attempts => {
                    tracing::warn!(object, error = %e, attempt = backoff.attempts() + 1,
                        "{what} failed; retrying");
                    if !backoff.wait(&self.cancel).await {
                        return Err(e.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Reads objects from the org; cheap to clone.
#[derive(Clone)]
pub struct OrgReader {
    rest: RestClient,
    bulk: BulkClient,
    retry: Retry,
}

impl OrgReader {
    /// Retries transient failures on `backoff`, [`DEFAULT_ATTEMPTS`] times, until `cancel`.
    pub fn new(
        rest: RestClient,
        bulk: BulkClient,
        backoff: Backoff,
        cancel: CancellationToken,
    ) -> OrgReader {
        OrgReader {
            rest,
            bulk,
            retry: Retry {
                backoff,
                attempts: DEFAULT_ATTEMPTS,
                cancel,
            },
        }
    }

    pub fn rest(&self) -> &RestClient {
        &self.rest
    }

    pub fn bulk(&self) -> &BulkClient {
        &self.bulk
    }

    /// Counts what `query` selects, deleted records included.
    pub async fn count(&self, query: &Query) -> Result<Counted, ReadError> {
        let soql = query.count().to_string();
        let page = self
            .retry
            .run(query.object(), "count", || {
                self.rest.query_page(&soql, true)
            })
            .await?;
        Ok(Counted {
            query: query.clone(),
            records: page.total_size.max(0) as u64,
            read_at_ms: page.read_at_ms,
        })
    }

    /// Starts reading what `counted` selects: over Bulk API 2.0 above the threshold (the job
    /// is created before this returns, so the caller can record it), over REST otherwise.
    pub async fn open<D: Decode>(
        &self,
        counted: &Counted,
        opts: ReadOptions,
        decode: Arc<D>,
    ) -> Result<Read<D::Row>, ReadError> {
        if counted.records <= opts.bulk_threshold {
            return Ok(self.open_rest(&counted.query, opts.chunk_rows, decode));
        }
        let soql = counted.query.to_string();
        let job = self
            .retry
            .run(counted.query.object(), "creating a Bulk job", || {
                self.bulk.create(&soql, Operation::QueryAll)
            })
            .await?;
        tracing::info!(object = decode.object(), records = counted.records, job = %job.id,
            "reading over Bulk API 2.0");
        // The job was created after the count's answer arrived, and runs after its creation.
        let floor = counted.read_at_ms;
        Ok(self.read_job(job.id, None, opts.chunk_rows, floor, decode))
    }

    /// Reads `query` over REST paging, whatever its size (lookups of a few ids).
    pub fn open_rest<D: Decode>(
        &self,
        query: &Query,
        chunk_rows: u32,
        decode: Arc<D>,
    ) -> Read<D::Row> {
        let (tx, rx) = mpsc::channel(1);
        let object = decode.object().to_string();
        let task = {
            let (rest, retry, soql) = (self.rest.clone(), self.retry.clone(), query.to_string());
            let chunk_rows = chunk_rows.max(1) as usize;
            tokio::spawn(read_rest(rest, retry, soql, chunk_rows, decode, tx))
        };
        Read::new(rx, task, &object, Via::Rest, self.bulk.clone())
    }

    /// Reads an existing Bulk job from `locator` on (`None`: from the start), waiting first
    /// until Salesforce has run it. `floor` is the read floor of every chunk.
    pub fn read_job<D: Decode>(
        &self,
        job_id: String,
        locator: Option<String>,
        chunk_rows: u32,
        floor: Option<i64>,
        decode: Arc<D>,
    ) -> Read<D::Row> {
        let (tx, rx) = mpsc::channel(1);
        let object = decode.object().to_string();
        let task = {
            let job = BulkRead {
                bulk: self.bulk.clone(),
                retry: self.retry.clone(),
                job_id: job_id.clone(),
                locator,
                chunk_rows: chunk_rows.max(1),
                floor,
            };
            tokio::spawn(job.run(decode, tx))
        };
        Read::new(rx, task, &object, Via::Bulk { job_id }, self.bulk.clone())
    }
}

/// A read in progress: chunks in order, then the end.
pub struct Read<R> {
    rx: mpsc::Receiver<Result<Chunk<R>, ReadError>>,
    _task: AbortOnDrop<()>,
    object: String,
    via: Via,
    bulk: BulkClient,
    ended: bool,
}

impl<R> Read<R> {
    fn new(
        rx: mpsc::Receiver<Result<Chunk<R>, ReadError>>,
        task: tokio::task::JoinHandle<()>,
        object: &str,
        via: Via,
        bulk: BulkClient,
    ) -> Read<R> {
        Read {
            rx,
            _task: AbortOnDrop(task),
            object: object.to_string(),
            via,
            bulk,
            ended: false,
        }
    }

    pub fn via(&self) -> &Via {
        &self.via
    }

    /// The Bulk job read, if any.
    pub fn job_id(&self) -> Option<&str> {
        match &self.via {
            Via::Bulk { job_id } => Some(job_id),
            Via::Rest => None,
        }
    }

    /// The next chunk; `None` after the last one. A reader that stopped before the last
    /// chunk is an error, never a silent end.
    pub async fn next(&mut self) -> Option<Result<Chunk<R>, ReadError>> {
        if self.ended {
            return None;
        }
        match self.rx.recv().await {
            Some(Ok(chunk)) => {
                self.ended = chunk.last;
                Some(Ok(chunk))
            }
            Some(Err(e)) => {
                self.ended = true;
                Some(Err(e))
            }
            None => {
                self.ended = true;
                Some(Err(ReadError::BadResult {
                    object: self.object.clone(),
                    message: "the reader stopped before the end of the results".to_string(),
                }))
            }
        }
    }

    /// Deletes the read's Bulk job, if any (best effort: a job left behind expires).
    pub async fn delete_job(&self) {
        if let Via::Bulk { job_id } = &self.via
            && let Err(e) = self.bulk.delete(job_id).await
        {
            tracing::debug!(job = %job_id, error = %e, "could not delete the Bulk job");
        }
    }
}

/// The earlier of two read floors; unknown if either is unknown (conservative).
pub fn min_floor(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        _ => None,
    }
}

/// Pages of a REST query gathered into chunks of `chunk_rows`.
async fn read_rest<D: Decode>(
    rest: RestClient,
    retry: Retry,
    soql: String,
    chunk_rows: usize,
    decode: Arc<D>,
    tx: mpsc::Sender<Result<Chunk<D::Row>, ReadError>>,
) {
    let result: Result<(), ReadError> = async {
        let mut page = retry
            .run(decode.object(), "query", || rest.query_page(&soql, true))
            .await?;
        let mut rows = Vec::with_capacity(chunk_rows.min(page.records.len().max(1)));
        // Every page was read after what the first page's request knew of.
        let floor = page.read_floor_ms;
        loop {
            for record in &page.records {
                rows.push(decode.record(record)?);
                if rows.len() >= chunk_rows {
                    let chunk = Chunk {
                        rows: std::mem::take(&mut rows),
                        next_locator: None,
                        read_floor_ms: floor,
                        last: false,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            if page.done {
                break;
            }
            let Some(next) = page.next_records_url.take() else {
                return Err(ReadError::BadResult {
                    object: decode.object().to_string(),
                    message: "a query page is not done but has no nextRecordsUrl".to_string(),
                });
            };
            page = retry
                .run(decode.object(), "query", || rest.query_more(&next))
                .await?;
        }
        let chunk = Chunk {
            rows,
            next_locator: None,
            read_floor_ms: floor,
            last: true,
        };
        let _ = tx.send(Ok(chunk)).await;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = tx.send(Err(e)).await;
    }
}

/// A Bulk job read chunk by chunk from a locator.
struct BulkRead {
    bulk: BulkClient,
    retry: Retry,
    job_id: String,
    locator: Option<String>,
    chunk_rows: u32,
    floor: Option<i64>,
}

impl BulkRead {
    async fn run<D: Decode>(
        mut self,
        decode: Arc<D>,
        tx: mpsc::Sender<Result<Chunk<D::Row>, ReadError>>,
    ) {
        if let Err(e) = self.read(&decode, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    }

    async fn read<D: Decode>(
        &mut self,
        decode: &Arc<D>,
        tx: &mpsc::Sender<Result<Chunk<D::Row>, ReadError>>,
    ) -> Result<(), ReadError> {
        let object = decode.object().to_string();
        let job_id = self.job_id.clone();
        // A job that no longer exists is the caller's to handle (a resumed backfill restarts).
        let gone = |e: ReadError| match e {
            ReadError::Source(source) if bulk::is_job_gone(&source) => ReadError::JobGone {
                object: object.clone(),
                job_id: job_id.clone(),
                source: Box::new(source),
            },
            other => other,
        };
        // Polling has its own schedule; only a failed poll is retried here.
        self.retry
            .run(&object, "waiting for the Bulk job", || {
                self.bulk.wait(&job_id)
            })
            .await
            .map_err(gone)?;
        loop {
            let chunk = self
                .retry
                .run(&object, "reading Bulk results", || {
                    self.bulk
                        .results(&job_id, self.locator.as_deref(), self.chunk_rows)
                })
                .await
                .map_err(gone)?;
            let next_locator = chunk.next_locator.clone();
            let d = decode.clone();
            let rows = tokio::task::spawn_blocking(move || d.chunk(&chunk))
                .await
                .map_err(|e| ReadError::BadResult {
                    object: object.clone(),
                    message: format!("parsing a Bulk chunk failed: {e}"),
                })??;
            let last = next_locator.is_none();
            let chunk = Chunk {
                rows,
                next_locator: next_locator.clone(),
                read_floor_ms: self.floor,
                last,
            };
            if tx.send(Ok(chunk)).await.is_err() || last {
                return Ok(());
            }
            self.locator = next_locator;
        }
    }
}

/// Records as snapshot rows of a table, for the version-guarded snapshot merge.
pub struct SnapshotRows {
    pub table: Arc<TableSchema>,
}

impl SnapshotRows {
    pub fn new(table: Arc<TableSchema>) -> Arc<SnapshotRows> {
        Arc::new(SnapshotRows { table })
    }
}

impl Decode for SnapshotRows {
    type Row = SnapshotRow;

    fn object(&self) -> &str {
        &self.table.object
    }

    fn record(&self, record: &serde_json::Value) -> Result<SnapshotRow, ReadError> {
        Ok(row_from_json(&self.table, record)?)
    }

    /// A CSV chunk whose header names every column's field (any order, any case). A chunk
    /// without a header row is an empty result.
    fn chunk(&self, chunk: &ResultChunk) -> Result<Vec<SnapshotRow>, ReadError> {
        let table = &self.table;
        let bad = |message: String| ReadError::BadResult {
            object: table.object.clone(),
            message,
        };
        let mut reader = chunk.reader();
        let header: Vec<String> = reader
            .headers()
            .map_err(|e| bad(format!("CSV header: {e}")))?
            .iter()
            .map(str::to_string)
            .collect();
        if header.is_empty() || header.iter().all(String::is_empty) {
            return Ok(Vec::new());
        }
        let missing: Vec<String> = table
            .columns
            .iter()
            .filter(|c| !header.iter().any(|h| h.eq_ignore_ascii_case(&c.field)))
            .map(|c| c.field.clone())
            .collect();
        if !missing.is_empty() {
            return Err(ReadError::MissingColumns {
                object: table.object.clone(),
                fields: missing,
            });
        }
        let names: Vec<&str> = header.iter().map(String::as_str).collect();
        let layout = CsvLayout::new(table, &names)?;
        let capacity = chunk.records.unwrap_or(0).min(1_000_000) as usize;
        let mut rows = Vec::with_capacity(capacity);
        let mut record = csv::StringRecord::new();
        while reader
            .read_record(&mut record)
            .map_err(|e| bad(format!("CSV record: {e}")))?
        {
            let fields: Vec<&str> = record.iter().collect();
            rows.push(layout.row(table, &fields)?);
        }
        Ok(rows)
    }
}

/// The fields a snapshot of `table` reads: `Id` and every column's field. Compound parents
/// (addresses, geolocations) have no column, so Bulk API's refusal of compound fields never
/// applies.
pub fn snapshot_fields(table: &TableSchema) -> Vec<String> {
    let mut fields = vec!["Id".to_string()];
    fields.extend(table.columns.iter().map(|c| c.field.clone()));
    fields
}
