//! What `deploy/` ships for operators, checked against the code:
//!
//! - the alert rules (`deploy/prometheus/sfmirror-alerts.yml`) pass `promtool check rules`,
//!   and their unit tests (`sfmirror-alerts.test.yml`) pass `promtool test rules`; every
//!   dashboard query parses as PromQL (promtool checks it as a recording rule);
//! - every metric the rules and the dashboard (`deploy/grafana/sfmirror-dashboard.json`)
//!   query is one sfmirror exports: in [`METRICS`] (a histogram also under its `_bucket`,
//!   `_sum` and `_count` series) or [`PROCESS_METRICS`], so a renamed or misspelled metric
//!   fails here rather than leaving a panel empty and an alert silent;
//! - every alert has a severity and says what it means and what to do; every panel has a
//!   title and a query.
//!
//! - the systemd units (`systemd/*.service`, `*.timer`) pass `systemd-analyze verify` without
//!   a word of warning, run on the built binary; every service's exposure in `systemd-analyze
//!   security --offline=true` is at most [`MAX_EXPOSURE`]; every service loads the same
//!   credentials.
//!
//! promtool comes with Debian's `prometheus` package (`.ci/run` installs it). Without it the
//! promtool tests fail, unless `SFMIRROR_SKIP_PROMTOOL=1` says to skip them. Likewise
//! systemd-analyze (Debian's `systemd` package) and `SFMIRROR_SKIP_SYSTEMD_ANALYZE=1`.

use sfmirror::telemetry::{Kind, METRICS, PROCESS_METRICS};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

fn prometheus_dir() -> PathBuf {
    Path::new(DEPLOY).join("prometheus")
}

fn alerts_path() -> PathBuf {
    prometheus_dir().join("sfmirror-alerts.yml")
}

fn dashboard_path() -> PathBuf {
    Path::new(DEPLOY).join("grafana/sfmirror-dashboard.json")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn dashboard() -> serde_json::Value {
    let path = dashboard_path();
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- promtool ----

/// Runs promtool with `args` in `deploy/prometheus` and fails the test, with promtool's
/// output, unless it succeeds. `None`: promtool is missing and the environment says to skip.
fn promtool(args: &[&str]) -> Option<String> {
    let output = match Command::new("promtool")
        .args(args)
        .current_dir(prometheus_dir())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("SFMIRROR_SKIP_PROMTOOL").is_ok_and(|v| v == "1") {
                eprintln!("promtool not installed; skipped (SFMIRROR_SKIP_PROMTOOL=1)");
                return None;
            }
            panic!(
                "promtool is not installed: install Debian's `prometheus` package \
                 (apt-get install prometheus; .ci/run does this in CI), or set \
                 SFMIRROR_SKIP_PROMTOOL=1 to skip the alert rule checks"
            );
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        output.status
    );
    Some(text)
}

#[test]
fn promtool_checks_the_alert_rules() {
    if let Some(out) = promtool(&["check", "rules", "sfmirror-alerts.yml"]) {
        assert!(out.contains("SUCCESS"), "promtool check rules said:\n{out}");
    }
}

#[test]
fn promtool_unit_tests_of_the_alert_rules_pass() {
    if let Some(out) = promtool(&["test", "rules", "sfmirror-alerts.test.yml"]) {
        assert!(out.contains("SUCCESS"), "promtool test rules said:\n{out}");
    }
}

#[test]
fn dashboard_queries_parse_as_promql() {
    // Grafana's variables become what they stand for, and each query a recording rule.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs(&dashboard()).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
            .replace("$channel", ".*");
        let quoted = serde_json::to_string(&expr).expect("a string serializes");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {quoted}\n"
        ));
    }
    let path = std::env::temp_dir().join(format!(
        "sfmirror-dashboard-queries-{}.yml",
        std::process::id()
    ));
    std::fs::write(&path, &rules).expect("writing the temporary rule file");
    let result = std::panic::catch_unwind(|| {
        promtool(&["check", "rules", path.to_str().expect("a UTF-8 temp path")])
    });
    let _ = std::fs::remove_file(&path);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

// ---- metric names ----

/// Every name that starts `sfmirror_` or `process_` in `text`, as a whole identifier.
fn metric_names(text: &str) -> BTreeSet<String> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut names = BTreeSet::new();
    for prefix in ["sfmirror_", "process_"] {
        for (at, _) in text.match_indices(prefix) {
            if text[..at].chars().next_back().is_some_and(is_ident) {
                continue;
            }
            let name: String = text[at..].chars().take_while(|&c| is_ident(c)).collect();
            names.insert(name);
        }
    }
    names
}

