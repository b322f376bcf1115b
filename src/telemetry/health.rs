//! The health of the channels this process replicates, as operators see it: the lag and
//! retention-headroom gauges, `/readyz`, systemd's `READY=1`, `STATUS=` and `WATCHDOG=1`.
//!
//! # Sections
//!
//! ## What is recorded
//!
//! Each channel task holds a [`ChannelHealth`] and reports what happens to it: its
//! `Subscribe` stream accepted or ended, positions received, batches committed (with the
//! newest commit time applied), a batch in flight, an apply failure, a stop for good. Nothing
//! here is computed at the time of the event: the gauges follow the wall clock, so they are
//! computed when they are read ([`Health::refresh`], called on every scrape and every
//! watchdog tick).
//!
//! ## Lag and headroom
//!
//! A channel is caught up while its stream is open and the newest response (event or
//! keepalive, on this stream or, when nothing was left waiting, on the one before) left nothing
//! pending: every position delivered is committed. A stream that starts at LATEST starts
//! caught up; one that resumes after waiting events is not, until the server answers. Then its lag is 0, and the moment is remembered. Otherwise the lag is now minus
//! the later of the newest applied commit and the last caught-up moment: it grows every second
//! while events wait, while the stream is down and while applying is stuck, and a reconnect
//! after a quiet night starts from the last keepalive, not from the last change of the org.
//! The caught-up moment is kept in the checkpoint, so a restart starts from it too. Headroom is
//! the 72-hour retention minus the lag: how long until changes not yet applied are gone.
//!
//! ## Readiness
//!
//! An owned channel is ready once Pub/Sub has accepted its stream (the response headers
//! arrived; the first event or keepalive can take 270 s), and stays ready unless it is stopped
//! for good, has been disconnected for longer than `sync.stale_stream_secs`, or its last batch
//! failed to apply. The process is ready when the control schema is migrated and every owned
//! channel is; an instance that owns no channel is ready as a standby.
//!
//! ## Stuck
//!
//! A channel is stuck when it has work in hand and makes no progress: a batch in flight and
//! no commit for a whole watchdog period, or an open stream that has said nothing for longer
//! than the stale-stream timeout (which should have made it resubscribe) plus that period.
//! Waiting deliberately (a backoff after an error, stopped for good, a standby) is not stuck.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Salesforce keeps change events this long.
const RETENTION_SECS: f64 = crate::model::EVENT_RETENTION_SECS as f64;

/// The health of every channel of this process; cheap to clone.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    started_ms: i64,
    /// After this long disconnected, a channel is no longer ready.
    stale_after: Duration,
    migrated: AtomicBool,
    /// Whether the first round of taking channels is done (before it, owning none does not
    /// make a standby).
    settled: AtomicBool,
    repairs_pending: AtomicI64,
    channels: Mutex<BTreeMap<String, Arc<Mutex<ChannelState>>>>,
}

/// What is known of one channel. Every channel with a state is one this process owns:
/// a standby registers none.
#[derive(Debug, Default)]
struct ChannelState {
    subscribed_once: bool,
    open: bool,
    /// Whether the stream has answered (an event or a keepalive) since it opened.
    responded: bool,
    opened_at: Option<Instant>,
    closed_at: Option<Instant>,
    last_response: Option<Instant>,
    /// The newest position delivered, and the newest committed.
    received: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    last_commit_ms: Option<i64>,
    caught_up_ms: Option<i64>,
    stopped: Option<String>,
    failing: Option<String>,
    /// Not subscribing on purpose for a while (a spent delivery allocation), and why.
    paused: Option<String>,
    /// A batch in flight, and when the apply side last made progress.
    busy: bool,
    last_progress: Option<Instant>,
}

impl ChannelState {
    fn pending(&self) -> bool {
        self.received.is_some() && self.received != self.committed
    }

    fn caught_up(&self) -> bool {
        self.open && self.responded && !self.pending()
    }

