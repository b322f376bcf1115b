//! Records and their CRUD: validation as Salesforce validates (unknown field, read-only
//! field, type, length, required), system fields stamped on every write, the recycle bin, and
//! reads that share records rather than copy them. Every mutation publishes the change event
//! Salesforce would (or, for gaps, the gap event instead) under the org's lock.
//!
//! It owns what a record holds; the event encoding is [`super::events`]'s, and describes are
//! [`super::schema`]'s.

use super::events::Changes;
use super::ids::new_id;
use super::{ApiError, Data, ObjectDef, Org, Record};
use crate::emulator::diff::text_diff;
use crate::model::time::{date_ms, datetime_ms, format_datetime, time_ms};
use crate::model::{ChangeType, FieldType};
use serde_json::{Map, Value as J};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Text fields of at least this many characters may be sent as a diff.
const DIFF_MIN_CHARS: usize = 1000;

/// The record `id` of `object` if its recycle-bin state is `deleted`.
pub(super) fn record_in<'a>(
    data: &'a mut Data,
    object: &str,
    id: &str,
    deleted: bool,
) -> Option<&'a mut Record> {
    // In an all-or-none request, the state before goes to its journal (and the record is
    // then copied on write, so the journal keeps that state).
    if super::journal::active() {
        let prior = data
            .records
            .get(object)
            .and_then(|r| r.get(id))
            .filter(|r| is_deleted(r) == deleted)
            .cloned();
        if let Some(prior) = prior {
            super::journal::touch(data, object, id, Some(prior));
        }
    }
    data.records
        .get_mut(object)
        .and_then(|r| r.get_mut(id))
        .filter(|r| is_deleted(r) == deleted)
        .map(Arc::make_mut)
}

/// Sets `values` on `record`, and what they derive; returns the fields whose value changed
/// (and those now null).
pub(super) fn set_values(def: &ObjectDef, record: &mut Record, values: &Record) -> Changes {
    let mut c = Changes::default();
    for (k, v) in values {
        if record.get(k).unwrap_or(&J::Null) != v {
            if v.is_null() {
                c.nulled.insert(k.clone());
            }
            c.changed.insert(k.clone());
            record.insert(k.clone(), v.clone());
        }
    }
    c.changed.extend(super::names::derive(def, record));
    c
}

/// Stamps an updated record (`LastModifiedDate`, which every UPDATE lists as changed, and
/// `SystemModstamp`) and returns the event body: the changed fields' new values.
pub(super) fn stamp_update(record: &mut Record, changes: &mut Changes, stamp: &str) -> Record {
    changes.changed.insert("LastModifiedDate".to_string());
    record.insert("LastModifiedDate".into(), J::String(stamp.to_string()));
    record.insert("SystemModstamp".into(), J::String(stamp.to_string()));
    changes
        .changed
        .iter()
        .filter_map(|k| record.get(k).map(|v| (k.clone(), v.clone())))
        .collect()
}

/// Why the live record `id` of `object` is not there: ENTITY_IS_DELETED when it is in the
/// recycle bin, NOT_FOUND when the org never had it.
pub(super) fn missing(data: &Data, object: &str, id: &str) -> ApiError {
    let in_bin = data
        .records
        .get(object)
        .and_then(|r| r.get(id))
        .is_some_and(|r| is_deleted(r));
    if in_bin {
        ApiError::new(404, "ENTITY_IS_DELETED", "entity is deleted")
    } else {
        ApiError::new(404, "NOT_FOUND", "The requested resource does not exist")
    }
}

/// Is the record in the recycle bin?
fn is_deleted(record: &Record) -> bool {
    record.get("IsDeleted") == Some(&J::Bool(true))
}

/// Large text fields, whose updates Salesforce may send as diffs.
fn is_long_text(def: &ObjectDef, field: &str) -> bool {
    def.describe
        .field(field)
        .is_some_and(|f| f.kind() == FieldType::Textarea && f.length > 255)
}

