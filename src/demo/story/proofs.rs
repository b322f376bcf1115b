//! The steps that show a promise kept (a field-level merge, a gap and an overflow repaired,
//! a SIGKILL survived, a new field, verify, the metrics), and the checks that prove each one
//! against the org before its line is printed.

use super::*;

impl Story {
    pub(super) async fn merge(&mut self) -> anyhow::Result<()> {
        self.out
            .step("Merge: an UPDATE of two fields lands in exactly those two columns");
        let id: String = self
            .db
            .query_one(
                &format!("SELECT id FROM {DATA_SCHEMA}.account WHERE NOT _sfm_deleted ORDER BY id LIMIT 1"),
                &[],
            )
            .await?
            .get(0);
        let before = self.row("account", &id).await?;
        let rating = match before.get("rating").and_then(J::as_str) {
            Some("Hot") => "Warm",
            _ => "Hot",
        };
        // One more than before (an integer column: wrap to 1 at its end).
        let employees: i32 = before
            .get("numberofemployees")
            .and_then(J::as_i64)
            .and_then(|n| i32::try_from(n).ok())
            .and_then(|n| n.checked_add(1))
            .unwrap_or(1);
        self.writer
            .update(
                "Account",
                &id,
                json!({"Rating": rating, "NumberOfEmployees": employees}),
            )
            .await?;
        self.out.line(format!(
            "PATCH /services/data/v62.0/sobjects/Account/{id} {{\"Rating\": \"{rating}\", \
             \"NumberOfEmployees\": {employees}}}"
        ));
        let (db, writer_id) = (&self.db, id.clone());
        wait_for("the update to reach the replica", 30, async || {
            let row = db
                .query_opt(
                    &format!(
                        "SELECT 1 FROM {DATA_SCHEMA}.account WHERE id = $1 AND rating = $2 \
                         AND numberofemployees = $3"
                    ),
                    &[&writer_id, &rating, &employees],
                )
                .await?;
            Ok(row.is_some())
        })
        .await?;
        let after = self.row("account", &id).await?;
        let data: Vec<&String> = before.keys().filter(|k| !k.starts_with("_sfm_")).collect();
        let changed: Vec<&String> = data
            .iter()
            .copied()
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        // What Salesforce itself sets on every update, and sends in changedFields.
        const AUDIT: &[&str] = &["lastmodifieddate", "systemmodstamp", "lastmodifiedbyid"];
        let ours = ["rating", "numberofemployees"];
        let unexpected: Vec<&&String> = changed
            .iter()
            .filter(|k| !ours.contains(&k.as_str()) && !AUDIT.contains(&k.as_str()))
            .collect();
        if !unexpected.is_empty() || !ours.iter().all(|o| changed.iter().any(|c| c == o)) {
            bail!("the merge changed {changed:?}, expected rating and numberofemployees");
        }
        self.out
            .line(format!("row {id}: {} data columns", data.len()));
        for k in ours {
            self.out.line(format!(
                "  {k:<18} {} -> {}",
                show(before.get(k)),
                show(after.get(k))
            ));
        }
        let audit: Vec<&str> = changed
            .iter()
            .map(|c| c.as_str())
            .filter(|c| AUDIT.contains(c))
            .collect();
        self.out.line(format!(
            "  {:<18} set by Salesforce on every update (in the event's changedFields)",
            audit.join(", ")
        ));
        self.out.line(format!(
            "the other {} columns are exactly as before; _sfm_version {} -> {}",
            data.len() - changed.len(),
            show(before.get("_sfm_version")),
            show(after.get("_sfm_version"))
        ));
        Ok(())
    }

