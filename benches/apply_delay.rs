//! Apply delay under a steady load: Salesforce commit -> replica commit, per event.
//!
//! Budget (design.md): p99 <= 50 ms at a steady 1,000 events/s. Run with
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench apply_delay [-- SECONDS [RATE]]`
//! (default 30 s at 1,000 changes/s).
//!
//! The emulator runs as a separate process (the `sfmirror emulator` binary) with its control
//! API's workload making random creates, updates, deletes and undeletes over Account, Contact
//! and Opportunity at the rate; the daemon runs in this process. The delays are the values the
//! daemon records into `sfmirror_apply_delay_seconds` (captured here exactly, not bucketed),
//! and the peak RSS printed is the daemon's own.

use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
mod common;

use common::{BenchDb, EmulatorProcess, peak_rss_mb};
use sfmirror::config::Config;
use sfmirror::sync::supervisor;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Keeps every observation of the apply-delay histogram; every other metric is dropped.
#[derive(Default)]
struct Delays(Mutex<Vec<f64>>);

impl HistogramFn for Delays {
    fn record(&self, value: f64) {
        if let Ok(mut v) = self.0.lock() {
            v.push(value);
        }
    }
}

struct Capture(Arc<Delays>);

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        if key.name() == sfmirror::telemetry::APPLY_DELAY_SECONDS {
            Histogram::from_arc(self.0.clone())
        } else {
            Histogram::noop()
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sfmirror::telemetry::init_logging();
    let delays = Arc::new(Delays::default());
    metrics::set_global_recorder(Capture(delays.clone()))
        .map_err(|e| anyhow::anyhow!("recorder: {e}"))?;
    let numbers: Vec<f64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let seconds = numbers.first().copied().unwrap_or(30.0);
    let rate = numbers.get(1).copied().unwrap_or(1000.0);
    let db = BenchDb::create("sfm_bench_delay").await?;
    let result = run(&db.url, seconds, rate, &delays).await;
    db.drop().await?;
    result
}

async fn run(url: &str, seconds: f64, rate: f64, delays: &Delays) -> anyhow::Result<()> {
    let emulator = EmulatorProcess::start(&[])?;
    let rest = emulator.get("rest_url");
    let http = reqwest::Client::new();

    let cfg = Config::from_toml(&format!(
        r#"
        {salesforce}
        [replica]
        url = "{url}"
        [metrics]
        listen = ""
        [[channels]]
        name = "/data/ChangeEvents"
        objects = ["Account", "Contact", "Opportunity"]
        "#,
        salesforce = emulator.salesforce_toml(),
    ))?;
    let stop = CancellationToken::new();
    let daemon = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::spawn(async move { supervisor::run(&cfg, stop, None).await })
    };
    let stats = async || -> anyhow::Result<serde_json::Value> {
        Ok(http
            .get(format!("{rest}/emulator/stats"))
            .send()
            .await?
            .json()
            .await?)
    };
    let t0 = Instant::now();
    while stats().await?["subscriptions"]
        .as_array()
        .is_none_or(|s| s.is_empty())
    {
        if t0.elapsed() > Duration::from_secs(30) {
            anyhow::bail!("the daemon did not subscribe");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first start snapshots the (empty) objects; let that settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Ok(mut d) = delays.0.lock() {
        d.clear();
    }
    http.post(format!("{rest}/emulator/workload"))
        .json(&serde_json::json!({"rate": rate}))
        .send()
        .await?
        .error_for_status()?;
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    let stopped: serde_json::Value = http
        .post(format!("{rest}/emulator/workload/stop"))
        .send()
        .await?
        .json()
        .await?;
    // Let the last events arrive and commit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let _ = daemon.await;
    let mut v = delays.0.lock().map(|d| d.clone()).unwrap_or_default();
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "apply delay at {rate:.0} changes/s for {seconds:.0} s: {} changes made, {} events applied",
        stopped["changes"],
        v.len()
    );
    println!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (budget p99 <= 50 ms); peak RSS {:.0} MB (daemon only)",
        percentile(&v, 0.5) * 1e3,
        percentile(&v, 0.9) * 1e3,
        percentile(&v, 0.99) * 1e3,
        v.last().copied().unwrap_or(f64::NAN) * 1e3,
        peak_rss_mb()
    );
    Ok(())
}
