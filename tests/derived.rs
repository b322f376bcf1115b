//! Real-org data shapes (issue 16): snapshots of records the stream already applied read
//! nothing again; person-name `name` columns; derived columns (formulas, person names, fields
//! never sent in change events) re-read after changes and swept on a schedule.

use crate::common::{Daemon, TestConfig, TestDb, wait_for};
use sfmirror::emulator::workload;
use sfmirror::sync::backfill::{self, BackfillOptions};
use std::time::Duration;

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client()
        .await
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// With the daemon running and no workload, a backfill of 10,000 records the stream already
/// applied reads none of them again: the snapshot's version is the read's time (Salesforce's
/// `Date`), not the whole-second SystemModstamp that loses to the stream's milliseconds.
#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_of_records_the_stream_applied_queues_no_repair() {
    let emulator = crate::common::emulator().await;
    let db = TestDb::create().await;
    let cfg = TestConfig::new(&emulator, &db.url)
        .channel("/data/AccountChangeEvent", &["Account"])
        .build();
    let daemon = Daemon::start(&emulator, &cfg).await;
    workload::seed(&emulator.org, "Account", 10_000, 7, true).expect("seed");
    wait_for(
        "the stream applies 10,000 accounts",
        Duration::from_secs(120),
        async || count(&db, "SELECT count(*) FROM salesforce.account").await == 10_000,
    )
    .await;
    // Salesforce's `Date` has whole seconds: a change in the second the read starts in may
    // have come after it, and is read again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for bulk_threshold in [u64::MAX, 0] {
        let mut opts = BackfillOptions::new(vec!["Account".to_string()], None);
        opts.bulk_threshold = bulk_threshold;
        let report = backfill::backfill_with(&cfg, &opts)
            .await
            .expect("backfill");
        let account = &report.objects[0];
        assert!(account.completed(), "{account}");
        assert_eq!(account.rows_applied, 10_000, "{account}");
        assert_eq!(
            account.repairs_queued, 0,
            "no record was changed during the read: {account}"
        );
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM sfmirror.repair_queue").await,
        0
    );

    // Records changed while the read is under way are the only ones read again.
    let all: Vec<String> = db
        .client()
        .await
        .query("SELECT id FROM salesforce.account ORDER BY id", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let changed: Vec<String> = all.iter().step_by(97).cloned().collect();
    let org = emulator.org.clone();
    let to_change = changed.clone();
    let mut opts = BackfillOptions::new(vec!["Account".to_string()], None);
    opts.bulk_threshold = u64::MAX;
    opts.chunk_rows = 2_000;
    opts.on_chunk = Some(std::sync::Arc::new(move |p| {
        if p.applied == 2_000 {
            for id in &to_change {
                let mut fields = serde_json::Map::new();
                fields.insert(
                    "Description".into(),
                    serde_json::json!("changed during the read"),
                );
                org.update("Account", id, &fields, "test").expect("update");
            }
        }
    }));
    let report = backfill::backfill_with(&cfg, &opts)
        .await
        .expect("backfill");
    let queued: Vec<String> = db
        .client()
        .await
        .query("SELECT record_id FROM sfmirror.repair_queue", &[])
        .await
        .expect("queued")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The daemon's repair worker may have settled some already.
    let repairs = report.objects[0].repairs_queued;
    assert!(
        repairs <= changed.len() as u64,
        "{repairs} repairs for {} changes",
        changed.len()
    );
    for id in &queued {
        assert!(
            changed.contains(id),
            "{id} was not changed during the read but is read again"
        );
    }
    daemon.stop().await;
}
