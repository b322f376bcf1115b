//! `sfmirror demo` as a new user runs it: the whole story in its short mode, once against the
//! server `DATABASE_URL` names and once with `--embedded` (its own throwaway cluster), and
//! `--follow` with `status` run against the config it prints, then Ctrl-C.

use crate::common::{self, TestDb};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn demo() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sfmirror"));
    cmd.arg("demo").arg("--quick").env_remove("RUST_LOG");
    cmd
}

/// What every run of the story must have shown (each line is printed only once its step's
/// proof held).
fn assert_story(stdout: &str) {
    for proof in [
        "Backfill:",
        "`sfmirror run` started as a child process",
        "change events arriving over Pub/Sub and applied",
        "rating             ",
        "columns are exactly as before",
        "the replica has the new values",
        "GAP_OVERFLOW event for Account",
        "repair queue: 0 Account repair(s) pending",
        "kill -9 ",
        "nothing was lost",
        "holds Gold",
        "no drift",
        "sfmirror_replication_lag_seconds /data/AccountChangeEvent = 0",
        "live workload, last",
        "psql '",
    ] {
        assert!(stdout.contains(proof), "missing {proof:?} in:\n{stdout}");
    }
    assert!(
        !stdout.contains('\u{1b}'),
        "no terminal escapes when stdout is not a terminal:\n{stdout}"
    );
}

#[tokio::test]
async fn the_demo_tells_the_whole_story_against_database_url() {
    let db = TestDb::create().await;
    let out = demo()
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_story(&stdout);
    assert!(stdout.contains("the server DATABASE_URL names"), "{stdout}");
    // Logs stay at warn: none of the daemon's or the driver's info lines reach the user.
    assert!(!stderr.contains(" INFO "), "{stderr}");
    // Only the demo's own schemas were written.
    let client = db.client().await;
    let schemas: Vec<String> = client
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname NOT LIKE 'pg_%' \
             AND nspname NOT IN ('information_schema', 'public') ORDER BY 1",
            &[],
        )
        .await
        .expect("schemas")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(schemas, ["salesforce_demo", "sfmirror_demo"]);
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM salesforce_demo.account WHERE loyalty_tier__c = 'Gold'",
            &[],
        )
        .await
        .expect("the replica is there to look at")
        .get(0);
    assert_eq!(n, 1);
}

/// The directory the demo said its cluster lives in.
fn cluster_dir(stdout: &str) -> std::path::PathBuf {
    let line = stdout
        .lines()
        .find(|l| l.contains("a private cluster started for this demo"))
        .unwrap_or_else(|| panic!("no cluster line in:\n{stdout}"));
    let dir = line
        .split(" in ")
        .nth(1)
        .and_then(|s| s.split(", port").next())
        .unwrap_or_else(|| panic!("no directory in {line}"));
    std::path::PathBuf::from(dir)
}

#[tokio::test]
async fn the_demo_starts_and_removes_its_own_cluster_with_embedded() {
    // DATABASE_URL is set (and works) but --embedded must not use it.
    let out = demo()
        .arg("--embedded")
        .env("DATABASE_URL", common::admin_url())
        .output()
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_story(&stdout);
    let dir = cluster_dir(&stdout);
    assert!(
        dir.starts_with(std::env::temp_dir()),
        "{} is a temporary directory",
        dir.display()
    );
    assert!(!dir.exists(), "{} is removed at the end", dir.display());
}

#[tokio::test]
async fn follow_keeps_running_with_a_status_line_until_ctrl_c() {
    let mut child = demo()
        .args(["--follow", "--embedded"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let pid = child.id().expect("pid");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    let mut config = None;
    let status_line = tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(line) = lines.next_line().await.expect("reads") {
            seen.push_str(&line);
            seen.push('\n');
            if let Some(path) = line.trim().strip_prefix("config: ") {
                config = Some(path.to_string());
            }
            if config.is_some() && line.contains("events/s | lag ") {
                return line;
            }
        }
        panic!("the demo ended before following:\n{seen}");
    })
    .await
    .unwrap_or_else(|_| panic!("no status line within 240 s:\n{seen}"));
    assert!(status_line.contains("repairs pending"), "{status_line}");
    let config = config.expect("the config path is printed");

    // The printed config works with the other commands while the demo runs.
    let status = Command::new(env!("CARGO_BIN_EXE_sfmirror"))
        .args(["status", "--config", &config])
        .output()
        .await
        .expect("status runs");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("/data/AccountChangeEvent"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    // Ctrl-C: a clean exit that removes the config, the daemon and the cluster.
    let killed = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await
        .expect("kill runs");
    assert!(killed.success());
    let exit = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the demo ends after Ctrl-C")
        .expect("waits");
    assert!(exit.success(), "{exit}");
    let config = std::path::Path::new(&config);
    assert!(!config.exists(), "{} is removed", config.display());
    assert!(
        !config.parent().map(|d| d.exists()).unwrap_or(false),
        "the demo's directory is removed"
    );
}

#[tokio::test]
async fn the_replica_is_database_url_then_the_local_server_then_a_cluster_of_its_own() {
    use sfmirror::demo::postgres::{LOCAL_URL, Replica, choose};
    let dir = std::env::temp_dir().join(format!("sfm-demo-choose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let given = "postgres://someone@db.example:5433/x";
    match choose(Some(given), false, &dir).await.expect("chooses") {
        Replica::Given(url) => assert_eq!(url, given),
        _ => panic!("DATABASE_URL is used when set"),
    }
    // Without DATABASE_URL: the local server if it takes the default login, else a cluster.
    let local = tokio_postgres::connect(LOCAL_URL, tokio_postgres::NoTls)
        .await
        .is_ok();
    let chosen = choose(None, false, &dir).await.expect("chooses");
    match (&chosen, local) {
        (Replica::Local(url), true) => assert_eq!(url, LOCAL_URL),
        (Replica::Embedded(_), false) => {}
        (_, local) => panic!("with the local server reachable = {local}, chose otherwise"),
    }
    drop(chosen);
    // --embedded: a cluster even though DATABASE_URL is given; it serves, and goes away.
    let Replica::Embedded(cluster) = choose(Some(given), true, &dir).await.expect("starts") else {
        panic!("--embedded starts a cluster");
    };
    let (client, conn) = tokio_postgres::connect(&cluster.url, tokio_postgres::NoTls)
        .await
        .expect("the cluster accepts the demo's login");
    tokio::spawn(conn);
    let one: i32 = client
        .query_one("SELECT 1", &[])
        .await
        .expect("query")
        .get(0);
    assert_eq!(one, 1);
    let root = cluster.root.clone();
    let url = cluster.url.clone();
    assert!(root.join("data/PG_VERSION").exists());
    drop(client);
    drop(cluster);
    assert!(!root.exists(), "{} removed", root.display());
    assert!(
        tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .is_err(),
        "the server is stopped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
