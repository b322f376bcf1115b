//! The sink side: everything that writes Postgres.
//!
//! # Modules
//!
//! - [`migrate`]: the control schema, from `sql/NNN_name.sql`, applied once each, in order,
//!   only when a command asks; [`migrate::state`] reads how far it is without changing it.
//! - [`schema`]: describe -> table and columns (type map, new columns, safe names).
//! - [`apply`]: the version-guarded, set-based merge of a batch of change events.
//! - [`snapshot`]: the version-guarded merge of records read over REST or Bulk API.
//! - [`binary`]: values in Postgres' binary format, for typed parameters and COPY.
//! - The control tables, each owned by one module holding every statement on it:
//!   [`checkpoint`] (replay positions), [`repair_queue`] (repair obligations, parked ones
//!   included), [`dead_letters`], [`sync_state`] (per-object snapshot bookkeeping).
//! - [`keys`]: verify's read of a table's keys; [`locks`]: the advisory locks writers
//!   coordinate with.
//! - [`conninfo`]: `replica.url`'s `sslmode` and `sslrootcert`; [`tls`]: the TLS sessions
//!   and certificate checks they ask for.
//!
//! This module consumes [`crate::model`] values and never talks to Salesforce.

pub mod apply;
pub mod binary;
pub mod checkpoint;
pub mod conninfo;
pub mod dead_letters;
pub mod derived;
pub mod keys;
pub mod locks;
pub mod migrate;
pub mod ownership;
pub mod repair_queue;
pub mod schema;
pub mod snapshot;
pub mod sync_state;
pub mod tls;

use crate::config::{DeleteMode, ReplicaConfig};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

/// Errors of the sink side, transient (retry: connection loss, serialization failure) or
/// definite (a schema or data problem the operator must look at).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// A statement failed. The driver's error is kept whole; the message carries what the
    /// server said (so it is not repeated as a source in error chains).
    #[error("Postgres {context}: {}", postgres_message(error))]
    Postgres {
        context: String,
        error: tokio_postgres::Error,
    },
    /// No connection could be had from the pool (the server is unreachable, refused the
    /// login, or every connection is busy past the timeout).
    #[error("Postgres: {}", pool_message(.0))]
    Pool(deadpool_postgres::PoolError),
    /// `replica.url` cannot be used.
    #[error("replica.url: {message}")]
    Url { message: String },
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
    /// Another instance took the channel over: this one must step down (see [`ownership`]).
    #[error(
        "{channel}: taken over by instance {owner} (epoch {current}; this instance held epoch \
         {epoch}): stepping down"
    )]
    Fenced {
        channel: String,
        epoch: i64,
        current: i64,
        owner: String,
    },
}

impl ReplicaError {
    pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> ReplicaError {
        let context = context.into();
        move |error| ReplicaError::Postgres { context, error }
    }

    pub fn is_transient(&self) -> bool {
        use deadpool_postgres::PoolError;
        match self {
            ReplicaError::Pool(PoolError::Backend(e)) => postgres_is_transient(e),
            ReplicaError::Pool(PoolError::Timeout(_))
            | ReplicaError::Pool(PoolError::PostCreateHook(_))
            | ReplicaError::Pool(PoolError::Closed) => true,
            ReplicaError::Pool(_) => false,
            ReplicaError::Postgres { error, .. } => postgres_is_transient(error),
            ReplicaError::Url { .. }
            | ReplicaError::Schema { .. }
            | ReplicaError::Data { .. }
            | ReplicaError::Migration { .. } => false,
            // Not an error to retry or report: the channel moves to its new owner.
            ReplicaError::Fenced { .. } => true,
        }
    }
}

/// A Postgres error as an operator needs it: the server's own message, its SQLSTATE, detail
/// and hint (the driver's `Display` says only "db error"), or the connection failure with its
/// cause.
pub fn postgres_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            text.push_str(&format!("; {detail}"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    error_chain(e)
}

/// An error and its causes in one line (`outer: cause: root`), a cause left out when the text
/// before already says it.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(&format!(": {more}"));
        }
        cause = c.source();
    }
    text
}

fn pool_message(e: &deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) if server_refused_tls(e) => format!(
            "cannot connect: {}; replica.url's sslmode requires TLS: enable ssl on the server \
             or change sslmode",
            postgres_message(e)
        ),
        PoolError::Backend(e) => format!("cannot connect: {}", postgres_message(e)),
        PoolError::Timeout(_) => {
            "no connection became free in time (pool_size too small, or the server is slow)"
                .to_string()
        }
        other => other.to_string(),
    }
}

