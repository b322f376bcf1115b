//! `sfmirror init`: a first config file, so a first real run does not start from a blank
//! page. It writes the `[salesforce]` section for the login URL and OAuth flow given on the
//! command line, and, when it can log in with them, asks the org which objects it has
//! (describeGlobal) and Pub/Sub which of their change-event channels this user may subscribe
//! to (GetTopic), and proposes a channel for each. The text it writes is the text it loaded
//! to log in, so what `init` checked is what `check` and `run` will read. Secrets are
//! written only as `*_file` keys, so the file itself can be world-readable, as the systemd
//! units' dynamic user needs.

use crate::config::{AuthFlow, Config};
use crate::salesforce::Salesforce;
use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Deserialize;
use std::fmt::Write as _;
use std::path::PathBuf;

/// What `sfmirror init` is told: its command-line arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct InitOptions {
    /// The file to write.
    #[arg(long, short, default_value = "sfmirror.toml")]
    pub output: PathBuf,
    /// Overwrite the file if it exists.
    #[arg(long)]
    pub force: bool,
    /// https://login.salesforce.com, https://test.salesforce.com, or a My Domain URL.
    #[arg(long, default_value = "https://login.salesforce.com")]
    pub login_url: String,
    /// The OAuth flow: jwt, client_credentials, refresh_token, password, access_token.
    #[arg(long)]
    pub auth: AuthFlow,
    /// The connected app's consumer key.
    #[arg(long, default_value = "")]
    pub client_id: String,
    /// The integration user (jwt, password).
    #[arg(long, default_value = "")]
    pub username: String,
    #[arg(long)]
    pub private_key_file: Option<PathBuf>,
    #[arg(long)]
    pub client_secret_file: Option<PathBuf>,
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    #[arg(long)]
    pub refresh_token_file: Option<PathBuf>,
    #[arg(long)]
    pub access_token_file: Option<PathBuf>,
    /// The instance an access token belongs to (access_token).
    #[arg(long)]
    pub instance_url: Option<String>,
    /// The Pub/Sub API endpoint (default: Salesforce's).
    #[arg(long)]
    pub pubsub_endpoint: Option<String>,
    /// A private CA bundle to trust (PEM).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// The replica's PostgreSQL URL (default: a placeholder to edit).
    #[arg(long)]
    pub replica_url: Option<String>,
    /// Only propose channels for these objects (repeatable; default: every object
    /// describeGlobal lists that may have change events).
    #[arg(long = "object", value_name = "NAME")]
    pub objects: Vec<String>,
    /// Do not log in: write the Salesforce and replica sections only.
    #[arg(long)]
    pub offline: bool,
}

/// The replica URL written when none is given: a placeholder to edit.
const PLACEHOLDER_REPLICA: &str = "postgres://sfmirror@127.0.0.1:5432/replica";

/// The name of an object's own change-event channel: `/data/AccountChangeEvent`,
/// `/data/Invoice__ChangeEvent` for the custom object `Invoice__c`.
pub fn change_event_channel(object: &str) -> String {
    match object.strip_suffix("__c") {
        Some(base) => format!("/data/{base}__ChangeEvent"),
        None => format!("/data/{object}ChangeEvent"),
    }
}

/// Whether describeGlobal's entry can have a change-event channel at all: not a platform
/// event, custom metadata, external or big object, nor one of the history, share, feed or
/// change-event objects that hang off another object.
fn may_have_change_events(o: &GlobalObject) -> bool {
    const NOT: &[&str] = &[
        "__e",
        "__mdt",
        "__x",
        "__b",
        "__Share",
        "__History",
        "__Feed",
        "__Tag",
        "__ChangeEvent",
        "ChangeEvent",
        "History",
        "Share",
        "Feed",
    ];
    o.replicateable.unwrap_or(true) && !NOT.iter().any(|s| o.name.ends_with(s))
}

#[derive(Debug, Deserialize)]
struct GlobalDescribe {
    sobjects: Vec<GlobalObject>,
}

#[derive(Debug, Deserialize)]
struct GlobalObject {
    name: String,
    #[serde(default)]
    replicateable: Option<bool>,
}

/// What Pub/Sub said of one object's channel.
#[derive(Debug)]
enum Offer {
    Subscribable { object: String, channel: String },
    Refused { object: String, why: String },
}

