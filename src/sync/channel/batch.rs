//! A batch being received: its decoded events, their payload sizes, the events that could not
//! be decoded, and the position it brings the channel to. A batch closed by its size bound is
//! cut after its last complete Salesforce transaction (invariant 6), so a transaction is never
//! split between two commits when it has fully arrived.

use crate::model::{ChangeEvent, ReplayId};
use crate::replica::dead_letters;
use std::time::Instant;

pub(super) struct DeadLetter {
    /// The event as it is kept.
    pub(super) letter: dead_letters::DeadLetter,
    /// How many applicable events of the batch arrived before it.
    pub(super) position: usize,
    /// A commit time (epoch ms) no later than the event's own, which cannot be read: that of
    /// the last event decoded before it on this channel, or of the position the stream
    /// resumed from. The repair that covers it re-reads from there, minus the margin.
    pub(super) not_before_ms: i64,
}

/// Events received but not yet committed, and the position they bring the channel to.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) events: Vec<ChangeEvent>,
    /// Payload bytes of each event, and their sum (the batch's memory grows with it).
    pub(super) sizes: Vec<u32>,
    pub(super) bytes: usize,
    pub(super) dead: Vec<DeadLetter>,
    /// Position of the newest event received, applicable or not.
    pub(super) last_replay: Option<ReplayId>,
    pub(super) last_commit_ms: Option<i64>,
    pub(super) started: Option<Instant>,
    /// When the newest event arrived.
    pub(super) last_event_at: Option<Instant>,
}

/// What the commit needs of a planned batch's events.
pub(super) struct Applied {
    pub(super) replay_ids: Vec<ReplayId>,
    pub(super) commit_ms: Vec<i64>,
}

impl Batch {
    pub(super) fn is_empty(&self) -> bool {
        self.last_replay.is_none()
    }

    /// Whether the batch holds more than its trailing Salesforce transaction: then every
    /// transaction before that one is known to be complete.
    pub(super) fn has_complete_transactions(&self) -> bool {
        match self.events.last() {
            Some(last) if !last.header.transaction_key.is_empty() => self
                .events
                .iter()
                .any(|e| e.header.transaction_key != last.header.transaction_key),
            _ => false,
        }
    }

    /// Splits off the trailing Salesforce transaction, which may still be arriving, so that a
    /// size-bound flush does not cut it (invariant 6). The returned tail is the next batch.
    /// A batch that is one single transaction is not split: the size bound wins.
    pub(super) fn split_open_transaction(&mut self) -> Batch {
        let Some(last_key) = self.events.last().map(|e| e.header.transaction_key.clone()) else {
            return Batch::default();
        };
        let start = self
            .events
            .iter()
            .rposition(|e| e.header.transaction_key != last_key)
            .map(|i| i + 1)
            .unwrap_or(0);
        if start == 0 || last_key.is_empty() {
            return Batch::default();
        }
        let tail_events = self.events.split_off(start);
        let tail_sizes = if start <= self.sizes.len() {
            self.sizes.split_off(start)
        } else {
            Vec::new()
        };
        let tail_bytes: usize = tail_sizes.iter().map(|s| *s as usize).sum();
        self.bytes = self.bytes.saturating_sub(tail_bytes);
        let (keep, carry): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dead)
            .into_iter()
            .partition(|d| d.position < start);
        self.dead = keep;
        let head_last = &self.events[start - 1];
        let tail = Batch {
            events: tail_events,
            sizes: tail_sizes,
            bytes: tail_bytes,
            dead: carry
                .into_iter()
                .map(|mut d| {
                    d.position -= start;
                    d
                })
                .collect(),
            last_replay: self.last_replay.take(),
            last_commit_ms: self.last_commit_ms,
            started: Some(Instant::now()),
            last_event_at: self.last_event_at,
        };
        self.last_replay = Some(head_last.replay_id.clone());
        self.last_commit_ms = Some(head_last.header.commit_timestamp);
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChangeEvent, ChangeHeader, ChangeType};
    use std::sync::Arc;

    fn event(replay: u64, tx: &str) -> ChangeEvent {
        ChangeEvent {
            replay_id: ReplayId::from_u64(replay),
            schema_id: "s".into(),
            header: ChangeHeader {
                entity_name: "Account".into(),
                record_ids: vec![format!("001{replay}")],
                change_type: ChangeType::Update,
                change_origin: String::new(),
                transaction_key: tx.into(),
                sequence_number: 1,
                commit_timestamp: replay as i64 * 10,
                commit_number: replay as i64,
                commit_user: String::new(),
                changed_fields: vec![],
                nulled_fields: vec![],
                diff_fields: vec![],
            },
            fields: vec![],
            schema_fields: Arc::from(Vec::<Arc<str>>::new()),
        }
    }

    fn dead(replay: u64, position: usize) -> DeadLetter {
        DeadLetter {
            letter: dead_letters::DeadLetter {
                replay_id: ReplayId::from_u64(replay),
                schema_id: "s".into(),
                payload: vec![],
                error: "x".into(),
            },
            position,
            not_before_ms: 0,
        }
    }

    #[test]
    fn a_size_flush_keeps_the_trailing_transaction_whole() {
        let mut b = Batch {
            events: vec![
                event(1, "a"),
                event(2, "a"),
                event(3, "b"),
                event(5, "c"),
                event(6, "c"),
            ],
            sizes: vec![100, 100, 100, 50, 60],
            bytes: 410,
            dead: vec![dead(4, 3), dead(7, 5)],
            last_replay: Some(ReplayId::from_u64(8)),
            last_commit_ms: Some(80),
            started: Some(Instant::now()),
            last_event_at: Some(Instant::now()),
        };
        assert!(b.has_complete_transactions());
        let tail = b.split_open_transaction();
        assert_eq!(b.events.len(), 3);
        assert_eq!(
            b.last_replay,
            Some(ReplayId::from_u64(3)),
            "checkpoint at the cut"
        );
        assert_eq!(b.last_commit_ms, Some(30));
        assert_eq!(b.dead.len(), 0, "dead letter 4 arrived after event 3");
        assert_eq!(tail.events.len(), 2);
        assert_eq!(
            (b.bytes, tail.bytes),
            (300, 110),
            "payload bytes follow the events"
        );
        assert_eq!(
            tail.dead.iter().map(|d| d.position).collect::<Vec<_>>(),
            [0, 2]
        );
        assert_eq!(tail.last_replay, Some(ReplayId::from_u64(8)));
    }

    #[test]
    fn one_transaction_larger_than_the_bound_is_not_split() {
        let mut b = Batch {
            events: vec![event(1, "a"), event(2, "a")],
            last_replay: Some(ReplayId::from_u64(2)),
            ..Default::default()
        };
        assert!(
            !b.has_complete_transactions(),
            "one transaction may still be arriving"
        );
        let tail = b.split_open_transaction();
        assert!(tail.is_empty());
        assert_eq!(b.events.len(), 2);
    }
}
