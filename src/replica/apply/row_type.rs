//! A replica table's row type as Postgres has it: what a row sent as one composite value must
//! carry. Runs whose columns all have the types their values are encoded for travel as one
//! array of rows (far cheaper to unpack than an array per column); the snapshot fast path
//! uses the same check.

use super::plan::Run;
use crate::replica::ReplicaError;
use crate::replica::binary::{put_field, type_oid};
use crate::replica::schema::{PgType, TableSchema};
use std::collections::HashMap;

/// How statements over rows sent as the table's row type name a row's id and version.
pub(super) const COMPOSITE_ROW: [&str; 3] = ["u.id", "u._sfm_version", "u._sfm_commit_number"];

/// A replica table's row type as Postgres has it in this transaction: what a row sent as one
/// composite value must carry, field by field.
pub struct RowType {
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

pub(super) enum RowField {
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
    pub(super) fn fits(&self, run: &Run) -> bool {
        self.fits_columns(&run.table, run.columns.iter().copied())
    }

    /// [`Self::fits`] for every column of `table` (a snapshot writes them all).
    pub fn fits_table(&self, table: &TableSchema) -> bool {
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
    pub(super) fn encode(&self, run: &Run) -> Vec<u8> {
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

/// The row types of `tables` (by table name) as Postgres has them now, in the caller's
/// transaction; a table whose id or version columns have other types is left out.
pub async fn row_types(
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
            crate::replica::schema::VERSION_COLUMN => RowField::Version,
            crate::replica::schema::COMMIT_NUMBER_COLUMN => RowField::CommitNumber,
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
