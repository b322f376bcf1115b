//! The sink side: everything that writes Postgres.
//!
//! - [`migrate`]: the control schema, from `sql/NNN_name.sql`, applied once each, in order.
//! - [`schema`]: describe -> table and columns (type map, new columns, safe names).
//! - [`apply`]: the version-guarded, set-based merge of a batch of change events.
//! - [`binary`]: values in Postgres' binary format, for typed parameters and COPY.
//! - [`checkpoint`]: replay positions, written in the batch's transaction.
//!
//! This module consumes [`crate::model`] values and never talks to Salesforce.

pub mod apply;
pub mod binary;
pub mod checkpoint;
pub mod dead_letters;
pub mod keys;
pub mod locks;
pub mod migrate;
pub mod repair_queue;
pub mod schema;
pub mod snapshot;
pub mod sync_state;

use crate::config::{DeleteMode, ReplicaConfig};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

/// Errors of the sink side, transient (retry: connection loss, serialization failure) or
/// definite (a schema or data problem the operator must look at).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("Postgres {context}: {source}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("Postgres pool: {0}")]
    Pool(String),
    #[error("{object}: {message}")]
    Schema { object: String, message: String },
    #[error("{object} {id}: {message}")]
    Data {
        object: String,
        id: String,
        message: String,
    },
    #[error("migration {name}: {message}")]
    Migration { name: String, message: String },
}

impl ReplicaError {
    pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ReplicaError {
        let context = context.into();
        move |source| ReplicaError::Postgres { context, source }
    }

    pub fn is_transient(&self) -> bool {
        match self {
            ReplicaError::Pool(_) => true,
            ReplicaError::Postgres { source, .. } => {
                if source.is_closed() {
                    return true;
                }
                match source.code() {
                    // No SQLSTATE: an I/O or protocol failure on the connection.
                    None => true,
                    Some(code) => {
                        use tokio_postgres::error::SqlState;
                        *code == SqlState::T_R_SERIALIZATION_FAILURE
                            || *code == SqlState::T_R_DEADLOCK_DETECTED
                            || *code == SqlState::ADMIN_SHUTDOWN
                            || *code == SqlState::CRASH_SHUTDOWN
                            || *code == SqlState::CANNOT_CONNECT_NOW
                            || *code == SqlState::TOO_MANY_CONNECTIONS
                            || code.code().starts_with("08")
                    }
                }
            }
            ReplicaError::Schema { .. }
            | ReplicaError::Data { .. }
            | ReplicaError::Migration { .. } => false,
        }
    }
}

impl From<deadpool_postgres::PoolError> for ReplicaError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ReplicaError::Pool(e.to_string())
    }
}

/// Where and how the sink writes: the schemas, the delete mode, and the margin entity
/// repairs reach back by. Every writer (the merge, snapshots, repairs) takes them.
#[derive(Debug, Clone)]
pub struct ApplySettings {
    pub data_schema: String,
    pub control_schema: String,
    pub delete_mode: DeleteMode,
    /// Subtracted from a gap's commit time for entity repairs, in ms.
    pub repair_margin_ms: i64,
}

impl ApplySettings {
    pub fn from_config(cfg: &crate::config::Config) -> ApplySettings {
        ApplySettings {
            data_schema: cfg.replica.schema.clone(),
            control_schema: cfg.replica.control_schema.clone(),
            delete_mode: cfg.replica.delete_mode,
            repair_margin_ms: (cfg.sync.repair_margin_secs * 1000) as i64,
        }
    }
}

/// Connects to the replica database: a pool, with one connection opened at once so that an
/// unreachable server or a refused login fails here rather than at the first use.
pub async fn connect(cfg: &ReplicaConfig) -> Result<Pool, ReplicaError> {
    let pool = pool(cfg)?;
    drop(pool.get().await?);
    Ok(pool)
}

/// A connection pool for the replica database; connections open on first use.
fn pool(cfg: &ReplicaConfig) -> Result<Pool, ReplicaError> {
    let pg: tokio_postgres::Config = cfg
        .url
        .expose()
        .parse()
        .map_err(|e: tokio_postgres::Error| ReplicaError::Pool(format!("replica.url: {e}")))?;
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(cfg.pool_size)
        // Every connection handed out, to whichever user, has a bounded statement cache.
        .post_recycle(deadpool_postgres::Hook::sync_fn(|client, _| {
            bound_statement_cache(client);
            Ok(())
        }))
        .build()
        .map_err(|e| ReplicaError::Pool(e.to_string()))
}

/// Most statements a pooled connection keeps prepared. The merge's statements depend on the
/// columns each batch writes, so a long-running daemon would otherwise prepare new ones (and
/// keep them, on both sides of the connection) for ever.
pub const STATEMENT_CACHE_LIMIT: usize = 512;

/// Forgets a connection's prepared statements once there are more than
/// [`STATEMENT_CACHE_LIMIT`] (dropping them closes them on the server too). Runs each time the
/// pool hands a connection out again.
fn bound_statement_cache(client: &deadpool_postgres::ClientWrapper) {
    if client.statement_cache.size() > STATEMENT_CACHE_LIMIT {
        client.statement_cache.clear();
    }
}

/// Quotes an identifier that has already been checked by [`crate::model::is_safe_identifier`].
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
