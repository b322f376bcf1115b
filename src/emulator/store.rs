//! The emulator's org: objects (from describes), records, users and tokens, and the clock.
//!
//! Every mutation validates like Salesforce (unknown field, read-only field, type, length,
//! required), stamps the system fields, and publishes the change event Salesforce would,
//! under the same lock, so the bus order is the commit order.

use super::bus::Bus;
use super::cdc::{CdcSchema, HeaderInfo, encode};
use super::diff::text_diff;
use super::platform::{EventType, is_event_type};
/// The 18-character id form, from [`crate::model::id`]; also reachable here, where it used to
/// live.
pub use crate::model::id::id18;
use crate::model::time::{date_ms, datetime_ms, format_datetime, time_ms};
use crate::model::{ChangeType, FieldType, ObjectDescribe};
use serde_json::{Map, Value as J};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// An error as Salesforce's REST API reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub fields: Vec<String>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: Vec::new(),
        }
    }

    fn field(status: u16, code: &'static str, message: String, field: &str) -> ApiError {
        ApiError {
            status,
            code,
            message,
            fields: vec![field.to_string()],
        }
    }
}

/// One object of the org.
pub struct ObjectDef {
    pub describe: ObjectDescribe,
    /// The describe exactly as loaded, served by `/describe`.
    pub raw: J,
    pub schema: Arc<CdcSchema>,
    /// Channels that carry this object's events.
    pub channels: Vec<String>,
}

/// A record: field values in REST JSON form.
pub type Record = Map<String, J>;

/// The record `id` of `object` if its recycle-bin state is `deleted`.
fn record_in<'a>(
    data: &'a mut Data,
    object: &str,
    id: &str,
    deleted: bool,
) -> Option<&'a mut Record> {
    data.records
        .get_mut(object)
        .and_then(|r| r.get_mut(id))
        .filter(|r| is_deleted(r) == deleted)
        .map(Arc::make_mut)
}

/// Sets `values` on `record`; returns the fields whose value changed (and those now null).
fn set_values(record: &mut Record, values: &Record) -> Changes {
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
    c
}

/// Stamps an updated record (`LastModifiedDate`, which every UPDATE lists as changed, and
/// `SystemModstamp`) and returns the event body: the changed fields' new values.
fn stamp_update(record: &mut Record, changes: &mut Changes, stamp: &str) -> Record {
    changes.changed.insert("LastModifiedDate".to_string());
    record.insert("LastModifiedDate".into(), J::String(stamp.to_string()));
    record.insert("SystemModstamp".into(), J::String(stamp.to_string()));
    changes
        .changed
        .iter()
        .filter_map(|k| record.get(k).map(|v| (k.clone(), v.clone())))
        .collect()
}

/// Is the record in the recycle bin?
fn is_deleted(record: &Record) -> bool {
    record.get("IsDeleted") == Some(&J::Bool(true))
}

/// The field lists of one change.
#[derive(Default)]
struct Changes {
    changed: HashSet<String>,
    nulled: HashSet<String>,
    /// Long text fields whose value in the body is a unified diff.
    diff: HashSet<String>,
}

#[derive(Default)]
struct Data {
    /// Records are shared with query results and Bulk jobs, which hold them as they were
    /// when read; a change copies a record only while such a reader still holds it.
    records: HashMap<String, BTreeMap<String, Arc<Record>>>,
    next_id: u64,
    commit_number: i64,
}

/// An issued access token.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub expires_ms: Option<i64>,
}

pub struct Org {
    pub org_id: String,
    pub user_id: String,
    pub username: String,
    /// Objects by API name; replaced whole when a field is added.
    objects: RwLock<HashMap<String, Arc<ObjectDef>>>,
    /// Every schema ever published, so events in the log stay decodable after a change.
    schemas: RwLock<HashMap<String, Arc<CdcSchema>>>,
    /// Platform event types by channel.
    event_types: HashMap<String, Arc<EventType>>,
    /// Changes in one transaction above which the rest produce GAP_OVERFLOW events.
    overflow_threshold: AtomicUsize,
    pub bus: Bus,
    /// Payloads still to corrupt (control API), to exercise dead-lettering.
    corrupt_remaining: AtomicU32,
    /// Wall-clock ms until which Pub/Sub refuses service (control API).
    refuse_until_ms: AtomicI64,
    data: Mutex<Data>,
    tokens: RwLock<HashMap<String, TokenInfo>>,
    clock_offset_ms: AtomicI64,
    api_calls: AtomicI64,
    pub api_limit: i64,
}

