//! Which channels this instance replicates: it takes channels whose lease has run out,
//! renews the leases it holds, runs one [`ChannelTask`] per channel it owns, and stops a task
//! the moment its channel is taken over.
//!
//! Several instances may run with one configuration, on one host or several. Each tick (a
//! fifth of `ha.takeover_secs`) an instance records its heartbeat, renews its leases, and
//! counts the live instances (heartbeat younger than a lease). It then takes channels without
//! a live owner until it owns `ceil(channels / live instances)`. Channels move only when their
//! owner goes (dies, freezes, loses the database, or stops), never because an instance joined.
//! A lease lasts three fifths of `ha.takeover_secs`, so a channel whose owner went is taken
//! within `ha.takeover_secs`. A lease held by a process of this host that no longer runs (a
//! daemon killed and restarted by systemd) is taken at once.
//!
//! Safety does not rest on the timing: the fencing epoch ([`crate::replica::ownership`]) keeps
//! a former owner from committing after a takeover, whatever its clock or scheduling did. The
//! timing only decides how soon the channel is replicated again, and that an instance that lost
//! a channel also stops subscribing to it (Salesforce counts deliveries per subscriber).
//!
//! The repair worker runs on every instance: repairs are claimed with `FOR UPDATE SKIP
//! LOCKED` and a lease ([`crate::replica::repair_queue`]), so instances share them safely.

use super::channel::{ChannelDeps, ChannelTask};
use super::{AbortOnDrop, SyncError};
use crate::config::{ChannelConfig, HaConfig};
use crate::replica::ReplicaError;
use crate::replica::ownership::{self, Fence, Instance, Take};
use crate::telemetry::health::Health;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Longest wait for a former owner's transaction to end when taking its channel.
const TAKEOVER_LOCK_WAIT: Duration = Duration::from_secs(2);

/// A channel this instance owns.
struct Owned {
    epoch: i64,
    stop: CancellationToken,
    /// `None` once the task ended with an error needing operator action (the lease is kept,
    /// so no other instance subscribes in vain). Aborted when dropped: no channel task
    /// outlives the daemon's future (an embedding application or a test that drops it).
    task: Option<AbortOnDrop<Result<(), SyncError>>>,
}

impl Owned {
    /// Stops the channel's task and waits for it to end.
    async fn end(self) {
        self.stop.cancel();
        if let Some(mut task) = self.task {
            let _ = (&mut task.0).await;
        }
    }
}

/// Runs the channels this instance owns until `shutdown`.
pub struct Coordinator {
    pub me: Instance,
    pub channels: Vec<ChannelConfig>,
    pub deps: ChannelDeps,
    pub ha: HaConfig,
    pub health: Health,
}

