//! Real-org data shapes (issue 16): snapshots of records the stream already applied read
//! nothing again; person-name `name` columns; derived columns (formulas, person names, fields
//! never sent in change events) re-read after changes and swept on a schedule.

use crate::common::{Daemon, TestConfig, TestDb, wait_for};
use sfmirror::emulator::workload;
use sfmirror::sync::backfill::{self, BackfillOptions};
use std::time::Duration;

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
        async || db.count("SELECT count(*) FROM salesforce.account").await == 10_000,
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
        db.count("SELECT count(*) FROM sfmirror.repair_queue").await,
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
    wait_for("no record waits for a re-read", WAIT, async || {
        let waiting = sfmirror::replica::schema::DERIVED_STALE;
        db.count(&format!(
            "SELECT count(*) FROM salesforce.invoice__c WHERE {waiting}"
        ))
        .await
            == 0
            && db
                .count(&format!(
                    "SELECT count(*) FROM salesforce.contact WHERE {waiting}"
                ))
                .await
                == 0
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
        db.count(&format!(
            "SELECT count(*) FROM salesforce.contact WHERE id = '{contact}' AND _sfm_deleted"
        ))
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

/// A fresh replica with the emulator's `Invoice__c` table (four formula fields) and the
/// settings to write it.
async fn invoice_table() -> (
    TestDb,
    deadpool_postgres::Pool,
    sfmirror::replica::schema::TableSchema,
    sfmirror::replica::ApplySettings,
) {
    let describe: sfmirror::model::ObjectDescribe =
        serde_json::from_str(include_str!("../src/emulator/org/Invoice__c.json"))
            .expect("describe");
    let replica = crate::common::fresh_replica(describe, sfmirror::config::DeleteMode::Soft).await;
    assert!(replica.2.changes_derive());
    replica
}

/// Ids of the rows waiting for a re-read, with the version each waits at, sorted.
async fn waiting(
    pool: &deadpool_postgres::Pool,
    table: &sfmirror::replica::schema::TableSchema,
) -> Vec<(String, i64)> {
    let client = pool.get().await.expect("client");
    let mut w: Vec<(String, i64)> =
        sfmirror::replica::derived::stale(&client, "salesforce", &table.table, 100)
            .await
            .expect("stale")
            .into_iter()
            .map(|s| (s.id, s.version))
            .collect();
    w.sort();
    w
}

/// The obligation to re-read lives in the row: a row the stream wrote waits until a re-read
/// asked for its version is written, a change applied while the read is under way keeps it
/// waiting, and records the org no longer has stop waiting without a write.
#[tokio::test(flavor = "multi_thread")]
async fn a_re_read_marks_rows_read_only_for_the_version_it_saw() {
    let (_db, pool, table, settings) = invoice_table().await;
    let client = pool.get().await.expect("client");
    // As the stream writes rows: versions, no derived values, nothing about re-reads.
    client
        .batch_execute(
            "INSERT INTO salesforce.invoice__c (id, _sfm_version, paid__c)
             VALUES ('a01000000000001AAA', 100, false), ('a01000000000002AAA', 100, false),
                    ('a01000000000003AAA', 100, false)",
        )
        .await
        .expect("stream rows");
    let before = waiting(&pool, &table).await;
    assert_eq!(
        before,
        vec![
            ("a01000000000001AAA".to_string(), 100),
            ("a01000000000002AAA".to_string(), 100),
            ("a01000000000003AAA".to_string(), 100),
        ]
    );
    let stale = sfmirror::replica::derived::stale(&client, "salesforce", &table.table, 100)
        .await
        .expect("stale");
    // While the read is under way, the stream changes the second record.
    client
        .batch_execute(
            "UPDATE salesforce.invoice__c SET _sfm_version = 200, paid__c = true
             WHERE id = 'a01000000000002AAA'",
        )
        .await
        .expect("stream change");
    // The org answers for the first two; the third is gone from it.
    let projection = table.derived_projection();
    let rows: Vec<_> = ["a01000000000001AAA", "a01000000000002AAA"]
        .iter()
        .map(|id| {
            sfmirror::replica::snapshot::row_from_json(
                &projection,
                &serde_json::json!({"Id": id, "Amount_Due__c": 42, "Summary__c": "read",
                    "Days_Overdue__c": 3, "Account_Name__c": "Acme"}),
            )
            .expect("row")
        })
        .collect();
    let mut client = pool.get().await.expect("client");
    let tx = client.transaction().await.expect("tx");
    let (written, settled) =
        sfmirror::replica::derived::refresh(&tx, &settings, &projection, &rows, 1_000, &stale)
            .await
            .expect("refresh");
    tx.commit().await.expect("commit");
    assert_eq!(
        (written, settled),
        (1, 2),
        "one written, one gone from the org"
    );
    assert_eq!(
        waiting(&pool, &table).await,
        vec![("a01000000000002AAA".to_string(), 200)],
        "the record changed during the read waits for another"
    );
    let got: Vec<(String, Option<String>, bool)> = client
        .query(
            "SELECT id, summary__c, paid__c FROM salesforce.invoice__c ORDER BY id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "a01000000000001AAA".to_string(),
                Some("read".to_string()),
                false
            ),
            ("a01000000000002AAA".to_string(), None, true),
            ("a01000000000003AAA".to_string(), None, false),
        ],
        "only derived columns are written, and only where the version still held"
    );
    // A sweep that began (by Salesforce's clock) after the change covers it.
    let tx = client.transaction().await.expect("tx");
    sfmirror::replica::derived::apply(&tx, &settings, &projection, &rows[1..], 2_000)
        .await
        .expect("sweep");
    tx.commit().await.expect("commit");
    assert!(waiting(&pool, &table).await.is_empty());
    // A snapshot brings derived values with the record: its rows wait for nothing.
    let snap = sfmirror::replica::snapshot::row_from_json(
        &table,
        &serde_json::json!({"Id": "a01000000000004AAA", "Name": "INV-4", "Paid__c": false,
            "Summary__c": "INV-4 (Open)", "SystemModstamp": "2026-01-02T02:50:45.000+0000"}),
    )
    .expect("snapshot row");
    let tx = client.transaction().await.expect("tx");
    sfmirror::replica::snapshot::apply_snapshot(&tx, &settings, &table, &[snap], Some(3_000))
        .await
        .expect("snapshot");
    tx.commit().await.expect("commit");
    assert!(waiting(&pool, &table).await.is_empty());
}

