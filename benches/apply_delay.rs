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
use sfmirror::config::Config;
use sfmirror::sync::supervisor;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

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

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let db = format!("sfm_bench_delay_{}", std::process::id());
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => anyhow::bail!("DATABASE_URL has no database part"),
    };
    let result = run(&url, seconds, rate, &delays).await;
    client
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await?;
    result
}

async fn run(url: &str, seconds: f64, rate: f64, delays: &Delays) -> anyhow::Result<()> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sfmirror"))
        .args([
            "emulator",
            "--listen-rest",
            "127.0.0.1:0",
            "--listen-grpc",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no emulator stdout"))?;
    let _child = Child(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let info: serde_json::Value = serde_json::from_str(&line)?;
    let rest = info["rest_url"].as_str().unwrap_or_default().to_string();
    let http = reqwest::Client::new();

    let cfg = Config::from_toml(&format!(
        r#"
        [salesforce]
        login_url = "{rest}"
        auth = "client_credentials"
        client_id = "{id}"
        client_secret = "{secret}"
        pubsub_endpoint = "{grpc}"
        [replica]
        url = "{url}"
        [metrics]
        listen = ""
        [[channels]]
        name = "/data/ChangeEvents"
        objects = ["Account", "Contact", "Opportunity"]
        "#,
        id = info["client_id"].as_str().unwrap_or_default(),
        secret = info["client_secret"].as_str().unwrap_or_default(),
        grpc = info["pubsub_endpoint"].as_str().unwrap_or_default(),
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
