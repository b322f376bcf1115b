//! What a backfill costs when the daemon already replicates the object: Salesforce API calls
//! (the backfill's own and the record repairs it leaves behind) and rows merged twice.
//!
//! An org of N Accounts (default 100,000) is created with change events while the daemon runs,
//! so the replica holds every record at the stream's millisecond versions; then, with no
//! workload, `sfmirror backfill` reads the object again. Nothing changed during the read, so
//! every record repair it queues is a needless re-read. Calls are counted by the emulator
//! (`Sforce-Limit-Info: api-usage`, what Salesforce bills against the daily allocation).
//! Run with
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench backfill_overlap [-- N]`.

mod common;

use common::{BenchDb, EmulatorProcess, peak_rss_mb};
use sfmirror::config::Config;
use sfmirror::sync::backfill::{BackfillOptions, Progress, backfill_with};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let db = BenchDb::create("sfm_bench_overlap").await?;
    let result = run(n, &db.url).await;
    db.drop().await?;
    result
}

/// API calls the emulator has counted so far (one more is counted for asking).
async fn api_calls(http: &reqwest::Client, rest: &str, token: &str) -> anyhow::Result<u64> {
    let resp = http
        .get(format!("{rest}/services/data/v62.0/limits"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?;
    let info = resp
        .headers()
        .get("sforce-limit-info")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    sfmirror::salesforce::rest::parse_limit_info(&info)
        .map(|(used, _)| used)
        .ok_or_else(|| anyhow::anyhow!("no api-usage in Sforce-Limit-Info: {info:?}"))
}

async fn scalar(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

async fn run(n: usize, url: &str) -> anyhow::Result<()> {
    let emulator = EmulatorProcess::start(&[])?;
    let rest = emulator.get("rest_url");
    let token = emulator.get("access_token");
    let http = reqwest::Client::new();
    let cfg = Config::from_toml(&format!(
        "{salesforce}\n[replica]\nurl = \"{url}\"\n[metrics]\nlisten = \"\"\n\
         [[channels]]\nname = \"/data/AccountChangeEvent\"\nobjects = [\"Account\"]\n",
        salesforce = emulator.salesforce_toml(),
    ))?;
    let stop = CancellationToken::new();
    let daemon = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::spawn(async move { sfmirror::sync::supervisor::run(&cfg, stop, None).await })
    };
    let (pg, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // The daemon subscribes at LATEST: create the records once it has.
    let t0 = Instant::now();
    loop {
        let stats: serde_json::Value = http
            .get(format!("{rest}/emulator/stats"))
            .send()
            .await?
            .json()
            .await?;
        if stats["subscriptions"]
            .as_array()
            .is_some_and(|s| !s.is_empty())
        {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(60),
            "the daemon did not subscribe"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    http.post(format!("{rest}/emulator/seed"))
        .json(&serde_json::json!({"object": "Account", "count": n, "events": true, "ids": false}))
        .send()
        .await?
        .error_for_status()?;
    let t0 = Instant::now();
    while scalar(&pg, "SELECT count(*) FROM salesforce.account")
        .await
        .unwrap_or(0)
        < n as i64
    {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "the stream did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "stream: {n} Accounts applied in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // Nothing changes from here on; a second passes so that no change shares the read's
    // first whole second.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let before = api_calls(&http, &rest, &token).await?;
    let mut opts = BackfillOptions::new(vec!["Account".to_string()], None);
    opts.progress = Progress::Quiet;
    let t0 = Instant::now();
    let report = backfill_with(&cfg, &opts).await?;
    let account = report
        .object("Account")
        .ok_or_else(|| anyhow::anyhow!("no report for Account"))?;
    if let Some(e) = &account.error {
        anyhow::bail!("backfill failed: {e}");
    }
    let backfill_secs = t0.elapsed().as_secs_f64();
    let after_backfill = api_calls(&http, &rest, &token).await?;
    // The daemon's repair worker reads the queued records again.
    let t0 = Instant::now();
    while scalar(&pg, "SELECT count(*) FROM sfmirror.repair_queue").await? > 0 {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "repairs did not drain"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain_secs = t0.elapsed().as_secs_f64();
    let after_repairs = api_calls(&http, &rest, &token).await?;
    stop.cancel();
    daemon.await??;
    println!(
        "backfill of {} rows over {:?} in {backfill_secs:.1} s: {} API calls; {} record repairs \
         queued, drained in {drain_secs:.1} s with {} API calls; {} calls in all; peak RSS \
         {:.0} MB (daemon and backfill)",
        account.rows_applied,
        account.method,
        after_backfill - before - 1,
        account.repairs_queued,
        after_repairs - after_backfill - 1,
        after_repairs - before - 2,
        peak_rss_mb(),
    );
    Ok(())
}
