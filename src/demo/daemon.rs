//! The daemon as the demo runs it: a child process, this same binary running
//! `sfmirror run --config <file>`, so that it can be killed with SIGKILL like a crashed host
//! and started again; and what its `/metrics` says (lag, apply-delay percentiles, events and
//! repairs), parsed from the Prometheus text any scraper reads.

use anyhow::{Context, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// A running `sfmirror run` child. Dropping it kills the process (the demo never leaves a
/// daemon behind, also on Ctrl-C and on error).
pub struct ChildDaemon {
    child: Child,
    pub pid: u32,
}

impl ChildDaemon {
    /// Starts `<this binary> run --config <config>`, its logs appended to `log` (at warn
    /// unless `verbose`).
    pub fn spawn(config: &Path, log: &Path, verbose: bool) -> anyhow::Result<ChildDaemon> {
        let exe = std::env::current_exe().context("finding this program's path")?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true);
        if !verbose {
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd.spawn().context("starting `sfmirror run`")?;
        let pid = child.id().context("the daemon exited at once")?;
        Ok(ChildDaemon { child, pid })
    }

    /// Kills the process with SIGKILL (no shutdown, no last commit) and reaps it.
    pub async fn kill9(mut self) -> anyhow::Result<()> {
        // tokio's kill sends SIGKILL on Unix.
        self.child.kill().await.context("killing the daemon")?;
        Ok(())
    }

    /// Whether the process has exited, with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the daemon to stop as systemd would (SIGTERM) and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // SIGTERM through kill(1): the crate has no libc binding, and the daemon treats
            // SIGTERM as a clean shutdown.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => {
                status.context("waiting for the daemon")?;
            }
            Err(_) => self.child.kill().await?,
        }
        Ok(())
    }
}

/// Reads `/metrics`, `/readyz` of a daemon's metrics listener.
pub struct Metrics {
    http: reqwest::Client,
    base: String,
}

impl Metrics {
    pub fn new(listen: &str) -> Metrics {
        Metrics {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            base: format!("http://{listen}"),
        }
    }

