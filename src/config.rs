//! Configuration: a TOML file layered under `SFMIRROR__SECTION__KEY` environment variables,
//! deserialized with serde and validated before anything starts.
//!
//! Owns the shape of the config and the rules that make it usable; it does not open
//! connections. Secrets live in [`Secret`], which never prints its value. Each comes from the
//! config (or its `SFMIRROR__SECTION__KEY` variable), from the file its `*_file` key names, or
//! from systemd's credentials directory (`$CREDENTIALS_DIRECTORY/<name>`, see
//! [`CREDENTIALS`]), in that order of precedence.

use crate::model::is_safe_identifier;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the config file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sfmirror/sfmirror.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration from {path}: {source}")]
    Load {
        path: String,
        source: config::ConfigError,
    },
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("cannot read {key} from {path}: {source}")]
    SecretFile {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A secret string (token, password, client secret). `Debug` and `Display` redact it.
#[derive(Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub salesforce: SalesforceConfig,
    pub replica: ReplicaConfig,
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub ha: HaConfig,
    /// Per-object settings (`[objects.Account]`), for objects some channel carries.
    #[serde(default)]
    pub objects: std::collections::BTreeMap<String, ObjectConfig>,
}

/// Settings of one replicated object.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectConfig {
    /// How its derived columns (formulas, person-name `name`, fields never sent in change
    /// events) are kept fresh.
    pub derived_refresh: DerivedRefresh,
}

/// How an object's derived columns are kept fresh.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DerivedRefresh {
    /// Re-read the changed records' derived fields after every change (coalesced over
    /// `sync.derived_refresh_window_secs`), and sweep the object every
    /// `sync.derived_sweep_interval_secs` for formulas that read other records or the clock.
    #[default]
    OnChange,
    /// Only the scheduled sweep.
    Sweep,
    /// Never: derived columns hold what the last snapshot read.
    Off,
}

/// Several instances with one configuration: how fast a standby takes over.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaConfig {
    /// Longest time a channel stays without an owner after its owner died, froze or lost
    /// the database. The owner renews its leases every fifth of it; a lease lasts three fifths.
    pub takeover_secs: u64,
    /// Record every committed batch with its owner in `<control_schema>.batch_audit`
    /// (diagnostics for fail-over drills: the table grows with every batch).
    pub audit: bool,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            takeover_secs: 15,
            audit: false,
        }
    }
}

impl HaConfig {
    /// How often an instance renews its leases and looks for channels without an owner.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.takeover_secs * 1000 / 5)
    }

    /// How long a lease lasts after its last renewal.
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.takeover_secs * 3000 / 5)
    }
}

