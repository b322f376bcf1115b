//! Snapshot rows (records read over REST or Bulk API) -> the replica, version-guarded.
//!
//! Rows are streamed with binary `COPY` (values typed while parsing, so Postgres parses no
//! text) into a per-transaction staging table and merged with one
//! set-based statement per table.
//!
//! A chunk none of whose records the replica has seen (no row, no tombstone: the first load of
//! an object) is copied straight into the table instead, which is what the merge would do
//! with it at about half the cost. Whatever goes wrong there (a record the stream inserts
//! meanwhile, a column whose type was changed by hand) is rolled back to a savepoint and the
//! chunk takes the staging path, so the guard still decides every row that meets another.
//!
//! Versions. A snapshot row reflects the record as of the read, which is at least its
//! `SystemModstamp` and at least the read's floor: the `Date` of an answer Salesforce gave
//! before the read was asked for (the caller passes it; see `salesforce::rest`). A row is
//! stored with the larger of the two, so stream changes committed before the read are
//! recognised as already included (no re-read), and later ones still apply.
//!
//! Why a snapshot can never undo a newer change (invariant 3): the merge replaces a row only
//! when the row's version is not newer than the snapshot's. A row it leaves alone because the
//! stream already wrote something newer is read again (a record repair is returned), since
//! stream changes carry only their own fields and the snapshot may hold changes the stream
//! never sent; a later read sees the newer state and settles it. Deleted records
//! (`IsDeleted`, from queryAll) become soft-deleted rows or, in hard mode, removals with a
//! tombstone.

use super::ApplySettings;
use super::binary::{self, COPY_HEADER, put_field};
use super::repair_queue::RepairRequest;
use super::schema::{DERIVED_SEEN_COLUMN, PgType, TableSchema};
use super::{ReplicaError, quote};
use crate::config::DeleteMode;
use crate::model::Value;
use crate::model::time::datetime_ms;
use bytes::{BufMut, BytesMut};
use futures::SinkExt;
use std::collections::HashMap;

/// One record as a snapshot saw it. Its values, one per table column in order, are kept as
/// the fields of a binary COPY row (each a length and Postgres' binary form, or -1 for NULL):
/// one allocation per row, written out as is.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub id: String,
    fields: Vec<u8>,
    /// How many columns `fields` holds.
    columns: usize,
    /// `SystemModstamp` in epoch ms.
    pub version_ms: i64,
    pub deleted: bool,
}

fn bad(table: &TableSchema, id: &str, message: String) -> ReplicaError {
    ReplicaError::Data {
        object: table.object.clone(),
        id: id.to_string(),
        message,
    }
}

/// A REST JSON value -> `pg_type`'s binary form (`None` for null).
fn json_value(pg_type: &PgType, value: &serde_json::Value) -> Result<Option<Vec<u8>>, String> {
    use serde_json::Value as J;
    let v = match value {
        J::Null => return Ok(None),
        J::Bool(b) => Value::Boolean(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::Long(i),
            (None, Some(f)) => Value::Double(f),
            _ => Value::String(n.to_string()),
        },
        J::String(s) => Value::String(s.clone()),
        // Compound values (addresses) have no column; their components do.
        J::Object(_) | J::Array(_) => return Err(format!("unexpected structured value {value}")),
    };
    binary::encode(pg_type, &v).map(Some)
}

/// A REST record (query or retrieve answer) -> a snapshot row.
pub fn row_from_json(
    table: &TableSchema,
    record: &serde_json::Value,
) -> Result<SnapshotRow, ReplicaError> {
    let id = record
        .get("Id")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad(table, "?", "record has no Id".to_string()))?
        .to_string();
    let version_ms = ["SystemModstamp", "LastModifiedDate"]
        .iter()
        .find_map(|f| {
            record
                .get(*f)
                .and_then(|v| v.as_str())
                .and_then(datetime_ms)
        })
        // An object without audit fields (rare; some setup objects) has no version of its
        // own: the read itself is the newest thing known about it, so it counts as of now.
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let deleted = record
        .get("IsDeleted")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let mut fields = Vec::with_capacity(table.columns.len() * 16);
    for c in &table.columns {
        let v = record.get(&c.field).unwrap_or(&serde_json::Value::Null);
        let value =
            json_value(&c.pg_type, v).map_err(|m| bad(table, &id, format!("{}: {m}", c.field)))?;
        put_field(&mut fields, value.as_deref());
    }
    Ok(SnapshotRow {
        id,
        fields,
        columns: table.columns.len(),
        version_ms,
        deleted,
    })
}

