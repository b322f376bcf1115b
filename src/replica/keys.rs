//! Verify's view of a table: `(id, _sfm_version, _sfm_deleted)` of every row, in byte order
//! of the id, read a page at a time through a portal inside one read-only repeatable-read
//! transaction, so memory stays bounded and the listing is one consistent snapshot.
//!
//! It only reads: its share lock on the table makes a column addition wait for the end of the
//! listing, and nothing else.

use super::{ReplicaError, quote};
use std::collections::HashMap;

/// One row's key.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub id: String,
    pub version_ms: i64,
    pub deleted: bool,
}

fn key(row: &tokio_postgres::Row) -> Key {
    Key {
        id: row.get(0),
        version_ms: row.get(1),
        deleted: row.get(2),
    }
}

/// Whether `data_schema.table` exists.
pub async fn table_exists(
    client: &impl deadpool_postgres::GenericClient,
    data_schema: &str,
    table: &str,
) -> Result<bool, ReplicaError> {
    Ok(client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.{}", quote(data_schema), quote(table))],
        )
        .await
        .map_err(ReplicaError::pg(format!("look up the table {table}")))?
        .get(0))
}

/// Starts the read-only, repeatable-read transaction a [`Scan`] runs in.
pub async fn begin(
    client: &mut tokio_postgres::Client,
) -> Result<tokio_postgres::Transaction<'_>, ReplicaError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(ReplicaError::pg("begin reading the replica's keys"))
}

/// Every key of a table, in byte order of the id (`COLLATE "C"`: Salesforce ids are
/// case-sensitive), a page at a time.
pub struct Scan<'t, 'c> {
    tx: &'t tokio_postgres::Transaction<'c>,
    portal: tokio_postgres::Portal,
    table: String,
    page: i32,
    ended: bool,
}

impl<'t, 'c> Scan<'t, 'c> {
    /// Opens the scan of `data_schema.table` in `tx` (see [`begin`]), `page` rows a fetch.
    pub async fn open(
        tx: &'t tokio_postgres::Transaction<'c>,
        data_schema: &str,
        table: &str,
        page: i32,
    ) -> Result<Scan<'t, 'c>, ReplicaError> {
        let sql = format!(
            "SELECT id, _sfm_version, _sfm_deleted FROM {}.{} ORDER BY id COLLATE \"C\"",
            quote(data_schema),
            quote(table)
        );
        let portal = tx
            .bind(sql.as_str(), &[])
            .await
            .map_err(ReplicaError::pg(format!("read the keys of {table}")))?;
        Ok(Scan {
            tx,
            portal,
            table: table.to_string(),
            page: page.max(1),
            ended: false,
        })
    }

    /// The next page of keys; empty once the table is read.
    pub async fn next_page(&mut self) -> Result<Vec<Key>, ReplicaError> {
        if self.ended {
            return Ok(Vec::new());
        }
        let rows = self
            .tx
            .query_portal(&self.portal, self.page)
            .await
            .map_err(ReplicaError::pg(format!("read the keys of {}", self.table)))?;
        self.ended = rows.len() < self.page as usize;
        Ok(rows.iter().map(key).collect())
    }
}

/// The keys of `ids` in `data_schema.table` (those it has), read afresh.
pub async fn lookup(
    client: &impl deadpool_postgres::GenericClient,
    data_schema: &str,
    table: &str,
    ids: &[String],
) -> Result<HashMap<String, Key>, ReplicaError> {
    let sql = format!(
        "SELECT id, _sfm_version, _sfm_deleted FROM {}.{} WHERE id = ANY($1)",
        quote(data_schema),
        quote(table)
    );
    let mut out = HashMap::with_capacity(ids.len());
    for batch in ids.chunks(1_000) {
        let rows = client
            .query(&sql, &[&batch])
            .await
            .map_err(ReplicaError::pg(format!("read the keys of {table} again")))?;
        for r in &rows {
            let k = key(r);
            out.insert(k.id.clone(), k);
        }
    }
    Ok(out)
}
