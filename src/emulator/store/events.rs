//! Change capture: one change of the store becomes one change event on the bus, encoded
//! with the object's current schema, with its header (transaction key and sequence, commit
//! number and timestamp, the changed / nulled / diff field bitmaps), on every channel that
//! carries the object; and platform events, checked against their type, published as they
//! come. Payload corruption (control API) is applied here.
//!
//! It is called under the org's lock, so the bus order is the commit order; it must not
//! change records.

use super::{ApiError, Data, ObjectDef, Org, Record};
use crate::emulator::cdc::{HeaderInfo, encode};
use crate::model::ChangeType;
use std::collections::HashSet;
use std::sync::atomic::Ordering;

/// The field lists of one change.
#[derive(Default)]
pub(super) struct Changes {
    pub(super) changed: HashSet<String>,
    pub(super) nulled: HashSet<String>,
    /// Long text fields whose value in the body is a unified diff.
    pub(super) diff: HashSet<String>,
}

/// The transaction an event belongs to: its key and the event's place in it.
pub(super) struct Txn<'a> {
    pub(super) key: &'a str,
    pub(super) sequence: i32,
}

impl Org {
    /// Publishes one event that is its own transaction.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish(
        &self,
        data: &mut Data,
        def: &ObjectDef,
        change_type: ChangeType,
        record_ids: Vec<String>,
        body: &Record,
        changes: Changes,
        now: i64,
        origin: &str,
    ) -> Result<(), ApiError> {
        let key = uuid::Uuid::new_v4().to_string();
        let txn = Txn {
            key: &key,
            sequence: 1,
        };
        self.publish_in(
            data,
            def,
            change_type,
            record_ids,
            body,
            changes,
            now,
            origin,
            &txn,
        )
    }

    /// Publishes one event of transaction `txn`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish_in(
        &self,
        data: &mut Data,
        def: &ObjectDef,
        change_type: ChangeType,
        record_ids: Vec<String>,
        body: &Record,
        changes: Changes,
        now: i64,
        origin: &str,
        txn: &Txn<'_>,
    ) -> Result<(), ApiError> {
        if txn.sequence == 1 {
            data.commit_number += 1 + (now % 7);
        }
        let header = HeaderInfo {
            entity: &def.describe.name,
            record_ids,
            change_type,
            change_origin: origin,
            transaction_key: txn.key,
            sequence_number: txn.sequence,
            commit_timestamp: now,
            commit_number: data.commit_number,
            commit_user: &self.user_id,
            changed: def.schema.bitmap(&changes.changed),
            nulled: def.schema.bitmap(&changes.nulled),
            diff: def.schema.bitmap(&changes.diff),
        };
        let mut payload = encode(&def.schema, &header, body)
            .map_err(|m| ApiError::new(500, "UNKNOWN_EXCEPTION", m))?;
        let corrupt = self
            .corrupt_remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if corrupt {
            // Keep the bytes but cut the datum short: a reader sees a truncated record.
            payload.truncate(payload.len() / 2);
            payload.extend_from_slice(&[0xFF, 0xFF, 0xFF]);
        }
        // An all-or-none request publishes its events once it succeeds.
        if !super::journal::hold(&def.channels, &def.schema.schema_id, &payload, now) {
            self.bus
                .publish(&def.channels, &def.schema.schema_id, payload, now);
        }
        Ok(())
    }

    /// Publishes platform events on `channel`: each is checked against the channel's schema
    /// and gets a replay id, or an error message saying what is wrong with it.
    pub fn publish_events(
        &self,
        channel: &str,
        events: &[(String, Vec<u8>)],
    ) -> Result<Vec<Result<u64, String>>, ApiError> {
        let event_type = self.event_type(channel).ok_or_else(|| {
            ApiError::new(
                403,
                "publish.topic.cannot.publish",
                format!("{channel} is not a platform event channel; only /event/ topics accept publishing"),
            )
        })?;
        let channels = [channel.to_string()];
        Ok(events
            .iter()
            .map(|(schema_id, payload)| {
                if *schema_id != event_type.schema_id {
                    return Err(format!(
                        "schema id {schema_id} is not the current schema of {channel} ({})",
                        event_type.schema_id
                    ));
                }
                event_type.validate(payload)?;
                Ok(self
                    .bus
                    .publish(&channels, schema_id, payload.clone(), self.now_ms()))
            })
            .collect())
    }

    /// Corrupts the next `n` published payloads.
    pub fn corrupt_next(&self, n: u32) {
        self.corrupt_remaining.store(n, Ordering::Relaxed);
    }
}