/// The channel of one object: `/data/AccountChangeEvent`, `/data/Invoice__ChangeEvent`.
pub fn object_channel(object: &str) -> String {
    match object.strip_suffix("__c") {
        Some(base) => format!("/data/{base}__ChangeEvent"),
        None => format!("/data/{object}ChangeEvent"),
    }
}

pub const ALL_CHANGES_CHANNEL: &str = "/data/ChangeEvents";

/// Salesforce's limit of changes in one transaction that still get change events.
pub const DEFAULT_OVERFLOW_THRESHOLD: usize = 100_000;

/// Text fields of at least this many characters may be sent as a diff.
const DIFF_MIN_CHARS: usize = 1000;

/// What an org is made of: object describes and custom channels.
#[derive(Debug, Clone, Default)]
pub struct OrgDefinition {
    pub describes: Vec<(ObjectDescribe, J)>,
    pub channels: Vec<CustomChannel>,
}

/// A custom change event channel (`PlatformEventChannel` with its members).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CustomChannel {
    pub name: String,
    pub members: Vec<String>,
}

/// Large text fields, whose updates Salesforce may send as diffs.
fn is_long_text(def: &ObjectDef, field: &str) -> bool {
    def.describe
        .field(field)
        .is_some_and(|f| f.kind() == FieldType::Textarea && f.length > 255)
}

