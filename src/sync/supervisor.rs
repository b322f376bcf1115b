//! The daemon: builds the shared clients, migrates the control schema, runs one task per
//! channel plus the metrics listener, and stops them all on shutdown.
//!
//! A channel that fails definitely (topic not found, no permission, schema refused) stops
//! alone and is logged; the others keep replicating. The daemon returns an error only when
//! start-up fails or every channel has stopped with an error.

use super::channel::{AppliedBatch, ChannelDeps, ChannelTask};
use super::{AbortOnDrop, SyncError};
use crate::config::{Config, SalesforceConfig};
use crate::replica::apply::ApplySettings;
use crate::replica::{self, ReplicaError, migrate};
use crate::salesforce::SourceError;
use crate::salesforce::auth::Authenticator;
use crate::salesforce::pubsub::PubSub;
use crate::salesforce::rest::RestClient;
use crate::telemetry::{self, Readiness};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// An HTTP client for Salesforce REST and OAuth: rustls, system roots plus `ca_file`.
pub fn http_client(cfg: &SalesforceConfig) -> Result<reqwest::Client, SourceError> {
    let mut builder = reqwest::Client::builder()
        .timeout(Duration::from_secs(cfg.request_timeout_secs))
        .connect_timeout(Duration::from_secs(20))
        .user_agent(concat!("sfmirror/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &cfg.ca_file {
        let pem = std::fs::read(ca).map_err(|e| SourceError::Connect {
            endpoint: cfg.login_url.clone(),
            message: format!("cannot read ca_file {}: {e}", ca.display()),
        })?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| SourceError::Connect {
            endpoint: cfg.login_url.clone(),
            message: format!("ca_file {} is not a PEM certificate: {e}", ca.display()),
        })?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().map_err(|e| SourceError::Connect {
        endpoint: cfg.login_url.clone(),
        message: format!("HTTP client: {e}"),
    })
}

/// Prepares the replica database: pool and migrations.
pub async fn prepare_replica(cfg: &Config) -> Result<deadpool_postgres::Pool, ReplicaError> {
    let pool = replica::pool(&cfg.replica)?;
    let mut client = pool.get().await?;
    migrate::migrate(
        &mut client,
        &cfg.replica.schema,
        &cfg.replica.control_schema,
    )
    .await?;
    Ok(pool)
}

/// Runs the daemon until `shutdown` is cancelled. `observer`, if given, receives every
/// committed batch.
pub async fn run(
    cfg: &Config,
    shutdown: CancellationToken,
    observer: Option<broadcast::Sender<AppliedBatch>>,
) -> Result<(), SyncError> {
    let readiness = Readiness::default();
    let metrics_task = if cfg.metrics.listen.is_empty() {
        None
    } else {
        let listener = tokio::net::TcpListener::bind(&cfg.metrics.listen)
            .await
            .map_err(|e| {
                SyncError::Protocol(format!(
                    "cannot listen for metrics on {}: {e}",
                    cfg.metrics.listen
                ))
            })?;
        tracing::info!(listen = %cfg.metrics.listen, "serving /metrics, /healthz, /readyz");
        let r = readiness.clone();
        let stop = shutdown.clone();
        Some(AbortOnDrop(tokio::spawn(async move {
            telemetry::serve_metrics(listener, r, async move { stop.cancelled().await }).await
        })))
    };
    telemetry::prometheus();

    let pool = prepare_replica(cfg).await.map_err(SyncError::Replica)?;
    let http = http_client(&cfg.salesforce).map_err(SyncError::Source)?;
    let auth = Arc::new(Authenticator::new(cfg.salesforce.clone(), http.clone()));
    // Log in once up front so bad credentials fail start-up with a clear message.
    auth.session().await.map_err(SyncError::Source)?;
    let pubsub = PubSub::connect(&cfg.salesforce, auth.clone()).map_err(SyncError::Source)?;
    let rest = RestClient::new(auth, http, &cfg.salesforce.api_version);
    let deps = ChannelDeps {
        pubsub,
        rest,
        pool,
        apply: ApplySettings {
            data_schema: cfg.replica.schema.clone(),
            control_schema: cfg.replica.control_schema.clone(),
            delete_mode: cfg.replica.delete_mode,
            repair_margin_ms: (cfg.sync.repair_margin_secs * 1000) as i64,
        },
        sync: cfg.sync.clone(),
        observer,
    };

    let mut repair_worker = {
        let worker = super::repair::RepairWorker::new(
            deps.rest.clone(),
            deps.pool.clone(),
            deps.apply.clone(),
            std::time::Duration::from_millis(cfg.sync.repair_idle_ms),
        )
        .with_bulk(cfg.sync.repair_bulk_threshold, cfg.sync.repair_chunk_rows);
        let stop = shutdown.clone();
        // Dropped with this future (a killed daemon): a repair worker must not outlive it.
        AbortOnDrop(tokio::spawn(async move { worker.run(stop).await }))
    };

    let mut tasks = tokio::task::JoinSet::new();
    for ch in &cfg.channels {
        let task = ChannelTask::new(ch.clone(), deps.clone());
        let stop = shutdown.clone();
        let name = ch.name.clone();
        tasks.spawn(async move { (name, task.run(stop).await) });
    }
    readiness.set_ready(true);
    notify_systemd("READY=1");
    tracing::info!(channels = cfg.channels.len(), "sfmirror running");

    let mut failed = 0usize;
    let total = cfg.channels.len();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(e))) => {
                failed += 1;
                tracing::error!(channel = %name, error = %e, "channel stopped");
            }
            Err(e) => {
                failed += 1;
                tracing::error!(error = %e, "channel task panicked");
            }
        }
        if failed == total {
            readiness.set_ready(false);
            shutdown.cancel();
        }
    }
    notify_systemd("STOPPING=1");
    shutdown.cancel();
    let _ = (&mut repair_worker.0).await;
    if let Some(mut t) = metrics_task {
        shutdown.cancel();
        let _ = (&mut t.0).await;
    }
    if failed == total && total > 0 {
        return Err(SyncError::Protocol(
            "every channel stopped with an error; see the log lines above".to_string(),
        ));
    }
    Ok(())
}

/// Tells systemd (Type=notify) about the daemon's state, when run under it.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot notify systemd");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
