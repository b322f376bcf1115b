//! The merge: a batch of change events -> version-guarded, set-based SQL in the caller's
//! transaction.
//!
//! Events become row operations (one per record id), gathered into runs by table, kind and
//! column set; each run goes out as one `INSERT .. SELECT FROM unnest(..) ON CONFLICT`
//! statement, not one round trip per event. UPDATE and soft DELETE runs first try a plain
//! `UPDATE .. FROM unnest(..)` with the same guards, which is cheaper for rows that exist,
//! and fall back to the `ON CONFLICT` form only when some row was not updated. Planning ([`plan_events`]: runs, rendered values,
//! repairs) needs no connection and is kept apart from sending ([`execute`]), so a caller can
//! plan the next batch while Postgres applies this one. Per-record order is kept: a change joins the
//! newest run of its shape only if no run opened after it touched the same record (so two
//! changes of one record never meet in one statement), and runs execute in opening order.
//!
//! Why replays are harmless (invariant 3): every write carries the change's version
//! (`commitTimestamp` ms, `commitNumber` as tie-breaker) and only replaces a row whose version
//! is not newer; deletes leave the version behind (soft: the row with `_sfm_deleted`; hard: a
//! tombstone), so an older change cannot resurrect a record. Field-level merge (invariant 4):
//! an UPDATE writes exactly the columns `changedFields` names and nulls exactly those
//! `nulledFields` names. What the event cannot carry (gaps, overflows, diff fields, an UPDATE
//! for a record the replica lacks) becomes a [`RepairRequest`] that the caller commits in the
//! same transaction (invariant 2).

use super::schema::TableSchema;
use super::{ReplicaError, quote};
use crate::config::DeleteMode;
use crate::model::{ChangeEvent, ChangeType};
use std::collections::HashMap;
use std::sync::Arc;

/// What the stream could not deliver, to be fetched over REST.
#[derive(Debug, Clone, PartialEq)]
pub enum RepairRequest {
    /// Re-read one record.
    Record {
        object: String,
        id: String,
        reason: String,
    },
    /// Re-read every record of `object` changed since `since_ms` (epoch ms).
    Entity {
        object: String,
        since_ms: i64,
        reason: String,
    },
}

/// Settings of the merge.
#[derive(Debug, Clone)]
pub struct ApplySettings {
    pub data_schema: String,
    pub control_schema: String,
    pub delete_mode: DeleteMode,
    /// Subtracted from a gap's commit time for entity repairs, in ms.
    pub repair_margin_ms: i64,
}

/// What a batch did.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    /// Events per change type.
    pub events: HashMap<ChangeType, u64>,
    pub statements: usize,
    pub repairs: Vec<RepairRequest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OpKind {
    /// CREATE / UNDELETE: every column the writer schema carries.
    Upsert,
    /// UPDATE: the changed and nulled columns only.
    Merge,
    Delete,
}

struct Op {
    id: String,
    values: Vec<Option<String>>,
    version: i64,
    commit_number: i64,
}

/// A run of operations that goes out as one statement.
struct Run {
    table: Arc<TableSchema>,
    kind: OpKind,
    columns: Vec<usize>,
    ops: Vec<Op>,
}

/// A batch turned into runs of rows, ready to send: everything [`apply_events`] does that needs
/// no connection. Built apart from the transaction so that a caller can prepare the next batch
/// while Postgres works on this one.
pub struct MergePlan {
    runs: Vec<Run>,
    events: HashMap<ChangeType, u64>,
    repairs: Vec<RepairRequest>,
}

impl MergePlan {
    /// Repairs the batch needs so far (more can come from executing it).
    pub fn repairs(&self) -> &[RepairRequest] {
        &self.repairs
    }
}

/// Identifies a table within one call (tables are shared, so their address is stable).
fn table_key(table: &Arc<TableSchema>) -> usize {
    Arc::as_ptr(table) as usize
}

/// For each (table, kind): the column sets seen and the newest run of each.
type OpenRuns = HashMap<(usize, OpKind), Vec<(Vec<usize>, usize)>>;

