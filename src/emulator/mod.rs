//! A fake Salesforce org on one machine: OAuth, REST, Bulk API 2.0 and the Pub/Sub API with
//! Change Data Capture, faithful to the wire contract so that sfmirror (and third-party
//! clients) cannot tell it from the real thing for the features sfmirror uses.
//!
//! This module loads the org definition and starts both servers ([`Emulator`]). The emulator
//! shares only [`crate::proto`] and [`crate::model`] with the replicator: outside tests, it
//! must not import anything else of the crate, and nothing of the replicator imports it but
//! the command line, the demo, tests and benchmarks.
//!
//! # Module map
//!
//! From the top down; a module imports only modules listed below it.
//! - [`http`]: the REST listener's routes, put together with their middleware (trailing
//!   slashes, body draining, error envelopes, the session check, `Sforce-Limit-Info`, `Date`).
//! - [`compression`]: gzip request bodies and responses.
//! - [`composite`]: sObject Collections create / update / delete, `composite`,
//!   `composite/batch`, `composite/tree`.
//! - [`soap`]: the SOAP partner API's `login()` (up to API 64.0).
//! - [`rest`]: OAuth (token, revoke, introspect) and the credentials it accepts, identity,
//!   the version list and index, describe, single-record create / retrieve / update / delete
//!   by id or external id (upsert), getUpdated / getDeleted.
//! - [`query`]: REST `query` / `queryAll` and sObject Collections retrieve, `limits`, Bulk API
//!   2.0 query jobs (`rest`, `bulk`, and `csv` for result chunks).
//! - [`control`]: the `/emulator/*` control API.
//! - [`pubsub`]: the gRPC Pub/Sub API: topics, schemas, Subscribe, platform event publishing.
//! - [`workload`]: random valid records, seeding, a steady workload, pre-built backlogs.
//! - [`soql`]: what a SOQL query means, one phase a module (`lexer`, `parser`, `bind`,
//!   `eval`, with the comparison rules in `value`).
//! - [`store`]: the org itself: objects, records, tokens, the clock; every mutation publishes
//!   its event (`schema`, `records`, `events`, `transaction`, `tokens`, `ids`).
//! - [`formula`]: the formula language subset that formula fields are evaluated with.
//! - [`cdc`]: change event schemas, and payloads with bitmaps.
//! - [`platform`]: platform event types, their schemas and their checks.
//! - [`avro`]: what change event and platform event schemas share.
//! - [`bus`]: per-channel logs with replay ids and retention.
//! - [`diff`]: data differences for large text fields.
//! - [`tls`]: the throwaway CA and server certificate of `--tls`.

pub mod avro;
pub mod bus;
pub mod cdc;
pub mod composite;
pub mod compression;
pub mod control;
pub mod diff;
pub mod formula;
pub mod http;
pub mod platform;
pub mod pubsub;
pub mod query;
pub mod rest;
pub mod soap;
pub mod soql;
pub mod store;
pub mod tls;
pub mod workload;

use crate::model::ObjectDescribe;
pub use rest::Credentials;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::Org;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub listen_rest: SocketAddr,
    pub listen_grpc: SocketAddr,
    /// A directory of `<Object>.json` describes; the built-in org when `None`.
    pub org_dir: Option<PathBuf>,
    pub credentials: Credentials,
    /// How long issued tokens live; `None` = until expired through the control API.
    pub token_ttl: Option<Duration>,
    /// Interval of keepalive responses on idle streams.
    pub keepalive: Duration,
    /// Serve REST and Pub/Sub over TLS with a generated certificate; the CA is written to
    /// `<dir>/ca.pem`.
    pub tls_dir: Option<PathBuf>,
    /// A Subscribe stream whose client has requested nothing for this long is closed.
    pub idle_close: Duration,
    /// Changes in one transaction above which the rest produce GAP_OVERFLOW events.
    pub overflow_threshold: usize,
    /// Change events to generate before serving (a pre-built backlog for benchmarks).
    pub backlog: Option<workload::BacklogSpec>,
    /// Serve a person-account org: Account is described by `org/PersonAccount.json`
    /// (`IsPersonAccount`, person-name components, `Person*` and `__pc` contact fields, the
    /// `PersonAccount` record type), whatever the org definition's own Account is.
    pub person_accounts: bool,
    /// Events delivered org-wide per rolling 24 hours (emulator clock) past which Subscribe
    /// is refused and open streams end with `subscription.limit.exceeded`; None: counted,
    /// never enforced.
    pub delivery_allocation: Option<u64>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            listen_rest: SocketAddr::from(([127, 0, 0, 1], 0)),
            listen_grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            org_dir: None,
            credentials: Credentials::default(),
            token_ttl: None,
            keepalive: Duration::from_secs(270),
            tls_dir: None,
            idle_close: Duration::from_secs(70),
            overflow_threshold: store::DEFAULT_OVERFLOW_THRESHOLD,
            backlog: None,
            person_accounts: false,
            delivery_allocation: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("org definition {path}: {message}")]
    Org { path: String, message: String },
    #[error("TLS set-up ({path}): {message}")]
    Tls { path: String, message: String },
}

