//! `sfmirror status`: where replication stands, read from the replica's control schema alone
//! (checkpoints, the repair queue, dead letters, snapshot state). It makes no Salesforce call,
//! so it answers while the daemon runs, while Salesforce is unreachable, and without
//! credentials; it only reads, so it can never move a checkpoint.

use super::setup::Setup;
use crate::config::Config;
use crate::model::EVENT_RETENTION_SECS;
use crate::replica::{
    ReplicaError, checkpoint, dead_letters, migrate, ownership, repair_queue, sync_state,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::fmt;

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub checked_at: DateTime<Utc>,
    pub channels: Vec<ChannelStatus>,
    pub repairs: Vec<RepairStatus>,
    pub dead_letters: i64,
    pub objects: Vec<ObjectStatus>,
    /// Derived columns (formulas, person names): re-reads waiting, last sweep.
    pub derived: Vec<DerivedStatus>,
}

#[derive(Debug, Serialize)]
pub struct ChannelStatus {
    pub channel: String,
    /// Whether the config still names this channel.
    pub configured: bool,
    /// The committed replay id (hex); `None` before the first commit.
    pub replay_id: Option<String>,
    /// Salesforce commit time of the newest applied event.
    pub last_event_committed_at: Option<DateTime<Utc>>,
    /// When the checkpoint last moved (events or keepalives).
    pub checkpoint_updated_at: Option<DateTime<Utc>>,
    /// Seconds left before the checkpoint falls out of the 72-hour retention; when it does,
    /// the next start resubscribes at LATEST and repairs the objects since then.
    pub retention_headroom_seconds: Option<i64>,
    /// The instance that owns the channel, while its lease runs (`None`: no live owner).
    pub owner: Option<Owner>,
}

/// Which instance replicates a channel.
#[derive(Debug, Clone, Serialize)]
pub struct Owner {
    pub host: String,
    pub pid: i32,
    pub instance: String,
    /// The fencing epoch: how many times the channel changed hands.
    pub epoch: i64,
}

