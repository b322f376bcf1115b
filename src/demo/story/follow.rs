//! The end of the story: where to look at the replica, and `--follow`, which keeps the
//! workload and the daemon running with a one-line status until Ctrl-C.

use super::*;

impl Story {
    pub(super) fn psql(&self) {
        self.out.step("Look at the replica yourself");
        // A password in DATABASE_URL is not echoed: the user has it, a terminal log keeps it.
        let url = super::postgres::redact(self.replica.url());
        self.out.line(format!(
            "psql '{url}' -c 'SELECT id, name, rating, loyalty_tier__c FROM {DATA_SCHEMA}.account LIMIT 5'"
        ));
        if url != self.replica.url() {
            self.out
                .line("(*** stands for the password of your DATABASE_URL)");
        }
        self.out.line(format!(
            "(tables: \\dt {DATA_SCHEMA}.*   control tables: \\dt {CONTROL_SCHEMA}.*)"
        ));
        if matches!(self.replica, Replica::Embedded(_)) && !self.opts.follow {
            self.out.line(
                "this private cluster is removed when the demo ends: run `sfmirror demo \
                 --follow` to keep it (and the daemon) while you look",
            );
        }
    }

    /// Keeps the workload and the daemon running with a one-line status until Ctrl-C.
    pub(super) async fn follow(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        self.out
            .step("Following: workload and daemon keep running until Ctrl-C");
        self.control
            .post(
                "workload",
                json!({"rate": self.sizes.rate, "objects": WORKLOAD_OBJECTS}),
            )
            .await?;
        let cfg = self.config_path.display();
        let exe = exe_name();
        self.out.line(format!("config: {cfg}"));
        self.out.line(format!("  {exe} status --config {cfg}"));
        self.out.line(format!("  {exe} verify --config {cfg}"));
        if let Some(d) = &self.daemon {
            self.out.line(format!(
                "to run the daemon yourself: kill {} then `{exe} run --config {cfg}`",
                d.pid
            ));
        }
        let mut previous: Option<(Instant, f64)> = None;
        let mut last_print = Instant::now() - Duration::from_secs(60);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let line = match self.metrics.scrape().await {
                Ok(s) => {
                    let events = s.sum(t::EVENTS_TOTAL);
                    let rate = match previous {
                        Some((at, before)) if events >= before => {
                            (events - before) / at.elapsed().as_secs_f64().max(0.001)
                        }
                        _ => 0.0,
                    };
                    previous = Some((Instant::now(), events));
                    status_line(&s, rate)
                }
                Err(_) => {
                    previous = None;
                    let ours = match self.daemon.as_mut().map(|d| d.exited()) {
                        Some(Some(status)) => format!("daemon exited ({status})"),
                        _ => "daemon not answering".to_string(),
                    };
                    format!("{ours}; metrics at http://{}", self.metrics_listen)
                }
            };
            if self.out.tty {
                print!("\r\x1b[2K{line}");
                let _ = std::io::stdout().flush();
            } else if last_print.elapsed() >= Duration::from_secs(5) {
                // A log, not a terminal: a line every few seconds rather than a redraw.
                println!("{line}");
                last_print = Instant::now();
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        if self.out.tty {
            println!();
        }
        Ok(())
    }
}

/// The one-line status of `--follow`.
fn status_line(s: &Samples, rate: f64) -> String {
    format!(
        "{rate:>7.1} events/s | lag {:.1} s | repairs pending {:.0} | applied {:.0} | \
         apply delay p99 {}",
        s.max(t::REPLICATION_LAG_SECONDS),
        s.sum(t::REPAIRS_PENDING),
        s.sum(t::EVENTS_TOTAL),
        s.quantile(t::APPLY_DELAY_SECONDS, 0.99)
            .map(human_seconds)
            .unwrap_or_else(|| "-".into())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_shows_rate_lag_and_repairs() {
        let s = Samples::parse(
            "sfmirror_replication_lag_seconds{channel=\"a\"} 2.5\n\
             sfmirror_repairs_pending{object=\"Account\"} 3\n\
             sfmirror_events_total{channel=\"a\",change_type=\"CREATE\"} 10\n",
        );
        let line = status_line(&s, 12.0);
        assert!(line.contains("12.0 events/s"), "{line}");
        assert!(line.contains("lag 2.5 s"), "{line}");
        assert!(line.contains("repairs pending 3"), "{line}");
    }
}
