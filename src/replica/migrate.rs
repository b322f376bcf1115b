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
    (
        5,
        "005_parked_repairs",
        include_str!("../../sql/005_parked_repairs.sql"),
    ),
    (
        6,
        "006_checkpoint_caught_up",
        include_str!("../../sql/006_checkpoint_caught_up.sql"),
    ),
    (
        7,
        "007_channel_ownership",
        include_str!("../../sql/007_channel_ownership.sql"),
    ),
    (
        8,
        "008_derived_refresh",
        include_str!("../../sql/008_derived_refresh.sql"),
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
    ensure_schema(&tx, control_schema).await?;
    ensure_schema(&tx, data_schema).await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {ctl}.migrations (
             version    integer PRIMARY KEY,
             name       text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(ReplicaError::pg(format!(
        "create table {control_schema}.migrations"
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

/// Makes sure `schema` exists and this role may use it and create tables in it. A schema
/// that exists is not created again: `CREATE SCHEMA IF NOT EXISTS` needs CREATE on the
/// database even then, which a role given pre-created schemas does not have.
async fn ensure_schema(
    tx: &tokio_postgres::Transaction<'_>,
    schema: &str,
) -> Result<(), ReplicaError> {
    let found = tx
        .query_opt(SCHEMA_PRIVILEGES, &[&schema])
        .await
        .map_err(ReplicaError::pg(format!("look up schema {schema}")))?;
    let Some(missing) = found.as_ref().map(missing) else {
        return tx
            .batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {}", quote(schema)))
            .await
            .map_err(|e| match e.code() {
                Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
                    ReplicaError::Schema {
                        object: format!("schema {schema}"),
                        message: format!(
                            "does not exist, and this role may not create it (no CREATE on \
                             the database): create it for this role, e.g. CREATE SCHEMA \
                             {schema} AUTHORIZATION <role>, or grant CREATE on the database \
                             (see \"Least privilege\" in the README)"
                        ),
                    }
                }
                _ => ReplicaError::Postgres {
                    context: format!("create schema {schema}"),
                    error: e,
                },
            });
    };
    if missing.is_empty() {
        return Ok(());
    }
    let role: String = tx
        .query_one("SELECT current_user::text", &[])
        .await
        .map_err(ReplicaError::pg("read the role's name"))?
        .get(0);
    Err(ReplicaError::Schema {
        object: format!("schema {schema}"),
        message: lacks(&role, &missing, schema),
    })
}

/// USAGE and CREATE of the connected role on the schema named `$1` (no row: no such schema).
const SCHEMA_PRIVILEGES: &str = "SELECT has_schema_privilege(oid, 'USAGE'), \
     has_schema_privilege(oid, 'CREATE') FROM pg_namespace WHERE nspname = $1";

/// The privileges a [`SCHEMA_PRIVILEGES`] row says the role lacks.
fn missing(row: &tokio_postgres::Row) -> Vec<&'static str> {
    [("USAGE", row.get::<_, bool>(0)), ("CREATE", row.get(1))]
        .into_iter()
        .filter(|(_, has)| !has)
        .map(|(privilege, _)| privilege)
        .collect()
}

/// What to say of `role` lacking the `missing` privileges on `schema`, with the fix.
fn lacks(role: &str, missing: &[&str], schema: &str) -> String {
    format!(
        "role {role} lacks {} on it: GRANT USAGE, CREATE ON SCHEMA {schema} TO {role} (or make \
         the role its owner)",
        missing.join(" and ")
    )
}

/// What `migrate` would do, and what would stop it, read without changing anything (for
/// `sfmirror check`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What it would do ("would create schema salesforce", "would apply 2 migrations").
    pub actions: Vec<String>,
    /// What would make it fail, each with the fix.
    pub problems: Vec<String>,
}

/// Reads what migrating `data_schema` and `control_schema` would do as the connected role.
pub async fn plan(
    client: &impl deadpool_postgres::GenericClient,
    data_schema: &str,
    control_schema: &str,
) -> Result<Plan, ReplicaError> {
    let mut plan = Plan::default();
    let row = client
        .query_one(
            "SELECT has_database_privilege(current_database(), 'CREATE'), current_user::text,
                    current_database()::text",
            &[],
        )
        .await
        .map_err(ReplicaError::pg("read the role's privileges"))?;
    let (may_create_schema, role, database): (bool, String, String) =
        (row.get(0), row.get(1), row.get(2));
    for schema in [control_schema, data_schema] {
        let found = client
            .query_opt(SCHEMA_PRIVILEGES, &[&schema])
            .await
            .map_err(ReplicaError::pg(format!("look up schema {schema}")))?;
        match found.as_ref().map(missing) {
            None if may_create_schema => plan.actions.push(format!("would create schema {schema}")),
            None => plan.problems.push(format!(
                "schema {schema} does not exist and role {role} may not create it: run CREATE \
                 SCHEMA {schema} AUTHORIZATION {role}, or GRANT CREATE ON DATABASE {database} TO \
                 {role} (see \"Least privilege\" in the README)"
            )),
            Some(missing) if !missing.is_empty() => plan.problems.push(format!(
                "schema {schema}: {}",
                lacks(&role, &missing, schema)
            )),
            Some(_) => {}
        }
    }
    match state(client, control_schema).await? {
        State::Absent { .. } => plan
            .actions
            .push(format!("would apply {} migrations", MIGRATIONS.len())),
        State::Migrated { applied, .. } if applied < MIGRATIONS.len() => plan.actions.push(
            format!("would apply {} migrations", MIGRATIONS.len() - applied),
        ),
        State::Migrated { .. } => {}
        State::Newer { schema, version } => plan.problems.push(format!(
            "control schema {schema} was migrated by a newer sfmirror (version {version}): \
             upgrade this binary"
        )),
    }
    Ok(plan)
}

/// How far a control schema is migrated, read without changing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No migration table: nothing has been created yet.
    Absent { schema: String },
    /// `applied` of the migrations this binary knows.
    Migrated { schema: String, applied: usize },
    /// Migrated by a newer sfmirror than this one.
    Newer { schema: String, version: i32 },
}

impl State {
    /// Whether migration `version` has been applied (migrations apply in order, so the first
    /// `applied` ones have). A schema migrated by a newer sfmirror has every one this knows.
    pub fn has(&self, version: u32) -> bool {
        match self {
            State::Absent { .. } => false,
            State::Migrated { applied, .. } => version as usize <= *applied,
            State::Newer { .. } => true,
        }
    }

    /// Whether every migration this binary knows has been applied.
    pub fn is_current(&self) -> bool {
        MIGRATIONS
            .last()
            .is_none_or(|(version, _, _)| self.has(*version))
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = MIGRATIONS.len();
        match self {
            State::Absent { schema } => write!(
                f,
                "control schema {schema} not created yet (`sfmirror run` or `backfill` creates it)"
            ),
            State::Migrated { schema, applied } if *applied >= known => {
                write!(f, "control schema {schema} up to date ({known} migrations)")
            }
            State::Migrated { schema, applied } => write!(
                f,
                "control schema {schema} at {applied} of {known} migrations (`sfmirror run` or \
                 `backfill` applies the rest)"
            ),
            State::Newer { schema, version } => write!(
                f,
                "control schema {schema} was migrated by a newer sfmirror (version {version}); \
                 upgrade this binary"
            ),
        }
    }
}

/// Reads how far `control_schema` is migrated; changes nothing.
pub async fn state(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
) -> Result<State, ReplicaError> {
    let schema = control_schema.to_string();
    let table = format!("{}.migrations", quote(control_schema));
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .map_err(ReplicaError::pg("look up the migration table"))?
        .get(0);
    if !exists {
        return Ok(State::Absent { schema });
    }
    let rows = client
        .query(&format!("SELECT version FROM {table}"), &[])
        .await
        .map_err(ReplicaError::pg("read applied migrations"))?;
    let applied: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let newest_known = MIGRATIONS.last().map(|m| m.0 as i32).unwrap_or(0);
    if let Some(version) = applied.iter().copied().filter(|v| *v > newest_known).max() {
        return Ok(State::Newer { schema, version });
    }
    Ok(State::Migrated {
        schema,
        applied: applied.len(),
    })
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