    pub(super) async fn gap(&mut self) -> anyhow::Result<()> {
        self.out
            .step("Gap: a change Salesforce could not send is re-read from the org");
        let ids: Vec<String> = self
            .db
            .query(
                &format!(
                    "SELECT id FROM {DATA_SCHEMA}.account WHERE NOT _sfm_deleted ORDER BY id \
                     OFFSET 1 LIMIT 5"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let text = "changed while no event could be sent";
        self.control
            .post(
                "gap",
                json!({"object": "Account", "change_type": "GAP_UPDATE", "ids": ids,
                       "fields": {"Description": text}}),
            )
            .await?;
        self.out.line(format!(
            "the org changed {} Accounts' Description and sent a GAP_UPDATE event (ids only, \
             no values)",
            ids.len()
        ));
        let (db, n) = (&self.db, ids.len() as i64);
        let mut queued = 0i64;
        let took = wait_for("the gap to be repaired", 60, async || {
            queued = queued.max(pending(db, "Account").await?);
            let fixed: i64 = db
                .query_one(
                    &format!(
                        "SELECT count(*) FROM {DATA_SCHEMA}.account WHERE id = ANY($1) \
                         AND description = $2"
                    ),
                    &[&ids, &text],
                )
                .await?
                .get(0);
            Ok(fixed == n)
        })
        .await?;
        self.out.line(format!(
            "record repairs queued with the checkpoint{}; the repair worker fetched the records \
             and the replica has the new values, {:.1} s after the event",
            if queued > 0 {
                format!(" ({queued} seen in {CONTROL_SCHEMA}.repair_queue)")
            } else {
                String::new()
            },
            took.as_secs_f64()
        ));
        Ok(())
    }

    pub(super) async fn overflow(&mut self) -> anyhow::Result<()> {
        self.out
            .step("Overflow: a transaction too large for change events is resynced from the org");
        let threshold = self.sizes.overflow_threshold;
        self.control
            .post("settings", json!({"overflow_threshold": threshold}))
            .await?;
        let report = self
            .control
            .post(
                "transaction",
                json!({"steps": [{"update_all": {"object": "Account", "fields": {"Rating": "Warm"}}}]}),
            )
            .await?;
        self.out.line(format!(
            "one transaction set Rating = Warm on {} Accounts; the emulator's threshold is \
             lowered to {threshold} changes (Salesforce: 100,000)",
            report["changes"]
        ));
        self.out.line(format!(
            "{} changes got events, {} did not: one GAP_OVERFLOW event for Account instead",
            report["events"], report["silent"]
        ));
        let org_accounts = self.emulator.org.records("Account").len() as i64;
        let (db, out) = (&self.db, &self.out);
        let mut last = -1i64;
        let mut lines = 0;
        let took = wait_for("the overflow to be resynced", 90, async || {
            let queued = pending(db, "Account").await?;
            if queued != last && lines < 8 {
                out.line(format!(
                    "  repair queue: {queued} Account repair(s) pending"
                ));
                last = queued;
                lines += 1;
            }
            let row = db
                .query_one(
                    &format!(
                        "SELECT count(*), count(*) FILTER (WHERE rating = 'Warm') \
                         FROM {DATA_SCHEMA}.account WHERE NOT _sfm_deleted"
                    ),
                    &[],
                )
                .await?;
            let (n, warm): (i64, i64) = (row.get(0), row.get(1));
            Ok(queued == 0 && n == org_accounts && warm == n)
        })
        .await?;
        if last != 0 {
            self.out.line("  repair queue: 0 Account repair(s) pending");
        }
        self.out.line(format!(
            "the entity repair re-read the window's Accounts: all {org_accounts} are Warm in the \
             replica, {:.1} s after the transaction",
            took.as_secs_f64()
        ));
        self.control
            .post(
                "settings",
                json!({"overflow_threshold": crate::emulator::store::DEFAULT_OVERFLOW_THRESHOLD}),
            )
            .await?;
        Ok(())
    }

    pub(super) async fn crash(&mut self) -> anyhow::Result<()> {
        self.out
            .step("Crash: the daemon is killed with SIGKILL in the middle of the stream");
        let before = self.metrics.scrape().await?.sum(t::EVENTS_TOTAL);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let applied = self.metrics.scrape().await?.sum(t::EVENTS_TOTAL);
        if applied <= before {
            bail!("no events were being applied before the kill ({before} then {applied})");
        }
        let changes_before = self.workload_changes().await?;
        let daemon = self.daemon.take().context("the daemon is not running")?;
        let pid = daemon.pid;
        daemon.kill9().await?;
        self.out.line(format!(
            "kill -9 {pid} while events were streaming in ({:.0} applied in the last second, \
             {applied:.0} in all)",
            applied - before
        ));
        tokio::time::sleep(self.sizes.down).await;
        let while_down = self.workload_changes().await? - changes_before;
        self.out.line(format!(
            "the org went on: {while_down} changes while no daemon ran"
        ));
        self.start_daemon("Restart: the same command again").await?;
        self.out
            .line("it resumed each channel from the replay id committed with its last batch");
        let answer = self.control.post("workload/stop", json!({})).await?;
        self.out.line(format!(
            "workload stopped after {} changes; comparing every record with the org",
            answer["changes"]
        ));
        let (db, emulator) = (&self.db, &self.emulator);
        let mut last = Vec::new();
        let waited = wait_for(
            "the replica to match the org after the restart",
            90,
            async || {
                last = compare(db, emulator).await?;
                Ok(last.iter().all(|c| c.differing == 0))
            },
        )
        .await;
        if let Err(e) = waited {
            let report: Vec<String> = last.iter().map(Comparison::to_string).collect();
            bail!("{e}:\n  {}", report.join("\n  "));
        }
        self.out.line(format!(
            "{:<12} {:>6} {:>8}  {}",
            "object", "org", "replica", "records differing (id or LastModifiedDate)"
        ));
        for c in &last {
            self.out.line(format!(
                "{:<12} {:>6} {:>8}  {}",
                c.object, c.org, c.replica, c.differing
            ));
        }
        self.out.line(
            "every live record is there at the org's latest LastModifiedDate, every deleted one \
             is marked deleted: nothing was lost",
        );
        Ok(())
    }

    pub(super) async fn new_field(&mut self) -> anyhow::Result<()> {
        self.out
            .step("Schema change: a field added in the org appears as a column");
        self.control
            .post(
                "add-field",
                json!({"object": "Account", "field": {
                    "name": "Loyalty_Tier__c", "type": "string", "length": 40,
                    "label": "Loyalty Tier", "nillable": true, "createable": true,
                    "updateable": true, "custom": true}}),
            )
            .await?;
        let id: String = self
            .db
            .query_one(
                &format!("SELECT id FROM {DATA_SCHEMA}.account WHERE NOT _sfm_deleted ORDER BY id LIMIT 1"),
                &[],
            )
            .await?
            .get(0);
        self.writer
            .update("Account", &id, json!({"Loyalty_Tier__c": "Gold"}))
            .await?;
        self.out.line(format!(
            "Loyalty_Tier__c (Text 40) added to Account; Account {id} set to Gold"
        ));
        let db = &self.db;
        let took = wait_for("the new column", 60, async || {
            let exists = db
                .query_opt(
                    "SELECT 1 FROM information_schema.columns WHERE table_schema = $1 \
                     AND table_name = 'account' AND column_name = 'loyalty_tier__c'",
                    &[&DATA_SCHEMA],
                )
                .await?
                .is_some();
            if !exists {
                return Ok(false);
            }
            let row = db
                .query_opt(
                    &format!(
                        "SELECT 1 FROM {DATA_SCHEMA}.account WHERE id = $1 \
                         AND loyalty_tier__c = 'Gold'"
                    ),
                    &[&id],
                )
                .await?;
            Ok(row.is_some())
        })
        .await?;
        let ty: String = self
            .db
            .query_one(
                "SELECT data_type FROM information_schema.columns WHERE table_schema = $1 \
                 AND table_name = 'account' AND column_name = 'loyalty_tier__c'",
                &[&DATA_SCHEMA],
            )
            .await?
            .get(0);
        self.out.line(format!(
            "the event's new schema id made the daemon describe Account again: column \
             {DATA_SCHEMA}.account.loyalty_tier__c ({ty}) holds Gold, {:.1} s later",
            took.as_secs_f64()
        ));
        Ok(())
    }

    pub(super) async fn verify(&mut self) -> anyhow::Result<()> {
        self.out
            .step("Verify: `sfmirror verify` compares the replica with the org");
        let mut opts = VerifyOptions::new(Vec::new(), false);
        opts.recheck_delay = Duration::from_millis(500);
        let report = verify::verify_with(&self.cfg, &opts).await?;
        for o in &report.objects {
            self.out.line(o.to_string());
        }
        if !report.is_clean() {
            bail!("verify found drift");
        }
        self.out.line("no drift");
        Ok(())
    }

    pub(super) async fn metrics_report(&mut self) -> anyhow::Result<()> {
        self.out
            .step("Metrics: what the daemon's own /metrics says");
        // Steady state: a few seconds of live workload, measured apart from the catch-up
        // after the restart.
        let before = self.metrics.scrape().await?;
        self.control
            .post(
                "workload",
                json!({"rate": self.sizes.rate, "objects": WORKLOAD_OBJECTS}),
            )
            .await?;
        tokio::time::sleep(self.sizes.down * 2).await;
        self.control.post("workload/stop", json!({})).await?;
        let s = self.metrics.scrape().await?;
        let mut lags: Vec<(String, f64)> = s
            .series(t::REPLICATION_LAG_SECONDS)
            .iter()
            .map(|(labels, lag)| (labels_short(labels), *lag))
            .collect();
        lags.sort_by(|a, b| a.0.cmp(&b.0));
        for (channel, lag) in lags {
            self.out.line(format!(
                "{} {channel} = {lag} s",
                t::REPLICATION_LAG_SECONDS
            ));
        }
        let name = t::APPLY_DELAY_SECONDS;
        let show_q = |q: Option<f64>| {
            q.map(|v| format!("<= {}", human_seconds(v)))
                .unwrap_or_else(|| "-".into())
        };
        self.out.line(format!(
            "{name} (Salesforce commit -> replica commit), p50 / p90 / p99:"
        ));
        self.out.line(format!(
            "  live workload, last {} s ({:.0} events):  {} / {} / {}",
            (self.sizes.down * 2).as_secs(),
            s.count(name) - before.count(name),
            show_q(s.quantile_since(&before, name, 0.5)),
            show_q(s.quantile_since(&before, name, 0.9)),
            show_q(s.quantile_since(&before, name, 0.99)),
        ));
        self.out.line(format!(
            "  since the restart, catch-up included ({:.0} events):  {} / {} / {}",
            s.count(name),
            show_q(s.quantile(name, 0.5)),
            show_q(s.quantile(name, 0.9)),
            show_q(s.quantile(name, 0.99)),
        ));
        self.out.line(format!(
            "{} = {:.0}, {} = {:.0}",
            t::EVENTS_TOTAL,
            s.sum(t::EVENTS_TOTAL),
            t::REPAIRS_PENDING,
            s.sum(t::REPAIRS_PENDING)
        ));
        Ok(())
    }
}

/// Repairs queued for `object` (parked ones included).
pub(super) async fn pending(db: &tokio_postgres::Client, object: &str) -> anyhow::Result<i64> {
    Ok(db
        .query_one(
            &format!("SELECT count(*) FROM {CONTROL_SCHEMA}.repair_queue WHERE object = $1"),
            &[&object],
        )
        .await?
        .get(0))
}

/// Polls `check` every 100 ms until it holds; fails after `secs` seconds.
pub(super) async fn wait_for(
    what: &str,
    secs: u64,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        if check().await? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(secs) {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One object's org and replica, side by side.
struct Comparison {
    object: &'static str,
    org: usize,
    replica: usize,
    /// Ids live on one side only, or live on both with a different LastModifiedDate.
    differing: usize,
    /// A few of them, with both sides' LastModifiedDate (ms).
    examples: Vec<String>,
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: org {} live, replica {} live, {} differing{}",
            self.object,
            self.org,
            self.replica,
            self.differing,
            if self.examples.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {})", self.examples.join(", "))
            }
        )
    }
}

