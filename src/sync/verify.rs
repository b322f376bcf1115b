//! Compares the replica with the org, object by object (`sfmirror verify`).
//!
//! # Data flow
//!
//! The org side is the stream of `(Id, SystemModstamp, IsDeleted)` of every record, deleted
//! ones included (`queryAll ... ORDER BY Id`, over REST paging or, above the Bulk threshold,
//! a Bulk API 2.0 job read chunk by chunk). The replica side is
//! `SELECT id, _sfm_version, _sfm_deleted ... ORDER BY id COLLATE "C"` read through a portal a
//! few thousand rows at a time ([`crate::replica::keys`]). Both are ordered by the bytes of the id (Salesforce ids are
//! case-sensitive base-62, and `"C"` collation compares bytes), and they are merged like two
//! sorted files, so memory stays bounded whatever the size of the object. A stream that goes
//! backwards is an error, never a silent miscount.
//!
//! # Drift, per id
//!
//! - *missing*: live in the org, absent from the replica;
//! - *extra*: live in the replica, absent from the org (purged, hard-deleted);
//! - *deleted mismatch*: deleted on one side, live on the other;
//! - *stale*: the org's `SystemModstamp` is in a later second than the replica's version
//!   (compared in whole seconds: `SystemModstamp` has no milliseconds, versions do).
//!
//! A deleted record absent from the replica is not drift (hard delete mode removes rows).
//!
//! # Why verify can run beside the daemon
//!
//! It only reads (a read-only transaction per object;
//! its share lock only makes a column addition wait for the end of that object's read), and
//! a difference seen while the stream is still applying a change is not reported: every
//! difference found is checked again by reading both sides for that id once more, the org
//! first and the replica after a short delay, and only those that remain count. With
//! `--repair`, confirmed drift becomes record repairs in the repair queue, which the daemon's
//! repair worker applies through the version-guarded merge.

use super::setup::{self, Setup};
use crate::config::{Config, UnknownObject};
use crate::model::time::datetime_ms;
use crate::replica::repair_queue::RepairRequest;
use crate::replica::{ReplicaError, keys, migrate, repair_queue};
use crate::salesforce::SourceError;
use crate::salesforce::bulk::ResultChunk;
use crate::salesforce::soql::Query;
use crate::sync::reader::{Decode, OrgReader, Read, ReadError, ReadOptions, Via};
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Objects with more records than this are listed over Bulk API 2.0.
pub const DEFAULT_BULK_THRESHOLD: u64 = super::backfill::DEFAULT_BULK_THRESHOLD;
/// Ids shown per kind of drift.
pub const DEFAULT_EXAMPLES: usize = 5;
/// Differences checked again one by one; beyond this many an object is plainly out of sync
/// and the rest are reported as found.
const RECHECK_MAX: usize = 10_000;
/// Replica rows per portal fetch.
const REPLICA_FETCH: i32 = 5_000;
/// Ids per `WHERE Id IN (...)` lookup (keeps the URL short).
const LOOKUP_IDS: usize = 200;
/// Rows per Bulk result chunk (keys only, so small).
const BULK_CHUNK_ROWS: u32 = 50_000;
/// Repairs queued per transaction.
const ENQUEUE_BATCH: usize = 1_000;
/// The `channel` noted on repairs verify queues.
const REPAIR_ORIGIN: &str = "verify";

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    UnknownObject(#[from] UnknownObject),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{object}: {message}")]
    BadData { object: String, message: String },
    #[error("--repair needs the replica's control schema, and it is not ready: {0}")]
    NotMigrated(crate::replica::migrate::State),
}

impl VerifyError {
    pub fn is_transient(&self) -> bool {
        match self {
            VerifyError::Source(e) => e.is_transient(),
            VerifyError::Replica(e) => e.is_transient(),
            VerifyError::Read(e) => e.is_transient(),
            VerifyError::UnknownObject(_)
            | VerifyError::BadData { .. }
            | VerifyError::NotMigrated(_) => false,
        }
    }
}

