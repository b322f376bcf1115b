//! Test harness: a Postgres server and one fresh database per test; the emulator, a config
//! builder and the daemon ([`daemon`]); comparing the org with the replica.
//!
//! The server is `DATABASE_URL` (an admin URL) when set. Otherwise a private throwaway
//! cluster is started with initdb/pg_ctl found on PATH, via `pg_config --bindir`, or under
//! /usr/lib/postgresql/*/bin; as root it runs as the `postgres` user. The cluster lives in
//! the temp directory, is shared by the test processes of a run (a file lock guards its
//! start), and is reused by later runs.

#![allow(dead_code)]

pub mod daemon;
pub mod tls_cluster;
pub use daemon::{Daemon, TestConfig, emulator};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

static ADMIN_URL: OnceLock<String> = OnceLock::new();

/// The admin URL of the server the tests use.
pub fn admin_url() -> String {
    ADMIN_URL
        .get_or_init(|| match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => url,
            _ => private_cluster(),
        })
        .clone()
}

fn pg_bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("initdb").exists() && d.join("pg_ctl").exists() {
                return d;
            }
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|d| d.join("initdb").exists());
    candidates.sort_by_key(|d| {
        d.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.pop().unwrap_or_else(|| {
        panic!(
            "DATABASE_URL is unset and no PostgreSQL server binaries (initdb, pg_ctl) were found \
             on PATH, via pg_config, or under /usr/lib/postgresql/*/bin; install them or set \
             DATABASE_URL"
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a server binary, as the `postgres` user when we are root (initdb refuses root).
fn run_pg(bin: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

fn private_cluster() -> String {
    let port = start_cluster(
        "sfmirror-test-pg",
        "-c max_connections=200 -c fsync=off",
        |_| true,
        |_| {},
    );
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

/// Starts (or finds running) a private cluster in `$TMPDIR/<name>`, shared by the test
/// processes of a run under a file lock and reused by later runs, and returns its port.
/// `options` are more server options (`{root}` stands for the cluster's directory).
/// `prepared` says whether the directory holds what the server needs (certificates); when it
/// does not, a running server is stopped and `prepare` writes them before it starts again.
pub(crate) fn start_cluster(
    name: &str,
    options: &str,
    prepared: impl Fn(&Path) -> bool,
    prepare: impl Fn(&Path),
) -> u16 {
    let bin = pg_bin_dir();
    let root = std::env::temp_dir().join(name);
    std::fs::create_dir_all(&root).expect("create cluster dir");
    let lock = std::fs::File::create(std::env::temp_dir().join(format!("{name}.lock")))
        .expect("lock file");
    lock.lock().expect("lock the cluster");
    let data = root.join("data");
    let data_s = data.to_string_lossy().to_string();
    let port_file = root.join("port");
    let ready = prepared(&root);
    let running = data.join("PG_VERSION").exists()
        && run_pg(&bin.join("pg_ctl"), &["status", "-D", &data_s])
            .status
            .success();
    if running && !ready {
        let _ = run_pg(&bin.join("pg_ctl"), &["stop", "-D", &data_s, "-m", "fast"]);
    }
    if !running || !ready {
        if !ready {
            prepare(&root);
        }
        if is_root() {
            let _ = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&root)
                .status();
        }
        if !data.join("PG_VERSION").exists() {
            let out = run_pg(
                &bin.join("initdb"),
                &[
                    "-D",
                    &data_s,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                ],
            );
            assert!(out.status.success(), "initdb failed: {out:?}");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let root_s = root.display().to_string();
        let opts = format!(
            "-p {port} -k {root_s} -c listen_addresses=127.0.0.1 {}",
            options.replace("{root}", &root_s)
        );
        let log = root.join("server.log").to_string_lossy().to_string();
        let out = run_pg(
            &bin.join("pg_ctl"),
            &["start", "-D", &data_s, "-w", "-l", &log, "-o", &opts],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {out:?}; see {log}"
        );
        std::fs::write(&port_file, port.to_string()).expect("write port");
    }
    std::fs::read_to_string(&port_file)
        .expect("cluster port")
        .trim()
        .parse()
        .expect("port number")
}

/// A database of its own for one test; dropped when the value is dropped.
pub struct TestDb {
    pub url: String,
    pub name: String,
    admin: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin = admin_url();
        let name = format!(
            "sfm_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres at {admin}: {e}"));
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        TestDb {
            url: with_database(&admin, &name),
            name,
            admin,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to test database");
        tokio::spawn(conn);
        client
    }

    /// The one number `sql` selects.
    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// A pool on this database, with the control schema `sfmirror` migrated (data schema
    /// `salesforce`).
    pub async fn migrated_pool(&self) -> deadpool_postgres::Pool {
        let mut cfg = deadpool_postgres::Config::new();
        cfg.url = Some(self.url.clone());
        let pool = cfg.create_pool(None, tokio_postgres::NoTls).expect("pool");
        let mut client = pool.get().await.expect("connection");
        sfmirror::replica::migrate::migrate(&mut client, "salesforce", "sfmirror")
            .await
            .expect("migrate");
        pool
    }
}

/// A fresh database with `describe`'s table in schema `salesforce` (control schema
/// `sfmirror`), and the settings that write it in `mode`.
pub async fn fresh_replica(
    describe: sfmirror::model::ObjectDescribe,
    mode: sfmirror::config::DeleteMode,
) -> (
    TestDb,
    deadpool_postgres::Pool,
    sfmirror::replica::schema::TableSchema,
    sfmirror::replica::ApplySettings,
) {
    let db = TestDb::create().await;
    let pool = db.migrated_pool().await;
    let table = sfmirror::replica::schema::TableSchema::from_describe(describe).expect("table");
    let client = pool.get().await.expect("connection");
    table.ensure(&client, "salesforce").await.expect("ensure");
    let settings = sfmirror::replica::ApplySettings {
        data_schema: "salesforce".to_string(),
        control_schema: "sfmirror".to_string(),
        delete_mode: mode,
        repair_margin_ms: 0,
        audit_batches: false,
    };
    (db, pool, table, settings)
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; a thread with its own runtime can block.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok((client, conn)) =
                        tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                    {
                        tokio::spawn(conn);
                        let _ = client
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

#[test]
fn database_names_replace_the_path() {
    assert_eq!(
        with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
        "postgres://u@h:5432/x?sslmode=disable"
    );
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
}

/// Polls `ok` until it holds or `timeout` passes.
pub async fn wait_for(what: &str, timeout: std::time::Duration, mut ok: impl AsyncFnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !ok().await {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Epoch ms of a REST datetime or a Postgres jsonb timestamptz.
fn epoch_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .ok()
        .map(|d| d.timestamp_millis())
}

/// Milliseconds since midnight of `HH:MM:SS[.fff][Z]`.
fn time_ms(s: &str) -> Option<i64> {
    let t = chrono::NaiveTime::parse_from_str(s.trim_end_matches('Z'), "%H:%M:%S%.f").ok()?;
    use chrono::Timelike;
    Some(i64::from(t.num_seconds_from_midnight()) * 1000 + i64::from(t.nanosecond() / 1_000_000))
}

/// Whether an org value (REST JSON) and a replica value (jsonb) are the same field value.
pub fn same_value(org: &serde_json::Value, replica: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match (org, replica) {
        (J::Null, J::Null) => true,
        (J::Number(a), J::Number(b)) => a.as_f64() == b.as_f64(),
        (J::String(a), J::String(b)) if a == b => true,
        (J::String(a), J::String(b)) if b.starts_with("\\x") => {
            // bytea as jsonb is hex; the org sends base64.
            use base64::Engine;
            let org = base64::engine::general_purpose::STANDARD.decode(a).ok();
            let hex = &b[2..];
            let replica: Option<Vec<u8>> = (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect();
            org.is_some() && org == replica
        }
        (J::String(a), J::String(b)) if time_ms(a).is_some() => time_ms(a) == time_ms(b),
        (J::String(a), J::String(b)) => epoch_ms(a).is_some() && epoch_ms(a) == epoch_ms(b),
        (a, b) => a == b,
    }
}

/// The describe fields an object's change events carry (compound components expanded).
pub fn cdc_fields(def: &sfmirror::emulator::store::ObjectDef) -> Vec<String> {
    use sfmirror::emulator::cdc::CdcField;
    def.schema
        .fields
        .iter()
        .flat_map(|f| match f {
            CdcField::Scalar { field, .. } => vec![field.clone()],
            CdcField::Compound { subs, .. } => subs.iter().map(|s| s.1.clone()).collect(),
        })
        .collect()
}

/// Rows of `schema.table` as JSON objects by id.
pub async fn replica_rows(
    db: &TestDb,
    schema: &str,
    table: &str,
) -> std::collections::HashMap<String, serde_json::Value> {
    let client = db.client().await;
    let sql = format!("SELECT id, to_jsonb(t)::text FROM {schema}.{table} t");
    let rows = match client.query(&sql, &[]).await {
        Ok(rows) => rows,
        // The table appears with the first event of its object.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            return Default::default();
        }
        Err(e) => panic!("read {schema}.{table}: {e}"),
    };
    rows.iter()
        .map(|r| {
            let text: String = r.get(1);
            (r.get(0), serde_json::from_str(&text).expect("row as JSON"))
        })
        .collect()
}

/// Differences between the org's live records of `object` and the replica (soft delete mode:
/// deleted records must be marked `_sfm_deleted`, or absent). Empty when they match.
pub async fn object_drift(
    emulator: &sfmirror::emulator::Emulator,
    db: &TestDb,
    schema: &str,
    object: &str,
) -> Vec<String> {
    let def = emulator.org.object(object).expect("object");
    let fields = cdc_fields(&def);
    let replica = replica_rows(db, schema, &object.to_ascii_lowercase()).await;
    let records = emulator.org.records(object);
    let mut drift = Vec::new();
    let live: std::collections::HashSet<&str> =
        records.iter().filter_map(|r| r["Id"].as_str()).collect();
    for (id, row) in &replica {
        if !live.contains(id.as_str()) && row["_sfm_deleted"] != serde_json::Value::Bool(true) {
            drift.push(format!(
                "{object} {id}: in the replica, not live in the org"
            ));
        }
    }
    for rec in &records {
        let id = rec["Id"].as_str().unwrap_or_default();
        let Some(row) = replica.get(id) else {
            drift.push(format!("{object} {id}: missing in the replica"));
            continue;
        };
        if row["_sfm_deleted"] == serde_json::Value::Bool(true) {
            drift.push(format!(
                "{object} {id}: live in the org, deleted in the replica"
            ));
        }
        for f in &fields {
            let want = rec.get(f).unwrap_or(&serde_json::Value::Null);
            let got = &row[f.to_ascii_lowercase()];
            if !same_value(want, got) {
                drift.push(format!("{object} {id}.{f}: org {want} replica {got}"));
            }
        }
    }
    drift
}

/// POSTs to the emulator's control API.
pub async fn control(
    emulator: &sfmirror::emulator::Emulator,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .post(format!("{}/emulator/{path}", emulator.rest_url))
        .json(&body)
        .send()
        .await
        .expect("control call");
    let status = resp.status();
    let json: serde_json::Value = resp.json().await.expect("control answer");
    assert!(status.is_success(), "control {path}: {status} {json}");
    json
}