/// Compares every object's live records (id and LastModifiedDate) in the org and the replica.
/// LastModifiedDate, not SystemModstamp: change events do not carry SystemModstamp, so rows
/// the stream wrote have none.
async fn compare(
    db: &tokio_postgres::Client,
    emulator: &Emulator,
) -> anyhow::Result<Vec<Comparison>> {
    let mut out = Vec::new();
    for (object, _) in OBJECTS {
        let org: HashMap<String, Option<i64>> = emulator
            .org
            .scan(object, false, |r| {
                let id = r.get("Id")?.as_str()?.to_string();
                let stamp = r
                    .get("LastModifiedDate")
                    .and_then(J::as_str)
                    .and_then(crate::model::time::datetime_ms);
                Some((id, stamp))
            })
            .into_iter()
            .collect();
        let table = object.to_ascii_lowercase();
        let replica: HashMap<String, Option<i64>> = db
            .query(
                &format!(
                    "SELECT id, (extract(epoch FROM lastmodifieddate) * 1000)::bigint \
                     FROM {DATA_SCHEMA}.{table} WHERE NOT _sfm_deleted"
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let mut differing: Vec<String> = org
            .iter()
            .filter(|(id, stamp)| replica.get(*id) != Some(stamp))
            .map(|(id, stamp)| format!("{id} org {stamp:?} replica {:?}", replica.get(id)))
            .chain(
                replica
                    .keys()
                    .filter(|id| !org.contains_key(*id))
                    .map(|id| format!("{id} live only in the replica")),
            )
            .collect();
        let n = differing.len();
        differing.truncate(3);
        out.push(Comparison {
            object,
            org: org.len(),
            replica: replica.len(),
            differing: n,
            examples: differing,
        });
    }
    Ok(out)
}