impl Org {
    /// Checks and normalizes client-supplied values.
    pub(super) fn validate(
        def: &ObjectDef,
        input: &Map<String, J>,
        creating: bool,
    ) -> Result<Record, ApiError> {
        let mut out = Record::new();
        for (name, value) in input {
            if name == "attributes" {
                continue;
            }
            let Some(f) = def
                .describe
                .fields
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name))
            else {
                return Err(ApiError::field(
                    400,
                    "INVALID_FIELD",
                    format!(
                        "No such column '{name}' on sobject of type {}",
                        def.describe.name
                    ),
                    name,
                ));
            };
            // A formula is computed, never written, whatever its describe claims.
            let allowed = !f.is_formula() && if creating { f.createable } else { f.updateable };
            if !allowed {
                return Err(ApiError::field(
                    400,
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    format!(
                        "Unable to {} fields: {}. Please check the security settings of this \
                         field and verify that it is read/write for your profile or permission set.",
                        if creating { "create" } else { "update" },
                        f.name
                    ),
                    &f.name,
                ));
            }
            let bad_type = || {
                ApiError::field(
                    400,
                    "JSON_PARSER_ERROR",
                    format!(
                        "Cannot deserialize instance of {} from {value}",
                        f.field_type
                    ),
                    &f.name,
                )
            };
            let normalized = match (f.kind(), value) {
                (_, J::Null) => J::Null,
                (FieldType::Boolean, J::Bool(_)) => value.clone(),
                (FieldType::Int | FieldType::Long, J::Number(n)) => {
                    let i = n
                        .as_i64()
                        .or_else(|| n.as_f64().filter(|x| x.fract() == 0.0).map(|x| x as i64))
                        .ok_or_else(bad_type)?;
                    J::from(i)
                }
                (FieldType::Double | FieldType::Currency | FieldType::Percent, J::Number(n)) => {
                    // Salesforce stores numbers at the field's scale, rounding half away
                    // from zero.
                    let x = n.as_f64().ok_or_else(bad_type)?;
                    let x = if f.precision > 0 && (0..=17).contains(&f.scale) {
                        let m = 10f64.powi(f.scale as i32);
                        (x * m).round() / m
                    } else {
                        x
                    };
                    J::from(x)
                }
                (FieldType::Datetime, J::String(s)) => {
                    J::String(format_datetime(datetime_ms(s).ok_or_else(bad_type)?))
                }
                (FieldType::Date, J::String(s)) => {
                    date_ms(s).ok_or_else(bad_type)?;
                    value.clone()
                }
                (FieldType::Time, J::String(s)) => {
                    time_ms(s).ok_or_else(bad_type)?;
                    value.clone()
                }
                (
                    FieldType::Boolean
                    | FieldType::Int
                    | FieldType::Long
                    | FieldType::Double
                    | FieldType::Currency
                    | FieldType::Percent,
                    _,
                ) => return Err(bad_type()),
                // A reference holds an id: 15 characters become 18, anything else is
                // refused as Salesforce refuses it.
                (FieldType::Reference, J::String(s)) => {
                    let ok =
                        matches!(s.len(), 15 | 18) && s.bytes().all(|b| b.is_ascii_alphanumeric());
                    match s.get(..15).filter(|_| ok) {
                        Some(id15) => J::String(crate::model::id::id18(id15)),
                        None => {
                            return Err(ApiError::field(
                                400,
                                "MALFORMED_ID",
                                format!("{}: id value of incorrect type: {s}", f.label),
                                &f.name,
                            ));
                        }
                    }
                }
                (_, J::String(s)) => {
                    if f.length > 0 && s.chars().count() as i64 > f.length {
                        return Err(ApiError::field(
                            400,
                            "STRING_TOO_LONG",
                            format!(
                                "{}: data value too large: {} (max length={})",
                                f.label,
                                s.chars().take(40).collect::<String>(),
                                f.length
                            ),
                            &f.name,
                        ));
                    }
                    value.clone()
                }
                _ => return Err(bad_type()),
            };
            out.insert(f.name.clone(), normalized);
        }
        Ok(out)
    }

    /// Whether [`Org::create`] would accept `input`, creating nothing: all-or-none batches
    /// check every record before writing any.
    pub fn check_create(&self, object: &str, input: &Map<String, J>) -> Result<(), ApiError> {
        let def = self.object(object)?;
        Self::validate_new(&def, input).map(|_| ())
    }

    /// Whether [`Org::update`] would accept `input` for the live record `id`, changing nothing.
    pub fn check_update(
        &self,
        object: &str,
        id: &str,
        input: &Map<String, J>,
    ) -> Result<(), ApiError> {
        let def = self.object(object)?;
        Self::validate(&def, input, false)?;
        self.get(object, id).map(|_| ())
    }

    /// Creates a record; returns its id.
    pub fn create(
        &self,
        object: &str,
        input: &Map<String, J>,
        origin: &str,
    ) -> Result<String, ApiError> {
        self.create_record(object, input, origin, true)
    }

    /// Creates a record without publishing its event (what precedes a GAP_CREATE).
    pub fn create_silently(
        &self,
        object: &str,
        input: &Map<String, J>,
    ) -> Result<String, ApiError> {
        self.create_record(object, input, "", false)
    }

    fn create_record(
        &self,
        object: &str,
        input: &Map<String, J>,
        origin: &str,
        emit: bool,
    ) -> Result<String, ApiError> {
        let def = self.object(object)?;
        let record = Self::validate_new(&def, input)?;
        let mut data = self.data();
        let now = self.now_ms();
        let (id, record) = self.insert_new(&mut data, &def, record, now);
        if !emit {
            return Ok(id);
        }
        self.publish(
            &mut data,
            &def,
            ChangeType::Create,
            vec![id.clone()],
            &record,
            Changes::default(),
            now,
            origin,
        )?;
        Ok(id)
    }

    /// Checks a new record's values and that the required ones are there.
    pub(super) fn validate_new(
        def: &ObjectDef,
        input: &Map<String, J>,
    ) -> Result<Record, ApiError> {
        let record = Self::validate(def, input, true)?;
        let mut missing: Vec<String> = def
            .describe
            .fields
            .iter()
            .filter(|f| {
                f.createable
                    && !f.nillable
                    && !f.defaulted_on_create
                    && f.kind() != FieldType::Boolean
                    && record.get(&f.name).is_none_or(|v| v.is_null())
            })
            .map(|f| f.name.clone())
            .collect();
        super::names::adjust_required(def, &record, &mut missing);
        if !missing.is_empty() {
            return Err(ApiError {
                status: 400,
                code: "REQUIRED_FIELD_MISSING",
                message: format!("Required fields are missing: [{}]", missing.join(", ")),
                fields: missing,
            });
        }
        Ok(record)
    }

    /// Gives a validated record its id and system fields and stores it.
    pub(super) fn insert_new(
        &self,
        data: &mut Data,
        def: &ObjectDef,
        mut record: Record,
        now: i64,
    ) -> (String, Record) {
        let stamp = format_datetime(now - now % 1000);
        let n = data.next_id;
        data.next_id += 1;
        let prefix = def.describe.key_prefix.as_deref().unwrap_or("a00");
        let id = new_id(prefix, n);
        for f in &def.describe.fields {
            let v = match f.name.as_str() {
                "Id" => J::String(id.clone()),
                "IsDeleted" => J::Bool(false),
                "CreatedDate" | "LastModifiedDate" | "SystemModstamp" => J::String(stamp.clone()),
                "CreatedById" | "LastModifiedById" | "OwnerId" if !record.contains_key(&f.name) => {
                    J::String(self.user_id.clone())
                }
                _ if record.contains_key(&f.name) => continue,
                _ if f.kind() == FieldType::Boolean && !f.nillable => J::Bool(false),
                _ => continue,
            };
            record.insert(f.name.clone(), v);
        }
        super::names::derive(def, &mut record);
        data.records
            .entry(def.describe.name.clone())
            .or_default()
            .insert(id.clone(), Arc::new(record.clone()));
        super::journal::touch(data, &def.describe.name, &id, None);
        (id, record)
    }

    /// Updates a record with the given values; publishes an UPDATE with what changed.
    pub fn update(
        &self,
        object: &str,
        id: &str,
        input: &Map<String, J>,
        origin: &str,
    ) -> Result<(), ApiError> {
        let def = self.object(object)?;
        let values = Self::validate(&def, input, false)?;
        let mut data = self.data();
        let now = self.now_ms();
        let stamp = format_datetime(now - now % 1000);
        let Some(record) = record_in(&mut data, object, id, false) else {
            return Err(missing(&data, object, id));
        };
        let mut changes = Changes::default();
        let mut diffs: HashMap<String, String> = HashMap::new();
        for (k, v) in values {
            let old = record.get(&k).cloned().unwrap_or(J::Null);
            if old != v {
                if v.is_null() {
                    changes.nulled.insert(k.clone());
                }
                if let (J::String(before), J::String(after)) = (&old, &v)
                    && is_long_text(&def, &k)
                    && let Some(d) = text_diff(before, after, DIFF_MIN_CHARS)
                {
                    changes.diff.insert(k.clone());
                    diffs.insert(k.clone(), d);
                }
                changes.changed.insert(k.clone());
                record.insert(k, v);
            }
        }
        changes.changed.extend(super::names::derive(&def, record));
        // Every update stamps LastModifiedDate and lists it as changed, even when the stamp
        // lands in the same second as the previous write.
        changes.changed.insert("LastModifiedDate".to_string());
        record.insert("LastModifiedDate".into(), J::String(stamp.clone()));
        record.insert("SystemModstamp".into(), J::String(stamp));
        if record.get("LastModifiedById") != Some(&J::String(self.user_id.clone())) {
            changes.changed.insert("LastModifiedById".to_string());
            record.insert("LastModifiedById".into(), J::String(self.user_id.clone()));
        }
        // The event body carries only changed fields (large texts as diffs); the rest is null.
        let body: Record = changes
            .changed
            .iter()
            .filter_map(|k| match diffs.remove(k) {
                Some(d) => Some((k.clone(), J::String(d))),
                None => record.get(k).map(|v| (k.clone(), v.clone())),
            })
            .collect();
        self.publish(
            &mut data,
            &def,
            ChangeType::Update,
            vec![id.to_string()],
            &body,
            changes,
            now,
            origin,
        )
    }

    /// Moves a record to the recycle bin; publishes a DELETE.
    pub fn delete(&self, object: &str, id: &str, origin: &str) -> Result<(), ApiError> {
        let def = self.object(object)?;
        let mut data = self.data();
        let now = self.now_ms();
        let stamp = format_datetime(now - now % 1000);
        let Some(record) = record_in(&mut data, object, id, false) else {
            return Err(missing(&data, object, id));
        };
        record.insert("IsDeleted".into(), J::Bool(true));
        record.insert("SystemModstamp".into(), J::String(stamp));
        self.publish(
            &mut data,
            &def,
            ChangeType::Delete,
            vec![id.to_string()],
            &Record::new(),
            Changes::default(),
            now,
            origin,
        )
    }

    /// Restores a record from the recycle bin; publishes an UNDELETE with all its fields.
    pub fn undelete(&self, object: &str, id: &str, origin: &str) -> Result<(), ApiError> {
        let def = self.object(object)?;
        let mut data = self.data();
        let now = self.now_ms();
        let stamp = format_datetime(now - now % 1000);
        let record = record_in(&mut data, object, id, true).ok_or_else(|| {
            ApiError::new(404, "UNDELETE_FAILED", "Entity is not in the recycle bin")
        })?;
        record.insert("IsDeleted".into(), J::Bool(false));
        record.insert("LastModifiedDate".into(), J::String(stamp.clone()));
        record.insert("SystemModstamp".into(), J::String(stamp));
        let body = record.clone();
        self.publish(
            &mut data,
            &def,
            ChangeType::Undelete,
            vec![id.to_string()],
            &body,
            Changes::default(),
            now,
            origin,
        )
    }

    /// A live (not deleted) record, its formula fields evaluated.
    pub fn get(&self, object: &str, id: &str) -> Result<Record, ApiError> {
        let def = self.object(object)?;
        let data = self.data();
        data.records
            .get(object)
            .and_then(|r| r.get(id))
            .filter(|r| !is_deleted(r))
            .map(|r| Record::clone(&self.with_formulas(&data, &def, r)))
            .ok_or_else(|| missing(&data, object, id))
    }

    /// Every live record of `object`, in id order.
    pub fn records(&self, object: &str) -> Vec<Record> {
        self.scan(object, false, |r| Some(Record::clone(r)))
    }

    /// Visits the records of `object` in id order under the org's lock (recycle bin included
    /// when `deleted`), keeping what `f` returns. Records are handed over shared: a query
    /// clones only what it selects, and a Bulk job keeps the `Arc`s themselves (a record is
    /// copied only if it changes while the job still holds it). An object with formula fields
    /// hands over copies with the formulas evaluated at this instant.
    pub fn scan<T>(
        &self,
        object: &str,
        deleted: bool,
        mut f: impl FnMut(&Arc<Record>) -> Option<T>,
    ) -> Vec<T> {
        let Ok(def) = self.object(object) else {
            return Vec::new();
        };
        let data = self.data();
        let Some(records) = data.records.get(object) else {
            return Vec::new();
        };
        records
            .values()
            .filter(|r| deleted || !is_deleted(r))
            .filter_map(|r| f(&self.with_formulas(&data, &def, r)))
            .collect()
    }

    /// Every record of `object`, those in the recycle bin (`IsDeleted: true`) included, in id
    /// order: what `queryAll` sees.
    pub fn all_records(&self, object: &str) -> Vec<Record> {
        self.scan(object, true, |r| Some(Record::clone(r)))
    }

    /// Sets the same values on several records in one transaction: records whose changes are
    /// identical share one event with several `recordIds`, as Salesforce does.
    pub fn mass_update(
        &self,
        object: &str,
        ids: &[String],
        input: &Map<String, J>,
        origin: &str,
    ) -> Result<(), ApiError> {
        let def = self.object(object)?;
        let values = Self::validate(&def, input, false)?;
        let mut data = self.data();
        let now = self.now_ms();
        let stamp = format_datetime(now - now % 1000);
        type Group = (Vec<String>, Record, HashSet<String>);
        let mut groups: BTreeMap<Vec<String>, Group> = BTreeMap::new();
        for id in ids {
            let Some(record) = record_in(&mut data, object, id, false) else {
                return Err(ApiError::new(
                    404,
                    "NOT_FOUND",
                    format!("no live record {id}"),
                ));
            };
            let mut c = set_values(&def, record, &values);
            let body = stamp_update(record, &mut c, &stamp);
            let mut key: Vec<String> = c.changed.iter().cloned().collect();
            key.sort();
            groups
                .entry(key)
                .or_insert_with(|| (Vec::new(), body, c.nulled))
                .0
                .push(id.clone());
        }
        for (changed, (record_ids, body, nulled)) in groups {
            let changed: HashSet<String> = changed.into_iter().collect();
            self.publish(
                &mut data,
                &def,
                ChangeType::Update,
                record_ids,
                &body,
                Changes {
                    changed,
                    nulled,
                    ..Default::default()
                },
                now,
                origin,
            )?;
        }
        Ok(())
    }

    /// Changes records without an event (as database jobs do), then publishes the gap event
    /// Salesforce sends instead: `GAP_CREATE`, `GAP_UPDATE`, `GAP_DELETE`, `GAP_UNDELETE`, or
    /// `GAP_OVERFLOW` (the placeholder id, whatever `ids` says). `ids` may be a wildcard like
    /// `001*`.
    pub fn gap(
        &self,
        object: &str,
        change_type: ChangeType,
        ids: &[String],
        silent_changes: Option<&Map<String, J>>,
    ) -> Result<(), ApiError> {
        let def = self.object(object)?;
        let values = match silent_changes {
            Some(v) => Some(Self::validate(&def, v, false)?),
            None => None,
        };
        let mut data = self.data();
        let now = self.now_ms();
        let stamp = format_datetime(now - now % 1000);
        for id in ids.iter().filter(|i| !i.ends_with('*')) {
            if let Some(record) = data
                .records
                .get_mut(object)
                .and_then(|r| r.get_mut(id))
                .map(Arc::make_mut)
            {
                for (k, v) in values.iter().flatten() {
                    record.insert(k.clone(), v.clone());
                }
                super::names::derive(&def, record);
                match change_type {
                    ChangeType::GapDelete => {
                        record.insert("IsDeleted".into(), J::Bool(true));
                    }
                    ChangeType::GapUndelete => {
                        record.insert("IsDeleted".into(), J::Bool(false));
                    }
                    _ => {}
                }
                record.insert("LastModifiedDate".into(), J::String(stamp.clone()));
                record.insert("SystemModstamp".into(), J::String(stamp.clone()));
            }
        }
        let record_ids = if change_type == ChangeType::GapOverflow {
            vec![super::OVERFLOW_RECORD_ID.to_string()]
        } else {
            ids.to_vec()
        };
        self.publish(
            &mut data,
            &def,
            change_type,
            record_ids,
            &Record::new(),
            Changes::default(),
            now,
            "",
        )
    }
}
