//! Logs and metrics. Every metric name is defined here, once, with its HELP text
//! ([`METRICS`]), so dashboards and alerts have one place to look; the rest of the code calls
//! the small recording functions below and never the `metrics` macros itself.
//!
//! The Prometheus recorder is process-wide; [`serve_metrics`] exposes it with `/healthz` and
//! `/readyz` on one listener.

pub mod health;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use health::Health;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use tracing_subscriber::EnvFilter;

pub const EVENTS_TOTAL: &str = "sfmirror_events_total";
pub const REPLICATION_LAG_SECONDS: &str = "sfmirror_replication_lag_seconds";
pub const APPLY_DELAY_SECONDS: &str = "sfmirror_apply_delay_seconds";
pub const BATCH_APPLY_SECONDS: &str = "sfmirror_batch_apply_seconds";
pub const RETENTION_HEADROOM_SECONDS: &str = "sfmirror_retention_headroom_seconds";
pub const REPAIRS_PENDING: &str = "sfmirror_repairs_pending";
pub const REPAIRS_PARKED: &str = "sfmirror_repairs_parked";
pub const REPAIRS_TOTAL: &str = "sfmirror_repairs_total";
pub const DEAD_LETTERS_TOTAL: &str = "sfmirror_dead_letters_total";
pub const STREAM_RECONNECTS_TOTAL: &str = "sfmirror_stream_reconnects_total";
pub const STREAM_CONNECTED: &str = "sfmirror_stream_connected";
pub const SALESFORCE_REQUESTS_TOTAL: &str = "sfmirror_salesforce_requests_total";
pub const SALESFORCE_API_USAGE_RATIO: &str = "sfmirror_salesforce_api_usage_ratio";
pub const EVENT_DELIVERY_USAGE_RATIO: &str = "sfmirror_event_delivery_usage_ratio";
pub const BACKFILL_ROWS_TOTAL: &str = "sfmirror_backfill_rows_total";
pub const BUILD_INFO: &str = "sfmirror_build_info";
pub const REPLAY_RESETS_TOTAL: &str = "sfmirror_replay_resets_total";
pub const LAST_APPLIED_COMMIT_TIMESTAMP_SECONDS: &str =
    "sfmirror_last_applied_commit_timestamp_seconds";
pub const CHANNEL_OWNED: &str = "sfmirror_channel_owned";
pub const CHANNEL_STOPPED: &str = "sfmirror_channel_stopped";
pub const READY: &str = "sfmirror_ready";