/// A kind of difference between the org and the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    Missing,
    Extra,
    DeletedMismatch,
    Stale,
}

impl DriftKind {
    fn label(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Extra => "extra",
            DriftKind::DeletedMismatch => "deleted-state mismatch",
            DriftKind::Stale => "stale",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            DriftKind::Missing => "verify: in the org, missing from the replica",
            DriftKind::Extra => "verify: in the replica, absent from the org",
            DriftKind::DeletedMismatch => "verify: deleted on one side only",
            DriftKind::Stale => "verify: the org has a newer SystemModstamp",
        }
    }
}

/// How many ids drifted one way, with the first few.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DriftCount {
    pub count: u64,
    pub examples: Vec<String>,
}

/// The comparison of one object.
#[derive(Debug, Default, Serialize)]
pub struct ObjectVerify {
    pub object: String,
    /// `rest` or `bulk`: how the org's ids were listed.
    pub method: String,
    pub org_live: u64,
    pub org_deleted: u64,
    pub replica_live: u64,
    pub replica_deleted: u64,
    pub missing: DriftCount,
    pub extra: DriftCount,
    pub deleted_mismatch: DriftCount,
    pub stale: DriftCount,
    /// Differences that were gone when checked again (changes in flight).
    pub settled: u64,
    pub repairs_queued: u64,
    /// Why the object could not be compared.
    pub error: Option<String>,
}

impl ObjectVerify {
    fn new(object: &str) -> ObjectVerify {
        ObjectVerify {
            object: object.to_string(),
            ..Default::default()
        }
    }

    /// Ids that drifted, all kinds together.
    pub fn drift(&self) -> u64 {
        self.missing.count + self.extra.count + self.deleted_mismatch.count + self.stale.count
    }

    pub fn kind(&self, kind: DriftKind) -> &DriftCount {
        match kind {
            DriftKind::Missing => &self.missing,
            DriftKind::Extra => &self.extra,
            DriftKind::DeletedMismatch => &self.deleted_mismatch,
            DriftKind::Stale => &self.stale,
        }
    }

    fn kind_mut(&mut self, kind: DriftKind) -> &mut DriftCount {
        match kind {
            DriftKind::Missing => &mut self.missing,
            DriftKind::Extra => &mut self.extra,
            DriftKind::DeletedMismatch => &mut self.deleted_mismatch,
            DriftKind::Stale => &mut self.stale,
        }
    }
}

const KINDS: [DriftKind; 4] = [
    DriftKind::Missing,
    DriftKind::Extra,
    DriftKind::DeletedMismatch,
    DriftKind::Stale,
];

impl fmt::Display for ObjectVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.error {
            return write!(f, "{}: cannot verify: {e}", self.object);
        }
        let counts = format!(
            "org {} live + {} deleted, replica {} live + {} deleted",
            self.org_live, self.org_deleted, self.replica_live, self.replica_deleted
        );
        if self.drift() == 0 {
            return write!(f, "{}: in sync ({counts})", self.object);
        }
        let parts: Vec<String> = KINDS
            .iter()
            .filter(|k| self.kind(**k).count > 0)
            .map(|k| format!("{} {}", self.kind(*k).count, k.label()))
            .collect();
        write!(
            f,
            "{}: {} drifted ({}); {counts}",
            self.object,
            self.drift(),
            parts.join(", ")
        )?;
        for k in KINDS {
            let d = self.kind(k);
            if d.count > 0 {
                let more = if d.count > d.examples.len() as u64 {
                    ", ..."
                } else {
                    ""
                };
                write!(f, "\n  {}: {}{more}", k.label(), d.examples.join(", "))?;
            }
        }
        if self.repairs_queued > 0 {
            write!(f, "\n  {} record repairs queued", self.repairs_queued)?;
        }
        Ok(())
    }
}

/// The comparison of every object asked for.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub objects: Vec<ObjectVerify>,
}

