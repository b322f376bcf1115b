//! The daemon: builds the shared clients, migrates the control schema, runs one task per
//! channel plus the metrics listener, and stops them all on shutdown.
//!
//! A channel that fails definitely (topic not found, no permission, schema refused) stops
//! alone and is logged; the others keep replicating. The daemon returns an error only when
//! start-up fails or every channel has stopped with an error.

use super::channel::{AppliedBatch, ChannelDeps, ChannelTask};
use super::setup::{self, Setup};
use super::{AbortOnDrop, SyncError};
use crate::config::Config;
use crate::telemetry::{self, Readiness};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

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
            .map_err(|source| SyncError::Listen {
                address: cfg.metrics.listen.clone(),
                source,
            })?;
        tracing::info!(listen = %cfg.metrics.listen, "serving /metrics, /healthz, /readyz");
        let r = readiness.clone();
        let stop = shutdown.clone();
        Some(AbortOnDrop(tokio::spawn(async move {
            telemetry::serve_metrics(listener, r, async move { stop.cancelled().await }).await
        })))
    };
    telemetry::prometheus();

    let replica = Setup::connect(cfg).await.map_err(SyncError::Replica)?;
    replica.migrate().await.map_err(SyncError::Replica)?;
    replica
        .requeue_changed(&cfg.fingerprint())
        .await
        .map_err(SyncError::Replica)?;
    let salesforce = setup::login(cfg).await.map_err(SyncError::Source)?;
    let deps = ChannelDeps {
        pubsub: salesforce.pubsub().map_err(SyncError::Source)?,
        rest: salesforce.rest.clone(),
        pool: replica.pool,
        apply: replica.settings,
        sync: cfg.sync.clone(),
        observer,
    };

    let mut repair_worker = {
        let reader = super::reader::OrgReader::new(
            salesforce.rest.clone(),
            salesforce.bulk.clone(),
            cfg.sync.retry_backoff(),
            shutdown.clone(),
        );
        let worker = super::repair::RepairWorker::new(
            reader,
            deps.pool.clone(),
            deps.apply.clone(),
            std::time::Duration::from_millis(cfg.sync.repair_idle_ms),
        )
        .with_bulk(cfg.sync.repair_bulk_threshold, cfg.sync.repair_chunk_rows)
        .with_config(cfg.fingerprint());
        let stop = shutdown.clone();
        // Dropped with this future (a killed daemon): a repair worker must not outlive it.
        AbortOnDrop(tokio::spawn(async move { worker.run(stop).await }))
    };

    let mut tasks = tokio::task::JoinSet::new();
    for ch in &cfg.channels {
        let task = ChannelTask::new(ch.clone(), deps.clone());
        let stop = shutdown.clone();
        let name = ch.name.clone();
        // Every line the channel's task logs (decoding, REST, Pub/Sub) carries the channel.
        let span = tracing::info_span!("channel", channel = %name);
        tasks.spawn(async move { (name, task.run(stop).await) }.instrument(span));
    }
    readiness.set_ready(true);
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    tracing::info!(channels = cfg.channels.len(), "sfmirror running");

    let mut failed = 0usize;
    let total = cfg.channels.len();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            // The channel logged why it stopped, once, at ERROR.
            Ok((name, Err(e))) => {
                failed += 1;
                tracing::debug!(channel = %name, error = %e, "channel task ended");
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
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    let _ = (&mut repair_worker.0).await;
    if let Some(mut t) = metrics_task {
        shutdown.cancel();
        let _ = (&mut t.0).await;
    }
    if failed == total && total > 0 {
        return Err(SyncError::AllChannelsStopped { channels: total });
    }
    Ok(())
}

/// Tells systemd (Type=notify) about the daemon's state, when run under it: a no-op without
/// `NOTIFY_SOCKET`. A failed notification is logged and otherwise ignored, since replication
/// does not depend on it (systemd's own timeout reports a unit that never became ready).
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