/// The process metrics exported beside sfmirror's own (CPU, memory, file descriptors, start
/// time), under the names Prometheus' client libraries use.
pub const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "process_threads",
];

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric with its kind and HELP text: what `/metrics` says of it, and what alert rules
/// and dashboards can rely on.
pub const METRICS: &[(&str, Kind, &str)] = &[
    (
        EVENTS_TOTAL,
        Kind::Counter,
        "Change events applied, by channel and change type.",
    ),
    (
        REPLICATION_LAG_SECONDS,
        Kind::Gauge,
        "Seconds the replica is behind the channel's stream (0 when caught up).",
    ),
    (
        APPLY_DELAY_SECONDS,
        Kind::Histogram,
        "Seconds from a change's Salesforce commit to its replica commit.",
    ),
    (
        BATCH_APPLY_SECONDS,
        Kind::Histogram,
        "Seconds one batch's transaction took, from begin to commit.",
    ),
    (
        RETENTION_HEADROOM_SECONDS,
        Kind::Gauge,
        "Seconds until the channel's committed position falls out of the 72-hour retention.",
    ),
    (
        REPAIRS_PENDING,
        Kind::Gauge,
        "Repairs queued, by object (parked ones included).",
    ),
    (
        REPAIRS_PARKED,
        Kind::Gauge,
        "Repairs parked after a definite failure, by object: they wait for `sfmirror requeue`.",
    ),
    (
        REPAIRS_TOTAL,
        Kind::Counter,
        "Repair attempts, by kind (record, entity) and outcome (ok, error, parked).",
    ),
    (
        DEAD_LETTERS_TOTAL,
        Kind::Counter,
        "Undecodable events kept in the dead-letter table, by channel.",
    ),
    (
        STREAM_RECONNECTS_TOTAL,
        Kind::Counter,
        "Subscribe streams reopened after an error, by channel and reason.",
    ),
    (
        STREAM_CONNECTED,
        Kind::Gauge,
        "1 while the channel's Subscribe stream is open, else 0.",
    ),
    (
        SALESFORCE_REQUESTS_TOTAL,
        Kind::Counter,
        "Salesforce REST, OAuth and Bulk requests, by API and HTTP status.",
    ),
    (
        SALESFORCE_API_USAGE_RATIO,
        Kind::Gauge,
        "Share of the org's daily API request allocation used, from Sforce-Limit-Info and /limits.",
    ),
    (
        EVENT_DELIVERY_USAGE_RATIO,
        Kind::Gauge,
        "Share of the org's event delivery allocation used (every subscriber's CDC and platform \
         event deliveries), from /limits, by window (daily, monthly).",
    ),
    (
        BACKFILL_ROWS_TOTAL,
        Kind::Counter,
        "Snapshot rows applied by backfills, by object.",
    ),
    (
        BUILD_INFO,
        Kind::Gauge,
        "Always 1; the version label says which sfmirror is running.",
    ),
    (
        LAST_APPLIED_COMMIT_TIMESTAMP_SECONDS,
        Kind::Gauge,
        "Salesforce commit time (Unix seconds) of the newest change the channel applied.",
    ),
    (
        CHANNEL_OWNED,
        Kind::Gauge,
        "1 for each channel this instance replicates, 0 for a configured channel it does not \
         own (a standby).",
    ),
    (
        CHANNEL_STOPPED,
        Kind::Gauge,
        "1 while the channel is stopped by an error that needs operator action, else 0.",
    ),
    (
        READY,
        Kind::Gauge,
        "1 while /readyz answers 200 (every owned channel subscribed and applying, or a \
         standby), else 0.",
    ),
    (
        REPLAY_RESETS_TOTAL,
        Kind::Counter,
        "Stored replay ids Salesforce refused (past retention), by channel: each resumed at \
         LATEST with repairs.",
    ),
];

/// Gives every metric its HELP text.
fn describe_metrics() {
    for (name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(*name, *help),
            Kind::Gauge => metrics::describe_gauge!(*name, *help),
            Kind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
    /// JSON when stderr is connected to the systemd journal (`JOURNAL_STREAM` names it), text
    /// otherwise.
    Auto,
}

impl LogFormat {
    /// The format from `SFMIRROR_LOG_FORMAT` (`text`, `json`, `auto`), text when unset.
    pub fn from_env() -> LogFormat {
        match std::env::var("SFMIRROR_LOG_FORMAT").as_deref() {
            Ok("json") => LogFormat::Json,
            Ok("auto") => LogFormat::Auto,
            _ => LogFormat::Text,
        }
    }

    fn json(self) -> bool {
        match self {
            LogFormat::Text => false,
            LogFormat::Json => true,
            LogFormat::Auto => stderr_is_journal(),
        }
    }
}

/// Whether stderr is the journal stream systemd set up (its device and inode are in
/// `JOURNAL_STREAM`).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream == format!("{}:{}", meta.dev(), meta.ino())
}

/// The log filter: sfmirror at `info` and every other crate at `warn` (the Postgres driver
/// logs record values at debug, and server notices at info), then `RUST_LOG`'s directives. A
/// bare level there (`RUST_LOG=debug`) applies to sfmirror only; another crate is raised only
/// when named (`RUST_LOG=debug,tokio_postgres=debug`).
pub fn log_filter(rust_log: Option<&str>) -> String {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let mut own = "info".to_string();
    let mut named = Vec::new();
    for d in rust_log.unwrap_or_default().split(',') {
        let d = d.trim();
        if d.is_empty() {
            continue;
        }
        if LEVELS.contains(&d.to_ascii_lowercase().as_str()) {
            own = d.to_string();
        } else {
            named.push(d.to_string());
        }
    }
    let mut directives = vec!["warn".to_string(), format!("sfmirror={own}")];
    directives.extend(named);
    directives.join(",")
}

/// Logs to stderr in `format`, filtered by [`log_filter`] of `RUST_LOG`. Colour only on a
/// terminal: journald and files get plain text.
pub fn init_logging_as(format: LogFormat) {
    init_logging_with(format, None);
}