/// Maps a Bulk API CSV header to column positions, once per result.
pub struct CsvLayout {
    id: usize,
    version: usize,
    deleted: Option<usize>,
    columns: Vec<Option<usize>>,
}

impl CsvLayout {
    pub fn new(table: &TableSchema, header: &[&str]) -> Result<CsvLayout, ReplicaError> {
        let find = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
        let missing = |what: &str| ReplicaError::Schema {
            object: table.object.clone(),
            message: format!("Bulk result has no {what} column"),
        };
        Ok(CsvLayout {
            id: find("Id").ok_or_else(|| missing("Id"))?,
            version: find("SystemModstamp").ok_or_else(|| missing("SystemModstamp"))?,
            deleted: find("IsDeleted"),
            columns: table.columns.iter().map(|c| find(&c.field)).collect(),
        })
    }

    /// One CSV record -> a snapshot row. Empty fields are null, as Bulk API writes them.
    pub fn row(&self, table: &TableSchema, record: &[&str]) -> Result<SnapshotRow, ReplicaError> {
        let get = |i: usize| record.get(i).copied().unwrap_or("");
        let id = get(self.id).to_string();
        let version_ms = datetime_ms(get(self.version)).ok_or_else(|| {
            bad(
                table,
                &id,
                format!("bad SystemModstamp `{}`", get(self.version)),
            )
        })?;
        let deleted = self.deleted.is_some_and(|i| get(i) == "true");
        let mut fields = Vec::with_capacity(record.iter().map(|f| f.len() + 4).sum());
        for (c, pos) in table.columns.iter().zip(&self.columns) {
            let raw = pos.map(get).unwrap_or("");
            if raw.is_empty() {
                put_field(&mut fields, None);
            } else if c.pg_type == PgType::Text {
                put_field(&mut fields, Some(raw.as_bytes()));
            } else {
                let value = binary::encode(&c.pg_type, &Value::String(raw.to_string()))
                    .map_err(|m| bad(table, &id, format!("{}: {m}", c.field)))?;
                put_field(&mut fields, Some(&value));
            }
        }
        Ok(SnapshotRow {
            id,
            fields,
            columns: table.columns.len(),
            version_ms,
            deleted,
        })
    }
}

/// What applying a snapshot did.
#[derive(Debug, Default)]
pub struct SnapshotOutcome {
    pub rows: usize,
    /// Records the stream had changed after the read: to read once more.
    pub repairs: Vec<RepairRequest>,
}

