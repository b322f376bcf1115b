//! The demo's story, step by step, told in plain lines on stdout. Each step proves what it
//! shows (the replica is read back and compared with the org) and fails the demo when the
//! proof does not hold, so a test that runs the demo tests the product.
//!
//! This module sets the stage (replica, emulator, config, org, backfill, daemon, workload);
//! [`proofs`] holds the steps that show a promise kept and the checks behind them;
//! [`follow`] the end: the psql command and `--follow`'s status line.

mod follow;
mod proofs;

use proofs::wait_for;

use super::daemon::{ChildDaemon, Metrics, Samples, human_seconds, log_path};
use super::org::{Control, RestWriter};
use super::postgres::{self, Replica};
use super::{CONTROL_SCHEMA, DATA_SCHEMA, DemoOptions};
use crate::config::Config;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::sync::backfill::{self, BackfillOptions, ChunkProgress, Progress};
use crate::sync::verify::{self, VerifyOptions};
use crate::telemetry as t;
use anyhow::{Context, bail};
use serde_json::{Value as J, json};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The objects of the demo org and their change-event channels.
const OBJECTS: &[(&str, &str)] = &[
    ("Account", "/data/AccountChangeEvent"),
    ("Contact", "/data/ContactChangeEvent"),
    ("Opportunity", "/data/OpportunityChangeEvent"),
    ("Invoice__c", "/data/Invoice__ChangeEvent"),
];

/// The objects the live workload changes. Account is left to the demo's own, exact changes
/// (merge, gap, overflow, new field), so what it shows cannot be blurred by random ones.
const WORKLOAD_OBJECTS: &[&str] = &["Contact", "Opportunity", "Invoice__c"];

/// How big the run is: the full story, or the short one for tests.
struct Sizes {
    seed: [usize; 4],
    rate: f64,
    overflow_threshold: usize,
    down: Duration,
    chunk_rows: u32,
    bulk_threshold: u64,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                seed: [150, 150, 60, 60],
                rate: 50.0,
                overflow_threshold: 25,
                down: Duration::from_secs(1),
                chunk_rows: 50,
                bulk_threshold: 100,
            }
        } else {
            Sizes {
                seed: [1200, 1200, 600, 600],
                rate: 200.0,
                overflow_threshold: 100,
                down: Duration::from_secs(3),
                chunk_rows: 200,
                bulk_threshold: 1000,
            }
        }
    }
}

/// Plain lines on stdout: a heading per step with the time since the start, details indented.
struct Out {
    t0: Instant,
    tty: bool,
}

impl Out {
    fn step(&self, title: &str) {
        println!("\n[{:>5.1}s] {title}", self.t0.elapsed().as_secs_f64());
    }

    fn line(&self, text: impl AsRef<str>) {
        println!("         {}", text.as_ref());
    }
}

/// Everything the story runs: the replica, the emulator, the daemon, the config they share.
struct Story {
    opts: DemoOptions,
    sizes: Sizes,
    out: Out,
    replica: Replica,
    db: tokio_postgres::Client,
    emulator: Emulator,
    control: Control,
    writer: RestWriter,
    cfg: Config,
    config_path: PathBuf,
    log: PathBuf,
    metrics_listen: String,
    metrics: Metrics,
    daemon: Option<ChildDaemon>,
}

