//! Derived columns: the queue of records to re-read, and writing what a re-read returned.
//!
//! Derived columns (`schema::Column::derived`: formula fields, a person-name `name`, fields
//! Salesforce documents as never sent in change events) get no value from the stream, and
//! their value changes without an event. So every batch that changes a record of such an
//! object queues the record here, in the batch's own transaction (invariant 1: a crash loses
//! no obligation), and `sync::derived` re-reads the queued records' derived fields a window
//! later, many per call.
//!
//! Why a re-read cannot undo anything newer:
//! - It writes only the derived columns, never the stream's own, and never a deleted row.
//! - Its version is Salesforce's time of the read (the answer's `Date`), kept per row in
//!   `_sfm_derived_version`, separate from the stream's `_sfm_version`: a re-read replaces
//!   derived values only when it is not older than the last one applied, so it never loses
//!   to the stream's millisecond versions and an old read arriving late changes nothing.
//! - The queue row is removed only if its `seq` is the one the re-read saw: a change that
//!   arrives while the record is being read re-queues it (new `seq`), and it is read again.
//! - It never waits for a row lock: rows a batch holds are skipped (`SKIP LOCKED`) and stay
//!   queued, so the re-read and the stream cannot deadlock and the stream never waits long.

use super::binary;
use super::schema::{DERIVED_VERSION_COLUMN, TableSchema};
use super::snapshot::SnapshotRow;
use super::{ApplySettings, ReplicaError, quote};
use deadpool_postgres::GenericClient;

/// Queues `ids` of `object` for a re-read of their derived columns (each id at most once).
pub async fn enqueue(
    tx: &impl GenericClient,
    control_schema: &str,
    object: &str,
    ids: &[String],
) -> Result<(), ReplicaError> {
    if ids.is_empty() {
        return Ok(());
    }
    let ctl = quote(control_schema);
    tx.execute(
        &format!(
            "INSERT INTO {ctl}.derived_refresh AS d (object, record_id)
             SELECT $1, i FROM (SELECT DISTINCT unnest($2::text[]) AS i) ids
             ON CONFLICT (object, record_id) DO UPDATE
             SET seq = EXCLUDED.seq, queued_at = EXCLUDED.queued_at"
        ),
        &[&object, &ids],
    )
    .await
    .map_err(ReplicaError::pg(format!(
        "queue derived re-reads of {object}"
    )))?;
    Ok(())
}

/// A queued record as a re-read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub id: String,
    pub seq: i64,
}

/// Up to `limit` queued records of `object`, oldest first.
pub async fn queued(
    client: &impl GenericClient,
    control_schema: &str,
    object: &str,
    limit: i64,
) -> Result<Vec<Queued>, ReplicaError> {
    let ctl = quote(control_schema);
    let rows = client
        .query(
            &format!(
                "SELECT record_id, seq FROM {ctl}.derived_refresh WHERE object = $1
                 ORDER BY seq LIMIT $2"
            ),
            &[&object, &limit],
        )
        .await
        .map_err(ReplicaError::pg(format!(
            "read the derived re-read queue of {object}"
        )))?;
    Ok(rows
        .iter()
        .map(|r| Queued {
            id: r.get(0),
            seq: r.get(1),
        })
        .collect())
}

/// Copies `rows` of `projection` into the transaction's staging table `_sfm_derived`, and
/// returns the `SET` list that writes its values to the table's derived columns.
async fn stage(
    tx: &deadpool_postgres::Transaction<'_>,
    projection: &TableSchema,
    rows: &[SnapshotRow],
) -> Result<String, ReplicaError> {
    super::snapshot::stage(tx, "_sfm_derived", projection, rows, None, "").await?;
    let set: Vec<String> = projection
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!(
                "{} = {}",
                quote(&c.name),
                binary::column_expr(&c.pg_type, &format!("s.c{i}"))
            )
        })
        .collect();
    Ok(set.join(", "))
}

/// The guard of a re-read's write: a live row, a record read as live, and no newer re-read.
const GUARD: &str = "NOT t._sfm_deleted AND NOT s.d AND \
    (t._sfm_derived_version IS NULL OR t._sfm_derived_version <= $1)";