/// Applies `rows` of `table` inside `tx`. `read_floor_ms` is a time in Salesforce's clock
/// that the read certainly happened after, if known.
pub async fn apply_snapshot(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    table: &TableSchema,
    rows: &[SnapshotRow],
    read_floor_ms: Option<i64>,
) -> Result<SnapshotOutcome, ReplicaError> {
    let mut outcome = SnapshotOutcome {
        rows: rows.len(),
        ..Default::default()
    };
    if rows.is_empty() {
        return Ok(outcome);
    }
    if settings.delete_mode == DeleteMode::Hard {
        // No row is left for a hard delete and this merge to meet on: see `locks`.
        super::locks::exclude_writes(tx, &settings.data_schema, &table.object).await?;
    }
    let target = format!("{}.{}", quote(&settings.data_schema), quote(&table.table));
    let ctl = quote(&settings.control_schema);
    let ctx = |what: &str| context(table, what);
    let t0 = std::time::Instant::now();
    if copy_into_new_records(tx, settings, table, rows, read_floor_ms).await? {
        tracing::debug!(
            object = %table.object,
            rows = rows.len(),
            copy_ms = t0.elapsed().as_millis() as u64,
            "snapshot rows copied straight into the table"
        );
        return Ok(outcome);
    }
    // Long values are compressed once, here, and the merge keeps them as they are: with lz4
    // where the table's columns use it.
    let compression = if super::schema::lz4_available(tx).await? {
        " COMPRESSION lz4"
    } else {
        ""
    };
    stage(tx, "_sfm_stage", table, rows, read_floor_ms, compression).await?;
    let copied = t0.elapsed();

    let newer_tombstone = format!(
        "EXISTS (SELECT 1 FROM {ctl}.tombstones ts WHERE ts.object = $1 AND ts.id = s.id
                 AND ts.version > s.v)"
    );
    if settings.delete_mode == DeleteMode::Hard {
        tx.execute(
            &format!(
                "WITH gone AS (
                   DELETE FROM {target} t USING _sfm_stage s
                   WHERE s.d AND t.id = s.id AND t._sfm_version <= s.v)
                 INSERT INTO {ctl}.tombstones AS ts (object, id, version)
                 SELECT $1, s.id, s.v FROM _sfm_stage s WHERE s.d
                 ON CONFLICT (object, id) DO UPDATE SET version = EXCLUDED.version,
                     commit_number = NULL, deleted_at = now()
                 WHERE ts.version < EXCLUDED.version"
            ),
            &[&table.object],
        )
        .await
        .map_err(ReplicaError::pg(ctx("hard deletes")))?;
    }
    let live_filter = if settings.delete_mode == DeleteMode::Hard {
        "NOT s.d AND"
    } else {
        ""
    };
    let mut cols = vec!["id".to_string()];
    let mut select = vec!["s.id".to_string()];
    let mut set = Vec::new();
    for (i, c) in table.columns.iter().enumerate() {
        let q = quote(&c.name);
        cols.push(q.clone());
        select.push(binary::column_expr(&c.pg_type, &format!("s.c{i}")));
        set.push(format!("{q} = EXCLUDED.{q}"));
    }
    cols.extend(["_sfm_version", "_sfm_commit_number", "_sfm_deleted"].map(String::from));
    select.extend(["s.v", "NULL", "s.d"].map(String::from));
    set.extend(
        [
            "_sfm_version = EXCLUDED._sfm_version",
            "_sfm_commit_number = NULL",
            "_sfm_deleted = EXCLUDED._sfm_deleted",
            "_sfm_synced_at = now()",
        ]
        .map(String::from),
    );
    // The read brought the derived columns as of its version (a lower bound of the read):
    // the row does not wait for a re-read of them.
    if table.changes_derive() {
        cols.push(DERIVED_SEEN_COLUMN.to_string());
        select.push("s.v".to_string());
        set.push(format!(
            "{DERIVED_SEEN_COLUMN} = EXCLUDED.{DERIVED_SEEN_COLUMN}"
        ));
    }
    // One statement merges and finds the rows the stream had already moved past the read
    // (left alone by the guard, newer in the table): those are read again. Only rows the merge
    // did not write are probed.
    let newer = tx
        .query(
            &format!(
                "WITH merged AS (
                   INSERT INTO {target} AS t ({cols})
                   SELECT {select} FROM _sfm_stage s
                   WHERE {live_filter} NOT {newer_tombstone}
                   ON CONFLICT (id) DO UPDATE SET {set}
                   WHERE t._sfm_version <= EXCLUDED._sfm_version
                   RETURNING t.id)
                 SELECT s.id FROM _sfm_stage s
                 WHERE NOT EXISTS (SELECT 1 FROM merged m WHERE m.id = s.id)
                   AND EXISTS (SELECT 1 FROM {target} t
                               WHERE t.id = s.id AND t._sfm_version > s.v)",
                cols = cols.join(", "),
                select = select.join(", "),
                set = set.join(", "),
            ),
            &[&table.object],
        )
        .await
        .map_err(ReplicaError::pg(ctx("merge")))?;
    let merged = t0.elapsed();
    for row in newer {
        outcome.repairs.push(RepairRequest::Record {
            object: table.object.clone(),
            id: row.get(0),
            reason: "changed while being read; reading again".to_string(),
        });
    }
    tracing::debug!(
        object = %table.object,
        rows = rows.len(),
        copy_ms = copied.as_millis() as u64,
        merge_ms = (merged - copied).as_millis() as u64,
        "snapshot rows applied"
    );
    Ok(outcome)
}

