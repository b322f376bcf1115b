//! `sfmirror check`: proves, without changing anything, that `run` can do what the
//! configuration asks: the replica reachable and the role allowed to create what migrating
//! would create; the login accepted; every configured object known to the org and mappable to
//! a table; every channel known to Pub/Sub and open to this user.
//!
//! Each finding is one of three kinds, which decide the command's exit code: all well (0);
//! definitely wrong, a restart cannot help until someone changes the configuration, a
//! permission or the org (78); not reachable now, a retry may succeed (1).

use crate::config::Config;
use crate::replica::schema::TableSchema;
use crate::replica::{ReplicaError, error_chain, migrate};
use crate::salesforce::SourceError;
use std::fmt;

/// One thing `check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Ok(String),
    /// Definitely wrong: what, and what to change.
    Wrong(String),
    /// Could not be reached or answered: a retry may succeed.
    Unreachable(String),
}

/// Everything `check` found, in the order it looked.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    fn ok(&mut self, s: impl Into<String>) {
        self.findings.push(Finding::Ok(s.into()));
    }

    fn found_wrong(&mut self, s: impl Into<String>) {
        self.findings.push(Finding::Wrong(s.into()));
    }

    fn found_unreachable(&mut self, s: impl Into<String>) {
        self.findings.push(Finding::Unreachable(s.into()));
    }

    /// Whether something is definitely wrong (the command exits 78).
    pub fn wrong(&self) -> bool {
        self.findings.iter().any(|f| matches!(f, Finding::Wrong(_)))
    }

    /// Whether something could not be reached (the command exits 1 unless something is
    /// also wrong).
    pub fn unreachable(&self) -> bool {
        self.findings
            .iter()
            .any(|f| matches!(f, Finding::Unreachable(_)))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            match finding {
                Finding::Ok(s) => writeln!(f, "  ok: {s}")?,
                Finding::Wrong(s) => writeln!(f, "  WRONG: {s}")?,
                Finding::Unreachable(s) => writeln!(f, "  UNREACHABLE: {s}")?,
            }
        }
        Ok(())
    }
}

/// Files a Salesforce error as wrong or unreachable, with `what` it was doing.
fn source_finding(report: &mut Report, what: &str, e: &SourceError) {
    let text = error_chain(e);
    if text.contains("certificate") || text.contains("UnknownIssuer") {
        report.found_wrong(format!(
            "{what}: the server's TLS certificate cannot be verified ({text}); set \
             salesforce.ca_file to the CA that signed it, or fix the endpoint's name"
        ));
    } else if e.is_transient() && !e.needs_reauth() {
        report.found_unreachable(format!("{what}: {text}"));
    } else {
        report.found_wrong(format!("{what}: {text}"));
    }
}

fn replica_finding(report: &mut Report, what: &str, e: &ReplicaError) {
    if e.is_transient() {
        report.found_unreachable(format!("{what}: {}", error_chain(e)));
    } else {
        report.found_wrong(format!("{what}: {}", error_chain(e)));
    }
}

/// Runs every check; never changes the replica or the org.
pub async fn check(cfg: &Config) -> Report {
    let mut report = Report::default();
    check_replica(cfg, &mut report).await;
    check_salesforce(cfg, &mut report).await;
    report
}

async fn check_replica(cfg: &Config, report: &mut Report) {
    let setup = match super::setup::Setup::connect(cfg).await {
        Ok(s) => s,
        Err(e) => return replica_finding(report, "connecting to the replica", &e),
    };
    let client = match setup.pool.get().await {
        Ok(c) => c,
        Err(e) => {
            return replica_finding(report, "connecting to the replica", &ReplicaError::from(e));
        }
    };
    report.ok("replica database reachable");
    match migrate::plan(&client, &cfg.replica.schema, &cfg.replica.control_schema).await {
        Ok(plan) => {
            if plan.actions.is_empty() && plan.problems.is_empty() {
                report.ok(format!(
                    "control schema {} up to date",
                    cfg.replica.control_schema
                ));
            }
            for action in plan.actions {
                report.ok(format!("`run` {action}"));
            }
            for problem in plan.problems {
                report.found_wrong(problem);
            }
        }
        Err(e) => replica_finding(report, "reading the replica's schemas", &e),
    }
}

