//! Executing a plan: round by round inside the caller's transaction, the runs of a round
//! pipelined on the connection, each sent as the statement its kind needs.

use super::ApplyOutcome;
use super::fold::OpKind;
use super::plan::{MergePlan, Run, plan_events};
use super::row_type::{RowType, row_types};
use super::statements::{hard_delete, resolve_diffs, update, update_rows, upsert_any};
use crate::config::DeleteMode;
use crate::model::ChangeEvent;
use crate::replica::schema::TableSchema;
use crate::replica::{ApplySettings, ReplicaError, locks};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;

/// Runs of one round sent before the first of them has answered.
const PIPELINED_RUNS: usize = 2;

/// Applies `events` in order inside `tx`. `tables` must hold every entity of the batch.
pub async fn apply_events(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    tables: &HashMap<String, Arc<TableSchema>>,
    mut events: Vec<ChangeEvent>,
) -> Result<ApplyOutcome, ReplicaError> {
    let plan = plan_events(settings, tables, &mut events)?;
    lock_objects(tx, settings, &plan).await?;
    execute(tx, settings, plan).await
}

/// In hard delete mode, takes the write lock of every object `plan` writes, shared, in name
/// order (see [`crate::replica::locks`]); nothing in soft delete mode. A batch calls it once,
/// before its first write: it costs a round trip per object.
pub async fn lock_objects(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &ApplySettings,
    plan: &MergePlan,
) -> Result<(), ReplicaError> {
    if settings.delete_mode != DeleteMode::Hard {
        return Ok(());
    }
    let mut objects: Vec<&str> = plan.runs.iter().map(|r| r.table.object.as_str()).collect();
    objects.sort_unstable();
    objects.dedup();
    for object in objects {
        locks::share_writes(tx, &settings.data_schema, object).await?;
    }
    Ok(())
}

/// Sends a plan's runs inside `tx`, round by round: every record sees its changes in order.
/// The caller has taken the plan's [`lock_objects`] in `tx` (a batch split in two parts takes
/// them once, for the whole plan).
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