/// A replica made before re-reads were marked in the rows: when the table gains the marker,
/// its rows count as read, and the records the first queue still held wait for a re-read.
#[tokio::test(flavor = "multi_thread")]
async fn re_reads_queued_by_an_older_version_are_kept() {
    let (db, pool, table, settings) = invoice_table().await;
    let client = pool.get().await.expect("client");
    client
        .batch_execute(
            "ALTER TABLE salesforce.invoice__c DROP COLUMN _sfm_derived_seen;
             INSERT INTO salesforce.invoice__c (id, _sfm_version)
             VALUES ('a01000000000001AAA', 100), ('a01000000000002AAA', 100);
             INSERT INTO sfmirror.derived_refresh (object, record_id)
             VALUES ('Invoice__c', 'a01000000000002AAA');",
        )
        .await
        .expect("an older replica");
    table.ensure(&client, "salesforce").await.expect("ensure");
    assert!(waiting(&pool, &table).await.is_empty());
    let moved = sfmirror::replica::derived::adopt_queue(&client, &settings, &table)
        .await
        .expect("adopt");
    assert_eq!(moved, 1);
    assert_eq!(
        waiting(&pool, &table).await,
        vec![("a01000000000002AAA".to_string(), 100)]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM sfmirror.derived_refresh")
            .await,
        0
    );
}