/// The names sfmirror looks for in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), each
/// with the config key it stands for. A credential is used only when the key and its
/// `*_file` are unset.
pub const CREDENTIALS: &[(&str, &str)] = &[
    ("client_secret", "salesforce.client_secret"),
    ("private_key", "salesforce.private_key_file"),
    ("refresh_token", "salesforce.refresh_token"),
    ("access_token", "salesforce.access_token"),
    ("password", "salesforce.password"),
    ("replica_password", "replica.password"),
    ("replica_url", "replica.url"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthFlow {
    Jwt,
    ClientCredentials,
    RefreshToken,
    Password,
    AccessToken,
}

/// The flow's name as the config file spells it (`client_credentials`), for the command line.
impl std::str::FromStr for AuthFlow {
    type Err = String;

    fn from_str(s: &str) -> Result<AuthFlow, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            format!(
                "`{s}` is not an auth flow: jwt, client_credentials, refresh_token, password, \
                 access_token"
            )
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConfig {
    #[serde(default = "default_login_url")]
    pub login_url: String,
    pub auth: AuthFlow,
    #[serde(default)]
    pub client_id: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    #[serde(default)]
    pub client_secret: Secret,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub password: Secret,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub refresh_token: Secret,
    #[serde(default)]
    pub refresh_token_file: Option<PathBuf>,
    #[serde(default)]
    pub access_token: Secret,
    #[serde(default)]
    pub access_token_file: Option<PathBuf>,
    /// Required with `access_token`; otherwise taken from the token response.
    #[serde(default)]
    pub instance_url: Option<String>,
    #[serde(default = "default_api_version")]
    pub api_version: String,
    #[serde(default = "default_pubsub_endpoint")]
    pub pubsub_endpoint: String,
    /// PEM bundle of a private CA to trust for the Pub/Sub and REST endpoints.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Seconds to wait for one REST call.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Renew the session after this many seconds (ahead of the org's session timeout,
    /// 2 hours by default); refused calls renew it at once anyway.
    #[serde(default = "default_session_refresh")]
    pub session_refresh_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeleteMode {
    /// Keep the row, set `_sfm_deleted` and its version.
    #[default]
    Soft,
    /// Remove the row, keep a tombstone with the delete's version.
    Hard,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    /// `postgres://...` or `key=value` connection string (it may hold the password).
    #[serde(default)]
    pub url: Secret,
    /// A file holding the whole URL.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// The password, when the URL has none.
    #[serde(default)]
    pub password: Secret,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_data_schema")]
    pub schema: String,
    #[serde(default = "default_control_schema")]
    pub control_schema: String,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default)]
    pub delete_mode: DeleteMode,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// Pub/Sub topic, e.g. `/data/AccountChangeEvent` or `/data/ChangeEvents`.
    pub name: String,
    /// Objects (API names) this channel carries; events of other entities are ignored.
    pub objects: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Most events applied in one transaction.
    pub batch_max_events: usize,
    /// A batch also closes once its events' payloads reach this many bytes: wide events
    /// (creates with every field) make smaller batches, which bounds the daemon's memory.
    pub batch_max_bytes: usize,
    /// Longest time an event waits in a partial batch before it is applied.
    pub batch_max_wait_ms: u64,
    /// When the apply side is idle, how long the stream must stay quiet before the trailing
    /// Salesforce transaction of a batch is taken as complete and applied (complete ones are
    /// applied at once). Keeps apply delay low at steady rates.
    pub batch_linger_ms: u64,
    /// First reconnect delay after a transient error; doubles up to `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Safety margin subtracted from a gap's commit time when an object is re-read.
    pub repair_margin_secs: u64,
    /// Resubscribe when neither an event nor a keepalive arrived for this long (Salesforce
    /// sends keepalives at least every 270 s).
    pub stale_stream_secs: u64,
    /// How long the repair worker sleeps when no repair is due.
    pub repair_idle_ms: u64,
    /// Entity repairs whose window holds more records than this read them over Bulk API 2.0
    /// instead of REST query paging.
    pub repair_bulk_threshold: u64,
    /// Rows per Bulk result chunk of an entity repair; each chunk commits in its own
    /// transaction and renews the repair's lease.
    pub repair_chunk_rows: u32,
    /// How long changed records wait before their derived columns are re-read: all records of
    /// an object changed within one window are read together (2,000 per API call).
    pub derived_refresh_window_secs: u64,
    /// How often each object's derived columns are swept (read for every record); 0 turns the
    /// sweep off for every object.
    pub derived_sweep_interval_secs: u64,
    /// How often `/limits` is read for the API and event delivery usage gauges.
    pub limits_poll_secs: u64,
    /// How long a channel waits before subscribing again after Salesforce refused it because
    /// the org's event delivery allocation is spent.
    pub delivery_limit_retry_secs: u64,
}

/// Default of `sync.repair_bulk_threshold`.
pub const DEFAULT_REPAIR_BULK_THRESHOLD: u64 = 10_000;

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            batch_max_events: 10_000,
            batch_max_bytes: 1536 * 1024,
            batch_max_wait_ms: 100,
            batch_linger_ms: 10,
            reconnect_min_ms: 500,
            reconnect_max_ms: 60_000,
            repair_margin_secs: 600,
            stale_stream_secs: 540,
            repair_idle_ms: 1000,
            repair_bulk_threshold: DEFAULT_REPAIR_BULK_THRESHOLD,
            repair_chunk_rows: 10_000,
            derived_refresh_window_secs: 10,
            derived_sweep_interval_secs: 86_400,
            limits_poll_secs: 300,
            delivery_limit_retry_secs: 3600,
        }
    }
}