/// The built-in org: describes captured from a real org (see `org/README.md`), plus
/// `Invoice__c`, ours, with a field of every type.
const DEFAULT_ORG: &[(&str, &str)] = &[
    ("Account.json", include_str!("org/Account.json")),
    ("Contact.json", include_str!("org/Contact.json")),
    ("Opportunity.json", include_str!("org/Opportunity.json")),
    ("Custom__c.json", include_str!("org/Custom__c.json")),
    ("Invoice__c.json", include_str!("org/Invoice__c.json")),
    (
        "Order_Shipped__e.json",
        include_str!("org/Order_Shipped__e.json"),
    ),
];

/// The Account of a person-account org (`--person-accounts`).
const PERSON_ACCOUNT: &str = include_str!("org/PersonAccount.json");

/// Makes `definition` a person-account org: its Account (added if it has none) becomes the
/// person-account describe.
pub fn with_person_accounts(definition: &mut store::OrgDefinition) -> Result<(), EmulatorError> {
    let account = parse_describe("<built-in>/PersonAccount.json", PERSON_ACCOUNT)?;
    definition.describes.retain(|(d, _)| d.name != "Account");
    definition.describes.insert(0, account);
    Ok(())
}

/// Custom channels of the built-in org; an org directory has its own in `channels.json`.
const DEFAULT_CHANNELS: &str = include_str!("org/channels.json");

/// The name of the file in an org directory that lists custom channels:
/// `{"channels": [{"name": "/data/<Name>__chn", "members": ["Account", ...]}]}`.
pub const CHANNELS_FILE: &str = "channels.json";

fn parse_channels(path: &str, text: &str) -> Result<Vec<store::CustomChannel>, EmulatorError> {
    #[derive(serde::Deserialize)]
    struct File {
        channels: Vec<store::CustomChannel>,
    }
    serde_json::from_str::<File>(text)
        .map(|f| f.channels)
        .map_err(|e| EmulatorError::Org {
            path: path.to_string(),
            message: format!(
                "not a channel list ({{\"channels\": [{{\"name\", \"members\"}}]}}): {e}"
            ),
        })
}

fn parse_describe(
    path: &str,
    text: &str,
) -> Result<(ObjectDescribe, serde_json::Value), EmulatorError> {
    let err = |message: String| EmulatorError::Org {
        path: path.to_string(),
        message,
    };
    let mut raw: serde_json::Value =
        serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
    let is_event = raw
        .get("name")
        .and_then(|n| n.as_str())
        .is_some_and(|n| n.ends_with("__e"));
    if !is_event {
        complete_system_fields(&mut raw);
    }
    let describe: ObjectDescribe = serde_json::from_value(raw.clone())
        .map_err(|e| err(format!("not a describe response: {e}")))?;
    Ok((describe, raw))
}

/// Adds the system fields every Salesforce object has (`IsDeleted`, the audit fields,
/// `SystemModstamp`) to a describe that was trimmed without them, as some captured fixtures
/// are: the org the emulator serves behaves like a real one.
fn complete_system_fields(raw: &mut serde_json::Value) {
    let Some(fields) = raw.get_mut("fields").and_then(|f| f.as_array_mut()) else {
        return;
    };
    let has = |fields: &Vec<serde_json::Value>, name: &str| {
        fields
            .iter()
            .any(|f| f.get("name").and_then(|n| n.as_str()) == Some(name))
    };
    for (name, kind, soap, label) in [
        ("IsDeleted", "boolean", "xsd:boolean", "Deleted"),
        ("CreatedDate", "datetime", "xsd:dateTime", "Created Date"),
        ("CreatedById", "reference", "tns:ID", "Created By ID"),
        (
            "LastModifiedDate",
            "datetime",
            "xsd:dateTime",
            "Last Modified Date",
        ),
        (
            "LastModifiedById",
            "reference",
            "tns:ID",
            "Last Modified By ID",
        ),
        (
            "SystemModstamp",
            "datetime",
            "xsd:dateTime",
            "System Modstamp",
        ),
    ] {
        if has(fields, name) {
            continue;
        }
        fields.push(serde_json::json!({
            "name": name, "type": kind, "soapType": soap, "label": label,
            "length": if kind == "reference" { 18 } else { 0 },
            "precision": 0, "scale": 0, "digits": 0, "nillable": false, "calculated": false,
            "compoundFieldName": null, "createable": false, "updateable": false,
            "defaultedOnCreate": true, "custom": false,
            "referenceTo": if kind == "reference" { vec!["User"] } else { vec![] },
            "filterable": true, "sortable": kind != "boolean", "picklistValues": []
        }));
    }
}

