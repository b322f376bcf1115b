//! Conformance with real third-party Salesforce clients from npm (tests/conformance/): the
//! emulator serves them over TLS, and what they decode must be what the emulator meant.
//!
//! - `salesforce-pubsub-api-client` (pubsub.mjs), in user-supplied token mode, subscribes to
//!   change event channels while this test changes records through `emulator.org`; its decoded
//!   headers (changed / nulled field names come from its own bitmap decoding) and body values
//!   must match the emulator's events. It also publishes a platform event and receives it back.
//! - `jsforce` (rest.mjs) runs describe, record CRUD, SOQL with paging, queryAll, sObject
//!   Collections retrieve, a Bulk API 2.0 query, relationship fields, a subquery and an
//!   aggregate (and Bulk's refusal of GROUP BY), and an all-or-none rollback; its answers
//!   must match the org and Salesforce's documented shapes.
//!
//! - `simple-salesforce` (PyPI; simple_salesforce_ops.py) runs describe (global, object,
//!   basic information), limits, create / get (18 and 15 characters) / update / delete,
//!   upsert and get by external id, query with `query_more` by URL and by locator,
//!   `query_all`, queryAll of deleted records, getUpdated / getDeleted, a Bulk API 2.0 query
//!   and the documented errors (NOT_FOUND, MALFORMED_ID, INVALID_FIELD, ENTITY_IS_DELETED,
//!   300 for several external-id matches), relationship fields, a subquery and an aggregate
//!   (and Bulk's refusal of GROUP BY), and all-or-none rollbacks of sObject Collections and
//!   composite.
//!
//! The Node dependencies come from the committed lockfile: `npm ci` runs here when
//! `tests/conformance/node_modules` is missing or older than the lockfile (CI runs it first).
//! The Python one is pinned in `requirements.txt` and installed into
//! `tests/conformance/.venv` (by `.ci/run`, or here when missing); without python3 and its
//! `venv` module the simple-salesforce test is skipped, saying so, and fails otherwise.
//! On failure the script's stderr is printed.

use serde_json::{Value as J, json};
use sfmirror::emulator::{Emulator, EmulatorConfig};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

const API_VERSION: &str = "62.0";
const ACCOUNT_TOPIC: &str = "/data/AccountChangeEvent";
const ALL_CHANGES_TOPIC: &str = "/data/ChangeEvents";
const EVENT_TOPIC: &str = "/event/Order_Shipped__e";
/// The origin our direct org changes claim, as an API client's would read.
const ORIGIN: &str = "com/salesforce/api/soap/62.0;client=sfmirror-conformance";

fn conformance_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance")
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Installs the locked Node dependencies unless they are already there and current.
fn ensure_node_modules() {
    static ONCE: Mutex<bool> = Mutex::new(false);
    let mut done = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    if *done {
        return;
    }
    let dir = conformance_dir();
    let installed = dir.join("node_modules/.package-lock.json");
    let lock = dir.join("package-lock.json");
    let current = match (modified(&installed), modified(&lock)) {
        (Some(i), Some(l)) => i >= l,
        _ => false,
    };
    let complete = ["salesforce-pubsub-api-client", "jsforce"].iter().all(|p| {
        dir.join("node_modules")
            .join(p)
            .join("package.json")
            .exists()
    });
    if !(current && complete) {
        let out = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `npm ci` in {} ({e}): the conformance test needs Node.js >= 20 \
                     and npm on PATH",
                    dir.display()
                )
            });
        assert!(
            out.status.success(),
            "`npm ci` in {} failed ({}):\n{}\n{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *done = true;
}

/// A TLS emulator with its certificates in a directory of its own.
async fn tls_emulator(name: &str) -> (Emulator, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "sfm-conformance-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let emulator = Emulator::start(EmulatorConfig {
        tls_dir: Some(dir.clone()),
        ..Default::default()
    })
    .await
    .expect("emulator starts with TLS");
    let ca = emulator
        .ca_file
        .clone()
        .expect("a TLS emulator has a CA file");
    assert!(
        emulator.rest_url.starts_with("https://"),
        "{}",
        emulator.rest_url
    );
    (emulator, ca)
}

