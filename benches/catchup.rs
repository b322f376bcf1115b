//! Catch-up throughput: the daemon applies a backlog of change events from the emulator.
//!
//! Budget (design.md): >= 50,000 events/s for a 1,000,000-event backlog of mixed
//! CREATE / UPDATE / DELETE over 3 objects. Run with
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench catchup [-- N]`
//! (N events, default 200,000). The emulator runs in the same process, so the reported peak
//! RSS covers both and the backlog itself; it bounds sfmirror's from above.
//!
//! The same run then measures the Postgres limit the budget compares with: the same changes
//! (same objects, kinds, record histories and written columns) as one binary COPY per object
//! into a staging table plus one set-based merge per object (newest change per record, the
//! version guard in `ON CONFLICT`) into a fresh table shaped like the replica's, in one
//! transaction. It prints both rates and their ratio (budget: >= 0.7).
//!
//! With `-- N external`, the emulator runs as its own process (`sfmirror emulator --backlog
//! N:Account,Contact,Opportunity`, a random mix of creates, updates, deletes and undeletes
//! built before it serves), so the peak RSS printed is the daemon's alone.

mod common;

use common::{BenchDb, EmulatorProcess, peak_rss_mb};
use serde_json::json;
use sfmirror::config::Config;
use sfmirror::emulator::{Emulator, EmulatorConfig};
use sfmirror::sync::supervisor;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_util::sync::CancellationToken;

/// CPU seconds (user + system) used so far per process: this process, or every Postgres
/// process (by pid), to see which side is busy.
fn cpu_secs(only_self: bool) -> HashMap<String, f64> {
    let ticks = |stat: &str| -> Option<(String, f64)> {
        let (head, rest) = stat.rsplit_once(") ")?;
        let comm = head.split_once(" (")?.1.to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let t = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some((comm, t / 100.0))
    };
    if only_self {
        return std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ticks(&s))
            .map(|(_, t)| ("self".to_string(), t))
            .into_iter()
            .collect();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (comm, t) = ticks(&stat)?;
            (comm == "postgres").then(|| (e.file_name().to_string_lossy().into_owned(), t))
        })
        .collect()
}

