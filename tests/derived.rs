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

fn fields(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// One text value of a replica row (`None` for NULL, no row, or no table yet).
async fn text(db: &TestDb, sql: &str, id: &str) -> Option<String> {
    db.client()
        .await
        .query_opt(sql, &[&id])
        .await
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<String>>(0))
}

const WAIT: Duration = Duration::from_secs(60);

/// Formulas and person names: change events never carry them, so they are re-read a window
/// after any change to their record; a formula that reads the parent changes with no event on
/// the record and is caught by the sweep. The stream's own columns are never overwritten.
#[tokio::test(flavor = "multi_thread")]
async fn derived_columns_are_re_read_after_changes_and_swept() {
    let emulator = crate::common::emulator().await;
    let db = TestDb::create().await;
    let cfg = TestConfig::new(&emulator, &db.url)
        .channel("/data/ChangeEvents", &["Account", "Contact", "Invoice__c"])
        .sync("derived_refresh_window_secs", 1)
        .sync("derived_sweep_interval_secs", 4)
        .build();
    let daemon = Daemon::start(&emulator, &cfg).await;
    let org = &emulator.org;
    let account = org
        .create(
            "Account",
            &fields(serde_json::json!({"Name": "Acme"})),
            "test",
        )
        .expect("account");
    let invoice = org
        .create(
            "Invoice__c",
            &fields(serde_json::json!({"Name": "INV-1", "Account__c": account,
                "Total__c": 100, "Exchange_Rate__c": 2, "Paid__c": false,
                "Status__c": "Open"})),
            "test",
        )
        .expect("invoice");
    let contact = org
        .create(
            "Contact",
            &fields(
                serde_json::json!({"FirstName": "Ada", "LastName": "Lovelace",
                "Salutation": "Ms."}),
            ),
            "test",
        )
        .expect("contact");
    let due = "SELECT amount_due__c::text FROM salesforce.invoice__c WHERE id = $1";
    let summary = "SELECT summary__c FROM salesforce.invoice__c WHERE id = $1";
    let parent = "SELECT account_name__c FROM salesforce.invoice__c WHERE id = $1";
    let name = "SELECT name FROM salesforce.contact WHERE id = $1";
    wait_for(
        "formulas and the person name read after the creates",
        WAIT,
        async || {
            text(&db, due, &invoice)
                .await
                .as_deref()
                .map(|v| v.parse::<f64>().ok())
                == Some(Some(200.0))
                && text(&db, summary, &invoice).await.as_deref() == Some("INV-1 (Open)")
                && text(&db, parent, &invoice).await.as_deref() == Some("Acme")
                && text(&db, name, &contact).await.as_deref() == Some("Ada Lovelace")
        },
    )
    .await;

    // An update of the fields a formula reads: re-read, and the stream's columns stay its own.
    org.update(
        "Invoice__c",
        &invoice,
        &fields(serde_json::json!({"Paid__c": true})),
        "test",
    )
    .expect("pay");
    org.update(
        "Contact",
        &contact,
        &fields(serde_json::json!({"LastName": "King"})),
        "test",
    )
    .expect("rename");
    wait_for("re-read after the updates", WAIT, async || {
        text(&db, due, &invoice)
            .await
            .as_deref()
            .map(|v| v.parse::<f64>().ok())
            == Some(Some(0.0))
            && text(&db, name, &contact).await.as_deref() == Some("Ada King")
    })
    .await;
    let paid = "SELECT paid__c::text FROM salesforce.invoice__c WHERE id = $1";
    assert_eq!(text(&db, paid, &invoice).await.as_deref(), Some("true"));
    wait_for("the re-read queue drains", WAIT, async || {
        count(&db, "SELECT count(*) FROM sfmirror.derived_refresh").await == 0
    })
    .await;

    // The parent's name changes: no event on the invoice, the sweep catches it.
    org.update(
        "Account",
        &account,
        &fields(serde_json::json!({"Name": "Acme Ltd"})),
        "test",
    )
    .expect("rename account");
    wait_for("the sweep re-reads the parent's name", WAIT, async || {
        text(&db, parent, &invoice).await.as_deref() == Some("Acme Ltd")
    })
    .await;
    let status = sfmirror::sync::status::status(&cfg).await.expect("status");
    let invoices = status
        .derived
        .iter()
        .find(|d| d.object == "Invoice__c")
        .expect("status shows Invoice__c's derived columns");
    assert!(invoices.last_sweep_completed_at.is_some(), "{status}");
    assert!(status.to_string().contains("derived columns:"), "{status}");

    // A deleted record is never written again by a re-read.
    org.delete("Contact", &contact, "test").expect("delete");
    wait_for("the delete", WAIT, async || {
        count(
            &db,
            &format!(
                "SELECT count(*) FROM salesforce.contact WHERE id = '{contact}' AND _sfm_deleted"
            ),
        )
        .await
            == 1
    })
    .await;
    daemon.stop().await;
}

/// A person-account org: person accounts' `Name` is derived from the person's name parts, a
/// business account's is its own; both reach the `name` column.
#[tokio::test(flavor = "multi_thread")]
async fn person_accounts_get_their_derived_name() {
    let emulator = sfmirror::emulator::Emulator::start(sfmirror::emulator::EmulatorConfig {
        person_accounts: true,
        ..Default::default()
    })
    .await
    .expect("a person-account emulator");
    let db = TestDb::create().await;
    let cfg = TestConfig::new(&emulator, &db.url)
        .channel("/data/AccountChangeEvent", &["Account"])
        .sync("derived_refresh_window_secs", 1)
        .build();
    let daemon = Daemon::start(&emulator, &cfg).await;
    let org = &emulator.org;
    let person = org
        .create(
            "Account",
            &fields(serde_json::json!({"RecordTypeId": "0125g000000PAccAAG",
                "FirstName": "Grace", "MiddleName": "Brewster", "LastName": "Hopper",
                "Suffix": "PhD", "Salutation": "Dr."})),
            "test",
        )
        .expect("person account");
    let business = org
        .create(
            "Account",
            &fields(serde_json::json!({"Name": "Initech"})),
            "test",
        )
        .expect("business account");
    let name = "SELECT name FROM salesforce.account WHERE id = $1";
    wait_for("both names", WAIT, async || {
        text(&db, name, &person).await.as_deref() == Some("Grace Brewster Hopper PhD")
            && text(&db, name, &business).await.as_deref() == Some("Initech")
    })
    .await;
    let flag = "SELECT ispersonaccount::text FROM salesforce.account WHERE id = $1";
    assert_eq!(text(&db, flag, &person).await.as_deref(), Some("true"));
    daemon.stop().await;
}