impl VerifyReport {
    pub fn has_drift(&self) -> bool {
        self.objects.iter().any(|o| o.drift() > 0)
    }

    pub fn has_errors(&self) -> bool {
        self.objects.iter().any(|o| o.error.is_some())
    }

    /// No drift and every object compared.
    pub fn is_clean(&self) -> bool {
        !self.has_drift() && !self.has_errors()
    }

    pub fn object(&self, name: &str) -> Option<&ObjectVerify> {
        self.objects.iter().find(|o| o.object == name)
    }
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Objects to compare; empty means every object of every channel.
    pub objects: Vec<String>,
    /// Queue record repairs for every drifted id.
    pub repair: bool,
    pub bulk_threshold: u64,
    pub examples: usize,
    /// Wait between reading the org again and reading the replica again for the ids that
    /// differed, so changes the daemon is applying can land.
    pub recheck_delay: Duration,
}

impl VerifyOptions {
    pub fn new(objects: Vec<String>, repair: bool) -> VerifyOptions {
        VerifyOptions {
            objects,
            repair,
            bulk_threshold: DEFAULT_BULK_THRESHOLD,
            examples: DEFAULT_EXAMPLES,
            recheck_delay: Duration::from_secs(2),
        }
    }
}

/// Compares `objects` (every configured object when empty); with `repair`, queues record
/// repairs for the drifted ids.
pub async fn verify(
    cfg: &Config,
    objects: &[String],
    repair: bool,
) -> Result<VerifyReport, VerifyError> {
    verify_with(cfg, &VerifyOptions::new(objects.to_vec(), repair)).await
}

/// As [`verify`], with every option. Fails as a whole only when nothing can start; an object
/// that cannot be compared carries its error in the report.
pub async fn verify_with(cfg: &Config, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let objects = cfg.select_objects(&opts.objects)?;
    let replica = Setup::connect(cfg).await?;
    if opts.repair {
        // Verify only reads; queueing repairs needs the queue a daemon or backfill created.
        let client = replica.pool.get().await.map_err(ReplicaError::from)?;
        let state = migrate::state(&client, &replica.settings.control_schema).await?;
        if !state.is_current() {
            return Err(VerifyError::NotMigrated(state));
        }
    }
    let salesforce = setup::login(cfg).await?;
    let checker = Checker {
        reader: OrgReader::new(
            salesforce.rest,
            salesforce.bulk,
            cfg.sync.retry_backoff(),
            CancellationToken::new(),
        ),
        pool: replica.pool,
        data_schema: cfg.replica.schema.clone(),
        control_schema: cfg.replica.control_schema.clone(),
        opts: opts.clone(),
    };
    let mut report = VerifyReport::default();
    for object in objects {
        let mut result = ObjectVerify::new(&object);
        if let Err(e) = checker.object(&object, &mut result).await {
            tracing::error!(object, error = %e, "verify failed");
            result.error = Some(e.to_string());
        }
        report.objects.push(result);
    }
    Ok(report)
}

/// One org record's key.
#[derive(Debug, Clone)]
struct OrgKey {
    id: String,
    modstamp_ms: i64,
    deleted: bool,
}

/// One replica row's key.
type ReplicaKey = keys::Key;

/// What, if anything, is wrong with an id given what each side holds.
fn classify(org: Option<&OrgKey>, replica: Option<&ReplicaKey>) -> Option<DriftKind> {
    match (org, replica) {
        (Some(o), None) => (!o.deleted).then_some(DriftKind::Missing),
        (None, Some(r)) => (!r.deleted).then_some(DriftKind::Extra),
        (Some(o), Some(r)) if o.deleted != r.deleted => Some(DriftKind::DeletedMismatch),
        (Some(o), Some(r)) => (!o.deleted
            && o.modstamp_ms.div_euclid(1000) > r.version_ms.div_euclid(1000))
        .then_some(DriftKind::Stale),
        (None, None) => None,
    }
}

/// Whether `id` can be written into SOQL as a literal (Salesforce ids are alphanumeric).
fn is_plain_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 18 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

