//! The thinnest whole path: Account CREATE and UPDATE events travel from the emulator's
//! Pub/Sub API into Postgres, with the replay id committed in the same transaction, and a
//! killed subscriber resumes exactly after its checkpoint.

use crate::common;
use crate::common::TestDb;
use serde_json::{Value as J, json};
use sfmirror::demo::RestWriter;
use sfmirror::emulator::Emulator;
use sfmirror::model::ReplayId;
use sfmirror::sync::channel::AppliedBatch;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

async fn wait_for(what: &str, timeout: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !ok().await {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Epoch ms of a REST datetime or a Postgres jsonb timestamptz.
fn ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .map(|d| d.timestamp_millis())
}

fn same(org: &J, replica: &J) -> bool {
    match (org, replica) {
        (J::Null, J::Null) => true,
        (J::Number(a), J::Number(b)) => a.as_f64() == b.as_f64(),
        (J::String(a), J::String(b)) if a == b => true,
        (J::String(a), J::String(b)) => ms(a).is_some() && ms(a) == ms(b),
        (a, b) => a == b,
    }
}

/// Compares every replicated field of every Account in the org with the replica row.
async fn assert_replica_matches(emulator: &Emulator, db: &TestDb) {
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT id, to_jsonb(t)::text FROM salesforce.account t",
            &[],
        )
        .await
        .expect("read replica");
    let replica: HashMap<String, J> = rows
        .iter()
        .map(|r| {
            let text: String = r.get(1);
            (r.get(0), serde_json::from_str(&text).expect("row as JSON"))
        })
        .collect();
    let org_records = emulator.org.records("Account");
    assert_eq!(replica.len(), org_records.len(), "row count");
    let def = emulator.org.object("Account").expect("Account");
    let fields: Vec<String> = def
        .schema
        .fields
        .iter()
        .flat_map(|f| match f {
            sfmirror::emulator::cdc::CdcField::Scalar { field, .. } => vec![field.clone()],
            sfmirror::emulator::cdc::CdcField::Compound { subs, .. } => {
                subs.iter().map(|s| s.1.clone()).collect()
            }
        })
        .collect();
    for rec in org_records {
        let id = rec["Id"].as_str().expect("id");
        let row = replica
            .get(id)
            .unwrap_or_else(|| panic!("{id} missing in replica"));
        for f in &fields {
            let want = rec.get(f).unwrap_or(&J::Null);
            let got = &row[f.to_ascii_lowercase()];
            assert!(same(want, got), "{id}.{f}: org {want} replica {got}");
        }
        assert_eq!(row["_sfm_deleted"], J::Bool(false));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_and_updates_reach_postgres_and_a_killed_subscriber_resumes() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = common::TestConfig::new(&emulator, &db.url)
        .channels(&[("/data/AccountChangeEvent", &["Account"])])
        .build();
    let (observed, mut batches) = broadcast::channel::<AppliedBatch>(4096);

    // First subscriber.
    let first = common::Daemon::spawn(&cfg, Some(observed.clone()));
    wait_for(
        "the first subscription",
        Duration::from_secs(30),
        async || emulator.subscription_count() >= 1,
    )
    .await;

    // A writer creates 100 Accounts and updates 50 while the subscriber is killed mid-way.
    let writer = Arc::new(RestWriter::new(&emulator));
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let writing = {
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..100 {
                let id = writer
                    .create(
                        "Account",
                        json!({"Name": format!("Account {i}"), "BillingCity": "Paris",
                               "BillingStreet": format!("{i} rue de Rivoli"),
                               "NumberOfEmployees": i, "AnnualRevenue": 1000.5 * i as f64,
                               "Phone": null, "Description": "line one\nline two"}),
                    )
                    .await
                    .expect("create");
                ids.push(id);
                if i % 2 == 1 {
                    let target = &ids[i / 2];
                    writer
                        .update(
                            "Account",
                            target,
                            json!({"Rating": "Hot", "BillingCity": "Lyon", "Phone": "555-0100",
                                   "NumberOfEmployees": 5000 + i, "Description": null}),
                        )
                        .await
                        .expect("update");
                }
                let _ = progress_tx.send(i + 1);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        })
    };

    // Kill the first subscriber once it has committed something and writing is under way.
    let mut applied_before_kill = 0;
    while applied_before_kill == 0 {
        let b = batches.recv().await.expect("a batch");
        applied_before_kill += b.replay_ids.len();
    }
    progress
        .wait_for(|n| *n >= 40)
        .await
        .expect("writer progress");
    first.task.abort();
    let _ = first.task.await;
    let ids = writing.await.expect("writer");
    assert_eq!(ids.len(), 100);

    // The checkpoint the killed subscriber left behind.
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT replay_id FROM sfmirror.checkpoints WHERE channel = '/data/AccountChangeEvent'",
            &[],
        )
        .await
        .expect("a checkpoint was committed");
    let checkpoint = ReplayId(row.get(0));
    let committed_rows: i64 = client
        .query_one("SELECT count(*) FROM salesforce.account", &[])
        .await
        .expect("count")
        .get(0);
    assert!(
        committed_rows > 0 && committed_rows < 100,
        "killed mid-way: {committed_rows}"
    );

    // Restart: it must resume strictly after the checkpoint.
    let second = common::Daemon::spawn(&cfg, Some(observed.clone()));
    let expected_hot = 50i64;
    // The second daemon's repair worker may re-read everything (the first start's queued
    // re-read) before its channel takes over: the stream's resumption is what is tested, so
    // wait for a batch of the resumed stream too.
    let mut seen: Vec<AppliedBatch> = Vec::new();
    wait_for(
        "the replica to catch up",
        Duration::from_secs(60),
        async || {
            while let Ok(b) = batches.try_recv() {
                seen.push(b);
            }
            seen.iter()
                .any(|b| b.started_after.as_ref() == Some(&checkpoint))
                && client
                    .query_one(
                        "SELECT count(*) = 100 AND count(*) FILTER (WHERE rating = 'Hot') = $1
                 FROM salesforce.account",
                        &[&expected_hot],
                    )
                    .await
                    .map(|r| r.get::<_, bool>(0))
                    .unwrap_or(false)
        },
    )
    .await;
    // Let the last batch's observer message arrive, then stop cleanly.
    tokio::time::sleep(Duration::from_millis(300)).await;
    second.stop().await;

    let subs = emulator.subscriptions();
    let resumed = subs.last().expect("second subscription");
    assert_eq!(resumed.preset, "CUSTOM", "{subs:?}");
    assert_eq!(
        resumed.replay_id,
        checkpoint.as_u64(),
        "resumed at the checkpoint"
    );
    let cp = checkpoint.as_u64().expect("8-byte replay id");
    let mut after_restart = 0;
    while let Ok(b) = batches.try_recv() {
        seen.push(b);
    }
    for b in &seen {
        if b.started_after.as_ref() == Some(&checkpoint) {
            for r in &b.replay_ids {
                let r = r.as_u64().expect("8-byte");
                assert!(
                    r > cp,
                    "event {r} from before the checkpoint {cp} was applied again"
                );
                after_restart += 1;
            }
        }
    }
    assert!(after_restart > 0, "the second subscriber applied the rest");
    assert_replica_matches(&emulator, &db).await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_and_are_recorded() {
    let db = TestDb::create().await;
    let mut client = db.client().await;
    let first = sfmirror::replica::migrate::migrate(&mut client, "salesforce", "sfmirror")
        .await
        .expect("migrate");
    assert_eq!(first.len(), sfmirror::replica::migrate::MIGRATIONS.len());
    let again = sfmirror::replica::migrate::migrate(&mut client, "salesforce", "sfmirror")
        .await
        .expect("migrate again");
    assert!(again.is_empty(), "nothing applied twice");
    let n: i64 = client
        .query_one("SELECT count(*) FROM sfmirror.migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n as usize, first.len());
    for table in ["checkpoints", "repair_queue", "tombstones", "dead_letters"] {
        client
            .query_one(&format!("SELECT count(*) FROM sfmirror.{table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_claim_is_free_as_soon_as_its_holder_is_gone() {
    // A crashed daemon's claims must not wait out their ten-minute lease: its connections,
    // and with them the backends that claimed, are gone.
    use sfmirror::replica::repair_queue;
    use sfmirror::replica::repair_queue::RepairRequest;
    let db = TestDb::create().await;
    let mut client = db.client().await;
    sfmirror::replica::migrate::migrate(&mut client, "salesforce", "sfmirror")
        .await
        .expect("migrate");
    let request = RepairRequest::Record {
        object: "Account".into(),
        id: "001000000000001AAA".into(),
        reason: "test".into(),
    };
    let pool = |url: &str| {
        deadpool_postgres::Config {
            url: Some(url.to_string()),
            ..Default::default()
        }
        .create_pool(None, tokio_postgres::NoTls)
        .expect("pool")
    };
    let (holder_pool, other_pool) = (pool(&db.url), pool(&db.url));
    let other = other_pool.get().await.expect("connection");
    repair_queue::enqueue(&other, "sfmirror", "/data/X", None, &[request])
        .await
        .expect("enqueue");

    let holder = holder_pool.get().await.expect("connection");
    let held = repair_queue::claim(&holder, "sfmirror", 10, 600)
        .await
        .expect("claim");
    assert_eq!(held.len(), 1);
    let none = repair_queue::claim(&other, "sfmirror", 10, 600)
        .await
        .expect("claim");
    assert!(none.is_empty(), "a live holder keeps its claim");

    drop(holder);
    holder_pool.close();
    // The backend ends shortly after its connection closes.
    let t0 = Instant::now();
    loop {
        let taken = repair_queue::claim(&other, "sfmirror", 10, 600)
            .await
            .expect("claim");
        if taken.len() == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the claim of a closed connection is taken over without waiting for the lease"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