async fn check_salesforce(cfg: &Config, report: &mut Report) {
    let salesforce = match crate::salesforce::Salesforce::new(&cfg.salesforce) {
        Ok(s) => s,
        Err(e) => return source_finding(report, "setting up the Salesforce clients", &e),
    };
    let session = match salesforce.login().await {
        Ok(s) => s,
        Err(e) => return source_finding(report, "logging in to Salesforce", &e),
    };
    report.ok(format!(
        "logged in: org {} at {}",
        session.org_id, session.instance_url
    ));
    let mut names: Option<Vec<String>> = None;
    for object in cfg.objects() {
        match salesforce.rest.describe(&object).await {
            Ok(describe) => match TableSchema::from_describe(describe) {
                Ok(table) => report.ok(format!(
                    "object {object}: {} columns{}",
                    table.columns.len(),
                    if table.has_derived() {
                        format!(
                            ", {} derived (re-read after changes)",
                            table.derived_columns().len()
                        )
                    } else {
                        String::new()
                    }
                )),
                Err(e) => report.found_wrong(format!("object {object}: {e}")),
            },
            Err(SourceError::Status { status: 404, .. }) => {
                if names.is_none() {
                    names = salesforce.rest.object_names().await.ok();
                }
                let hint = names
                    .as_deref()
                    .and_then(|n| closest(&object, n))
                    .map(|n| format!("; did you mean {n}?"))
                    .unwrap_or_default();
                report.found_wrong(format!(
                    "{object} is not an object of this org{hint} (fix the name in [[channels]] \
                     objects, or give the integration user access to it)"
                ));
            }
            Err(e) => source_finding(report, &format!("describing {object}"), &e),
        }
    }
    let pubsub = match salesforce.pubsub() {
        Ok(p) => p,
        Err(e) => return source_finding(report, "setting up the Pub/Sub client", &e),
    };
    for ch in &cfg.channels {
        match pubsub.get_topic(&ch.name).await {
            Ok(topic) if topic.can_subscribe => {
                report.ok(format!("channel {}: may be subscribed to", ch.name))
            }
            Ok(_) => report.found_wrong(format!(
                "channel {}: this user may not subscribe to it (Pub/Sub says can_subscribe = \
                 false): give it the permission to read the channel's objects and the \
                 \"Subscribe to Change Data Capture\" access",
                ch.name
            )),
            Err(e) if matches!(&e, SourceError::Grpc { error_code, .. } if error_code.ends_with("topic.not.found")) => {
                report.found_wrong(format!(
                    "channel {}: the org has no such channel (select the objects for Change Data \
                     Capture in Setup, or fix the name)",
                    ch.name
                ))
            }
            Err(e) => source_finding(report, &format!("channel {}", ch.name), &e),
        }
    }
}

/// The name in `names` closest to `wanted` (case-insensitive edit distance), if close enough
/// to be a likely typo.
pub fn closest<'a>(wanted: &str, names: &'a [String]) -> Option<&'a str> {
    let w = wanted.to_ascii_lowercase();
    let (best, distance) = names
        .iter()
        .map(|n| (n.as_str(), edit_distance(&w, &n.to_ascii_lowercase())))
        .min_by_key(|(_, d)| *d)?;
    (distance <= (wanted.len() / 3).max(2)).then_some(best)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_finds_its_object() {
        let names: Vec<String> = ["Account", "Contact", "Contract", "Invoice__c"]
            .map(String::from)
            .to_vec();
        assert_eq!(closest("Contcat", &names), Some("Contact"));
        assert_eq!(closest("invoice__C", &names), Some("Invoice__c"));
        assert_eq!(closest("Opportunity", &names), None);
    }

    #[test]
    fn findings_are_told_apart() {
        let mut r = Report::default();
        r.ok("fine");
        assert!(!r.wrong() && !r.unreachable());
        r.found_unreachable("later");
        assert!(!r.wrong() && r.unreachable());
        r.found_wrong("fix it");
        assert!(r.wrong());
        assert!(r.to_string().contains("WRONG: fix it"));
    }
}