/// Applies `events` in order inside `tx`. `tables` must hold every entity of the batch.
pub async fn apply_events(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    tables: &HashMap<String, Arc<TableSchema>>,
    events: &[ChangeEvent],
) -> Result<ApplyOutcome, ReplicaError> {
    let plan = plan_events(settings, tables, events)?;
    execute(tx, settings, plan).await
}

/// Sends a plan's runs inside `tx`, in the order they were opened: every record sees its
/// changes in order.
pub async fn execute(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    plan: MergePlan,
) -> Result<ApplyOutcome, ReplicaError> {
    let mut outcome = ApplyOutcome {
        events: plan.events,
        statements: 0,
        repairs: plan.repairs,
    };
    for run in plan.runs {
        flush(tx, settings, run, &mut outcome).await?;
    }
    Ok(outcome)
}

/// Turns `events` into runs (see the module docs) and the repairs they need, without I/O.
/// `tables` must hold every entity of the batch.
pub fn plan_events(
    settings: &ApplySettings,
    tables: &HashMap<String, Arc<TableSchema>>,
    events: &[ChangeEvent],
) -> Result<MergePlan, ReplicaError> {
    let mut outcome = MergePlan {
        runs: Vec::new(),
        events: HashMap::new(),
        repairs: Vec::new(),
    };
    let runs = &mut outcome.runs;
    // The newest run of each (table, kind, column set), and the last run touching each record.
    let mut open = OpenRuns::new();
    let mut last_touch: HashMap<(usize, &str), usize> = HashMap::with_capacity(events.len());
    // Columns of every field path of a writer schema, per table and schema.
    let mut upsert_columns: HashMap<(usize, usize), Arc<[usize]>> = HashMap::new();
    for event in events {
        let h = &event.header;
        *outcome.events.entry(h.change_type).or_default() += 1;
        let table = tables
            .get(h.entity_name.as_str())
            .ok_or_else(|| ReplicaError::Schema {
                object: h.entity_name.to_string(),
                message: "no table prepared for this object".to_string(),
            })?;
        let since_ms = h.commit_timestamp - settings.repair_margin_ms;
        let wildcard = h.record_ids.iter().any(|id| id.ends_with('*'));
        let kind = match h.change_type {
            ChangeType::Create | ChangeType::Undelete => OpKind::Upsert,
            ChangeType::Update => OpKind::Merge,
            ChangeType::Delete => OpKind::Delete,
            ChangeType::GapOverflow => {
                outcome.repairs.push(RepairRequest::Entity {
                    object: h.entity_name.to_string(),
                    since_ms,
                    reason: format!("GAP_OVERFLOW at replay {}", event.replay_id),
                });
                continue;
            }
            ChangeType::GapCreate
            | ChangeType::GapUpdate
            | ChangeType::GapDelete
            | ChangeType::GapUndelete => {
                if wildcard || h.record_ids.is_empty() {
                    outcome.repairs.push(RepairRequest::Entity {
                        object: h.entity_name.to_string(),
                        since_ms,
                        reason: format!(
                            "{} for all records at replay {}",
                            h.change_type, event.replay_id
                        ),
                    });
                } else {
                    for id in &h.record_ids {
                        outcome.repairs.push(RepairRequest::Record {
                            object: h.entity_name.to_string(),
                            id: id.clone(),
                            reason: format!("{} at replay {}", h.change_type, event.replay_id),
                        });
                    }
                }
                continue;
            }
        };
        if wildcard {
            // A wildcard on a real change (field type conversion): the body cannot be trusted
            // for "all records", so re-read the entity.
            outcome.repairs.push(RepairRequest::Entity {
                object: h.entity_name.to_string(),
                since_ms,
                reason: format!(
                    "{} with wildcard ids at replay {}",
                    h.change_type, event.replay_id
                ),
            });
            continue;
        }
        let (columns, mut values) = row_values(table, event, kind, &mut upsert_columns)?;
        if kind == OpKind::Merge && !h.diff_fields.is_empty() {
            for id in &h.record_ids {
                outcome.repairs.push(RepairRequest::Record {
                    object: h.entity_name.to_string(),
                    id: id.clone(),
                    reason: format!(
                        "diff fields {} at replay {}",
                        h.diff_fields.join(","),
                        event.replay_id
                    ),
                });
            }
        }
        let tkey = table_key(table);
        for (k, id) in h.record_ids.iter().enumerate() {
            // The newest run of this shape takes the change unless the record was touched by
            // that run or a later one: then a new run keeps the record's changes in order.
            let shapes = open.entry((tkey, kind)).or_default();
            let newest = shapes.iter_mut().find(|(c, _)| *c == columns);
            let touched = last_touch.get(&(tkey, id.as_str())).copied();
            let index = match newest {
                Some((_, i)) if touched.is_none_or(|t| t < *i) => *i,
                found => {
                    runs.push(Run {
                        table: table.clone(),
                        kind,
                        columns: columns.clone(),
                        ops: Vec::new(),
                    });
                    let i = runs.len() - 1;
                    match found {
                        Some((_, newest)) => *newest = i,
                        None => shapes.push((columns.clone(), i)),
                    }
                    i
                }
            };
            last_touch.insert((tkey, id.as_str()), index);
            // The last id takes the values; earlier ids (rare) get copies.
            let values = if k + 1 == h.record_ids.len() {
                std::mem::take(&mut values)
            } else {
                values.clone()
            };
            runs[index].ops.push(Op {
                id: id.clone(),
                values,
                version: h.commit_timestamp,
                commit_number: h.commit_number,
            });
        }
    }
    Ok(outcome)
}