/// Writes the config file; returns its text.
pub async fn init(opts: &InitOptions) -> anyhow::Result<String> {
    if opts.output.exists() && !opts.force {
        bail!(
            "{} exists; pass --force to overwrite it",
            opts.output.display()
        );
    }
    let head = header_and_salesforce(opts);
    let replica = replica_section(opts);
    let offers = if opts.offline {
        println!("not logging in (--offline): channels are left for you to add");
        Err("not logged in (--offline)".to_string())
    } else {
        // Loads the very text that will be written, with a stand-in channel (a config
        // needs one) so the login uses exactly the keys `check` will read.
        let probe = format!(
            "{head}{replica}\n[[channels]]\nname = \"/data/AccountChangeEvent\"\nobjects = [\"Account\"]\n"
        );
        let cfg = Config::from_toml(&probe).context("the config init would write is invalid")?;
        discover(&cfg, &opts.objects).await
    };
    let mut text = format!("{head}{replica}");
    match &offers {
        Ok(offers) => text.push_str(&channels_section(offers)),
        Err(why) => {
            eprintln!("sfmirror init: {why}; channels are left for you to add");
            let _ = write!(
                text,
                "\n# No channels yet ({why}). One per object, e.g.:\n\
                 # [[channels]]\n# name = \"/data/AccountChangeEvent\"\n# objects = [\"Account\"]\n"
            );
        }
    }
    // No secret is written inline (they are *_file keys), so the file can be world-readable
    // as the systemd units' dynamic user needs, unless the replica URL carries a password.
    let secret = opts.replica_url.as_deref().is_some_and(has_password);
    write_config(&opts.output, &text, if secret { 0o600 } else { 0o644 })?;
    println!("wrote {}", opts.output.display());
    if secret {
        println!(
            "the replica URL holds a password, so the file is readable by you only; the \
             systemd units need it world-readable: move the password to replica.password_file"
        );
    }
    println!(
        "next: sfmirror check --config {}   (then sfmirror backfill and sfmirror run)",
        opts.output.display()
    );
    Ok(text)
}