/// Whether a Postgres error can go away on a retry: connection loss, a server restarting,
/// serialization failures and deadlocks. A refused login (wrong password, no such role, no
/// `pg_hba.conf` entry) is definite: retrying only repeats it, and the operator must act.
fn postgres_is_transient(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if e.is_closed() {
        return true;
    }
    // A certificate refused, or a server without TLS when the mode insists: the next attempt
    // meets the same server.
    if tls_error(e).is_some_and(tls::TlsError::is_definite) || server_refused_tls(e) {
        return false;
    }
    match e.code() {
        // The connection settings cannot work (a password the server asks for and the URL
        // lacks, a bad option): no retry changes that.
        None if e.to_string().starts_with("invalid configuration") => false,
        // Otherwise no SQLSTATE: an I/O or protocol failure on the connection.
        None => true,
        Some(code)
            if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *code == SqlState::INSUFFICIENT_PRIVILEGE =>
        {
            false
        }
        Some(code) => {
            let class = code.code().get(..2).unwrap_or_default();
            *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                // Cancelled (statement timeout, an administrator), a lock not available in
                // time: the next attempt can get through.
                || *code == SqlState::QUERY_CANCELED
                || *code == SqlState::LOCK_NOT_AVAILABLE
                // Insufficient resources (disk full, out of memory) and system errors: they
                // pass once the server has room again.
                || class == "53"
                || class == "58"
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || code.code().starts_with("08")
        }
    }
}

/// The TLS failure behind a connection error, if that is what it was.
fn tls_error(e: &tokio_postgres::Error) -> Option<&tls::TlsError> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(t) = c.downcast_ref::<tls::TlsError>() {
            return Some(t);
        }
        cause = c.source();
    }
    None
}

/// Whether the server declined TLS that the mode requires (tokio-postgres says so only in
/// words).
fn server_refused_tls(e: &tokio_postgres::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.to_string() == "server does not support TLS" {
            return true;
        }
        cause = c.source();
    }
    false
}

impl From<deadpool_postgres::PoolError> for ReplicaError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        ReplicaError::Pool(e)
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
    /// Record each committed batch with its owner (`[ha] audit`).
    pub audit_batches: bool,
}

impl ApplySettings {
    pub fn from_config(cfg: &crate::config::Config) -> ApplySettings {
        ApplySettings {
            data_schema: cfg.replica.schema.clone(),
            control_schema: cfg.replica.control_schema.clone(),
            delete_mode: cfg.replica.delete_mode,
            repair_margin_ms: (cfg.sync.repair_margin_secs * 1000) as i64,
            audit_batches: cfg.ha.audit,
        }
    }
}

/// Connects to the replica database: a pool, with one connection opened at once so that an
/// unreachable server, a refused login or a refused certificate fails here rather than at
/// the first use. Warns once when that connection is not encrypted and leaves the machine.
pub async fn connect(cfg: &ReplicaConfig) -> Result<Pool, ReplicaError> {
    connect_as(cfg, "sfmirror").await
}

/// [`connect`], with every connection's `application_name` set to `name` (a daemon names its
/// sessions after its instance, see [`ownership::Instance::application_name`]).
pub async fn connect_as(cfg: &ReplicaConfig, name: &str) -> Result<Pool, ReplicaError> {
    let url_error = |message: String| ReplicaError::Url { message };
    let info = conninfo::ConnInfo::parse(cfg.url.expose()).map_err(|e| url_error(e.0))?;
    let mut pg = info.pg_config().map_err(|e| url_error(e.0))?;
    pg.application_name(name);
    if !cfg.password.is_empty() {
        pg.password(cfg.password.expose());
    }
    let tls = tls::MakeRustlsConnect::new(&info).map_err(url_error)?;
    let pool = pool(cfg, pg.clone(), tls.clone())?;
    drop(pool.get().await?);
    if tls.handshakes() == 0 && !is_local(&pg) {
        tracing::warn!(
            host = %hosts(&pg),
            sslmode = %info.sslmode,
            "the replica connection is not encrypted and leaves this machine: rows and \
             credentials cross the network in plaintext; set sslmode=verify-full in replica.url \
             (with ssl on at the server)"
        );
    }
    Ok(pool)
}

/// Whether every host of `pg` is this machine: a Unix socket or a loopback address.
fn is_local(pg: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    if !pg.get_hostaddrs().is_empty() {
        return pg.get_hostaddrs().iter().all(|a| a.is_loopback());
    }
    pg.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => crate::config::is_loopback_host(name),
        #[cfg(unix)]
        Host::Unix(_) => true,
    })
}

/// The hosts of `pg`, for a log line (never the password).
fn hosts(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let names: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    names.join(",")
}

/// A connection pool for the replica database; connections open on first use.
fn pool(
    cfg: &ReplicaConfig,
    pg: tokio_postgres::Config,
    tls: tls::MakeRustlsConnect,
) -> Result<Pool, ReplicaError> {
    let manager = Manager::from_config(
        pg,
        tls,
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
        .map_err(|e| ReplicaError::Url {
            message: e.to_string(),
        })
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

/// Begins a writer's transaction (a batch, a snapshot chunk, a repair) at READ COMMITTED,
/// whatever the server's default: the rest of a batch must see what the batch before it
/// committed, and a merge that waited for a lock (see [`locks`]) must see what committed
/// meanwhile.
pub async fn begin<'a>(
    client: &'a mut deadpool_postgres::Client,
    what: &str,
) -> Result<deadpool_postgres::Transaction<'a>, ReplicaError> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(ReplicaError::pg(format!("begin {what}")))
}

/// Quotes an identifier that has already been checked by [`crate::model::is_safe_identifier`].
pub fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}
