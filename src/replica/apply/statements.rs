//! The statements: SQL text for each kind of run (masked `UPDATE`, `INSERT .. ON CONFLICT`,
//! hard `DELETE` with its tombstone, reading rows for diffs) and the functions that send one.
//! Every write carries the version guard and the tombstone check (invariant 3).

use super::ApplyOutcome;
use super::fold::{Op, OpKind};
use super::plan::Run;
use super::row_type::{COMPOSITE_ROW, RowType};
use crate::model::textdiff;
use crate::replica::binary::{Raw, column_expr, param_type};
use crate::replica::repair_queue::RepairRequest;
use crate::replica::schema::{PgType, TableSchema};
use crate::replica::{ApplySettings, ReplicaError, quote};
use std::collections::HashMap;

pub(super) const GUARD: &str = "(t._sfm_version, coalesce(t._sfm_commit_number, -1)) \
                     <= (EXCLUDED._sfm_version, coalesce(EXCLUDED._sfm_commit_number, -1))";

/// The tombstone check: no newer delete of the record is on file. `row` names the candidate
/// row's id, version and commit number.
pub(super) fn not_tombstoned(ctl: &str, object_param: usize, row: [&str; 3]) -> String {
    let [id, v, n] = row;
    format!(
        "NOT EXISTS (SELECT 1 FROM {ctl}.tombstones ts
                     WHERE ts.object = ${object_param}::text AND ts.id = {id}
                       AND (ts.version, coalesce(ts.commit_number, -1))
                           > ({v}, coalesce({n}, -1)))"
    )
}

/// The replica table's name, schema-qualified and quoted.
pub(super) fn qualified_table(settings: &ApplySettings, table: &TableSchema) -> String {
    format!("{}.{}", quote(&settings.data_schema), quote(&table.table))
}

/// What every statement of a run names and sends: the qualified table, the control schema, and
/// each row's id and version.
pub(super) struct RunRows<'a> {
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

pub(super) fn context(run: &Run) -> String {
    format!(
        "apply {:?} of {} rows to {}",
        run.kind,
        run.ops.len(),
        run.table.table
    )
}

/// Prepares `sql` (cached on the connection) and runs it for `run`, counting the statement.
pub(super) async fn send(
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

pub(super) async fn hard_delete(
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

/// [`update`] with the run's rows sent as one array of the table's row type plus one array of
/// write masks, instead of an array per column: Postgres unnests two arrays instead of one
/// per column and mask, which made the statement about a third cheaper on wide tables.
pub(super) async fn update_rows(
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
pub(super) fn update_sql(
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
pub(super) fn missed_ops(run: Run, missed: &[tokio_postgres::Row]) -> Vec<Op> {
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
pub(super) async fn update(
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
pub(super) async fn resolve_diffs(
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
pub(super) async fn upsert_any(
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
pub(super) async fn upsert_rows(
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
pub(super) fn upsert_sql(
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
pub(super) fn report_inserted_merges(
    run: &Run,
    rows: Vec<tokio_postgres::Row>,
    outcome: &mut ApplyOutcome,
) {
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
pub(super) async fn upsert(
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
