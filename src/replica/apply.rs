//! The merge: a batch of change events -> version-guarded, set-based SQL in the caller's
//! transaction.
//!
//! Planning ([`plan_events`]: folding, runs, rendered values, repairs) needs no connection and
//! is kept apart from sending ([`execute`]), so a caller can plan the next batch while Postgres
//! applies this one.
//!
//! Folding: a batch's changes of one record are folded into as few writes as give the same row:
//! UPDATEs after an UPDATE or CREATE add their columns to it, a CREATE / UNDELETE replaces what
//! came before it, a hard DELETE replaces everything before it, and a change older than one
//! already folded is dropped (the version guard would refuse it). Any other sequence (an UPDATE
//! after a DELETE, a soft DELETE after an UPDATE) keeps the later change as a separate write in
//! the next round. Folding UPDATEs is exact because a batch is a contiguous part of one
//! channel's stream: every change of the record between two folded ones is in the batch and
//! folded too, so whatever version the row has when the batch lands (from the stream or a
//! snapshot taken at any point of that history), the folded columns carry the values that
//! history gives them at the newest folded change. A change Salesforce could not send (a gap)
//! comes with a repair that re-reads the record.
//!
//! Runs: each round is one statement per table and kind (per column set, for upserts). UPDATEs
//! and soft DELETEs of different column sets share one plain `UPDATE .. FROM unnest(..)`, each
//! row carrying a mask of the columns it writes; rows it does not reach (a record the replica
//! lacks, a newer row, a tombstone) go again through `INSERT .. ON CONFLICT`, where the guard
//! decides. CREATE / UNDELETE runs go straight to `INSERT .. ON CONFLICT`. Rounds execute in
//! order, so every record sees its writes in order. A run's rows travel as one array of the
//! table's own row type (read in the batch's transaction), which Postgres unpacks far more
//! cheaply than an array per column; a table whose column types were changed by hand gets the
//! array-per-column form of the same statements.
//!
//! Why replays are harmless (invariant 3): every write carries the change's version
//! (`commitTimestamp` ms, `commitNumber` as tie-breaker) and only replaces a row whose version
//! is not newer; deletes leave the version behind (soft: the row with `_sfm_deleted`; hard: a
//! tombstone), so an older change cannot resurrect a record. Field-level merge (invariant 4):
//! an UPDATE writes exactly the columns `changedFields` names and nulls exactly those
//! `nulledFields` names. A long text sent as a diff (`diffFields`) is applied to the row's
//! current value and kept only if the result has the SHA-256 Salesforce sent; a diff is never
//! folded onto a value the same batch writes. What the event cannot carry (gaps, overflows, a
//! diff that does not fit, an UPDATE for a record the replica lacks) becomes a
//! [`RepairRequest`] that the caller commits in the same transaction (invariant 2).
//!
//! An event field the table has no column for is not written: the caller prepares every
//! table against each new writer schema first (describing the object again when the schema
//! has fields the table lacks), so such a field is one describe does not list — a field the
//! event schema carries but the object does not expose (the Address record's `Xyz`), or one
//! deleted from the org after a restart lost its mapping. The caller reports those.

use super::binary::{Raw, column_expr, param_type, put_field, type_oid};
use super::repair_queue::RepairRequest;
use super::schema::{PgType, TableSchema};
use super::{ApplySettings, ReplicaError, quote};
use crate::config::DeleteMode;
use crate::model::{ChangeEvent, ChangeType, textdiff};
use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// What a batch did.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    /// Events per change type.
    pub events: HashMap<ChangeType, u64>,
    pub statements: usize,
    pub repairs: Vec<RepairRequest>,
}