/// Whether sfmirror exports `name`: a metric of [`METRICS`], a histogram's `_bucket`,
/// `_sum` or `_count` series, or a process metric.
fn exported(name: &str) -> bool {
    let known = |n: &str, histogram_only: bool| {
        METRICS
            .iter()
            .any(|(m, kind, _)| *m == n && (!histogram_only || *kind == Kind::Histogram))
    };
    known(name, false)
        || PROCESS_METRICS.contains(&name)
        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| known(base, true))
        })
}

/// The names in `text` sfmirror does not export.
fn unknown_metrics(text: &str) -> Vec<String> {
    metric_names(text)
        .into_iter()
        .filter(|name| !exported(name))
        .collect()
}

/// The rule file without its comments (which may name metrics still to come).
fn alerts_without_comments() -> String {
    read(&alerts_path())
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `expr:` of every rule, inline or as a block scalar (`expr: |` and the lines indented
/// under it).
fn alert_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if !value.starts_with(['|', '>']) {
            exprs.push(value.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .map(|l| l.trim())
            .collect();
        exprs.push(block.join("\n").trim().to_string());
    }
    exprs
}

/// The queries of every panel (rows' panels included) and of the template variables.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in all_panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push(expr.to_string());
            }
        }
    }
    exprs
}

fn variable_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if var["type"] == "query" {
            for q in [&var["definition"], &var["query"], &var["query"]["query"]] {
                if let Some(q) = q.as_str() {
                    queries.push(q.to_string());
                }
            }
        }
    }
    queries
}

/// Every panel, rows' nested panels included.
fn all_panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(panels: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

#[test]
fn a_misspelled_or_invented_metric_is_reported() {
    let expr = "rate(sfmirror_events_total[5m]) + sfmirror_replication_lag_secs \
                + sfmirror_apply_delay_seconds_bucket + sfmirror_events_total_count \
                + process_resident_memory_bytes + process_rss_bytes \
                + foo_sfmirror_not_a_name + sfmirror_event_delivery_usage_percent";
    assert_eq!(
        unknown_metrics(expr),
        [
            "process_rss_bytes",
            "sfmirror_event_delivery_usage_percent",
            "sfmirror_events_total_count",
            "sfmirror_replication_lag_secs",
        ]
    );
}

#[test]
fn alert_rules_query_only_exported_metrics() {
    let rules = alerts_without_comments();
    let exprs = alert_exprs(&rules);
    let alerts = rules
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert!(alerts > 0, "no alert in {}", alerts_path().display());
    assert_eq!(exprs.len(), alerts, "one expr per alert: {exprs:#?}");
    assert!(
        exprs.iter().all(|e| !e.is_empty()),
        "empty expr: {exprs:#?}"
    );
    // The expressions, and the queries annotations run (`query` in a template).
    let used = metric_names(&rules);
    for name in ["sfmirror_replication_lag_seconds", "sfmirror_channel_owned"] {
        assert!(
            used.contains(name),
            "{name} not found in the rules: {used:?}"
        );
    }
    let unknown = unknown_metrics(&rules);
    assert!(
        unknown.is_empty(),
        "{} queries metrics sfmirror does not export (src/telemetry.rs): {unknown:?}",
        alerts_path().display()
    );
}

#[test]
fn dashboard_queries_only_exported_metrics() {
    let dashboard = dashboard();
    let mut queries = dashboard_exprs(&dashboard);
    queries.extend(variable_queries(&dashboard));
    let text = queries.join("\n");
    assert!(
        metric_names(&text).len() >= 10,
        "too few metrics found in the dashboard's queries: {queries:#?}"
    );
    let unknown = unknown_metrics(&text);
    assert!(
        unknown.is_empty(),
        "{} queries metrics sfmirror does not export (src/telemetry.rs): {unknown:?}",
        dashboard_path().display()
    );
}

// ---- shape ----

#[test]
fn every_alert_has_a_severity_a_summary_and_a_description() {
    let rules = alerts_without_comments();
    let mut names = BTreeSet::new();
    let blocks: Vec<&str> = rules.split("- alert:").skip(1).collect();
    assert!(
        !blocks.is_empty(),
        "no alert in {}",
        alerts_path().display()
    );
    for block in blocks {
        // A block runs to the next alert; the last one may carry the next group's header.
        let block = block.split("\n  - name:").next().unwrap_or(block);
        let name = block.lines().next().unwrap_or("").trim().to_string();
        assert!(
            name.starts_with("Sfmirror"),
            "alert {name:?}: names start with Sfmirror"
        );
        assert!(names.insert(name.clone()), "alert {name} defined twice");
        let severity = block
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity:"))
            .map(str::trim);
        assert!(
            matches!(severity, Some("warning" | "critical")),
            "alert {name}: severity {severity:?}, want warning or critical"
        );
        for annotation in ["summary:", "description:"] {
            assert!(
                block.lines().any(|l| l.trim().starts_with(annotation)),
                "alert {name} has no {annotation}"
            );
        }
    }
}

#[test]
fn dashboard_panels_have_titles_and_queries() {
    let dashboard = dashboard();
    let schema = dashboard["schemaVersion"].as_i64().unwrap_or(0);
    assert!(schema >= 36, "schemaVersion {schema}: Grafana 9.x or later");
    let vars: Vec<&serde_json::Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .collect();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["instance", "channel"] {
        let definition = var(name)["definition"].as_str().unwrap_or("");
        assert!(
            definition.starts_with("label_values(") && definition.contains(name),
            "${name} comes from label_values: {definition}"
        );
    }

    let panels = all_panels(&dashboard);
    let mut ids = BTreeSet::new();
    let mut with_queries = 0;
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("");
        assert!(!title.trim().is_empty(), "a panel has no title: {panel}");
        if let Some(id) = panel["id"].as_i64() {
            assert!(ids.insert(id), "panel id {id} used twice");
        }
        if panel["type"] == "row" {
            continue; // a heading: its panels are checked on their own
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or("");
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?}: a target without expr"
            );
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "panel {title:?} queries the $datasource variable"
            );
        }
        with_queries += 1;
    }
    assert!(
        with_queries >= 10,
        "only {with_queries} panels with queries"
    );
}

