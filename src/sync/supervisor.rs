//! The daemon: builds the shared clients, migrates the control schema, runs the coordinator
//! (one task per channel this instance owns, see [`super::coordinator`]), the repair worker,
//! the derived-column worker and the metrics listener, and stops them all on shutdown.
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

use super::channel::{AppliedBatch, ChannelDeps};
use super::coordinator::Coordinator;
use super::setup::{self, Setup};
use super::{AbortOnDrop, SyncError};
use crate::config::Config;
use crate::replica::ReplicaError;
use crate::replica::ownership::{self, Instance};
use crate::telemetry::{self, health::Health};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

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

    let me = Instance::new();
    let replica = Setup::connect_as(cfg, &me.application_name())
        .await
        .map_err(SyncError::Replica)?;
    replica.migrate().await.map_err(SyncError::Replica)?;
    let fingerprint = cfg.fingerprint();
    health.migrated();
    let _notifier = AbortOnDrop(tokio::spawn(tell_systemd(health.clone(), shutdown.clone())));
    if !wait_after_failed_starts(cfg, &replica, &me.host, &shutdown).await? {
        return Ok(());
    }
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

    let mut derived_worker = {
        let reader = super::reader::OrgReader::new(
            salesforce.rest.clone(),
            salesforce.bulk.clone(),
            cfg.sync.retry_backoff(),
            shutdown.clone(),
        );
        let worker =
            super::derived::DerivedWorker::new(reader, deps.pool.clone(), deps.apply.clone(), cfg)
                .with_health(health.clone());
        let stop = shutdown.clone();
        AbortOnDrop(tokio::spawn(async move { worker.run(stop).await }))
    };

    let _limits = AbortOnDrop(tokio::spawn(super::limits::watch(
        salesforce.rest.clone(),
        Duration::from_secs(cfg.sync.limits_poll_secs),
        shutdown.clone(),
    )));

    tracing::info!(channels = cfg.channels.len(), instance = %me.id, "sfmirror running");
    let coordinator = Coordinator {
        me,
        channels: cfg.channels.clone(),
        deps,
        ha: cfg.ha.clone(),
        health: health.clone(),
    };
    let result = coordinator.run(shutdown.clone()).await;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    let _ = (&mut repair_worker.0).await;
    let _ = (&mut derived_worker.0).await;
    if let Some(mut t) = metrics_task {
        let _ = (&mut t.0).await;
    }
    result
}

/// Counts this start and, when the starts before it on this host failed, waits before going
/// on: the wait doubles with each failed start (from `sync.reconnect_min_ms` to
/// `sync.reconnect_max_ms`), counted in the control schema so that it survives the restarts
/// systemd makes. Returns false when shut down while waiting.
async fn wait_after_failed_starts(
    cfg: &Config,
    replica: &Setup,
    host: &str,
    shutdown: &CancellationToken,
) -> Result<bool, SyncError> {
    let failed = {
        let client = replica.pool.get().await.map_err(ReplicaError::from)?;
        ownership::start_attempt(&client, &replica.settings.control_schema, host).await?
    };
    if failed == 0 {
        return Ok(true);
    }
    let delay = cfg.sync.retry_backoff().delay_for(failed);
    tracing::warn!(
        failed_starts = failed,
        wait_ms = delay.as_millis() as u64,
        "the last starts on this host did not get ready; waiting before connecting to Salesforce"
    );
    tokio::select! {
        _ = shutdown.cancelled() => Ok(false),
        _ = tokio::time::sleep(delay) => Ok(true),
    }
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
