//! Tables from describe: one table per object, one column per field (compound fields as their
//! components; a person-name `Name` also as `name`), the type map of design.md, and
//! bookkeeping columns prefixed `_sfm_`.
//!
//! Derived columns (formula fields, a person-name `name`, the fields Salesforce never sends in
//! change events) are marked: the stream never writes them, re-reads do (`replica::derived`),
//! and tables that have them carry `_sfm_derived_version`, the Salesforce time of their last
//! re-read.
//!
//! Owns DDL only. New fields add columns (`ADD COLUMN IF NOT EXISTS`); removed fields keep
//! theirs, so history is never dropped. Text and binary columns compress long values with lz4
//! where the server offers it (much cheaper to write than the default pglz). Names that are not `[A-Za-z][A-Za-z0-9_]*` are
//! refused with an error naming the object and field, since they would end up in SQL.

use super::{ReplicaError, quote};
use crate::model::{FieldType, ObjectDescribe, Value, is_safe_identifier};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Postgres column types sfmirror creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgType {
    Text,
    Boolean,
    Integer,
    Bigint,
    Numeric { precision: i64, scale: i64 },
    Date,
    Timestamptz,
    Time,
    Bytea,
}

impl PgType {
    /// The type map of design.md.
    pub fn for_field(kind: &FieldType, precision: i64, scale: i64) -> PgType {
        match kind {
            FieldType::Boolean => PgType::Boolean,
            FieldType::Int => PgType::Integer,
            FieldType::Long => PgType::Bigint,
            FieldType::Double | FieldType::Currency | FieldType::Percent => {
                PgType::Numeric { precision, scale }
            }
            FieldType::Date => PgType::Date,
            FieldType::Datetime => PgType::Timestamptz,
            FieldType::Time => PgType::Time,
            FieldType::Base64 => PgType::Bytea,
            _ => PgType::Text,
        }
    }

    pub fn sql(&self) -> String {
        match self {
            PgType::Text => "text".to_string(),
            PgType::Boolean => "boolean".to_string(),
            PgType::Integer => "integer".to_string(),
            PgType::Bigint => "bigint".to_string(),
            PgType::Numeric { precision, scale }
                if *precision > 0 && *precision <= 1000 && *scale >= 0 && scale <= precision =>
            {
                format!("numeric({precision},{scale})")
            }
            PgType::Numeric { .. } => "numeric".to_string(),
            PgType::Date => "date".to_string(),
            PgType::Timestamptz => "timestamptz".to_string(),
            PgType::Time => "time".to_string(),
            PgType::Bytea => "bytea".to_string(),
        }
    }

    /// Renders a decoded event value as the text input form of this column type. Dates and
    /// datetimes arrive as epoch milliseconds (UTC).
    pub fn text(&self, value: &Value) -> Result<String, String> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let bad = || format!("{value:?} cannot be stored as {}", self.sql());
        Ok(match (self, value) {
            (_, Value::String(s)) if *self != PgType::Bytea && *self != PgType::Time => s.clone(),
            (PgType::Text, Value::Boolean(b)) => b.to_string(),
            (PgType::Text, Value::Int(i)) => i.to_string(),
            (PgType::Text, Value::Long(i)) => i.to_string(),
            (PgType::Text, Value::Double(d)) => float_text(*d),
            (PgType::Text, Value::Float(d)) => float_text(f64::from(*d)),
            (PgType::Text, Value::Bytes(b)) => b64.encode(b),
            (PgType::Boolean, Value::Boolean(b)) => b.to_string(),
            (PgType::Integer | PgType::Bigint | PgType::Numeric { .. }, Value::Int(i)) => {
                i.to_string()
            }
            (PgType::Integer | PgType::Bigint | PgType::Numeric { .. }, Value::Long(i)) => {
                i.to_string()
            }
            (PgType::Integer | PgType::Bigint, Value::Double(d)) if d.fract() == 0.0 => {
                format!("{d:.0}")
            }
            (PgType::Numeric { .. }, Value::Double(d)) => float_text(*d),
            (PgType::Numeric { .. }, Value::Float(d)) => float_text(f64::from(*d)),
            (PgType::Timestamptz, Value::Long(ms)) => chrono::DateTime::from_timestamp_millis(*ms)
                .ok_or_else(bad)?
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string(),
            (PgType::Date, Value::Long(ms)) => chrono::DateTime::from_timestamp_millis(*ms)
                .ok_or_else(bad)?
                .format("%Y-%m-%d")
                .to_string(),
            (PgType::Date, Value::Int(days)) => {
                chrono::DateTime::from_timestamp(i64::from(*days) * 86_400, 0)
                    .ok_or_else(bad)?
                    .format("%Y-%m-%d")
                    .to_string()
            }
            (PgType::Time, Value::Long(ms)) => time_of_day(*ms).ok_or_else(bad)?,
            (PgType::Time, Value::Int(ms)) => time_of_day(i64::from(*ms)).ok_or_else(bad)?,
            (PgType::Time, Value::String(s)) => s.trim_end_matches('Z').to_string(),
            (PgType::Bytea, Value::Bytes(b)) => hex_bytea(b),
            (PgType::Bytea, Value::String(s)) => hex_bytea(
                &b64.decode(s)
                    .map_err(|e| format!("base64 value is not valid base64: {e}"))?,
            ),
            _ => return Err(bad()),
        })
    }
}

