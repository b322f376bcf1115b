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

mod common;

use common::{BenchDb, EmulatorProcess, peak_rss_mb};
use futures::{SinkExt, StreamExt, TryStreamExt};
use sfmirror::config::Config;
use sfmirror::sync::backfill::{BackfillOptions, Progress, backfill_with};
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sfmirror::telemetry::init_logging();
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let db = BenchDb::create("sfm_bench_backfill").await?;
    let result = run(n, &db.url).await;
    db.drop().await?;
    result
}

async fn run(n: usize, url: &str) -> anyhow::Result<()> {
    let emulator = EmulatorProcess::start(&[])?;
    let rest = emulator.get("rest_url");

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
        {salesforce}
        [replica]
        url = "{url}"
        [metrics]
        listen = ""
        [[channels]]
        name = "/data/AccountChangeEvent"
        objects = ["Account"]
        "#,
        salesforce = emulator.salesforce_toml(),
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
    drop(emulator);

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
