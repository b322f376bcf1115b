//! The command line as an operator meets it: help, exit codes, config errors, inspect-event,
//! and the metrics listener.

use crate::common;
use std::process::Command;

fn sfmirror() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sfmirror"))
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sfm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir.join(name)
}

#[test]
fn every_command_has_help_and_bad_usage_exits_2() {
    for cmd in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["check", "--help"],
        vec!["emulator", "--help"],
        vec!["demo", "--help"],
        vec!["inspect-event", "--help"],
        vec!["status", "--help"],
        vec!["backfill", "--help"],
        vec!["verify", "--help"],
    ] {
        let out = sfmirror().args(&cmd).output().expect("runs");
        assert!(out.status.success(), "{cmd:?}");
        assert!(!out.stdout.is_empty(), "{cmd:?} prints help");
    }
    let out = sfmirror().arg("no-such-command").output().expect("runs");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_bad_config_exits_78_naming_the_key() {
    let path = tmp("bad.toml");
    std::fs::write(
        &path,
        r#"
        [salesforce]
        auth = "client_credentials"
        client_id = "x"
        client_secret = "y"
        [replica]
        url = "postgres://u@127.0.0.1/db"
        [[channels]]
        name = "AccountChangeEvent"
        objects = ["Account"]
        "#,
    )
    .expect("write");
    let out = sfmirror()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    // EX_CONFIG: systemd's RestartPreventExitStatus=78 stops restarting what cannot work.
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("channels[0].name"), "{err}");

    let out = sfmirror()
        .args(["run", "--config", "/nonexistent/sfmirror.toml"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/sfmirror.toml"));
}

#[test]
fn inspect_event_prints_names_and_values() {
    use sfmirror::emulator::cdc::{CdcSchema, HeaderInfo, encode};
    use sfmirror::model::{ChangeType, ObjectDescribe};
    let describe: ObjectDescribe =
        serde_json::from_str(include_str!("../src/emulator/org/Account.json")).expect("describe");
    let schema = CdcSchema::build(&describe).expect("schema");
    let changed = ["Rating", "BillingCity"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let nulled = ["Phone"].iter().map(|s| s.to_string()).collect();
    let mut record = serde_json::Map::new();
    record.insert("Rating".into(), "Hot".into());
    record.insert("BillingCity".into(), "Paris".into());
    let header = HeaderInfo {
        entity: "Account",
        record_ids: vec!["001000000000001AAA".into()],
        change_type: ChangeType::Update,
        change_origin: "com/salesforce/api/rest/62.0",
        transaction_key: "t1",
        sequence_number: 1,
        commit_timestamp: 1_700_000_000_000,
        commit_number: 42,
        commit_user: "005000000000001AAA",
        changed: schema.bitmap(&changed),
        nulled: schema.bitmap(&nulled),
        diff: vec![],
    };
    let payload = encode(&schema, &header, &record).expect("encodes");
    let schema_file = tmp("schema.json");
    std::fs::write(&schema_file, &schema.json).expect("write");
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let payload_file = tmp("payload.hex");
    std::fs::write(&payload_file, hex).expect("write");
    let out = sfmirror()
        .arg("inspect-event")
        .arg("--schema")
        .arg(&schema_file)
        .arg("--payload")
        .arg(&payload_file)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["header"]["changeType"], "UPDATE");
    assert_eq!(json["header"]["commitNumber"], 42);
    let changed: Vec<&str> = json["header"]["changedFields"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        changed.contains(&"Rating") && changed.contains(&"BillingAddress.City"),
        "{changed:?}"
    );
    assert_eq!(json["header"]["nulledFields"][0], "Phone");
    assert_eq!(json["fields"]["BillingAddress.City"], "Paris");

    std::fs::write(&payload_file, b"not an event").expect("write");
    let out = sfmirror()
        .arg("inspect-event")
        .arg("--schema")
        .arg(&schema_file)
        .arg("--payload")
        .arg(&payload_file)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("payload.hex"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_metrics_health_and_readiness() {
    let db = common::TestDb::create().await;
    let emulator = common::emulator().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let mut cfg = common::TestConfig::new(&emulator, &db.url)
        .channels(&[("/data/AccountChangeEvent", &["Account"])])
        .build();
    cfg.metrics.listen = format!("127.0.0.1:{port}");
    let daemon = common::Daemon::spawn(&cfg, None);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    common::wait_for(
        "readiness",
        std::time::Duration::from_secs(30),
        async || {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await;
    let health = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert!(health.status().is_success());
    let w = sfmirror::demo::RestWriter::new(&emulator);
    w.create("Account", serde_json::json!({"Name": "counted"}))
        .await
        .expect("create");
    common::wait_for("the event metric", std::time::Duration::from_secs(30), async || {
        let body = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default();
        body.contains("sfmirror_events_total{channel=\"/data/AccountChangeEvent\",change_type=\"CREATE\"}")
            && body.contains("sfmirror_build_info")
            && body.contains("sfmirror_stream_connected")
    })
    .await;

    // `status` reads the same replica from another process, with no Salesforce call.
    let path = tmp("status.toml");
    let status_cfg = common::TestConfig::new(&emulator, &db.url)
        .channel("/data/AccountChangeEvent", &["Account"])
        .channel("/data/ContactChangeEvent", &["Contact"]);
    std::fs::write(&path, status_cfg.toml()).expect("write config");
    common::wait_for(
        "a checkpoint",
        std::time::Duration::from_secs(30),
        async || {
            let out = sfmirror()
                .args(["status", "--json", "--config"])
                .arg(&path)
                .output()
                .expect("runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            let channels = report["channels"].as_array().cloned().unwrap_or_default();
            let account = channels
                .iter()
                .find(|c| c["channel"] == "/data/AccountChangeEvent");
            let contact = channels
                .iter()
                .find(|c| c["channel"] == "/data/ContactChangeEvent");
            account.is_some_and(|c| {
                c["replay_id"].is_string()
                    && c["retention_headroom_seconds"]
                        .as_i64()
                        .is_some_and(|h| h > 71 * 3600 && h <= 72 * 3600)
            }) && contact.is_some_and(|c| c["replay_id"].is_null() && c["configured"] == true)
                && report["dead_letters"] == 0
        },
    )
    .await;
    let out = sfmirror()
        .args(["status", "--config"])
        .arg(&path)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("/data/AccountChangeEvent: replay "), "{text}");
    assert!(
        text.contains("/data/ContactChangeEvent: no checkpoint yet"),
        "{text}"
    );

    daemon.stop().await;
    emulator.stop().await;
}

/// Runs `sfmirror run` against the emulator until it subscribed, stops it with SIGTERM, and
/// returns its exit code and stderr.
async fn run_daemon_briefly(extra: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let db = common::TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = common::TestConfig::new(&emulator, &db.url)
        .channel("/data/AccountChangeEvent", &["Account"])
        .toml();
    let out = run_until_subscribed(&emulator, &cfg, extra, envs).await;
    emulator.stop().await;
    out
}

/// Runs `sfmirror <extra> run` with the config `toml` and `envs` until it has subscribed to
/// `emulator`, stops it with SIGTERM, and returns its exit code and stderr.
async fn run_until_subscribed(
    emulator: &sfmirror::emulator::Emulator,
    toml: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (Option<i32>, String) {
    let before = emulator.subscription_count();
    let run: Vec<&str> = extra.iter().copied().chain(["run"]).collect();
    let child = spawn_with_config(&run, toml, envs);
    let pid = child.id().expect("pid");
    common::wait_for(
        "the daemon's subscription",
        std::time::Duration::from_secs(60),
        async || emulator.subscription_count() > before,
    )
    .await;
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = child.wait_with_output().await.expect("wait");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_fit_the_journal_and_log_shippers() {
    // Not a terminal: no escape codes; RUST_LOG=debug raises sfmirror only, so the Postgres
    // driver neither logs record values nor server notices.
    let (code, stderr) = run_daemon_briefly(&[], &[("RUST_LOG", "debug")]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape codes in:\n{stderr}");
    let start = stderr
        .lines()
        .find(|l| l.contains("sfmirror starting"))
        .unwrap_or_else(|| panic!("no start-up line in:\n{stderr}"));
    assert!(
        start.contains(env!("CARGO_PKG_VERSION"))
            && start.contains("run-")
            && start.contains("/data/AccountChangeEvent"),
        "{start}"
    );
    // Every line is sfmirror's own: with a global `debug`, the HTTP/2, gRPC and Postgres
    // crates would have logged dozens.
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.contains(" sfmirror::"), "another crate's line: {line}");
        assert!(!line.contains("NOTICE"), "{line}");
    }
    // Lines logged inside a channel's task carry the channel.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("subscribing") && l.contains("channel")),
        "{stderr}"
    );

    // JSON: one object per line.
    let (code, stderr) = run_daemon_briefly(&["--log-format", "json"], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
}

/// Starts `sfmirror <args> --config FILE`, FILE holding `toml`, with `envs` on a clean log
/// and credentials environment; stderr and stdout are piped.
fn spawn_with_config(args: &[&str], toml: &str, envs: &[(&str, &str)]) -> tokio::process::Child {
    let path = tmp(&format!("run-{}.toml", rand::random::<u32>()));
    std::fs::write(&path, toml).expect("write config");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sfmirror"));
    cmd.args(args)
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .env_remove("SFMIRROR_LOG_FORMAT")
        .env_remove("CREDENTIALS_DIRECTORY")
        .kill_on_drop(true)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn sfmirror")
}

/// Runs `sfmirror <args> --config <toml>` to its end (at most two minutes) with `envs`, and
/// returns its exit code and what it printed (stderr, then stdout).
async fn run_to_end(args: &[&str], toml: &str, envs: &[(&str, &str)]) -> (Option<i32>, String) {
    let child = spawn_with_config(args, toml, envs);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .unwrap_or_else(|_| panic!("sfmirror {args:?} did not end"))
    .expect("wait");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_systemd_what_a_restart_can_fix() {
    let db = common::TestDb::create().await;
    let emulator = common::emulator().await;
    let good = common::TestConfig::new(&emulator, &db.url)
        .channel("/data/AccountChangeEvent", &["Account"])
        .toml();

    // Credentials refused: no restart fixes them.
    let refused = good.replace(
        &format!("client_secret = \"{}\"", emulator.credentials.client_secret),
        "client_secret = \"not-the-secret\"",
    );
    assert_ne!(refused, good);
    let (code, stderr) = run_to_end(&["check"], &refused, &[]).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("exit 78"), "{stderr}");

    // The replica cannot be reached (nothing listens): it may come back, so 1.
    let unreachable = good.replace(&db.url, "postgres://postgres@127.0.0.1:1/nothing");
    let (code, stderr) = run_to_end(&["check"], &unreachable, &[]).await;
    assert_eq!(code, Some(1), "{stderr}");

    // A good configuration passes check, which names each channel.
    let (code, stderr) = run_to_end(&["check"], &good, &[]).await;
    assert_eq!(code, Some(0), "{stderr}");

    // Every channel refused by the org: check says so and exits 78, and the daemon exits 78
    // by itself.
    let no_topic = common::TestConfig::new(&emulator, &db.url)
        .channel("/data/NoSuchThingChangeEvent", &["Account"])
        .toml();
    let (code, stderr) = run_to_end(&["check"], &no_topic, &[]).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("/data/NoSuchThingChangeEvent"), "{stderr}");
    let (code, stderr) = run_to_end(&["run"], &no_topic, &[]).await;
    assert_eq!(code, Some(78), "{stderr}");
    assert!(stderr.contains("topic"), "{stderr}");
    emulator.stop().await;
}

/// `check` proves what `run` needs: objects the org has (a typo is named with the closest
/// real name), a Pub/Sub endpoint it can reach and whose certificate it trusts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_what_run_would_trip_on() {
    let db = common::TestDb::create().await;
    let emulator = common::emulator().await;
    let typo = common::TestConfig::new(&emulator, &db.url)
        .channel("/data/ChangeEvents", &["Account", "Contcat"])
        .toml();
    let (code, out) = run_to_end(&["check"], &typo, &[]).await;
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains("Contcat is not an object of this org; did you mean Contact?"),
        "{out}"
    );
    assert!(out.contains("object Account:"), "{out}");

    // Nothing listens where Pub/Sub should be: a retry may help.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let unreachable = common::TestConfig::new(&emulator, &db.url)
        .channel("/data/AccountChangeEvent", &["Account"])
        .pubsub_endpoint(&format!("http://127.0.0.1:{port}"))
        .toml();
    let (code, out) = run_to_end(&["check"], &unreachable, &[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("UNREACHABLE: channel /data/AccountChangeEvent"),
        "{out}"
    );

    // A Pub/Sub endpoint whose certificate no trusted CA signed: definite.
    let dir = std::env::temp_dir().join(format!("sfm-check-tls-{}", std::process::id()));
    let tls = sfmirror::emulator::Emulator::start(sfmirror::emulator::EmulatorConfig {
        tls_dir: Some(dir.clone()),
        ..Default::default()
    })
    .await
    .expect("a TLS emulator");
    let untrusted = common::TestConfig::new(&emulator, &db.url)
        .channel("/data/AccountChangeEvent", &["Account"])
        .pubsub_endpoint(&tls.pubsub_endpoint)
        .toml();
    let (code, out) = run_to_end(&["check"], &untrusted, &[]).await;
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("certificate cannot be verified"), "{out}");
    assert!(out.contains("ca_file"), "{out}");
    tls.stop().await;
    let _ = std::fs::remove_dir_all(dir);
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_come_from_the_credentials_directory_and_are_never_logged() {
    let db = common::TestDb::create().await;
    let emulator = common::emulator().await;
    let secret = emulator.credentials.client_secret.clone();
    // The config names neither the client secret nor the replica: systemd's LoadCredential
    // puts both in $CREDENTIALS_DIRECTORY.
    let toml: String = common::TestConfig::new(&emulator, &db.url)
        .channel("/data/AccountChangeEvent", &["Account"])
        .toml()
        .lines()
        .filter(|l| !l.starts_with("client_secret") && !l.starts_with("url ="))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(!toml.contains(&secret) && !toml.contains(&db.url), "{toml}");
    let dir = tmp(&format!("credentials-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("credentials dir");
    // A replica password nobody asks for (trust auth) must not show up either.
    let replica_password = format!("pg-{}", rand::random::<u64>());
    for (name, value) in [
        ("client_secret", secret.as_str()),
        ("replica_url", db.url.as_str()),
        ("replica_password", replica_password.as_str()),
    ] {
        std::fs::write(dir.join(name), format!("{value}\n")).expect("write credential");
    }
    let dir_s = dir.display().to_string();
    let envs = [
        ("RUST_LOG", "trace"),
        ("CREDENTIALS_DIRECTORY", dir_s.as_str()),
    ];
    let (code, stderr) = run_until_subscribed(&emulator, &toml, &[], &envs).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("sfmirror running"), "{stderr}");
    for (what, value) in [
        ("client secret", secret.as_str()),
        ("replica password", replica_password.as_str()),
    ] {
        assert!(
            !stderr.contains(value),
            "the {what} is in the log:\n{stderr}"
        );
    }
    emulator.stop().await;
}
