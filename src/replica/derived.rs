//! Derived columns: which records wait for a re-read, and writing what a re-read returned.
//!
//! Derived columns (`schema::Column::derived`: formula fields, a person-name `name`, fields
//! Salesforce documents as never sent in change events) get no value from the stream, and
//! their value changes without an event. On an object whose records' own changes move them
//! (`TableSchema::changes_derive`), the row remembers the stream version its derived columns
//! were last read for (`_sfm_derived_seen`): a row the stream changed since is waiting for a
//! re-read, found through a partial index ([`schema::DERIVED_STALE`]). The obligation is
//! written by the very statement that applies the change, in the batch's transaction
//! (invariant 1: a crash loses none), at the cost of one index entry and no extra statement;
//! a record changed a hundred times waits once. `sync::derived` re-reads them a window later,
//! many per call.
//!
//! Why a re-read cannot undo anything newer:
//! - It writes only the derived columns, never the stream's own, and never a deleted row.
//! - Its version is Salesforce's time of the read (the answer's `Date`), kept per row in
//!   `_sfm_derived_version`, separate from the stream's `_sfm_version`: a re-read replaces
//!   derived values only when it is not older than the last one applied, so it never loses
//!   to the stream's millisecond versions and an old read arriving late changes nothing.
//! - A row counts as read only for the stream version the re-read saw before it asked
//!   Salesforce: a change the stream applies while the record is being read leaves the row
//!   waiting, and it is read again. A sweep marks rows read only for changes Salesforce
//!   committed before the sweep's read began (by Salesforce's clock).
//! - It never waits for a row lock: rows a batch holds are skipped (`SKIP LOCKED`) and keep
//!   waiting, so the re-read and the stream cannot deadlock and the stream never waits long.

use super::binary;
use super::schema::{
    DERIVED_SEEN_COLUMN, DERIVED_STALE, DERIVED_VERSION_COLUMN, TableSchema, VERSION_COLUMN,
};
use super::snapshot::SnapshotRow;
use super::{ApplySettings, ReplicaError, quote};
use deadpool_postgres::GenericClient;

/// A record waiting for a re-read, at the stream version the re-read is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub id: String,
    pub version: i64,
}

/// Up to `limit` rows of `table` (a table that `changes_derive`) waiting for a re-read.
pub async fn stale(
    client: &impl GenericClient,
    data_schema: &str,
    table: &str,
    limit: i64,
) -> Result<Vec<Stale>, ReplicaError> {
    let target = format!("{}.{}", quote(data_schema), quote(table));
    let rows = client
        .query(
            &format!("SELECT id, {VERSION_COLUMN} FROM {target} WHERE {DERIVED_STALE} LIMIT $1"),
            &[&limit],
        )
        .await
        .map_err(ReplicaError::pg(format!(
            "find the rows of {table} waiting for a derived re-read"
        )))?;
    Ok(rows
        .iter()
        .map(|r| Stale {
            id: r.get(0),
            version: r.get(1),
        })
        .collect())
}

/// Moves what the first queue (migration 008's `derived_refresh`, no longer written) still
/// holds for `object` into its rows: they wait for a re-read like any changed row. Returns how
/// many it moved.
pub async fn adopt_queue(
    client: &impl GenericClient,
    settings: &ApplySettings,
    table: &TableSchema,
) -> Result<u64, ReplicaError> {
    let ctl = quote(&settings.control_schema);
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{ctl}.derived_refresh")],
        )
        .await
        .map_err(ReplicaError::pg("look for the first derived re-read queue"))?
        .get(0);
    if !exists || !table.changes_derive() {
        return Ok(0);
    }
    let target = format!("{}.{}", quote(&settings.data_schema), quote(&table.table));
    let object = &table.object;
    client
        .execute(
            &format!(
                "WITH q AS (DELETE FROM {ctl}.derived_refresh WHERE object = $1
                            RETURNING record_id)
                 UPDATE {target} SET {DERIVED_SEEN_COLUMN} = NULL
                 WHERE id IN (SELECT record_id FROM q)"
            ),
            &[object],
        )
        .await
        .map_err(ReplicaError::pg(format!(
            "move the queued derived re-reads of {object} into its rows"
        )))
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
/// before the read began (a lower bound, its `Date`). A row it writes counts as read for its
/// stream version when Salesforce committed that version before `version_ms`: the read began
/// after it, so it saw its effect. Returns how many rows were written. Rows a batch holds
/// locked are skipped rather than waited for: the sweep never waits on the stream, so the two
/// can never deadlock, and a skipped row is being changed (it then waits for a re-read, or the
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
    let mut set = stage(tx, projection, rows).await?;
    if projection.changes_derive() {
        set.push_str(&format!(
            ", {DERIVED_SEEN_COLUMN} = CASE WHEN t.{VERSION_COLUMN} < $1
                                       THEN t.{VERSION_COLUMN} ELSE t.{DERIVED_SEEN_COLUMN} END"
        ));
    }
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