impl ApplyOutcome {
    /// Adds what another part of the same batch did.
    pub fn absorb(&mut self, other: ApplyOutcome) {
        for (kind, n) in other.events {
            *self.events.entry(kind).or_default() += n;
        }
        self.statements += other.statements;
        self.repairs.extend(other.repairs);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum OpKind {
    /// CREATE / UNDELETE: every column the writer schema carries.
    Upsert,
    /// UPDATE: the changed and nulled columns only.
    Merge,
    Delete,
}

/// A column and the value written to it (`None`: NULL), in Postgres' binary format.
type Cell = (usize, Option<Vec<u8>>);

/// What one statement writes to one record: a change, or several folded into one.
struct Op {
    id: String,
    kind: OpKind,
    /// (column, value) sorted by column; `None` writes NULL.
    cells: Vec<Cell>,
    /// Columns whose cell holds a diff (`diffFields`) to apply to the row's current value.
    diffs: Vec<usize>,
    version: i64,
    commit_number: i64,
}

impl Op {
    fn at(&self) -> (i64, i64) {
        (self.version, self.commit_number)
    }
}

/// Folds `next`, a later change of the same record, into `last`, when writing the result once
/// leaves the row exactly as writing both in order would (see the module docs). Gives `next`
/// back when it must be written on its own, after `last`.
fn fold(last: &mut Op, next: Op, mode: DeleteMode) -> Result<(), Op> {
    use OpKind::{Delete, Merge, Upsert};
    if next.at() < last.at() {
        // The guard would refuse it once `last` is written (or whatever refused `last`).
        return Ok(());
    }
    match (last.kind, next.kind) {
        // A CREATE / UNDELETE rewrites every column the earlier change wrote.
        (_, Upsert) if covers(&next.cells, &last.cells) => *last = next,
        (Upsert | Merge, Merge) => {
            // A diff applies to the value before it: not to one `last` writes.
            let writes = |cells: &[Cell], col: usize| cells.iter().any(|(c, _)| *c == col);
            if next.diffs.iter().any(|&c| writes(&last.cells, c)) {
                return Err(next);
            }
            last.diffs.retain(|&c| !writes(&next.cells, c));
            last.diffs.extend(next.diffs);
            overlay(&mut last.cells, next.cells);
            last.version = next.version;
            last.commit_number = next.commit_number;
        }
        (Delete, Delete) => *last = next,
        // A hard delete removes whatever was written before it.
        (Upsert | Merge, Delete) if mode == DeleteMode::Hard => *last = next,
        _ => return Err(next),
    }
    Ok(())
}

/// Whether every column of `older` (sorted) is among `newer` (sorted).
fn covers(newer: &[Cell], older: &[Cell]) -> bool {
    let mut it = newer.iter().map(|(c, _)| *c);
    older.iter().all(|(c, _)| it.any(|n| n == *c))
}

/// Writes `next`'s cells over `cells` (both sorted by column).
fn overlay(cells: &mut Vec<Cell>, next: Vec<Cell>) {
    for (col, value) in next {
        match cells.binary_search_by_key(&col, |(c, _)| *c) {
            Ok(i) => cells[i].1 = value,
            Err(i) => cells.insert(i, (col, value)),
        }
    }
}

/// Records' folded changes that go out as one statement: same table, kind, and for upserts the
/// same columns. Merges and soft deletes of different column sets share a statement (each row
/// says which columns it writes).
struct Run {
    table: Arc<TableSchema>,
    kind: OpKind,
    /// Every column some row writes, sorted.
    columns: Vec<usize>,
    ops: Vec<Op>,
}

/// A batch turned into runs of rows, ready to send: everything [`apply_events`] does that needs
/// no connection. Built apart from the transaction so that a caller can prepare the next batch
/// while Postgres works on this one.
pub struct MergePlan {
    runs: Vec<Run>,
    /// How many runs each round has, in order.
    rounds: Vec<usize>,
    events: HashMap<ChangeType, u64>,
    repairs: Vec<RepairRequest>,
}

/// The records a plan writes, as hashes of table and id. Two records whose hashes collide
/// count as one, which can only make a write wait for a batch it did not need to wait for.
pub type RecordKeys = HashSet<u64>;

fn record_key(table: &str, id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    table.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

impl MergePlan {
    /// Repairs the batch needs so far (more can come from executing it).
    pub fn repairs(&self) -> &[RepairRequest] {
        &self.repairs
    }

    /// The records the plan writes.
    pub fn record_keys(&self) -> RecordKeys {
        self.runs
            .iter()
            .flat_map(|r| r.ops.iter().map(|o| record_key(&r.table.table, &o.id)))
            .collect()
    }

    /// Splits the plan in two: the writes to records not in `keys`, and the rest (writes to
    /// records in `keys`, the batch's event counts and its repairs). A record keeps all its
    /// writes, in their rounds, on one side; writes to different records are independent, so
    /// the two sides may be executed in either order, in one transaction.
    pub fn split(self, keys: &RecordKeys) -> (MergePlan, MergePlan) {
        let mut free = MergePlan {
            runs: Vec::new(),
            rounds: Vec::new(),
            events: HashMap::new(),
            repairs: Vec::new(),
        };
        let mut rest = MergePlan {
            runs: Vec::new(),
            rounds: Vec::new(),
            events: self.events,
            repairs: self.repairs,
        };
        let mut runs = self.runs.into_iter();
        for size in self.rounds {
            let (free_before, rest_before) = (free.runs.len(), rest.runs.len());
            for run in runs.by_ref().take(size) {
                let Run {
                    table,
                    kind,
                    columns,
                    ops,
                } = run;
                let (later, now): (Vec<Op>, Vec<Op>) = ops
                    .into_iter()
                    .partition(|o| keys.contains(&record_key(&table.table, &o.id)));
                for (ops, side) in [(now, &mut free), (later, &mut rest)] {
                    if ops.is_empty() {
                        continue;
                    }
                    let columns = match kind {
                        OpKind::Merge => written_columns(&ops),
                        OpKind::Upsert | OpKind::Delete => columns.clone(),
                    };
                    side.runs.push(Run {
                        table: table.clone(),
                        kind,
                        columns,
                        ops,
                    });
                }
            }
            for (side, before) in [(&mut free, free_before), (&mut rest, rest_before)] {
                if side.runs.len() > before {
                    side.rounds.push(side.runs.len() - before);
                }
            }
        }
        (free, rest)
    }
}

/// Every column some op writes, sorted: what a merge run's mask ranges over.
fn written_columns(ops: &[Op]) -> Vec<usize> {
    let mut columns: Vec<usize> = ops
        .iter()
        .flat_map(|o| o.cells.iter().map(|(c, _)| *c))
        .collect();
    columns.sort_unstable();
    columns.dedup();
    columns
}

/// Runs of one round sent before the first of them has answered.
const PIPELINED_RUNS: usize = 2;

/// Identifies a table within one call (tables are shared, so their address is stable).
fn table_key(table: &Arc<TableSchema>) -> usize {
    Arc::as_ptr(table) as usize
}

/// Applies `events` in order inside `tx`. `tables` must hold every entity of the batch.
pub async fn apply_events(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    tables: &HashMap<String, Arc<TableSchema>>,
    mut events: Vec<ChangeEvent>,
) -> Result<ApplyOutcome, ReplicaError> {
    let plan = plan_events(settings, tables, &mut events)?;
    execute(tx, settings, plan).await
}

/// Sends a plan's runs inside `tx`, round by round: every record sees its changes in order.
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
    let row_types = &load_row_types(tx, settings, &plan.runs).await?;
    let mut runs = plan.runs.into_iter();
    for size in plan.rounds {
        let mut round: Vec<Run> = runs.by_ref().take(size).collect();
        for run in &mut round {
            if run.ops.iter().any(|o| !o.diffs.is_empty()) {
                resolve_diffs(tx, settings, run, &mut outcome).await?;
            }
        }
        // A round's runs touch different records: the next one goes out while Postgres works
        // on the current one (pipelined on the connection), so it never waits for a round trip
        // and the client's encoding. Two at a time bound the parameters held in memory.
        let mut parts = futures::stream::iter(round.into_iter().map(|run| async move {
            let mut part = ApplyOutcome::default();
            flush(tx, settings, row_types, run, &mut part).await?;
            Ok::<_, ReplicaError>(part)
        }))
        .buffered(PIPELINED_RUNS);
        while let Some(part) = parts.next().await {
            let part = part?;
            outcome.statements += part.statements;
            outcome.repairs.extend(part.repairs);
        }
    }
    Ok(outcome)
}

/// Turns `events` into runs (see the module docs) and the repairs they need, without I/O.
/// `tables` must hold every entity of the batch, and `events` must be a contiguous part of one
/// channel's stream, in stream order (what folding relies on).
pub fn plan_events(
    settings: &ApplySettings,
    tables: &HashMap<String, Arc<TableSchema>>,
    events: &mut [ChangeEvent],
) -> Result<MergePlan, ReplicaError> {
    let mut plan = MergePlan {
        runs: Vec::new(),
        rounds: Vec::new(),
        events: HashMap::new(),
        repairs: Vec::new(),
    };
    // Each record's folded changes, in order: the first goes out in round 0, the next (one
    // that could not be folded) in round 1, and so on.
    let mut records: Vec<(Arc<TableSchema>, Vec<Op>)> = Vec::new();
    let mut index: HashMap<(usize, &str), usize> = HashMap::with_capacity(events.len());
    // Columns of every field path of a writer schema, per table and schema.
    let mut upsert_columns: HashMap<(usize, usize), Arc<[Option<usize>]>> = HashMap::new();
    for event in events.iter_mut() {
        let h = &event.header;
        *plan.events.entry(h.change_type).or_default() += 1;
        let table = tables
            .get(&*h.entity_name)
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
                plan.repairs.push(RepairRequest::Entity {
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
                    plan.repairs.push(RepairRequest::Entity {
                        object: h.entity_name.to_string(),
                        since_ms,
                        reason: format!(
                            "{} for all records at replay {}",
                            h.change_type, event.replay_id
                        ),
                    });
                } else {
                    for id in &h.record_ids {
                        plan.repairs.push(RepairRequest::Record {
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
            plan.repairs.push(RepairRequest::Entity {
                object: h.entity_name.to_string(),
                since_ms,
                reason: format!(
                    "{} with wildcard ids at replay {}",
                    h.change_type, event.replay_id
                ),
            });
            continue;
        }
        let mut cells = row_values(table, event, kind, &mut upsert_columns)?;
        // The event is only read from here on (its ids key the index for the whole plan).
        let event: &ChangeEvent = event;
        let h = &event.header;
        // Long text sent as a diff: applied to the row's value when the write goes out.
        let mut diffs = Vec::new();
        if kind == OpKind::Merge {
            for path in &h.diff_fields {
                if let Some(col) = table.column_for(path)
                    && cells.iter().any(|(c, v)| *c == col && v.is_some())
                {
                    diffs.push(col);
                }
            }
        }
        let tkey = table_key(table);
        for (k, id) in h.record_ids.iter().enumerate() {
            // The last id takes the values; earlier ids (rare) get copies.
            let cells = if k + 1 == h.record_ids.len() {
                std::mem::take(&mut cells)
            } else {
                cells.clone()
            };
            let op = Op {
                id: id.clone(),
                kind,
                cells,
                diffs: diffs.clone(),
                version: h.commit_timestamp,
                commit_number: h.commit_number,
            };
            match index.get(&(tkey, id.as_str())) {
                Some(&r) => {
                    let ops = &mut records[r].1;
                    if let Some(last) = ops.last_mut()
                        && let Err(op) = fold(last, op, settings.delete_mode)
                    {
                        ops.push(op);
                    }
                }
                None => {
                    index.insert((tkey, id.as_str()), records.len());
                    records.push((table.clone(), vec![op]));
                }
            }
        }
    }
    drop(index);
    // Round by round, one run per table and kind (and column set, for upserts), in the order
    // records first appeared.
    let rounds = records.iter().map(|(_, ops)| ops.len()).max().unwrap_or(0);
    let mut queues: Vec<std::vec::IntoIter<Op>> = Vec::with_capacity(records.len());
    let mut owners = Vec::with_capacity(records.len());
    for (table, ops) in records {
        owners.push(table);
        queues.push(ops.into_iter());
    }
    for _ in 0..rounds {
        let mut runs: HashMap<(usize, OpKind, Vec<usize>), usize> = HashMap::new();
        let first = plan.runs.len();
        plan.rounds.push(0);
        for (table, queue) in owners.iter().zip(queues.iter_mut()) {
            let Some(op) = queue.next() else { continue };
            let shape = match op.kind {
                OpKind::Upsert => op.cells.iter().map(|(c, _)| *c).collect(),
                OpKind::Merge | OpKind::Delete => Vec::new(),
            };
            let key = (table_key(table), op.kind, shape);
            let i = match runs.get(&key) {
                Some(&i) => i,
                None => {
                    plan.runs.push(Run {
                        table: table.clone(),
                        kind: op.kind,
                        columns: key.2.clone(),
                        ops: Vec::new(),
                    });
                    runs.insert(key, plan.runs.len() - 1);
                    plan.runs.len() - 1
                }
            };
            plan.runs[i].ops.push(op);
        }
        if let Some(n) = plan.rounds.last_mut() {
            *n = plan.runs.len() - first;
        }
        for run in &mut plan.runs[first..] {
            if run.kind == OpKind::Merge {
                run.columns = written_columns(&run.ops);
            }
        }
    }
    Ok(plan)
}

/// The columns an event writes with their binary values, in column order. Text values are
/// moved out of the event, not copied: the caller does not read them again. `upsert_columns`
/// caches, per table and writer schema, the column of every field path.
fn row_values(
    table: &Arc<TableSchema>,
    event: &mut ChangeEvent,
    kind: OpKind,
    upsert_columns: &mut HashMap<(usize, usize), Arc<[Option<usize>]>>,
) -> Result<Vec<Cell>, ReplicaError> {
    let ChangeEvent {
        header: h,
        fields,
        schema_fields,
        ..
    } = event;
    let h = &*h;
    let mut cols: Vec<Cell> = Vec::new();
    let render_value = |col: usize, path: &str, value: Option<&mut crate::model::Value>| {
        let c = &table.columns[col];
        match value {
            None => Ok(None),
            Some(v) => super::binary::encode_taking(&c.pg_type, v)
                .map(Some)
                .map_err(|message| ReplicaError::Data {
                    object: table.object.clone(),
                    id: h.record_ids.join(","),
                    message: format!("field {path}: {message}"),
                }),
        }
    };
    fn value_of<'a>(
        fields: &'a mut [crate::model::FieldValue],
        path: &str,
    ) -> Option<&'a mut crate::model::Value> {
        fields
            .iter_mut()
            .find(|f| &*f.path == path)
            .map(|f| &mut f.value)
    }
    match kind {
        OpKind::Upsert => {
            let key = (
                table_key(table),
                schema_fields.as_ptr() as *const () as usize,
            );
            let columns = match upsert_columns.get(&key) {
                Some(c) => c.clone(),
                None => {
                    let c: Arc<[Option<usize>]> = schema_fields
                        .iter()
                        .map(|path| table.column_for(path))
                        .collect();
                    upsert_columns.insert(key, c.clone());
                    c
                }
            };
            // A decoded event's values come in schema order: walk both lists together and
            // search only when that order does not hold.
            let mut next = 0;
            cols.reserve(columns.len());
            for (path, &col) in schema_fields.iter().zip(columns.iter()) {
                let in_order = fields.get(next).is_some_and(|f| f.path == *path);
                let value = if in_order {
                    next += 1;
                    fields.get_mut(next - 1).map(|f| &mut f.value)
                } else {
                    value_of(fields, path)
                };
                // A field describe does not list has no column (see the module docs).
                let Some(col) = col else { continue };
                cols.push((col, render_value(col, path, value)?));
            }
        }
        OpKind::Merge => {
            for path in &h.changed_fields {
                let Some(col) = table.column_for(path) else {
                    continue;
                };
                let value = render_value(col, path, value_of(fields, path))?;
                // A changed field that arrives null was either nulled (listed below) or
                // cannot be told from unchanged: write it only when it has a value.
                if value.is_some() {
                    cols.push((col, value));
                }
            }
            for path in &h.nulled_fields {
                let Some(col) = table.column_for(path) else {
                    continue;
                };
                cols.retain(|(c, _)| *c != col);
                cols.push((col, None));
            }
        }
        OpKind::Delete => {}
    }
    cols.sort_by_key(|(c, _)| *c);
    cols.dedup_by_key(|(c, _)| *c);
    Ok(cols)
}

const GUARD: &str = "(t._sfm_version, coalesce(t._sfm_commit_number, -1)) \
                     <= (EXCLUDED._sfm_version, coalesce(EXCLUDED._sfm_commit_number, -1))";

/// The tombstone check: no newer delete of the record is on file. `row` names the candidate
/// row's id, version and commit number.
fn not_tombstoned(ctl: &str, object_param: usize, row: [&str; 3]) -> String {
    let [id, v, n] = row;
    format!(
        "NOT EXISTS (SELECT 1 FROM {ctl}.tombstones ts
                     WHERE ts.object = ${object_param}::text AND ts.id = {id}
                       AND (ts.version, coalesce(ts.commit_number, -1))
                           > ({v}, coalesce({n}, -1)))"
    )
}

async fn flush(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    row_types: &HashMap<String, RowType>,
    run: Run,
    outcome: &mut ApplyOutcome,
) -> Result<(), ReplicaError> {
    match (run.kind, settings.delete_mode) {
        (OpKind::Delete, DeleteMode::Hard) => hard_delete(tx, settings, run, outcome).await,
        (OpKind::Upsert, _) => upsert_any(tx, settings, row_types, run, outcome).await,
        (OpKind::Merge | OpKind::Delete, _) => {
            let (table, kind) = (run.table.clone(), run.kind);
            let missed = match row_types.get(&run.table.table) {
                Some(row_type) if row_type.fits(&run) => {
                    update_rows(tx, settings, row_type, run, outcome).await?
                }
                _ => update(tx, settings, run, outcome).await?,
            };
            // What the plain UPDATE did not reach (a record the replica lacks, a newer row,
            // a tombstone) goes through the upsert, grouped by the columns each row writes.
            let mut runs: Vec<Run> = Vec::new();
            for op in missed {
                let columns: Vec<usize> = op.cells.iter().map(|(c, _)| *c).collect();
                match runs.iter_mut().find(|r| r.columns == columns) {
                    Some(r) => r.ops.push(op),
                    None => runs.push(Run {
                        table: table.clone(),
                        kind,
                        columns,
                        ops: vec![op],
                    }),
                }
            }
            for run in runs {
                upsert_any(tx, settings, row_types, run, outcome).await?;
            }
            Ok(())
        }
    }
}

/// The replica table's name, schema-qualified and quoted.
fn qualified_table(settings: &ApplySettings, table: &TableSchema) -> String {
    format!("{}.{}", quote(&settings.data_schema), quote(&table.table))
}

/// What every statement of a run names and sends: the qualified table, the control schema, and
/// each row's id and version.
struct RunRows<'a> {
    table: String,
    ctl: String,
    ids: Vec<&'a str>,
    versions: Vec<i64>,
    commits: Vec<i64>,
}

impl<'a> RunRows<'a> {
    fn new(settings: &ApplySettings, run: &'a Run) -> RunRows<'a> {
        RunRows {
            table: qualified_table(settings, &run.table),
            ctl: quote(&settings.control_schema),
            ids: run.ops.iter().map(|o| o.id.as_str()).collect(),
            versions: run.ops.iter().map(|o| o.version).collect(),
            commits: run.ops.iter().map(|o| o.commit_number).collect(),
        }
    }
}

fn context(run: &Run) -> String {
    format!(
        "apply {:?} of {} rows to {}",
        run.kind,
        run.ops.len(),
        run.table.table
    )
}

/// Prepares `sql` (cached on the connection) and runs it for `run`, counting the statement.
async fn send(
    tx: &deadpool_postgres::Transaction<'_>,
    run: &Run,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    outcome: &mut ApplyOutcome,
) -> Result<Vec<tokio_postgres::Row>, ReplicaError> {
    outcome.statements += 1;
    let stmt = tx
        .prepare_cached(sql)
        .await
        .map_err(ReplicaError::pg(context(run)))?;
    tx.query(&stmt, params)
        .await
        .map_err(ReplicaError::pg(context(run)))
}

async fn hard_delete(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    run: Run,
    outcome: &mut ApplyOutcome,
) -> Result<(), ReplicaError> {
    let t = &run.table;
    let RunRows {
        table,
        ctl,
        ids,
        versions,
        commits,
    } = RunRows::new(settings, &run);
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
    // A snapshot merge of the object running beside this batch must see the tombstones.
    super::locks::share_deletes(tx, &settings.data_schema, &t.object).await?;
    send(
        tx,
        &run,
        &sql,
        &[&ids, &versions, &commits, &t.object],
        outcome,
    )
    .await?;
    Ok(())
}

/// How statements over rows sent as the table's row type name a row's id and version.
const COMPOSITE_ROW: [&str; 3] = ["u.id", "u._sfm_version", "u._sfm_commit_number"];

/// A replica table's row type as Postgres has it in this transaction: what a row sent as one
/// composite value must carry, field by field.
pub(super) struct RowType {
    /// The type's OID, which the array of rows declares.
    oid: u32,
    /// Each attribute's type OID and what fills it.
    fields: Vec<(u32, RowField)>,
    /// Per column of the table's schema: its attribute's type OID, if the table has it.
    column_oids: Vec<Option<u32>>,
}

impl RowField {
    /// Whether an attribute of type `oid` can carry what this field sends.
    fn accepts(&self, oid: u32) -> bool {
        match self {
            RowField::Id => oid == type_oid(&PgType::Text),
            RowField::Version | RowField::CommitNumber => oid == type_oid(&PgType::Bigint),
            RowField::Column(_) | RowField::Null => true,
        }
    }
}

enum RowField {
    Id,
    Version,
    CommitNumber,
    Column(usize),
    /// Filled by the statement, or a column sfmirror does not write.
    Null,
}

impl RowType {
    /// Whether every column the run writes has the type its values are encoded for (a table
    /// someone altered by hand may not; such a run takes the per-column statement).
    fn fits(&self, run: &Run) -> bool {
        self.fits_columns(&run.table, run.columns.iter().copied())
    }

    /// [`Self::fits`] for every column of `table` (a snapshot writes them all).
    pub(super) fn fits_table(&self, table: &TableSchema) -> bool {
        self.fits_columns(table, 0..table.columns.len())
    }

    fn fits_columns(&self, table: &TableSchema, mut columns: impl Iterator<Item = usize>) -> bool {
        columns.all(|col| {
            self.column_oids.get(col).copied().flatten()
                == Some(type_oid(&table.columns[col].pg_type))
        })
    }

    /// The run's rows as one binary array of this row type: per row its id, version, commit
    /// number and the cells it writes, NULL elsewhere.
    fn encode(&self, run: &Run) -> Vec<u8> {
        // Sized once: growing a buffer of megabytes copies it and faults in new pages.
        let per_row = 8 + self.fields.len() * 8 + 16;
        let size: usize = run
            .ops
            .iter()
            .map(|op| {
                let cells: usize = op
                    .cells
                    .iter()
                    .map(|(_, v)| v.as_ref().map_or(0, Vec::len))
                    .sum();
                per_row + op.id.len() + cells
            })
            .sum();
        let mut buf = Vec::with_capacity(20 + size);
        for word in [1, 0, self.oid as i32, run.ops.len() as i32, 1] {
            buf.extend_from_slice(&word.to_be_bytes());
        }
        let mut slots: Vec<Option<&[u8]>> = vec![None; run.table.columns.len()];
        for op in &run.ops {
            for (c, v) in &op.cells {
                slots[*c] = v.as_deref();
            }
            let start = buf.len();
            buf.extend_from_slice(&[0; 4]);
            buf.extend_from_slice(&(self.fields.len() as i32).to_be_bytes());
            for (oid, field) in &self.fields {
                buf.extend_from_slice(&oid.to_be_bytes());
                match field {
                    RowField::Id => put_field(&mut buf, Some(op.id.as_bytes())),
                    RowField::Version => put_field(&mut buf, Some(&op.version.to_be_bytes())),
                    RowField::CommitNumber => {
                        put_field(&mut buf, Some(&op.commit_number.to_be_bytes()))
                    }
                    RowField::Column(c) => put_field(&mut buf, slots[*c]),
                    RowField::Null => put_field(&mut buf, None),
                }
            }
            let len = (buf.len() - start - 4) as i32;
            buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
            for (c, _) in &op.cells {
                slots[*c] = None;
            }
        }
        buf
    }
}

/// Reads the row types of the tables the plan updates or upserts into, in one round trip,
/// inside the transaction that uses them (a table another task has just widened is seen as it
/// is now). A table whose id or version columns were retyped by hand is left out: its runs
/// take the per-column statements.
async fn load_row_types(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    runs: &[Run],
) -> Result<HashMap<String, RowType>, ReplicaError> {
    let mut tables: HashMap<&str, &TableSchema> = HashMap::new();
    let hard = settings.delete_mode == DeleteMode::Hard;
    for run in runs.iter().filter(|r| !(hard && r.kind == OpKind::Delete)) {
        tables.insert(run.table.table.as_str(), &run.table);
    }
    row_types(tx, &settings.data_schema, &tables).await
}

/// The row types of `tables` (by table name) as Postgres has them now, in the caller's
/// transaction; a table whose id or version columns have other types is left out.
pub(super) async fn row_types(
    tx: &deadpool_postgres::Transaction<'_>,
    data_schema: &str,
    tables: &HashMap<&str, &TableSchema>,
) -> Result<HashMap<String, RowType>, ReplicaError> {
    if tables.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<&str> = tables.keys().copied().collect();
    let rows = tx
        .query(
            "SELECT c.relname::text, c.reltype::int8, a.attname::text, a.atttypid::int8
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE n.nspname = $1 AND c.relname = ANY($2) AND c.relkind = 'r'
             ORDER BY c.relname, a.attnum",
            &[&data_schema, &names],
        )
        .await
        .map_err(ReplicaError::pg("read the row types of the replica tables"))?;
    let mut out: HashMap<String, RowType> = HashMap::new();
    for row in rows {
        let (relname, reltype, attname, atttypid): (String, i64, String, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let Some(table) = tables.get(relname.as_str()) else {
            continue;
        };
        let row_type = out.entry(relname.clone()).or_insert_with(|| RowType {
            oid: reltype as u32,
            fields: Vec::new(),
            column_oids: vec![None; table.columns.len()],
        });
        let field = match attname.as_str() {
            "id" => RowField::Id,
            super::schema::VERSION_COLUMN => RowField::Version,
            super::schema::COMMIT_NUMBER_COLUMN => RowField::CommitNumber,
            name => match table.columns.iter().position(|c| c.name == name) {
                Some(col) => {
                    row_type.column_oids[col] = Some(atttypid as u32);
                    RowField::Column(col)
                }
                None => RowField::Null,
            },
        };
        row_type.fields.push((atttypid as u32, field));
    }
    out.retain(|_, t| t.fields.iter().all(|(oid, field)| field.accepts(*oid)));
    Ok(out)
}

/// [`update`] with the run's rows sent as one array of the table's row type plus one array of
/// write masks, instead of an array per column: Postgres unnests two arrays instead of one
/// per column and mask, which made the statement about a third cheaper on wide tables.
async fn update_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    row_type: &RowType,
    run: Run,
    outcome: &mut ApplyOutcome,
) -> Result<Vec<Op>, ReplicaError> {
    let t = &run.table;
    let table = qualified_table(settings, t);
    let ctl = quote(&settings.control_schema);
    // Bit k of a row's mask (bytea bit order: least significant first) says it writes the
    // run's k-th column; columns every row writes need no mask.
    let mask_len = run.columns.len().div_ceil(8);
    let mut masks: Vec<Vec<u8>> = Vec::with_capacity(run.ops.len());
    let mut everyone = vec![true; run.columns.len()];
    for op in &run.ops {
        let mut mask = vec![0u8; mask_len];
        let mut cells = op.cells.iter().peekable();
        for (k, &col) in run.columns.iter().enumerate() {
            if cells.next_if(|(c, _)| *c == col).is_some() {
                mask[k / 8] |= 1 << (k % 8);
            } else {
                everyone[k] = false;
            }
        }
        masks.push(mask);
    }
    let mut assign = Vec::new();
    for (k, &col) in run.columns.iter().enumerate() {
        let q = quote(&t.columns[col].name);
        if everyone[k] {
            assign.push(format!("{q} = u.{q}"));
        } else {
            assign.push(format!(
                "{q} = CASE WHEN get_bit(u.sfm_mask, {k}) = 1 THEN u.{q} ELSE t.{q} END"
            ));
        }
    }
    let sql = update_sql(
        run.kind,
        &table,
        &format!("unnest($1::bytea[], $2::{table}[]) AS u(sfm_mask)"),
        ["u._sfm_version", "u._sfm_commit_number"],
        assign,
        &not_tombstoned(&ctl, 3, COMPOSITE_ROW),
    );
    let rows = row_type.encode(&run);
    let missed = send(tx, &run, &sql, &[&masks, &Raw(&rows), &t.object], outcome).await?;
    Ok(missed_ops(run, &missed))
}

/// The masked `UPDATE` of a merge or soft-delete run over the rows `from` yields (as `u`),
/// returning the ids it did not update. `assign` holds the data columns' assignments;
/// `version` names the rows' version and commit number.
fn update_sql(
    kind: OpKind,
    table: &str,
    from: &str,
    version: [&str; 2],
    mut assign: Vec<String>,
    tomb: &str,
) -> String {
    let [v, n] = version;
    assign.extend([
        format!("_sfm_version = {v}"),
        format!("_sfm_commit_number = {n}"),
        "_sfm_synced_at = now()".to_string(),
    ]);
    if kind == OpKind::Delete {
        assign.push("_sfm_deleted = true".to_string());
    }
    format!(
        "WITH u AS MATERIALIZED (SELECT * FROM {from}),
         done AS (UPDATE {table} AS t SET {assign} FROM u
                  WHERE t.id = u.id
                    AND (t._sfm_version, coalesce(t._sfm_commit_number, -1))
                        <= ({v}, coalesce({n}, -1))
                    AND {tomb}
                  RETURNING t.id)
         SELECT u.id FROM u WHERE NOT EXISTS (SELECT 1 FROM done WHERE done.id = u.id)",
        assign = assign.join(", "),
    )
}

/// The run's ops whose ids an update returned as missed (to go through the upsert).
fn missed_ops(run: Run, missed: &[tokio_postgres::Row]) -> Vec<Op> {
    if missed.is_empty() {
        return Vec::new();
    }
    let missed: std::collections::HashSet<String> = missed.iter().map(|r| r.get(0)).collect();
    run.ops
        .into_iter()
        .filter(|o| missed.contains(&o.id))
        .collect()
}

/// One plain `UPDATE` for every row of a merge or soft-delete run, whatever columns each row
/// writes: a column some rows leave alone comes with a mask (`CASE WHEN` keeps the row's
/// value). Unlike `ON CONFLICT` it neither probes for a conflict nor locks each row first.
/// Returns the rows it did not update (missing, newer, or behind a tombstone).
async fn update(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    run: Run,
    outcome: &mut ApplyOutcome,
) -> Result<Vec<Op>, ReplicaError> {
    let t = &run.table;
    let RunRows {
        table,
        ctl,
        ids,
        versions,
        commits,
    } = RunRows::new(settings, &run);
    // Per column of the run: each row's value, and whether the row writes it at all.
    let mut values: Vec<Vec<Option<Raw>>> = vec![Vec::with_capacity(ids.len()); run.columns.len()];
    let mut masks: Vec<Vec<bool>> = vec![Vec::with_capacity(ids.len()); run.columns.len()];
    for op in &run.ops {
        let mut cells = op.cells.iter().peekable();
        for (k, &col) in run.columns.iter().enumerate() {
            match cells.next_if(|(c, _)| *c == col) {
                Some((_, v)) => {
                    values[k].push(v.as_deref().map(Raw));
                    masks[k].push(true);
                }
                None => {
                    values[k].push(None);
                    masks[k].push(false);
                }
            }
        }
    }
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&ids];
    let mut unnest = vec!["$1::text[]".to_string()];
    let mut alias = vec!["id".to_string()];
    let mut assign = Vec::new();
    for (k, &col) in run.columns.iter().enumerate() {
        let c = &t.columns[col];
        let q = quote(&c.name);
        params.push(&values[k]);
        unnest.push(format!("${}::{}[]", params.len(), param_type(&c.pg_type)));
        alias.push(format!("c{k}"));
        let value = column_expr(&c.pg_type, &format!("u.c{k}"));
        if masks[k].iter().all(|m| *m) {
            assign.push(format!("{q} = {value}"));
        } else {
            params.push(&masks[k]);
            unnest.push(format!("${}::boolean[]", params.len()));
            alias.push(format!("m{k}"));
            assign.push(format!(
                "{q} = CASE WHEN u.m{k} THEN {value} ELSE t.{q} END"
            ));
        }
    }
    params.push(&versions);
    unnest.push(format!("${}::bigint[]", params.len()));
    params.push(&commits);
    unnest.push(format!("${}::bigint[]", params.len()));
    alias.extend(["v".to_string(), "n".to_string()]);
    params.push(&t.object);
    let object_param = params.len();
    let sql = update_sql(
        run.kind,
        &table,
        &format!("unnest({}) AS u({})", unnest.join(", "), alias.join(", ")),
        ["u.v", "u.n"],
        assign,
        &not_tombstoned(&ctl, object_param, ["u.id", "u.v", "u.n"]),
    );
    let rows = send(tx, &run, &sql, &params, outcome).await?;
    drop(params);
    drop(values);
    Ok(missed_ops(run, &rows))
}

/// Turns the diffs of a run's rows into full values: each is applied to the row's current
/// value (read in this transaction, after the earlier rounds) and accepted only if the result
/// has the hash Salesforce sent ([`textdiff::apply`]). A diff that does not fit (no row, a
/// missed change, a text column it cannot be) leaves the column alone and asks for the record
/// to be read again.
async fn resolve_diffs(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    run: &mut Run,
    outcome: &mut ApplyOutcome,
) -> Result<(), ReplicaError> {
    let t = run.table.clone();
    let table = qualified_table(settings, &t);
    let mut columns: Vec<usize> = run.ops.iter().flat_map(|o| o.diffs.clone()).collect();
    columns.sort_unstable();
    columns.dedup();
    for col in columns {
        let column = &t.columns[col];
        let ids: Vec<&str> = run
            .ops
            .iter()
            .filter(|o| o.diffs.contains(&col))
            .map(|o| o.id.as_str())
            .collect();
        let sql = format!(
            "SELECT id, {}::text FROM {table} WHERE id = ANY($1::text[])",
            quote(&column.name)
        );
        outcome.statements += 1;
        let rows = tx
            .query(&sql, &[&ids])
            .await
            .map_err(ReplicaError::pg(format!("read {} for diffs", column.field)))?;
        let current: HashMap<String, Option<String>> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        drop(ids);
        for op in run.ops.iter_mut().filter(|o| o.diffs.contains(&col)) {
            op.diffs.retain(|&c| c != col);
            let Some(i) = op.cells.iter().position(|(c, _)| *c == col) else {
                continue;
            };
            let new = match (&op.cells[i].1, current.get(&op.id)) {
                (Some(diff), Some(Some(old))) if column.pg_type == PgType::Text => {
                    std::str::from_utf8(diff)
                        .ok()
                        .and_then(|d| textdiff::apply(old, d))
                }
                _ => None,
            };
            match new {
                Some(value) => op.cells[i].1 = Some(value.into_bytes()),
                None => {
                    op.cells.remove(i);
                    outcome.repairs.push(RepairRequest::Record {
                        object: t.object.clone(),
                        id: op.id.clone(),
                        reason: format!(
                            "the diff of {} does not fit the replica's value",
                            column.field
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// [`upsert_rows`] when the run fits the table's row type, else [`upsert`].
async fn upsert_any(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    row_types: &HashMap<String, RowType>,
    run: Run,
    outcome: &mut ApplyOutcome,
) -> Result<(), ReplicaError> {
    match row_types.get(&run.table.table) {
        Some(row_type) if row_type.fits(&run) => {
            upsert_rows(tx, settings, row_type, run, outcome).await
        }
        _ => upsert(tx, settings, run, outcome).await,
    }
}

/// [`upsert`] with the run's rows sent as one array of the table's row type (see
/// [`update_rows`]).
async fn upsert_rows(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    row_type: &RowType,
    run: Run,
    outcome: &mut ApplyOutcome,
) -> Result<(), ReplicaError> {
    let t = &run.table;
    let table = qualified_table(settings, t);
    let ctl = quote(&settings.control_schema);
    let names: Vec<String> = run
        .columns
        .iter()
        .map(|&col| quote(&t.columns[col].name))
        .collect();
    let mut insert_cols: Vec<String> = vec!["id".into()];
    insert_cols.extend(names.iter().cloned());
    let select: Vec<String> = insert_cols.iter().map(|c| format!("u.{c}")).collect();
    let set: Vec<String> = names
        .iter()
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let sql = upsert_sql(
        run.kind,
        &table,
        &format!("unnest($1::{table}[]) AS u"),
        ["u._sfm_version", "u._sfm_commit_number"],
        (insert_cols, select, set),
        &not_tombstoned(&ctl, 2, COMPOSITE_ROW),
    );
    let rows = row_type.encode(&run);
    let inserted = send(tx, &run, &sql, &[&Raw(&rows), &t.object], outcome).await?;
    report_inserted_merges(&run, inserted, outcome);
    Ok(())
}

/// The `INSERT .. ON CONFLICT` of an upsert run. `columns` holds the id and data columns
/// inserted, where their values come from in `from`, and what a conflict sets them to;
/// `version` names the rows' version and commit number. The bookkeeping columns, the deleted
/// flag of the run's kind, the guard and what a merge returns are added here.
fn upsert_sql(
    kind: OpKind,
    table: &str,
    from: &str,
    version: [&str; 2],
    columns: (Vec<String>, Vec<String>, Vec<String>),
    tomb: &str,
) -> String {
    let (mut insert_cols, mut select, mut set) = columns;
    insert_cols.extend(["_sfm_version".into(), "_sfm_commit_number".into()]);
    select.extend(version.iter().map(|v| v.to_string()));
    set.extend([
        "_sfm_version = EXCLUDED._sfm_version".to_string(),
        "_sfm_commit_number = EXCLUDED._sfm_commit_number".to_string(),
        "_sfm_synced_at = now()".to_string(),
    ]);
    match kind {
        OpKind::Upsert => set.push("_sfm_deleted = false".into()),
        OpKind::Delete => {
            insert_cols.push("_sfm_deleted".into());
            select.push("true".into());
            set.push("_sfm_deleted = true".into());
        }
        OpKind::Merge => {}
    }
    // Only a merge needs to know which rows it inserted.
    let returning = if kind == OpKind::Merge {
        "RETURNING t.id, (xmax = 0) AS inserted"
    } else {
        ""
    };
    format!(
        "INSERT INTO {table} AS t ({cols})
         SELECT {select} FROM {from}
         WHERE {tomb}
         ON CONFLICT (id) DO UPDATE SET {set} WHERE {GUARD}
         {returning}",
        cols = insert_cols.join(", "),
        select = select.join(", "),
        set = set.join(", "),
    )
}

/// An UPDATE for a record the replica lacked inserted only what it carried: the record is read
/// again. `rows` are what a merge's upsert returned (id, inserted).
fn report_inserted_merges(run: &Run, rows: Vec<tokio_postgres::Row>, outcome: &mut ApplyOutcome) {
    if run.kind != OpKind::Merge {
        return;
    }
    for row in rows {
        let inserted: bool = row.get(1);
        if inserted {
            let id: String = row.get(0);
            outcome.repairs.push(RepairRequest::Record {
                object: run.table.object.clone(),
                reason: format!("UPDATE for unknown record {id}"),
                id,
            });
        }
    }
}

/// `INSERT .. ON CONFLICT` of a run whose rows all write the same columns: inserts records the
/// replica lacks, replaces older rows. Upserts go out this way; merges and soft deletes only for
/// what [`update`] missed.
async fn upsert(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    run: Run,
    outcome: &mut ApplyOutcome,
) -> Result<(), ReplicaError> {
    let t = &run.table;
    let RunRows {
        table,
        ctl,
        ids,
        versions,
        commits,
    } = RunRows::new(settings, &run);
    // Columns that are null in every row of the run are not sent (a CREATE carries many): they
    // are set to NULL on conflict and left to their (null) default on insert, which is what
    // sending nulls would do, minus the arrays and casts.
    let sent: Vec<usize> = (0..run.columns.len())
        .filter(|&i| run.ops.iter().any(|o| o.cells[i].1.is_some()))
        .collect();
    let n = sent.len();
    let mut insert_cols = vec!["id".to_string()];
    let mut select = vec!["u.id".to_string()];
    let mut unnest = vec!["$1::text[]".to_string()];
    let mut alias = vec!["id".to_string()];
    let mut set = Vec::new();
    for (i, &col) in run.columns.iter().enumerate() {
        let c = &t.columns[col];
        let q = quote(&c.name);
        match sent.binary_search(&i) {
            Ok(k) => {
                let value = column_expr(&c.pg_type, &format!("u.c{k}"));
                insert_cols.push(q.clone());
                select.push(value);
                unnest.push(format!("${}::{}[]", k + 2, param_type(&c.pg_type)));
                alias.push(format!("c{k}"));
                set.push(format!("{q} = EXCLUDED.{q}"));
            }
            Err(_) => set.push(format!("{q} = NULL")),
        }
    }
    unnest.push(format!("${}::bigint[]", n + 2));
    unnest.push(format!("${}::bigint[]", n + 3));
    alias.push("v".into());
    alias.push("n".into());
    let sql = upsert_sql(
        run.kind,
        &table,
        &format!("unnest({}) AS u({})", unnest.join(", "), alias.join(", ")),
        ["u.v", "u.n"],
        (insert_cols, select, set),
        &not_tombstoned(&ctl, n + 4, ["u.id", "u.v", "u.n"]),
    );
    let columns: Vec<Vec<Option<Raw>>> = sent
        .iter()
        .map(|&i| {
            run.ops
                .iter()
                .map(|o| o.cells[i].1.as_deref().map(Raw))
                .collect()
        })
        .collect();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::with_capacity(n + 4);
    params.push(&ids);
    for c in &columns {
        params.push(c);
    }
    params.push(&versions);
    params.push(&commits);
    params.push(&t.object);
    let rows = send(tx, &run, &sql, &params, outcome).await?;
    report_inserted_merges(&run, rows, outcome);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: OpKind, cells: &[(usize, Option<&str>)], version: i64) -> Op {
        Op {
            id: "001000000000001AAA".to_string(),
            kind,
            cells: cells
                .iter()
                .map(|(c, v)| (*c, v.map(|v| v.as_bytes().to_vec())))
                .collect(),
            diffs: Vec::new(),
            version,
            commit_number: 1,
        }
    }

    fn cells(op: &Op) -> Vec<(usize, Option<&str>)> {
        op.cells
            .iter()
            .map(|(c, v)| (*c, v.as_deref().and_then(|v| std::str::from_utf8(v).ok())))
            .collect()
    }

    fn with_id(mut op: Op, id: &str) -> Op {
        op.id = id.to_string();
        op
    }

    fn account() -> Arc<TableSchema> {
        let path = format!(
            "{}/src/emulator/org/Account.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("describe file");
        Arc::new(
            TableSchema::from_describe(serde_json::from_str(&text).expect("describe"))
                .expect("table"),
        )
    }

    /// (round, kind, columns, ids) of every run.
    fn shape(plan: &MergePlan) -> Vec<(usize, OpKind, Vec<usize>, Vec<String>)> {
        let mut out = Vec::new();
        let mut runs = plan.runs.iter();
        for (round, &size) in plan.rounds.iter().enumerate() {
            for run in runs.by_ref().take(size) {
                let ids = run.ops.iter().map(|o| o.id.clone()).collect();
                out.push((round, run.kind, run.columns.clone(), ids));
            }
        }
        out
    }

    #[test]
    fn a_split_keeps_each_record_whole_and_in_its_rounds() {
        let table = account();
        let merge = |id: &str, cols: &[usize]| {
            let cells: Vec<(usize, Option<&str>)> = cols.iter().map(|c| (*c, Some("v"))).collect();
            with_id(op(OpKind::Merge, &cells, 10), id)
        };
        let run = |kind, columns: Vec<usize>, ops| Run {
            table: table.clone(),
            kind,
            columns,
            ops,
        };
        let plan = MergePlan {
            runs: vec![
                run(
                    OpKind::Merge,
                    vec![1, 2, 3, 5],
                    vec![merge("A", &[1]), merge("B", &[2, 3]), merge("C", &[5])],
                ),
                run(
                    OpKind::Upsert,
                    vec![1, 2],
                    vec![with_id(
                        op(OpKind::Upsert, &[(1, None), (2, None)], 10),
                        "D",
                    )],
                ),
                run(OpKind::Merge, vec![4], vec![merge("A", &[4])]),
            ],
            rounds: vec![2, 1],
            events: [(ChangeType::Update, 4), (ChangeType::Create, 1)].into(),
            repairs: vec![RepairRequest::Entity {
                object: "Account".into(),
                since_ms: 0,
                reason: "gap".into(),
            }],
        };
        let keys: RecordKeys = ["A", "D", "Z"]
            .iter()
            .map(|id| record_key(&table.table, id))
            .collect();
        assert_eq!(plan.record_keys().len(), 4);
        let (free, rest) = plan.split(&keys);
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            shape(&free),
            [(0, OpKind::Merge, vec![2, 3, 5], ids(&["B", "C"]))]
        );
        assert_eq!(
            shape(&rest),
            [
                (0, OpKind::Merge, vec![1], ids(&["A"])),
                (0, OpKind::Upsert, vec![1, 2], ids(&["D"])),
                (1, OpKind::Merge, vec![4], ids(&["A"])),
            ]
        );
        assert!(free.events.is_empty() && free.repairs.is_empty());
        assert_eq!(rest.events.values().sum::<u64>(), 5);
        assert_eq!(rest.repairs.len(), 1);
    }

    #[test]
    fn updates_fold_into_one_write_with_the_newest_values() {
        let mut last = op(OpKind::Merge, &[(1, Some("a")), (4, Some("b"))], 10);
        let next = op(OpKind::Merge, &[(2, None), (4, Some("c"))], 11);
        assert!(fold(&mut last, next, DeleteMode::Soft).is_ok());
        assert_eq!(last.kind, OpKind::Merge);
        assert_eq!(last.version, 11);
        assert_eq!(cells(&last), [(1, Some("a")), (2, None), (4, Some("c"))]);
    }

    #[test]
    fn an_update_after_a_create_stays_a_create() {
        let mut last = op(OpKind::Upsert, &[(1, Some("a")), (2, None), (3, None)], 10);
        let next = op(OpKind::Merge, &[(3, Some("x"))], 10);
        assert!(fold(&mut last, next, DeleteMode::Hard).is_ok());
        assert_eq!(last.kind, OpKind::Upsert);
        assert_eq!(cells(&last), [(1, Some("a")), (2, None), (3, Some("x"))]);
    }

    #[test]
    fn an_older_change_is_dropped_as_the_guard_would() {
        let mut last = op(OpKind::Merge, &[(1, Some("new"))], 20);
        let next = op(OpKind::Upsert, &[(1, Some("old")), (2, Some("old"))], 19);
        assert!(fold(&mut last, next, DeleteMode::Soft).is_ok());
        assert_eq!(cells(&last), [(1, Some("new"))]);
        assert_eq!(last.version, 20);
        // Same timestamp, lower commit number: older too.
        let mut older = op(OpKind::Merge, &[(1, Some("older"))], 20);
        older.commit_number = 0;
        assert!(fold(&mut last, older, DeleteMode::Soft).is_ok());
        assert_eq!(cells(&last), [(1, Some("new"))]);
    }

    #[test]
    fn a_create_replaces_only_what_it_covers() {
        let mut last = op(OpKind::Delete, &[], 10);
        let undelete = op(OpKind::Upsert, &[(1, Some("a")), (2, None)], 11);
        assert!(fold(&mut last, undelete, DeleteMode::Soft).is_ok());
        assert_eq!(last.kind, OpKind::Upsert);
        // A writer schema without column 5 cannot replace a write of column 5.
        let mut last = op(OpKind::Merge, &[(5, Some("x"))], 10);
        let create = op(OpKind::Upsert, &[(1, Some("a"))], 11);
        assert!(fold(&mut last, create, DeleteMode::Soft).is_err());
    }

    #[test]
    fn a_diff_is_never_folded_onto_a_value_the_batch_writes() {
        let mut last = op(OpKind::Merge, &[(1, Some("full")), (2, Some("x"))], 10);
        let mut next = op(OpKind::Merge, &[(1, Some("--- \n+++ h\n"))], 11);
        next.diffs = vec![1];
        assert!(fold(&mut last, next, DeleteMode::Soft).is_err());
        // A diff on a column `last` leaves alone folds; a full value later replaces it.
        let mut last = op(OpKind::Merge, &[(2, Some("x"))], 10);
        let mut next = op(OpKind::Merge, &[(1, Some("--- \n+++ h\n"))], 11);
        next.diffs = vec![1];
        assert!(fold(&mut last, next, DeleteMode::Soft).is_ok());
        assert_eq!(last.diffs, [1]);
        let full = op(OpKind::Merge, &[(1, Some("whole text"))], 12);
        assert!(fold(&mut last, full, DeleteMode::Soft).is_ok());
        assert!(last.diffs.is_empty());
        assert_eq!(cells(&last), [(1, Some("whole text")), (2, Some("x"))]);
    }

    #[test]
    fn deletes_fold_by_mode() {
        // Hard: the row goes, whatever was written before.
        let mut last = op(OpKind::Upsert, &[(1, Some("a"))], 10);
        assert!(fold(&mut last, op(OpKind::Delete, &[], 11), DeleteMode::Hard).is_ok());
        assert_eq!((last.kind, last.version), (OpKind::Delete, 11));
        // Soft: the deleted row keeps its columns, so the write before it must land first.
        let mut last = op(OpKind::Upsert, &[(1, Some("a"))], 10);
        assert!(fold(&mut last, op(OpKind::Delete, &[], 11), DeleteMode::Soft).is_err());
        // An update after a delete is never folded.
        let mut last = op(OpKind::Delete, &[], 10);
        let update = op(OpKind::Merge, &[(1, Some("a"))], 11);
        assert!(fold(&mut last, update, DeleteMode::Hard).is_err());
        let mut last = op(OpKind::Delete, &[], 10);
        assert!(fold(&mut last, op(OpKind::Delete, &[], 12), DeleteMode::Soft).is_ok());
        assert_eq!(last.version, 12);
    }
}