/// Writes swept derived values: `projection` is the table's derived projection
/// (`TableSchema::derived_projection`) and `rows` its rows; `version_ms` is Salesforce's time
/// of the read (a lower bound). Returns how many rows were written. Rows a batch holds locked
/// are skipped rather than waited for: the re-read never waits on the stream, so the two can
/// never deadlock, and a skipped row is being changed (its change queues a re-read, or the
/// next sweep reads it).
pub async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    projection: &TableSchema,
    rows: &[SnapshotRow],
    version_ms: i64,
) -> Result<u64, ReplicaError> {
    if rows.is_empty() || projection.columns.is_empty() {
        return Ok(0);
    }
    let target = format!(
        "{}.{}",
        quote(&settings.data_schema),
        quote(&projection.table)
    );
    let set = stage(tx, projection, rows).await?;
    tx.execute(
        &format!(
            "WITH r AS (SELECT t.id FROM {target} t JOIN _sfm_derived s ON t.id = s.id
                        FOR UPDATE OF t SKIP LOCKED)
             UPDATE {target} t SET {set}, {DERIVED_VERSION_COLUMN} = $1
             FROM _sfm_derived s
             WHERE t.id = s.id AND t.id IN (SELECT id FROM r) AND {GUARD}"
        ),
        &[&version_ms],
    )
    .await
    .map_err(ReplicaError::pg(format!(
        "derived columns of {}: update",
        projection.object
    )))
}

/// Writes re-read derived values of the `queued` records (as [`apply`]) and removes the queue
/// rows the read covered: those still carrying the `seq` it saw, whose row was written or is
/// not in the replica. Queue rows and table rows that a batch holds locked are skipped, not
/// waited for (so this never deadlocks with the stream), and stay queued for the next window.
/// Returns (rows written, queue rows removed).
pub async fn refresh(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    projection: &TableSchema,
    rows: &[SnapshotRow],
    version_ms: i64,
    queued: &[Queued],
) -> Result<(u64, u64), ReplicaError> {
    let target = format!(
        "{}.{}",
        quote(&settings.data_schema),
        quote(&projection.table)
    );
    let ctl = quote(&settings.control_schema);
    let object = &projection.object;
    let set = stage(tx, projection, rows).await?;
    let write = if projection.columns.is_empty() {
        "SELECT NULL::text AS id WHERE false".to_string()
    } else {
        format!(
            "UPDATE {target} t SET {set}, {DERIVED_VERSION_COLUMN} = $1
             FROM _sfm_derived s
             WHERE t.id = s.id AND t.id IN (SELECT id FROM r) AND {GUARD}
             RETURNING t.id"
        )
    };
    let ids: Vec<&str> = queued.iter().map(|q| q.id.as_str()).collect();
    let seqs: Vec<i64> = queued.iter().map(|q| q.seq).collect();
    let row = tx
        .query_one(
            &format!(
                "WITH q AS (SELECT d.record_id FROM {ctl}.derived_refresh d
                            JOIN unnest($3::text[], $4::bigint[]) AS s(id, seq)
                              ON d.record_id = s.id AND d.seq = s.seq
                            WHERE d.object = $2
                            FOR UPDATE OF d SKIP LOCKED),
                      r AS (SELECT t.id FROM {target} t WHERE t.id IN (SELECT record_id FROM q)
                            FOR UPDATE OF t SKIP LOCKED),
                      u AS ({write}),
                      gone AS (DELETE FROM {ctl}.derived_refresh d
                               WHERE d.object = $2 AND d.record_id IN (SELECT record_id FROM q)
                                 AND (d.record_id IN (SELECT id FROM r)
                                      OR NOT EXISTS (SELECT 1 FROM {target} t2
                                                     WHERE t2.id = d.record_id))
                               RETURNING 1)
                 SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM gone)"
            ),
            &[&version_ms, object, &ids, &seqs],
        )
        .await
        .map_err(ReplicaError::pg(format!(
            "derived columns of {object}: re-read"
        )))?;
    Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
}