/// [`init_logging_as`] with `defaults` (directives such as `warn`) read before `RUST_LOG`'s,
/// which therefore still win.
pub fn init_logging_with(format: LogFormat, defaults: Option<&str>) {
    use std::io::IsTerminal;
    let env = std::env::var("RUST_LOG").ok();
    let rust_log = match (defaults, env) {
        (Some(d), Some(e)) => Some(format!("{d},{e}")),
        (Some(d), None) => Some(d.to_string()),
        (None, e) => e,
    };
    let filter = EnvFilter::try_new(log_filter(rust_log.as_deref()))
        .unwrap_or_else(|_| EnvFilter::new(log_filter(None)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = if format.json() {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// [`init_logging_as`] with the format of `SFMIRROR_LOG_FORMAT`.
pub fn init_logging() {
    init_logging_as(LogFormat::from_env());
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Bucket bounds of every `_seconds` histogram: from a millisecond (an apply delay at a steady
/// rate) to six hours (a long catch-up), so that no latency lands in `+Inf`.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];

/// Repair kinds and outcomes, as `sfmirror_repairs_total`'s series exist from start-up.
pub const REPAIR_KINDS: &[&str] = &["record", "entity"];
pub const REPAIR_OUTCOMES: &[&str] = &["ok", "error", "parked"];

static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn prometheus() -> &'static PrometheusHandle {
    RECORDER.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_string()),
                SECONDS_BUCKETS,
            )
            .and_then(|b| b.install_recorder())
            .unwrap_or_else(|e| {
                // Another recorder is already installed (embedding); render an empty one.
                tracing::warn!(error = %e, "prometheus recorder not installed");
                PrometheusBuilder::new().build_recorder().handle()
            });
        describe_metrics();
        PROCESS
            .get_or_init(metrics_process::Collector::default)
            .describe();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        handle
    })
}

/// Creates every series whose labels are known at start-up, at 0: the configured channels'
/// counters and gauges, every change type, repair kind and outcome, and the objects' repair
/// and backfill series. `increase()` then sees the first dead letter or reset, and a
/// dashboard has a line for each channel before anything happened.
pub fn register_series(channels: &[&str], objects: &[&str]) {
    prometheus();
    for channel in channels {
        let c = channel.to_string();
        for change_type in crate::model::ChangeType::SYMBOLS {
            metrics::counter!(EVENTS_TOTAL, "channel" => c.clone(), "change_type" => change_type)
                .increment(0);
        }
        metrics::counter!(DEAD_LETTERS_TOTAL, "channel" => c.clone()).increment(0);
        metrics::counter!(REPLAY_RESETS_TOTAL, "channel" => c.clone()).increment(0);
        metrics::gauge!(STREAM_CONNECTED, "channel" => c.clone()).set(0.0);
        metrics::gauge!(CHANNEL_STOPPED, "channel" => c.clone()).set(0.0);
        metrics::gauge!(CHANNEL_OWNED, "channel" => c.clone()).set(0.0);
    }
    for object in objects {
        let o = object.to_string();
        metrics::gauge!(REPAIRS_PENDING, "object" => o.clone()).set(0.0);
        metrics::gauge!(REPAIRS_PARKED, "object" => o.clone()).set(0.0);
        metrics::counter!(BACKFILL_ROWS_TOTAL, "object" => o).increment(0);
    }
    for kind in REPAIR_KINDS {
        for outcome in REPAIR_OUTCOMES {
            metrics::counter!(REPAIRS_TOTAL, "kind" => *kind, "outcome" => *outcome).increment(0);
        }
    }
    metrics::gauge!(READY).set(0.0);
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` resolves.
/// `/readyz` answers 200 or 503 with the readiness as JSON, naming what is not ready.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = prometheus();
    let app = Router::new()
        .route(
            "/metrics",
            get(move |State(h): State<Health>| async move {
                h.refresh();
                if let Some(p) = PROCESS.get() {
                    p.collect();
                }
                handle.render()
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                let r = h.readiness();
                let status = if r.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, axum::Json(r))
            }),
        )
        .with_state(health);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

pub fn record_events(channel: &str, change_type: &'static str, n: u64) {
    metrics::counter!(EVENTS_TOTAL, "channel" => channel.to_string(), "change_type" => change_type)
        .increment(n);
}

/// How long one batch's transaction took (keepalive positions are not batches).
pub fn record_batch(seconds: f64) {
    metrics::histogram!(BATCH_APPLY_SECONDS).record(seconds);
}

/// The clock-driven gauges of a channel, as of a scrape (see [`health`]).
fn record_channel_clock(channel: &str, lag: f64, headroom: f64, last_commit_secs: Option<f64>) {
    let c = channel.to_string();
    metrics::gauge!(REPLICATION_LAG_SECONDS, "channel" => c.clone()).set(lag);
    metrics::gauge!(RETENTION_HEADROOM_SECONDS, "channel" => c.clone()).set(headroom);
    if let Some(t) = last_commit_secs {
        metrics::gauge!(LAST_APPLIED_COMMIT_TIMESTAMP_SECONDS, "channel" => c).set(t);
    }
}

/// A channel with a health record is one this process owns.
fn record_channel_state(channel: &str, stopped: bool) {
    let c = channel.to_string();
    metrics::gauge!(CHANNEL_OWNED, "channel" => c.clone()).set(1.0);
    metrics::gauge!(CHANNEL_STOPPED, "channel" => c).set(f64::from(u8::from(stopped)));
}

/// A channel this process no longer owns: another instance reports it.
fn record_channel_released(channel: &str) {
    let c = channel.to_string();
    metrics::gauge!(CHANNEL_OWNED, "channel" => c.clone()).set(0.0);
    metrics::gauge!(STREAM_CONNECTED, "channel" => c.clone()).set(0.0);
    metrics::gauge!(CHANNEL_STOPPED, "channel" => c).set(0.0);
}

fn record_ready(ready: bool) {
    metrics::gauge!(READY).set(f64::from(u8::from(ready)));
}

pub fn record_backfill_rows(object: &str, rows: u64) {
    metrics::counter!(BACKFILL_ROWS_TOTAL, "object" => object.to_string()).increment(rows);
}

pub fn record_apply_delay(seconds: f64) {
    metrics::histogram!(APPLY_DELAY_SECONDS).record(seconds);
}

pub fn record_repairs(kind: &'static str, outcome: &'static str, n: usize) {
    metrics::counter!(REPAIRS_TOTAL, "kind" => kind, "outcome" => outcome).increment(n as u64);
}

pub fn record_repairs_pending(object: &str, pending: i64, parked: i64) {
    metrics::gauge!(REPAIRS_PENDING, "object" => object.to_string()).set(pending as f64);
    metrics::gauge!(REPAIRS_PARKED, "object" => object.to_string()).set(parked as f64);
}

pub fn record_dead_letters(channel: &str, n: usize) {
    metrics::counter!(DEAD_LETTERS_TOTAL, "channel" => channel.to_string()).increment(n as u64);
}

pub fn record_replay_reset(channel: &str) {
    metrics::counter!(REPLAY_RESETS_TOTAL, "channel" => channel.to_string()).increment(1);
}

pub fn record_connected(channel: &str, connected: bool) {
    metrics::gauge!(STREAM_CONNECTED, "channel" => channel.to_string()).set(if connected {
        1.0
    } else {
        0.0
    });
}

pub fn record_reconnect(channel: &str, reason: &'static str) {
    metrics::counter!(STREAM_RECONNECTS_TOTAL, "channel" => channel.to_string(), "reason" => reason)
        .increment(1);
}

pub fn record_salesforce_request(api: &'static str, status: u16) {
    metrics::counter!(SALESFORCE_REQUESTS_TOTAL, "api" => api, "status" => status.to_string())
        .increment(1);
}

/// Sets the event delivery usage of `window` (`daily`, `monthly`).
pub fn record_delivery_usage(window: &'static str, used: u64, max: u64) {
    if max > 0 {
        metrics::gauge!(EVENT_DELIVERY_USAGE_RATIO, "window" => window)
            .set(used as f64 / max as f64);
    }
}

pub fn record_api_usage(used: u64, max: u64) {
    if max > 0 {
        metrics::gauge!(SALESFORCE_API_USAGE_RATIO).set(used as f64 / max as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn other_crates_stay_at_warn_unless_named() {
        assert_eq!(log_filter(None), "warn,sfmirror=info");
        assert_eq!(log_filter(Some("debug")), "warn,sfmirror=debug");
        assert_eq!(
            log_filter(Some("debug, tokio_postgres=trace")),
            "warn,sfmirror=debug,tokio_postgres=trace"
        );
        assert_eq!(
            log_filter(Some("sfmirror::sync=trace")),
            "warn,sfmirror=info,sfmirror::sync=trace"
        );
    }
}
