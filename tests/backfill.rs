//! `sfmirror backfill` against the emulator and a real Postgres: every object and field type
//! over REST and over Bulk API 2.0, `--since` windows, 200,000 rows over Bulk, resuming an
//! interrupted run from its Bulk job's locator, and the command line's exit codes.

use crate::common;
use crate::common::{TestConfig, TestDb, object_drift};
use serde_json::{Map, Value as J, json};
use sfmirror::config::Config;
use sfmirror::emulator::Emulator;
use sfmirror::sync::backfill::{self, BackfillError, BackfillOptions, Method, Progress};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const OBJECTS: &[&str] = &["Account", "Contact", "Opportunity", "Invoice__c"];

fn config_text(
    emulator: &Emulator,
    db: &TestDb,
    data: &str,
    control: &str,
    objects: &[&str],
) -> String {
    TestConfig::new(emulator, &db.url)
        .replica("schema", data)
        .replica("control_schema", control)
        .channel("/data/ChangeEvents", objects)
        .toml()
}

fn config(emulator: &Emulator, db: &TestDb, data: &str, control: &str, objects: &[&str]) -> Config {
    Config::from_toml(&config_text(emulator, db, data, control, objects)).expect("config")
}

fn fields(value: J) -> Map<String, J> {
    match value {
        J::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

fn create(emulator: &Emulator, object: &str, value: J) -> String {
    emulator
        .org
        .create(object, &fields(value), "test")
        .unwrap_or_else(|e| panic!("create {object}: {e:?}"))
}

/// A small org with every object and field type, some records deleted.
fn seed_every_object(emulator: &Emulator) {
    let mut accounts = Vec::new();
    for i in 0..25 {
        accounts.push(create(
            emulator,
            "Account",
            json!({"Name": format!("Account {i}"), "BillingCity": "Paris",
                   "BillingStreet": format!("{i} rue de Rivoli\nBâtiment B"),
                   "BillingLatitude": 48.8566, "NumberOfEmployees": i,
                   "AnnualRevenue": 1000 * i, "Description": "quote \" comma , tab \t end",
                   "Rating": if i % 2 == 0 { "Hot" } else { "Cold" }}),
        ));
    }
    for (i, account) in accounts.iter().enumerate().take(10) {
        create(
            emulator,
            "Contact",
            json!({"LastName": format!("Doe {i}"), "FirstName": "Jane",
                   "AccountId": account, "MailingCity": "Lyon", "Email": "jane@example.com"}),
        );
    }
    for (i, account) in accounts.iter().enumerate().take(6) {
        create(
            emulator,
            "Opportunity",
            json!({"Name": format!("Deal {i}"), "StageName": "Prospecting",
                   "CloseDate": "2026-06-30", "Amount": 1500.25, "AccountId": account}),
        );
    }
    create(
        emulator,
        "Invoice__c",
        json!({
            "Name": "INV-0001", "Account__c": accounts[0], "Status__c": "Sent",
            "Tags__c": "Urgent;Export", "Channel__c": "Web", "Memo__c": "short memo",
            "Notes__c": "long\nnotes ".repeat(300), "Contact_Phone__c": "+1 555 0100",
            "Portal_Url__c": "https://billing.example/inv/1",
            "Billing_Email__c": "ap@example.com", "Tax_Id__c": "FR-123", "Paid__c": true,
            "Line_Count__c": 12, "Sequence__c": 9_007_199_254_740_993i64,
            "Exchange_Rate__c": 1.084512, "Total__c": 12345.67, "Discount__c": 7.5,
            "Due_Date__c": "2027-01-31", "Sent_At__c": "2026-11-20T08:15:30.000+0000",
            "Cutoff_Time__c": "17:30:00.000Z", "Attachment__c": "SGVsbG8sIHdvcmxkIQ==",
            "Site__Latitude__s": 48.8566, "Site__Longitude__s": 2.3522
        }),
    );
    create(emulator, "Invoice__c", json!({"Name": "INV-EMPTY"}));
    for id in &accounts[20..23] {
        emulator
            .org
            .delete("Account", id, "test")
            .expect("delete account");
    }
}

async fn assert_no_drift(emulator: &Emulator, db: &TestDb, schema: &str, objects: &[&str]) {
    for object in objects {
        let drift = object_drift(emulator, db, schema, object).await;
        assert!(drift.is_empty(), "{object} drifted: {drift:#?}");
    }
}

struct SyncState {
    started: Option<String>,
    completed: bool,
    rows: Option<i64>,
    running_started: bool,
    job: Option<String>,
    locator: Option<String>,
}

async fn sync_state(db: &TestDb, control: &str, object: &str) -> Option<SyncState> {
    let client = db.client().await;
    client
        .query_opt(
            &format!(
                "SELECT snapshot_started_at::text, snapshot_completed_at IS NOT NULL,
                        snapshot_rows, running_started_at IS NOT NULL, running_job_id,
                        running_locator
                 FROM {control}.object_sync_state WHERE object = $1"
            ),
            &[&object],
        )
        .await
        .expect("sync state")
        .map(|r| SyncState {
            started: r.get(0),
            completed: r.get(1),
            rows: r.get(2),
            running_started: r.get(3),
            job: r.get(4),
            locator: r.get(5),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_object_and_field_type_arrives_over_rest_and_over_bulk() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    seed_every_object(&emulator);

    // Small objects: REST query paging.
    let cfg = config(&emulator, &db, "salesforce", "sfmirror", OBJECTS);
    let report = backfill::backfill(&cfg, &[], None).await.expect("backfill");
    assert!(report.is_complete(), "{report:#?}");
    assert_eq!(report.objects.len(), OBJECTS.len());
    for o in &report.objects {
        assert_eq!(o.method, Some(Method::Rest), "{o}");
    }
    assert_eq!(report.object("Account").expect("account").rows_applied, 25);
    assert_no_drift(&emulator, &db, "salesforce", OBJECTS).await;
    // Records in the recycle bin arrive as soft deletions.
    assert_eq!(
        db.count("SELECT count(*) FROM salesforce.account WHERE _sfm_deleted")
            .await,
        3
    );
    for object in OBJECTS {
        let state = sync_state(&db, "sfmirror", object).await.expect("state");
        assert!(state.started.is_some() && state.completed, "{object}");
        assert!(!state.running_started && state.job.is_none() && state.locator.is_none());
    }
    assert_eq!(
        sync_state(&db, "sfmirror", "Account")
            .await
            .expect("state")
            .rows,
        Some(25)
    );

    // The same org over Bulk API 2.0 into other schemas: CSV for every field type.
    let cfg = config(&emulator, &db, "bulk_data", "bulk_ctl", OBJECTS);
    let mut opts = BackfillOptions::new(Vec::new(), None);
    opts.bulk_threshold = 0;
    opts.chunk_rows = 7;
    opts.progress = Progress::Log;
    opts.bulk_poll = (Duration::from_millis(20), Duration::from_millis(100));
    let report = backfill::backfill_with(&cfg, &opts)
        .await
        .expect("backfill");
    assert!(report.is_complete(), "{report:#?}");
    for o in &report.objects {
        assert_eq!(o.method, Some(Method::Bulk), "{o}");
        assert!(o.job_id.is_some(), "{o}");
    }
    assert_no_drift(&emulator, &db, "bulk_data", OBJECTS).await;
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT sequence__c, cutoff_time__c::text, attachment__c, tags__c
             FROM bulk_data.invoice__c WHERE name = 'INV-0001'",
            &[],
        )
        .await
        .expect("invoice");
    assert_eq!(row.get::<_, i64>(0), 9_007_199_254_740_993);
    assert_eq!(row.get::<_, String>(1), "17:30:00");
    assert_eq!(row.get::<_, Vec<u8>>(2), b"Hello, world!");
    assert_eq!(row.get::<_, String>(3), "Urgent;Export");
    // A second run changes nothing and needs no repairs: the version guard holds.
    let report = backfill::backfill_with(&cfg, &opts).await.expect("again");
    assert!(report.is_complete());
    assert!(report.objects.iter().all(|o| o.repairs_queued == 0));
    assert_no_drift(&emulator, &db, "bulk_data", OBJECTS).await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_reads_only_the_window_and_moves_the_snapshot_start_only_when_covered() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let old: Vec<String> = (0..5)
        .map(|i| create(&emulator, "Account", json!({"Name": format!("Old {i}")})))
        .collect();
    // SystemModstamp has whole seconds: let the next second start.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = chrono::DateTime::from_timestamp_millis(emulator.org.now_ms()).expect("now");
    let new: Vec<String> = (0..3)
        .map(|i| create(&emulator, "Account", json!({"Name": format!("New {i}")})))
        .collect();

    let cfg = config(&emulator, &db, "salesforce", "sfmirror", &["Account"]);
    let report = backfill::backfill(&cfg, &[], Some(since))
        .await
        .expect("backfill");
    assert!(report.is_complete(), "{report:#?}");
    let client = db.client().await;
    let mut ids: Vec<String> = client
        .query("SELECT id FROM salesforce.account ORDER BY id", &[])
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    ids.sort();
    let mut want = new.clone();
    want.sort();
    assert_eq!(ids, want, "only records changed since {since}");
    assert!(old.iter().all(|id| !ids.contains(id)));
    // Nothing says the older records are in the replica: no snapshot start yet.
    let state = sync_state(&db, "sfmirror", "Account").await.expect("state");
    assert!(state.started.is_none() && state.completed);
    assert_eq!(state.rows, Some(3));

    // A full snapshot, then a window reaching back before it: the start moves on.
    let report = backfill::backfill(&cfg, &["account".to_string()], None)
        .await
        .expect("full");
    assert!(report.is_complete());
    assert_no_drift(&emulator, &db, "salesforce", &["Account"]).await;
    let full_start = sync_state(&db, "sfmirror", "Account")
        .await
        .and_then(|s| s.started)
        .expect("full snapshot start");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = backfill::backfill(&cfg, &[], Some(since - chrono::Duration::days(1)))
        .await
        .expect("covering window");
    assert!(report.is_complete());
    let covered_start = sync_state(&db, "sfmirror", "Account")
        .await
        .and_then(|s| s.started)
        .expect("start");
    assert_ne!(
        covered_start, full_start,
        "a covering window moves the start"
    );
    // A window that starts after the last snapshot's start leaves it where it was.
    let report = backfill::backfill(
        &cfg,
        &[],
        Some(chrono::Utc::now() + chrono::Duration::days(1)),
    )
    .await
    .expect("later window");
    assert!(report.is_complete());
    assert_eq!(report.objects[0].rows_applied, 0);
    let state = sync_state(&db, "sfmirror", "Account").await.expect("state");
    assert_eq!(state.started.as_deref(), Some(covered_start.as_str()));
    assert_eq!(state.rows, Some(0));
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_accounts_over_bulk() {
    const N: usize = 200_000;
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let t0 = Instant::now();
    let org = emulator.org.clone();
    let ids = tokio::task::spawn_blocking(move || {
        let base = fields(json!({
            "BillingCity": "Springfield", "BillingState": "IL", "BillingCountry": "USA",
            "Website": "https://example.com", "Industry": "Energy", "Rating": "Warm",
            "Type": "Customer",
        }));
        (0..N)
            .map(|i| {
                let mut record = base.clone();
                for (k, v) in [
                    ("Name", json!(format!("Account {i:06}"))),
                    ("AccountNumber", json!(format!("AN-{i}"))),
                    ("BillingStreet", json!(format!("{i} Main Street"))),
                    ("BillingPostalCode", json!(format!("{:05}", i % 99_999))),
                    ("Phone", json!(format!("+1 555 {:04}", i % 10_000))),
                    ("NumberOfEmployees", json!(i % 5_000)),
                    ("AnnualRevenue", json!(i * 10)),
                    ("Description", json!(format!("row {i}"))),
                ] {
                    record.insert(k.to_string(), v);
                }
                org.create_silently("Account", &record)
                    .unwrap_or_else(|e| panic!("create: {e:?}"))
            })
            .collect::<Vec<String>>()
    })
    .await
    .expect("seed");
    eprintln!("seeded {N} accounts in {:.1} s", t0.elapsed().as_secs_f64());

    let cfg = config(&emulator, &db, "salesforce", "sfmirror", &["Account"]);
    let mut opts = BackfillOptions::new(Vec::new(), None);
    opts.progress = Progress::Log;
    opts.bulk_poll = (Duration::from_millis(20), Duration::from_millis(200));
    let t1 = Instant::now();
    let report = backfill::backfill_with(&cfg, &opts)
        .await
        .expect("backfill");
    let secs = t1.elapsed().as_secs_f64();
    assert!(report.is_complete(), "{report:#?}");
    let account = report.object("Account").expect("account");
    assert_eq!(account.method, Some(Method::Bulk));
    assert_eq!(account.rows_applied, N as u64);
    eprintln!(
        "backfilled {N} accounts over Bulk API in {secs:.1} s: {:.0} rows/s (debug build)",
        N as f64 / secs
    );
    assert_eq!(
        db.count("SELECT count(*) FROM salesforce.account").await,
        N as i64
    );
    assert_eq!(
        sync_state(&db, "sfmirror", "Account")
            .await
            .expect("state")
            .rows,
        Some(N as i64)
    );
    // A sample of rows, field by field.
    let client = db.client().await;
    for i in (0..N).step_by(9_973) {
        let row = client
            .query_one(
                "SELECT name, billingstreet, billingpostalcode, numberofemployees,
                        annualrevenue::float8, description, _sfm_deleted
                 FROM salesforce.account WHERE id = $1",
                &[&ids[i]],
            )
            .await
            .unwrap_or_else(|e| panic!("row {i}: {e}"));
        assert_eq!(row.get::<_, String>(0), format!("Account {i:06}"));
        assert_eq!(row.get::<_, String>(1), format!("{i} Main Street"));
        assert_eq!(row.get::<_, String>(2), format!("{:05}", i % 99_999));
        assert_eq!(row.get::<_, i32>(3), (i % 5_000) as i32);
        assert_eq!(row.get::<_, f64>(4), (i * 10) as f64);
        assert_eq!(row.get::<_, String>(5), format!("row {i}"));
        assert!(!row.get::<_, bool>(6));
    }
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_bulk_backfill_resumes_from_its_locator() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    for i in 0..1_000 {
        create(
            &emulator,
            "Account",
            json!({"Name": format!("Account {i}")}),
        );
    }
    let cfg = config(&emulator, &db, "salesforce", "sfmirror", &["Account"]);
    let options = |chunks: Arc<AtomicUsize>, stop_after: Option<usize>| {
        let mut opts = BackfillOptions::new(vec!["Account".to_string()], None);
        opts.bulk_threshold = 0;
        opts.chunk_rows = 100;
        opts.progress = Progress::Quiet;
        opts.bulk_poll = (Duration::from_millis(20), Duration::from_millis(100));
        let cancel = opts.cancel.clone();
        opts.on_chunk = Some(Arc::new(move |_| {
            let n = chunks.fetch_add(1, Ordering::SeqCst) + 1;
            if stop_after == Some(n) {
                cancel.cancel();
            }
        }));
        opts
    };

    // Stopped after its first chunk: interrupted, with the job and next locator recorded.
    let chunks = Arc::new(AtomicUsize::new(0));
    let report = backfill::backfill_with(&cfg, &options(chunks.clone(), Some(1)))
        .await
        .expect("backfill");
    assert!(!report.is_complete());
    let first = report.object("Account").expect("account");
    assert!(
        matches!(first.error, Some(BackfillError::Interrupted { .. })),
        "{first}"
    );
    assert_eq!(first.rows_applied, 100);
    let job = first.job_id.clone().expect("job");
    let state = sync_state(&db, "sfmirror", "Account").await.expect("state");
    assert!(state.running_started && !state.completed);
    assert_eq!(state.job.as_deref(), Some(job.as_str()));
    assert!(state.locator.is_some(), "the next chunk's locator");
    assert_eq!(
        db.count("SELECT count(*) FROM salesforce.account").await,
        100
    );

    // The next run picks the same job up at the recorded locator.
    let chunks = Arc::new(AtomicUsize::new(0));
    let report = backfill::backfill_with(&cfg, &options(chunks.clone(), None))
        .await
        .expect("resume");
    assert!(report.is_complete(), "{report:#?}");
    let resumed = report.object("Account").expect("account");
    assert!(resumed.resumed, "{resumed}");
    assert_eq!(resumed.job_id.as_deref(), Some(job.as_str()));
    assert_eq!(resumed.rows_applied, 900);
    assert_eq!(resumed.total_rows, 1_000);
    assert_eq!(chunks.load(Ordering::SeqCst), 9);
    assert_no_drift(&emulator, &db, "salesforce", &["Account"]).await;
    let state = sync_state(&db, "sfmirror", "Account").await.expect("state");
    assert!(state.completed && state.started.is_some());
    assert_eq!(state.rows, Some(1_000));
    assert!(!state.running_started && state.job.is_none() && state.locator.is_none());

    // Interrupted again, and the job is gone by the next run: the object starts over.
    let chunks = Arc::new(AtomicUsize::new(0));
    let report = backfill::backfill_with(&cfg, &options(chunks.clone(), Some(2)))
        .await
        .expect("backfill");
    assert!(!report.is_complete());
    db.client()
        .await
        .execute(
            "UPDATE sfmirror.object_sync_state SET running_job_id = '7505g0000000000AAA'",
            &[],
        )
        .await
        .expect("forget the job");
    let chunks = Arc::new(AtomicUsize::new(0));
    let report = backfill::backfill_with(&cfg, &options(chunks.clone(), None))
        .await
        .expect("restart");
    assert!(report.is_complete(), "{report:#?}");
    let restarted = report.object("Account").expect("account");
    assert!(!restarted.resumed);
    assert_eq!(restarted.rows_applied, 1_000);
    assert_ne!(restarted.job_id.as_deref(), Some(job.as_str()));
    assert_no_drift(&emulator, &db, "salesforce", &["Account"]).await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_backfill_of_an_object_is_refused_while_one_runs() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    for i in 0..3 {
        create(
            &emulator,
            "Account",
            json!({"Name": format!("Account {i}")}),
        );
    }
    let cfg = config(&emulator, &db, "salesforce", "sfmirror", &["Account"]);
    // What a running backfill of Account holds.
    let holder = db.client().await;
    holder
        .execute(
            "SELECT pg_advisory_lock(hashtext('sfmirror backfill salesforce.Account'))",
            &[],
        )
        .await
        .expect("lock");
    let report = backfill::backfill(&cfg, &[], None).await.expect("backfill");
    let account = report.object("Account").expect("account");
    assert!(
        matches!(account.error, Some(BackfillError::Busy { .. })),
        "{account}"
    );
    assert_eq!(account.attempts, 1, "refusal is definite");
    holder
        .execute("SELECT pg_advisory_unlock_all()", &[])
        .await
        .expect("unlock");
    let report = backfill::backfill(&cfg, &[], None).await.expect("backfill");
    assert!(report.is_complete(), "{report:#?}");
    assert_no_drift(&emulator, &db, "salesforce", &["Account"]).await;
    emulator.stop().await;
}

fn sfmirror() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_sfmirror"))
}

async fn run_cli(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || sfmirror().args(&args).output().expect("runs"))
        .await
        .expect("joined")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_reports_each_object_and_exits_1_when_one_fails() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    seed_every_object(&emulator);
    let dir = std::env::temp_dir().join(format!("sfm-backfill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sfmirror.toml");
    std::fs::write(
        &path,
        config_text(
            &emulator,
            &db,
            "salesforce",
            "sfmirror",
            // Lead is not in the emulator's org: its describe fails.
            &["Account", "Lead"],
        ),
    )
    .expect("write config");
    let path = path.to_string_lossy().to_string();

    for command in ["backfill", "verify"] {
        let out = run_cli(vec![command.into(), "--help".into()]).await;
        assert!(out.status.success(), "{command} --help");
        assert!(String::from_utf8_lossy(&out.stdout).contains("--object"));
    }

    // Lead does not exist in this org: Account completes, Lead fails, exit 1.
    let out = run_cli(vec!["backfill".into(), "--config".into(), path.clone()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("Account: 25 rows via REST query"),
        "{stdout}"
    );
    assert!(
        stderr.contains("backfill of Lead") && stderr.contains("NOT_FOUND"),
        "{stderr}"
    );
    assert!(
        stderr.contains("1 of 2 object(s) did not complete"),
        "{stderr}"
    );

    let out = run_cli(vec![
        "backfill".into(),
        "--config".into(),
        path.clone(),
        "--object".into(),
        "Account".into(),
        "--bulk-threshold".into(),
        "0".into(),
        "--since".into(),
        "2000-01-01T00:00:00Z".into(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("Account: 25 rows via Bulk API 2.0"),
        "{stdout}"
    );
    assert_no_drift(&emulator, &db, "salesforce", &["Account"]).await;

    let out = run_cli(vec![
        "backfill".into(),
        "--config".into(),
        path.clone(),
        "--object".into(),
        "Opportunity".into(),
    ])
    .await;
    // Bad usage: the object is not one the configuration carries.
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown object `Opportunity`") && stderr.contains("Account, Lead"),
        "{stderr}"
    );

    let out = run_cli(vec![
        "backfill".into(),
        "--config".into(),
        path,
        "--since".into(),
        "yesterday".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "a bad --since is bad usage");
    emulator.stop().await;
}
