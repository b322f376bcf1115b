//! The emulator's org: objects (from describes), records, users and tokens, and the clock.
//! It is the one source of truth that REST, queries, Bulk jobs, the control API and Pub/Sub
//! read and change. It must not speak HTTP or gRPC: those sides turn [`ApiError`]s and
//! records into their wire forms.
//!
//! # Invariant
//!
//! Every mutation validates like Salesforce (unknown field, read-only field, type, length,
//! required), stamps the system fields, and publishes the change event Salesforce would,
//! under the same lock, so the bus order is the commit order.
//!
//! # Layout
//!
//! [`Org`] and the types every part shares are here, with the clock, the API call count and
//! the fault switches of the control API. Its methods are spread by concern:
//! - `schema`: objects, describes, change event schemas, platform event types, channels, and
//!   fields added or removed;
//! - `records`: validation and record CRUD, the recycle bin, gap changes, reads;
//! - `formulas`: formula fields, evaluated on every read;
//! - `deliveries`: events delivered to subscribers, against the delivery allocation;
//! - `names`: person names derived from their parts, and person accounts;
//! - `events`: change capture, one change to one encoded event on the bus, and platform
//!   event publishing;
//! - `transaction`: large transactions and the overflow rule;
//! - `journal`: all-or-none requests, undone with their events dropped when they fail;
//! - `tokens`: issued access tokens;
//! - `ids`: the ids the org hands out.

mod deliveries;
mod events;
mod formulas;
mod ids;
mod journal;
mod names;
mod records;
mod schema;
mod tokens;
mod transaction;

use super::bus::Bus;
use super::cdc::CdcSchema;
use super::platform::{EventType, is_event_type};
use crate::model::ObjectDescribe;
use serde_json::{Map, Value as J};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// The 18-character id form, from [`crate::model::id`]; also reachable here, where it used to
/// live.
pub use crate::model::id::id18;
pub use deliveries::{DEFAULT_DAILY_DELIVERIES, DeliveryUsage, MONTHLY_ENTITLEMENT};
pub use formulas::{FormulaField, UnsupportedFormula};
pub use ids::new_id;
pub use names::{PERSON_ACCOUNT_RECORD_TYPE, person_name};
pub use schema::{ALL_CHANGES_CHANNEL, object_channel};
pub use tokens::TokenInfo;
pub use transaction::{DEFAULT_OVERFLOW_THRESHOLD, TxnReport, TxnStep};

/// The one record id a real org puts in a `GAP_OVERFLOW` header: an all-zero placeholder
/// naming no record (the event stands for every record the transaction touched).
pub const OVERFLOW_RECORD_ID: &str = "000000000000000AAA";

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
    /// Formula fields, evaluated whenever a record is read.
    pub formulas: Vec<FormulaField>,
    /// The id of the person-account record type (developer name `PersonAccount`), on an
    /// Account describe that has one.
    pub person_record_type: Option<String>,
}

/// A record: field values in REST JSON form.
pub type Record = Map<String, J>;

#[derive(Default)]
struct Data {
    /// Records are shared with query results and Bulk jobs, which hold them as they were
    /// when read; a change copies a record only while such a reader still holds it.
    records: HashMap<String, BTreeMap<String, Arc<Record>>>,
    next_id: u64,
    commit_number: i64,
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
    /// Events delivered to subscribers, by minute, and the enforced allocation.
    deliveries: Mutex<deliveries::Deliveries>,
    /// Formula fields that read as null because the emulator cannot evaluate them.
    unsupported_formulas: RwLock<Vec<UnsupportedFormula>>,
    tokens: RwLock<HashMap<String, TokenInfo>>,
    clock_offset_ms: AtomicI64,
    api_calls: AtomicI64,
    pub api_limit: i64,
}

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

impl Org {
    /// Builds an org from describes. Every object gets its own channel plus the all-changes
    /// one, and the custom channels (`/data/<Name>__chn`) that list it; `__e` describes are
    /// platform event types with their own `/event/<Name>__e` channel.
    pub fn new(definition: OrgDefinition) -> Result<Org, String> {
        let mut objects = HashMap::new();
        let mut schemas = HashMap::new();
        let mut event_types = HashMap::new();
        let mut unsupported = Vec::new();
        let mut channels = vec![ALL_CHANGES_CHANNEL.to_string()];
        for custom in &definition.channels {
            if !schema::is_custom_channel_name(&custom.name) {
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
            let (formulas, cannot) = formulas::formula_fields(&describe, &raw);
            let person_record_type = names::person_record_type(&raw);
            unsupported.extend(cannot);
            objects.insert(
                describe.name.clone(),
                Arc::new(ObjectDef {
                    describe,
                    raw,
                    schema,
                    channels: object_channels,
                    formulas,
                    person_record_type,
                }),
            );
        }
        let org_id = id18("00D5g000004SfMx");
        let org = Org {
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
            deliveries: Mutex::new(Default::default()),
            unsupported_formulas: RwLock::new(Vec::new()),
            tokens: RwLock::new(HashMap::new()),
            clock_offset_ms: AtomicI64::new(0),
            api_calls: AtomicI64::new(0),
            api_limit: 15_000,
        };
        unsupported.sort_by(|a, b| (&a.object, &a.field).cmp(&(&b.object, &b.field)));
        org.note_unsupported(unsupported);
        Ok(org)
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

    fn data(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Empties the org: no records, no stored events, fresh limits and delivery counts
    /// (control API reset).
    /// Objects, schemas and tokens stay.
    pub fn reset(&self) {
        let mut data = self.data();
        data.records.clear();
        self.bus.clear();
        self.corrupt_remaining.store(0, Ordering::Relaxed);
        self.refuse_until_ms.store(0, Ordering::Relaxed);
        self.api_calls.store(0, Ordering::Relaxed);
        self.reset_deliveries();
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
}