impl ChannelStatus {
    /// A configured channel that has no checkpoint yet.
    fn not_started(channel: &str) -> ChannelStatus {
        ChannelStatus {
            channel: channel.to_string(),
            configured: true,
            replay_id: None,
            last_event_committed_at: None,
            checkpoint_updated_at: None,
            retention_headroom_seconds: None,
            owner: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RepairStatus {
    pub object: String,
    pub kind: String,
    pub pending: i64,
    /// Of those, how many failed at least once (they retry with backoff).
    pub retrying: i64,
    /// Of those, how many failed in a way retrying cannot fix and wait for `sfmirror
    /// requeue` (or a restart under a changed configuration).
    pub parked: i64,
    pub oldest_requested_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ObjectStatus {
    pub object: String,
    pub snapshot_started_at: Option<DateTime<Utc>>,
    pub snapshot_completed_at: Option<DateTime<Utc>>,
    pub snapshot_rows: Option<i64>,
    /// A backfill that has not finished (it resumes from its Bulk job).
    pub snapshot_running_since: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
pub struct DerivedStatus {
    pub object: String,
    pub queued: i64,
    pub last_sweep_completed_at: Option<DateTime<Utc>>,
    pub last_sweep_error: Option<String>,
}

/// Reads the status from the replica named in `cfg`.
pub async fn status(cfg: &Config) -> Result<StatusReport, ReplicaError> {
    let replica = Setup::connect(cfg).await?;
    let client = replica.pool.get().await?;
    let control = &cfg.replica.control_schema;
    let now = Utc::now();
    let configured: Vec<&str> = cfg.channels.iter().map(|c| c.name.as_str()).collect();
    let mut report = StatusReport {
        checked_at: now,
        channels: Vec::new(),
        repairs: Vec::new(),
        derived: Vec::new(),
        dead_letters: 0,
        objects: Vec::new(),
    };
    let state = migrate::state(&client, control).await?;
    if !state.has(1) {
        // Never started against this replica: every configured channel is still to come.
        report.channels = configured
            .iter()
            .map(|c| ChannelStatus::not_started(c))
            .collect();
        return Ok(report);
    }
    // The caught-up moment is kept from migration 6 on, repairs are parked from 5 on: an older
    // schema (this binary installed, the daemon not yet restarted) has neither.
    for stored in checkpoint::list(&client, control, state.has(6)).await? {
        let replay = stored.replay_id.0;
        let committed = at(stored.commit_timestamp_ms);
        let updated = at(stored.updated_ms).unwrap_or(now);
        // Changes not yet applied are those after the later of the newest applied commit and
        // the last moment the channel was caught up (a keepalive found nothing pending); a
        // position without either is the tip when it was received: it ages from then.
        let basis = committed
            .into_iter()
            .chain(at(stored.caught_up_ms))
            .max()
            .unwrap_or(updated);
        report.channels.push(ChannelStatus {
            configured: configured.contains(&stored.channel.as_str()),
            channel: stored.channel,
            replay_id: (!replay.is_empty())
                .then(|| replay.iter().map(|b| format!("{b:02x}")).collect()),
            last_event_committed_at: committed,
            checkpoint_updated_at: Some(updated),
            retention_headroom_seconds: (!replay.is_empty())
                .then(|| EVENT_RETENTION_SECS - (now - basis).num_seconds()),
            owner: None,
        });
    }
    for c in configured {
        if !report.channels.iter().any(|s| s.channel == c) {
            report.channels.push(ChannelStatus::not_started(c));
        }
    }
    if state.has(7) {
        for lease in ownership::leases(&client, control).await? {
            let (false, Some(instance), Some(host), Some(pid)) =
                (lease.expired, lease.instance, lease.host, lease.pid)
            else {
                continue;
            };
            if let Some(c) = report
                .channels
                .iter_mut()
                .find(|c| c.channel == lease.channel)
            {
                c.owner = Some(Owner {
                    host,
                    pid,
                    instance,
                    epoch: lease.epoch,
                });
            }
        }
    }
    report.repairs = repair_queue::summary(&client, control, state.has(5))
        .await?
        .into_iter()
        .map(|r| RepairStatus {
            object: r.object,
            kind: r.kind,
            pending: r.pending,
            retrying: r.retrying,
            parked: r.parked,
            oldest_requested_at: at(r.oldest_requested_ms),
            last_error: r.last_error,
        })
        .collect();
    report.dead_letters = dead_letters::count(&client, control).await?;
    if state.has(8) {
        let settings = crate::replica::ApplySettings::from_config(cfg);
        report.derived = crate::replica::derived::summary(&client, &settings, &cfg.objects())
            .await?
            .into_iter()
            .map(|d| DerivedStatus {
                object: d.object,
                queued: d.queued,
                last_sweep_completed_at: at(d.swept_ms),
                last_sweep_error: d.sweep_error,
            })
            .collect();
    }
    report.objects = sync_state::list(&client, control)
        .await?
        .into_iter()
        .map(|o| ObjectStatus {
            object: o.object,
            snapshot_started_at: at(o.snapshot_started_ms),
            snapshot_completed_at: at(o.snapshot_completed_ms),
            snapshot_rows: o.snapshot_rows,
            snapshot_running_since: at(o.running_started_ms),
        })
        .collect();
    Ok(report)
}

fn at(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::from_timestamp_millis)
}

fn ago(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        Some(t) => format!(
            "{} ({}s ago)",
            t.format("%Y-%m-%dT%H:%M:%SZ"),
            (now - t).num_seconds()
        ),
        None => "-".to_string(),
    }
}

impl fmt::Display for StatusReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = self.checked_at;
        writeln!(f, "channels:")?;
        for c in &self.channels {
            let configured = if c.configured {
                ""
            } else {
                " (no longer configured)"
            };
            let note = configured;
            let owner = match &c.owner {
                Some(o) => format!("; owned by {} pid {} (epoch {})", o.host, o.pid, o.epoch),
                None => "; no live owner".to_string(),
            };
            match &c.replay_id {
                None => writeln!(f, "  {}{note}: no checkpoint yet{owner}", c.channel)?,
                Some(replay) => writeln!(
                    f,
                    "  {}{note}: replay {replay}; last event {}; checkpoint moved {}; \
                     retention headroom {}{owner}",
                    c.channel,
                    ago(c.last_event_committed_at, now),
                    ago(c.checkpoint_updated_at, now),
                    c.retention_headroom_seconds
                        .map(|s| format!("{:.1} h", s as f64 / 3600.0))
                        .unwrap_or_else(|| "-".into())
                )?,
            }
        }
        writeln!(f, "repairs pending:")?;
        if self.repairs.is_empty() {
            writeln!(f, "  none")?;
        }
        for r in &self.repairs {
            write!(
                f,
                "  {} {}: {} ({} retrying",
                r.object, r.kind, r.pending, r.retrying
            )?;
            if r.parked > 0 {
                write!(
                    f,
                    ", {} parked: fix the cause, then `sfmirror requeue`",
                    r.parked
                )?;
            }
            write!(f, "), oldest {}", ago(r.oldest_requested_at, now))?;
            match &r.last_error {
                Some(e) => writeln!(f, "; last error: {e}")?,
                None => writeln!(f)?,
            }
        }
        writeln!(f, "dead letters: {}", self.dead_letters)?;
        if !self.derived.is_empty() {
            writeln!(f, "derived columns:")?;
        }
        for d in &self.derived {
            write!(
                f,
                "  {}: {} record(s) waiting for a re-read; last sweep {}",
                d.object,
                d.queued,
                ago(d.last_sweep_completed_at, now)
            )?;
            match &d.last_sweep_error {
                Some(e) => writeln!(f, "; last sweep failed: {e}")?,
                None => writeln!(f)?,
            }
        }
        if !self.objects.is_empty() {
            writeln!(f, "snapshots:")?;
        }
        for o in &self.objects {
            write!(
                f,
                "  {}: last completed {}",
                o.object,
                ago(o.snapshot_completed_at, now)
            )?;
            if let Some(rows) = o.snapshot_rows {
                write!(f, ", {rows} rows")?;
            }
            match o.snapshot_running_since {
                Some(t) => writeln!(f, "; one running since {}", ago(Some(t), now))?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}