/// (Re)creates the transaction's temporary table `name` (id, version, deleted, then one column
/// `c<i>` per column of `table`, text and binary ones with `compression`) and copies `rows`
/// into it in binary form.
pub(super) async fn stage(
    tx: &deadpool_postgres::Transaction<'_>,
    name: &str,
    table: &TableSchema,
    rows: &[SnapshotRow],
    read_floor_ms: Option<i64>,
    compression: &str,
) -> Result<(), ReplicaError> {
    let stage_cols: Vec<String> = table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let toasted = matches!(c.pg_type, PgType::Text | PgType::Bytea);
            format!(
                "c{i} {}{}",
                binary::param_type(&c.pg_type),
                if toasted { compression } else { "" }
            )
        })
        .collect();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE IF NOT EXISTS {name} (id text, v bigint, d boolean) ON COMMIT DROP;
         DROP TABLE {name};
         CREATE TEMP TABLE {name} (id text, v bigint, d boolean, {}) ON COMMIT DROP",
        stage_cols.join(", ")
    ))
    .await
    .map_err(ReplicaError::pg(context(table, "staging table")))?;
    copy_rows(
        tx,
        &format!("COPY {name} FROM STDIN (FORMAT binary)"),
        table,
        rows,
        read_floor_ms,
        Layout::Stage,
    )
    .await
}

/// What an error of a snapshot of `table` was doing.
fn context(table: &TableSchema, what: &str) -> String {
    format!("snapshot of {}: {what}", table.object)
}

/// Where a COPY row puts the bookkeeping fields around the table's columns.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// The staging table: id, version, deleted, then the columns.
    Stage,
    /// The replica table itself: id, the columns, version, commit number (NULL), deleted.
    Table,
}

/// Streams `rows` into the COPY `statement` in binary form.
async fn copy_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    statement: &str,
    table: &TableSchema,
    rows: &[SnapshotRow],
    read_floor_ms: Option<i64>,
    layout: Layout,
) -> Result<(), ReplicaError> {
    let ctx = || context(table, "COPY");
    let n = table.columns.len();
    let sink = tx
        .copy_in(statement)
        .await
        .map_err(ReplicaError::pg(ctx()))?;
    futures::pin_mut!(sink);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    buf.put_slice(COPY_HEADER);
    // The table layout ends with the version the derived columns were read for, where the
    // table keeps it: the read's own.
    let seen = layout == Layout::Table && table.changes_derive();
    let extra = if layout == Layout::Stage { 3 } else { 4 } + usize::from(seen);
    let fields = i16::try_from(n + extra).map_err(|_| ReplicaError::Schema {
        object: table.object.clone(),
        message: format!("{n} columns are more than COPY can send"),
    })?;
    for r in rows {
        if r.columns != n {
            return Err(bad(
                table,
                &r.id,
                format!("read with {} columns, the table has {n}", r.columns),
            ));
        }
        buf.put_i16(fields);
        let version = r.version_ms.max(read_floor_ms.unwrap_or(i64::MIN));
        buf.put_i32(r.id.len() as i32);
        buf.put_slice(r.id.as_bytes());
        match layout {
            Layout::Stage => {
                buf.put_i32(8);
                buf.put_i64(version);
                buf.put_i32(1);
                buf.put_u8(u8::from(r.deleted));
                buf.put_slice(&r.fields);
            }
            Layout::Table => {
                buf.put_slice(&r.fields);
                buf.put_i32(8);
                buf.put_i64(version);
                buf.put_i32(-1);
                buf.put_i32(1);
                buf.put_u8(u8::from(r.deleted));
                if seen {
                    buf.put_i32(8);
                    buf.put_i64(version);
                }
            }
        }
        if buf.len() > 512 * 1024 {
            sink.send(buf.split().freeze())
                .await
                .map_err(ReplicaError::pg(ctx()))?;
        }
    }
    buf.put_i16(-1);
    sink.send(buf.freeze())
        .await
        .map_err(ReplicaError::pg(ctx()))?;
    sink.finish().await.map_err(ReplicaError::pg(ctx()))?;
    Ok(())
}

