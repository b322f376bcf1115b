//! The daemon: builds the shared clients, migrates the control schema, runs one task per
//! channel plus the metrics listener, and stops them all on shutdown.
//!
//! A channel that fails definitely (topic not found, no permission, schema refused) stops
//! alone and is logged; the others keep replicating. The daemon returns an error only when
//! start-up fails or every channel has stopped with an error.
//!
//! What the process tells systemd comes from [`crate::telemetry::health`]: `READY=1` once the
//! control schema is migrated and every channel's stream was accepted, a `STATUS=` line every
//! few seconds, and, when the unit sets `WatchdogSec=`, `WATCHDOG=1` at half that period for
//! as long as no channel is stuck (work in hand, no progress for the period). A hung process
//! is restarted; one waiting on purpose (a backoff, a stopped channel) is not.

use super::channel::{AppliedBatch, ChannelDeps, ChannelTask};
use super::setup::{self, Setup};
use super::{AbortOnDrop, SyncError};
use crate::config::Config;
use crate::telemetry::{self, health::Health};
use std::time::Duration;
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
    let health = Health::new(Duration::from_secs(cfg.sync.stale_stream_secs));
    let channels: Vec<&str> = cfg.channels.iter().map(|c| c.name.as_str()).collect();
    let objects = cfg.objects();
    let objects: Vec<&str> = objects.iter().map(String::as_str).collect();
    telemetry::register_series(&channels, &objects);
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
        let h = health.clone();
        let stop = shutdown.clone();
        Some(AbortOnDrop(tokio::spawn(async move {
            telemetry::serve_metrics(listener, h, async move { stop.cancelled().await }).await
        })))
    };

    let replica = Setup::connect(cfg).await.map_err(SyncError::Replica)?;
    replica.migrate().await.map_err(SyncError::Replica)?;
    let fingerprint = cfg.fingerprint();
    health.migrated();
    replica
        .requeue_changed(&fingerprint)
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
        health: health.clone(),
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
        .with_config(fingerprint)
        .with_health(health.clone());
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
    tracing::info!(channels = cfg.channels.len(), "sfmirror running");
    let _notifier = AbortOnDrop(tokio::spawn(tell_systemd(health.clone(), shutdown.clone())));

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

/// Longest time between two `STATUS=` lines (and watchdog checks, when the watchdog period is
/// longer than twice this).
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Keeps systemd told: `READY=1` once, a `STATUS=` summary, and `WATCHDOG=1` while no channel
/// is stuck (only when the unit asked for a watchdog).
async fn tell_systemd(health: Health, stop: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog
        .map(|period| period / 2)
        .unwrap_or(STATUS_EVERY)
        .clamp(Duration::from_millis(10), STATUS_EVERY);
    let mut ready = false;
    let mut stuck_before: Vec<String> = Vec::new();
    loop {
        let summary = health.summary();
        if !ready && health.started() {
            ready = true;
            tracing::info!(status = %summary, "ready: every channel subscribed");
            notify_systemd(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&summary),
            ]);
        } else {
            notify_systemd(&[sd_notify::NotifyState::Status(&summary)]);
        }
        if let Some(period) = watchdog {
            let stuck = health.stuck(period);
            if stuck.is_empty() {
                notify_systemd(&[sd_notify::NotifyState::Watchdog]);
            } else if stuck != stuck_before {
                tracing::error!(channels = %stuck.join(", "), period_secs = period.as_secs_f64(),
                    "channels stuck with work in hand: no longer telling the watchdog all is well");
            }
            stuck_before = stuck;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// Tells systemd (Type=notify) about the daemon's state, when run under it: a no-op without
/// `NOTIFY_SOCKET`. A failed notification is logged and otherwise ignored, since replication
/// does not depend on it (systemd's own timeout reports a unit that never became ready).
fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}
