//! The daemon's signals as an operator meets them, from outside the process: `/metrics`
//! scraped while applying is stalled by a table lock and while the stream is down, `/readyz`
//! with a stopped channel and with Pub/Sub unreachable, `promtool check metrics` on a real
//! scrape, and systemd's notify socket (READY=1, STATUS=, WATCHDOG=1) bound by the test.

use crate::common::{self, TestConfig, TestDb};
use serde_json::json;
use sfmirror::demo::RestWriter;
use sfmirror::emulator::{Emulator, EmulatorConfig};
use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// `sfmirror run` in its own process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Process {
    child: tokio::process::Child,
    stderr: std::path::PathBuf,
}

impl Process {
    async fn start(cfg: &TestConfig, envs: &[(&str, String)]) -> Process {
        let dir = std::env::temp_dir().join(format!("sfm-signals-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let tag = rand::random::<u32>();
        let path = dir.join(format!("{tag}.toml"));
        std::fs::write(&path, cfg.toml()).expect("config");
        let stderr = dir.join(format!("{tag}.log"));
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sfmirror"));
        cmd.args(["run", "--config"])
            .arg(&path)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("log file"))
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Process {
            child: cmd.spawn().expect("spawn sfmirror run"),
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn scrape(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("body")
}

/// The value of the series `name{labels}` exactly as rendered (labels in order).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

fn gauge(text: &str, name: &str, channel: &str) -> f64 {
    let series = format!("{name}{{channel=\"{channel}\"}}");
    value(text, &series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

async fn readyz(base: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(format!("{base}/readyz"))
        .await
        .expect("readyz");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("readyz JSON"))
}

/// An emulator whose idle streams say something every second (Salesforce: 270 s).
async fn chatty_emulator() -> Emulator {
    Emulator::start(EmulatorConfig {
        keepalive: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .expect("emulator")
}

const ACCOUNTS: &str = "/data/AccountChangeEvent";

/// The daemon on `emulator` and `db` with its metrics listener, once `/readyz` says ready;
/// and the listener's base URL.
async fn start_ready(emulator: &Emulator, db: &TestDb) -> (Process, String) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let daemon = Process::start(&config(emulator, db, port), &[]).await;
    common::wait_for("readiness", WAIT, async || {
        reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    (daemon, base)
}

fn config(emulator: &Emulator, db: &TestDb, port: u16) -> TestConfig {
    TestConfig::new(emulator, &db.url)
        .channel(ACCOUNTS, &["Account"])
        .metrics(&format!("127.0.0.1:{port}"))
        .sync("stale_stream_secs", 5)
        .sync("reconnect_min_ms", 100)
        .sync("reconnect_max_ms", 500)
        .sync("batch_max_wait_ms", 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_headroom_follow_the_clock_while_applying_stalls_and_the_stream_is_down() {
    let db = TestDb::create().await;
    let emulator = chatty_emulator().await;
    let (daemon, base) = start_ready(&emulator, &db).await;
    let writer = RestWriter::new(&emulator);
    writer
        .create("Account", json!({"Name": "first"}))
        .await
        .expect("create");
    common::wait_for("caught up", WAIT, async || {
        let text = scrape(&base).await;
        value(
            &text,
            &format!("sfmirror_replication_lag_seconds{{channel=\"{ACCOUNTS}\"}}"),
        ) == Some(0.0)
            && value(
                &text,
                &format!(
                    "sfmirror_last_applied_commit_timestamp_seconds{{channel=\"{ACCOUNTS}\"}}"
                ),
            )
            .is_some()
    })
    .await;
    let text = scrape(&base).await;
    assert_eq!(
        gauge(&text, "sfmirror_retention_headroom_seconds", ACCOUNTS),
        72.0 * 3600.0
    );

    // Applying stalls: the table is locked while changes keep coming.
    let locker = db.client().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE salesforce.account IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    for i in 0..5 {
        writer
            .create("Account", json!({"Name": format!("waiting {i}")}))
            .await
            .expect("create");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a = scrape(&base).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = scrape(&base).await;
    let (lag_a, lag_b) = (
        gauge(&a, "sfmirror_replication_lag_seconds", ACCOUNTS),
        gauge(&b, "sfmirror_replication_lag_seconds", ACCOUNTS),
    );
    assert!(
        lag_a >= 1.0 && lag_b >= lag_a + 1.0,
        "lag {lag_a} then {lag_b}"
    );
    let (head_a, head_b) = (
        gauge(&a, "sfmirror_retention_headroom_seconds", ACCOUNTS),
        gauge(&b, "sfmirror_retention_headroom_seconds", ACCOUNTS),
    );
    assert!(head_b <= head_a - 1.0, "headroom {head_a} then {head_b}");
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    common::wait_for("caught up again", WAIT, async || {
        value(
            &scrape(&base).await,
            &format!("sfmirror_replication_lag_seconds{{channel=\"{ACCOUNTS}\"}}"),
        ) == Some(0.0)
    })
    .await;

    // The stream is down: dropped, then refused for a while.
    common::control(&emulator, "refuse", json!({"seconds": 6})).await;
    common::control(&emulator, "drop-streams", json!({})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let a = scrape(&base).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = scrape(&base).await;
    assert_eq!(gauge(&b, "sfmirror_stream_connected", ACCOUNTS), 0.0);
    let (lag_a, lag_b) = (
        gauge(&a, "sfmirror_replication_lag_seconds", ACCOUNTS),
        gauge(&b, "sfmirror_replication_lag_seconds", ACCOUNTS),
    );
    assert!(
        lag_a >= 1.0 && lag_b >= lag_a + 1.0,
        "stream down: lag {lag_a} then {lag_b}"
    );
    common::wait_for("reconnected and caught up", WAIT, async || {
        value(
            &scrape(&base).await,
            &format!("sfmirror_replication_lag_seconds{{channel=\"{ACCOUNTS}\"}}"),
        ) == Some(0.0)
    })
    .await;
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_known_series_exists_from_start_up_and_promtool_accepts_the_scrape() {
    let db = TestDb::create().await;
    let emulator = chatty_emulator().await;
    let (daemon, base) = start_ready(&emulator, &db).await;
    let text = scrape(&base).await;
    for series in [
        format!("sfmirror_events_total{{channel=\"{ACCOUNTS}\",change_type=\"CREATE\"}}"),
        format!("sfmirror_events_total{{channel=\"{ACCOUNTS}\",change_type=\"GAP_OVERFLOW\"}}"),
        format!("sfmirror_dead_letters_total{{channel=\"{ACCOUNTS}\"}}"),
        format!("sfmirror_replay_resets_total{{channel=\"{ACCOUNTS}\"}}"),
        format!("sfmirror_channel_stopped{{channel=\"{ACCOUNTS}\"}}"),
        "sfmirror_repairs_total{kind=\"record\",outcome=\"parked\"}".to_string(),
        "sfmirror_repairs_parked{object=\"Account\"}".to_string(),
        "sfmirror_backfill_rows_total{object=\"Account\"}".to_string(),
    ] {
        assert_eq!(value(&text, &series), Some(0.0), "{series} in:\n{text}");
    }
    assert_eq!(value(&text, "sfmirror_ready"), Some(1.0), "{text}");
    assert_eq!(gauge(&text, "sfmirror_channel_owned", ACCOUNTS), 1.0);
    assert!(text.contains("process_resident_memory_bytes"), "{text}");
    assert!(text.contains("process_cpu_seconds_total"), "{text}");
    for (name, _, _) in sfmirror::telemetry::METRICS {
        if text.contains(&format!("\n{name}")) || text.starts_with(name) {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP text"
            );
        }
    }
    // A batch: its histograms reach six hours.
    RestWriter::new(&emulator)
        .create("Account", json!({"Name": "one"}))
        .await
        .expect("create");
    common::wait_for("a batch", WAIT, async || {
        scrape(&base)
            .await
            .contains("sfmirror_batch_apply_seconds_bucket{le=\"21600\"}")
    })
    .await;
    let text = scrape(&base).await;
    assert!(
        !text.contains("sfmirror_batch_apply_seconds_count 0"),
        "keepalives are not batches"
    );
    promtool_check_metrics(&text);
    daemon.stop().await;
    emulator.stop().await;
}

/// `promtool check metrics` on `text`; promtool must be installed (Debian's `prometheus`
/// package; CI installs it) unless `SFMIRROR_SKIP_PROMTOOL=1`.
fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    if std::env::var("SFMIRROR_SKIP_PROMTOOL").is_ok_and(|v| v == "1") {
        return;
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool cannot run ({e}): install Debian's `prometheus` package, or set \
                 SFMIRROR_SKIP_PROMTOOL=1"
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write scrape");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_a_stopped_channel_and_an_unreachable_pubsub() {
    let db = TestDb::create().await;
    let emulator = chatty_emulator().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let cfg = config(&emulator, &db, port).channel("/data/NoSuchThingChangeEvent", &["Contact"]);
    let daemon = Process::start(&cfg, &[]).await;
    common::wait_for("the bad channel to stop", WAIT, async || {
        reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status().as_u16() == 503)
            && scrape(&base)
                .await
                .contains("sfmirror_channel_stopped{channel=\"/data/NoSuchThingChangeEvent\"} 1")
    })
    .await;
    let (status, body) = readyz(&base).await;
    assert_eq!(status, 503);
    let channels: HashMap<String, serde_json::Value> = body["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap_or_default().to_string(),
                c.clone(),
            )
        })
        .collect();
    assert_eq!(channels[ACCOUNTS]["ready"], true, "{body}");
    let bad = &channels["/data/NoSuchThingChangeEvent"];
    assert_eq!(bad["ready"], false);
    assert!(
        bad["problem"]
            .as_str()
            .unwrap_or_default()
            .starts_with("stopped"),
        "{body}"
    );
    assert_eq!(body["role"], "active");
    assert_eq!(
        daemon.log().matches("channel stopped").count(),
        1,
        "one ERROR per stopped channel:\n{}",
        daemon.log()
    );
    daemon.stop().await;

    // Pub/Sub unreachable: not ready, and the lag series exists and grows.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let daemon = Process::start(&config(&emulator, &db, port).pubsub_endpoint(&dead), &[]).await;
    common::wait_for("the metrics listener", WAIT, async || {
        reqwest::get(format!("{base}/readyz")).await.is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = readyz(&base).await;
    assert_eq!(status, 503, "{body}");
    let a = gauge(
        &scrape(&base).await,
        "sfmirror_replication_lag_seconds",
        ACCOUNTS,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = gauge(
        &scrape(&base).await,
        "sfmirror_replication_lag_seconds",
        ACCOUNTS,
    );
    assert!(b >= a + 1.0, "lag {a} then {b}");
    daemon.stop().await;
    emulator.stop().await;
}

/// Datagrams systemd would receive on its notify socket, with when each arrived.
fn listen_as_systemd(path: &std::path::Path) -> std::sync::mpsc::Receiver<(Instant, String)> {
    let socket = std::os::unix::net::UnixDatagram::bind(path).expect("bind notify socket");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if tx.send((Instant::now(), text)).is_err() {
                return;
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_status_and_the_watchdog_until_a_channel_is_stuck() {
    let db = TestDb::create().await;
    let emulator = chatty_emulator().await;
    let socket = std::env::temp_dir().join(format!(
        "sfm-notify-{}-{}.sock",
        std::process::id(),
        rand::random::<u32>()
    ));
    let messages = listen_as_systemd(&socket);
    let cfg = TestConfig::new(&emulator, &db.url)
        .channel(ACCOUNTS, &["Account"])
        .sync("batch_max_wait_ms", 20);
    let daemon = Process::start(
        &cfg,
        &[
            ("NOTIFY_SOCKET", socket.display().to_string()),
            ("WATCHDOG_USEC", "2000000".to_string()),
        ],
    )
    .await;
    let next = |timeout: Duration| messages.recv_timeout(timeout).ok();
    // READY=1 only once Pub/Sub accepted the stream, with a status line.
    let ready = loop {
        let (_, m) = next(WAIT).unwrap_or_else(|| panic!("no READY=1:\n{}", daemon.log()));
        if m.contains("READY=1") {
            break m;
        }
    };
    assert!(
        emulator.subscription_count() >= 1,
        "READY=1 before Subscribe"
    );
    assert!(ready.contains("STATUS=active; channels 1/1 up"), "{ready}");
    // The watchdog hears from a healthy daemon every half period.
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        if let Some((_, m)) = next(Duration::from_millis(200))
            && m.contains("WATCHDOG=1")
        {
            pings += 1;
        }
    }
    assert!(pings >= 2, "{pings} watchdog pings in 3 s");

    // A batch stuck behind a table lock for longer than the period: the pings stop.
    let writer = RestWriter::new(&emulator);
    writer
        .create("Account", json!({"Name": "makes the table"}))
        .await
        .expect("create");
    let locker = db.client().await;
    common::wait_for("the table", WAIT, async || {
        locker
            .query_one("SELECT count(*) FROM salesforce.account", &[])
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) == 1)
    })
    .await;
    locker
        .batch_execute("BEGIN; LOCK TABLE salesforce.account IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    writer
        .create("Account", json!({"Name": "stuck"}))
        .await
        .expect("create");
    // Drain what was sent before the batch got stuck, then expect silence.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while messages.try_recv().is_ok() {}
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        if let Some((_, m)) = next(Duration::from_millis(200)) {
            assert!(!m.contains("WATCHDOG=1"), "a stuck batch still pinged: {m}");
        }
    }
    locker.batch_execute("ROLLBACK").await.expect("unlock");
    let resumed = (0..30)
        .any(|_| next(Duration::from_millis(200)).is_some_and(|(_, m)| m.contains("WATCHDOG=1")));
    assert!(resumed, "the watchdog pings again once the batch commits");
    daemon.stop().await;
    let _ = std::fs::remove_file(&socket);
    emulator.stop().await;
}

/// A spent event delivery allocation, as an operator meets it: the usage gauge from `/limits`
/// climbs to 1, the refused channel is paused with one ERROR saying what to do and `/readyz`
/// names it; once the allocation is back, the channel subscribes again by itself and nothing
/// is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_delivery_allocation_pauses_the_channel_until_it_is_back() {
    let emulator = Emulator::start(EmulatorConfig {
        keepalive: Duration::from_secs(1),
        delivery_allocation: Some(30),
        ..Default::default()
    })
    .await
    .expect("emulator");
    let db = TestDb::create().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let cfg = config(&emulator, &db, port)
        .sync("limits_poll_secs", 1)
        .sync("delivery_limit_retry_secs", 3);
    let daemon = Process::start(&cfg, &[]).await;
    common::wait_for("readiness", WAIT, async || {
        reqwest::get(format!("{base}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let writer = RestWriter::new(&emulator);
    for i in 0..50 {
        writer
            .create("Account", json!({"Name": format!("account {i}")}))
            .await
            .expect("create");
    }
    common::wait_for("the channel paused, named by /readyz", WAIT, async || {
        let (status, body) = readyz(&base).await;
        status == 503 && body.to_string().contains("paused")
    })
    .await;
    let (_, body) = readyz(&base).await;
    assert!(
        body.to_string().contains("DailyDeliveredPlatformEvents"),
        "{body}"
    );
    common::wait_for("the usage gauge", WAIT, async || {
        value(
            &scrape(&base).await,
            "sfmirror_event_delivery_usage_ratio{window=\"daily\"}",
        )
        .is_some_and(|v| v >= 0.99)
    })
    .await;
    let log = daemon.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains("delivery allocation is spent"))
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR for the refusal:\n{log}");

    // The allocation comes back (the window rolled over): the channel resumes on its own.
    reqwest::Client::new()
        .post(format!("{}/emulator/settings", emulator.rest_url))
        .json(&json!({"delivery_allocation": null}))
        .send()
        .await
        .expect("settings")
        .error_for_status()
        .expect("accepted");
    common::wait_for(
        "every account replicated after the pause",
        WAIT,
        async || {
            db.client()
                .await
                .query_one("SELECT count(*) FROM salesforce.account", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) == 50)
        },
    )
    .await;
    common::wait_for("ready again", WAIT, async || readyz(&base).await.0 == 200).await;
    let log = daemon.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("ERROR") && l.contains("delivery allocation is spent"))
            .count(),
        1,
        "{log}"
    );
    daemon.stop().await;
    emulator.stop().await;
}