    /// The current samples, or an error when nothing answers.
    pub async fn scrape(&self) -> anyhow::Result<Samples> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(Samples::parse(&text))
    }

    /// Waits until `/readyz` answers 200 (every channel subscribed and migrated), or fails
    /// after `timeout` or when `alive` says the process has gone.
    pub async fn wait_ready(
        &self,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            let ok = self
                .http
                .get(format!("{}/readyz", self.base))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if !alive() {
                bail!("the daemon exited before it was ready");
            }
            if t0.elapsed() > timeout {
                bail!("the daemon was not ready within {} s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Samples of one scrape: `name{labels}` → value (labels as Prometheus prints them).
#[derive(Debug, Default, Clone)]
pub struct Samples {
    values: HashMap<String, Vec<(String, f64)>>,
}

impl Samples {
    /// Parses the Prometheus text format (comments skipped; a line that does not parse is
    /// ignored rather than fatal: a demo must not stop for a metric it does not show).
    pub fn parse(text: &str) -> Samples {
        let mut values: HashMap<String, Vec<(String, f64)>> = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(s) => s,
                None => continue,
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            values
                .entry(name.to_string())
                .or_default()
                .push((labels.to_string(), value));
        }
        Samples { values }
    }

    /// Every sample of `name` with its labels.
    pub fn series(&self, name: &str) -> &[(String, f64)] {
        self.values.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The sum of every sample of `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.series(name).iter().map(|(_, v)| v).sum()
    }

    /// The largest sample of `name`, 0 when there is none.
    pub fn max(&self, name: &str) -> f64 {
        self.series(name)
            .iter()
            .map(|(_, v)| *v)
            .fold(0.0, f64::max)
    }

    /// The `q` quantile (0-1) of histogram `name`, as the upper bound of the bucket it falls
    /// in (what `histogram_quantile` would interpolate within): `None` without observations.
    pub fn quantile(&self, name: &str, q: f64) -> Option<f64> {
        self.quantile_since(&Samples::default(), name, q)
    }

    /// As [`Samples::quantile`], over the observations made after `before` was scraped.
    pub fn quantile_since(&self, before: &Samples, name: &str, q: f64) -> Option<f64> {
        let earlier = before.buckets(name);
        let mut buckets: Vec<(f64, f64)> = self
            .buckets(name)
            .into_iter()
            .map(|(bound, count)| {
                let old = earlier
                    .iter()
                    .find(|(b, _)| *b == bound)
                    .map_or(0.0, |(_, c)| *c);
                (bound, count - old)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        buckets.iter().find(|(_, c)| *c >= rank).map(|(b, _)| *b)
    }

    /// The cumulative buckets of histogram `name`: (upper bound, count).
    fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        self.series(&format!("{name}_bucket"))
            .iter()
            .filter_map(|(labels, count)| {
                let le = labels
                    .split(',')
                    .find_map(|l| l.trim().strip_prefix("le="))?
                    .trim_matches('"');
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *count))
            })
            .collect()
    }

    /// How many observations histogram `name` holds.
    pub fn count(&self, name: &str) -> f64 {
        self.sum(&format!("{name}_count"))
    }
}

/// Seconds as a short human figure: `3 ms`, `1.2 s`, `> 6 h` for the overflow bucket.
pub fn human_seconds(s: f64) -> String {
    if s.is_infinite() {
        "more than 6 h".to_string()
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.1} s")
    }
}

/// The path of the daemon's log file in the demo's directory.
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("daemon.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = r#"
# HELP sfmirror_apply_delay_seconds Seconds from a change's Salesforce commit to its replica commit.
# TYPE sfmirror_apply_delay_seconds histogram
sfmirror_apply_delay_seconds_bucket{le="0.01"} 10
sfmirror_apply_delay_seconds_bucket{le="0.05"} 80
sfmirror_apply_delay_seconds_bucket{le="0.1"} 99
sfmirror_apply_delay_seconds_bucket{le="+Inf"} 100
sfmirror_apply_delay_seconds_sum 3.5
sfmirror_apply_delay_seconds_count 100
sfmirror_replication_lag_seconds{channel="/data/AccountChangeEvent"} 0
sfmirror_replication_lag_seconds{channel="/data/ContactChangeEvent"} 1.5
sfmirror_events_total{channel="/data/AccountChangeEvent",change_type="CREATE"} 7
sfmirror_events_total{channel="/data/AccountChangeEvent",change_type="UPDATE"} 5
not a sample
"#;

    #[test]
    fn percentiles_are_the_bucket_the_rank_falls_in() {
        let s = Samples::parse(SCRAPE);
        assert_eq!(s.quantile("sfmirror_apply_delay_seconds", 0.5), Some(0.05));
        assert_eq!(s.quantile("sfmirror_apply_delay_seconds", 0.99), Some(0.1));
        assert_eq!(
            s.quantile("sfmirror_apply_delay_seconds", 1.0),
            Some(f64::INFINITY)
        );
        assert_eq!(s.quantile("sfmirror_apply_delay_seconds", 0.05), Some(0.01));
        assert_eq!(s.count("sfmirror_apply_delay_seconds"), 100.0);
        assert_eq!(s.quantile("sfmirror_batch_apply_seconds", 0.5), None);
        // Since an earlier scrape: only the 20 observations made after it count.
        let later = Samples::parse(&SCRAPE.replace("} 100", "} 120").replace("} 99", "} 119"));
        assert_eq!(
            later.quantile_since(&s, "sfmirror_apply_delay_seconds", 0.5),
            Some(0.1)
        );
        assert_eq!(
            s.quantile_since(&s, "sfmirror_apply_delay_seconds", 0.5),
            None
        );
    }

    #[test]
    fn gauges_and_counters_sum_and_max_over_labels() {
        let s = Samples::parse(SCRAPE);
        assert_eq!(s.max("sfmirror_replication_lag_seconds"), 1.5);
        assert_eq!(s.sum("sfmirror_events_total"), 12.0);
        assert_eq!(s.sum("no_such_metric"), 0.0);
    }

    #[test]
    fn seconds_read_as_people_say_them() {
        assert_eq!(human_seconds(0.025), "25 ms");
        assert_eq!(human_seconds(2.5), "2.5 s");
        assert_eq!(human_seconds(f64::INFINITY), "more than 6 h");
    }
}
