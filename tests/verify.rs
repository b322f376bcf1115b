//! `sfmirror verify` against the emulator and a real Postgres: drift made by editing the
//! replica in SQL is found (missing, extra, stale, deleted-state), over REST and Bulk API
//! listings alike; `--repair` queues exactly the drifted records; the command line exits 1
//! on drift and 0 when in sync, with a JSON report on request.

use crate::common;
use crate::common::{TestConfig, TestDb};
use serde_json::{Map, Value as J, json};
use sfmirror::config::Config;
use sfmirror::emulator::Emulator;
use sfmirror::sync::backfill;
use sfmirror::sync::verify::{self, DriftKind, VerifyOptions, VerifyReport};
use std::collections::BTreeSet;
use std::time::Duration;

fn config_text(emulator: &Emulator, db: &TestDb, objects: &[&str]) -> String {
    TestConfig::new(emulator, &db.url)
        .channel("/data/ChangeEvents", objects)
        .toml()
}

fn create(emulator: &Emulator, object: &str, value: J) -> String {
    let J::Object(fields) = value else {
        panic!("not an object")
    };
    let fields: Map<String, J> = fields;
    emulator
        .org
        .create(object, &fields, "test")
        .unwrap_or_else(|e| panic!("create {object}: {e:?}"))
}

/// The ids of every kind of drift, as the report names them.
fn ids(report: &VerifyReport, object: &str, kind: DriftKind) -> BTreeSet<String> {
    report
        .object(object)
        .unwrap_or_else(|| panic!("{object} in the report"))
        .kind(kind)
        .examples
        .iter()
        .cloned()
        .collect()
}

struct Org {
    accounts: Vec<String>,
    deleted: String,
    contacts: usize,
}

/// Ten Accounts (one in the recycle bin) backfilled into the replica, and three Contacts
/// that never were.
async fn seeded(emulator: &Emulator, cfg: &Config) -> Org {
    let accounts: Vec<String> = (0..10)
        .map(|i| create(emulator, "Account", json!({"Name": format!("Account {i}")})))
        .collect();
    emulator
        .org
        .delete("Account", &accounts[9], "test")
        .expect("delete");
    for i in 0..3 {
        create(emulator, "Contact", json!({"LastName": format!("Doe {i}")}));
    }
    let report = backfill::backfill(cfg, &["Account".to_string()], None)
        .await
        .expect("backfill");
    assert!(report.is_complete(), "{report:#?}");
    Org {
        deleted: accounts[9].clone(),
        accounts,
        contacts: 3,
    }
}

/// Drift of every kind, made in SQL. Returns the ids by kind.
async fn make_drift(db: &TestDb, org: &Org) -> Vec<(DriftKind, String)> {
    let client = db.client().await;
    let missing = org.accounts[0].clone();
    let stale = org.accounts[1].clone();
    let deleted_here = org.accounts[2].clone();
    let extra = sfmirror::emulator::store::id18("001000000999999");
    client
        .batch_execute(&format!(
            "DELETE FROM salesforce.account WHERE id = '{missing}';
             UPDATE salesforce.account SET _sfm_version = _sfm_version - 5000
               WHERE id = '{stale}';
             UPDATE salesforce.account SET _sfm_deleted = true WHERE id = '{deleted_here}';
             UPDATE salesforce.account SET _sfm_deleted = false WHERE id = '{deleted}';
             INSERT INTO salesforce.account (id, name, _sfm_version)
               VALUES ('{extra}', 'Ghost', 1700000000000);",
            deleted = org.deleted,
        ))
        .await
        .expect("drift");
    vec![
        (DriftKind::Missing, missing),
        (DriftKind::Stale, stale),
        (DriftKind::DeletedMismatch, deleted_here),
        (DriftKind::DeletedMismatch, org.deleted.clone()),
        (DriftKind::Extra, extra),
    ]
}

fn options(repair: bool, bulk_threshold: u64) -> VerifyOptions {
    let mut opts = VerifyOptions::new(Vec::new(), repair);
    opts.bulk_threshold = bulk_threshold;
    opts.recheck_delay = Duration::ZERO;
    opts
}

