//! Catch-up throughput: the daemon applies a backlog of change events from the emulator.
//!
//! Budget (design.md): >= 50,000 events/s for a 1,000,000-event backlog of mixed
//! CREATE / UPDATE / DELETE over 3 objects, >= 0.7 x the Postgres limit, peak RSS <= 100 MB.
//! Run with
//! `DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres cargo bench --bench catchup [-- N [external]]`
//! (N events, default 200,000).
//!
//! By default the emulator runs in the same process with a narrow backlog made here (creates
//! of 4 fields, updates of one), so the reported peak RSS covers both and the backlog itself.
//! With `external`, the emulator runs as its own process (`sfmirror emulator --backlog
//! N:Account,Contact,Opportunity`: the emulator's random mix of creates with every field,
//! updates of 1 to 3 random fields, deletes and undeletes, built before it serves), so the peak
//! RSS printed is the daemon's alone. That is the budget's run.
//!
//! After the catch-up, the same run measures the Postgres limit the budget compares with: the
//! bench reads the same backlog back from the emulator, lays every change out as one row (its
//! record, stream position, version, kind, every column's value and a mask of the columns it
//! writes), and times one binary COPY per object into a staging table plus one set-based merge
//! per object into a fresh copy of the replica's table, in one transaction. The merge gives
//! each record, per column, the value of the last change that wrote it. It prints both rates
//! and their ratio (budget: >= 0.7), and fails unless the limit's tables equal the daemon's
//! replica in every row and column: a cheaper merge that leaves a different table (say, the
//! newest change per record written whole, which nulls what earlier UPDATEs set) would not be
//! the same work.

mod common;

use common::{BenchDb, EmulatorProcess, peak_rss_mb};
use futures::SinkExt;
use serde_json::json;
use sfmirror::config::Config;
use sfmirror::emulator::{Emulator, EmulatorConfig};
use sfmirror::model::{ChangeEvent, ChangeType, ReplayId};
use sfmirror::replica::binary;
use sfmirror::replica::schema::TableSchema;
use sfmirror::salesforce::Salesforce;
use sfmirror::salesforce::event::EventPlan;
use sfmirror::salesforce::pubsub::StartAt;
use sfmirror::sync::setup::Setup;
use sfmirror::sync::supervisor;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Which processes a CPU sample covers.
#[derive(Clone, Copy)]
enum Procs {
    /// This process: the daemon (and, in-process, the emulator).
    Myself,
    /// The emulator process of an external run.
    Pid(u32),
    /// Every Postgres process, by pid.
    Postgres,
}