struct Checker {
    reader: OrgReader,
    pool: deadpool_postgres::Pool,
    data_schema: String,
    control_schema: String,
    opts: VerifyOptions,
}

/// The org's keys in id order, read one chunk ahead.
struct OrgCursor {
    object: String,
    read: Read<OrgKey>,
    buf: std::vec::IntoIter<OrgKey>,
    last: Option<String>,
    ended: bool,
}

impl OrgCursor {
    fn new(object: &str, read: Read<OrgKey>) -> OrgCursor {
        OrgCursor {
            object: object.to_string(),
            read,
            buf: Vec::new().into_iter(),
            last: None,
            ended: false,
        }
    }

    async fn next(&mut self) -> Result<Option<OrgKey>, VerifyError> {
        loop {
            if let Some(k) = self.buf.next() {
                if self
                    .last
                    .as_deref()
                    .is_some_and(|l| l.as_bytes() >= k.id.as_bytes())
                {
                    return Err(VerifyError::BadData {
                        object: self.object.clone(),
                        message: format!(
                            "the org listed id {} after {}: ids are not in byte order, so the \
                             comparison cannot be trusted",
                            k.id,
                            self.last.as_deref().unwrap_or_default()
                        ),
                    });
                }
                self.last = Some(k.id.clone());
                return Ok(Some(k));
            }
            if self.ended {
                return Ok(None);
            }
            match self.read.next().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    self.ended = chunk.last;
                    self.buf = chunk.rows.into_iter();
                }
                None => self.ended = true,
            }
        }
    }
}

/// The replica's keys in id order, checked to stay in order.
struct ReplicaCursor<'t, 'c> {
    object: String,
    scan: keys::Scan<'t, 'c>,
    buf: std::vec::IntoIter<ReplicaKey>,
    last: Option<String>,
    ended: bool,
}

impl ReplicaCursor<'_, '_> {
    async fn next(&mut self) -> Result<Option<ReplicaKey>, VerifyError> {
        loop {
            if let Some(k) = self.buf.next() {
                if self
                    .last
                    .as_deref()
                    .is_some_and(|l| l.as_bytes() >= k.id.as_bytes())
                {
                    return Err(VerifyError::BadData {
                        object: self.object.clone(),
                        message: format!("the replica listed id {} out of order", k.id),
                    });
                }
                self.last = Some(k.id.clone());
                return Ok(Some(k));
            }
            if self.ended {
                return Ok(None);
            }
            let page = self.scan.next_page().await?;
            self.ended = page.is_empty();
            self.buf = page.into_iter();
        }
    }
}

/// Differences found while merging, before the recheck confirms them.
struct Findings {
    pending: Vec<(DriftKind, String)>,
    /// Confirmed repairs not yet queued.
    to_queue: Vec<RepairRequest>,
}

