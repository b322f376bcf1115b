//! The command line: clap definitions and one function per command. `main` only parses,
//! initializes telemetry and calls [`run`].

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::emulator::{Emulator, EmulatorConfig};
use crate::sync::supervisor;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "sfmirror",
    version,
    about = "Keeps a PostgreSQL replica of a Salesforce org current through Change Data Capture"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How logs are written to stderr: `text` (coloured only on a terminal), `json` (one
    /// object per line), or `auto` (JSON when stderr is the systemd journal, text otherwise).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "SFMIRROR_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: crate::telemetry::LogFormat,
}

// Parsed once per process: the size of the emulator's flag set does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the replication daemon until SIGINT/SIGTERM (systemd Type=notify).
    Run {
        /// Config file (TOML); every key can be overridden as SFMIRROR__SECTION__KEY.
        #[arg(long, env = "SFMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate the config file and explain what it will do.
    Check {
        #[arg(long, env = "SFMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Snapshot objects from Salesforce into the replica, then exit (safe while `run` runs).
    ///
    /// Reads every record (deleted ones included) of each object with queryAll: over Bulk
    /// API 2.0 above --bulk-threshold records, REST query paging below. Each chunk commits on
    /// its own; an interrupted run resumes from its Bulk job when run again. Exits 0 only if
    /// every object completed.
    Backfill {
        #[arg(long, env = "SFMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Object to snapshot (repeatable); default: every object of every channel.
        #[arg(long = "object", value_name = "NAME")]
        objects: Vec<String>,
        /// Only records modified at or after this time (RFC 3339, e.g. 2024-05-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Objects with more records than this are read over Bulk API 2.0.
        #[arg(long, default_value_t = crate::sync::backfill::DEFAULT_BULK_THRESHOLD)]
        bulk_threshold: u64,
        /// Rows per transaction (and per Bulk API result chunk).
        #[arg(long, default_value_t = crate::sync::backfill::DEFAULT_CHUNK_ROWS,
              value_parser = clap::value_parser!(u32).range(1..))]
        chunk_rows: u32,
    },
    /// Show checkpoints, retention headroom, pending repairs, dead letters and snapshots, from
    /// the replica alone (no Salesforce call; works while the daemon runs).
    Status {
        #[arg(long, env = "SFMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Print the status as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Queue parked repairs again: those that failed in a way retrying could not fix (an
    /// object or field the integration user could not read, a value that did not fit its
    /// column), once the cause is fixed. The daemon applies them.
    Requeue {
        #[arg(long, env = "SFMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Only the repairs of this object (repeatable); default: every parked repair.
        #[arg(long = "object", value_name = "NAME")]
        objects: Vec<String>,
    },
    /// Compare the replica with the org: missing, extra, stale and deleted-state drift.
    ///
    /// Exits 1 when drift is found (or an object cannot be compared), 0 when none.
    Verify {
        #[arg(long, env = "SFMIRROR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Object to compare (repeatable); default: every object of every channel.
        #[arg(long = "object", value_name = "NAME")]
        objects: Vec<String>,
        /// Queue a record repair for every drifted id (the daemon's repair worker applies them).
        #[arg(long)]
        repair: bool,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Objects with more records than this are listed over Bulk API 2.0.
        #[arg(long, default_value_t = crate::sync::verify::DEFAULT_BULK_THRESHOLD)]
        bulk_threshold: u64,
    },
    /// Decode one captured change event and print it as JSON: header, changedFields /
    /// nulledFields / diffFields as names (compound components as Parent.Sub), non-null values.
    InspectEvent {
        /// The Avro schema JSON (as GetSchema returns it).
        #[arg(long)]
        schema: PathBuf,
        /// The payload: raw bytes, hex, or base64.
        #[arg(long)]
        payload: PathBuf,
    },
    /// Serve a local fake Salesforce org (OAuth, REST, Bulk 2.0, Pub/Sub with CDC and
    /// platform events) for tests, demos and benchmarks.
    ///
    /// Once serving, prints one JSON line to stdout with the URLs and credentials
    /// (`rest_url`, `pubsub_endpoint`, `org_id`, `client_id`, `client_secret`, `username`,
    /// `password`, `access_token`, and `ca_file` with --tls), then logs to stderr. Port 0 picks
    /// a free port. The control API under `<rest_url>/emulator/` (reset, seed, workload,
    /// transaction, gap, mass-update, undelete, add-field, expire-tokens, drop-streams, refuse,
    /// corrupt, advance-clock, settings, stats) steers the org; the README lists its bodies.
    Emulator {
        /// Address of the REST, OAuth and /emulator control API.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen_rest: SocketAddr,
        /// Address of the Pub/Sub gRPC API (plaintext h2c).
        #[arg(long, default_value = "127.0.0.1:7011")]
        listen_grpc: SocketAddr,
        /// Directory of `<Object>.json` describe responses to use instead of the built-in org.
        #[arg(long)]
        org: Option<PathBuf>,
        /// OAuth client id the emulator accepts.
        #[arg(long, default_value = "sfmirror-emulator-client")]
        client_id: String,
        /// OAuth client secret the emulator accepts.
        #[arg(long, default_value = "sfmirror-emulator-secret")]
        client_secret: String,
        /// Username for the password flow.
        #[arg(long, default_value = "admin@sfmirror.emulator")]
        username: String,
        /// Password for the password flow.
        #[arg(long, default_value = "emulator-password")]
        password: String,
        /// PEM public key of the connected app's certificate: enables the JWT bearer flow
        /// (assertions signed with the matching private key, iss = client id, sub = username,
        /// aud = `https://login.salesforce.com`, `https://test.salesforce.com` or the REST URL).
        #[arg(long)]
        jwt_public_key: Option<PathBuf>,
        /// Lifetime of tokens issued by /services/oauth2/token, in seconds (0 = no expiry).
        #[arg(long, default_value_t = 0)]
        token_ttl_secs: u64,
        /// Seconds between keepalive responses on an idle Subscribe stream.
        #[arg(long, default_value_t = 270)]
        keepalive_secs: u64,
        /// Serve REST and Pub/Sub over TLS (https://) with a certificate generated at start-up
        /// for localhost, 127.0.0.1 and ::1; the CA that signed it is written to
        /// `<tls-dir>/ca.pem` and reported as `ca_file` in the start-up line.
        #[arg(long)]
        tls: bool,
        /// Where `--tls` writes `ca.pem` (default: a new directory under the system temp dir).
        #[arg(long, requires = "tls")]
        tls_dir: Option<PathBuf>,
        /// Seconds after which a Subscribe stream whose client requested nothing more is
        /// closed (Salesforce closes such streams after about 70 s).
        #[arg(long, default_value_t = 70)]
        idle_close_secs: u64,
        /// Changes in one transaction that still get change events; the rest of a larger
        /// transaction produces one GAP_OVERFLOW event per entity (Salesforce: 100,000).
        #[arg(long, default_value_t = crate::emulator::store::DEFAULT_OVERFLOW_THRESHOLD)]
        overflow_threshold: usize,
        /// Generate a backlog of change events before serving: `N` (random creates, updates,
        /// deletes and undeletes over Account, Contact and Opportunity) or `N:Obj,Obj`.
        #[arg(long, value_name = "N[:OBJECTS]")]
        backlog: Option<crate::emulator::workload::BacklogSpec>,
        /// Serve a person-account org: Account gets `IsPersonAccount`, person-name components,
        /// `Person*` / `__pc` contact fields and the `PersonAccount` record type.
        #[arg(long)]
        person_accounts: bool,
        /// Events delivered org-wide (every subscriber, every channel) per rolling 24 hours
        /// past which Subscribe is refused and open streams end with
        /// `sfdc.platform.eventbus.grpc.subscription.limit.exceeded`. Default: counted and
        /// reported in `/limits`, never enforced.
        #[arg(long, value_name = "N")]
        delivery_allocation: Option<u64>,
    },
    /// Write a first config file for an org: the login URL and OAuth flow given here and,
    /// when it can log in with them, a channel for each object whose change-event channel
    /// this user may subscribe to (describeGlobal, then Pub/Sub GetTopic for each).
    ///
    /// Secrets are given as files (--client-secret-file, ...), never inline. Then run
    /// `sfmirror check --config PATH`.
    Init(crate::init::InitOptions),
    /// The whole product in about a minute, with no server to set up: an emulated org,
    /// a replica, the daemon as a child process, a workload; merge, gap and overflow repairs,
    /// a SIGKILL survived, a new field, verify and the daemon's metrics, each shown and checked.
    ///
    /// The replica: DATABASE_URL when set; else 127.0.0.1:5432 when it accepts the default
    /// login (postgres, no password); else a private cluster started with the machine's
    /// initdb and pg_ctl and removed at the end. Only the schemas `salesforce_demo` and
    /// `sfmirror_demo` are written (and recreated).
    Demo {
        /// Postgres to mirror into (only the demo's own schemas are touched).
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
        /// Always start a private PostgreSQL cluster, even when a server is available.
        #[arg(long)]
        embedded: bool,
        /// A smaller org and shorter pauses (about 10 s; for tests and CI).
        #[arg(long)]
        quick: bool,
        /// Afterwards, keep the emulator, a workload and the daemon running with a live status
        /// line until Ctrl-C, and print the config file to use with `status`, `run`, `verify`.
        #[arg(long)]
        follow: bool,
        /// Logs of the demo and the daemon at info (default: warnings only).
        #[arg(short, long)]
        verbose: bool,
    },
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            let channels: Vec<&str> = cfg.channels.iter().map(|c| c.name.as_str()).collect();
            tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config.display(),
                channels = %channels.join(", "), "sfmirror starting");
            let shutdown = CancellationToken::new();
            crate::shutdown::on_signal(shutdown.clone());
            supervisor::run(&cfg, shutdown, None).await?;
            Ok(())
        }
        Command::Check { config } => {
            let cfg = Config::load(&config)?;
            println!("configuration {} is valid", config.display());
            println!(
                "  salesforce: {} via {:?}, Pub/Sub at {}",
                cfg.salesforce.login_url, cfg.salesforce.auth, cfg.salesforce.pubsub_endpoint
            );
            println!(
                "  replica: schemas {} (data) and {} (control), delete_mode {:?}",
                cfg.replica.schema, cfg.replica.control_schema, cfg.replica.delete_mode
            );
            for ch in &cfg.channels {
                println!("  channel {} -> {}", ch.name, ch.objects.join(", "));
            }
            let report = crate::sync::check::check(&cfg).await;
            print!("{report}");
            if report.wrong() {
                return Err(CheckFailed { definite: true }.into());
            }
            if report.unreachable() {
                return Err(CheckFailed { definite: false }.into());
            }
            println!("all checks passed: `sfmirror run` can start with this configuration");
            Ok(())
        }
        Command::Backfill {
            config,
            objects,
            since,
            bulk_threshold,
            chunk_rows,
        } => {
            let cfg = Config::load(&config)?;
            let cancel = CancellationToken::new();
            crate::shutdown::on_signal(cancel.clone());
            let mut opts = crate::sync::backfill::BackfillOptions::new(objects, since);
            opts.bulk_threshold = bulk_threshold;
            opts.chunk_rows = chunk_rows;
            opts.cancel = cancel;
            let report = crate::sync::backfill::backfill_with(&cfg, &opts).await?;
            for o in report.objects.iter().filter(|o| o.completed()) {
                println!("{o}");
            }
            for o in report.failed() {
                eprintln!("sfmirror: backfill of {o}");
            }
            let failed = report.failed().count();
            if failed > 0 {
                anyhow::bail!(
                    "backfill incomplete: {failed} of {} object(s) did not complete",
                    report.objects.len()
                );
            }
            Ok(())
        }
        Command::Status { config, json } => {
            let cfg = Config::load(&config)?;
            let report = crate::sync::status::status(&cfg)
                .await
                .context("reading the replica's control schema")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(())
        }
        Command::Requeue { config, objects } => {
            let cfg = Config::load(&config)?;
            // None named: every parked repair, of objects no longer configured too.
            let objects = if objects.is_empty() {
                objects
            } else {
                cfg.select_objects(&objects)?
            };
            let replica = crate::sync::setup::Setup::connect(&cfg)
                .await
                .context("reaching the replica database")?;
            let n = replica.requeue(&objects).await?;
            println!("requeued {n} parked repair(s)");
            Ok(())
        }
        Command::Verify {
            config,
            objects,
            repair,
            json,
            bulk_threshold,
        } => {
            let cfg = Config::load(&config)?;
            let mut opts = crate::sync::verify::VerifyOptions::new(objects, repair);
            opts.bulk_threshold = bulk_threshold;
            let report = crate::sync::verify::verify_with(&cfg, &opts).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for o in &report.objects {
                    println!("{o}");
                }
            }
            let drifted = report.objects.iter().filter(|o| o.drift() > 0).count();
            let failed = report.objects.iter().filter(|o| o.error.is_some()).count();
            match (drifted, failed) {
                (0, 0) => Ok(()),
                (d, 0) => anyhow::bail!("verify found drift in {d} object(s)"),
                (0, f) => anyhow::bail!("verify could not compare {f} object(s)"),
                (d, f) => {
                    anyhow::bail!("verify found drift in {d} object(s) and could not compare {f}")
                }
            }
        }
        Command::InspectEvent { schema, payload } => {
            let schema_json = std::fs::read_to_string(&schema)
                .with_context(|| format!("reading schema {}", schema.display()))?;
            let captured = std::fs::read(&payload)
                .with_context(|| format!("reading payload {}", payload.display()))?;
            let bytes = crate::salesforce::event::payload_from_capture(&captured);
            let json =
                crate::salesforce::event::inspect(&schema_json, &bytes).with_context(|| {
                    format!("decoding {} with {}", payload.display(), schema.display())
                })?;
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(())
        }
        Command::Emulator {
            listen_rest,
            listen_grpc,
            org,
            client_id,
            client_secret,
            username,
            password,
            jwt_public_key,
            token_ttl_secs,
            keepalive_secs,
            tls,
            tls_dir,
            idle_close_secs,
            overflow_threshold,
            backlog,
            person_accounts,
            delivery_allocation,
        } => {
            let tls_dir = tls.then(|| {
                tls_dir.unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("sfmirror-emulator-{}", std::process::id()))
                })
            });
            let jwt_public_key_pem = match jwt_public_key {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("reading --jwt-public-key {}", path.display()))?,
                ),
                None => None,
            };
            let cfg = EmulatorConfig {
                listen_rest,
                listen_grpc,
                org_dir: org,
                credentials: crate::emulator::Credentials {
                    client_id,
                    client_secret,
                    username,
                    password,
                    jwt_public_key_pem,
                    ..Default::default()
                },
                token_ttl: (token_ttl_secs > 0).then(|| Duration::from_secs(token_ttl_secs)),
                keepalive: Duration::from_secs(keepalive_secs.max(1)),
                tls_dir,
                idle_close: Duration::from_secs(idle_close_secs.max(1)),
                overflow_threshold,
                backlog,
                person_accounts,
                delivery_allocation,
            };
            let emulator = Emulator::start(cfg).await?;
            println!("{}", emulator.startup_json());
            tracing::info!(rest = %emulator.rest_url, pubsub = %emulator.pubsub_endpoint, "emulator serving");
            let shutdown = CancellationToken::new();
            crate::shutdown::on_signal(shutdown.clone());
            shutdown.cancelled().await;
            emulator.stop().await;
            Ok(())
        }
        Command::Init(opts) => crate::init::init(&opts).await.map(|_| ()),
        Command::Demo {
            database_url,
            embedded,
            quick,
            follow,
            verbose,
        } => {
            crate::demo::run(crate::demo::DemoOptions {
                database_url,
                embedded,
                quick,
                follow,
                verbose,
            })
            .await
        }
    }
}

