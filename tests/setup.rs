//! The set-up every command shares, and the error policy at its edges: connecting never
//! migrates (`check` leaves a fresh replica as it found it), a Postgres login that is refused
//! is a definite error, and a repair that fails definitely is parked (kept with its error,
//! never retried) until the operator requeues it or the configuration changes.

use crate::common;
use crate::common::{TestConfig, TestDb};
use serde_json::{Map, Value as J, json};
use sfmirror::replica::migrate;
use sfmirror::replica::repair_queue::{self, RepairRequest};
use sfmirror::sync::reader::OrgReader;
use sfmirror::sync::repair::RepairWorker;
use sfmirror::sync::setup::{self, Setup};
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn config_file(text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sfm-setup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join(format!("{}.toml", rand::random::<u32>()));
    std::fs::write(&path, text).expect("write config");
    path
}

fn sfmirror(args: &[&str], config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sfmirror"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_connecting_leave_a_fresh_replica_unmigrated() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = TestConfig::new(&emulator, &db.url).channel("/data/AccountChangeEvent", &["Account"]);
    let out = sfmirror(&["check"], &config_file(&cfg.toml()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("would create schema sfmirror"), "{stdout}");
    assert!(
        stdout.contains("would create schema salesforce"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "would apply {} migrations",
            migrate::MIGRATIONS.len()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("logged in"), "{stdout}");

    let replica = Setup::connect(&cfg.build()).await.expect("connect");
    let client = replica.pool.get().await.expect("client");
    let state = migrate::state(&client, "sfmirror").await.expect("state");
    assert!(matches!(state, migrate::State::Absent { .. }), "{state}");
    let schemas: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('sfmirror', 'salesforce')",
            &[],
        )
        .await
        .expect("schemas")
        .get(0);
    assert_eq!(schemas, 0, "check and connect create nothing");

    replica.migrate().await.expect("migrate");
    let state = migrate::state(&client, "sfmirror").await.expect("state");
    assert_eq!(
        state,
        migrate::State::Migrated {
            schema: "sfmirror".to_string(),
            applied: migrate::MIGRATIONS.len()
        }
    );
    emulator.stop().await;
}

#[tokio::test]
async fn a_refused_postgres_login_is_definite() {
    let db = TestDb::create().await;
    // The test server trusts every role it has; this one does not exist.
    let url = db.url.replacen("postgres@", "no_such_role_here@", 1);
    assert_ne!(url, db.url, "the test URL names its user: {}", db.url);
    let cfg = sfmirror::config::Config::from_toml(&format!(
        r#"
        [salesforce]
        auth = "client_credentials"
        client_id = "x"
        client_secret = "y"
        [replica]
        url = "{url}"
        [[channels]]
        name = "/data/AccountChangeEvent"
        objects = ["Account"]
        "#
    ))
    .expect("config");
    let err = match Setup::connect(&cfg).await {
        Ok(_) => panic!("a role that does not exist logged in"),
        Err(e) => e,
    };
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("no_such_role_here"), "{err}");
}

/// A repair of an object the org does not have cannot succeed by retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_that_fails_definitely_is_parked_until_requeued() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let text = TestConfig::new(&emulator, &db.url)
        .channel("/data/ChangeEvents", &["Account"])
        .toml();
    let cfg = sfmirror::config::Config::from_toml(&text).expect("config");
    let replica = Setup::connect(&cfg).await.expect("connect");
    replica.migrate().await.expect("migrate");
    let fields: Map<String, J> = match json!({"Name": "repaired"}) {
        J::Object(m) => m,
        _ => unreachable!(),
    };
    let account = emulator
        .org
        .create("Account", &fields, "test")
        .expect("account");
    let client = replica.pool.get().await.expect("client");
    let enqueue = async |object: &str, id: &str| {
        let request = RepairRequest::Record {
            object: object.to_string(),
            id: id.to_string(),
            reason: "test".to_string(),
        };
        repair_queue::enqueue(&client, "sfmirror", "test", None, &[request])
            .await
            .expect("enqueue");
    };
    enqueue("Account", &account).await;
    enqueue("NoSuchThing__c", "a00000000000001AAA").await;

    let salesforce = setup::login(&cfg).await.expect("login");
    let reader = OrgReader::new(
        salesforce.rest.clone(),
        salesforce.bulk.clone(),
        cfg.sync.retry_backoff(),
        CancellationToken::new(),
    );
    let mut worker = RepairWorker::new(
        reader,
        replica.pool.clone(),
        replica.settings.clone(),
        Duration::from_millis(50),
    )
    .with_config("first".to_string());
    assert_eq!(worker.drain_once().await.expect("drain"), 2);

    let summary = repair_queue::summary(&client, "sfmirror", true)
        .await
        .expect("summary");
    assert_eq!(summary.len(), 1, "the Account repair is done: {summary:?}");
    let parked = &summary[0];
    assert_eq!(
        (parked.object.as_str(), parked.parked),
        ("NoSuchThing__c", 1)
    );
    assert!(
        parked
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("NoSuchThing__c")),
        "{parked:?}"
    );
    let name: String = client
        .query_one(
            "SELECT name FROM salesforce.account WHERE id = $1",
            &[&account],
        )
        .await
        .expect("repaired row")
        .get(0);
    assert_eq!(name, "repaired");

    // Parked: not tried again, and a new request for it is folded in and waits too.
    assert_eq!(worker.drain_once().await.expect("drain"), 0);
    enqueue("NoSuchThing__c", "a00000000000001AAA").await;
    assert_eq!(worker.drain_once().await.expect("drain"), 0);

    // `status` shows it, and the operator requeues it.
    let path = config_file(&text);
    let out = sfmirror(&["status"], &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 parked"), "{stdout}");
    let out = sfmirror(&["requeue"], &path);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("requeued 1 parked repair(s)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(worker.drain_once().await.expect("drain"), 1, "due again");

    // Parked again; the same configuration leaves it parked, another one requeues it.
    assert_eq!(replica.requeue_changed("first").await.expect("same"), 0);
    assert_eq!(replica.requeue_changed("second").await.expect("changed"), 1);
    emulator.stop().await;
}
