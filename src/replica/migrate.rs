//! Control-schema migrations: `sql/NNN_name.sql`, embedded in the binary, applied in order,
//! each exactly once, and recorded in `<control_schema>.migrations`.
//!
//! All pending migrations run in one transaction under an advisory lock, so two processes
//! starting together (daemon and backfill) neither race nor see a half-migrated schema.

use super::{ReplicaError, quote};

/// The migrations, in order. A unit test checks this list against the `sql/` directory.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (
        1,
        "001_control_schema",
        include_str!("../../sql/001_control_schema.sql"),
    ),
    (
        2,
        "002_tombstones_and_repairs",
        include_str!("../../sql/002_tombstones_and_repairs.sql"),
    ),
    (
        3,
        "003_sync_state",
        include_str!("../../sql/003_sync_state.sql"),
    ),
    (
        4,
        "004_repair_claim_owner",
        include_str!("../../sql/004_repair_claim_owner.sql"),
    ),
];

/// Creates the data and control schemas and applies pending migrations. Returns the names of
/// the migrations applied now.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    data_schema: &str,
    control_schema: &str,
) -> Result<Vec<&'static str>, ReplicaError> {
    let ctl = quote(control_schema);
    let tx = client
        .transaction()
        .await
        .map_err(ReplicaError::pg("begin migration"))?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('sfmirror.migrate:' || $1::text))",
        &[&control_schema],
    )
    .await
    .map_err(ReplicaError::pg("migration lock"))?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {ctl};
         CREATE SCHEMA IF NOT EXISTS {data};
         CREATE TABLE IF NOT EXISTS {ctl}.migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
        data = quote(data_schema)
    ))
    .await
    .map_err(ReplicaError::pg(format!(
        "create schemas {control_schema}, {data_schema}"
    )))?;
    let rows = tx
        .query(&format!("SELECT version FROM {ctl}.migrations"), &[])
        .await
        .map_err(ReplicaError::pg("read applied migrations"))?;
    let applied: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let newest_known = MIGRATIONS.last().map(|m| m.0 as i32).unwrap_or(0);
    if let Some(newer) = applied.iter().find(|v| **v > newest_known) {
        return Err(ReplicaError::Migration {
            name: format!("version {newer}"),
            message: format!(
                "schema {control_schema} was migrated by a newer sfmirror; upgrade this binary"
            ),
        });
    }
    let mut ran = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if applied.contains(&(*version as i32)) {
            continue;
        }
        tx.batch_execute(&format!("SET LOCAL search_path TO {ctl}"))
            .await
            .map_err(ReplicaError::pg("set search_path"))?;
        tx.batch_execute(sql)
            .await
            .map_err(|e| ReplicaError::Migration {
                name: name.to_string(),
                message: e.to_string(),
            })?;
        tx.execute(
            &format!("INSERT INTO {ctl}.migrations (version, name) VALUES ($1, $2)"),
            &[&(*version as i32), name],
        )
        .await
        .map_err(ReplicaError::pg("record migration"))?;
        ran.push(*name);
    }
    tx.batch_execute("RESET search_path")
        .await
        .map_err(ReplicaError::pg("reset search_path"))?;
    tx.commit()
        .await
        .map_err(ReplicaError::pg("commit migration"))?;
    for name in &ran {
        tracing::info!(
            migration = name,
            schema = control_schema,
            "applied migration"
        );
    }
    Ok(ran)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sql_file_is_registered_in_order() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .expect("sql dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let registered: Vec<String> = MIGRATIONS.iter().map(|m| format!("{}.sql", m.1)).collect();
        assert_eq!(files, registered);
        for (i, (version, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
            assert!(name.starts_with(&format!("{version:03}_")), "{name}");
        }
    }
}
