//! Catch-up throughput: the daemon applies a backlog of change events from the emulator.
//!
//! Budget (design.md): >= 50,000 events/s for a 1,000,000-event backlog of mixed
//! CREATE / UPDATE / DELETE over 3 objects. Run with
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench catchup [-- N]`
//! (N events, default 200,000). The emulator runs in the same process, so the reported peak
//! RSS covers both and the backlog itself; it bounds sfmirror's from above.

use serde_json::json;
use sfmirror::config::Config;
use sfmirror::emulator::{Emulator, EmulatorConfig};
use sfmirror::sync::supervisor;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sfmirror::telemetry::init_logging();
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let db = format!("sfm_bench_{}", std::process::id());
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => anyhow::bail!("DATABASE_URL has no database part"),
    };

    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let org = emulator.org.clone();
    let start_tip = org.bus.tip();

    // The backlog: creates, then updates and deletes, over three objects.
    let t0 = Instant::now();
    let objects = ["Account", "Contact", "Opportunity"];
    let mut ids: Vec<(usize, String)> = Vec::new();
    let mut made = 0usize;
    while made < n {
        let i = made;
        let o = i % 3;
        let roll = i % 10;
        if roll < 5 || ids.len() < 10 {
            let fields = match o {
                0 => json!({"Name": format!("Account {i}"), "BillingCity": "Paris",
                            "NumberOfEmployees": i % 1000, "Industry": "Energy"}),
                1 => json!({"LastName": format!("Contact {i}"), "Email": "c@example.com"}),
                _ => json!({"Name": format!("Deal {i}"), "StageName": "Prospecting",
                            "CloseDate": "2027-01-31", "Amount": 1000.5}),
            };
            let map = fields.as_object().cloned().unwrap_or_default();
            let id = org
                .create(objects[o], &map, "")
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            ids.push((o, id));
        } else if roll < 9 {
            let (o, id) = &ids[(i * 7919) % ids.len()];
            let field = if *o == 1 { "Title" } else { "Description" };
            let map = json!({ field: format!("update {i}") })
                .as_object()
                .cloned()
                .unwrap_or_default();
            if org.update(objects[*o], id, &map, "").is_err() {
                continue;
            }
        } else {
            let (o, id) = ids.swap_remove((i * 104_729) % ids.len());
            if org.delete(objects[o], &id, "").is_err() {
                continue;
            }
        }
        made += 1;
    }
    let end_tip = org.bus.tip();
    println!(
        "backlog: {n} events built in {:.1} s",
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
        [sync]
        batch_max_events = 5000
        [metrics]
        listen = ""
        [[channels]]
        name = "/data/ChangeEvents"
        objects = ["Account", "Contact", "Opportunity"]
        "#,
        rest = emulator.rest_url,
        id = emulator.credentials.client_id,
        secret = emulator.credentials.client_secret,
        grpc = emulator.pubsub_endpoint,
    ))?;
    // Start from just before the backlog, as a daemon that was down would.
    let pool = supervisor::prepare_replica(&cfg).await?;
    {
        let c = pool.get().await?;
        c.execute(
            "INSERT INTO sfmirror.checkpoints (channel, replay_id, commit_timestamp)
             VALUES ('/data/ChangeEvents', $1, now())",
            &[&start_tip.to_be_bytes().to_vec()],
        )
        .await?;
    }
    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let daemon = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::spawn(async move { supervisor::run(&cfg, stop, None).await })
    };
    let want = end_tip.to_be_bytes().to_vec();
    loop {
        let c = pool.get().await?;
        let row = c
            .query_one(
                "SELECT replay_id FROM sfmirror.checkpoints WHERE channel = '/data/ChangeEvents'",
                &[],
            )
            .await?;
        let at: Vec<u8> = row.get(0);
        if at == want {
            break;
        }
        if daemon.is_finished() {
            anyhow::bail!("the daemon stopped early");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "catch-up: {n} events in {secs:.2} s = {:.0} events/s; peak RSS {:.0} MB (emulator and backlog included)",
        n as f64 / secs,
        peak_rss_mb()
    );
    stop.cancel();
    let _ = daemon.await;
    drop(pool);
    emulator.stop().await;
    client
        .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .await?;
    Ok(())
}