/// The columns an event writes and their text values, in column order. `upsert_columns`
/// caches, per table and writer schema, the column of every field path.
fn row_values(
    table: &Arc<TableSchema>,
    event: &ChangeEvent,
    kind: OpKind,
    upsert_columns: &mut HashMap<(usize, usize), Arc<[usize]>>,
) -> Result<(Vec<usize>, Vec<Option<String>>), ReplicaError> {
    let h = &event.header;
    let unknown = |path: &str| ReplicaError::Schema {
        object: table.object.clone(),
        message: format!(
            "event {} carries field `{path}`, which the table's describe lacks",
            event.replay_id
        ),
    };
    let mut cols: Vec<(usize, Option<String>)> = Vec::new();
    let render_value = |col: usize, path: &str, value: Option<&crate::model::Value>| {
        let c = &table.columns[col];
        match value {
            None => Ok(None),
            Some(v) => c
                .pg_type
                .text(v)
                .map(Some)
                .map_err(|message| ReplicaError::Data {
                    object: table.object.clone(),
                    id: h.record_ids.join(","),
                    message: format!("field {path}: {message}"),
                }),
        }
    };
    let render = |col: usize, path: &str| render_value(col, path, event.value(path));
    match kind {
        OpKind::Upsert => {
            let key = (
                table_key(table),
                event.schema_fields.as_ptr() as *const () as usize,
            );
            let columns = match upsert_columns.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c = event
                        .schema_fields
                        .iter()
                        .map(|path| table.column_for(path).ok_or_else(|| unknown(path)))
                        .collect::<Result<Arc<[usize]>, _>>()?;
                    upsert_columns.insert(key, c.clone());
                    c
                }
            };
            // A decoded event's values come in schema order: walk both lists together and
            // search only when that order does not hold.
            let mut next = 0;
            cols.reserve(columns.len());
            for (path, &col) in event.schema_fields.iter().zip(columns.iter()) {
                let value = match event.fields.get(next) {
                    Some(f) if f.path == *path => {
                        next += 1;
                        Some(&f.value)
                    }
                    _ => event.value(path),
                };
                cols.push((col, render_value(col, path, value)?));
            }
        }
        OpKind::Merge => {
            for path in &h.changed_fields {
                let col = table
                    .column_for(path.as_arc())
                    .ok_or_else(|| unknown(path))?;
                let value = render(col, path)?;
                // A changed field that arrives null was either nulled (listed below) or
                // cannot be told from unchanged: write it only when it has a value.
                if value.is_some() {
                    cols.push((col, value));
                }
            }
            for path in &h.nulled_fields {
                let col = table
                    .column_for(path.as_arc())
                    .ok_or_else(|| unknown(path))?;
                cols.retain(|(c, _)| *c != col);
                cols.push((col, None));
            }
        }
        OpKind::Delete => {}
    }
    cols.sort_by_key(|(c, _)| *c);
    cols.dedup_by_key(|(c, _)| *c);
    Ok(cols.into_iter().unzip())
}