    fn note_caught_up(&mut self, now_ms: i64) {
        if self.caught_up() {
            self.caught_up_ms = Some(now_ms);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere leaves consistent plain data: keep reporting.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Health {
    /// A channel counts as disconnected for readiness after `stale_after`.
    pub fn new(stale_after: Duration) -> Health {
        Health {
            inner: Arc::new(Inner {
                started_ms: now_ms(),
                stale_after,
                migrated: AtomicBool::new(false),
                settled: AtomicBool::new(false),
                repairs_pending: AtomicI64::new(0),
                channels: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The handle of channel `name`, which this process owns (replicates).
    pub fn channel(&self, name: &str) -> ChannelHealth {
        let state = lock(&self.inner.channels)
            .entry(name.to_string())
            .or_default()
            .clone();
        ChannelHealth {
            name: name.to_string(),
            state,
        }
    }

    /// Records that the control schema is migrated.
    pub fn migrated(&self) {
        self.inner.migrated.store(true, Ordering::Relaxed);
    }

    /// Records that this instance has taken the channels it will own for now: from here on,
    /// owning none means a standby.
    pub fn settled(&self) {
        self.inner.settled.store(true, Ordering::Relaxed);
    }

    /// Forgets channel `name`: another instance owns it now.
    pub fn release(&self, name: &str) {
        lock(&self.inner.channels).remove(name);
        super::record_channel_released(name);
    }

    /// Records how many repairs are queued in all.
    pub fn repairs_pending(&self, n: i64) {
        self.inner.repairs_pending.store(n, Ordering::Relaxed);
    }

    /// Whether systemd may be told `READY=1`: migrated, and every owned channel subscribed at
    /// least once (or none owned: a standby).
    pub fn started(&self) -> bool {
        self.inner.migrated.load(Ordering::Relaxed)
            && self.inner.settled.load(Ordering::Relaxed)
            && lock(&self.inner.channels)
                .values()
                .all(|s| lock(s).subscribed_once)
    }

    /// What `/readyz` says, channel by channel.
    pub fn readiness(&self) -> Readiness {
        let now = Instant::now();
        let mut channels = Vec::new();
        for (name, state) in lock(&self.inner.channels).iter() {
            let s = lock(state);
            let problem = if let Some(why) = &s.stopped {
                Some(format!("stopped: {why}"))
            } else if let Some(why) = &s.paused {
                Some(format!("paused: {why}"))
            } else if !s.subscribed_once {
                Some("not subscribed yet".to_string())
            } else if let Some(since) = s.closed_at.filter(|_| !s.open)
                && now.duration_since(since) > self.inner.stale_after
            {
                Some(format!(
                    "disconnected for {} s",
                    now.duration_since(since).as_secs()
                ))
            } else {
                s.failing
                    .as_ref()
                    .map(|why| format!("failing to apply: {why}"))
            };
            channels.push(ChannelReadiness {
                channel: name.clone(),
                ready: problem.is_none(),
                problem,
            });
        }
        let migrated = self.inner.migrated.load(Ordering::Relaxed);
        let settled = self.inner.settled.load(Ordering::Relaxed);
        Readiness {
            ready: migrated && settled && channels.iter().all(|c| c.ready),
            role: if channels.is_empty() {
                "standby"
            } else {
                "active"
            },
            migrated,
            channels,
        }
    }

    /// Names of the channels that have work in hand and made no progress for `period`.
    pub fn stuck(&self, period: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (name, state) in lock(&self.inner.channels).iter() {
            let s = lock(state);
            let apply_stuck = s.busy
                && s.last_progress
                    .is_some_and(|t| now.duration_since(t) > period);
            let quiet_since = s.last_response.or(s.opened_at);
            let stream_stuck = s.open
                && quiet_since
                    .is_some_and(|t| now.duration_since(t) > self.inner.stale_after + period);
            if apply_stuck || stream_stuck {
                out.push(name.clone());
            }
        }
        out
    }

    /// Sets the clock-driven gauges (lag, headroom, last applied commit, readiness) as of now.
    pub fn refresh(&self) {
        let now = now_ms();
        for (name, state) in lock(&self.inner.channels).iter() {
            let s = lock(state);
            let lag = self.lag_secs(&s, now);
            super::record_channel_clock(
                name,
                lag,
                RETENTION_SECS - lag,
                s.last_commit_ms.map(|ms| ms as f64 / 1e3),
            );
            super::record_channel_state(name, s.stopped.is_some());
        }
        super::record_ready(self.readiness().ready);
    }

    /// Whether a channel with an open stream is more than `behind` behind (catching up a
    /// backlog). Channels without a stream (paused, stopped, disconnected) do not count: work
    /// that waits for the stream to catch up must not wait for ever on one that is down.
    pub fn catching_up(&self, behind: Duration) -> bool {
        let now = now_ms();
        lock(&self.inner.channels).values().any(|state| {
            let s = lock(state);
            s.open && self.lag_secs(&s, now) > behind.as_secs_f64()
        })
    }

    fn lag_secs(&self, s: &ChannelState, now: i64) -> f64 {
        if s.caught_up() {
            return 0.0;
        }
        // Nothing known yet (a first start): replicating since the process started.
        let basis = s
            .last_commit_ms
            .into_iter()
            .chain(s.caught_up_ms)
            .max()
            .unwrap_or(self.inner.started_ms);
        ((now - basis).max(0)) as f64 / 1e3
    }

    /// One line for systemd's `STATUS=`: role, channels up, worst lag, repairs pending.
    pub fn summary(&self) -> String {
        let readiness = self.readiness();
        let now = now_ms();
        let worst = lock(&self.inner.channels)
            .values()
            .map(|s| self.lag_secs(&lock(s), now))
            .fold(0.0f64, f64::max);
        let up = readiness.channels.iter().filter(|c| c.ready).count();
        format!(
            "{}; channels {up}/{} up; worst lag {worst:.1} s; repairs pending {}",
            readiness.role,
            readiness.channels.len(),
            self.inner.repairs_pending.load(Ordering::Relaxed)
        )
    }
}

/// What `/readyz` answers.
#[derive(Debug, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// `active` (owns channels) or `standby`.
    pub role: &'static str,
    pub migrated: bool,
    pub channels: Vec<ChannelReadiness>,
}

#[derive(Debug, serde::Serialize)]
pub struct ChannelReadiness {
    pub channel: String,
    pub ready: bool,
    /// Why not, when not.
    pub problem: Option<String>,
}

/// One channel's reports; held by its task, cheap to clone.
#[derive(Clone)]
pub struct ChannelHealth {
    name: String,
    state: Arc<Mutex<ChannelState>>,
}

impl ChannelHealth {
    fn state(&self) -> MutexGuard<'_, ChannelState> {
        lock(&self.state)
    }

    /// What the checkpoint says at start-up: the newest applied commit and the last moment
    /// the channel was caught up.
    pub fn restore(&self, last_commit_ms: Option<i64>, caught_up_ms: Option<i64>) {
        let mut s = self.state();
        s.last_commit_ms = s.last_commit_ms.max(last_commit_ms);
        s.caught_up_ms = s.caught_up_ms.max(caught_up_ms);
    }

    /// Pub/Sub accepted the `Subscribe` stream; `position` is where it resumes (`None`:
    /// LATEST), which counts as committed.
    pub fn subscribed(&self, position: Option<&[u8]>) {
        let mut s = self.state();
        // Nothing is pending on a new stream that starts at LATEST, or that resumes where the
        // last one had delivered everything and all of it was committed: the newest response
        // (on the stream before) still holds. Had events been waiting, the server delivers
        // them again, and until it answers nothing is known.
        let caught_up_before = s.responded && !s.pending();
        s.open = true;
        s.subscribed_once = true;
        s.paused = None;
        s.responded = caught_up_before || position.is_none();
        s.opened_at = Some(Instant::now());
        s.closed_at = None;
        s.received = position.map(<[u8]>::to_vec);
        s.committed = s.received.clone();
        drop(s);
        super::record_connected(&self.name, true);
    }

    /// The stream ended (an error, or shutdown).
    pub fn closed(&self) {
        let mut s = self.state();
        s.note_caught_up(now_ms());
        s.open = false;
        s.closed_at = Some(Instant::now());
        drop(s);
        super::record_connected(&self.name, false);
    }

    /// Events were delivered, up to `position`.
    pub fn received(&self, position: &[u8]) {
        let mut s = self.state();
        // Caught up until this moment: the lag of these events counts from now.
        s.note_caught_up(now_ms());
        s.responded = true;
        s.last_response = Some(Instant::now());
        s.received = Some(position.to_vec());
    }

    /// A keepalive: everything up to `position` was delivered (`None`: it named no position).
    pub fn keepalive(&self, position: Option<&[u8]>) {
        let mut s = self.state();
        s.responded = true;
        s.last_response = Some(Instant::now());
        if let Some(p) = position {
            s.received = Some(p.to_vec());
        }
        s.note_caught_up(now_ms());
    }

    /// A batch went into flight.
    pub fn applying(&self) {
        let mut s = self.state();
        if !s.busy {
            s.busy = true;
            s.last_progress = Some(Instant::now());
        }
    }

    /// Nothing is in flight any more.
    pub fn idle(&self) {
        self.state().busy = false;
    }

    /// Everything up to `position` is committed; `commit_ms` is the newest commit it applied
    /// (`None` for a keepalive position).
    pub fn committed(&self, position: &[u8], commit_ms: Option<i64>) {
        let now = now_ms();
        let mut s = self.state();
        s.committed = Some(position.to_vec());
        s.last_commit_ms = s.last_commit_ms.max(commit_ms);
        s.failing = None;
        s.last_progress = Some(Instant::now());
        s.note_caught_up(now);
    }

    /// Applying failed (the channel resubscribes after its backoff).
    pub fn failing(&self, why: &str) {
        self.state().failing = Some(why.to_string());
    }

    /// The channel does not subscribe for a while, on purpose: `/readyz` says why.
    pub fn paused(&self, why: &str) {
        self.state().paused = Some(why.to_string());
    }

    /// The channel stopped for good.
    pub fn stopped(&self, why: &str) {
        let mut s = self.state();
        s.stopped = Some(why.to_string());
        s.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> (Health, ChannelHealth) {
        let h = Health::new(Duration::from_secs(300));
        let c = h.channel("/data/AccountChangeEvent");
        (h, c)
    }

    #[test]
    fn caught_up_means_zero_lag_and_waiting_events_make_it_grow() {
        let (h, c) = health();
        let now = now_ms();
        c.restore(Some(now - 3_600_000), Some(now - 10_000));
        // Not yet subscribed: lag counts from the last caught-up moment, not the last change.
        let s = lock(&c.state);
        let lag = h.lag_secs(&s, now);
        drop(s);
        assert!((9.0..=11.0).contains(&lag), "{lag}");
        c.subscribed(Some(b"\x01"));
        // Open but silent since: unknown, so not 0.
        assert!(h.lag_secs(&lock(&c.state), now) > 0.0);
        c.keepalive(Some(b"\x01"));
        assert_eq!(h.lag_secs(&lock(&c.state), now_ms()), 0.0);
        c.received(b"\x02");
        let later = now_ms() + 5_000;
        let lag = h.lag_secs(&lock(&c.state), later);
        assert!((4.0..=6.0).contains(&lag), "waiting events: {lag}");
        c.committed(b"\x02", Some(now - 1_000));
        assert_eq!(h.lag_secs(&lock(&c.state), later), 0.0);
        c.closed();
        let lag = h.lag_secs(&lock(&c.state), now_ms() + 7_000);
        assert!((6.0..=8.0).contains(&lag), "stream down: {lag}");
    }

    #[test]
    fn readiness_names_the_failing_channel() {
        let (h, c) = health();
        assert!(!h.readiness().ready, "not migrated, not subscribed");
        h.migrated();
        h.settled();
        assert!(!h.started());
        c.subscribed(None);
        assert!(h.started() && h.readiness().ready);
        c.failing("deadlock detected");
        let r = h.readiness();
        assert!(!r.ready);
        assert!(
            r.channels[0]
                .problem
                .as_deref()
                .unwrap_or("")
                .contains("deadlock")
        );
        c.committed(b"\x01", Some(1));
        assert!(h.readiness().ready, "a commit clears the failure");
        c.stopped("topic not found");
        assert!(!h.readiness().ready);
        assert!(
            h.summary().starts_with("active; channels 0/1 up"),
            "{}",
            h.summary()
        );
    }

    #[test]
    fn only_work_in_hand_can_be_stuck() {
        let (h, c) = health();
        c.subscribed(None);
        c.keepalive(None);
        assert!(h.stuck(Duration::ZERO).is_empty(), "open and heard from");
        c.applying();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            h.stuck(Duration::from_millis(5)),
            ["/data/AccountChangeEvent"]
        );
        c.committed(b"\x01", None);
        assert!(h.stuck(Duration::from_millis(5)).is_empty());
        c.idle();
        c.closed();
        std::thread::sleep(Duration::from_millis(20));
        assert!(h.stuck(Duration::ZERO).is_empty(), "a backoff is not stuck");
        let standby = Health::new(Duration::from_secs(1));
        standby.migrated();
        assert!(
            !standby.started(),
            "not a standby before the first round of takeovers"
        );
        standby.settled();
        assert!(standby.started() && standby.readiness().ready);
        assert_eq!(standby.readiness().role, "standby");
    }
}
