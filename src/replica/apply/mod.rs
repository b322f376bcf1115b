//! The merge: a batch of change events -> version-guarded, set-based SQL in the caller's
//! transaction.
//!
//! # Data flow
//!
//! ```text
//!  events ──plan_events──> MergePlan (runs in rounds, values in binary form, repairs)
//!                              │   no I/O: planned while the batch before commits
//!                              v
//!          ──execute──> per round, per run: masked UPDATE / INSERT .. ON CONFLICT /
//!                       hard DELETE + tombstone, runs of a round pipelined
//! ```
//!
//! - `fold`: a record's changes within a batch folded into as few writes as give the same
//!   row.
//! - `plan`: runs, rounds, rendered values and repairs ([`plan_events`], [`MergePlan`]).
//! - `row_type`: the table's row type, so a run's rows can travel as one array of rows.
//! - `statements`: the SQL of each kind of run and the functions that send it.
//! - `execute`: rounds in order inside the transaction ([`execute()`], [`apply_events`]).
//!
//! # Folding
//!
//! A batch's changes of one record are folded into as few writes as give the same row:
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
//! # Runs and rounds
//!
//! Each round is one statement per table and kind (per column set, for upserts). UPDATEs
//! and soft DELETEs of different column sets share one plain `UPDATE .. FROM unnest(..)`, each
//! row carrying a mask of the columns it writes; rows it does not reach (a record the replica
//! lacks, a newer row, a tombstone) go again through `INSERT .. ON CONFLICT`, where the guard
//! decides. CREATE / UNDELETE runs go straight to `INSERT .. ON CONFLICT`. Rounds execute in
//! order, so every record sees its writes in order. A run's rows travel as one array of the
//! table's own row type (read in the batch's transaction), which Postgres unpacks far more
//! cheaply than an array per column; a table whose column types were changed by hand gets the
//! array-per-column form of the same statements.
//!
//! # Why replays are harmless
//!
//! Invariant 3: every write carries the change's version (`commitTimestamp` ms,
//! `commitNumber` as tie-breaker) and only replaces a row whose version is not newer; deletes
//! leave the version behind (soft: the row with `_sfm_deleted`; hard: a tombstone), so an
//! older change cannot resurrect a record. Field-level merge (invariant 4): an UPDATE writes
//! exactly the columns `changedFields` names and nulls exactly those `nulledFields` names. A
//! long text sent as a diff (`diffFields`) is applied to the row's current value and kept only
//! if the result has the SHA-256 Salesforce sent; a diff is never folded onto a value the same
//! batch writes. What the event cannot carry (gaps, overflows, a diff that does not fit, an
//! UPDATE for a record the replica lacks) becomes a [`RepairRequest`] that the caller commits
//! in the same transaction (invariant 2).
//!
//! # Fields without a column
//!
//! An event field the table has no column for is not written: the caller prepares every
//! table against each new writer schema first (describing the object again when the schema
//! has fields the table lacks), so such a field is one describe does not list — a field the
//! event schema carries but the object does not expose (the Address record's `Xyz`), or one
//! deleted from the org after a restart lost its mapping. The caller reports those.

mod execute;
mod fold;
mod plan;
mod row_type;
mod statements;

pub use execute::{apply_events, execute, lock_objects};
pub use plan::{MergePlan, RecordKeys, plan_events};
pub(crate) use row_type::row_types;

use super::repair_queue::RepairRequest;
use crate::model::ChangeType;
use std::collections::HashMap;

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

#[cfg(test)]
mod tests {
    use super::fold::*;
    use super::plan::*;
    use super::*;
    use crate::config::DeleteMode;
    use crate::replica::schema::TableSchema;
    use std::sync::Arc;

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