fn float_text(d: f64) -> String {
    if d.is_nan() {
        "NaN".to_string()
    } else if d.is_infinite() {
        if d > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else {
        format!("{d}")
    }
}

fn time_of_day(ms: i64) -> Option<String> {
    if !(0..86_400_000).contains(&ms) {
        return None;
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    Some(format!(
        "{h:02}:{m:02}:{:02}.{:03}",
        rest / 1000,
        rest % 1000
    ))
}

fn hex_bytea(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("\\x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// One replicated column.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// Lower-cased field API name.
    pub name: String,
    /// The field's API name.
    pub field: String,
    pub pg_type: PgType,
    /// Change events never carry its value (a formula, a person-name `Name`, a field
    /// Salesforce derives from other records): it is kept fresh by re-reading it.
    pub derived: bool,
}

/// An object's table: columns from describe, and the map from event field paths to columns.
#[derive(Debug)]
pub struct TableSchema {
    pub object: String,
    pub table: String,
    pub columns: Vec<Column>,
    describe: ObjectDescribe,
    by_field: HashMap<String, usize>,
    /// Whether any column is derived.
    has_derived: bool,
    /// Whether a change to a record can change a derived column of its own (a formula, a
    /// person name): then its changes call for a re-read.
    changes_derive: bool,
    /// Event paths (`Name`, `BillingAddress.Street`) already resolved to a column index.
    resolved: Mutex<HashMap<Arc<str>, Option<usize>>>,
}

/// Bookkeeping columns every replica table has.
pub const VERSION_COLUMN: &str = "_sfm_version";
pub const COMMIT_NUMBER_COLUMN: &str = "_sfm_commit_number";
pub const DELETED_COLUMN: &str = "_sfm_deleted";
pub const SYNCED_AT_COLUMN: &str = "_sfm_synced_at";
/// Salesforce's time (epoch ms, its `Date`) of the derived columns' last re-read; only on
/// tables with derived columns.
pub const DERIVED_VERSION_COLUMN: &str = "_sfm_derived_version";
/// The stream version (`_sfm_version`) the derived columns were last read for; only on tables
/// whose records' own changes change derived columns (`changes_derive`). A row whose version
/// is newer is waiting for a re-read: the obligation lives in the row the change wrote, so it
/// is as durable as the change and costs the stream no extra write.
pub const DERIVED_SEEN_COLUMN: &str = "_sfm_derived_seen";
/// Rows waiting for a re-read of their derived columns. Also the predicate of the partial
/// index that finds them (same text, so the planner uses it).
pub const DERIVED_STALE: &str =
    "_sfm_version > coalesce(_sfm_derived_seen, -1) AND NOT _sfm_deleted";

impl TableSchema {
    /// Columns for every field of `describe` except compound parents (their components are
    /// columns; a person-name `Name` is a column as well) and `Id` (the primary key `id`).
    pub fn from_describe(describe: ObjectDescribe) -> Result<TableSchema, ReplicaError> {
        let object = describe.name.clone();
        if !is_safe_identifier(&object) {
            return Err(ReplicaError::Schema {
                object,
                message: "object name is not a safe identifier ([A-Za-z][A-Za-z0-9_]*)".to_string(),
            });
        }
        let mut columns = Vec::new();
        let mut by_field = HashMap::new();
        for f in &describe.fields {
            let person_name = describe.is_person_name(f);
            if describe.is_compound_parent(f) && !person_name {
                continue;
            }
            if !is_safe_identifier(&f.name) {
                return Err(ReplicaError::Schema {
                    object: object.clone(),
                    message: format!(
                        "field `{}` is not a safe identifier ([A-Za-z][A-Za-z0-9_]*); refusing \
                         to create a column for it",
                        f.name
                    ),
                });
            }
            let name = f.name.to_ascii_lowercase();
            if name.starts_with("_sfm_") {
                return Err(ReplicaError::Schema {
                    object: object.clone(),
                    message: format!("field `{}` collides with sfmirror's columns", f.name),
                });
            }
            if f.name == "Id" {
                continue;
            }
            if columns.iter().any(|c: &Column| c.name == name) {
                return Err(ReplicaError::Schema {
                    object: object.clone(),
                    message: format!("two fields map to column `{name}`"),
                });
            }
            by_field.insert(f.name.clone(), columns.len());
            columns.push(Column {
                name,
                field: f.name.clone(),
                pg_type: PgType::for_field(&f.kind(), f.precision, f.scale),
                derived: person_name || f.is_derived(),
            });
        }
        Ok(TableSchema {
            table: object.to_ascii_lowercase(),
            object,
            has_derived: columns.iter().any(|c| c.derived),
            changes_derive: describe
                .fields
                .iter()
                .any(|f| f.is_formula() || describe.is_person_name(f)),
            columns,
            describe,
            by_field,
            resolved: Mutex::new(HashMap::new()),
        })
    }

    pub fn describe(&self) -> &ObjectDescribe {
        &self.describe
    }

    /// Whether any column is derived (re-read after changes, see the module doc).
    pub fn has_derived(&self) -> bool {
        self.has_derived
    }

    /// Whether a record's own changes can change its derived columns (it has a formula or a
    /// person name), so that its changes are followed by a re-read. Fields Salesforce derives
    /// from other records (LastActivityDate) change with those records, not this one: the
    /// sweep keeps them, and a re-read made for a formula refreshes them too.
    pub fn changes_derive(&self) -> bool {
        self.changes_derive
    }

    /// The same table seen through its derived columns only: what a re-read of them reads
    /// and writes (same table name, same column names and types).
    pub fn derived_projection(&self) -> TableSchema {
        let columns: Vec<Column> = self.columns.iter().filter(|c| c.derived).cloned().collect();
        let by_field = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.field.clone(), i))
            .collect();
        TableSchema {
            object: self.object.clone(),
            table: self.table.clone(),
            has_derived: !columns.is_empty(),
            changes_derive: self.changes_derive,
            columns,
            describe: self.describe.clone(),
            by_field,
            resolved: Mutex::new(HashMap::new()),
        }
    }

    /// The indexes of the derived columns, in column order.
    pub fn derived_columns(&self) -> Vec<usize> {
        (0..self.columns.len())
            .filter(|&i| self.columns[i].derived)
            .collect()
    }

    /// The column an event field path writes, or `None` if describe does not know it.
    pub fn column_for(&self, path: &Arc<str>) -> Option<usize> {
        if let Ok(cache) = self.resolved.lock()
            && let Some(hit) = cache.get(path)
        {
            return *hit;
        }
        let found = match path.split_once('.') {
            None => self.by_field.get(&**path).copied(),
            Some((parent, sub)) => self
                .describe
                .component(parent, sub)
                .and_then(|f| self.by_field.get(&f.name).copied()),
        };
        if let Ok(mut cache) = self.resolved.lock() {
            cache.insert(path.clone(), found);
        }
        found
    }

    /// Creates the table if needed and adds missing columns. Idempotent. Returns the columns
    /// it added to a table that already existed: its rows hold NULL there, whatever the
    /// records hold.
    pub async fn ensure(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        data_schema: &str,
    ) -> Result<Vec<String>, ReplicaError> {
        // ALTER TABLE takes an exclusive lock even when every column exists: look first, so a
        // table that is up to date is never locked against the daemon or a backfill.
        let rows = client
            .query(
                "SELECT column_name::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2",
                &[&data_schema, &self.table],
            )
            .await
            .map_err(ReplicaError::pg(format!(
                "columns of {data_schema}.{}",
                self.table
            )))?;
        let existing: std::collections::HashSet<String> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<&Column> = self
            .columns
            .iter()
            .filter(|c| !existing.contains(&c.name))
            .collect();
        let derived_version_missing =
            self.has_derived() && !existing.contains(DERIVED_VERSION_COLUMN);
        let derived_seen_missing = self.changes_derive() && !existing.contains(DERIVED_SEEN_COLUMN);
        if !existing.is_empty()
            && missing.is_empty()
            && !derived_version_missing
            && !derived_seen_missing
        {
            return Ok(Vec::new());
        }
        let added: Vec<String> = if existing.is_empty() {
            Vec::new()
        } else {
            missing.iter().map(|c| c.field.clone()).collect()
        };
        let table = format!("{}.{}", quote(data_schema), quote(&self.table));
        let compression = if lz4_available(client).await? {
            " COMPRESSION lz4"
        } else {
            ""
        };
        // Ids compare byte by byte ("C"): they are ASCII, their order means nothing, and the
        // primary key is probed for every row written, where locale-aware comparison is
        // several times slower. `verify` reads ids in this order too.
        let mut sql = format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                id text COLLATE \"C\" PRIMARY KEY,
                {VERSION_COLUMN} bigint NOT NULL,
                {COMMIT_NUMBER_COLUMN} bigint,
                {DELETED_COLUMN} boolean NOT NULL DEFAULT false,
                {SYNCED_AT_COLUMN} timestamptz NOT NULL DEFAULT now());\n"
        );
        if derived_version_missing {
            sql.push_str(&format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {DERIVED_VERSION_COLUMN} bigint;\n"
            ));
        }
        if derived_seen_missing {
            // Rows already there when the column comes (a table made before it existed, or
            // an object that just gained its first formula) count as read for their current
            // version: a new formula's values come with the read of the new column, and
            // `replica::derived::adopt_queue` marks what the older queue still held.
            let index = quote(&format!("{}_sfm_stale", truncate(&self.table, 50)));
            // Only the task that adds the column marks the rows: another one preparing the
            // table at the same time fails its ADD COLUMN (and retries, finding it there)
            // instead of marking rows the stream changed since.
            sql.push_str(&format!(
                "DO $sfm$ BEGIN
                   IF NOT EXISTS (SELECT 1 FROM pg_attribute
                                  WHERE attrelid = '{table}'::regclass
                                    AND attname = '{DERIVED_SEEN_COLUMN}' AND NOT attisdropped)
                   THEN
                     ALTER TABLE {table} ADD COLUMN {DERIVED_SEEN_COLUMN} bigint;
                     UPDATE {table} SET {DERIVED_SEEN_COLUMN} = {VERSION_COLUMN};
                   END IF;
                 END $sfm$;
                 CREATE INDEX IF NOT EXISTS {index} ON {table} (id) WHERE {DERIVED_STALE};\n"
            ));
        }
        for c in missing {
            let toasted = matches!(c.pg_type, PgType::Text | PgType::Bytea);
            sql.push_str(&format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {} {}{};\n",
                quote(&c.name),
                c.pg_type.sql(),
                if toasted { compression } else { "" }
            ));
        }
        // Several tasks (channels, the repair worker, a backfill) may prepare one table at
        // once; Postgres can then refuse the loser of a concurrent CREATE/ADD COLUMN with a
        // duplicate error although the statement is idempotent. The winner did the work: retry.
        let mut attempt = 0;
        loop {
            match client.batch_execute(&sql).await {
                Ok(()) => return Ok(added),
                Err(e) if attempt < 3 && is_concurrent_ddl(&e) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => {
                    return Err(ReplicaError::pg(format!(
                        "create table {data_schema}.{}",
                        self.table
                    ))(e));
                }
            }
        }
    }
}