/// Removes the certificate directory of a finished emulator.
fn remove_tls_dir(ca_file: &Path) {
    if let Some(dir) = ca_file.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A running Node (or Python) script: its stdout as JSON lines, its stderr kept for failure
/// reports.
struct NodeScript {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<J>,
    /// Every line read so far, for failure messages.
    seen: Vec<J>,
    stderr: Arc<Mutex<String>>,
    stderr_task: tokio::task::JoinHandle<()>,
}

impl NodeScript {
    fn spawn(name: &'static str, envs: &[(&str, String)]) -> NodeScript {
        ensure_node_modules();
        let mut cmd = Command::new("node");
        cmd.arg(conformance_dir().join(name));
        NodeScript::start(cmd, name, envs)
    }

    /// Runs `cmd` (a script of tests/conformance/ that prints JSON lines) as `name`.
    fn start(mut cmd: Command, name: &'static str, envs: &[(&str, String)]) -> NodeScript {
        let dir = conformance_dir();
        cmd.current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} (is its interpreter on PATH?): {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"kind": "unparsed", "line": line}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let stderr_task = tokio::spawn(async move {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr_pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        NodeScript {
            name,
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
            stderr_task,
        }
    }

    /// The next JSON line, or `None` when stdout closed; panics after `timeout`.
    async fn next(&mut self, timeout: Duration, waiting_for: &str) -> Option<J> {
        match tokio::time::timeout(timeout, self.lines.recv()).await {
            Ok(line) => {
                if let Some(l) = &line {
                    self.seen.push(l.clone());
                }
                line
            }
            Err(_) => panic!(
                "{}: timed out after {timeout:?} waiting for {waiting_for}; lines so far:\n{}",
                self.name,
                self.seen_text()
            ),
        }
    }

    fn seen_text(&self) -> String {
        self.seen
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Closes stdin (the scripts' signal to finish) and waits for a clean exit.
    async fn finish(&mut self, timeout: Duration) {
        drop(self.stdin.take());
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: did not exit within {timeout:?}", self.name))
            .expect("wait for node");
        // Drain what is left so failure reports are complete.
        while let Ok(Some(l)) =
            tokio::time::timeout(Duration::from_secs(2), self.lines.recv()).await
        {
            self.seen.push(l);
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.stderr_task).await;
        assert!(
            status.success(),
            "{} exited with {status}; lines:\n{}",
            self.name,
            self.seen_text()
        );
    }
}

impl Drop for NodeScript {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
            eprintln!(
                "---- node {} stderr ----\n{stderr}\n---- node {} stdout (JSON lines) ----\n{}\n----",
                self.name,
                self.name,
                self.seen_text()
            );
        }
    }
}

/// The Pub/Sub endpoint as gRPC clients take it: `host:port`.
fn grpc_target(endpoint: &str) -> String {
    endpoint
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// A change event as the emulator meant it: the bus's payload decoded with its own schema.
fn emulator_view(emulator: &Emulator, channel: &str) -> BTreeMap<u64, J> {
    emulator
        .org
        .bus
        .read_after(channel, 0, 1000)
        .iter()
        .map(|e| {
            let schema = emulator
                .org
                .schema_json(&e.schema_id)
                .unwrap_or_else(|| panic!("schema {} of replay {}", e.schema_id, e.replay));
            let view = sfmirror::salesforce::event::inspect(&schema, &e.payload)
                .unwrap_or_else(|err| panic!("the emulator's own event {}: {err}", e.replay));
            (e.replay, view)
        })
        .collect()
}

/// Non-null body values of a client-decoded payload by path (`BillingAddress.City`).
fn client_values(payload: &J) -> BTreeMap<String, J> {
    let mut out = BTreeMap::new();
    let Some(map) = payload.as_object() else {
        return out;
    };
    for (k, v) in map {
        if k == "ChangeEventHeader" || v.is_null() {
            continue;
        }
        match v.as_object() {
            Some(subs) => {
                for (s, sv) in subs {
                    if !sv.is_null() {
                        out.insert(format!("{k}.{s}"), sv.clone());
                    }
                }
            }
            None => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    out
}

/// JSON equality with numbers compared by value (`42` and `42.0` are the same number).
fn same(a: &J, b: &J) -> bool {
    match (a, b) {
        (J::Number(x), J::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn names(list: &J) -> BTreeSet<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The audit fields Salesforce adds to an update's changed fields on its own.
const AUDIT: &[&str] = &["LastModifiedDate", "LastModifiedById", "SystemModstamp"];

fn without_audit(names: &BTreeSet<String>) -> BTreeSet<String> {
    names
        .iter()
        .filter(|n| !AUDIT.contains(&n.as_str()))
        .cloned()
        .collect()
}

/// Asserts the client decoded the event `replay` exactly as the emulator meant it.
fn assert_same_event(topic: &str, client: &J, ours: &J) {
    let replay = &client["replayId"];
    let head = &client["payload"]["ChangeEventHeader"];
    let want = &ours["header"];
    for key in [
        "entityName",
        "recordIds",
        "changeType",
        "changeOrigin",
        "transactionKey",
        "sequenceNumber",
        "commitTimestamp",
        "commitNumber",
        "commitUser",
    ] {
        assert!(
            same(&head[key], &want[key]),
            "{topic} replay {replay}: header {key}: client decoded {} but the emulator sent {}",
            head[key],
            want[key]
        );
    }
    for key in ["changedFields", "nulledFields", "diffFields"] {
        assert_eq!(
            names(&head[key]),
            names(&want[key]),
            "{topic} replay {replay}: {key} names as the client decoded its bitmaps (left) vs \
             what the emulator encoded (right)"
        );
    }
    let got = client_values(&client["payload"]);
    let want_values: BTreeMap<String, J> = ours["fields"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let keys: BTreeSet<&String> = got.keys().chain(want_values.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| match (got.get(*k), want_values.get(*k)) {
            (Some(a), Some(b)) => !same(a, b),
            _ => true,
        })
        .map(|k| {
            format!(
                "{k}: client {} emulator {}",
                got.get(k).unwrap_or(&J::Null),
                want_values.get(k).unwrap_or(&J::Null)
            )
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{topic} replay {replay}: body values differ:\n{}",
        diffs.join("\n")
    );
}

fn fields(v: J) -> serde_json::Map<String, J> {
    match v {
        J::Object(m) => m,
        other => panic!("not a JSON object: {other}"),
    }
}

/// The ids of `records`, sorted, as the scripts report them.
fn sorted_ids(records: &[sfmirror::emulator::store::Record]) -> Vec<J> {
    let ids: BTreeSet<String> = records
        .iter()
        .filter_map(|r| r.get("Id").and_then(J::as_str).map(str::to_string))
        .collect();
    ids.into_iter().map(J::String).collect()
}

fn epoch_ms(rest_datetime: &J) -> i64 {
    let s = rest_datetime.as_str().expect("a REST datetime string");
    chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z")
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(s))
        .unwrap_or_else(|e| panic!("REST datetime {s}: {e}"))
        .timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_api_client_decodes_change_events_and_round_trips_a_platform_event() {
    let (emulator, ca_path) = tls_emulator("pubsub").await;
    let ca = ca_path.display().to_string();
    let mut node = NodeScript::spawn(
        "pubsub.mjs",
        &[
            ("SFM_INSTANCE_URL", emulator.rest_url.clone()),
            ("SFM_ACCESS_TOKEN", emulator.access_token.clone()),
            ("SFM_ORG_ID", emulator.org.org_id.clone()),
            (
                "SFM_PUBSUB_ENDPOINT",
                grpc_target(&emulator.pubsub_endpoint),
            ),
            ("SFM_CA_FILE", ca.clone()),
            ("NODE_EXTRA_CA_CERTS", ca.clone()),
            (
                "SFM_CDC_TOPICS",
                format!("{ACCOUNT_TOPIC},{ALL_CHANGES_TOPIC}"),
            ),
            ("SFM_EVENT_TOPIC", EVENT_TOPIC.to_string()),
        ],
    );

    // The client subscribes at LATEST: change nothing before the emulator has both calls.
    // Lines that come meanwhile (the platform event may already be back) are kept for later.
    let mut early = std::collections::VecDeque::new();
    let t0 = std::time::Instant::now();
    loop {
        let topics: BTreeSet<String> = emulator
            .subscriptions()
            .into_iter()
            .map(|s| s.topic)
            .collect();
        if topics.contains(ACCOUNT_TOPIC) && topics.contains(ALL_CHANGES_TOPIC) {
            break;
        }
        if let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_millis(50), node.lines.recv()).await
        {
            assert!(
                !matches!(line["kind"].as_str(), Some("error" | "fatal")),
                "the client failed before subscribing: {line}"
            );
            node.seen.push(line.clone());
            early.push_back(line);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the client never subscribed to {ACCOUNT_TOPIC} and {ALL_CHANGES_TOPIC}; lines:\n{}",
            node.seen_text()
        );
    }

    // The changes, straight through the org.
    let org = &emulator.org;
    let created = fields(json!({
        "Name": "Conformance Industries",
        "Phone": "555-0100",
        "BillingStreet": "1 Rue de la Paix",
        "BillingCity": "Paris",
        "BillingPostalCode": "75002",
        "Industry": "Manufacturing",
        "NumberOfEmployees": 250,
        "AnnualRevenue": 1250000.75,
        "Description": "made by tests/conformance.rs"
    }));
    let id = org.create("Account", &created, ORIGIN).expect("create");
    let after_create = org.get("Account", &id).expect("created record");
    org.update(
        "Account",
        &id,
        &fields(json!({"Phone": "555-0199", "BillingCity": "Lyon"})),
        ORIGIN,
    )
    .expect("update phone and city");
    org.update(
        "Account",
        &id,
        &fields(json!({"Description": null})),
        ORIGIN,
    )
    .expect("null the description");
    org.delete("Account", &id, ORIGIN).expect("delete");
    let contact = org
        .create(
            "Contact",
            &fields(json!({"LastName": "Conformance", "FirstName": "Ada"})),
            ORIGIN,
        )
        .expect("create a contact");

    // What the client saw: 4 Account events on each channel, the Contact on ChangeEvents only,
    // and the platform event it published.
    let mut events: BTreeMap<&str, Vec<J>> = BTreeMap::new();
    let mut published = None;
    let mut platform = None;
    let done = |events: &BTreeMap<&str, Vec<J>>, published: &Option<J>, platform: &Option<J>| {
        events.get(ACCOUNT_TOPIC).map_or(0, Vec::len) >= 4
            && events.get(ALL_CHANGES_TOPIC).map_or(0, Vec::len) >= 5
            && published.is_some()
            && platform.is_some()
    };
    while !done(&events, &published, &platform) {
        let line = match early.pop_front() {
            Some(line) => line,
            None => node
                .next(
                    Duration::from_secs(30),
                    "the change events and the platform event",
                )
                .await
                .unwrap_or_else(|| panic!("pubsub.mjs closed its output early")),
        };
        match line["kind"].as_str() {
            Some("event") => {
                let topic = line["topic"].as_str().unwrap_or_default();
                let key = [ACCOUNT_TOPIC, ALL_CHANGES_TOPIC, EVENT_TOPIC]
                    .into_iter()
                    .find(|t| *t == topic)
                    .unwrap_or_else(|| panic!("an event on a topic nobody asked for: {line}"));
                if key == EVENT_TOPIC {
                    platform = Some(line);
                } else {
                    events.entry(key).or_default().push(line);
                }
            }
            Some("published") => published = Some(line),
            Some("error" | "fatal" | "unparsed") => panic!("pubsub.mjs reported: {line}"),
            _ => {}
        }
    }

    // The client hands events over from an async handler that first awaits the schema
    // (GetSchema, until cached), so events of different messages can overtake one another:
    // put them back in replay order.
    for list in events.values_mut() {
        list.sort_by_key(|e| e["replayId"].as_u64());
    }

    // Every event decoded by the client is the emulator's event, field for field.
    for topic in [ACCOUNT_TOPIC, ALL_CHANGES_TOPIC] {
        let ours = emulator_view(&emulator, topic);
        let got = &events[topic];
        assert_eq!(
            got.len(),
            ours.len(),
            "{topic}: the client received {} events, the emulator published {}",
            got.len(),
            ours.len()
        );
        for event in got {
            let replay = event["replayId"]
                .as_u64()
                .unwrap_or_else(|| panic!("replayId as a number: {event}"));
            let mine = ours
                .get(&replay)
                .unwrap_or_else(|| panic!("{topic}: replay {replay} is not the emulator's"));
            assert_same_event(topic, event, mine);
            assert!(
                event["schemaId"].as_str().is_some_and(|s| !s.is_empty()),
                "{event}"
            );
        }
    }

    // And it is what the changes mean (independently of any decoder of ours).
    let account = &events[ACCOUNT_TOPIC];
    let header = |i: usize| &account[i]["payload"]["ChangeEventHeader"];
    let body = |i: usize| &account[i]["payload"];
    for (i, kind) in ["CREATE", "UPDATE", "UPDATE", "DELETE"].iter().enumerate() {
        assert_eq!(header(i)["changeType"], *kind, "event {i}: {}", account[i]);
        assert_eq!(header(i)["entityName"], "Account");
        assert_eq!(header(i)["recordIds"], json!([id]));
        assert_eq!(header(i)["changeOrigin"], ORIGIN);
    }
    // CREATE: every value set, nothing listed as changed.
    assert_eq!(names(&header(0)["changedFields"]), BTreeSet::new());
    assert_eq!(names(&header(0)["nulledFields"]), BTreeSet::new());
    assert_eq!(body(0)["Name"], "Conformance Industries");
    assert_eq!(body(0)["Phone"], "555-0100");
    assert_eq!(body(0)["BillingAddress"]["Street"], "1 Rue de la Paix");
    assert_eq!(body(0)["BillingAddress"]["City"], "Paris");
    assert_eq!(body(0)["BillingAddress"]["PostalCode"], "75002");
    assert_eq!(body(0)["BillingAddress"]["State"], J::Null);
    assert_eq!(body(0)["Industry"], "Manufacturing");
    assert_eq!(body(0)["NumberOfEmployees"], 250);
    // Currency with scale 0: the org stores (and sends) the value rounded to the scale.
    assert_eq!(
        body(0)["AnnualRevenue"].as_f64(),
        after_create["AnnualRevenue"].as_f64(),
        "AnnualRevenue as stored"
    );
    assert_eq!(body(0)["Description"], "made by tests/conformance.rs");
    assert_eq!(
        body(0)["CreatedDate"].as_i64(),
        Some(epoch_ms(&after_create["CreatedDate"])),
        "CreatedDate as epoch ms"
    );
    // UPDATE of a scalar and a compound component: `Parent.Component` names.
    assert_eq!(
        without_audit(&names(&header(1)["changedFields"])),
        set(&["Phone", "BillingAddress.City"]),
        "{}",
        account[1]
    );
    assert_eq!(names(&header(1)["nulledFields"]), BTreeSet::new());
    assert_eq!(body(1)["Phone"], "555-0199");
    assert_eq!(body(1)["BillingAddress"]["City"], "Lyon");
    assert_eq!(
        body(1)["Name"],
        J::Null,
        "unchanged fields are null in an update"
    );
    // UPDATE that nulls a field: changed and nulled.
    assert_eq!(
        without_audit(&names(&header(2)["changedFields"])),
        set(&["Description"]),
        "{}",
        account[2]
    );
    assert_eq!(names(&header(2)["nulledFields"]), set(&["Description"]));
    assert_eq!(body(2)["Description"], J::Null);
    // DELETE: header only.
    assert_eq!(names(&header(3)["changedFields"]), BTreeSet::new());
    assert!(
        client_values(body(3)).is_empty(),
        "a delete carries no values: {}",
        account[3]
    );
    // The all-changes channel has the Contact too.
    let all = &events[ALL_CHANGES_TOPIC];
    let last = &all[all.len() - 1]["payload"];
    assert_eq!(last["ChangeEventHeader"]["entityName"], "Contact");
    assert_eq!(last["ChangeEventHeader"]["recordIds"], json!([contact]));
    // A person name is a compound field in change events.
    assert_eq!(last["Name"]["LastName"], "Conformance");
    assert_eq!(last["Name"]["FirstName"], "Ada");
    assert!(
        account
            .iter()
            .all(|e| e["payload"]["ChangeEventHeader"]["entityName"] == "Account"),
        "{ACCOUNT_TOPIC} carries Account events only"
    );

    // The platform event: published by the client, stored on the bus, received back.
    let published = published.expect("published");
    assert_eq!(published["error"], J::Null, "{published}");
    assert_eq!(published["correlationKey"], "conformance-correlation-1");
    let platform = platform.expect("platform event");
    assert_eq!(
        platform["replayId"], published["replayId"],
        "the event received is the one published"
    );
    let bus = emulator.org.bus.read_after(EVENT_TOPIC, 0, 10);
    assert_eq!(bus.len(), 1, "one event on {EVENT_TOPIC}");
    assert_eq!(Some(bus[0].replay), platform["replayId"].as_u64());
    let p = &platform["payload"];
    assert_eq!(p["Order_Number__c"], "ORD-0042");
    assert_eq!(p["Shipped_At__c"], 1_715_938_215_250_i64);
    assert_eq!(p["Weight_Kg__c"].as_f64(), Some(12.75));
    assert_eq!(p["Express__c"], true);
    assert!(p["CreatedDate"].as_i64().is_some_and(|ms| ms > 0), "{p}");
    assert!(
        p["CreatedById"].as_str().is_some_and(|s| !s.is_empty()),
        "{p}"
    );

    node.finish(Duration::from_secs(20)).await;
    emulator.stop().await;
    remove_tls_dir(&ca_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsforce_rest_query_and_bulk_match_the_org() {
    let (emulator, ca) = tls_emulator("rest").await;
    let pem = std::fs::read(&ca).expect("read the CA");
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("CA PEM")])
        .build()
        .expect("https client");
    // More than one page of query results (2,000 a page).
    let seeded: J = http
        .post(format!("{}/emulator/seed", emulator.rest_url))
        .json(&json!({"object": "Account", "count": 2500, "seed": 7}))
        .send()
        .await
        .expect("seed call")
        .error_for_status()
        .expect("seed accepted")
        .json()
        .await
        .expect("seed answer");
    assert_eq!(seeded["ids"].as_array().map(Vec::len), Some(2500));

    let mut node = NodeScript::spawn(
        "rest.mjs",
        &[
            ("SFM_INSTANCE_URL", emulator.rest_url.clone()),
            ("SFM_ACCESS_TOKEN", emulator.access_token.clone()),
            ("SFM_API_VERSION", API_VERSION.to_string()),
            ("SFM_USERNAME", emulator.credentials.username.clone()),
            ("SFM_PASSWORD", emulator.credentials.password.clone()),
            ("NODE_EXTRA_CA_CERTS", ca.display().to_string()),
        ],
    );
    let mut steps: BTreeMap<String, J> = BTreeMap::new();
    while let Some(line) = node.next(Duration::from_secs(180), "rest.mjs steps").await {
        let step = line["step"].as_str().unwrap_or("?").to_string();
        assert!(step != "failed" && step != "?", "rest.mjs failed: {line}");
        steps.insert(step, line);
        if steps.contains_key("done") {
            break;
        }
    }
    node.finish(Duration::from_secs(20)).await;
    let step = |name: &str| {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("rest.mjs never reported step {name}"))
    };
    let org = &emulator.org;

    // describe
    let describe = step("describe");
    let def = org.object("Account").expect("Account");
    let want: Vec<J> = def
        .describe
        .fields
        .iter()
        .map(|f| J::String(f.name.clone()))
        .collect();
    assert_eq!(describe["name"], "Account");
    assert_eq!(describe["keyPrefix"], "001");
    assert_eq!(describe["fields"], J::Array(want));
    assert_eq!(
        describe["billingCity"]["compoundFieldName"], "BillingAddress",
        "{describe}"
    );

    // create / retrieve / update / retrieve / delete
    let created = &step("create")["result"];
    assert_eq!(created["success"], true, "{created}");
    let id = created["id"].as_str().expect("created id").to_string();
    assert!(id.starts_with("001") && id.len() == 18, "{id}");
    let first = &step("retrieve")["record"];
    assert_eq!(first["Id"], id.as_str());
    assert_eq!(first["Name"], "jsforce conformance");
    assert_eq!(first["Phone"], "555-0100");
    assert_eq!(first["BillingCity"], "Lyon");
    assert_eq!(first["NumberOfEmployees"], 42);
    assert_eq!(step("update")["result"]["success"], true);
    let second = &step("retrieve-updated")["record"];
    assert_eq!(second["Phone"], "555-0199");
    assert_eq!(second["BillingCity"], "Nice");
    assert_eq!(second["NumberOfEmployees"], J::Null);
    assert_eq!(step("delete")["result"]["success"], true);
    // The record as the org holds it (in the recycle bin now) is what jsforce last read.
    let stored = org
        .all_records("Account")
        .into_iter()
        .find(|r| r["Id"] == id.as_str())
        .expect("the record is in the recycle bin");
    assert_eq!(stored["IsDeleted"], true);
    let mismatches: Vec<String> = stored
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "IsDeleted" | "SystemModstamp"))
        .filter(|(k, v)| !same(&second[k.as_str()], v))
        .map(|(k, v)| format!("{k}: jsforce {} org {v}", second[k.as_str()]))
        .collect();
    assert!(
        mismatches.is_empty(),
        "retrieve vs org:\n{}",
        mismatches.join("\n")
    );
    let many = step("retrieve-many")["records"]
        .as_array()
        .cloned()
        .expect("collections retrieve answer");
    assert_eq!(many.len(), 1);
    assert_eq!(many[0]["Id"], id.as_str());
    assert_eq!(many[0]["attributes"]["type"], "Account");
    assert_eq!(many[0]["BillingCity"], "Nice");
    assert_eq!(many[0]["BillingAddress"]["city"], "Nice");

    // SOQL paging: every record that was live then (the seeded ones and jsforce's).
    // (The Accounts the relationship and collections steps create later are not among them.)
    let mut later: Vec<J> = step("collections")["created"]
        .as_array()
        .map(|a| a.iter().map(|r| r["id"].clone()).collect())
        .unwrap_or_default();
    later.push(step("soql-relations")["parent"].clone());
    let live_then: Vec<J> = sorted_ids(&org.all_records("Account"))
        .into_iter()
        .filter(|id| !later.contains(id))
        .collect();
    let paged = step("query-page");
    let pages = paged["pages"].as_array().cloned().expect("pages");
    assert_eq!(pages.len(), 2, "2,501 records are two pages: {pages:?}");
    assert_eq!(pages[0]["size"], 2000);
    assert_eq!(pages[0]["done"], false);
    assert_eq!(pages[1]["size"], 501);
    assert_eq!(pages[1]["done"], true);
    assert_eq!(pages[0]["totalSize"], 2501);
    assert_eq!(paged["ids"], J::Array(live_then.clone()));
    let fetched = step("query-autofetch");
    assert_eq!(fetched["totalSize"], 2501);
    assert_eq!(fetched["done"], true);
    assert_eq!(fetched["ids"], J::Array(live_then));

    // query vs queryAll after the delete
    let deleted = step("query-deleted");
    assert_eq!(deleted["query"], json!([]), "{deleted}");
    let all = deleted["queryAll"].as_array().cloned().expect("queryAll");
    assert_eq!(all.len(), 1, "{deleted}");
    assert_eq!(all[0]["Id"], id.as_str());
    assert_eq!(all[0]["IsDeleted"], true);

    // Bulk API 2.0: the live records, as CSV through jsforce's result locators.
    // (The parent account of the relationship step is created later.)
    let parent_then = step("soql-relations")["parent"].clone();
    let live_now: Vec<J> = sorted_ids(&org.records("Account"))
        .into_iter()
        .filter(|id| *id != parent_then)
        .collect();
    let bulk = step("bulk2-query");
    assert_eq!(bulk["count"], 2500);
    assert_eq!(bulk["ids"], J::Array(live_now));
    let bulk_all = step("bulk2-queryAll")["records"]
        .as_array()
        .cloned()
        .expect("bulk queryAll rows");
    assert_eq!(bulk_all.len(), 1);
    assert_eq!(bulk_all[0]["Id"], id.as_str());
    assert_eq!(bulk_all[0]["IsDeleted"], "true", "CSV values are text");

    // Errors come back in Salesforce's shape, which jsforce turns into named errors.
    let errors = step("errors")["errors"]
        .as_array()
        .cloned()
        .expect("errors");
    assert_eq!(errors[0]["errorCode"], "MALFORMED_QUERY", "{:?}", errors[0]);
    assert_eq!(errors[1]["errorCode"], "INVALID_FIELD", "{:?}", errors[1]);

    // An error answer (here NOT_FOUND) leaves the connection usable for the next call.
    let kept = step("keep-alive");
    assert_eq!(kept["missing"], "NOT_FOUND", "{kept}");
    assert!(
        kept["totalSize"].as_u64().is_some_and(|n| n >= 2500),
        "{kept}"
    );

    // Upsert by external id: created, then updated, one record.
    let upsert = step("upsert");
    assert_eq!(upsert["first"]["success"], true, "{upsert}");
    assert_eq!(upsert["first"]["created"], true, "{upsert}");
    assert_eq!(upsert["second"]["created"], false, "{upsert}");
    let invoice = upsert["first"]["id"].as_str().expect("upserted id");
    assert_eq!(upsert["second"]["id"], invoice, "{upsert}");
    let record = org.get("Invoice__c", invoice).expect("upserted invoice");
    assert_eq!(record["External_Id__c"], "JS-1");
    assert_eq!(record["Name"], "jsforce upsert again");

    // Relationship fields, subqueries and aggregates, shaped as the REST API documents them.
    let rel = step("soql-relations");
    let parent = rel["parent"].as_str().expect("parent id").to_string();
    let related = rel["related"].as_array().cloned().expect("related records");
    assert_eq!(related.len(), 3, "{rel}");
    assert_eq!(
        related[0]["Account"],
        json!({"attributes": {"type": "Account",
                              "url": format!("/services/data/v{API_VERSION}/sobjects/Account/{parent}")},
               "Name": "jsforce parent", "Industry": "Energy"}),
        "{rel}"
    );
    assert_eq!(related[2]["LastName"], "Rel Orphan");
    assert_eq!(related[2]["Account"], J::Null, "an empty reference is null");
    let nested = &rel["nested"][0]["Contacts"];
    assert_eq!(nested["totalSize"], 2, "{rel}");
    assert_eq!(nested["done"], true);
    assert_eq!(nested["records"][0]["LastName"], "Rel B");
    assert_eq!(nested["records"][0]["attributes"]["type"], "Contact");
    assert_eq!(
        rel["grouped"],
        json!([
            {"attributes": {"type": "AggregateResult"}, "acct": null, "n": 1, "expr0": "Rel Orphan"},
            {"attributes": {"type": "AggregateResult"}, "acct": "jsforce parent", "n": 2,
             "expr0": "Rel B"},
        ]),
        "{rel}"
    );
    let bulk_related = rel["bulkRelated"].as_array().cloned().expect("bulk rows");
    assert_eq!(bulk_related.len(), 3, "{rel}");
    assert_eq!(
        bulk_related
            .iter()
            .filter(|r| r["Account.Name"] == "jsforce parent")
            .count(),
        2,
        "Bulk CSV names relationship columns Account.Name: {rel}"
    );
    let refused = &rel["bulkRefused"];
    assert!(
        refused["errorCode"] == "FUNCTIONALITY_NOT_ENABLED"
            || refused["name"] == "FUNCTIONALITY_NOT_ENABLED",
        "Bulk API 2.0 refuses GROUP BY: {rel}"
    );
    let rollback = rel["rollback"]
        .as_array()
        .cloned()
        .expect("rollback results");
    assert_eq!(
        rollback[0]["errors"][0]["statusCode"], "ALL_OR_NONE_OPERATION_ROLLED_BACK",
        "{rel}"
    );
    assert_eq!(rollback[1]["success"], false, "{rel}");
    let kept = org.get("Account", &parent).expect("parent");
    assert_eq!(
        kept.get("Phone").unwrap_or(&J::Null),
        &J::Null,
        "the first update was rolled back"
    );

    // sObject Collections: created together, all or none refused together, destroyed.
    let coll = step("collections");
    let made: Vec<String> = coll["created"]
        .as_array()
        .expect("created")
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(made.len(), 2, "{coll}");
    assert!(
        coll["rolledBack"]
            .as_array()
            .is_some_and(|r| r.iter().all(|x| x["success"] == false)),
        "{coll}"
    );
    assert!(
        coll["destroyed"]
            .as_array()
            .is_some_and(|r| r.iter().all(|x| x["success"] == true)),
        "{coll}"
    );
    for id in &made {
        assert_eq!(
            org.get("Account", id).map_err(|e| e.code),
            Err("ENTITY_IS_DELETED")
        );
    }

    // getUpdated / getDeleted: the live Accounts changed in the window, the deleted ones.
    let ud = step("updated-deleted");
    let live = org.records("Account").len() as u64;
    assert_eq!(ud["updated"].as_u64(), Some(live), "{ud}");
    assert!(ud["latestDateCovered"].is_string(), "{ud}");
    let mut gone: Vec<J> = org
        .all_records("Account")
        .into_iter()
        .filter(|r| r.get("IsDeleted") == Some(&J::Bool(true)))
        .filter_map(|r| r.get("Id").cloned())
        .collect();
    gone.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    assert_eq!(ud["deleted"], J::Array(gone), "{ud}");

    // SOAP login(): a session that REST accepts, the org and user ids; refusals as faults.
    let soap = step("soap-login");
    assert_eq!(soap["organizationId"], org.org_id.as_str(), "{soap}");
    assert_eq!(soap["userId"], org.user_id.as_str(), "{soap}");
    assert_eq!(soap["instanceUrl"], emulator.rest_url.as_str(), "{soap}");
    assert!(
        soap["totalSize"].as_u64().is_some_and(|n| n >= 2500),
        "{soap}"
    );
    assert!(
        soap["refused"]
            .as_str()
            .is_some_and(|m| m.contains("INVALID_LOGIN")),
        "{soap}"
    );
    assert!(
        soap["retired"]
            .as_str()
            .is_some_and(|m| m.contains("UNSUPPORTED_API_VERSION")),
        "{soap}"
    );

    emulator.stop().await;
    remove_tls_dir(&ca);
}

/// The pinned simple-salesforce version (tests/conformance/requirements.txt).
const SIMPLE_SALESFORCE: &str = "1.12.10";

/// The venv's Python with the pinned simple-salesforce, created when missing; `None` (the
/// test is skipped) only when this machine has no python3 with `venv`.
fn python_venv() -> Option<PathBuf> {
    static ONCE: Mutex<()> = Mutex::new(());
    let _guard = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = conformance_dir();
    let python = dir.join(".venv/bin/python");
    let installed = || {
        std::process::Command::new(&python)
            .args([
                "-c",
                "import simple_salesforce.__version__ as v; print(v.__version__)",
            ])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == SIMPLE_SALESFORCE
            })
    };
    if installed() {
        return Some(python);
    }
    let has_venv = std::process::Command::new("python3")
        .args(["-m", "venv", "--help"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_venv {
        return None;
    }
    let run = |cmd: &mut std::process::Command, what: &str| {
        let out = cmd
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        std::process::Command::new("python3").args(["-m", "venv", ".venv"]),
        "python3 -m venv tests/conformance/.venv",
    );
    run(
        std::process::Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            "requirements.txt",
        ]),
        "pip install -r tests/conformance/requirements.txt",
    );
    assert!(
        installed(),
        "simple-salesforce {SIMPLE_SALESFORCE} is not importable from the venv after pip install"
    );
    Some(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_salesforce_everyday_operations_match_the_org() {
    let Some(python) = python_venv() else {
        eprintln!(
            "SKIPPED simple_salesforce_everyday_operations_match_the_org: no python3 with the \
             venv module on this machine (install python3 and python3-venv to run it)"
        );
        return;
    };
    let (emulator, ca) = tls_emulator("simple-salesforce").await;
    // Three pages of 200 for query_more, and the Bulk query's rows.
    const SEEDED: usize = 450;
    for i in 0..SEEDED {
        let record = json!({"Name": format!("Seed {i:04}")});
        emulator
            .org
            .create("Account", record.as_object().expect("object"), ORIGIN)
            .expect("seed account");
    }
    let mut cmd = Command::new(&python);
    cmd.arg(conformance_dir().join("simple_salesforce_ops.py"));
    let mut script = NodeScript::start(
        cmd,
        "simple_salesforce_ops.py",
        &[
            ("SFM_INSTANCE_URL", emulator.rest_url.clone()),
            ("SFM_CLIENT_ID", emulator.credentials.client_id.clone()),
            (
                "SFM_CLIENT_SECRET",
                emulator.credentials.client_secret.clone(),
            ),
            ("SFM_API_VERSION", API_VERSION.to_string()),
            ("SFM_SEEDED", SEEDED.to_string()),
            ("REQUESTS_CA_BUNDLE", ca.display().to_string()),
        ],
    );
    let mut steps: BTreeMap<String, J> = BTreeMap::new();
    while let Some(line) = script
        .next(Duration::from_secs(180), "simple_salesforce_ops.py steps")
        .await
    {
        let step = line["step"].as_str().unwrap_or("?").to_string();
        assert!(
            step != "failed" && step != "?",
            "simple_salesforce_ops.py failed: {line}"
        );
        steps.insert(step, line);
        if steps.contains_key("done") {
            break;
        }
    }
    script.finish(Duration::from_secs(20)).await;
    let step = |name: &str| {
        steps
            .get(name)
            .unwrap_or_else(|| panic!("simple_salesforce_ops.py never reported step {name}"))
    };
    for name in [
        "login",
        "describe-global",
        "describe",
        "basic-info",
        "limits",
        "get",
        "update",
        "query",
        "query-more",
        "query-all",
        "bulk2",
        "errors",
        "soql-relations",
        "all-or-none",
    ] {
        step(name);
    }
    let org = &emulator.org;
    // What the client wrote is what the org holds.
    let id = step("create")["id"].as_str().expect("id").to_string();
    let account = org.get("Account", &id).expect("created account");
    assert_eq!(account["Name"], "simple-salesforce");
    assert_eq!(account["Phone"], "555-0199", "the update landed");
    let invoice_id = step("upsert")["id"]
        .as_str()
        .expect("invoice id")
        .to_string();
    let invoice = org
        .get("Invoice__c", &invoice_id)
        .expect("upserted invoice");
    assert_eq!(invoice["External_Id__c"], "PY-1");
    assert_eq!(invoice["Name"], "From Python, again");
    assert_eq!(step("upsert")["created"], 201);
    assert_eq!(step("upsert")["updated"], 200);
    let doomed = step("delete")["id"]
        .as_str()
        .expect("deleted id")
        .to_string();
    assert_eq!(
        org.get("Account", &doomed).map_err(|e| e.code),
        Err("ENTITY_IS_DELETED")
    );
    assert_eq!(step("updated-deleted")["deleted"], json!([doomed]));
    assert_eq!(step("query-all")["records"], SEEDED);
    assert_eq!(step("bulk2")["rows"], SEEDED);
    assert_eq!(step("basic-info")["keyPrefix"], "001");
    // What the relationship step created is in the org; what was rolled back is not.
    let parent = step("soql-relations")["parent"]
        .as_str()
        .expect("parent id")
        .to_string();
    assert_eq!(
        org.get("Account", &parent).expect("parent")["Industry"],
        "Energy"
    );
    assert!(
        org.all_records("Account").iter().all(|r| {
            !matches!(
                r["Name"].as_str(),
                Some("Python rolled back" | "Python composite")
            )
        }),
        "rolled-back accounts are not in the org, not even in the recycle bin"
    );
    emulator.stop().await;
    remove_tls_dir(&ca);
}
