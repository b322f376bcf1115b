//! Backfill throughput and memory: `sfmirror backfill` of one large object over Bulk API 2.0.
//!
//! Budget (design.md): 1,000,000 Account rows over Bulk API 2.0 from the emulator at no
//! less than 100,000 rows/s, and at least 0.65 x a raw binary COPY of the same rows measured in
//! the same run; peak RSS reported. Run with
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench backfill [-- N]`
//! (N rows, default 1,000,000).
//!
//! The emulator runs as a separate process (the `sfmirror emulator` binary), so the peak RSS
//! printed is the backfill's own. The raw COPY baseline streams the replicated table out of
//! Postgres and into a fresh table of the same shape through this process with binary COPY:
//! what moving the same rows costs with no Salesforce, CSV or merge in between.

use futures::{SinkExt, StreamExt, TryStreamExt};
use sfmirror::config::Config;
use sfmirror::sync::backfill::{BackfillOptions, Progress, backfill_with};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Instant;

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

/// The emulator child process; killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sfmirror::telemetry::init_logging();
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let db = format!("sfm_bench_backfill_{}", std::process::id());
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => anyhow::bail!("DATABASE_URL has no database part"),
    };
    let result = run(n, &url).await;
    client
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await?;
    result
}

async fn run(n: usize, url: &str) -> anyhow::Result<()> {
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
    let child = Child(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let info: serde_json::Value = serde_json::from_str(&line)?;
    let rest = info["rest_url"].as_str().unwrap_or_default().to_string();

    let t0 = Instant::now();
    let seeded: serde_json::Value = reqwest::Client::new()
        .post(format!("{rest}/emulator/seed"))
        .json(&serde_json::json!({"object": "Account", "count": n, "events": false, "ids": false}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!(
        "org: {} Accounts seeded in {:.1} s (emulator process)",
        seeded["created"],
        t0.elapsed().as_secs_f64()
    );

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
        name = "/data/AccountChangeEvent"
        objects = ["Account"]
        "#,
        id = info["client_id"].as_str().unwrap_or_default(),
        secret = info["client_secret"].as_str().unwrap_or_default(),
        grpc = info["pubsub_endpoint"].as_str().unwrap_or_default(),
    ))?;
    let mut opts = BackfillOptions::new(vec!["Account".to_string()], None);
    opts.progress = Progress::Quiet;
    let t0 = Instant::now();
    let report = backfill_with(&cfg, &opts).await?;
    let secs = t0.elapsed().as_secs_f64();
    let object = report
        .object("Account")
        .ok_or_else(|| anyhow::anyhow!("no report for Account"))?;
    if let Some(e) = &object.error {
        anyhow::bail!("backfill failed: {e}");
    }
    let rows = object.rows_applied;
    let backfill_rate = rows as f64 / secs;
    let rss = peak_rss_mb();
    println!(
        "backfill: {rows} rows over {:?} in {secs:.2} s = {backfill_rate:.0} rows/s; peak RSS {rss:.0} MB",
        object.method
    );
    drop(child);

    // The baseline: the same rows through binary COPY out of the replica and into a fresh
    // table of the same shape, in the same database.
    let (a, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let (b, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    b.batch_execute("CREATE TABLE public.raw_copy (LIKE salesforce.account INCLUDING ALL)")
        .await?;
    let t0 = Instant::now();
    let out = a
        .copy_out("COPY salesforce.account TO STDOUT (FORMAT binary)")
        .await?;
    let sink = b
        .copy_in::<_, bytes::Bytes>("COPY public.raw_copy FROM STDIN (FORMAT binary)")
        .await?;
    futures::pin_mut!(sink);
    let mut stream = out.map_err(anyhow::Error::from).boxed();
    while let Some(chunk) = stream.next().await {
        sink.feed(chunk?).await?;
    }
    let copied = sink.finish().await?;
    let copy_secs = t0.elapsed().as_secs_f64();
    let copy_rate = copied as f64 / copy_secs;
    println!(
        "raw binary COPY of the same rows: {copied} rows in {copy_secs:.2} s = {copy_rate:.0} rows/s"
    );
    println!(
        "ratio backfill / raw COPY = {:.2} (budget >= 0.65); backfill budget >= 100000 rows/s",
        backfill_rate / copy_rate
    );
    Ok(())
}