impl Checker {
    async fn object(&self, object: &str, result: &mut ObjectVerify) -> Result<(), VerifyError> {
        let describe = self.reader.rest().describe(object).await?;
        if describe.field("SystemModstamp").is_none() {
            return Err(VerifyError::BadData {
                object: object.to_string(),
                message: "describe lists no SystemModstamp field: there is no version to \
                          compare"
                    .to_string(),
            });
        }
        let has_deleted = describe.field("IsDeleted").is_some();
        let query = Query::select(key_fields(has_deleted), object).order_by_id();
        let counted = self.reader.count(&query).await?;
        let options = ReadOptions {
            bulk_threshold: self.opts.bulk_threshold,
            chunk_rows: BULK_CHUNK_ROWS,
        };
        let read = self
            .reader
            .open(&counted, options, OrgKeys::new(object))
            .await?;
        result.method = match read.via() {
            Via::Bulk { .. } => "bulk",
            Via::Rest => "rest",
        }
        .to_string();
        let mut org = OrgCursor::new(object, read);

        let table = object.to_ascii_lowercase();
        let mut findings = Findings {
            pending: Vec::new(),
            to_queue: Vec::new(),
        };
        let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
        let exists = keys::table_exists(&client, &self.data_schema, &table).await?;
        let tx = keys::begin(&mut client).await?;
        let mut replica = if exists {
            Some(ReplicaCursor {
                object: object.to_string(),
                scan: keys::Scan::open(&tx, &self.data_schema, &table, REPLICA_FETCH).await?,
                buf: Vec::new().into_iter(),
                last: None,
                ended: false,
            })
        } else {
            None
        };

        let mut o = org.next().await?;
        let mut r = match &mut replica {
            Some(c) => c.next().await?,
            None => None,
        };
        while o.is_some() || r.is_some() {
            let order = match (&o, &r) {
                (Some(ok), Some(rk)) => ok.id.as_bytes().cmp(rk.id.as_bytes()),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            let (org_key, rep_key) = match order {
                std::cmp::Ordering::Less => (o.take(), None),
                std::cmp::Ordering::Greater => (None, r.take()),
                std::cmp::Ordering::Equal => (o.take(), r.take()),
            };
            if let Some(k) = &org_key {
                if k.deleted {
                    result.org_deleted += 1;
                } else {
                    result.org_live += 1;
                }
            }
            if let Some(k) = &rep_key {
                if k.deleted {
                    result.replica_deleted += 1;
                } else {
                    result.replica_live += 1;
                }
            }
            if let Some(kind) = classify(org_key.as_ref(), rep_key.as_ref()) {
                let id = org_key
                    .as_ref()
                    .map(|k| k.id.clone())
                    .or_else(|| rep_key.as_ref().map(|k| k.id.clone()))
                    .unwrap_or_default();
                if findings.pending.len() < RECHECK_MAX {
                    findings.pending.push((kind, id));
                } else {
                    self.confirm(object, result, &mut findings, kind, id)
                        .await?;
                }
            }
            if org_key.is_some() {
                o = org.next().await?;
            }
            if rep_key.is_some() {
                r = match &mut replica {
                    Some(c) => c.next().await?,
                    None => None,
                };
            }
        }
        drop(replica);
        tx.commit()
            .await
            .map_err(ReplicaError::pg(format!("end reading {object}")))?;
        drop(client);
        org.read.delete_job().await;
        drop(org);

        self.recheck(object, &table, exists, has_deleted, result, &mut findings)
            .await?;
        self.flush_repairs(result, &mut findings).await?;
        Ok(())
    }

    /// Counts a confirmed difference and queues its repair when asked to.
    async fn confirm(
        &self,
        object: &str,
        result: &mut ObjectVerify,
        findings: &mut Findings,
        kind: DriftKind,
        id: String,
    ) -> Result<(), VerifyError> {
        let examples = self.opts.examples;
        let d = result.kind_mut(kind);
        d.count += 1;
        if d.examples.len() < examples {
            d.examples.push(id.clone());
        }
        if self.opts.repair {
            findings.to_queue.push(RepairRequest::Record {
                object: object.to_string(),
                id,
                reason: kind.reason().to_string(),
            });
            if findings.to_queue.len() >= ENQUEUE_BATCH {
                self.flush_repairs(result, findings).await?;
            }
        }
        Ok(())
    }

    async fn flush_repairs(
        &self,
        result: &mut ObjectVerify,
        findings: &mut Findings,
    ) -> Result<(), VerifyError> {
        if findings.to_queue.is_empty() {
            return Ok(());
        }
        let mut client = self.pool.get().await.map_err(ReplicaError::from)?;
        let tx = client
            .transaction()
            .await
            .map_err(ReplicaError::pg("begin queueing repairs"))?;
        repair_queue::enqueue(
            &tx,
            &self.control_schema,
            REPAIR_ORIGIN,
            None,
            &findings.to_queue,
        )
        .await?;
        tx.commit()
            .await
            .map_err(ReplicaError::pg("commit queued repairs"))?;
        result.repairs_queued += findings.to_queue.len() as u64;
        findings.to_queue.clear();
        Ok(())
    }

    /// Reads both sides again for the ids that differed (org first, replica after the
    /// delay) and confirms those that still differ.
    async fn recheck(
        &self,
        object: &str,
        table: &str,
        table_exists: bool,
        has_deleted: bool,
        result: &mut ObjectVerify,
        findings: &mut Findings,
    ) -> Result<(), VerifyError> {
        if findings.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut findings.pending);
        let ids: Vec<String> = pending.iter().map(|(_, id)| id.clone()).collect();
        let org = self.lookup_org(object, &ids, has_deleted).await?;
        tokio::time::sleep(self.opts.recheck_delay).await;
        let replica = if table_exists {
            self.lookup_replica(table, &ids).await?
        } else {
            HashMap::new()
        };
        for (_, id) in pending {
            match classify(org.get(&id), replica.get(&id)) {
                Some(kind) => {
                    self.confirm(object, result, findings, kind, id).await?;
                }
                None => result.settled += 1,
            }
        }
        if result.settled > 0 {
            tracing::info!(
                object,
                settled = result.settled,
                "differences that were gone when checked again (changes in flight)"
            );
        }
        Ok(())
    }