// ---- systemd units ----

const SYSTEMD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");

/// Where the units expect the binary (the README's install step puts it there).
const INSTALLED_BINARY: &str = "/usr/local/bin/sfmirror";

/// The highest overall exposure `systemd-analyze security` may give a shipped service.
const MAX_EXPOSURE: f64 = 2.0;

/// The credentials every service loads: the names the daemon reads from
/// `$CREDENTIALS_DIRECTORY` ([`sfmirror::config::CREDENTIALS`]).
fn credentials() -> Vec<&'static str> {
    sfmirror::config::CREDENTIALS
        .iter()
        .map(|(name, _)| *name)
        .collect()
}

/// The unit files under `systemd/` (services and timers), by file name.
fn unit_files() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(SYSTEMD)
        .unwrap_or_else(|e| panic!("reading {SYSTEMD}: {e}"))
        .map(|entry| entry.expect("a directory entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".service") || name.ends_with(".timer"))
        .collect();
    names.sort();
    assert!(
        names.iter().any(|n| n == "sfmirror.service"),
        "no sfmirror.service in {SYSTEMD}: {names:?}"
    );
    names
}

/// The name a unit file is checked under: a template (`name@.service`) becomes the instance
/// `name@demo.service`, as `systemctl start` would name it.
fn instance_name(file: &str) -> String {
    file.replacen("@.", "@demo.", 1)
}

/// The units copied into a fresh directory under their instance names, each `ExecStart=`
/// pointing at the binary this build made (verify checks that the command exists and is
/// executable). Returns the directory and the staged files.
fn staged_units(purpose: &str) -> (PathBuf, Vec<PathBuf>) {
    let dir = std::env::temp_dir().join(format!("sfmirror-units-{purpose}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the staging directory");
    let mut staged = Vec::new();
    for file in unit_files() {
        let text = read(&Path::new(SYSTEMD).join(&file));
        if file.ends_with(".service") {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&format!("ExecStart={INSTALLED_BINARY} "))),
                "{file}: ExecStart= runs {INSTALLED_BINARY}"
            );
        }
        let path = dir.join(instance_name(&file));
        std::fs::write(
            &path,
            text.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_sfmirror")),
        )
        .expect("writing a staged unit");
        staged.push(path);
    }
    (dir, staged)
}