/// CPU seconds (user + system) used so far per process of `procs`, to see which side is busy.
fn cpu_secs(procs: Procs) -> HashMap<String, f64> {
    let ticks = |stat: &str| -> Option<(String, f64)> {
        let (head, rest) = stat.rsplit_once(") ")?;
        let comm = head.split_once(" (")?.1.to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let t = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some((comm, t / 100.0))
    };
    let one = |path: String| -> HashMap<String, f64> {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| ticks(&s))
            .map(|(_, t)| (path, t))
            .into_iter()
            .collect()
    };
    match procs {
        Procs::Myself => one("/proc/self/stat".to_string()),
        Procs::Pid(pid) => one(format!("/proc/{pid}/stat")),
        Procs::Postgres => {
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
    }
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

/// A staging buffer in COPY's binary format for one object: header, then one row per change
/// and record.
struct Stage {
    table: TableSchema,
    buf: Vec<u8>,
    rows: usize,
}

/// What a staged change does to its record (the `_kind` column).
const KIND_UPSERT: i16 = 0;
const KIND_MERGE: i16 = 1;
const KIND_DELETE: i16 = 2;

impl Stage {
    fn new(table: TableSchema) -> Stage {
        Stage {
            table,
            buf: binary::COPY_HEADER.to_vec(),
            rows: 0,
        }
    }

    fn field(&mut self, value: Option<&[u8]>) {
        binary::put_field(&mut self.buf, value);
    }

    /// One change, as the daemon reads it: id, stream position, version, commit number,
    /// kind, then every column's value and a bit mask of the columns the change writes. A CREATE / UNDELETE
    /// writes every column of its schema (absent: NULL); an UPDATE writes the changed fields
    /// that have a value and nulls the nulled ones; a DELETE writes none.
    fn push(&mut self, seq: i64, event: &ChangeEvent) -> anyhow::Result<()> {
        let h = &event.header;
        let width = self.table.columns.len();
        let mut values: Vec<Option<Vec<u8>>> = vec![None; width];
        let mut written = vec![false; width];
        let column = |path: &Arc<str>| {
            self.table
                .column_for(path)
                .ok_or_else(|| anyhow::anyhow!("{}: no column for {path}", h.entity_name))
        };
        let encode = |col: usize, path: &str| -> anyhow::Result<Option<Vec<u8>>> {
            event
                .value(path)
                .map(|v| binary::encode(&self.table.columns[col].pg_type, v))
                .transpose()
                .map_err(|e| anyhow::anyhow!("{}.{path}: {e}", h.entity_name))
        };
        let kind = match h.change_type {
            ChangeType::Create | ChangeType::Undelete => {
                for path in event.schema_fields.iter() {
                    let col = column(path)?;
                    values[col] = encode(col, path)?;
                    written[col] = true;
                }
                KIND_UPSERT
            }
            ChangeType::Update => {
                for path in &h.changed_fields {
                    let col = column(path)?;
                    if let Some(v) = encode(col, path)? {
                        values[col] = Some(v);
                        written[col] = true;
                    }
                }
                for path in &h.nulled_fields {
                    let col = column(path)?;
                    values[col] = None;
                    written[col] = true;
                }
                KIND_MERGE
            }
            ChangeType::Delete => KIND_DELETE,
            other => {
                anyhow::bail!("the backlog holds a {other:?} event, which the limit does not model")
            }
        };
        // Bit k (bytea bit numbering: least significant first) says column k is written.
        let mut mask = vec![0u8; width.div_ceil(8)];
        for (k, _) in written.iter().enumerate().filter(|(_, w)| **w) {
            mask[k / 8] |= 1 << (k % 8);
        }
        for id in &h.record_ids {
            self.buf
                .extend_from_slice(&(6 + width as i16).to_be_bytes());
            self.field(Some(id.as_bytes()));
            self.field(Some(&seq.to_be_bytes()));
            self.field(Some(&h.commit_timestamp.to_be_bytes()));
            self.field(Some(&h.commit_number.to_be_bytes()));
            self.field(Some(&kind.to_be_bytes()));
            for v in &values {
                self.field(v.as_deref());
            }
            self.field(Some(&mask));
            self.rows += 1;
        }
        Ok(())
    }
}

/// Reads the backlog (replay ids after `start_tip` up to `end_tip`) of `/data/ChangeEvents`
/// from the emulator as the daemon does, and hands each decoded change to `each`.
async fn read_backlog(
    cfg: &Config,
    start_tip: u64,
    end_tip: u64,
    mut each: impl FnMut(ChangeEvent) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let pubsub = Salesforce::new(&cfg.salesforce)?.pubsub()?;
    let mut plans: HashMap<String, EventPlan> = HashMap::new();
    let mut sub = pubsub
        .subscribe(ALL_CHANGES, StartAt::After(ReplayId::from_u64(start_tip)))
        .await?;
    let end = ReplayId::from_u64(end_tip);
    while let Some(msg) = sub.next().await? {
        for ce in msg.events {
            let Some(event) = ce.event else { continue };
            if !plans.contains_key(&event.schema_id) {
                let json = pubsub.get_schema(&event.schema_id).await?;
                plans.insert(
                    event.schema_id.clone(),
                    EventPlan::from_json(&event.schema_id, &json)?,
                );
            }
            let plan = &plans[&event.schema_id];
            let replay_id = ReplayId(ce.replay_id.to_vec());
            let last = replay_id == end;
            each(plan.decode(replay_id, &event.payload)?.0)?;
            if last {
                return Ok(());
            }
        }
    }
    anyhow::bail!("the backlog's stream ended before replay id {end_tip}")
}

/// Lays every change of the backlog out for COPY, per object.
async fn stage_backlog(
    cfg: &Config,
    start_tip: u64,
    end_tip: u64,
) -> anyhow::Result<HashMap<String, Stage>> {
    let rest = Salesforce::new(&cfg.salesforce)?.rest;
    let mut stages = HashMap::new();
    for object in OBJECTS {
        let table = TableSchema::from_describe(rest.describe(object).await?)?;
        stages.insert(object.to_string(), Stage::new(table));
    }
    let mut seq = 0i64;
    read_backlog(cfg, start_tip, end_tip, |event| {
        if let Some(stage) = stages.get_mut(&*event.header.entity_name) {
            stage.push(seq, &event)?;
            seq += 1;
        }
        Ok(())
    })
    .await?;
    Ok(stages)
}

/// The Postgres limit: the staged changes as one binary COPY per object into a staging table,
/// plus one set-based merge per object into a fresh copy of the replica's table, in one
/// transaction. The merge gives each record, per column, the value of the last change that
/// wrote it (the staging rows sorted by record and stream position once, one `array_agg` per
/// column over them), keeps what the table had where no change wrote, and takes the version
/// and commit number of the record's last change and its deleted flag from its last CREATE,
/// UNDELETE or DELETE; the version guard sits in `ON CONFLICT`. Returns the seconds it took,
/// and how many of them went to COPY.
async fn postgres_limit(
    pool: &deadpool_postgres::Pool,
    stages: &HashMap<String, Stage>,
) -> anyhow::Result<(f64, f64)> {
    let mut client = pool.get().await?;
    let mut setup =
        String::from("DROP SCHEMA IF EXISTS sfm_limit CASCADE; CREATE SCHEMA sfm_limit;");
    for stage in stages.values() {
        let t = &stage.table;
        let defs: Vec<String> = t
            .columns
            .iter()
            .enumerate()
            .map(|(k, c)| format!("c{k} {}", c.pg_type.sql()))
            .collect();
        setup.push_str(&format!(
            "CREATE TABLE sfm_limit.{table} (LIKE {DATA_SCHEMA}.{table} INCLUDING ALL);
             CREATE TEMP TABLE {stage} (_id text, _seq bigint, _v bigint, _n bigint,
                 _kind smallint, {defs}, _mask bytea);",
            table = quote(&t.table),
            stage = quote(&format!("stage_{}", t.table)),
            defs = defs.join(", ")
        ));
    }
    client.batch_execute(&setup).await?;
    let t0 = Instant::now();
    let mut copying = 0.0;
    let tx = client.transaction().await?;
    for stage in stages.values() {
        let t = &stage.table;
        let table = quote(&t.table);
        let staging = quote(&format!("stage_{}", t.table));
        let copy_started = Instant::now();
        let sink = tx
            .copy_in(&format!("COPY {staging} FROM STDIN (FORMAT binary)"))
            .await?;
        futures::pin_mut!(sink);
        for chunk in stage.buf.chunks(1 << 20) {
            sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
        }
        sink.send(bytes::Bytes::from_static(b"\xff\xff")).await?;
        sink.finish().await?;
        copying += copy_started.elapsed().as_secs_f64();
        let data: Vec<(usize, String)> = t
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.name != "id")
            .map(|(k, c)| (k, quote(&c.name)))
            .collect();
        let last = |a: &str| format!("{a}[cardinality({a})]");
        let cols = data.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>();
        let aggs: String = data
            .iter()
            .map(|(k, _)| {
                format!(", array_agg(c{k}) FILTER (WHERE get_bit(_mask, {k}) = 1) AS a{k}")
            })
            .collect();
        let picks: String = data
            .iter()
            .map(|(k, c)| {
                format!(
                    ", CASE WHEN g.a{k} IS NULL THEN o.{c} ELSE {} END",
                    last(&format!("g.a{k}"))
                )
            })
            .collect();
        let set: String = cols
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}, "))
            .collect();
        tx.batch_execute(&format!(
            "INSERT INTO sfm_limit.{table} AS t (id, {cols}, _sfm_version, _sfm_commit_number,
                 _sfm_deleted)
             SELECT g._id{picks}, {v}, {n},
                    CASE WHEN g.del IS NULL THEN coalesce(o._sfm_deleted, false) ELSE {del} END
             FROM (SELECT _id, array_agg(_v) AS v, array_agg(_n) AS n,
                          array_agg(_kind = {KIND_DELETE}) FILTER (WHERE _kind <> {KIND_MERGE})
                              AS del{aggs}
                   FROM (SELECT * FROM {staging} ORDER BY _id, _seq) s GROUP BY _id) g
             LEFT JOIN sfm_limit.{table} o ON o.id = g._id
             ON CONFLICT (id) DO UPDATE SET {set}_sfm_version = EXCLUDED._sfm_version,
                 _sfm_commit_number = EXCLUDED._sfm_commit_number,
                 _sfm_deleted = EXCLUDED._sfm_deleted, _sfm_synced_at = now()
             WHERE (t._sfm_version, coalesce(t._sfm_commit_number, -1))
                   <= (EXCLUDED._sfm_version, coalesce(EXCLUDED._sfm_commit_number, -1))",
            cols = cols.join(", "),
            v = last("g.v"),
            n = last("g.n"),
            del = last("g.del"),
        ))
        .await?;
    }
    tx.commit().await?;
    Ok((t0.elapsed().as_secs_f64(), copying))
}