/// Writes the re-read derived values `rows` (as [`apply`]) of the `stale` records, and marks
/// each of them read for the stream version it had when the read was asked for, if it still
/// has it: written, read as deleted or missing in the org, or already covered by a newer
/// read. A row the stream changed since keeps waiting and is read again. Rows a batch holds
/// locked are skipped, not waited for (so this never deadlocks with the stream), and keep
/// waiting for the next window. `projection` is that of a table that `changes_derive` (it has
/// derived columns). Returns (rows written, rows marked read).
pub async fn refresh(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    projection: &TableSchema,
    rows: &[SnapshotRow],
    version_ms: i64,
    stale: &[Stale],
) -> Result<(u64, u64), ReplicaError> {
    let target = format!(
        "{}.{}",
        quote(&settings.data_schema),
        quote(&projection.table)
    );
    let object = &projection.object;
    let set = stage(tx, projection, rows).await?;
    let write = format!(
        "UPDATE {target} t SET {set}, {DERIVED_VERSION_COLUMN} = $1,
                               {DERIVED_SEEN_COLUMN} = t.{VERSION_COLUMN}
         FROM _sfm_derived s
         WHERE t.id = s.id AND t.id IN (SELECT id FROM r) AND {GUARD}
         RETURNING t.id"
    );
    let ids: Vec<&str> = stale.iter().map(|q| q.id.as_str()).collect();
    let versions: Vec<i64> = stale.iter().map(|q| q.version).collect();
    let row = tx
        .query_one(
            &format!(
                "WITH r AS (SELECT t.id FROM {target} t
                            JOIN unnest($2::text[], $3::bigint[]) AS s(id, v)
                              ON t.id = s.id AND t.{VERSION_COLUMN} = s.v
                            FOR UPDATE OF t SKIP LOCKED),
                      u AS ({write}),
                      rest AS (UPDATE {target} t SET {DERIVED_SEEN_COLUMN} = t.{VERSION_COLUMN}
                               WHERE t.id IN (SELECT id FROM r)
                                 AND t.id NOT IN (SELECT id FROM u)
                               RETURNING 1)
                 SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM rest)"
            ),
            &[&version_ms, &ids, &versions],
        )
        .await
        .map_err(ReplicaError::pg(format!(
            "derived columns of {object}: re-read"
        )))?;
    let written = row.get::<_, i64>(0) as u64;
    Ok((written, written + row.get::<_, i64>(1) as u64))
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

/// Each of `objects` whose table follows changes with re-reads or that has a sweep schedule.
pub async fn summary(
    client: &impl GenericClient,
    settings: &ApplySettings,
    objects: &[String],
) -> Result<Vec<Summary>, ReplicaError> {
    let ctl = quote(&settings.control_schema);
    let mut out = Vec::new();
    for object in objects {
        let table = object.to_ascii_lowercase();
        let follows: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                                WHERE table_schema = $1 AND table_name = $2
                                  AND column_name = $3)",
                &[&settings.data_schema, &table, &DERIVED_SEEN_COLUMN],
            )
            .await
            .map_err(ReplicaError::pg(format!("columns of {table}")))?
            .get(0);
        let queued: i64 = if follows {
            let target = format!("{}.{}", quote(&settings.data_schema), quote(&table));
            client
                .query_one(
                    &format!("SELECT count(*) FROM {target} WHERE {DERIVED_STALE}"),
                    &[],
                )
                .await
                .map_err(ReplicaError::pg(format!(
                    "count the rows of {table} waiting for a derived re-read"
                )))?
                .get(0)
        } else {
            0
        };
        let sweep = client
            .query_opt(
                &format!(
                    "SELECT (extract(epoch FROM completed_at) * 1000)::bigint, error
                     FROM {ctl}.derived_sweeps WHERE object = $1"
                ),
                &[object],
            )
            .await
            .map_err(ReplicaError::pg(format!("read the sweeps of {object}")))?;
        if !follows && sweep.is_none() {
            continue;
        }
        out.push(Summary {
            object: object.clone(),
            queued,
            swept_ms: sweep.as_ref().and_then(|r| r.get(0)),
            sweep_error: sweep.as_ref().and_then(|r| r.get(1)),
        });
    }
    Ok(out)
}