/// Loads the org: every `*.json` describe in `dir` plus its `channels.json`, or the built-in
/// org.
pub fn load_org(dir: Option<&std::path::Path>) -> Result<store::OrgDefinition, EmulatorError> {
    let Some(dir) = dir else {
        return Ok(store::OrgDefinition {
            describes: DEFAULT_ORG
                .iter()
                .map(|(name, text)| parse_describe(name, text))
                .collect::<Result<_, _>>()?,
            channels: parse_channels("<built-in>/channels.json", DEFAULT_CHANNELS)?,
        });
    };
    let entries = std::fs::read_dir(dir).map_err(|e| EmulatorError::Org {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    let mut out = store::OrgDefinition::default();
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).map_err(|e| EmulatorError::Org {
            path: p.display().to_string(),
            message: e.to_string(),
        })?;
        if p.file_name().is_some_and(|n| n == CHANNELS_FILE) {
            out.channels = parse_channels(&p.display().to_string(), &text)?;
            continue;
        }
        let (describe, raw) = parse_describe(&p.display().to_string(), &text)?;
        if describe.fields.is_empty() {
            continue; // e.g. a global describe file
        }
        out.describes.push((describe, raw));
    }
    if out.describes.is_empty() {
        return Err(EmulatorError::Org {
            path: dir.display().to_string(),
            message: "no <Object>.json describe files found".to_string(),
        });
    }
    Ok(out)
}

async fn serve_rest<L>(listener: L, app: axum::Router, stop: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "emulator REST server failed");
    }
}