/// Rows (every column but `_sfm_synced_at`) in which the daemon's replica and the limit's
/// table differ, per table: the limit only counts if it did the same work.
async fn compare_with_limit(
    pool: &deadpool_postgres::Pool,
    stages: &HashMap<String, Stage>,
) -> anyhow::Result<Vec<(String, i64)>> {
    let client = pool.get().await?;
    let mut out = Vec::new();
    for stage in stages.values() {
        let t = &stage.table;
        let cols: String = t
            .columns
            .iter()
            // Derived columns (a person name, formulas) are written by re-reads from the org,
            // not by the stream the limit's merge stands for.
            .filter(|c| c.name != "id" && !c.derived)
            .map(|c| format!("{}, ", quote(&c.name)))
            .collect();
        let select = |schema: &str| {
            format!(
                "SELECT id, {cols}_sfm_version, _sfm_commit_number, _sfm_deleted
                 FROM {schema}.{}",
                quote(&t.table)
            )
        };
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM (({a} EXCEPT ALL {b}) UNION ALL ({b} EXCEPT ALL {a})) d",
                    a = select(DATA_SCHEMA),
                    b = select("sfm_limit")
                ),
                &[],
            )
            .await?;
        out.push((t.table.clone(), row.get(0)));
    }
    Ok(out)
}