const GUARD: &str = "(t._sfm_version, coalesce(t._sfm_commit_number, -1)) \
                     <= (EXCLUDED._sfm_version, coalesce(EXCLUDED._sfm_commit_number, -1))";

async fn flush(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    run: Run,
    outcome: &mut ApplyOutcome,
) -> Result<(), ReplicaError> {
    let t = &run.table;
    let table = format!("{}.{}", quote(&settings.data_schema), quote(&t.table));
    let ctl = quote(&settings.control_schema);
    let ids: Vec<&str> = run.ops.iter().map(|o| o.id.as_str()).collect();
    let versions: Vec<i64> = run.ops.iter().map(|o| o.version).collect();
    let commits: Vec<i64> = run.ops.iter().map(|o| o.commit_number).collect();
    let context = || format!("apply {:?} of {} rows to {}", run.kind, ids.len(), t.table);
    outcome.statements += 1;

    if run.kind == OpKind::Delete && settings.delete_mode == DeleteMode::Hard {
        let sql = format!(
            "WITH u AS (SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(id, v, n)),
             gone AS (DELETE FROM {table} AS t USING u WHERE t.id = u.id
                      AND (t._sfm_version, coalesce(t._sfm_commit_number, -1))
                          <= (u.v, coalesce(u.n, -1)))
             INSERT INTO {ctl}.tombstones AS ts (object, id, version, commit_number)
             SELECT $4::text, u.id, u.v, u.n FROM u
             ON CONFLICT (object, id) DO UPDATE SET version = EXCLUDED.version,
                 commit_number = EXCLUDED.commit_number, deleted_at = now()
             WHERE (ts.version, coalesce(ts.commit_number, -1))
                   <= (EXCLUDED.version, coalesce(EXCLUDED.commit_number, -1))"
        );
        let stmt = tx
            .prepare_cached(&sql)
            .await
            .map_err(ReplicaError::pg(context()))?;
        tx.execute(&stmt, &[&ids, &versions, &commits, &t.object])
            .await
            .map_err(ReplicaError::pg(context()))?;
        return Ok(());
    }

    // Upsert, merge and soft delete share one statement shape. Columns that are null in every
    // row of the run are not sent (a CREATE carries many): they are set to NULL on conflict and
    // left to their (null) default on insert, which is what sending nulls would do, minus the
    // arrays and casts.
    let sent: Vec<usize> = (0..run.columns.len())
        .filter(|&i| run.ops.iter().any(|o| o.values[i].is_some()))
        .collect();
    let n = sent.len();
    let mut insert_cols = vec!["id".to_string()];
    let mut select = vec!["u.id".to_string()];
    let mut unnest = vec!["$1::text[]".to_string()];
    let mut alias = vec!["id".to_string()];
    let mut set = Vec::new();
    // The same assignments for a plain UPDATE, from the unnested row `u`.
    let mut assign = Vec::new();
    for (i, &col) in run.columns.iter().enumerate() {
        let c = &t.columns[col];
        let q = quote(&c.name);
        match sent.binary_search(&i) {
            Ok(k) => {
                let value = format!("u.c{k}::{}", c.pg_type.sql());
                insert_cols.push(q.clone());
                assign.push(format!("{q} = {value}"));
                select.push(value);
                unnest.push(format!("${}::text[]", k + 2));
                alias.push(format!("c{k}"));
                set.push(format!("{q} = EXCLUDED.{q}"));
            }
            Err(_) => {
                set.push(format!("{q} = NULL"));
                assign.push(format!("{q} = NULL"));
            }
        }
    }
    unnest.push(format!("${}::bigint[]", n + 2));
    unnest.push(format!("${}::bigint[]", n + 3));
    alias.push("v".into());
    alias.push("n".into());
    insert_cols.extend(["_sfm_version".into(), "_sfm_commit_number".into()]);
    select.extend(["u.v".into(), "u.n".into()]);
    set.extend([
        "_sfm_version = EXCLUDED._sfm_version".to_string(),
        "_sfm_commit_number = EXCLUDED._sfm_commit_number".to_string(),
        "_sfm_synced_at = now()".to_string(),
    ]);
    assign.extend([
        "_sfm_version = u.v".to_string(),
        "_sfm_commit_number = u.n".to_string(),
        "_sfm_synced_at = now()".to_string(),
    ]);
    match run.kind {
        OpKind::Upsert => set.push("_sfm_deleted = false".into()),
        OpKind::Delete => {
            insert_cols.push("_sfm_deleted".into());
            select.push("true".into());
            set.push("_sfm_deleted = true".into());
            assign.push("_sfm_deleted = true".into());
        }
        OpKind::Merge => {}
    }
    // Only a merge needs to know which rows it inserted.
    let returning = if run.kind == OpKind::Merge {
        "RETURNING t.id, (xmax = 0) AS inserted"
    } else {
        ""
    };
    let sql = format!(
        "INSERT INTO {table} AS t ({cols})
         SELECT {select} FROM unnest({unnest}) AS u({alias})
         WHERE NOT EXISTS (SELECT 1 FROM {ctl}.tombstones ts
                           WHERE ts.object = ${obj}::text AND ts.id = u.id
                             AND (ts.version, coalesce(ts.commit_number, -1))
                                 > (u.v, coalesce(u.n, -1)))
         ON CONFLICT (id) DO UPDATE SET {set} WHERE {GUARD}
         {returning}",
        cols = insert_cols.join(", "),
        select = select.join(", "),
        unnest = unnest.join(", "),
        alias = alias.join(", "),
        set = set.join(", "),
        obj = n + 4,
    );
    let columns: Vec<Vec<Option<&str>>> = sent
        .iter()
        .map(|&i| run.ops.iter().map(|o| o.values[i].as_deref()).collect())
        .collect();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::with_capacity(n + 4);
    params.push(&ids);
    for c in &columns {
        params.push(c);
    }
    params.push(&versions);
    params.push(&commits);
    params.push(&t.object);
    if run.kind != OpKind::Upsert {
        // Changes to records the replica has (the usual case for UPDATE and DELETE) go out
        // as a plain UPDATE: unlike ON CONFLICT it neither probes for a conflict first nor
        // locks each row before changing it. Only if some row was not updated (missing,
        // newer, or behind a tombstone) does the whole run go out again below, where the
        // guard makes the rows already updated no-ops in effect.
        let update = format!(
            "UPDATE {table} AS t SET {assign}
             FROM unnest({unnest}) AS u({alias})
             WHERE t.id = u.id
               AND (t._sfm_version, coalesce(t._sfm_commit_number, -1))
                   <= (u.v, coalesce(u.n, -1))
               AND NOT EXISTS (SELECT 1 FROM {ctl}.tombstones ts
                               WHERE ts.object = ${obj}::text AND ts.id = u.id
                                 AND (ts.version, coalesce(ts.commit_number, -1))
                                     > (u.v, coalesce(u.n, -1)))",
            assign = assign.join(", "),
            unnest = unnest.join(", "),
            alias = alias.join(", "),
            obj = n + 4,
        );
        let stmt = tx
            .prepare_cached(&update)
            .await
            .map_err(ReplicaError::pg(context()))?;
        let updated = tx
            .execute(&stmt, &params)
            .await
            .map_err(ReplicaError::pg(context()))?;
        if updated as usize == run.ops.len() {
            return Ok(());
        }
        outcome.statements += 1;
    }
    let stmt = tx
        .prepare_cached(&sql)
        .await
        .map_err(ReplicaError::pg(context()))?;
    let rows = tx
        .query(&stmt, &params)
        .await
        .map_err(ReplicaError::pg(context()))?;
    if run.kind == OpKind::Merge {
        // An UPDATE for a record the replica lacked inserted only what it carried.
        for row in rows {
            let inserted: bool = row.get(1);
            if inserted {
                let id: String = row.get(0);
                outcome.repairs.push(RepairRequest::Record {
                    object: t.object.clone(),
                    reason: format!("UPDATE for unknown record {id}"),
                    id,
                });
            }
        }
    }
    Ok(())
}