/// CPU used between two samples by the processes alive at the second (the daemon's backends
/// start after the first). Other sessions on a shared server that start in between count too,
/// and ones that end do not.
fn cpu_used(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> f64 {
    after
        .iter()
        .map(|(pid, t)| t - before.get(pid).copied().unwrap_or(0.0))
        .sum()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Create,
    Update,
    Delete,
}

/// One change of the backlog: object index, kind, record number, position in the backlog.
struct Change {
    object: usize,
    kind: Kind,
    record: u32,
    i: usize,
}

/// The backlog's shape, as the generator below makes it (same rolls, same record picks), with
/// record numbers in place of the emulator's ids.
fn change_log(n: usize) -> Vec<Change> {
    let mut out = Vec::with_capacity(n);
    let mut ids: Vec<(usize, u32)> = Vec::new();
    let mut next = 0u32;
    for i in 0..n {
        let roll = i % 10;
        if roll < 5 || ids.len() < 10 {
            ids.push((i % 3, next));
            out.push(Change {
                object: i % 3,
                kind: Kind::Create,
                record: next,
                i,
            });
            next += 1;
        } else if roll < 9 {
            let (object, record) = ids[(i * 7919) % ids.len()];
            out.push(Change {
                object,
                kind: Kind::Update,
                record,
                i,
            });
        } else {
            let (object, record) = ids.swap_remove((i * 104_729) % ids.len());
            out.push(Change {
                object,
                kind: Kind::Delete,
                record,
                i,
            });
        }
    }
    out
}

/// A value already in Postgres binary format (date, timestamptz and numeric have no `ToSql`
/// without extra crate features).
#[derive(Debug)]
struct Binary(Vec<u8>);

impl ToSql for Binary {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

const PG_EPOCH_MS: i64 = 946_684_800_000;

fn timestamptz(ms: i64) -> Binary {
    Binary(((ms - PG_EPOCH_MS) * 1000).to_be_bytes().to_vec())
}

/// The Postgres limit: returns (seconds, changes applied).
async fn postgres_limit(pool: &deadpool_postgres::Pool, n: usize) -> anyhow::Result<f64> {
    let log = change_log(n);
    let mut client = pool.get().await?;
    // (object, table, staging columns after id/v/n/deleted, their types)
    let objects: [(&str, &[(&str, Type)]); 3] = [
        (
            "account",
            &[
                ("name", Type::TEXT),
                ("billingcity", Type::TEXT),
                ("numberofemployees", Type::INT4),
                ("industry", Type::TEXT),
                ("description", Type::TEXT),
                ("lastmodifieddate", Type::TIMESTAMPTZ),
            ],
        ),
        (
            "contact",
            &[
                ("lastname", Type::TEXT),
                ("email", Type::TEXT),
                ("title", Type::TEXT),
                ("lastmodifieddate", Type::TIMESTAMPTZ),
            ],
        ),
        (
            "opportunity",
            &[
                ("name", Type::TEXT),
                ("stagename", Type::TEXT),
                ("closedate", Type::DATE),
                ("amount", Type::NUMERIC),
                ("description", Type::TEXT),
                ("lastmodifieddate", Type::TIMESTAMPTZ),
            ],
        ),
    ];
    let mut setup =
        String::from("DROP SCHEMA IF EXISTS sfm_limit CASCADE; CREATE SCHEMA sfm_limit;");
    for (table, cols) in &objects {
        let defs: Vec<String> = cols
            .iter()
            .map(|(c, t)| {
                format!(
                    "{c} {}",
                    if *t == Type::NUMERIC {
                        "numeric"
                    } else {
                        t.name()
                    }
                )
            })
            .collect();
        setup.push_str(&format!(
            "CREATE TABLE sfm_limit.{table} (LIKE salesforce.{table} INCLUDING ALL);
             CREATE TEMP TABLE stage_{table} (id text, v bigint, n bigint, deleted boolean, {});",
            defs.join(", ")
        ));
    }
    client.batch_execute(&setup).await?;
    let days = |y, m, d| {
        chrono::NaiveDate::from_ymd_opt(y, m, d)
            .zip(chrono::NaiveDate::from_ymd_opt(2000, 1, 1))
            .map(|(a, b)| (a - b).num_days() as i32)
            .unwrap_or(0)
    };
    let close_date = Binary(days(2027, 1, 31).to_be_bytes().to_vec());
    // 1000.5: two base-10000 digits (1000, 5000), weight 0, positive, one decimal digit.
    let amount = Binary(
        [2i16, 0, 0, 1, 1000, 5000]
            .iter()
            .flat_map(|d| d.to_be_bytes())
            .collect(),
    );
    let base_ms = 1_767_322_245_000i64;

    let t0 = Instant::now();
    let tx = client.transaction().await?;
    for (o, (table, cols)) in objects.iter().enumerate() {
        let mut types = vec![Type::TEXT, Type::INT8, Type::INT8, Type::BOOL];
        types.extend(cols.iter().map(|(_, t)| t.clone()));
        let sink = tx
            .copy_in(&format!("COPY stage_{table} FROM STDIN (FORMAT binary)"))
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &types);
        futures::pin_mut!(writer);
        for c in log.iter().filter(|c| c.object == o) {
            let id = format!("{:03}{:015}", o, c.record);
            let v = base_ms + c.i as i64;
            let n = c.i as i64;
            let deleted = c.kind == Kind::Delete;
            let lmd = timestamptz(v);
            let text = |s: String| -> Option<String> { Some(s) };
            let none: Option<String> = None;
            let update = format!("update {}", c.i);
            let mut row: Vec<Box<dyn ToSql + Sync + Send>> =
                vec![Box::new(id), Box::new(v), Box::new(n), Box::new(deleted)];
            match (o, c.kind) {
                (_, Kind::Delete) => {
                    for (_, t) in cols.iter() {
                        row.push(match *t {
                            Type::INT4 => Box::new(None::<i32>),
                            Type::TEXT => Box::new(none.clone()),
                            _ => Box::new(None::<Binary>),
                        });
                    }
                }
                (0, Kind::Create) => {
                    row.push(Box::new(text(format!("Account {}", c.i))));
                    row.push(Box::new(text("Paris".into())));
                    row.push(Box::new(Some((c.i % 1000) as i32)));
                    row.push(Box::new(text("Energy".into())));
                    row.push(Box::new(none.clone()));
                    row.push(Box::new(Some(lmd)));
                }
                (0, _) => {
                    row.extend([
                        Box::new(none.clone()) as Box<dyn ToSql + Sync + Send>,
                        Box::new(none.clone()),
                    ]);
                    row.push(Box::new(None::<i32>));
                    row.push(Box::new(none.clone()));
                    row.push(Box::new(text(update)));
                    row.push(Box::new(Some(lmd)));
                }
                (1, Kind::Create) => {
                    row.push(Box::new(text(format!("Contact {}", c.i))));
                    row.push(Box::new(text("c@example.com".into())));
                    row.push(Box::new(none.clone()));
                    row.push(Box::new(Some(lmd)));
                }
                (1, _) => {
                    row.push(Box::new(none.clone()));
                    row.push(Box::new(none.clone()));
                    row.push(Box::new(text(update)));
                    row.push(Box::new(Some(lmd)));
                }
                (_, Kind::Create) => {
                    row.push(Box::new(text(format!("Deal {}", c.i))));
                    row.push(Box::new(text("Prospecting".into())));
                    row.push(Box::new(Some(Binary(close_date.0.clone()))));
                    row.push(Box::new(Some(Binary(amount.0.clone()))));
                    row.push(Box::new(none.clone()));
                    row.push(Box::new(Some(lmd)));
                }
                (_, _) => {
                    row.push(Box::new(none.clone()));
                    row.push(Box::new(none.clone()));
                    row.push(Box::new(None::<Binary>));
                    row.push(Box::new(None::<Binary>));
                    row.push(Box::new(text(update)));
                    row.push(Box::new(Some(lmd)));
                }
            }
            let refs: Vec<&(dyn ToSql + Sync)> =
                row.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect();
            writer.as_mut().write(&refs).await?;
        }
        writer.finish().await?;
        let names: Vec<&str> = cols.iter().map(|(c, _)| *c).collect();
        let set: Vec<String> = names
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect();
        tx.batch_execute(&format!(
            "INSERT INTO sfm_limit.{table} AS t (id, {cols}, _sfm_version, _sfm_commit_number,
                 _sfm_deleted)
             SELECT DISTINCT ON (id) id, {cols}, v, n, deleted FROM stage_{table}
             ORDER BY id, v DESC, n DESC
             ON CONFLICT (id) DO UPDATE SET {set}, _sfm_version = EXCLUDED._sfm_version,
                 _sfm_commit_number = EXCLUDED._sfm_commit_number,
                 _sfm_deleted = EXCLUDED._sfm_deleted, _sfm_synced_at = now()
             WHERE (t._sfm_version, coalesce(t._sfm_commit_number, -1))
                   <= (EXCLUDED._sfm_version, coalesce(EXCLUDED._sfm_commit_number, -1))",
            cols = names.join(", "),
            set = set.join(", "),
        ))
        .await?;
    }
    tx.commit().await?;
    Ok(t0.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sfmirror::telemetry::init_logging();
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let db = BenchDb::create("sfm_bench").await?;
    let external = std::env::args().any(|a| a == "external");
    let (source, start_tip, end_tip) = if external {
        external_backlog(n).await?
    } else {
        in_process_backlog(n).await?
    };
    let result = run(n, &db.url, &source, start_tip, end_tip).await;
    if let Source::InProcess(e) = source {
        e.stop().await;
    }
    db.drop().await?;
    result
}

/// Where the backlog is served from.
enum Source {
    InProcess(Box<Emulator>),
    External(EmulatorProcess),
}

impl Source {
    /// The `[salesforce]` config section that logs in to this emulator.
    fn salesforce_toml(&self) -> String {
        match self {
            Source::InProcess(e) => format!(
                "[salesforce]\nlogin_url = \"{}\"\nauth = \"client_credentials\"\n\
                 client_id = \"{}\"\nclient_secret = \"{}\"\npubsub_endpoint = \"{}\"\n",
                e.rest_url, e.credentials.client_id, e.credentials.client_secret, e.pubsub_endpoint
            ),
            Source::External(p) => p.salesforce_toml(),
        }
    }
}

/// Starts `sfmirror emulator --backlog N:...` and reads its start-up line; the backlog's
/// replay ids run from just after the bus's first id to the tip the stats report.
async fn external_backlog(n: usize) -> anyhow::Result<(Source, u64, u64)> {
    let t0 = Instant::now();
    let emulator =
        EmulatorProcess::start(&["--backlog", &format!("{n}:Account,Contact,Opportunity")])?;
    let rest = emulator.get("rest_url");
    let stats: serde_json::Value = reqwest::get(format!("{rest}/emulator/stats"))
        .await?
        .json()
        .await?;
    let end_tip = stats["tip_replay_id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no tip in the emulator's stats"))?;
    println!(
        "backlog: {n} events built by the emulator process in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // The bus hands out ids after 1,000,000; the backlog is everything after that.
    Ok((Source::External(emulator), 1_000_000, end_tip))
}

/// The backlog built in this process: creates, then updates and deletes, over three objects.
async fn in_process_backlog(n: usize) -> anyhow::Result<(Source, u64, u64)> {
    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let org = emulator.org.clone();
    let start_tip = org.bus.tip();
    // The backlog: creates, then updates and deletes, over three objects.
    let t0 = Instant::now();
    let objects = ["Account", "Contact", "Opportunity"];
    let mut ids: Vec<(usize, String)> = Vec::new();
    let mut made = 0usize;
    while made < n {
        let i = made;
        let o = i % 3;
        let roll = i % 10;
        if roll < 5 || ids.len() < 10 {
            let fields = match o {
                0 => json!({"Name": format!("Account {i}"), "BillingCity": "Paris",
                            "NumberOfEmployees": i % 1000, "Industry": "Energy"}),
                1 => json!({"LastName": format!("Contact {i}"), "Email": "c@example.com"}),
                _ => json!({"Name": format!("Deal {i}"), "StageName": "Prospecting",
                            "CloseDate": "2027-01-31", "Amount": 1000.5}),
            };
            let map = fields.as_object().cloned().unwrap_or_default();
            let id = org
                .create(objects[o], &map, "")
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            ids.push((o, id));
        } else if roll < 9 {
            let (o, id) = &ids[(i * 7919) % ids.len()];
            let field = if *o == 1 { "Title" } else { "Description" };
            let map = json!({ field: format!("update {i}") })
                .as_object()
                .cloned()
                .unwrap_or_default();
            if org.update(objects[*o], id, &map, "").is_err() {
                continue;
            }
        } else {
            let (o, id) = ids.swap_remove((i * 104_729) % ids.len());
            if org.delete(objects[o], &id, "").is_err() {
                continue;
            }
        }
        made += 1;
    }
    let end_tip = org.bus.tip();
    println!(
        "backlog: {n} events built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok((Source::InProcess(Box::new(emulator)), start_tip, end_tip))
}

async fn run(
    n: usize,
    url: &str,
    source: &Source,
    start_tip: u64,
    end_tip: u64,
) -> anyhow::Result<()> {
    let cfg = Config::from_toml(&format!(
        r#"
        {salesforce}
        [replica]
        url = "{url}"
        [sync]
        batch_max_events = 5000
        [metrics]
        listen = ""
        [[channels]]
        name = "/data/ChangeEvents"
        objects = ["Account", "Contact", "Opportunity"]
        "#,
        salesforce = source.salesforce_toml(),
    ))?;
    // Start from just before the backlog, as a daemon that was down would.
    let pool = supervisor::prepare_replica(&cfg).await?;
    {
        let c = pool.get().await?;
        c.execute(
            "INSERT INTO sfmirror.checkpoints (channel, replay_id, commit_timestamp)
             VALUES ('/data/ChangeEvents', $1, now())",
            &[&start_tip.to_be_bytes().to_vec()],
        )
        .await?;
    }
    let stop = CancellationToken::new();
    let (cpu_self, cpu_pg) = (cpu_secs(true), cpu_secs(false));
    let t0 = Instant::now();
    let daemon = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        tokio::spawn(async move { supervisor::run(&cfg, stop, None).await })
    };
    let want = end_tip.to_be_bytes().to_vec();
    loop {
        let c = pool.get().await?;
        let row = c
            .query_one(
                "SELECT replay_id FROM sfmirror.checkpoints WHERE channel = '/data/ChangeEvents'",
                &[],
            )
            .await?;
        let at: Vec<u8> = row.get(0);
        if at == want {
            break;
        }
        if daemon.is_finished() {
            anyhow::bail!("the daemon stopped early");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let rate = n as f64 / secs;
    println!(
        "catch-up CPU: daemon + emulator {:.1} s, Postgres {:.1} s (of {secs:.1} s wall, 2 cores)",
        cpu_used(&cpu_self, &cpu_secs(true)),
        cpu_used(&cpu_pg, &cpu_secs(false))
    );
    let rss_note = match source {
        Source::InProcess(_) => "emulator and backlog included",
        Source::External(_) => "the daemon alone",
    };
    println!(
        "catch-up: {n} events in {secs:.2} s = {rate:.0} events/s; peak RSS {:.0} MB ({rss_note})",
        peak_rss_mb()
    );
    stop.cancel();
    let _ = daemon.await;
    let limit_secs = postgres_limit(&pool, n).await?;
    let limit = n as f64 / limit_secs;
    println!(
        "postgres limit: {n} changes as binary COPY + one merge per object in {limit_secs:.2} s = {limit:.0} events/s; catch-up / limit = {:.2} (budget >= 0.7)",
        rate / limit
    );
    drop(pool);
    Ok(())
}