    async fn lookup_org(
        &self,
        object: &str,
        ids: &[String],
        has_deleted: bool,
    ) -> Result<HashMap<String, OrgKey>, VerifyError> {
        let plain: Vec<&String> = ids.iter().filter(|id| is_plain_id(id)).collect();
        let mut out = HashMap::with_capacity(plain.len());
        for batch in plain.chunks(LOOKUP_IDS) {
            let query = Query::select(key_fields(has_deleted), object).ids(batch);
            let mut read = self
                .reader
                .open_rest(&query, LOOKUP_IDS as u32, OrgKeys::new(object));
            while let Some(chunk) = read.next().await {
                for key in chunk?.rows {
                    out.insert(key.id.clone(), key);
                }
            }
        }
        Ok(out)
    }

    async fn lookup_replica(
        &self,
        table: &str,
        ids: &[String],
    ) -> Result<HashMap<String, ReplicaKey>, VerifyError> {
        let client = self.pool.get().await.map_err(ReplicaError::from)?;
        Ok(keys::lookup(&client, &self.data_schema, table, ids).await?)
    }
}

/// The fields of an org key.
fn key_fields(has_deleted: bool) -> &'static [&'static str] {
    if has_deleted {
        &["Id", "SystemModstamp", "IsDeleted"]
    } else {
        &["Id", "SystemModstamp"]
    }
}

/// Org records as keys.
struct OrgKeys {
    object: String,
}

impl OrgKeys {
    fn new(object: &str) -> Arc<OrgKeys> {
        Arc::new(OrgKeys {
            object: object.to_string(),
        })
    }
}

impl Decode for OrgKeys {
    type Row = OrgKey;

    fn object(&self) -> &str {
        &self.object
    }

    fn record(&self, record: &serde_json::Value) -> Result<OrgKey, ReadError> {
        org_key_from_json(&self.object, record)
    }

    fn chunk(&self, chunk: &ResultChunk) -> Result<Vec<OrgKey>, ReadError> {
        org_keys_from_csv(&self.object, chunk)
    }
}

fn org_key_from_json(object: &str, record: &serde_json::Value) -> Result<OrgKey, ReadError> {
    let bad = |message: String| ReadError::BadResult {
        object: object.to_string(),
        message,
    };
    let id = record
        .get("Id")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("a record has no Id".to_string()))?;
    let modstamp_ms = record
        .get("SystemModstamp")
        .and_then(|v| v.as_str())
        .and_then(datetime_ms)
        .ok_or_else(|| bad(format!("record {id} has no readable SystemModstamp")))?;
    let deleted = record
        .get("IsDeleted")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    Ok(OrgKey {
        id: id.to_string(),
        modstamp_ms,
        deleted,
    })
}

