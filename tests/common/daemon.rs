//! The emulator and the daemon as tests run them: the emulator with its built-in org, a
//! config builder aimed at an emulator and a test database (built as TOML text, the way an
//! operator writes it, so the CLI tests can write the same text to a file), and a handle on a
//! daemon running in-process.

use sfmirror::config::Config;
use sfmirror::emulator::Emulator;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An emulator with the built-in org on `127.0.0.1:0` (REST and Pub/Sub, plaintext).
pub async fn emulator() -> Emulator {
    Emulator::start(sfmirror::emulator::EmulatorConfig::default())
        .await
        .unwrap_or_else(|e| panic!("the emulator does not start: {e}"))
}

/// A daemon config for `emulator` and a database: the emulator's client-credentials login
/// and endpoints, metrics off, the channels added with [`TestConfig::channel`].
pub struct TestConfig {
    rest_url: String,
    pubsub_endpoint: String,
    client_id: String,
    client_secret: String,
    db_url: String,
    replica: Vec<(String, String)>,
    sync: Vec<(String, u64)>,
    metrics_listen: String,
    pubsub_endpoint_override: Option<String>,
    channels: Vec<(String, Vec<String>)>,
    takeover_secs: u64,
    audit: bool,
}

impl TestConfig {
    pub fn new(emulator: &Emulator, db_url: &str) -> TestConfig {
        TestConfig {
            rest_url: emulator.rest_url.clone(),
            pubsub_endpoint: emulator.pubsub_endpoint.clone(),
            client_id: emulator.credentials.client_id.clone(),
            client_secret: emulator.credentials.client_secret.clone(),
            db_url: db_url.to_string(),
            replica: Vec::new(),
            sync: Vec::new(),
            metrics_listen: String::new(),
            pubsub_endpoint_override: None,
            channels: Vec::new(),
            // Short leases: a daemon started after one aborted in the same process takes its
            // channels over within seconds.
            takeover_secs: 3,
            audit: false,
        }
    }

    /// Sets `[ha] takeover_secs`.
    pub fn takeover_secs(mut self, secs: u64) -> TestConfig {
        self.takeover_secs = secs;
        self
    }

    /// Records every committed batch with its owner (`[ha] audit`).
    pub fn audit(mut self) -> TestConfig {
        self.audit = true;
        self
    }

    /// Sets a numeric key of `[sync]` (`stale_stream_secs`, `reconnect_min_ms`, ...).
    pub fn sync(mut self, key: &str, value: u64) -> TestConfig {
        self.sync.push((key.to_string(), value));
        self
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `address`.
    pub fn metrics(mut self, address: &str) -> TestConfig {
        self.metrics_listen = address.to_string();
        self
    }

    /// Points Pub/Sub somewhere else (an address nothing listens on).
    pub fn pubsub_endpoint(mut self, endpoint: &str) -> TestConfig {
        self.pubsub_endpoint_override = Some(endpoint.to_string());
        self
    }

    /// Adds a channel carrying `objects`.
    pub fn channel(mut self, name: &str, objects: &[&str]) -> TestConfig {
        self.channels.push((
            name.to_string(),
            objects.iter().map(|o| o.to_string()).collect(),
        ));
        self
    }

    /// Adds every `(name, objects)` channel.
    pub fn channels(self, channels: &[(&str, &[&str])]) -> TestConfig {
        channels
            .iter()
            .fold(self, |cfg, (name, objects)| cfg.channel(name, objects))
    }

    /// Sets a string key of `[replica]` (`schema`, `control_schema`, `delete_mode`).
    pub fn replica(mut self, key: &str, value: &str) -> TestConfig {
        self.replica.push((key.to_string(), value.to_string()));
        self
    }

    /// The config file's text.
    pub fn toml(&self) -> String {
        let mut text = format!(
            "[salesforce]\nlogin_url = \"{}\"\nauth = \"client_credentials\"\n\
             client_id = \"{}\"\nclient_secret = \"{}\"\npubsub_endpoint = \"{}\"\n\
             [replica]\nurl = \"{}\"\n",
            self.rest_url,
            self.client_id,
            self.client_secret,
            self.pubsub_endpoint_override
                .as_deref()
                .unwrap_or(&self.pubsub_endpoint),
            self.db_url
        );
        for (key, value) in &self.replica {
            text.push_str(&format!("{key} = \"{value}\"\n"));
        }
        text.push_str(&format!(
            "[metrics]\nlisten = \"{}\"\n",
            self.metrics_listen
        ));
        text.push_str(&format!(
            "[ha]\ntakeover_secs = {}\naudit = {}\n",
            self.takeover_secs, self.audit
        ));
        if !self.sync.is_empty() {
            text.push_str("[sync]\n");
            for (key, value) in &self.sync {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
        for (name, objects) in &self.channels {
            let list: Vec<String> = objects.iter().map(|o| format!("\"{o}\"")).collect();
            text.push_str(&format!(
                "[[channels]]\nname = \"{name}\"\nobjects = [{}]\n",
                list.join(", ")
            ));
        }
        text
    }

    pub fn build(&self) -> Config {
        Config::from_toml(&self.toml()).unwrap_or_else(|e| panic!("test config: {e}"))
    }
}

/// The daemon's result as a test sees it.
pub type DaemonResult = Result<(), sfmirror::sync::SyncError>;

/// A daemon running in this process until [`Daemon::stop`].
pub struct Daemon {
    pub stop: CancellationToken,
    pub task: JoinHandle<DaemonResult>,
}

impl Daemon {
    /// Starts the daemon; `observer`, if given, receives every committed batch.
    pub fn spawn(
        cfg: &Config,
        observer: Option<broadcast::Sender<sfmirror::sync::channel::AppliedBatch>>,
    ) -> Daemon {
        let stop = CancellationToken::new();
        let task = {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            tokio::spawn(async move { sfmirror::sync::supervisor::run(&cfg, stop, observer).await })
        };
        Daemon { stop, task }
    }

    /// Starts the daemon and waits until each of its channels has subscribed.
    pub async fn start(emulator: &Emulator, cfg: &Config) -> Daemon {
        let before = emulator.subscription_count();
        let daemon = Daemon::spawn(cfg, None);
        let n = cfg.channels.len();
        super::wait_for("subscriptions", Duration::from_secs(60), async || {
            emulator.subscription_count() >= before + n
        })
        .await;
        daemon
    }

    /// Stops the daemon and returns what it returned.
    pub async fn finish(self) -> DaemonResult {
        self.stop.cancel();
        self.task.await.expect("the daemon task does not panic")
    }

    /// Stops the daemon, which must end cleanly.
    pub async fn stop(self) {
        self.finish().await.expect("daemon ends cleanly");
    }
}
