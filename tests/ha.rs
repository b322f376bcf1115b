//! Several `sfmirror run` processes with one configuration, as an operator runs a hot standby
//! or spreads channels over hosts: one owner per channel, takeovers after kill -9, a pause
//! (SIGSTOP) and killed database sessions, and an audit of every committed batch showing that
//! no batch was committed by two owners. Each test ends with the replica equal to the org.
//!
//! The waits are generous (the machine has two cores); the takeover times are printed, not
//! asserted tightly: `[ha] takeover_secs` is 3 here (`SFMIRROR_HA_TAKEOVER_SECS` sets another,
//! e.g. the default 15, to measure it), and a takeover must come within 45 s.

use crate::common::{self, TestDb};
use serde_json::json;
use sfmirror::emulator::Emulator;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `[ha] takeover_secs` of the instances.
fn takeover_secs() -> u64 {
    std::env::var("SFMIRROR_HA_TAKEOVER_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}
/// Longest wait for a takeover the test expects.
const TAKEOVER_LIMIT: Duration = Duration::from_secs(45);

/// One `sfmirror run` process, logging to a file.
struct Process {
    child: tokio::process::Child,
    pid: i32,
    log: PathBuf,
}

impl Process {
    fn start(config: &std::path::Path, name: &str) -> Process {
        let log = config.with_file_name(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sfmirror"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("CREDENTIALS_DIRECTORY")
            .kill_on_drop(true)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(file))
            .spawn()
            .expect("spawn sfmirror run");
        let pid = child.id().expect("pid") as i32;
        Process { child, pid, log }
    }

    fn signal(&self, signal: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{signal}"), self.pid.to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{signal} {}", self.pid);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the process with SIGTERM; it must exit 0.
    async fn stop(mut self) {
        self.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the daemon stops")
            .expect("wait");
        assert_eq!(status.code(), Some(0), "{}", self.log());
    }

    async fn kill9(mut self) {
        self.signal("KILL");
        let _ = self.child.wait().await;
    }
}

/// The owner of each channel with a live lease: (pid, epoch).
async fn owners(db: &TestDb) -> BTreeMap<String, (i32, i64)> {
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT channel, pid, epoch FROM sfmirror.channel_leases
             WHERE expires_at > clock_timestamp()",
            &[],
        )
        .await
        .unwrap_or_default();
    rows.iter()
        .map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2))))
        .collect()
}