fn org_keys_from_csv(object: &str, chunk: &ResultChunk) -> Result<Vec<OrgKey>, ReadError> {
    let bad = |message: String| ReadError::BadResult {
        object: object.to_string(),
        message,
    };
    let mut reader = chunk.reader();
    let header = reader
        .headers()
        .map_err(|e| bad(format!("Bulk result header: {e}")))?
        .clone();
    if header.iter().all(str::is_empty) {
        return Ok(Vec::new());
    }
    let find = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
    let id_at = find("Id").ok_or_else(|| bad("Bulk result has no Id column".to_string()))?;
    let stamp_at = find("SystemModstamp")
        .ok_or_else(|| bad("Bulk result has no SystemModstamp column".to_string()))?;
    let deleted_at = find("IsDeleted");
    let mut keys = Vec::with_capacity(chunk.records.unwrap_or(0).min(1_000_000) as usize);
    let mut record = csv::StringRecord::new();
    while reader
        .read_record(&mut record)
        .map_err(|e| bad(format!("Bulk result record: {e}")))?
    {
        let id = record.get(id_at).unwrap_or_default();
        let stamp = record.get(stamp_at).unwrap_or_default();
        let modstamp_ms = datetime_ms(stamp)
            .ok_or_else(|| bad(format!("record {id} has SystemModstamp `{stamp}`")))?;
        let deleted = deleted_at.and_then(|i| record.get(i)) == Some("true");
        keys.push(OrgKey {
            id: id.to_string(),
            modstamp_ms,
            deleted,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org(id: &str, ms: i64, deleted: bool) -> OrgKey {
        OrgKey {
            id: id.into(),
            modstamp_ms: ms,
            deleted,
        }
    }

    fn rep(id: &str, ms: i64, deleted: bool) -> ReplicaKey {
        ReplicaKey {
            id: id.into(),
            version_ms: ms,
            deleted,
        }
    }

    #[test]
    fn classification() {
        use DriftKind::*;
        let c = |o: Option<OrgKey>, r: Option<ReplicaKey>| classify(o.as_ref(), r.as_ref());
        assert_eq!(c(Some(org("a", 1000, false)), None), Some(Missing));
        assert_eq!(c(Some(org("a", 1000, true)), None), None);
        assert_eq!(c(None, Some(rep("a", 1000, false))), Some(Extra));
        assert_eq!(c(None, Some(rep("a", 1000, true))), None);
        assert_eq!(
            c(Some(org("a", 1000, true)), Some(rep("a", 1000, false))),
            Some(DeletedMismatch)
        );
        assert_eq!(
            c(Some(org("a", 1000, false)), Some(rep("a", 1000, true))),
            Some(DeletedMismatch)
        );
        // Same second: the stream's milliseconds are not newer than the org's second.
        assert_eq!(
            c(Some(org("a", 5000, false)), Some(rep("a", 5999, false))),
            None
        );
        assert_eq!(
            c(Some(org("a", 5000, false)), Some(rep("a", 4999, false))),
            Some(Stale)
        );
        assert_eq!(
            c(Some(org("a", 5000, false)), Some(rep("a", 9000, false))),
            None
        );
        assert_eq!(c(Some(org("a", 9000, true)), Some(rep("a", 1, true))), None);
    }

    #[test]
    fn only_plain_ids_reach_soql() {
        assert!(is_plain_id("001000000000001AAA"));
        assert!(!is_plain_id("001' OR Name != '"));
        assert!(!is_plain_id(""));
    }

    #[test]
    fn summaries_name_kinds_and_examples() {
        let mut v = ObjectVerify::new("Account");
        v.org_live = 3;
        v.replica_live = 3;
        assert!(v.to_string().contains("in sync"));
        v.missing = DriftCount {
            count: 7,
            examples: vec!["001A".into(), "001B".into()],
        };
        let text = v.to_string();
        assert!(text.contains("7 drifted (7 missing)"), "{text}");
        assert!(text.contains("missing: 001A, 001B, ..."), "{text}");
    }
}