/// Starts `object`'s sweep schedule at its first sight: the first sweep is due one interval
/// later (a backfill has just read every derived value; there is nothing to sweep yet).
/// Returns whether the schedule was new.
pub async fn schedule_sweeps(
    client: &impl GenericClient,
    control_schema: &str,
    object: &str,
) -> Result<bool, ReplicaError> {
    let ctl = quote(control_schema);
    let n = client
        .execute(
            &format!(
                "INSERT INTO {ctl}.derived_sweeps (object, started_at) VALUES ($1, now())
                 ON CONFLICT (object) DO NOTHING"
            ),
            &[&object],
        )
        .await
        .map_err(ReplicaError::pg(format!("schedule the sweeps of {object}")))?;
    Ok(n == 1)
}

/// Notes that a sweep of `object` started now.
pub async fn sweep_started(
    client: &impl GenericClient,
    control_schema: &str,
    object: &str,
) -> Result<(), ReplicaError> {
    let ctl = quote(control_schema);
    client
        .execute(
            &format!(
                "INSERT INTO {ctl}.derived_sweeps (object, started_at) VALUES ($1, now())
                 ON CONFLICT (object) DO UPDATE SET started_at = now(), error = NULL"
            ),
            &[&object],
        )
        .await
        .map_err(ReplicaError::pg(format!("record the sweep of {object}")))?;
    Ok(())
}

/// Notes how a sweep of `object` ended: `Ok(rows)` or the error it stopped on.
pub async fn sweep_ended(
    client: &impl GenericClient,
    control_schema: &str,
    object: &str,
    outcome: Result<i64, String>,
) -> Result<(), ReplicaError> {
    let ctl = quote(control_schema);
    let (rows, error) = match outcome {
        Ok(rows) => (Some(rows), None),
        Err(error) => (None, Some(error)),
    };
    let done = client
        .execute(
            &format!(
                "UPDATE {ctl}.derived_sweeps
                 SET completed_at = CASE WHEN $3::text IS NULL THEN now() ELSE completed_at END,
                     rows = coalesce($2, rows), error = $3
                 WHERE object = $1"
            ),
            &[&object, &rows, &error],
        )
        .await;
    done.map_err(ReplicaError::pg(format!("record the sweep of {object}")))?;
    Ok(())
}

/// Seconds since `object`'s last sweep started, `None` if it never was.
pub async fn since_last_sweep(
    client: &impl GenericClient,
    control_schema: &str,
    object: &str,
) -> Result<Option<f64>, ReplicaError> {
    let ctl = quote(control_schema);
    let row = client
        .query_opt(
            &format!(
                "SELECT extract(epoch FROM now() - started_at)::float8 FROM {ctl}.derived_sweeps
                 WHERE object = $1 AND started_at IS NOT NULL"
            ),
            &[&object],
        )
        .await
        .map_err(ReplicaError::pg(format!("read the sweep of {object}")))?;
    Ok(row.map(|r| r.get(0)))
}

/// One object's derived-column state, for `sfmirror status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub object: String,
    /// Records waiting for a re-read.
    pub queued: i64,
    /// When the last sweep completed (epoch ms), and the error the last one stopped on.
    pub swept_ms: Option<i64>,
    pub sweep_error: Option<String>,
}

/// Every object with queued re-reads or a sweep schedule.
pub async fn summary(
    client: &impl GenericClient,
    control_schema: &str,
) -> Result<Vec<Summary>, ReplicaError> {
    let ctl = quote(control_schema);
    let rows = client
        .query(
            &format!(
                "SELECT o.object, coalesce(q.n, 0),
                        (extract(epoch FROM s.completed_at) * 1000)::bigint, s.error
                 FROM (SELECT object FROM {ctl}.derived_refresh
                       UNION SELECT object FROM {ctl}.derived_sweeps) o
                 LEFT JOIN (SELECT object, count(*) AS n FROM {ctl}.derived_refresh
                            GROUP BY object) q USING (object)
                 LEFT JOIN {ctl}.derived_sweeps s USING (object)
                 ORDER BY o.object"
            ),
            &[],
        )
        .await
        .map_err(ReplicaError::pg("read the derived-column state"))?;
    Ok(rows
        .iter()
        .map(|r| Summary {
            object: r.get(0),
            queued: r.get(1),
            swept_ms: r.get(2),
            sweep_error: r.get(3),
        })
        .collect())
}
