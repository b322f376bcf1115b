//! Planning: a batch of change events -> runs of rows grouped into rounds, with their values
//! rendered in Postgres' binary form and the repairs the batch needs. No I/O: the channel plans
//! the next batch while Postgres applies this one.

use super::fold::{Cell, Op, OpKind, fold};
use crate::model::{ChangeEvent, ChangeType};
use crate::replica::repair_queue::RepairRequest;
use crate::replica::schema::TableSchema;
use crate::replica::{ApplySettings, ReplicaError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Records' folded changes that go out as one statement: same table, kind, and for upserts the
/// same columns. Merges and soft deletes of different column sets share a statement (each row
/// says which columns it writes).
pub(super) struct Run {
    pub(super) table: Arc<TableSchema>,
    pub(super) kind: OpKind,
    /// Every column some row writes, sorted.
    pub(super) columns: Vec<usize>,
    pub(super) ops: Vec<Op>,
}

/// A batch turned into runs of rows, ready to send: everything [`super::apply_events`] does that needs
/// no connection. Built apart from the transaction so that a caller can prepare the next batch
/// while Postgres works on this one.
pub struct MergePlan {
    pub(super) runs: Vec<Run>,
    /// How many runs each round has, in order.
    pub(super) rounds: Vec<usize>,
    pub(super) events: HashMap<ChangeType, u64>,
    pub(super) repairs: Vec<RepairRequest>,
}

/// The records a plan writes, as hashes of table and id. Two records whose hashes collide
/// count as one, which can only make a write wait for a batch it did not need to wait for.
pub type RecordKeys = HashSet<u64>;

pub(super) fn record_key(table: &str, id: &str) -> u64 {
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
pub(super) fn written_columns(ops: &[Op]) -> Vec<usize> {
    let mut columns: Vec<usize> = ops
        .iter()
        .flat_map(|o| o.cells.iter().map(|(c, _)| *c))
        .collect();
    columns.sort_unstable();
    columns.dedup();
    columns
}

/// Identifies a table within one call (tables are shared, so their address is stable).
pub(super) fn table_key(table: &Arc<TableSchema>) -> usize {
    Arc::as_ptr(table) as usize
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
pub(super) fn row_values(
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
            Some(v) => crate::replica::binary::encode_taking(&c.pg_type, v)
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

#[cfg(test)]
mod overflow_tests {
    use super::*;
    use crate::config::DeleteMode;
    use crate::model::{ChangeHeader, ReplayId};

    fn overflow(record_ids: &[&str]) -> ChangeEvent {
        ChangeEvent {
            replay_id: ReplayId::from_u64(9),
            schema_id: "s".into(),
            header: ChangeHeader {
                entity_name: "Account".into(),
                record_ids: record_ids.iter().map(|s| s.to_string()).collect(),
                change_type: ChangeType::GapOverflow,
                change_origin: String::new(),
                transaction_key: "tk".into(),
                sequence_number: 1,
                commit_timestamp: 100_000,
                commit_number: 1,
                commit_user: String::new(),
                changed_fields: vec![],
                nulled_fields: vec![],
                diff_fields: vec![],
            },
            fields: vec![],
            schema_fields: Arc::from(Vec::<Arc<str>>::new()),
        }
    }

    /// A real org's GAP_OVERFLOW names the placeholder `000000000000000AAA`; older captures
    /// and the documentation show none. Either way the entity repair covers every record, and
    /// the placeholder must never become a record repair (it names no record).
    #[test]
    fn an_overflow_queues_one_entity_repair_whatever_its_ids() {
        let path = format!(
            "{}/src/emulator/org/Account.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("describe file");
        let table = Arc::new(
            TableSchema::from_describe(serde_json::from_str(&text).expect("describe"))
                .expect("table"),
        );
        let tables: HashMap<String, Arc<TableSchema>> = [("Account".to_string(), table)].into();
        let settings = ApplySettings {
            data_schema: "salesforce".into(),
            control_schema: "sfmirror".into(),
            delete_mode: DeleteMode::Soft,
            repair_margin_ms: 1_000,
            audit_batches: false,
        };
        for ids in [&["000000000000000AAA"][..], &[][..]] {
            let mut events = vec![overflow(ids)];
            let plan = plan_events(&settings, &tables, &mut events).expect("plans");
            assert!(plan.runs.is_empty(), "{ids:?}: no row is written");
            match plan.repairs() {
                [
                    RepairRequest::Entity {
                        object, since_ms, ..
                    },
                ] => {
                    assert_eq!(object, "Account");
                    assert_eq!(*since_ms, 99_000);
                }
                other => panic!("{ids:?}: want one entity repair, got {other:?}"),
            }
        }
    }
}
