//! Large transactions: many changes committed as one, and Salesforce's overflow rule for
//! them. The first changes up to the threshold get change events under one transaction key;
//! the rest are made silently and each entity they touched gets one `GAP_OVERFLOW` event.
//! It builds on the record helpers and the event publisher; it must not encode events itself.

use super::events::{Changes, Txn};
use super::records::{record_in, set_values, stamp_update};
use super::{ApiError, ObjectDef, Org, Record};
use crate::model::ChangeType;
use crate::model::time::format_datetime;
use serde_json::{Map, Value as J};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Salesforce's limit of changes in one transaction that still get change events.
pub const DEFAULT_OVERFLOW_THRESHOLD: usize = 100_000;

/// One step of a [`Org::large_transaction`].
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnStep {
    /// Creates `count` records with the same `fields`.
    Create {
        object: String,
        count: usize,
        #[serde(default)]
        fields: Map<String, J>,
    },
    /// Sets `fields` on every live record of the object.
    UpdateAll {
        object: String,
        fields: Map<String, J>,
    },
    /// Deletes every live record of the object.
    DeleteAll { object: String },
}

impl TxnStep {
    fn object(&self) -> &str {
        match self {
            TxnStep::Create { object, .. }
            | TxnStep::UpdateAll { object, .. }
            | TxnStep::DeleteAll { object } => object,
        }
    }
}

/// What a large transaction did.
#[derive(Debug, Default, serde::Serialize)]
pub struct TxnReport {
    /// Changes counted against the overflow threshold.
    pub changes: usize,
    /// Change events published.
    pub events: usize,
    /// Changes made without an event.
    pub silent: usize,
    /// Entities that got a GAP_OVERFLOW event.
    pub overflow_events: Vec<String>,
}

impl Org {
    pub fn overflow_threshold(&self) -> usize {
        self.overflow_threshold.load(Ordering::Relaxed)
    }

    pub fn set_overflow_threshold(&self, n: usize) {
        self.overflow_threshold.store(n.max(1), Ordering::Relaxed);
    }

    /// Runs one transaction of many changes. The first `overflow_threshold` changes (a
    /// create, delete or undelete counts one, an update one per changed field) get change
    /// events; the rest are made silently and each entity they touched gets one
    /// `GAP_OVERFLOW` event, as Salesforce does.
    pub fn large_transaction(
        &self,
        steps: &[TxnStep],
        origin: &str,
    ) -> Result<TxnReport, ApiError> {
        // Validate everything first: a transaction fails whole.
        let mut prepared = Vec::new();
        for step in steps {
            let def = self.object(step.object())?;
            let values = match step {
                TxnStep::Create { fields, .. } => Self::validate_new(&def, fields)?,
                TxnStep::UpdateAll { fields, .. } => Self::validate(&def, fields, false)?,
                TxnStep::DeleteAll { .. } => Record::new(),
            };
            prepared.push((def, values));
        }
        let threshold = self.overflow_threshold();
        let mut data = self.data();
        let now = self.now_ms();
        let stamp = format_datetime(now - now % 1000);
        let key = uuid::Uuid::new_v4().to_string();
        let mut sequence = 0;
        let mut counted = 0usize;
        let mut report = TxnReport::default();
        let mut overflowed: Vec<Arc<ObjectDef>> = Vec::new();
        for (step, (def, values)) in steps.iter().zip(prepared) {
            let object = def.describe.name.clone();
            // (change type, id, body, changes) of each change of this step
            let mut changes: Vec<(ChangeType, String, Record, Changes)> = Vec::new();
            match step {
                TxnStep::Create { count, .. } => {
                    for _ in 0..*count {
                        let (id, record) = self.insert_new(&mut data, &def, values.clone(), now);
                        changes.push((ChangeType::Create, id, record, Changes::default()));
                    }
                }
                TxnStep::UpdateAll { .. } => {
                    let ids: Vec<String> = data
                        .records
                        .get(&object)
                        .map(|r| r.keys().cloned().collect())
                        .unwrap_or_default();
                    for id in ids {
                        let Some(record) = record_in(&mut data, &object, &id, false) else {
                            continue;
                        };
                        let mut c = set_values(&def, record, &values);
                        if c.changed.is_empty() {
                            continue;
                        }
                        let body = stamp_update(record, &mut c, &stamp);
                        changes.push((ChangeType::Update, id, body, c));
                    }
                }
                TxnStep::DeleteAll { .. } => {
                    let ids: Vec<String> = data
                        .records
                        .get(&object)
                        .map(|r| r.keys().cloned().collect())
                        .unwrap_or_default();
                    for id in ids {
                        if let Some(record) = record_in(&mut data, &object, &id, false) {
                            record.insert("IsDeleted".into(), J::Bool(true));
                            record.insert("SystemModstamp".into(), J::String(stamp.clone()));
                            changes.push((
                                ChangeType::Delete,
                                id,
                                Record::new(),
                                Changes::default(),
                            ));
                        }
                    }
                }
            }
            for (change_type, id, body, c) in changes {
                let weight = if change_type == ChangeType::Update {
                    // LastModifiedDate rides along with every update; it is not a change
                    // the transaction made.
                    c.changed.len().saturating_sub(1).max(1)
                } else {
                    1
                };
                counted += weight;
                report.changes += weight;
                if counted > threshold {
                    report.silent += 1;
                    if !overflowed.iter().any(|d| d.describe.name == object) {
                        overflowed.push(def.clone());
                    }
                    continue;
                }
                sequence += 1;
                report.events += 1;
                self.publish_in(
                    &mut data,
                    &def,
                    change_type,
                    vec![id],
                    &body,
                    c,
                    now,
                    origin,
                    &Txn {
                        key: &key,
                        sequence,
                    },
                )?;
            }
        }
        for def in overflowed {
            sequence += 1;
            self.publish_in(
                &mut data,
                &def,
                ChangeType::GapOverflow,
                vec![super::OVERFLOW_RECORD_ID.to_string()],
                &Record::new(),
                Changes::default(),
                now,
                origin,
                &Txn {
                    key: &key,
                    sequence,
                },
            )?;
            report.overflow_events.push(def.describe.name.clone());
        }
        Ok(report)
    }
}