/// A running emulator.
pub struct Emulator {
    pub rest_url: String,
    pub pubsub_endpoint: String,
    pub org: Arc<Org>,
    pub credentials: Credentials,
    /// A token valid until expired through the control API.
    pub access_token: String,
    /// With TLS: the CA certificate clients must trust.
    pub ca_file: Option<PathBuf>,
    control: Arc<control::ControlState>,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Emulator {
    /// Binds both listeners and starts serving.
    pub async fn start(cfg: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        let rest =
            TcpListener::bind(cfg.listen_rest)
                .await
                .map_err(|source| EmulatorError::Bind {
                    what: "REST",
                    addr: cfg.listen_rest,
                    source,
                })?;
        let grpc =
            TcpListener::bind(cfg.listen_grpc)
                .await
                .map_err(|source| EmulatorError::Bind {
                    what: "Pub/Sub",
                    addr: cfg.listen_grpc,
                    source,
                })?;
        Emulator::run(cfg, rest, grpc).await
    }

    /// Serves on the given listeners (tests bind `127.0.0.1:0`).
    pub async fn run(
        cfg: EmulatorConfig,
        rest: TcpListener,
        grpc: TcpListener,
    ) -> Result<Emulator, EmulatorError> {
        let mut definition = load_org(cfg.org_dir.as_deref())?;
        if cfg.person_accounts {
            with_person_accounts(&mut definition)?;
        }
        let org = Arc::new(Org::new(definition).map_err(|message| {
            EmulatorError::Org {
                path: cfg
                    .org_dir
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "<built-in>".to_string()),
                message,
            }
        })?);
        let rest_addr = rest.local_addr().map_err(|source| EmulatorError::Bind {
            what: "REST",
            addr: cfg.listen_rest,
            source,
        })?;
        let grpc_addr = grpc.local_addr().map_err(|source| EmulatorError::Bind {
            what: "Pub/Sub",
            addr: cfg.listen_grpc,
            source,
        })?;
        let tls = match &cfg.tls_dir {
            Some(dir) => Some(tls::generate(dir, &[rest_addr, grpc_addr]).map_err(|e| {
                EmulatorError::Tls {
                    path: e.path,
                    message: e.message,
                }
            })?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let rest_url = format!("{scheme}://{rest_addr}");
        let pubsub_endpoint = format!("{scheme}://{grpc_addr}");
        let access_token = org.issue_token(None);
        let shutdown = CancellationToken::new();

        org.set_overflow_threshold(cfg.overflow_threshold);
        org.set_delivery_allocation(cfg.delivery_allocation);
        if let Some(spec) = &cfg.backlog {
            let built = workload::build_backlog(&org, spec).map_err(|e| EmulatorError::Org {
                path: "--backlog".to_string(),
                message: e.message,
            })?;
            tracing::info!(events = built, "pre-built backlog ready");
        }
        let service = pubsub::PubSubService::new(org.clone(), cfg.keepalive, cfg.idle_close);
        let control = Arc::new(control::ControlState {
            org: org.clone(),
            subscriptions: service.subscriptions.clone(),
            drop_streams: service.drop_streams.clone(),
            workload: Arc::new(workload::Workload::default()),
        });
        let rest_state = Arc::new(rest::RestState {
            org: org.clone(),
            creds: cfg.credentials.clone(),
            rest_url: rest_url.clone(),
            token_ttl_ms: cfg.token_ttl.map(|d| d.as_millis() as i64),
        });
        let query = Arc::new(query::QueryState::new(org.clone()));
        let app = http::router(rest_state, query, control.clone());
        let stop = shutdown.clone();
        let rest_task = match &tls {
            Some(material) => {
                let listener = tls::TlsListener::new(rest, material).map_err(|message| {
                    EmulatorError::Tls {
                        path: material.ca_file.display().to_string(),
                        message,
                    }
                })?;
                tokio::spawn(serve_rest(listener, app, stop))
            }
            None => {
                // Same reason as for gRPC below: no Nagle delay on small answers.
                let listener = axum::serve::ListenerExt::tap_io(rest, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                tokio::spawn(serve_rest(listener, app, stop))
            }
        };
        let stop = shutdown.clone();
        let mut builder = tonic::transport::Server::builder();
        if let Some(material) = &tls {
            let identity =
                tonic::transport::Identity::from_pem(&material.chain_pem, &material.key_pem);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| EmulatorError::Tls {
                    path: material.ca_file.display().to_string(),
                    message: e.to_string(),
                })?;
        }
        let grpc_task = tokio::spawn(async move {
            // Without TCP_NODELAY, Nagle's algorithm holds small responses back for the
            // client's delayed ACK (~40 ms a round trip): a stream would crawl.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(grpc),
                |conn| {
                    if let Ok(tcp) = &conn {
                        let _ = tcp.set_nodelay(true);
                    }
                    conn
                },
            );
            let served = builder
                .add_service(crate::proto::pub_sub_server::PubSubServer::new(service))
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "emulator Pub/Sub server failed");
            }
        });
        Ok(Emulator {
            rest_url,
            pubsub_endpoint,
            org,
            credentials: cfg.credentials,
            access_token,
            ca_file: tls.map(|t| t.ca_file),
            control,
            shutdown,
            tasks: vec![rest_task, grpc_task],
        })
    }

    /// The start-up line: where the emulator listens and how to log in.
    pub fn startup_json(&self) -> serde_json::Value {
        let mut line = serde_json::json!({
            "rest_url": self.rest_url,
            "pubsub_endpoint": self.pubsub_endpoint,
            "org_id": self.org.org_id,
            "client_id": self.credentials.client_id,
            "client_secret": self.credentials.client_secret,
            "username": self.credentials.username,
            "password": self.credentials.password,
            "access_token": self.access_token,
        });
        if let (Some(ca), Some(obj)) = (&self.ca_file, line.as_object_mut()) {
            obj.insert("ca_file".into(), ca.display().to_string().into());
        }
        line
    }

    /// Subscribe calls opened so far (what tests wait on before writing at LATEST).
    pub fn subscriptions(&self) -> Vec<pubsub::SubscriptionRecord> {
        self.control
            .subscriptions
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn subscription_count(&self) -> usize {
        self.subscriptions().len()
    }

    /// Stops serving and waits for the servers to finish.
    /// Open Subscribe streams end with UNAVAILABLE, as when a real server goes away; servers
    /// get a few seconds to finish in-flight calls.
    pub async fn stop(self) {
        if let Ok(token) = self.control.drop_streams.lock() {
            token.cancel();
        }
        self.shutdown.cancel();
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
    }
}