fn is_custom_channel_name(name: &str) -> bool {
    name.strip_prefix("/data/")
        .and_then(|n| n.strip_suffix("__chn"))
        .is_some_and(|n| {
            n.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

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

/// The transaction an event belongs to: its key and the event's place in it.
struct Txn<'a> {
    key: &'a str,
    sequence: i32,
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A 15-character id: key prefix, a fixed pod part, and `n` in base 62.
fn id15(prefix: &str, n: u64) -> String {
    let mut digits = [b'0'; 10];
    let mut v = n;
    for d in digits.iter_mut().rev() {
        *d = BASE62[(v % 62) as usize];
        v /= 62;
    }
    format!(
        "{prefix}5g{}",
        std::str::from_utf8(&digits).unwrap_or("0000000000")
    )
}

impl Org {
    /// Builds an org from describes. Every object gets its own channel plus the all-changes
    /// one, and the custom channels (`/data/<Name>__chn`) that list it; `__e` describes are
    /// platform event types with their own `/event/<Name>__e` channel.
    pub fn new(definition: OrgDefinition) -> Result<Org, String> {
        let mut objects = HashMap::new();
        let mut schemas = HashMap::new();
        let mut event_types = HashMap::new();
        let mut channels = vec![ALL_CHANGES_CHANNEL.to_string()];
        for custom in &definition.channels {
            if !is_custom_channel_name(&custom.name) {
                return Err(format!(
                    "custom channel {:?}: the name must look like /data/<Name>__chn",
                    custom.name
                ));
            }
            for member in &custom.members {
                if !definition.describes.iter().any(|(d, _)| &d.name == member) {
                    return Err(format!(
                        "custom channel {}: member {member:?} is not an object of the org",
                        custom.name
                    ));
                }
            }
            channels.push(custom.name.clone());
        }
        for (describe, raw) in definition.describes {
            if is_event_type(&describe) {
                let t = EventType::build(&describe)?;
                channels.push(t.channel.clone());
                event_types.insert(t.channel.clone(), Arc::new(t));
                continue;
            }
            let schema = Arc::new(CdcSchema::build(&describe)?);
            schemas.insert(schema.schema_id.clone(), schema.clone());
            let channel = object_channel(&describe.name);
            channels.push(channel.clone());
            let mut object_channels = vec![ALL_CHANGES_CHANNEL.to_string(), channel];
            object_channels.extend(
                definition
                    .channels
                    .iter()
                    .filter(|c| c.members.contains(&describe.name))
                    .map(|c| c.name.clone()),
            );
            objects.insert(
                describe.name.clone(),
                Arc::new(ObjectDef {
                    describe,
                    raw,
                    schema,
                    channels: object_channels,
                }),
            );
        }
        let org_id = id18("00D5g000004SfMx");
        Ok(Org {
            org_id,
            user_id: id18("0055g00000AbCdE"),
            username: "admin@sfmirror.emulator".to_string(),
            objects: RwLock::new(objects),
            schemas: RwLock::new(schemas),
            event_types,
            overflow_threshold: AtomicUsize::new(DEFAULT_OVERFLOW_THRESHOLD),
            bus: Bus::new(channels),
            corrupt_remaining: AtomicU32::new(0),
            refuse_until_ms: AtomicI64::new(0),
            data: Mutex::new(Data {
                next_id: 1,
                commit_number: 10_000_000_000,
                ..Default::default()
            }),
            tokens: RwLock::new(HashMap::new()),
            clock_offset_ms: AtomicI64::new(0),
            api_calls: AtomicI64::new(0),
            api_limit: 15_000,
        })
    }

    /// The emulator clock: real time plus what the control API advanced it by.
    pub fn now_ms(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() + self.clock_offset_ms.load(Ordering::Relaxed)
    }

    pub fn advance_clock(&self, ms: i64) {
        self.clock_offset_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Counts one API call; returns (used, max) for `Sforce-Limit-Info`.
    pub fn count_api_call(&self) -> (i64, i64) {
        (
            self.api_calls.fetch_add(1, Ordering::Relaxed) + 1,
            self.api_limit,
        )
    }

    /// API calls counted so far and the daily maximum, without counting one.
    pub fn api_usage(&self) -> (i64, i64) {
        (self.api_calls.load(Ordering::Relaxed), self.api_limit)
    }

    pub fn issue_token(&self, ttl_ms: Option<i64>) -> String {
        let token = format!("{}!{}", &self.org_id[..15], uuid::Uuid::new_v4().simple());
        self.register_token(&token, ttl_ms);
        token
    }

    pub fn register_token(&self, token: &str, ttl_ms: Option<i64>) {
        let expires_ms = ttl_ms.map(|t| self.now_ms() + t);
        if let Ok(mut t) = self.tokens.write() {
            t.insert(token.to_string(), TokenInfo { expires_ms });
        }
    }

    pub fn token_valid(&self, token: &str) -> bool {
        let now = self.now_ms();
        self.tokens
            .read()
            .ok()
            .and_then(|t| t.get(token).cloned())
            .is_some_and(|info| info.expires_ms.is_none_or(|e| e > now))
    }

    /// Tokens issued (or registered) since the last expiry: logins, for tests to count.
    pub fn token_count(&self) -> usize {
        self.tokens.read().map(|t| t.len()).unwrap_or(0)
    }

    /// Makes every issued token invalid (the control API's "expire tokens").
    pub fn expire_tokens(&self) {
        if let Ok(mut t) = self.tokens.write() {
            t.clear();
        }
    }

    /// Object names, sorted.
    pub fn object_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .objects
            .read()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    pub fn object(&self, name: &str) -> Result<Arc<ObjectDef>, ApiError> {
        let found = self.objects.read().ok().and_then(|o| o.get(name).cloned());
        found.ok_or_else(|| {
            ApiError::new(
                404,
                "NOT_FOUND",
                format!(
                    "The requested resource does not exist: sObject type '{name}' is not supported."
                ),
            )
        })
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks and normalizes client-supplied values.
    fn validate(
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
            let allowed = if creating { f.createable } else { f.updateable };
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
    fn validate_new(def: &ObjectDef, input: &Map<String, J>) -> Result<Record, ApiError> {
        let record = Self::validate(def, input, true)?;
        let missing: Vec<String> = def
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
    fn insert_new(
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
        let id = id18(&id15(prefix, n));
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
        data.records
            .entry(def.describe.name.clone())
            .or_default()
            .insert(id.clone(), Arc::new(record.clone()));
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
        let record = record_in(&mut data, object, id, false).ok_or_else(|| {
            ApiError::new(404, "NOT_FOUND", "The requested resource does not exist")
        })?;
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
        let record = record_in(&mut data, object, id, false)
            .ok_or_else(|| ApiError::new(404, "ENTITY_IS_DELETED", "entity is deleted"))?;
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

    /// A live (not deleted) record.
    pub fn get(&self, object: &str, id: &str) -> Result<Record, ApiError> {
        self.object(object)?;
        self.data()
            .records
            .get(object)
            .and_then(|r| r.get(id))
            .filter(|r| !is_deleted(r))
            .map(|r| Record::clone(r))
            .ok_or_else(|| ApiError::new(404, "NOT_FOUND", "The requested resource does not exist"))
    }

    /// Every live record of `object`, in id order.
    pub fn records(&self, object: &str) -> Vec<Record> {
        self.scan(object, false, |r| Some(Record::clone(r)))
    }

    /// Visits the records of `object` in id order under the org's lock (recycle bin included
    /// when `deleted`), keeping what `f` returns. Records are handed over shared: a query
    /// clones only what it selects, and a Bulk job keeps the `Arc`s themselves (a record is
    /// copied only if it changes while the job still holds it).
    pub fn scan<T>(
        &self,
        object: &str,
        deleted: bool,
        f: impl FnMut(&Arc<Record>) -> Option<T>,
    ) -> Vec<T> {
        let data = self.data();
        let Some(records) = data.records.get(object) else {
            return Vec::new();
        };
        records
            .values()
            .filter(|r| deleted || !is_deleted(r))
            .filter_map(f)
            .collect()
    }

    /// Every record of `object`, those in the recycle bin (`IsDeleted: true`) included, in id
    /// order: what `queryAll` sees.
    pub fn all_records(&self, object: &str) -> Vec<Record> {
        self.scan(object, true, |r| Some(Record::clone(r)))
    }

    /// Publishes one event that is its own transaction.
    #[allow(clippy::too_many_arguments)]
    fn publish(
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
    fn publish_in(
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
        self.bus
            .publish(&def.channels, &def.schema.schema_id, payload, now);
        Ok(())
    }

    /// The schema JSON for a schema id, current or past.
    pub fn schema_json(&self, schema_id: &str) -> Option<String> {
        let cdc = self
            .schemas
            .read()
            .ok()
            .and_then(|s| s.get(schema_id).map(|s| s.json.clone()));
        cdc.or_else(|| {
            self.event_types
                .values()
                .find(|t| t.schema_id == schema_id)
                .map(|t| t.json.clone())
        })
    }

    /// The platform event type published on `channel`, if it is an `/event/` channel.
    pub fn event_type(&self, channel: &str) -> Option<Arc<EventType>> {
        self.event_types.get(channel).cloned()
    }

    /// Platform event types, by channel.
    pub fn event_channels(&self) -> Vec<String> {
        let mut c: Vec<String> = self.event_types.keys().cloned().collect();
        c.sort();
        c
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
                        let mut c = set_values(record, &values);
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
                Vec::new(),
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

    /// Empties the org: no records, no stored events, fresh limits (control API reset).
    /// Objects, schemas and tokens stay.
    pub fn reset(&self) {
        let mut data = self.data();
        data.records.clear();
        self.bus.clear();
        self.corrupt_remaining.store(0, Ordering::Relaxed);
        self.refuse_until_ms.store(0, Ordering::Relaxed);
        self.api_calls.store(0, Ordering::Relaxed);
    }

    /// The current schema id of the object whose own channel is `channel`.
    pub fn channel_schema_id(&self, channel: &str) -> Option<String> {
        self.objects.read().ok().and_then(|o| {
            o.values()
                .find(|d| d.channels.get(1).is_some_and(|c| c == channel))
                .map(|d| d.schema.schema_id.clone())
        })
    }

    /// Corrupts the next `n` published payloads.
    pub fn corrupt_next(&self, n: u32) {
        self.corrupt_remaining.store(n, Ordering::Relaxed);
    }

    /// Pub/Sub refuses service (UNAVAILABLE) for `ms` of wall-clock time.
    pub fn refuse_for(&self, ms: i64) {
        self.refuse_until_ms.store(
            chrono::Utc::now().timestamp_millis() + ms,
            Ordering::Relaxed,
        );
    }

    pub fn refusing(&self) -> bool {
        chrono::Utc::now().timestamp_millis() < self.refuse_until_ms.load(Ordering::Relaxed)
    }

    /// Deletes a field from `object`, as an admin deleting a custom field does: describe no
    /// longer lists it, its values are gone from every record, and change events from now on
    /// use a new schema without it. Events already in the log keep their schema, and with it
    /// the field. A compound field's components go with it. Returns the new schema id.
    pub fn remove_field(&self, object: &str, name: &str) -> Result<String, ApiError> {
        let def = self.object(object)?;
        let Some(field) = def.describe.field(name) else {
            return Err(ApiError::new(
                404,
                "INVALID_FIELD",
                format!("{object} has no field {name}"),
            ));
        };
        if field.name == "Id" || !field.custom {
            return Err(ApiError::new(
                400,
                "CANNOT_DELETE_FIELD",
                format!("{object}.{name} is a standard field; only custom fields can be deleted"),
            ));
        }
        let gone: HashSet<String> = def
            .describe
            .fields
            .iter()
            .filter(|f| f.name == name || f.compound_field_name.as_deref() == Some(name))
            .map(|f| f.name.clone())
            .collect();
        let mut describe = def.describe.clone();
        describe.fields.retain(|f| !gone.contains(&f.name));
        let mut raw = def.raw.clone();
        if let Some(fields) = raw.get_mut("fields").and_then(J::as_array_mut) {
            fields.retain(|f| {
                f.get("name")
                    .and_then(J::as_str)
                    .is_none_or(|n| !gone.contains(n))
            });
        }
        let schema_id = self.install(object, &def, describe, raw)?;
        if let Ok(mut data) = self.data.lock()
            && let Some(records) = data.records.get_mut(object)
        {
            for record in records.values_mut() {
                if gone.iter().any(|g| record.contains_key(g)) {
                    let r = Arc::make_mut(record);
                    for g in &gone {
                        r.remove(g);
                    }
                }
            }
        }
        Ok(schema_id)
    }

    /// Adds a field (a describe field object) to `object`: new describe, new schema id. As in
    /// Salesforce, a checkbox is never empty: existing records take its default (`defaultValue`,
    /// else false) at once, without a change event or a new `SystemModstamp`.
    pub fn add_field(&self, object: &str, field: J) -> Result<String, ApiError> {
        let def = self.object(object)?;
        let parsed: crate::model::FieldDescribe =
            serde_json::from_value(field.clone()).map_err(|e| {
                ApiError::new(
                    400,
                    "JSON_PARSER_ERROR",
                    format!("not a describe field: {e}"),
                )
            })?;
        if def.describe.field(&parsed.name).is_some() {
            return Err(ApiError::new(
                400,
                "DUPLICATE_DEVELOPER_NAME",
                format!("{object} already has a field {}", parsed.name),
            ));
        }
        let checkbox_default = (parsed.field_type == "boolean").then(|| {
            field
                .get("defaultValue")
                .and_then(J::as_bool)
                .unwrap_or(false)
        });
        let name = parsed.name.clone();
        let mut describe = def.describe.clone();
        describe.fields.push(parsed);
        let mut raw = def.raw.clone();
        if let Some(fields) = raw.get_mut("fields").and_then(J::as_array_mut) {
            fields.push(field);
        }
        let schema_id = self.install(object, &def, describe, raw)?;
        if let Some(default) = checkbox_default
            && let Ok(mut data) = self.data.lock()
            && let Some(records) = data.records.get_mut(object)
        {
            for record in records.values_mut() {
                Arc::make_mut(record).insert(name.clone(), J::Bool(default));
            }
        }
        Ok(schema_id)
    }

    /// Puts a changed describe of `object` in place, with the change event schema it gives
    /// (published under its own id, beside the old ones that stored events still name).
    /// Nothing changes if that schema cannot be built. Returns the new schema id.
    fn install(
        &self,
        object: &str,
        def: &ObjectDef,
        describe: ObjectDescribe,
        raw: J,
    ) -> Result<String, ApiError> {
        let schema = Arc::new(
            CdcSchema::build(&describe).map_err(|m| ApiError::new(400, "INVALID_FIELD", m))?,
        );
        let schema_id = schema.schema_id.clone();
        if let Ok(mut s) = self.schemas.write() {
            s.insert(schema_id.clone(), schema.clone());
        }
        let updated = Arc::new(ObjectDef {
            describe,
            raw,
            schema,
            channels: def.channels.clone(),
        });
        if let Ok(mut o) = self.objects.write() {
            o.insert(object.to_string(), updated);
        }
        Ok(schema_id)
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
            let mut c = set_values(record, &values);
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
    /// `GAP_OVERFLOW` (no ids). `ids` may be a wildcard like `001*`.
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
            Vec::new()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_a_correct_checksum() {
        // A published example: 001A0000006Vm9r -> 001A0000006Vm9rIAC.
        assert_eq!(id18("001A0000006Vm9r"), "001A0000006Vm9rIAC");
        let id = id18(&id15("001", 12345));
        assert_eq!(id.len(), 18);
        assert!(id.starts_with("001"));
    }
}
