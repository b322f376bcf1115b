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
}

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
    /// Serve a local fake Salesforce org (OAuth, REST, Pub/Sub with CDC).
    ///
    /// Once serving, prints one JSON line to stdout with the URLs and credentials
    /// (`rest_url`, `pubsub_endpoint`, `org_id`, `client_id`, `client_secret`, `username`,
    /// `password`, `access_token`), then logs to stderr. Port 0 picks a free port.
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
        /// Lifetime of tokens issued by /services/oauth2/token, in seconds (0 = no expiry).
        #[arg(long, default_value_t = 0)]
        token_ttl_secs: u64,
        /// Seconds between keepalive responses on an idle Subscribe stream.
        #[arg(long, default_value_t = 270)]
        keepalive_secs: u64,
    },
    /// Run everything on one command: emulator, replica, daemon and a small workload; print
    /// what was mirrored.
    Demo {
        /// Postgres to mirror into (schemas `salesforce_demo` and `sfmirror_demo`).
        #[arg(
            long,
            env = "DATABASE_URL",
            default_value = "postgres://postgres@127.0.0.1:5432/postgres"
        )]
        database_url: String,
        /// Accounts to create.
        #[arg(long, default_value_t = 20)]
        accounts: usize,
        /// Keep the daemon and a slow workload running until Ctrl-C.
        #[arg(long)]
        follow: bool,
    },
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            let cfg = Config::load(&config)?;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
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
            let pool = supervisor::prepare_replica(&cfg)
                .await
                .context("reaching the replica database")?;
            drop(pool);
            println!("  replica database reachable, control schema migrated");
            let http = supervisor::http_client(&cfg.salesforce)?;
            let auth = crate::salesforce::auth::Authenticator::new(cfg.salesforce.clone(), http);
            let session = auth.session().await.context("logging in to Salesforce")?;
            println!(
                "  logged in: org {} at {}",
                session.org_id, session.instance_url
            );
            Ok(())
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
            token_ttl_secs,
            keepalive_secs,
        } => {
            let cfg = EmulatorConfig {
                listen_rest,
                listen_grpc,
                org_dir: org,
                credentials: crate::emulator::Credentials {
                    client_id,
                    client_secret,
                    username,
                    password,
                    ..Default::default()
                },
                token_ttl: (token_ttl_secs > 0).then(|| Duration::from_secs(token_ttl_secs)),
                keepalive: Duration::from_secs(keepalive_secs.max(1)),
            };
            let emulator = Emulator::start(cfg).await?;
            println!("{}", emulator.startup_json());
            tracing::info!(rest = %emulator.rest_url, pubsub = %emulator.pubsub_endpoint, "emulator serving");
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            shutdown.cancelled().await;
            emulator.stop().await;
            Ok(())
        }
        Command::Demo {
            database_url,
            accounts,
            follow,
        } => crate::sync::demo::run(&database_url, accounts, follow).await,
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        token.cancel();
    });
}