/// Runs systemd-analyze with `args` and returns whether it succeeded and what it printed
/// (stdout, then stderr). `None`: it is missing and the environment says to skip.
fn systemd_analyze(args: &[&str]) -> Option<(bool, String)> {
    let output = match Command::new("systemd-analyze")
        .args(args)
        .env("SYSTEMD_COLORS", "0")
        .env_remove("SYSTEMD_LOG_LEVEL")
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if std::env::var("SFMIRROR_SKIP_SYSTEMD_ANALYZE").is_ok_and(|v| v == "1") {
                eprintln!(
                    "systemd-analyze not installed; skipped (SFMIRROR_SKIP_SYSTEMD_ANALYZE=1)"
                );
                return None;
            }
            panic!(
                "systemd-analyze is not installed: install Debian's `systemd` package \
                 (systemd 252 or later), or set SFMIRROR_SKIP_SYSTEMD_ANALYZE=1 to skip the \
                 checks of the units under systemd/"
            );
        }
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Some((output.status.success(), text))
}

/// The overall exposure `systemd-analyze security` reports for one unit
/// (`→ Overall exposure level for x.service: 1.1 OK 🙂`).
fn overall_exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, value) = line.rsplit_once(": ")?;
    value.split_whitespace().next()?.parse().ok()
}

#[test]
fn the_overall_exposure_is_read_from_the_report() {
    let report = "✗ UMask=    Files created by service are world-readable by default    0.1\n\
                  \n\
                  → Overall exposure level for sfmirror@demo.service: 8.5 EXPOSED 🙁\n";
    assert_eq!(overall_exposure(report), Some(8.5));
    assert_eq!(
        overall_exposure("→ Overall exposure level for a.service: 1.1 OK 🙂"),
        Some(1.1)
    );
    assert_eq!(overall_exposure("Failed to load unit"), None);
}

#[test]
fn systemd_units_pass_verify_without_a_warning() {
    let (dir, staged) = staged_units("verify");
    let mut args = vec!["verify"];
    args.extend(
        staged
            .iter()
            .map(|p| p.to_str().expect("a UTF-8 temp path")),
    );
    let result = systemd_analyze(&args);
    let _ = std::fs::remove_dir_all(&dir);
    let Some((ok, text)) = result else { return };
    // verify exits 0 on unknown keys and settings newer than the installed systemd: any
    // output at all is a finding.
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify on {} said:\n{text}",
        staged
            .iter()
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
}

#[test]
fn systemd_services_are_hardened() {
    let (dir, staged) = staged_units("security");
    let mut exposures = Vec::new();
    let mut reports = Vec::new();
    for unit in staged
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
    {
        let path = unit.to_str().expect("a UTF-8 temp path");
        let Some((ok, report)) = systemd_analyze(&["security", "--offline=true", path]) else {
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        let name = unit
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let exposure = overall_exposure(&report);
        if !ok || exposure.is_none_or(|e| e > MAX_EXPOSURE) {
            reports.push(format!("{name}:\n{report}"));
        }
        exposures.push((name, exposure));
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(exposures.len() >= 4, "too few services: {exposures:?}");
    assert!(
        reports.is_empty(),
        "every service under systemd/ must have an overall exposure of at most \
         {MAX_EXPOSURE}: {exposures:?}\n\n{}",
        reports.join("\n")
    );
}

#[test]
fn every_service_loads_the_same_credentials() {
    for file in unit_files().iter().filter(|f| f.ends_with(".service")) {
        let text = read(&Path::new(SYSTEMD).join(file));
        let ids: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("LoadCredential="))
            .map(|v| v.split(':').next().unwrap_or(v))
            .collect();
        assert_eq!(ids, credentials(), "{file}: LoadCredential= ids");
        // A source without a slash is looked up in the credential store and skipped when
        // missing; an absolute path would fail the start without its file.
        for line in text.lines().filter(|l| l.starts_with("LoadCredential=")) {
            let source = line.split_once(':').map(|(_, s)| s).unwrap_or("");
            assert!(
                !source.is_empty() && !source.contains('/'),
                "{file}: {line}: the source must be a credential store name"
            );
        }
    }
}

#[test]
fn daemon_services_are_notify_units_that_stop_on_a_configuration_error() {
    for file in ["sfmirror.service", "sfmirror@.service"] {
        let text = read(&Path::new(SYSTEMD).join(file));
        for line in [
            "Type=notify",
            "WatchdogSec=5min",
            "Restart=on-failure",
            // 78 (EX_CONFIG): what a restart cannot fix.
            "RestartPreventExitStatus=78",
        ] {
            assert!(text.lines().any(|l| l == line), "{file} lacks {line}");
        }
        assert!(
            text.lines()
                .any(|l| l.starts_with("ExecStart=") && l.contains(" run --config ")),
            "{file} runs `sfmirror run`"
        );
    }
}