/// At most `max` bytes of the ASCII name `s` (index names stay under Postgres's 63).
fn truncate(s: &str, max: usize) -> &str {
    &s[..s.len().min(max)]
}

/// Whether the server compresses long values with lz4 (Postgres 14 and later, built with it).
/// Text and binary columns ask for it: it compresses several times faster than the default
/// pglz, which a profile of the catch-up showed taking 8% of Postgres's time on inserts of
/// wide rows. Elsewhere they keep the server's default.
pub(crate) async fn lz4_available(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<bool, ReplicaError> {
    let row = client
        .query_opt(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings
             WHERE name = 'default_toast_compression'",
            &[],
        )
        .await
        .map_err(ReplicaError::pg(
            "read the server's TOAST compression methods",
        ))?;
    Ok(row.is_some_and(|r| r.get::<_, Option<bool>>(0) == Some(true)))
}

/// A duplicate-object error from a DDL statement that raced an identical one.
fn is_concurrent_ddl(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::DUPLICATE_TABLE
            || *c == SqlState::DUPLICATE_COLUMN
            || *c == SqlState::DUPLICATE_OBJECT
            || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str) -> ObjectDescribe {
        let path = format!(
            "{}/src/emulator/org/{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("describe file");
        serde_json::from_str(&text).expect("describe parses")
    }

    #[test]
    fn every_field_of_the_real_describes_maps() {
        for name in [
            "Account",
            "Contact",
            "Opportunity",
            "Custom__c",
            "Invoice__c",
        ] {
            let d = load(name);
            let parents = d
                .fields
                .iter()
                .filter(|f| d.is_compound_parent(f) && !d.is_person_name(f))
                .count();
            let t = TableSchema::from_describe(d.clone()).expect("maps");
            assert_eq!(t.columns.len() + parents + 1, d.fields.len(), "{name}");
        }
    }

    #[test]
    fn account_types_and_components() {
        let t = TableSchema::from_describe(load("Account")).expect("maps");
        let col = |f: &str| {
            let i = t.column_for(&Arc::from(f)).unwrap_or_else(|| panic!("{f}"));
            t.columns[i].clone()
        };
        assert_eq!(col("BillingAddress.City").name, "billingcity");
        assert_eq!(
            col("BillingAddress.Latitude").pg_type.sql(),
            "numeric(18,15)"
        );
        assert_eq!(col("NumberOfEmployees").pg_type, PgType::Integer);
        assert_eq!(col("AnnualRevenue").pg_type.sql(), "numeric(18,0)");
        assert_eq!(col("CreatedDate").pg_type, PgType::Timestamptz);
        assert_eq!(col("IsDeleted").pg_type, PgType::Boolean);
        assert!(t.column_for(&Arc::from("NoSuchField")).is_none());
        assert!(t.column_for(&Arc::from("BillingAddress")).is_none());
    }

    #[test]
    fn a_person_name_is_a_derived_column_beside_its_components() {
        let t = TableSchema::from_describe(load("Contact")).expect("maps");
        let col = |f: &str| {
            let i = t.column_for(&Arc::from(f)).unwrap_or_else(|| panic!("{f}"));
            t.columns[i].clone()
        };
        assert_eq!(col("Name").name, "name");
        assert!(col("Name").derived);
        assert_eq!(col("Name.FirstName").name, "firstname");
        assert!(!col("Name.FirstName").derived);
        assert!(!col("LastName").derived);
        // A business account's Name is its own value, sent in events.
        let a = TableSchema::from_describe(load("Account")).expect("maps");
        let i = a.column_for(&Arc::from("Name")).expect("name");
        assert!(!a.columns[i].derived);
    }

    #[test]
    fn formulas_are_derived_and_roll_ups_are_not() {
        let d: ObjectDescribe = serde_json::from_str(
            r#"{"name":"X__c","fields":[{"name":"Id","type":"id"},
               {"name":"F__c","type":"currency","calculated":true,"calculatedFormula":"A__c * 2"},
               {"name":"R__c","type":"currency","calculated":true},
               {"name":"LastActivityDate","type":"date"},
               {"name":"A__c","type":"currency"}]}"#,
        )
        .expect("parses");
        let t = TableSchema::from_describe(d).expect("maps");
        let derived: Vec<&str> = t
            .derived_columns()
            .into_iter()
            .map(|i| t.columns[i].field.as_str())
            .collect();
        assert_eq!(derived, ["F__c", "LastActivityDate"]);
        assert!(t.has_derived() && t.changes_derive());
        // Fields derived from other records alone are swept, not re-read after changes.
        let account = TableSchema::from_describe(load("Account")).expect("maps");
        assert!(account.has_derived() && !account.changes_derive());
        let contact = TableSchema::from_describe(load("Contact")).expect("maps");
        assert!(contact.changes_derive());
    }

    #[test]
    fn unsafe_names_are_refused() {
        let d: ObjectDescribe = serde_json::from_str(
            r#"{"name":"Bad","fields":[{"name":"Id","type":"id"},{"name":"x;drop","type":"string"}]}"#,
        )
        .expect("parses");
        let err = TableSchema::from_describe(d)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("Bad") && err.contains("x;drop"), "{err}");
    }

    #[test]
    fn values_render_for_their_columns() {
        let ts = PgType::Timestamptz;
        assert_eq!(
            ts.text(&Value::Long(1_641_819_688_000)).expect("ts"),
            "2022-01-10T13:01:28.000Z"
        );
        assert_eq!(
            PgType::Date
                .text(&Value::Long(1_714_089_600_000))
                .expect("date"),
            "2024-04-26"
        );
        assert_eq!(
            PgType::Time.text(&Value::Long(3_723_004)).expect("time"),
            "01:02:03.004"
        );
        let num = PgType::Numeric {
            precision: 18,
            scale: 2,
        };
        assert_eq!(num.text(&Value::Double(12.5)).expect("num"), "12.5");
        assert_eq!(num.text(&Value::Double(f64::NAN)).expect("nan"), "NaN");
        assert_eq!(
            PgType::Bytea
                .text(&Value::String("AQI=".into()))
                .expect("b64"),
            "\\x0102"
        );
        assert!(PgType::Boolean.text(&Value::Double(1.0)).is_err());
        assert!(PgType::Bytea.text(&Value::String("***".into())).is_err());
    }
}