/// Sets everything up, tells the story (and follows, if asked) until done or Ctrl-C, then
/// stops the daemon and the emulator; the replica's cluster, if the demo started one, is
/// removed when `Story` is dropped.
pub(super) async fn run(
    opts: &DemoOptions,
    dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let out = Out {
        t0: Instant::now(),
        tty: std::io::stdout().is_terminal(),
    };
    out.step("Replica: finding a PostgreSQL server");
    let replica = tokio::select! {
        r = postgres::choose(opts.database_url.as_deref(), opts.embedded, dir) => r?,
        _ = shutdown.cancelled() => return Ok(()),
    };
    out.line(format!("using {}", replica.describe()));
    let (db, conn) = tokio_postgres::connect(replica.url(), tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {}", postgres::redact(replica.url())))?;
    tokio::spawn(conn);
    db.batch_execute(&format!(
        "SET client_min_messages = warning;
         DROP SCHEMA IF EXISTS {DATA_SCHEMA} CASCADE; DROP SCHEMA IF EXISTS {CONTROL_SCHEMA} CASCADE;"
    ))
    .await
    .context("recreating the demo's schemas")?;
    out.line(format!(
        "schemas {DATA_SCHEMA} (data) and {CONTROL_SCHEMA} (control) recreated; nothing else \
         is touched"
    ));

    let emulator = Emulator::start(EmulatorConfig::default()).await?;
    let metrics_listen = free_address()?;
    let config_path = dir.join("sfmirror-demo.toml");
    let text = config_text(&emulator, replica.url(), &metrics_listen);
    write_private(&config_path, &text)?;
    let cfg = Config::load(&config_path)
        .with_context(|| format!("loading the generated {}", config_path.display()))?;
    let mut story = Story {
        opts: opts.clone(),
        sizes: Sizes::new(opts.quick),
        control: Control::new(&emulator),
        writer: RestWriter::new(&emulator),
        metrics: Metrics::new(&metrics_listen),
        log: log_path(dir),
        out,
        replica,
        db,
        emulator,
        cfg,
        config_path,
        metrics_listen,
        daemon: None,
    };
    let outcome = tokio::select! {
        r = story.tell(&shutdown) => r,
        _ = shutdown.cancelled() => {
            println!("\ninterrupted: stopping the daemon and the emulator, cleaning up");
            Ok(())
        }
    };
    if let Err(e) = &outcome {
        println!("\nthe demo failed: {e:#}");
        println!("the daemon's log: {}", story.log.display());
        if let Ok(log) = std::fs::read_to_string(&story.log) {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            for line in tail.into_iter().rev() {
                println!("  | {line}");
            }
        }
    }
    story.finish().await;
    outcome
}

impl Story {
    async fn tell(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.seed().await?;
        self.backfill().await?;
        self.start_daemon("Daemon: `sfmirror run` started as a child process")
            .await?;
        self.workload().await?;
        self.merge().await?;
        self.gap().await?;
        self.overflow().await?;
        self.crash().await?;
        self.new_field().await?;
        self.verify().await?;
        self.metrics_report().await?;
        self.psql();
        if self.opts.follow {
            self.follow(shutdown).await?;
        }
        Ok(())
    }

    async fn finish(mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop().await;
        }
        self.emulator.stop().await;
        // The cluster (if any) goes with `self.replica`.
    }

    async fn seed(&mut self) -> anyhow::Result<()> {
        self.out.step("Org: seeding the emulated Salesforce org");
        self.out.line(format!(
            "emulator serving REST at {} and Pub/Sub at {}",
            self.emulator.rest_url, self.emulator.pubsub_endpoint
        ));
        let mut total = 0;
        for (i, ((object, _), n)) in OBJECTS.iter().zip(self.sizes.seed).enumerate() {
            // No events: these records exist before the replica does, like an org's history.
            self.control
                .post(
                    "seed",
                    json!({"object": object, "count": n, "seed": i + 1, "events": false,
                           "ids": false}),
                )
                .await?;
            let fields = self
                .emulator
                .org
                .object(object)
                .map(|d| d.describe.fields.len())
                .unwrap_or(0);
            self.out.line(format!(
                "{object:<12} {n:>5} records ({fields} fields each)"
            ));
            total += n;
        }
        self.out.line(format!(
            "{total} records; Invoice__c is a custom object with a field of every type"
        ));
        Ok(())
    }

    async fn backfill(&mut self) -> anyhow::Result<()> {
        self.out
            .step("Backfill: `sfmirror backfill` snapshots every object into the replica");
        let total: usize = self.sizes.seed.iter().sum();
        let meter = Arc::new(Meter::new(total as u64, self.out.tty));
        let mut opts = BackfillOptions::new(Vec::new(), None);
        opts.progress = Progress::Quiet;
        opts.chunk_rows = self.sizes.chunk_rows;
        opts.bulk_threshold = self.sizes.bulk_threshold;
        opts.bulk_poll = (Duration::from_millis(50), Duration::from_millis(500));
        let hook = meter.clone();
        opts.on_chunk = Some(Arc::new(move |p: &ChunkProgress| hook.chunk(p)));
        let report = backfill::backfill_with(&self.cfg, &opts).await?;
        meter.done();
        for o in &report.objects {
            self.out.line(o.to_string());
        }
        if !report.is_complete() {
            bail!("the backfill did not complete");
        }
        let rows = self.replica_live_total().await?;
        if rows != total as i64 {
            bail!("the replica holds {rows} rows after the backfill, the org {total}");
        }
        self.out.line(format!(
            "replica: {rows} rows in {DATA_SCHEMA}.account, .contact, .opportunity, .invoice__c"
        ));
        Ok(())
    }

    async fn start_daemon(&mut self, title: &str) -> anyhow::Result<()> {
        self.out.step(title);
        let mut daemon = ChildDaemon::spawn(&self.config_path, &self.log, self.opts.verbose)?;
        self.out.line(format!(
            "{} run --config {}   (pid {}; log {})",
            exe_name(),
            self.config_path.display(),
            daemon.pid,
            self.log.display()
        ));
        let t0 = Instant::now();
        self.metrics
            .wait_ready(Duration::from_secs(90), || daemon.exited().is_none())
            .await?;
        self.out.line(format!(
            "ready in {:.1} s: {} channels subscribed over Pub/Sub; /metrics at http://{}/metrics",
            t0.elapsed().as_secs_f64(),
            self.cfg.channels.len(),
            self.metrics_listen
        ));
        self.daemon = Some(daemon);
        Ok(())
    }

    async fn workload(&mut self) -> anyhow::Result<()> {
        self.out.step("Workload: live changes in the org");
        self.control
            .post(
                "workload",
                json!({"rate": self.sizes.rate, "objects": WORKLOAD_OBJECTS}),
            )
            .await?;
        self.out.line(format!(
            "{} changes/s (creates, updates, deletes, undeletes) over {}",
            self.sizes.rate,
            WORKLOAD_OBJECTS.join(", ")
        ));
        let metrics = &self.metrics;
        let took = wait_for("the first change events to be applied", 60, async || {
            Ok(metrics
                .scrape()
                .await
                .map(|s| s.sum(t::EVENTS_TOTAL))
                .unwrap_or(0.0)
                > 0.0)
        })
        .await?;
        let applied = self.metrics.scrape().await?.sum(t::EVENTS_TOTAL);
        self.out.line(format!(
            "change events arriving over Pub/Sub and applied: {applied:.0} after {:.1} s",
            took.as_secs_f64()
        ));
        Ok(())
    }

    /// A row as JSON (column -> value).
    async fn row(&self, table: &str, id: &str) -> anyhow::Result<serde_json::Map<String, J>> {
        let text: String = self
            .db
            .query_one(
                &format!("SELECT to_jsonb(t)::text FROM {DATA_SCHEMA}.{table} t WHERE id = $1"),
                &[&id],
            )
            .await?
            .get(0);
        match serde_json::from_str(&text)? {
            J::Object(m) => Ok(m),
            other => bail!("row {id} is not an object: {other}"),
        }
    }

    async fn replica_live_total(&self) -> anyhow::Result<i64> {
        let mut n = 0;
        for (object, _) in OBJECTS {
            let table = object.to_ascii_lowercase();
            let row = self
                .db
                .query_one(
                    &format!("SELECT count(*) FROM {DATA_SCHEMA}.{table} WHERE NOT _sfm_deleted"),
                    &[],
                )
                .await?;
            n += row.get::<_, i64>(0);
        }
        Ok(n)
    }

    async fn workload_changes(&self) -> anyhow::Result<u64> {
        let stats = self.control.stats().await?;
        Ok(stats["workload"]["changes"].as_u64().unwrap_or(0))
    }
}