/// Logs in, lists the org's objects and asks Pub/Sub about each one's channel. `Err` says
/// why no channel can be proposed (login refused, describeGlobal failed).
async fn discover(cfg: &Config, only: &[String]) -> Result<Vec<Offer>, String> {
    let sf = Salesforce::new(&cfg.salesforce).map_err(|e| e.to_string())?;
    let session = sf
        .login()
        .await
        .map_err(|e| format!("could not log in: {e}"))?;
    println!(
        "logged in: org {} at {}",
        session.org_id, session.instance_url
    );
    let global: GlobalDescribe = sf
        .rest
        .get_json("rest", &format!("{}/sobjects", sf.rest.data_path()))
        .await
        .map_err(|e| format!("describeGlobal failed: {e}"))?;
    let mut objects: Vec<String> = global
        .sobjects
        .iter()
        .filter(|o| may_have_change_events(o))
        .map(|o| o.name.clone())
        .filter(|n| only.is_empty() || only.iter().any(|o| o.eq_ignore_ascii_case(n)))
        .collect();
    objects.sort();
    for o in only {
        if !global
            .sobjects
            .iter()
            .any(|g| g.name.eq_ignore_ascii_case(o))
        {
            return Err(format!("the org has no object {o} (describeGlobal)"));
        }
    }
    println!(
        "describeGlobal: {} objects, {} that may have change events; asking Pub/Sub about \
         their channels",
        global.sobjects.len(),
        objects.len()
    );
    let pubsub = sf.pubsub().map_err(|e| e.to_string())?;
    let pubsub = &pubsub;
    // A few at a time: an org lists hundreds of objects, and GetTopic is one call each.
    let mut offers: Vec<Offer> = futures::stream::iter(objects)
        .map(|object| async move {
            let channel = change_event_channel(&object);
            match pubsub.get_topic(&channel).await {
                Ok(topic) if topic.can_subscribe => Ok(Offer::Subscribable { object, channel }),
                Ok(_) => Ok(Offer::Refused {
                    object,
                    why: "this user may not subscribe (can_subscribe = false)".into(),
                }),
                Err(e) if e.is_transient() => Err(format!("asking Pub/Sub about {channel}: {e}")),
                Err(e) => Ok(Offer::Refused {
                    object,
                    why: e.to_string(),
                }),
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    offers.sort_by(|a, b| offer_object(a).cmp(offer_object(b)));
    for o in &offers {
        match o {
            Offer::Subscribable { object, channel } => {
                println!("  {object:<24} {channel}: may be subscribed to")
            }
            Offer::Refused { object, why } => println!("  {object:<24} not offered: {why}"),
        }
    }
    Ok(offers)
}

fn offer_object(o: &Offer) -> &str {
    match o {
        Offer::Subscribable { object, .. } | Offer::Refused { object, .. } => object,
    }
}

/// A TOML basic string.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn auth_name(a: AuthFlow) -> &'static str {
    match a {
        AuthFlow::Jwt => "jwt",
        AuthFlow::ClientCredentials => "client_credentials",
        AuthFlow::RefreshToken => "refresh_token",
        AuthFlow::Password => "password",
        AuthFlow::AccessToken => "access_token",
    }
}

fn header_and_salesforce(o: &InitOptions) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# sfmirror configuration, written by `sfmirror init` for {}.\n\
         # Every key is explained in examples/sfmirror.toml and the README's Configuration\n\
         # section; any key can be overridden as SFMIRROR__SECTION__KEY in the environment.\n\
         # Check it (replica reachable, login, channels) with: sfmirror check --config {}\n",
        o.login_url,
        o.output.display()
    );
    t.push_str(
        "[salesforce]\n\
         # Where OAuth tokens come from: https://login.salesforce.com, https://test.salesforce.com\n\
         # (sandboxes) or the org's My Domain URL.\n",
    );
    let _ = writeln!(t, "login_url = {}", quoted(&o.login_url));
    t.push_str("# jwt | client_credentials | refresh_token | password | access_token\n");
    let _ = writeln!(t, "auth = {}", quoted(auth_name(o.auth)));
    if !o.client_id.is_empty() {
        t.push_str("# The connected app's consumer key.\n");
        let _ = writeln!(t, "client_id = {}", quoted(&o.client_id));
    }
    if !o.username.is_empty() {
        t.push_str("# The integration user.\n");
        let _ = writeln!(t, "username = {}", quoted(&o.username));
    }
    // Secrets by file only: a config file gets copied and pasted, a secret in it too.
    let files = [
        (
            "private_key_file",
            &o.private_key_file,
            "the private key (PEM) of the connected app's certificate",
        ),
        (
            "client_secret_file",
            &o.client_secret_file,
            "the connected app's consumer secret",
        ),
        ("password_file", &o.password_file, "the user's password"),
        (
            "refresh_token_file",
            &o.refresh_token_file,
            "a refresh token of the connected app",
        ),
        (
            "access_token_file",
            &o.access_token_file,
            "an access token obtained elsewhere",
        ),
    ];
    for (key, value, what) in files {
        if let Some(path) = value {
            let _ = writeln!(t, "# A file holding {what}.");
            let _ = writeln!(t, "{key} = {}", quoted(&path.display().to_string()));
        }
    }
    if let Some(url) = &o.instance_url {
        let _ = writeln!(t, "instance_url = {}", quoted(url));
    }
    t.push_str(
        "# Pub/Sub API: https://api.pubsub.salesforce.com:7443 unless set (http:// only to a\n\
         # loopback host, such as the emulator).\n",
    );
    match &o.pubsub_endpoint {
        Some(e) => {
            let _ = writeln!(t, "pubsub_endpoint = {}", quoted(e));
        }
        None => t.push_str("# pubsub_endpoint = \"https://api.pubsub.salesforce.com:7443\"\n"),
    }
    if let Some(ca) = &o.ca_file {
        let _ = writeln!(t, "ca_file = {}", quoted(&ca.display().to_string()));
    }
    t
}

fn replica_section(o: &InitOptions) -> String {
    let mut t = String::from(
        "\n[replica]\n\
         # The PostgreSQL replica: a libpq URL (sslmode and sslrootcert for TLS). Put the\n\
         # password in password_file rather than here.\n",
    );
    match &o.replica_url {
        Some(url) => {
            let _ = writeln!(t, "url = {}", quoted(url));
        }
        None => {
            let _ = writeln!(t, "# Change this: where the replica lives.");
            let _ = writeln!(t, "url = {}", quoted(PLACEHOLDER_REPLICA));
        }
    }
    t.push_str(
        "# One table per object in `schema`; checkpoints and repairs in `control_schema`.\n\
         # schema = \"salesforce\"\n\
         # control_schema = \"sfmirror\"\n",
    );
    t
}