impl Coordinator {
    /// Runs until `shutdown` (then stops the channel tasks and releases the leases), or until
    /// every configured channel stopped on this instance with an error needing operator
    /// action ([`SyncError::AllChannelsStopped`]).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SyncError> {
        let mut owned: BTreeMap<String, Owned> = BTreeMap::new();
        let mut reported_ready = false;
        let result = loop {
            self.reap(&mut owned).await;
            let stopped = owned.values().filter(|o| o.task.is_none()).count();
            if stopped == self.channels.len() && !self.channels.is_empty() {
                break Err(SyncError::AllChannelsStopped {
                    channels: self.channels.len(),
                });
            }
            if shutdown.is_cancelled() {
                break Ok(());
            }
            match self.round(&mut owned, &shutdown).await {
                Err(e) => tracing::warn!(error = %e, "ownership round failed; owned channels go \
                    on, and a former owner's commits stay fenced"),
                // A round cut short by shutdown did not decide what this instance owns.
                Ok(()) if shutdown.is_cancelled() => {}
                Ok(()) => self.health.settled(),
            }
            if !reported_ready && self.health.started() {
                reported_ready = self.record_good_start().await;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = tokio::time::sleep(self.ha.tick()) => {}
            }
        };
        self.stop_all(owned).await;
        result
    }

    /// Collects channel tasks that ended: stepped down (taken over), or stopped by an error
    /// (their task is then `None`).
    async fn reap(&self, owned: &mut BTreeMap<String, Owned>) {
        let mut gone = Vec::new();
        for (name, o) in owned.iter_mut() {
            let Some(task) = o.task.as_mut() else {
                continue;
            };
            if !task.0.is_finished() {
                continue;
            }
            match (&mut task.0).await {
                Ok(Ok(())) => gone.push(name.clone()),
                // The task logged why, once, at ERROR; the lease is kept.
                Ok(Err(e)) => {
                    tracing::debug!(channel = %name, error = %e, "channel task ended");
                    o.task = None;
                }
                Err(e) => {
                    tracing::error!(channel = %name, error = %e, "channel task panicked");
                    o.task = None;
                }
            }
        }
        for name in gone {
            owned.remove(&name);
            self.health.release(&name);
        }
    }

    /// One tick: heartbeat and renewals, channels lost, channels taken.
    async fn round(
        &self,
        owned: &mut BTreeMap<String, Owned>,
        shutdown: &CancellationToken,
    ) -> Result<(), ReplicaError> {
        let ctl = &self.deps.apply.control_schema;
        let mut client = self.deps.pool.get().await?;
        let held: Vec<(String, i64)> = owned.iter().map(|(c, o)| (c.clone(), o.epoch)).collect();
        let beat = ownership::heartbeat(&mut client, ctl, &self.me, &held, self.ha.lease()).await?;
        let lost: Vec<String> = held
            .iter()
            .map(|(c, _)| c)
            .filter(|c| !beat.renewed.contains(c))
            .cloned()
            .collect();
        for channel in lost {
            tracing::warn!(channel = %channel,
                "another instance took this channel over (this one missed renewing its lease): \
                 no longer replicating it");
            if let Some(o) = owned.remove(&channel) {
                o.end().await;
            }
            self.health.release(&channel);
        }
        let total = self.channels.len();
        let live = beat.live_instances as usize;
        let quota = total.div_ceil(live);
        if owned.len() >= quota || shutdown.is_cancelled() {
            return Ok(());
        }
        let leases = ownership::leases(&client, ctl).await?;
        for ch in &self.channels {
            if owned.len() >= quota {
                break;
            }
            if owned.contains_key(&ch.name) {
                continue;
            }
            let lease = leases.iter().find(|l| l.channel == ch.name);
            if lease.is_some_and(|l| !l.takeable(&self.me.id, |l| self.owner_gone(l))) {
                continue;
            }
            let taken = ownership::take(
                &mut client,
                ctl,
                &self.me,
                &ch.name,
                self.ha.lease(),
                TAKEOVER_LOCK_WAIT,
                |l| self.owner_gone(l),
            )
            .await?;
            match taken {
                Take::Taken { epoch, previous } => {
                    tracing::info!(channel = %ch.name, epoch, previous = previous.as_deref().unwrap_or("none"),
                        live_instances = live, "took the channel");
                    owned.insert(ch.name.clone(), self.spawn(ch, epoch, shutdown));
                }
                Take::Held => {}
                Take::Blocked => {
                    // Its former owner, as read above (a lease row that did not exist then
                    // cannot be held by a stuck transaction).
                    let Some(instance) = lease.and_then(|l| l.instance.clone()) else {
                        continue;
                    };
                    tracing::warn!(channel = %ch.name, owner = %instance,
                        "the channel's former owner holds its lease row in a transaction that \
                         does not end (frozen, or cut off mid-batch): ending its sessions");
                    match ownership::terminate_sessions(&client, &instance).await {
                        Ok(n) => tracing::info!(owner = %instance, sessions = n,
                            "ended the former owner's sessions; taking over at the next tick"),
                        Err(e) => tracing::warn!(owner = %instance, error = %e,
                            "cannot end the former owner's sessions (its role may not be ours: \
                             grant pg_signal_backend); retrying"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `lease`'s owner is another process of this host that no longer runs.
    fn owner_gone(&self, lease: &ownership::Lease) -> bool {
        lease.host.as_deref() == Some(self.me.host.as_str())
            && lease
                .pid
                .is_some_and(|pid| pid != self.me.pid && !ownership::process_alive(pid))
    }

    fn spawn(&self, ch: &ChannelConfig, epoch: i64, shutdown: &CancellationToken) -> Owned {
        let fence = Fence {
            channel: ch.name.clone(),
            epoch,
            instance: self.me.id.clone(),
        };
        let task = ChannelTask::new(ch.clone(), fence, self.deps.clone());
        let stop = shutdown.child_token();
        // Every line the channel's task logs (decoding, REST, Pub/Sub) carries the channel.
        let span = tracing::info_span!("channel", channel = %ch.name);
        let handle = tokio::spawn(task.run(stop.clone()).instrument(span));
        Owned {
            epoch,
            stop,
            task: Some(AbortOnDrop(handle)),
        }
    }

    /// Records that this start got ready: the next one waits for nothing. Returns whether
    /// that was recorded.
    async fn record_good_start(&self) -> bool {
        let Ok(client) = self.deps.pool.get().await else {
            return false;
        };
        ownership::started(&client, &self.deps.apply.control_schema, &self.me.host)
            .await
            .is_ok()
    }

    /// Stops every channel task, then lets the leases run out at once so a standby takes
    /// over at its next tick.
    async fn stop_all(&self, owned: BTreeMap<String, Owned>) {
        let mut channels = Vec::new();
        for (name, o) in owned {
            o.end().await;
            channels.push(name);
        }
        let released = match self.deps.pool.get().await {
            Ok(client) => ownership::release(
                &client,
                &self.deps.apply.control_schema,
                &self.me,
                &channels,
            )
            .await
            .map_err(|e| e.to_string()),
            Err(e) => Err(ReplicaError::from(e).to_string()),
        };
        if let Err(e) = released {
            tracing::warn!(error = %e, "cannot release the channel leases; a standby takes over \
                when they run out");
        }
    }
}