/// Waits until every channel of `channels` is owned by one of `pids`; returns the owners.
async fn wait_owned(
    db: &TestDb,
    channels: &[&str],
    pids: &[i32],
    within: Duration,
) -> BTreeMap<String, (i32, i64)> {
    let started = Instant::now();
    loop {
        let now = owners(db).await;
        if channels
            .iter()
            .all(|c| now.get(*c).is_some_and(|(pid, _)| pids.contains(pid)))
        {
            return now;
        }
        assert!(
            started.elapsed() < within,
            "channels {channels:?} not owned by {pids:?} after {within:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks the batch audit: per channel, in commit order, the epoch never goes back, each
/// epoch belongs to one instance, and each batch starts after the one before ended. Returns
/// the instances that committed batches.
async fn audit_is_clean(db: &TestDb) -> Vec<String> {
    let client = db.client().await;
    let rows = client
        .query(
            "SELECT channel, epoch, instance, first_replay, last_replay FROM sfmirror.batch_audit
             ORDER BY seq",
            &[],
        )
        .await
        .expect("audit");
    assert!(!rows.is_empty(), "no batch was audited");
    let mut last: BTreeMap<String, (i64, Vec<u8>)> = BTreeMap::new();
    let mut owner_of: BTreeMap<(String, i64), String> = BTreeMap::new();
    let mut instances = Vec::new();
    for r in &rows {
        let channel: String = r.get(0);
        let epoch: i64 = r.get(1);
        let instance: String = r.get(2);
        let first: Option<Vec<u8>> = r.get(3);
        let last_replay: Vec<u8> = r.get(4);
        let owner = owner_of
            .entry((channel.clone(), epoch))
            .or_insert_with(|| instance.clone());
        assert_eq!(
            *owner, instance,
            "{channel}: epoch {epoch} committed by two instances"
        );
        if let Some((e, end)) = last.get(&channel) {
            assert!(
                epoch >= *e,
                "{channel}: a batch of epoch {epoch} committed after one of epoch {e}"
            );
            if let Some(first) = &first {
                assert!(
                    first > end,
                    "{channel}: a batch starting at {first:?} overlaps the one before (ended at \
                     {end:?})"
                );
            }
        }
        last.insert(channel, (epoch, last_replay));
        if !instances.contains(&instance) {
            instances.push(instance);
        }
    }
    instances
}

async fn workload(emulator: &Emulator, objects: &[&str], rate: u64) {
    common::control(
        emulator,
        "workload",
        json!({"rate": rate, "objects": objects}),
    )
    .await;
}

async fn stop_workload(emulator: &Emulator) {
    common::control(emulator, "workload/stop", json!({})).await;
}

/// Waits until the replica holds exactly what the org holds, object by object.
async fn wait_in_sync(emulator: &Emulator, db: &TestDb, objects: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(180);
    for object in objects {
        loop {
            let drift = common::object_drift(emulator, db, "salesforce", object).await;
            if drift.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{object} still differs from the org: {:?}",
                &drift[..drift.len().min(5)]
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn write_config(emulator: &Emulator, db: &TestDb, channels: &[(&str, &[&str])]) -> PathBuf {
    config_file(
        &common::TestConfig::new(emulator, &db.url)
            .channels(channels)
            .takeover_secs(takeover_secs())
            .audit()
            .toml(),
    )
}

/// `text` in a `sfmirror.toml` of a fresh directory (the processes' logs go beside it).
fn config_file(text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sfm-ha-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("sfmirror.toml");
    std::fs::write(&path, text).expect("config");
    path
}

const ACCOUNTS: &str = "/data/AccountChangeEvent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_does_not_subscribe_and_takes_over_from_a_killed_owner() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let config = write_config(&emulator, &db, &[(ACCOUNTS, &["Account"])]);
    let a = Process::start(&config, "a");
    wait_owned(&db, &[ACCOUNTS], &[a.pid], TAKEOVER_LIMIT).await;
    common::wait_for("a's subscription", Duration::from_secs(60), async || {
        emulator.subscription_count() >= 1
    })
    .await;
    let b = Process::start(&config, "b");
    workload(&emulator, &["Account"], 50).await;
    // B starts, beats and waits: it neither takes the channel nor subscribes.
    common::wait_for("b's heartbeat", Duration::from_secs(60), async || {
        let client = db.client().await;
        client
            .query_one(
                "SELECT count(*) FROM sfmirror.instances WHERE pid = $1",
                &[&b.pid],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 1)
            .unwrap_or(false)
    })
    .await;
    let subscriptions = emulator.subscription_count();
    tokio::time::sleep(Duration::from_secs(2 * takeover_secs())).await;
    assert_eq!(
        owners(&db).await[ACCOUNTS].0,
        a.pid,
        "a channel moved to a joining instance"
    );
    assert_eq!(
        emulator.subscription_count(),
        subscriptions,
        "the standby subscribed"
    );

    let killed_at = Instant::now();
    a.kill9().await;
    wait_owned(&db, &[ACCOUNTS], &[b.pid], TAKEOVER_LIMIT).await;
    eprintln!(
        "takeover after kill -9: {:.1} s (takeover_secs = {})",
        killed_at.elapsed().as_secs_f64(),
        takeover_secs()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_workload(&emulator).await;
    wait_in_sync(&emulator, &db, &["Account"]).await;
    let instances = audit_is_clean(&db).await;
    assert_eq!(
        instances.len(),
        2,
        "both owners committed batches: {instances:?}"
    );
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sfmirror"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains(&format!(
            "owned by {} pid {}",
            sfmirror::replica::ownership::hostname(),
            b.pid
        )),
        "{text}"
    );
    b.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_replaced_and_never_commits_after_it_wakes() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let config = write_config(&emulator, &db, &[(ACCOUNTS, &["Account"])]);
    let a = Process::start(&config, "a");
    let before = wait_owned(&db, &[ACCOUNTS], &[a.pid], TAKEOVER_LIMIT).await;
    let b = Process::start(&config, "b");
    workload(&emulator, &["Account"], 100).await;
    common::wait_for("a's first batches", Duration::from_secs(60), async || {
        let client = db.client().await;
        client
            .query_one("SELECT count(*) FROM sfmirror.batch_audit", &[])
            .await
            .map(|r| r.get::<_, i64>(0) >= 3)
            .unwrap_or(false)
    })
    .await;

    // Frozen: its connections stay open and its lease row may be locked by a batch in flight.
    a.signal("STOP");
    let paused_at = Instant::now();
    let after = wait_owned(&db, &[ACCOUNTS], &[b.pid], TAKEOVER_LIMIT).await;
    eprintln!(
        "takeover from a paused owner: {:.1} s (takeover_secs = {})",
        paused_at.elapsed().as_secs_f64(),
        takeover_secs()
    );
    assert!(after[ACCOUNTS].1 > before[ACCOUNTS].1, "the epoch moved");
    // Still paused here: the takeover happened while it was.
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.signal("CONT");
    // Awake, it finds itself fenced and steps down: the channel stays with b.
    tokio::time::sleep(Duration::from_secs(3 * takeover_secs())).await;
    assert_eq!(owners(&db).await[ACCOUNTS].0, b.pid);
    stop_workload(&emulator).await;
    wait_in_sync(&emulator, &db, &["Account"]).await;
    audit_is_clean(&db).await;
    let log = a.log();
    assert!(
        log.contains("took this channel over"),
        "the woken owner did not step down:\n{log}"
    );
    a.stop().await;
    b.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_the_channels_of_one_that_died() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let channels: [(&str, &[&str]); 3] = [
        (ACCOUNTS, &["Account"]),
        ("/data/ContactChangeEvent", &["Contact"]),
        ("/data/Invoice__ChangeEvent", &["Invoice__c"]),
    ];
    let names: Vec<&str> = channels.iter().map(|c| c.0).collect();
    let config = write_config(&emulator, &db, &channels);
    let a = Process::start(&config, "a");
    wait_owned(&db, &names, &[a.pid], TAKEOVER_LIMIT).await;
    let b = Process::start(&config, "b");
    let c = Process::start(&config, "c");
    workload(&emulator, &["Account", "Contact", "Invoice__c"], 60).await;
    tokio::time::sleep(Duration::from_secs(2 * takeover_secs())).await;
    // Joining moves nothing.
    assert!(
        owners(&db).await.values().all(|(pid, _)| *pid == a.pid),
        "channels moved when instances joined"
    );
    a.kill9().await;
    let now = wait_owned(&db, &names, &[b.pid, c.pid], TAKEOVER_LIMIT).await;
    // Two live instances: neither takes more than ceil(3 / 2).
    for pid in [b.pid, c.pid] {
        let n = now.values().filter(|(p, _)| *p == pid).count();
        assert!(n <= 2, "instance {pid} took {n} of 3 channels: {now:?}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_workload(&emulator).await;
    wait_in_sync(&emulator, &db, &["Account", "Contact", "Invoice__c"]).await;
    audit_is_clean(&db).await;
    b.stop().await;
    c.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owners_database_sessions_loses_and_doubles_nothing() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let config = write_config(&emulator, &db, &[(ACCOUNTS, &["Account"])]);
    let a = Process::start(&config, "a");
    wait_owned(&db, &[ACCOUNTS], &[a.pid], TAKEOVER_LIMIT).await;
    let b = Process::start(&config, "b");
    workload(&emulator, &["Account"], 100).await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let client = db.client().await;
        let owner = owners(&db).await[ACCOUNTS].0;
        let ended: i64 = client
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name LIKE 'sfmirror ' || $1::text || '/%') t",
                &[&owner.to_string()],
            )
            .await
            .expect("terminate")
            .get(0);
        assert!(ended > 0, "the owner {owner} has no session to end");
    }
    // Whoever owns the channel now, one does.
    wait_owned(&db, &[ACCOUNTS], &[a.pid, b.pid], TAKEOVER_LIMIT).await;
    stop_workload(&emulator).await;
    wait_in_sync(&emulator, &db, &["Account"]).await;
    audit_is_clean(&db).await;
    a.stop().await;
    b.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_never_got_ready_makes_the_next_one_wait() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    // Pub/Sub unreachable: the daemon retries (a transient error) and never gets ready.
    let text = common::TestConfig::new(&emulator, &db.url)
        .channel(ACCOUNTS, &["Account"])
        .pubsub_endpoint("http://127.0.0.1:1")
        .toml();
    let config = config_file(&text);
    let failed = async || -> i32 {
        let client = db.client().await;
        client
            .query_opt("SELECT failed FROM sfmirror.start_attempts", &[])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0))
            .unwrap_or(0)
    };
    let first = Process::start(&config, "first");
    common::wait_for(
        "the first start counted",
        Duration::from_secs(60),
        async || failed().await == 1,
    )
    .await;
    first.stop().await;
    let second = Process::start(&config, "second");
    common::wait_for(
        "the second start counted",
        Duration::from_secs(60),
        async || failed().await == 2,
    )
    .await;
    common::wait_for(
        "the second start's wait",
        Duration::from_secs(30),
        async || second.log().contains("did not get ready; waiting"),
    )
    .await;
    second.stop().await;

    // A start that gets ready clears the count.
    let good = common::TestConfig::new(&emulator, &db.url)
        .channel(ACCOUNTS, &["Account"])
        .toml();
    std::fs::write(&config, good).expect("config");
    let third = Process::start(&config, "third");
    common::wait_for(
        "a good start to clear the count",
        Duration::from_secs(60),
        async || failed().await == 0,
    )
    .await;
    third.stop().await;
    emulator.stop().await;
}