impl SyncConfig {
    /// The schedule every retry follows: from `reconnect_min_ms` doubling to
    /// `reconnect_max_ms`, jittered.
    pub fn retry_backoff(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::new(
            Duration::from_millis(self.reconnect_min_ms),
            Duration::from_millis(self.reconnect_max_ms),
        )
    }

    pub fn batch_max_wait(&self) -> Duration {
        Duration::from_millis(self.batch_max_wait_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus, /healthz and /readyz listener; empty disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9464".to_string(),
        }
    }
}

fn default_login_url() -> String {
    "https://login.salesforce.com".to_string()
}
fn default_api_version() -> String {
    "62.0".to_string()
}
fn default_pubsub_endpoint() -> String {
    "https://api.pubsub.salesforce.com:7443".to_string()
}
fn default_request_timeout() -> u64 {
    120
}
fn default_session_refresh() -> u64 {
    5400
}
fn default_data_schema() -> String {
    "salesforce".to_string()
}
fn default_control_schema() -> String {
    "sfmirror".to_string()
}
fn default_pool_size() -> usize {
    8
}

/// Whether `host` (a name or an address, IPv6 with or without brackets) is this machine:
/// `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Checks that a Salesforce URL is https, or http to this machine (an emulator). The error
/// says what is wrong with it; the caller adds what would leak.
pub fn check_salesforce_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if parsed.host_str().is_some_and(is_loopback_host) => Ok(()),
        "http" => Err(format!(
            "`{url}` is not https (http is accepted only for localhost, 127.0.0.0/8 or ::1)"
        )),
        _ => Err(format!("`{url}` is not an https URL")),
    }
}

/// The secret in the file at `path` (surrounding whitespace trimmed), read for `key`.
fn read_secret(key: &str, path: &Path) -> Result<Secret, ConfigError> {
    std::fs::read_to_string(path)
        .map(|text| Secret::new(text.trim()))
        .map_err(|source| ConfigError::SecretFile {
            key: key.to_string(),
            path: path.to_path_buf(),
            source,
        })
}

/// An object that no configured channel carries.
#[derive(Debug, thiserror::Error)]
#[error("unknown object `{object}`: the configured channels carry {configured}")]
pub struct UnknownObject {
    pub object: String,
    pub configured: String,
}

impl Config {
    /// Every object of every channel, each once, in configuration order.
    /// How `object`'s derived columns are kept fresh (`[objects.X] derived_refresh`).
    pub fn derived_refresh(&self, object: &str) -> DerivedRefresh {
        self.objects
            .get(object)
            .map(|o| o.derived_refresh)
            .unwrap_or_default()
    }

    pub fn objects(&self) -> Vec<String> {
        let mut objects: Vec<String> = Vec::new();
        for ch in &self.channels {
            for o in &ch.objects {
                if !objects.contains(o) {
                    objects.push(o.clone());
                }
            }
        }
        objects
    }

    /// The objects a command works on: those `requested` (matched to the configured spelling,
    /// ignoring case), or every configured object when none is.
    pub fn select_objects(&self, requested: &[String]) -> Result<Vec<String>, UnknownObject> {
        let configured = self.objects();
        if requested.is_empty() {
            return Ok(configured);
        }
        let mut out: Vec<String> = Vec::new();
        for r in requested {
            let found = configured
                .iter()
                .find(|c| c.eq_ignore_ascii_case(r))
                .ok_or_else(|| UnknownObject {
                    object: r.clone(),
                    configured: configured.join(", "),
                })?;
            if !out.contains(found) {
                out.push(found.clone());
            }
        }
        Ok(out)
    }