async fn queued_repairs(db: &TestDb) -> BTreeSet<(String, String, String)> {
    db.client()
        .await
        .query(
            "SELECT object, record_id, channel FROM sfmirror.repair_queue WHERE kind = 'record'",
            &[],
        )
        .await
        .expect("repairs")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_drift_is_found_over_rest_and_bulk_and_repair_queues_it() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg =
        Config::from_toml(&config_text(&emulator, &db, &["Account", "Contact"])).expect("config");
    let org = seeded(&emulator, &cfg).await;

    // Freshly backfilled: Account in sync; Contact has no table, so every contact is missing.
    let report = verify::verify_with(&cfg, &options(false, 10_000))
        .await
        .expect("verify");
    let account = report.object("Account").expect("account");
    assert_eq!(account.drift(), 0, "{account}");
    assert_eq!((account.org_live, account.org_deleted), (9, 1));
    assert_eq!((account.replica_live, account.replica_deleted), (9, 1));
    assert_eq!(account.method, "rest");
    let contact = report.object("Contact").expect("contact");
    assert_eq!(contact.missing.count, org.contacts as u64, "{contact}");
    assert_eq!(contact.drift(), org.contacts as u64);

    let drift = make_drift(&db, &org).await;
    for bulk_threshold in [10_000, 0] {
        let report = verify::verify_with(&cfg, &options(false, bulk_threshold))
            .await
            .expect("verify");
        assert!(report.has_drift() && !report.has_errors());
        let account = report.object("Account").expect("account");
        assert_eq!(
            account.method,
            if bulk_threshold == 0 { "bulk" } else { "rest" }
        );
        assert_eq!(account.drift(), 5, "{account}");
        for kind in [
            DriftKind::Missing,
            DriftKind::Extra,
            DriftKind::Stale,
            DriftKind::DeletedMismatch,
        ] {
            let want: BTreeSet<String> = drift
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, id)| id.clone())
                .collect();
            assert_eq!(ids(&report, "Account", kind), want, "{kind:?}\n{account}");
        }
        assert_eq!((account.org_live, account.org_deleted), (9, 1));
        assert_eq!((account.replica_live, account.replica_deleted), (9, 1));
        assert_eq!(account.repairs_queued, 0);
    }
    assert!(
        queued_repairs(&db).await.is_empty(),
        "no --repair, no repairs"
    );

    // --repair queues one record repair per drifted id, and nothing else.
    let report = verify::verify_with(&cfg, &options(true, 10_000))
        .await
        .expect("verify");
    assert_eq!(report.object("Account").expect("account").repairs_queued, 5);
    let mut want: BTreeSet<(String, String, String)> = drift
        .iter()
        .map(|(_, id)| ("Account".to_string(), id.clone(), "verify".to_string()))
        .collect();
    let contacts: Vec<String> = emulator
        .org
        .records("Contact")
        .iter()
        .filter_map(|r| r["Id"].as_str().map(str::to_string))
        .collect();
    for id in contacts {
        want.insert(("Contact".to_string(), id, "verify".to_string()));
    }
    assert_eq!(queued_repairs(&db).await, want);
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
async fn the_command_line_exits_1_on_drift_and_0_when_in_sync() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let text = config_text(&emulator, &db, &["Account"]);
    let cfg = Config::from_toml(&text).expect("config");
    let org = seeded(&emulator, &cfg).await;
    let dir = std::env::temp_dir().join(format!("sfm-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sfmirror.toml");
    std::fs::write(&path, text).expect("write config");
    let path = path.to_string_lossy().to_string();
    let verify_args = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["verify".to_string(), "--config".to_string(), path.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    let out = run_cli(verify_args(&[])).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Account: in sync"), "{stdout}");

    let drift = make_drift(&db, &org).await;
    let out = run_cli(verify_args(&["--object", "account"])).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("Account: 5 drifted"), "{stdout}");
    for (_, id) in &drift {
        assert!(stdout.contains(id.as_str()), "{id} named in\n{stdout}");
    }
    assert!(
        stderr.contains("verify found drift in 1 object"),
        "{stderr}"
    );

    let out = run_cli(verify_args(&["--json", "--repair"])).await;
    assert_eq!(out.status.code(), Some(1));
    let json: J = serde_json::from_slice(&out.stdout).expect("JSON report");
    let account = &json["objects"][0];
    assert_eq!(account["object"], "Account");
    assert_eq!(account["missing"]["count"], 1);
    assert_eq!(account["extra"]["count"], 1);
    assert_eq!(account["stale"]["count"], 1);
    assert_eq!(account["deleted_mismatch"]["count"], 2);
    assert_eq!(account["repairs_queued"], 5);
    assert_eq!(queued_repairs(&db).await.len(), 5);

    let out = run_cli(verify_args(&["--object", "Lead"])).await;
    assert_eq!(out.status.code(), Some(2), "bad usage");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown object `Lead`"));
    emulator.stop().await;
}