/// Copies the chunk straight into the table when none of its records has a row or a
/// tombstone there (in hard mode, and only if none is deleted: those need tombstones). Then
/// every row is one the guarded merge would insert as it is. Returns false, having changed
/// nothing, when that does not hold or the COPY fails (the savepoint undoes it): a record
/// another transaction wrote since the look, or column types the COPY does not fit; the
/// caller then merges through the staging table, which decides those rows by version.
async fn copy_into_new_records(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    table: &TableSchema,
    rows: &[SnapshotRow],
    read_floor_ms: Option<i64>,
) -> Result<bool, ReplicaError> {
    if settings.delete_mode == DeleteMode::Hard && rows.iter().any(|r| r.deleted) {
        return Ok(false);
    }
    let target = format!("{}.{}", quote(&settings.data_schema), quote(&table.table));
    let ctl = quote(&settings.control_schema);
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let seen: bool = tx
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM {target} WHERE id = ANY($1::text[]))
                     OR EXISTS (SELECT 1 FROM {ctl}.tombstones
                                WHERE object = $2 AND id = ANY($1::text[]))"
            ),
            &[&ids, &table.object],
        )
        .await
        .map_err(ReplicaError::pg(context(table, "look for known records")))?
        .get(0);
    if seen {
        return Ok(false);
    }
    // Binary input is only safe into the very types it was written for (the check the merge
    // makes before sending rows as the table's row type): bytes of an integer would go into
    // a column changed to text by hand without complaint. Such a table merges through the
    // staging table, whose INSERT converts.
    let tables = HashMap::from([(table.table.as_str(), table)]);
    let types = super::apply::row_types(tx, &settings.data_schema, &tables).await?;
    if !types.get(&table.table).is_some_and(|t| t.fits_table(table)) {
        return Ok(false);
    }
    let savepoint = |what: &str| ReplicaError::pg(context(table, what));
    tx.batch_execute("SAVEPOINT sfm_direct_copy")
        .await
        .map_err(savepoint("savepoint"))?;
    let mut cols = vec!["id".to_string()];
    cols.extend(table.columns.iter().map(|c| quote(&c.name)));
    cols.extend(["_sfm_version", "_sfm_commit_number", "_sfm_deleted"].map(String::from));
    if table.changes_derive() {
        cols.push(DERIVED_SEEN_COLUMN.to_string());
    }
    let statement = format!(
        "COPY {target} ({}) FROM STDIN (FORMAT binary)",
        cols.join(", ")
    );
    match copy_rows(tx, &statement, table, rows, read_floor_ms, Layout::Table).await {
        Ok(()) => {
            tx.batch_execute("RELEASE SAVEPOINT sfm_direct_copy")
                .await
                .map_err(savepoint("release savepoint"))?;
            Ok(true)
        }
        // A bad row is the same error on the staging path: report it now.
        Err(e @ ReplicaError::Data { .. }) => Err(e),
        Err(e) => {
            tracing::debug!(object = %table.object, error = %e,
                "straight copy refused; merging the chunk through the staging table");
            tx.batch_execute("ROLLBACK TO SAVEPOINT sfm_direct_copy")
                .await
                .map_err(savepoint("roll back to savepoint"))?;
            Ok(false)
        }
    }
}