    /// A short fingerprint of this configuration (secrets left out), kept with repairs the
    /// daemon parks: a start under a different configuration tries them again.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(format!("{self:?}").as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Loads `path` (TOML) with `SFMIRROR__SECTION__KEY` overrides, reads secret files, and
    /// validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("SFMIRROR")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .map_err(|source| ConfigError::Load {
                path: display.clone(),
                source,
            })?;
        let mut cfg: Config = built
            .try_deserialize()
            .map_err(|source| ConfigError::Load {
                path: display,
                source,
            })?;
        cfg.read_secret_files()?;
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            cfg.read_credentials(Path::new(&dir))?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a TOML document without the environment layer (examples and tests).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|source| ConfigError::Load {
                path: "<inline>".to_string(),
                source,
            })?;
        let mut cfg: Config = built
            .try_deserialize()
            .map_err(|source| ConfigError::Load {
                path: "<inline>".to_string(),
                source,
            })?;
        cfg.read_secret_files()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        let sf = &mut self.salesforce;
        let r = &mut self.replica;
        for (key, file, target) in [
            ("replica.url_file", &r.url_file, &mut r.url),
            ("replica.password_file", &r.password_file, &mut r.password),
            (
                "salesforce.client_secret_file",
                &sf.client_secret_file,
                &mut sf.client_secret,
            ),
            (
                "salesforce.password_file",
                &sf.password_file,
                &mut sf.password,
            ),
            (
                "salesforce.refresh_token_file",
                &sf.refresh_token_file,
                &mut sf.refresh_token,
            ),
            (
                "salesforce.access_token_file",
                &sf.access_token_file,
                &mut sf.access_token,
            ),
        ] {
            if let Some(path) = file {
                *target = read_secret(key, path)?;
            }
        }
        Ok(())
    }

    /// Fills the secrets still unset from systemd's credentials directory `dir`, each of
    /// [`CREDENTIALS`] whose file is there.
    pub fn read_credentials(&mut self, dir: &Path) -> Result<(), ConfigError> {
        let sf = &mut self.salesforce;
        let r = &mut self.replica;
        for (name, _) in CREDENTIALS {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let target = match *name {
                // A key file: the flow reads it by path.
                "private_key" => {
                    sf.private_key_file.get_or_insert(path);
                    continue;
                }
                "client_secret" => &mut sf.client_secret,
                "refresh_token" => &mut sf.refresh_token,
                "access_token" => &mut sf.access_token,
                "password" => &mut sf.password,
                "replica_password" => &mut r.password,
                "replica_url" => &mut r.url,
                _ => continue,
            };
            if target.is_empty() {
                *target = read_secret(&format!("credential {name}"), &path)?;
            }
        }
        Ok(())
    }

    /// Checks everything that can be checked without the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sf = &self.salesforce;
        for (key, url, carries) in [
            (
                "salesforce.login_url",
                Some(sf.login_url.as_str()),
                "the client secret, password or signed assertion",
            ),
            (
                "salesforce.pubsub_endpoint",
                Some(sf.pubsub_endpoint.as_str()),
                "the access token and every change event",
            ),
            (
                "salesforce.instance_url",
                sf.instance_url.as_deref(),
                "the access token and every record",
            ),
        ] {
            if let Some(url) = url {
                check_salesforce_url(url).map_err(|message| {
                    invalid(
                        key,
                        format!("{message}: {carries} would travel in plaintext"),
                    )
                })?;
            }
        }
        if sf.api_version.parse::<f32>().is_err() || !sf.api_version.contains('.') {
            return Err(invalid(
                "salesforce.api_version",
                format!("`{}` is not like `62.0`", sf.api_version),
            ));
        }
        let need = |key: &str, present: bool, flow: &str| {
            if present {
                Ok(())
            } else {
                Err(invalid(key, format!("required with auth = \"{flow}\"")))
            }
        };
        match sf.auth {
            AuthFlow::Jwt => {
                need("salesforce.client_id", !sf.client_id.is_empty(), "jwt")?;
                need("salesforce.username", !sf.username.is_empty(), "jwt")?;
                need(
                    "salesforce.private_key_file",
                    sf.private_key_file.is_some(),
                    "jwt",
                )?;
            }
            AuthFlow::ClientCredentials => {
                need(
                    "salesforce.client_id",
                    !sf.client_id.is_empty(),
                    "client_credentials",
                )?;
                need(
                    "salesforce.client_secret (or client_secret_file)",
                    !sf.client_secret.is_empty(),
                    "client_credentials",
                )?;
            }
            AuthFlow::RefreshToken => {
                need(
                    "salesforce.client_id",
                    !sf.client_id.is_empty(),
                    "refresh_token",
                )?;
                need(
                    "salesforce.refresh_token (or refresh_token_file)",
                    !sf.refresh_token.is_empty(),
                    "refresh_token",
                )?;
            }
            AuthFlow::Password => {
                need("salesforce.client_id", !sf.client_id.is_empty(), "password")?;
                need("salesforce.username", !sf.username.is_empty(), "password")?;
                need(
                    "salesforce.password (or password_file)",
                    !sf.password.is_empty(),
                    "password",
                )?;
            }
            AuthFlow::AccessToken => {
                need(
                    "salesforce.access_token (or access_token_file)",
                    !sf.access_token.is_empty(),
                    "access_token",
                )?;
                need(
                    "salesforce.instance_url",
                    sf.instance_url.is_some(),
                    "access_token",
                )?;
            }
        }
        let r = &self.replica;
        if r.url.is_empty() {
            return Err(invalid(
                "replica.url",
                "must be set (or replica.url_file, or the replica_url credential)",
            ));
        }
        crate::replica::conninfo::ConnInfo::parse(r.url.expose())
            .and_then(|info| info.pg_config())
            .map_err(|e| invalid("replica.url", e.0))?;
        for (key, name) in [
            ("replica.schema", &r.schema),
            ("replica.control_schema", &r.control_schema),
        ] {
            if !is_safe_identifier(name) {
                return Err(invalid(
                    key,
                    format!("`{name}` is not a safe identifier ([A-Za-z][A-Za-z0-9_]*)"),
                ));
            }
        }
        if r.schema == r.control_schema {
            return Err(invalid(
                "replica.control_schema",
                "must differ from replica.schema",
            ));
        }
        if r.pool_size < 2 {
            return Err(invalid("replica.pool_size", "must be at least 2"));
        }
        if self.channels.is_empty() {
            return Err(invalid("channels", "configure at least one [[channels]]"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, ch) in self.channels.iter().enumerate() {
            let key = format!("channels[{i}]");
            if !ch.name.starts_with("/data/") {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!(
                        "`{}` is not a change data capture channel (/data/...)",
                        ch.name
                    ),
                ));
            }
            if !seen.insert(ch.name.as_str()) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("`{}` is configured twice", ch.name),
                ));
            }
            if ch.objects.is_empty() {
                return Err(invalid(
                    &format!("{key}.objects"),
                    "name at least one object",
                ));
            }
            for o in &ch.objects {
                if !is_safe_identifier(o) {
                    return Err(invalid(
                        &format!("{key}.objects"),
                        format!("`{o}` is not a valid object API name"),
                    ));
                }
            }
        }
        let configured = self.objects();
        for object in self.objects.keys() {
            if !configured.contains(object) {
                return Err(invalid(
                    &format!("objects.{object}"),
                    format!(
                        "`{object}` is not carried by any channel (configured: {})",
                        configured.join(", ")
                    ),
                ));
            }
        }
        if self.sync.derived_refresh_window_secs == 0 {
            return Err(invalid(
                "sync.derived_refresh_window_secs",
                "must be at least 1",
            ));
        }
        if self.sync.limits_poll_secs == 0 {
            return Err(invalid("sync.limits_poll_secs", "must be at least 1"));
        }
        if self.sync.stale_stream_secs == 0 {
            return Err(invalid("sync.stale_stream_secs", "must be at least 1"));
        }
        if self.sync.batch_max_events == 0 {
            return Err(invalid("sync.batch_max_events", "must be at least 1"));
        }
        if self.sync.repair_chunk_rows == 0 {
            return Err(invalid("sync.repair_chunk_rows", "must be at least 1"));
        }
        if self.sync.batch_max_bytes < 1024 {
            return Err(invalid("sync.batch_max_bytes", "must be at least 1024"));
        }
        if self.sync.reconnect_min_ms == 0
            || self.sync.reconnect_max_ms < self.sync.reconnect_min_ms
        {
            return Err(invalid(
                "sync.reconnect_min_ms",
                "must be > 0 and <= sync.reconnect_max_ms",
            ));
        }
        if !(1..=3600).contains(&self.ha.takeover_secs) {
            return Err(invalid("ha.takeover_secs", "must be between 1 and 3600"));
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:9464",
                    self.metrics.listen
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    fn with_channels(objects: &[&[&str]]) -> Config {
        let mut text = String::from(
            r#"
            [salesforce]
            auth = "client_credentials"
            client_id = "x"
            client_secret = "y"
            [replica]
            url = "postgres://u@127.0.0.1/db"
            "#,
        );
        for (i, o) in objects.iter().enumerate() {
            let list: Vec<String> = o.iter().map(|s| format!("\"{s}\"")).collect();
            text.push_str(&format!(
                "[[channels]]\nname = \"/data/C{i}\"\nobjects = [{}]\n",
                list.join(", ")
            ));
        }
        Config::from_toml(&text).expect("config")
    }

    #[test]
    fn objects_default_to_every_channel_and_unknown_ones_are_named() {
        let c = with_channels(&[&["Account", "Contact"], &["Account", "Invoice__c"]]);
        assert_eq!(
            c.select_objects(&[]).expect("all"),
            ["Account", "Contact", "Invoice__c"]
        );
        assert_eq!(
            c.select_objects(&["invoice__c".into(), "Invoice__c".into()])
                .expect("one"),
            ["Invoice__c"]
        );
        let e = c.select_objects(&["Lead".into()]).expect_err("unknown");
        let text = e.to_string();
        assert!(
            text.contains("`Lead`") && text.contains("Account, Contact, Invoice__c"),
            "{text}"
        );
    }

    use super::*;

    #[test]
    fn the_annotated_example_loads() {
        let text = include_str!("../examples/sfmirror.toml");
        let cfg = Config::from_toml(text).unwrap_or_else(|e| panic!("examples/sfmirror.toml: {e}"));
        assert_eq!(cfg.derived_refresh("Contact"), DerivedRefresh::OnChange);
        assert_eq!(cfg.sync.derived_refresh_window_secs, 10);
    }

    #[test]
    fn per_object_settings_name_configured_objects() {
        let mut c = with_channels(&[&["Account"]]);
        c.objects.insert(
            "Contcat".to_string(),
            ObjectConfig {
                derived_refresh: DerivedRefresh::Off,
            },
        );
        let e = c.validate().expect_err("refused").to_string();
        assert!(
            e.contains("objects.Contcat") && e.contains("Account"),
            "{e}"
        );
    }

    const GOOD: &str = r#"
        [salesforce]
        auth = "client_credentials"
        client_id = "abc"
        client_secret = "s3cret"
        [replica]
        url = "postgres://postgres@127.0.0.1/test"
        [[channels]]
        name = "/data/AccountChangeEvent"
        objects = ["Account"]
    "#;

    #[test]
    fn defaults_fill_in() {
        let cfg = Config::from_toml(GOOD).expect("valid");
        assert_eq!(cfg.replica.schema, "salesforce");
        assert_eq!(cfg.replica.control_schema, "sfmirror");
        assert_eq!(cfg.salesforce.api_version, "62.0");
        assert_eq!(cfg.metrics.listen, "127.0.0.1:9464");
        assert_eq!(cfg.replica.delete_mode, DeleteMode::Soft);
        assert!(!format!("{cfg:?}").contains("s3cret"), "secret leaked");
    }

    #[test]
    fn errors_name_the_key() {
        let bad = GOOD.replace("objects = [\"Account\"]", "objects = [\"Acc ount\"]");
        let err = Config::from_toml(&bad).expect_err("bad object").to_string();
        assert!(err.contains("channels[0].objects"), "{err}");

        let bad = GOOD.replace("client_secret = \"s3cret\"", "");
        let err = Config::from_toml(&bad).expect_err("no secret").to_string();
        assert!(err.contains("client_secret"), "{err}");

        let bad = GOOD.replace("[replica]", "[replica]\nschema = \"x;drop\"");
        let err = Config::from_toml(&bad).expect_err("bad schema").to_string();
        assert!(err.contains("replica.schema"), "{err}");

        let bad = GOOD.replace("[replica]", "[replica]\nunknown_key = 1");
        let err = Config::from_toml(&bad)
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("unknown_key"), "{err}");
    }

    #[test]
    fn salesforce_urls_must_be_https_unless_loopback() {
        for (key, line) in [
            (
                "salesforce.login_url",
                "login_url = \"http://login.example.com\"",
            ),
            (
                "salesforce.pubsub_endpoint",
                "pubsub_endpoint = \"http://api.pubsub.example.com:7443\"",
            ),
            (
                "salesforce.instance_url",
                "instance_url = \"http://na1.example.my.salesforce.com\"",
            ),
        ] {
            let text = GOOD.replace("[replica]", &format!("{line}\n[replica]"));
            let err = Config::from_toml(&text).expect_err(key).to_string();
            assert!(
                err.contains(key) && err.contains("not https") && err.contains("plaintext"),
                "{err}"
            );
        }
        for url in [
            "http://127.0.0.1:8080",
            "http://127.1.2.3",
            "http://localhost:1234/",
            "http://[::1]:443",
            "https://login.example.com",
        ] {
            let text = GOOD.replace(
                "[replica]",
                &format!(
                    "login_url = \"{url}\"\npubsub_endpoint = \"{url}\"\n\
                     instance_url = \"{url}\"\n[replica]"
                ),
            );
            Config::from_toml(&text).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        let text = GOOD.replace("[replica]", "login_url = \"ftp://x\"\n[replica]");
        let err = Config::from_toml(&text).expect_err("ftp").to_string();
        assert!(err.contains("salesforce.login_url"), "{err}");
        assert!(!is_loopback_host("128.0.0.1"));
        assert!(!is_loopback_host("localhost.example.com"));
        assert!(is_loopback_host("LOCALHOST") && is_loopback_host("[::1]"));
    }

    #[test]
    fn the_replica_sslmode_is_checked() {
        let text = GOOD.replace(
            "postgres://postgres@127.0.0.1/test",
            "postgres://postgres:hunter2@127.0.0.1/test?sslmode=verify_full",
        );
        let err = Config::from_toml(&text)
            .expect_err("bad sslmode")
            .to_string();
        assert!(
            err.contains("replica.url") && err.contains("`verify_full`"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
        let text = GOOD.replace(
            "postgres://postgres@127.0.0.1/test",
            "host=db.example user=u sslmode=verify-full sslrootcert=/etc/ca.pem",
        );
        Config::from_toml(&text).expect("verify-full with a root file");
    }

    #[test]
    fn secret_files_are_read() {
        let dir = std::env::temp_dir().join(format!("sfm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let file = dir.join("secret");
        std::fs::write(&file, "from-file\n").expect("write");
        let text = GOOD.replace(
            "client_secret = \"s3cret\"",
            &format!("client_secret_file = \"{}\"", file.display()),
        );
        let cfg = Config::from_toml(&text).expect("valid");
        assert_eq!(cfg.salesforce.client_secret.expose(), "from-file");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn credentials_fill_only_what_the_config_leaves_unset() {
        let dir = std::env::temp_dir().join(format!("sfm-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        std::fs::write(dir.join("client_secret"), "from-credential\n").expect("write");
        std::fs::write(dir.join("replica_password"), "pg-secret\n").expect("write");
        std::fs::write(dir.join("replica_url"), "postgres://other@db/x\n").expect("write");
        std::fs::write(dir.join("private_key"), "PEM").expect("write");
        let mut cfg = Config::from_toml(GOOD).expect("valid");
        cfg.read_credentials(&dir).expect("credentials");
        // Set in the config: the config wins.
        assert_eq!(cfg.salesforce.client_secret.expose(), "s3cret");
        assert_eq!(
            cfg.replica.url.expose(),
            "postgres://postgres@127.0.0.1/test"
        );
        // Unset: taken from the directory.
        assert_eq!(cfg.replica.password.expose(), "pg-secret");
        assert_eq!(
            cfg.salesforce.private_key_file,
            Some(dir.join("private_key"))
        );
        // A config that leaves them out entirely.
        let bare = GOOD
            .replace("client_secret = \"s3cret\"", "")
            .replace("url = \"postgres://postgres@127.0.0.1/test\"", "");
        assert!(
            Config::from_toml(&bare).is_err(),
            "nothing to fill them from"
        );
        let built = config::Config::builder()
            .add_source(config::File::from_str(&bare, config::FileFormat::Toml))
            .build()
            .expect("toml");
        let mut cfg: Config = built.try_deserialize().expect("shape");
        cfg.read_credentials(&dir).expect("credentials");
        cfg.validate().expect("valid with credentials");
        assert_eq!(cfg.salesforce.client_secret.expose(), "from-credential");
        assert_eq!(cfg.replica.url.expose(), "postgres://other@db/x");
        assert!(!format!("{cfg:?}").contains("pg-secret"), "secret leaked");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn replica_secrets_come_from_files() {
        let dir = std::env::temp_dir().join(format!("sfm-rfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        std::fs::write(dir.join("pw"), "hunter2\n").expect("write");
        let text = GOOD.replace(
            "[replica]",
            &format!(
                "[replica]\npassword_file = \"{}\"",
                dir.join("pw").display()
            ),
        );
        let cfg = Config::from_toml(&text).expect("valid");
        assert_eq!(cfg.replica.password.expose(), "hunter2");
        let missing = GOOD.replace("[replica]", "[replica]\nurl_file = \"/nonexistent/url\"");
        let err = Config::from_toml(&missing)
            .expect_err("missing file")
            .to_string();
        assert!(
            err.contains("replica.url_file") && err.contains("/nonexistent/url"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn takeover_time_sets_the_lease_and_the_tick() {
        let cfg = Config::from_toml(GOOD).expect("valid");
        assert_eq!(cfg.ha.takeover_secs, 15);
        assert_eq!(cfg.ha.tick(), Duration::from_secs(3));
        assert_eq!(cfg.ha.lease(), Duration::from_secs(9));
        let bad = format!("{GOOD}\n[ha]\ntakeover_secs = 0\n");
        let err = Config::from_toml(&bad).expect_err("zero").to_string();
        assert!(err.contains("ha.takeover_secs"), "{err}");
    }
}
