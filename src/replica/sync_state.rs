//! Per-object snapshot bookkeeping in `<control_schema>.object_sync_state`: when the last
//! complete snapshot started (every change before it is in the replica), and the snapshot in
//! progress, with the Bulk job and the locator of its next chunk so that an interrupted
//! backfill resumes where it stopped.
//!
//! Why resuming is safe: [`record_running`] is called in the transaction that applies a
//! chunk, with the locator of the chunk after it, so the stored locator never runs ahead of
//! the rows. [`record_completed`] moves `snapshot_started_at` only when the snapshot covered
//! every record changed since the previous complete one started.

use super::{ReplicaError, quote};

/// A snapshot in progress, as a backfill left it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Running {
    /// When it started (epoch ms).
    pub started_ms: Option<i64>,
    /// The Bulk job it reads (full snapshots only).
    pub job_id: Option<String>,
    /// The locator of the next chunk to apply.
    pub locator: Option<String>,
}

/// The snapshot of `object` in progress, if any.
pub async fn load_running(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    object: &str,
) -> Result<Running, ReplicaError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT (extract(epoch FROM running_started_at) * 1000)::bigint,
                        running_job_id, running_locator
                 FROM {}.object_sync_state WHERE object = $1",
                quote(control_schema)
            ),
            &[&object],
        )
        .await
        .map_err(ReplicaError::pg(format!("sync state of {object}")))?;
    Ok(row
        .map(|r| Running {
            started_ms: r.get(0),
            job_id: r.get(1),
            locator: r.get(2),
        })
        .unwrap_or_default())
}

/// Records the snapshot of `object` in progress. Call it in the transaction of the chunk the
/// locator follows.
pub async fn record_running(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    object: &str,
    started_ms: i64,
    job_id: Option<&str>,
    locator: Option<&str>,
) -> Result<(), ReplicaError> {
    client
        .execute(
            &format!(
                "INSERT INTO {}.object_sync_state AS s
                   (object, running_started_at, running_job_id, running_locator, updated_at)
                 VALUES ($1, to_timestamp($2::bigint / 1000.0), $3, $4, now())
                 ON CONFLICT (object) DO UPDATE SET
                   running_started_at = EXCLUDED.running_started_at,
                   running_job_id = EXCLUDED.running_job_id,
                   running_locator = EXCLUDED.running_locator, updated_at = now()",
                quote(control_schema)
            ),
            &[&object, &started_ms, &job_id, &locator],
        )
        .await
        .map_err(ReplicaError::pg(format!("record the progress of {object}")))?;
    Ok(())
}

/// Records a completed snapshot of `object` that started at `started_ms` and read `rows`
/// rows, and clears the one in progress. A full snapshot (`since_ms` `None`) becomes the
/// object's start; a window from `since_ms` does only when it reaches back to the previous
/// complete snapshot's start (otherwise older changes might be missing).
pub async fn record_completed(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    object: &str,
    started_ms: i64,
    since_ms: Option<i64>,
    rows: i64,
) -> Result<(), ReplicaError> {
    client
        .execute(
            &format!(
                "INSERT INTO {ctl}.object_sync_state AS s
                   (object, snapshot_started_at, snapshot_completed_at, snapshot_rows,
                    running_started_at, running_job_id, running_locator, updated_at)
                 VALUES ($1, CASE WHEN $3::bigint IS NULL
                                  THEN to_timestamp($2::bigint / 1000.0) END,
                         now(), $4, NULL, NULL, NULL, now())
                 ON CONFLICT (object) DO UPDATE SET
                   snapshot_started_at = CASE
                     WHEN $3::bigint IS NULL
                       OR s.snapshot_started_at >= to_timestamp($3::bigint / 1000.0)
                     THEN to_timestamp($2::bigint / 1000.0)
                     ELSE s.snapshot_started_at END,
                   snapshot_completed_at = now(), snapshot_rows = $4,
                   running_started_at = NULL, running_job_id = NULL,
                   running_locator = NULL, updated_at = now()",
                ctl = quote(control_schema)
            ),
            &[&object, &started_ms, &since_ms, &rows],
        )
        .await
        .map_err(ReplicaError::pg(format!("record the snapshot of {object}")))?;
    Ok(())
}

/// When the last complete snapshot of `object` started (epoch ms), if one completed.
pub async fn snapshot_started_ms(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    object: &str,
) -> Result<Option<i64>, ReplicaError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT (extract(epoch FROM snapshot_started_at) * 1000)::bigint
                 FROM {}.object_sync_state WHERE object = $1",
                quote(control_schema)
            ),
            &[&object],
        )
        .await
        .map_err(ReplicaError::pg(format!("snapshot state of {object}")))?;
    Ok(row.and_then(|r| r.get(0)))
}

/// One object's snapshot state, as `status` shows it (times in epoch ms).
#[derive(Debug, Clone)]
pub struct ObjectState {
    pub object: String,
    pub snapshot_started_ms: Option<i64>,
    pub snapshot_completed_ms: Option<i64>,
    pub snapshot_rows: Option<i64>,
    /// A snapshot in progress since then.
    pub running_started_ms: Option<i64>,
}

/// Every object's snapshot state, by object name.
pub async fn list(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
) -> Result<Vec<ObjectState>, ReplicaError> {
    let ms = |column: &str| format!("(extract(epoch FROM {column}) * 1000)::bigint");
    let rows = client
        .query(
            &format!(
                "SELECT object, {}, {}, snapshot_rows, {}
                 FROM {}.object_sync_state ORDER BY object",
                ms("snapshot_started_at"),
                ms("snapshot_completed_at"),
                ms("running_started_at"),
                quote(control_schema)
            ),
            &[],
        )
        .await
        .map_err(ReplicaError::pg("reading snapshot state"))?;
    Ok(rows
        .iter()
        .map(|r| ObjectState {
            object: r.get(0),
            snapshot_started_ms: r.get(1),
            snapshot_completed_ms: r.get(2),
            snapshot_rows: r.get(3),
            running_started_ms: r.get(4),
        })
        .collect())
}
