//! Folding: a batch's changes of one record become as few writes as give the same row (the
//! rules are in the parent module's docs, section "Folding").

use crate::config::DeleteMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum OpKind {
    /// CREATE / UNDELETE: every column the writer schema carries.
    Upsert,
    /// UPDATE: the changed and nulled columns only.
    Merge,
    Delete,
}

/// A column and the value written to it (`None`: NULL), in Postgres' binary format.
pub(super) type Cell = (usize, Option<Vec<u8>>);

/// What one statement writes to one record: a change, or several folded into one.
pub(super) struct Op {
    pub(super) id: String,
    pub(super) kind: OpKind,
    /// (column, value) sorted by column; `None` writes NULL.
    pub(super) cells: Vec<Cell>,
    /// Columns whose cell holds a diff (`diffFields`) to apply to the row's current value.
    pub(super) diffs: Vec<usize>,
    pub(super) version: i64,
    pub(super) commit_number: i64,
}

impl Op {
    pub(super) fn at(&self) -> (i64, i64) {
        (self.version, self.commit_number)
    }
}

/// Folds `next`, a later change of the same record, into `last`, when writing the result once
/// leaves the row exactly as writing both in order would (see the module docs). Gives `next`
/// back when it must be written on its own, after `last`.
pub(super) fn fold(last: &mut Op, next: Op, mode: DeleteMode) -> Result<(), Op> {
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
pub(super) fn covers(newer: &[Cell], older: &[Cell]) -> bool {
    let mut it = newer.iter().map(|(c, _)| *c);
    older.iter().all(|(c, _)| it.any(|n| n == *c))
}

/// Writes `next`'s cells over `cells` (both sorted by column).
pub(super) fn overlay(cells: &mut Vec<Cell>, next: Vec<Cell>) {
    for (col, value) in next {
        match cells.binary_search_by_key(&col, |(c, _)| *c) {
            Ok(i) => cells[i].1 = value,
            Err(i) => cells.insert(i, (col, value)),
        }
    }
}