fn channels_section(offers: &[Offer]) -> String {
    let mut t = String::from(
        "\n# Channels: each object the org listed (describeGlobal) whose change-event channel\n\
         # Pub/Sub says this user may subscribe to (GetTopic). An object's events arrive only once\n\
         # it is selected for Change Data Capture in Setup. Remove what you do not need.\n",
    );
    let mut any = false;
    for o in offers {
        if let Offer::Subscribable { object, channel } = o {
            any = true;
            let _ = write!(
                t,
                "\n[[channels]]\nname = {}\nobjects = [{}]\n",
                quoted(channel),
                quoted(object)
            );
        }
    }
    if !any {
        t.push_str(
            "# None may be subscribed to by this user: give it the permissions of the README's\n\
             # Least privilege section, then run `sfmirror init` again.\n",
        );
    }
    let refused: Vec<String> = offers
        .iter()
        .filter_map(|o| match o {
            Offer::Refused { object, why } => Some(format!("#   {object}: {why}")),
            _ => None,
        })
        .collect();
    if !refused.is_empty() {
        t.push_str("\n# Not offered (Pub/Sub refused their channel):\n");
        t.push_str(&refused.join("\n"));
        t.push('\n');
    }
    t
}

/// Whether a libpq URL (`user:password@`) or key=value string (`password=`) holds a
/// password.
fn has_password(url: &str) -> bool {
    if let Some(rest) = url.split_once("://").map(|(_, r)| r) {
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        return authority
            .rsplit_once('@')
            .is_some_and(|(user, _)| user.contains(':'))
            || url.contains("password=");
    }
    url.split_whitespace().any(|kv| kv.starts_with("password="))
}

/// Writes `text` with permissions `mode`.
fn write_config(path: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // `mode` applies only to a new file; an overwritten one (--force) gets it too.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> InitOptions {
        InitOptions {
            output: PathBuf::from("/tmp/x.toml"),
            force: false,
            login_url: "https://login.salesforce.com".into(),
            auth: AuthFlow::Jwt,
            client_id: "3MVG9".into(),
            username: "int@example.com".into(),
            private_key_file: Some(PathBuf::from("/etc/sfmirror/server.key")),
            client_secret_file: None,
            password_file: None,
            refresh_token_file: None,
            access_token_file: None,
            instance_url: None,
            pubsub_endpoint: None,
            ca_file: None,
            replica_url: None,
            objects: Vec::new(),
            offline: true,
        }
    }

    #[test]
    fn channels_are_named_as_salesforce_names_them() {
        assert_eq!(change_event_channel("Account"), "/data/AccountChangeEvent");
        assert_eq!(
            change_event_channel("Invoice__c"),
            "/data/Invoice__ChangeEvent"
        );
    }

    #[test]
    fn objects_without_change_events_are_not_asked_about() {
        let o = |name: &str| GlobalObject {
            name: name.into(),
            replicateable: Some(true),
        };
        assert!(may_have_change_events(&o("Account")));
        assert!(may_have_change_events(&o("Invoice__c")));
        for name in [
            "Order_Shipped__e",
            "Setting__mdt",
            "AccountHistory",
            "AccountShare",
            "AccountFeed",
            "AccountChangeEvent",
        ] {
            assert!(!may_have_change_events(&o(name)), "{name}");
        }
        let mut not_replicated = o("Account");
        not_replicated.replicateable = Some(false);
        assert!(!may_have_change_events(&not_replicated));
    }

    #[test]
    fn the_written_text_is_a_valid_config_once_it_has_a_channel() {
        let o = opts();
        let mut text = header_and_salesforce(&o) + &replica_section(&o);
        text.push_str(&channels_section(&[
            Offer::Subscribable {
                object: "Account".into(),
                channel: "/data/AccountChangeEvent".into(),
            },
            Offer::Refused {
                object: "Secret__c".into(),
                why: "no permission".into(),
            },
        ]));
        let cfg = Config::from_toml(&text).expect("valid");
        assert_eq!(cfg.salesforce.auth, AuthFlow::Jwt);
        assert_eq!(cfg.channels.len(), 1);
        assert!(text.contains("#   Secret__c: no permission"), "{text}");
        assert!(text.contains("# Change this"), "{text}");
    }

    #[test]
    fn passwords_in_replica_urls_are_noticed() {
        assert!(has_password("postgres://u:pw@h/db"));
        assert!(has_password("postgres://u@h/db?password=pw"));
        assert!(has_password("host=h user=u password=pw"));
        assert!(!has_password("postgres://u@h/db"));
        assert!(!has_password("postgres://h/db?sslmode=require"));
        assert!(!has_password("host=h user=u"));
    }

    #[test]
    fn strings_are_quoted_for_toml() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