/// The backlog's objects, and the channel that carries them all.
const OBJECTS: [&str; 3] = ["Account", "Contact", "Opportunity"];
const ALL_CHANGES: &str = "/data/ChangeEvents";

/// Where the replica's tables are (the config's default).
const DATA_SCHEMA: &str = "salesforce";

/// Double-quotes a Postgres identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sfmirror::telemetry::init_logging();
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let rounds: usize = std::env::args()
        .find_map(|a| a.strip_prefix("rounds=").and_then(|r| r.parse().ok()))
        .unwrap_or(1)
        .max(1);
    let external = std::env::args().any(|a| a == "external");
    let (source, start_tip, end_tip) = if external {
        external_backlog(n).await?
    } else {
        in_process_backlog(n).await?
    };
    let mut results = Vec::new();
    for round in 1..=rounds {
        if rounds > 1 {
            println!("round {round} of {rounds}");
            // Each round's peak RSS is its own: the kernel resets VmHWM on "5".
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
        let db = BenchDb::create(&format!("sfm_bench_r{round}")).await?;
        let result = run(n, &db.url, &source, start_tip, end_tip).await;
        db.drop().await?;
        results.push(result?);
    }
    if let Source::InProcess(e) = source {
        e.stop().await;
    }
    if rounds > 1 {
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let list = |v: &[f64], digits: usize| {
            v.iter()
                .map(|x| format!("{x:.digits$}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rates: Vec<f64> = results.iter().map(|r| r.rate).collect();
        let ratios: Vec<f64> = results.iter().map(|r| r.ratio).collect();
        let rss: Vec<f64> = results.iter().map(|r| r.peak_rss_mb).collect();
        println!(
            "{rounds} rounds: catch-up events/s {} (median {:.0}); catch-up / limit {} (median {:.2}); peak RSS MB {} (only round 1's is the daemon's alone: later rounds start with what the limit's staging left in the allocator)",
            list(&rates, 0),
            median(rates.clone()),
            list(&ratios, 2),
            median(ratios.clone()),
            list(&rss, 0),
        );
    }
    Ok(())
}

/// One round's numbers.
struct RoundResult {
    rate: f64,
    ratio: f64,
    peak_rss_mb: f64,
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
                .create(OBJECTS[o], &map, "")
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            ids.push((o, id));
        } else if roll < 9 {
            let (o, id) = &ids[(i * 7919) % ids.len()];
            let field = if *o == 1 { "Title" } else { "Description" };
            let map = json!({ field: format!("update {i}") })
                .as_object()
                .cloned()
                .unwrap_or_default();
            if org.update(OBJECTS[*o], id, &map, "").is_err() {
                continue;
            }
        } else {
            let (o, id) = ids.swap_remove((i * 104_729) % ids.len());
            if org.delete(OBJECTS[o], &id, "").is_err() {
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
) -> anyhow::Result<RoundResult> {
    let cfg = Config::from_toml(&format!(
        r#"
        {salesforce}
        [replica]
        url = "{url}"
        [sync]
        [metrics]
        listen = ""
        [[channels]]
        name = "{ALL_CHANGES}"
        objects = {OBJECTS:?}
        "#,
        salesforce = source.salesforce_toml(),
    ))?;
    // Start from just before the backlog, as a daemon that was down would.
    let replica = Setup::connect(&cfg).await?;
    replica.migrate().await?;
    let pool = replica.pool;
    {
        let c = pool.get().await?;
        c.execute(
            "INSERT INTO sfmirror.checkpoints (channel, replay_id, commit_timestamp)
             VALUES ($1, $2, now())",
            &[&ALL_CHANGES, &start_tip.to_be_bytes().to_vec()],
        )
        .await?;
    }
    let stop = CancellationToken::new();
    let mut sides = vec![("daemon", Procs::Myself), ("Postgres", Procs::Postgres)];
    match source {
        Source::InProcess(_) => sides[0].0 = "daemon + emulator",
        Source::External(p) => sides.push(("emulator", Procs::Pid(p.pid()))),
    }
    let before: Vec<_> = sides.iter().map(|(_, p)| cpu_secs(*p)).collect();
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
                "SELECT replay_id FROM sfmirror.checkpoints WHERE channel = $1",
                &[&ALL_CHANGES],
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
    let used: Vec<String> = sides
        .iter()
        .zip(&before)
        .map(|((name, p), b)| format!("{name} {:.1} s", cpu_used(b, &cpu_secs(*p))))
        .collect();
    println!(
        "catch-up CPU: {} (of {secs:.1} s wall, 2 cores)",
        used.join(", ")
    );
    let peak_rss_mb = peak_rss_mb();
    let rss_note = match source {
        Source::InProcess(_) => "emulator and backlog included",
        Source::External(_) => "the daemon alone",
    };
    println!(
        "catch-up: {n} events in {secs:.2} s = {rate:.0} events/s; peak RSS {peak_rss_mb:.0} MB ({rss_note})"
    );
    stop.cancel();
    let _ = daemon.await;
    let stages = stage_backlog(&cfg, start_tip, end_tip).await?;
    let (limit_secs, copy_secs) = postgres_limit(&pool, &stages).await?;
    let limit = n as f64 / limit_secs;
    for (table, differing) in compare_with_limit(&pool, &stages).await? {
        anyhow::ensure!(
            differing == 0,
            "{table}: {differing} rows differ between the replica and the limit's merge"
        );
    }
    println!(
        "postgres limit: {n} changes as binary COPY + one merge per object in {limit_secs:.2} s (COPY {copy_secs:.2} s) = {limit:.0} events/s; catch-up / limit = {:.2} (budget >= 0.7); the limit's tables equal the replica's",
        rate / limit
    );
    drop(pool);
    Ok(RoundResult {
        rate,
        ratio: rate / limit,
        peak_rss_mb,
    })
}