impl Cli {
    /// The log directives this command starts with, before `RUST_LOG`'s: the demo keeps its
    /// own lines readable by logging only warnings unless `--verbose`.
    pub fn default_log(&self) -> Option<&'static str> {
        match self.command {
            Command::Demo { verbose: false, .. } => Some("warn"),
            _ => None,
        }
    }
}

/// The exit code of a command that cannot be fixed by running it again (sysexits.h's
/// EX_CONFIG): an invalid configuration, credentials refused, a missing permission, every
/// channel refused by the org. The units set `RestartPreventExitStatus=78`.
pub const EX_CONFIG: u8 = 78;

/// The exit code of bad usage, as clap uses it: here, an object named on the command line
/// that the configuration does not carry.
pub const EX_USAGE: u8 = 2;

/// The exit code for a command's error: [`EX_CONFIG`] when running again cannot help until
/// someone changes the configuration, the credentials or a permission; [`EX_USAGE`] for an
/// unknown `--object`; 1 for anything a retry may fix (an unreachable server, a timeout) and
/// for answers not understood (a restart is the better bet than giving up).
pub fn exit_code(e: &anyhow::Error) -> u8 {
    use crate::config::{ConfigError, UnknownObject};
    use crate::replica::ReplicaError;
    use crate::salesforce::SourceError;
    use crate::sync::SyncError;
    use crate::sync::backfill::BackfillError;
    use crate::sync::reader::ReadError;
    use crate::sync::verify::VerifyError;
    let definite = |transient: bool| if transient { 1 } else { EX_CONFIG };
    let source = |e: &SourceError| match e {
        SourceError::BadResponse { .. } | SourceError::Event(_) => 1,
        e => definite(e.is_transient()),
    };
    let replica = |e: &ReplicaError| match e {
        ReplicaError::Data { .. } => 1,
        e => definite(e.is_transient()),
    };
    let read = |e: &ReadError| match e {
        ReadError::Source(e) => source(e),
        ReadError::Replica(e) => replica(e),
        _ => 1,
    };
    for cause in e.chain() {
        if cause.is::<UnknownObject>() {
            return EX_USAGE;
        }
        if cause.is::<ConfigError>() {
            return EX_CONFIG;
        }
        if let Some(f) = cause.downcast_ref::<CheckFailed>() {
            return if f.definite { EX_CONFIG } else { 1 };
        }
        if let Some(e) = cause.downcast_ref::<SyncError>() {
            return match e {
                SyncError::AllChannelsStopped { .. } => EX_CONFIG,
                SyncError::Source(e) => source(e),
                SyncError::Replica(e) => replica(e),
                SyncError::Read(e) => read(e),
                _ => 1,
            };
        }
        if let Some(e) = cause.downcast_ref::<BackfillError>() {
            return match e {
                BackfillError::UnknownObject(_) => EX_USAGE,
                BackfillError::Source(e) => source(e),
                BackfillError::Replica(e) => replica(e),
                BackfillError::Read(e) => read(e),
                _ => 1,
            };
        }
        if let Some(e) = cause.downcast_ref::<VerifyError>() {
            return match e {
                VerifyError::UnknownObject(_) => EX_USAGE,
                VerifyError::NotMigrated(_) => EX_CONFIG,
                VerifyError::Source(e) => source(e),
                VerifyError::Replica(e) => replica(e),
                VerifyError::Read(e) => read(e),
                _ => 1,
            };
        }
        if let Some(e) = cause.downcast_ref::<ReadError>() {
            return read(e);
        }
        if let Some(e) = cause.downcast_ref::<SourceError>() {
            return source(e);
        }
        if let Some(e) = cause.downcast_ref::<ReplicaError>() {
            return replica(e);
        }
    }
    1
}

/// `check` found something wrong (`definite`, exit 78) or out of reach (exit 1); the findings
/// are printed above.
#[derive(Debug, thiserror::Error)]
#[error("{}", if *.definite {
    "check failed: fix what is marked WRONG above"
} else {
    "check incomplete: what is marked UNREACHABLE above could not be reached; try again"
})]
pub struct CheckFailed {
    pub definite: bool,
}

/// Parses an OAuth flow name as the config file spells it (`client_credentials`).
/// Parses an RFC 3339 time (`2024-05-01T00:00:00Z`) for `--since`.
fn parse_rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("`{s}` is not an RFC 3339 time like 2024-05-01T00:00:00Z: {e}"))
}