/// `channel="/data/X"` as `/data/X`.
fn labels_short(labels: &str) -> String {
    labels
        .split(',')
        .filter_map(|l| l.split_once('=').map(|(_, v)| v.trim_matches('"')))
        .collect::<Vec<_>>()
        .join(",")
}

fn show(v: Option<&J>) -> String {
    match v {
        None | Some(J::Null) => "(null)".to_string(),
        Some(J::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// How this program was started, for the commands the demo suggests.
fn exe_name() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "sfmirror".to_string())
}

/// Backfill progress: a bar on a terminal, a plain line at every quarter otherwise.
struct Meter {
    total: u64,
    bar: Option<indicatif::ProgressBar>,
    state: Mutex<(u64, u64)>,
}

impl Meter {
    fn new(total: u64, tty: bool) -> Meter {
        let bar = tty.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::stdout(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "         [{bar:30}] {pos}/{len} rows  {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Meter {
            total,
            bar,
            state: Mutex::new((0, 1)),
        }
    }

    fn chunk(&self, p: &ChunkProgress) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.0 += p.rows as u64;
        let done = state.0;
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(p.object.clone());
            return;
        }
        // Quarters crossed since the last line.
        while state.1 <= 4 && done * 4 >= state.1 * self.total {
            println!(
                "         backfill: {done}/{} rows ({}%), {} {}/{}",
                self.total,
                state.1 * 25,
                p.object,
                p.applied,
                p.total
            );
            state.1 += 1;
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A free address on 127.0.0.1 for the daemon's metrics listener.
fn free_address() -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.to_string())
}

