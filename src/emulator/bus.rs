//! The emulator's event bus: one log per channel, 8-byte big-endian replay ids, retention.
//!
//! An event published for an object goes to every channel that carries it
//! (`/data/ChangeEvents` and the object's own channel) under one replay id. Replay ids grow
//! across the whole org, so the ids seen on one channel are not contiguous, as on Salesforce.
//!
//! Payloads are opaque bytes here: the bus must not know schemas, objects or records, so that
//! change capture and platform events publish through it alike.

use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// One stored event.
#[derive(Debug)]
pub struct BusEvent {
    pub replay: u64,
    pub schema_id: String,
    pub payload: Bytes,
    pub event_uuid: String,
    /// Emulator-clock time of publication, epoch ms (for retention).
    pub published_ms: i64,
}

#[derive(Default)]
struct Log {
    events: VecDeque<Arc<BusEvent>>,
    /// Replay ids at or below this were purged by retention.
    purged_through: u64,
}

struct Inner {
    next_replay: u64,
    /// The newest replay id handed out (the tip).
    last_replay: u64,
    logs: HashMap<String, Log>,
}

/// How a subscription's requested start position resolves.
#[derive(Debug, PartialEq)]
pub enum Position {
    /// Deliver events with a replay id above this.
    After(u64),
    /// The id is not one this channel can resume from.
    Invalid,
}

pub struct Bus {
    inner: Mutex<Inner>,
    /// Bumped on every publish; subscribers wait on it.
    version: watch::Sender<u64>,
    first_replay: u64,
}

impl Bus {
    pub fn new(channels: impl IntoIterator<Item = String>) -> Bus {
        let first_replay = 1_000_000;
        let logs = channels
            .into_iter()
            .map(|c| {
                (
                    c,
                    Log {
                        purged_through: first_replay,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Bus {
            inner: Mutex::new(Inner {
                next_replay: first_replay + 1,
                last_replay: first_replay,
                logs,
            }),
            version: watch::channel(0).0,
            first_replay,
        }
    }

    pub fn has_channel(&self, channel: &str) -> bool {
        self.lock().logs.contains_key(channel)
    }

    pub fn add_channel(&self, channel: &str) {
        let mut inner = self.lock();
        let tip = inner.last_replay;
        inner.logs.entry(channel.to_string()).or_insert(Log {
            events: VecDeque::new(),
            purged_through: tip,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data; keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event to `channels` (those that exist) and returns its replay id.
    pub fn publish(
        &self,
        channels: &[String],
        schema_id: &str,
        payload: Vec<u8>,
        now_ms: i64,
    ) -> u64 {
        let payload = Bytes::from(payload);
        let replay = {
            let mut inner = self.lock();
            // Steps of 1-3 keep ids increasing but not contiguous.
            let replay = inner.next_replay;
            inner.next_replay += 1 + (replay % 3);
            inner.last_replay = replay;
            let event = Arc::new(BusEvent {
                replay,
                schema_id: schema_id.to_string(),
                payload,
                event_uuid: uuid::Uuid::new_v4().to_string(),
                published_ms: now_ms,
            });
            for c in channels {
                if let Some(log) = inner.logs.get_mut(c) {
                    log.events.push_back(event.clone());
                }
            }
            replay
        };
        self.version.send_modify(|v| *v += 1);
        replay
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The newest replay id of the org (the tip every channel's LATEST starts after).
    pub fn tip(&self) -> u64 {
        self.lock().last_replay
    }

    /// The position EARLIEST starts after on `channel`.
    pub fn earliest(&self, channel: &str) -> u64 {
        self.lock()
            .logs
            .get(channel)
            .map(|l| l.purged_through)
            .unwrap_or(self.first_replay)
    }

    /// Checks a CUSTOM replay id: it must lie between the channel's purge horizon and the tip.
    pub fn resolve_custom(&self, channel: &str, replay: u64) -> Position {
        let inner = self.lock();
        let tip = inner.last_replay;
        match inner.logs.get(channel) {
            Some(log) if replay >= log.purged_through && replay <= tip => Position::After(replay),
            _ => Position::Invalid,
        }
    }

    /// Up to `max` events of `channel` with a replay id above `after`.
    pub fn read_after(&self, channel: &str, after: u64, max: usize) -> Vec<Arc<BusEvent>> {
        let inner = self.lock();
        let Some(log) = inner.logs.get(channel) else {
            return Vec::new();
        };
        let start = log.events.partition_point(|e| e.replay <= after);
        log.events.iter().skip(start).take(max).cloned().collect()
    }

    /// Drops events published before `cutoff_ms` (retention); returns how many went.
    pub fn purge_before(&self, cutoff_ms: i64) -> usize {
        let mut inner = self.lock();
        let mut purged = 0;
        for log in inner.logs.values_mut() {
            while log
                .events
                .front()
                .is_some_and(|e| e.published_ms < cutoff_ms)
            {
                if let Some(e) = log.events.pop_front() {
                    log.purged_through = e.replay;
                    purged += 1;
                }
            }
        }
        purged
    }

    /// Forgets every stored event (control API reset). Replay ids keep growing, so a position
    /// from before the reset is refused like a purged one.
    pub fn clear(&self) {
        let mut inner = self.lock();
        let tip = inner.last_replay;
        for log in inner.logs.values_mut() {
            log.events.clear();
            log.purged_through = tip;
        }
    }

    /// Events stored per channel.
    pub fn counts(&self) -> HashMap<String, usize> {
        self.lock()
            .logs
            .iter()
            .map(|(k, v)| (k.clone(), v.events.len()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_grow_and_custom_positions_validate() {
        let bus = Bus::new(["/data/A".to_string(), "/data/B".to_string()]);
        let start = bus.tip();
        let a = bus.publish(&["/data/A".into()], "s", vec![1], 0);
        let b = bus.publish(&["/data/A".into(), "/data/B".into()], "s", vec![2], 10);
        assert!(a > start && b > a);
        assert_eq!(bus.tip(), b, "the tip is the newest id handed out");
        assert_eq!(bus.read_after("/data/A", start, 10).len(), 2);
        assert_eq!(bus.read_after("/data/A", a, 10).len(), 1);
        assert_eq!(bus.read_after("/data/B", start, 10)[0].replay, b);
        assert_eq!(bus.resolve_custom("/data/A", a), Position::After(a));
        assert_eq!(bus.resolve_custom("/data/A", b + 100), Position::Invalid);
        assert_eq!(bus.purge_before(5), 1);
        assert_eq!(bus.resolve_custom("/data/A", start), Position::Invalid);
        assert_eq!(bus.earliest("/data/A"), a);
    }
}