/// Writes `text` to `path`, readable by this user only (it holds the replica URL).
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The daemon's config for the demo: the emulator's login and endpoints, the replica, the
/// demo's schemas, the metrics listener, short HA leases (a restarted daemon takes its
/// channels back within seconds), and a channel per object.
fn config_text(emulator: &Emulator, replica_url: &str, metrics_listen: &str) -> String {
    let mut text = format!(
        "# Written by `sfmirror demo` for its emulator and replica; removed when the demo ends.\n\
         [salesforce]\n\
         login_url = \"{rest}\"\n\
         auth = \"client_credentials\"\n\
         client_id = \"{id}\"\n\
         client_secret = \"{secret}\"\n\
         pubsub_endpoint = \"{grpc}\"\n\n\
         [replica]\n\
         url = \"{db}\"\n\
         schema = \"{DATA_SCHEMA}\"\n\
         control_schema = \"{CONTROL_SCHEMA}\"\n\n\
         [metrics]\n\
         listen = \"{metrics_listen}\"\n\n\
         [ha]\n\
         # The lease of a killed daemon expires after this; its restart then takes over.\n\
         takeover_secs = 2\n\n\
         [sync]\n\
         # The repair worker looks for due repairs this often when idle.\n\
         repair_idle_ms = 200\n",
        rest = emulator.rest_url,
        id = emulator.credentials.client_id,
        secret = emulator.credentials.client_secret,
        grpc = emulator.pubsub_endpoint,
        db = replica_url,
    );
    for (object, channel) in OBJECTS {
        text.push_str(&format!(
            "\n[[channels]]\nname = \"{channel}\"\nobjects = [\"{object}\"]\n"
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_print_as_their_values() {
        assert_eq!(
            labels_short(r#"channel="/data/AccountChangeEvent""#),
            "/data/AccountChangeEvent"
        );
        assert_eq!(labels_short(""), "");
    }

    #[tokio::test]
    async fn the_generated_config_loads() {
        let emulator = Emulator::start(EmulatorConfig::default())
            .await
            .expect("emulator");
        let text = config_text(
            &emulator,
            "postgres://postgres@127.0.0.1:5432/postgres",
            "127.0.0.1:9999",
        );
        let cfg = Config::from_toml(&text).expect("the demo's config is valid");
        assert_eq!(cfg.replica.schema, DATA_SCHEMA);
        assert_eq!(cfg.replica.control_schema, CONTROL_SCHEMA);
        assert_eq!(cfg.channels.len(), OBJECTS.len());
        assert_eq!(cfg.ha.takeover_secs, 2);
        emulator.stop().await;
    }
}
