//! Plain data shared by the source, the sink and the emulator: object and field metadata in the
//! shape Salesforce's `describe` returns, change types, decoded change events and replay ids.
//!
//! Nothing here does I/O. Keeping these types free of gRPC, HTTP and Postgres is what lets
//! `replica` consume what `salesforce` produces without either importing the other.

pub mod bitmap;
pub mod id;
pub mod textdiff;
pub mod time;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;

/// One object's metadata, deserialized from a `/sobjects/{Object}/describe` response. Unknown
/// keys are ignored, so a describe captured from any org and API version loads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectDescribe {
    pub name: String,
    #[serde(default)]
    pub key_prefix: Option<String>,
    #[serde(default)]
    pub custom: bool,
    #[serde(default)]
    pub label: String,
    pub fields: Vec<FieldDescribe>,
}

/// Fields whose value Salesforce derives from other records or the viewing user and never
/// sends in change events ("Change Event Fields" in the object reference names LastActivityDate
/// and PhotoUrl as examples; the last viewed/referenced dates are per-user). The emulator leaves
/// them out of events and the replica re-reads them like formulas.
pub const DERIVED_FIELDS_NOT_IN_CHANGE_EVENTS: &[&str] = &[
    "LastActivityDate",
    "LastViewedDate",
    "LastReferencedDate",
    "PhotoUrl",
];

/// One field of a describe response (the keys sfmirror and the emulator use).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldDescribe {
    pub name: String,
    #[serde(rename = "type")]
    pub field_type: String,
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub length: i64,
    #[serde(default)]
    pub precision: i64,
    #[serde(default)]
    pub scale: i64,
    #[serde(default)]
    pub digits: i64,
    #[serde(default)]
    pub nillable: bool,
    #[serde(default)]
    pub calculated: bool,
    /// The formula of a formula field; absent for roll-up summary fields, which are also
    /// `calculated` but are stored and sent in change events like ordinary fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calculated_formula: Option<String>,
    #[serde(default)]
    pub compound_field_name: Option<String>,
    #[serde(default)]
    pub createable: bool,
    #[serde(default)]
    pub updateable: bool,
    #[serde(default)]
    pub defaulted_on_create: bool,
    #[serde(default)]
    pub custom: bool,
    #[serde(default)]
    pub reference_to: Vec<String>,
}

impl FieldDescribe {
    /// The field's type as sfmirror understands it.
    pub fn kind(&self) -> FieldType {
        FieldType::from_describe(&self.field_type)
    }

    /// A formula field: calculated from a formula (a roll-up summary is calculated without one).
    pub fn is_formula(&self) -> bool {
        self.calculated
            && self
                .calculated_formula
                .as_deref()
                .is_some_and(|f| !f.trim().is_empty())
    }

    /// A field whose value change events never carry: formulas, and the fields Salesforce
    /// documents as derived from other records ([`DERIVED_FIELDS_NOT_IN_CHANGE_EVENTS`]).
    pub fn is_derived(&self) -> bool {
        self.is_formula() || DERIVED_FIELDS_NOT_IN_CHANGE_EVENTS.contains(&self.name.as_str())
    }
}

/// Salesforce field types, as `describe` names them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FieldType {
    Id,
    Reference,
    String,
    Picklist,
    Multipicklist,
    Combobox,
    Textarea,
    Phone,
    Url,
    Email,
    EncryptedString,
    Boolean,
    Int,
    Long,
    Double,
    Currency,
    Percent,
    Date,
    Datetime,
    Time,
    Base64,
    Address,
    Location,
    /// Any type sfmirror has no special handling for; replicated as text.
    Other(String),
}

impl FieldType {
    pub fn from_describe(name: &str) -> FieldType {
        match name {
            "id" => FieldType::Id,
            "reference" => FieldType::Reference,
            "string" => FieldType::String,
            "picklist" => FieldType::Picklist,
            "multipicklist" => FieldType::Multipicklist,
            "combobox" => FieldType::Combobox,
            "textarea" => FieldType::Textarea,
            "phone" => FieldType::Phone,
            "url" => FieldType::Url,
            "email" => FieldType::Email,
            "encryptedstring" => FieldType::EncryptedString,
            "boolean" => FieldType::Boolean,
            "int" => FieldType::Int,
            "long" => FieldType::Long,
            "double" => FieldType::Double,
            "currency" => FieldType::Currency,
            "percent" => FieldType::Percent,
            "date" => FieldType::Date,
            "datetime" => FieldType::Datetime,
            "time" => FieldType::Time,
            "base64" => FieldType::Base64,
            "address" => FieldType::Address,
            "location" => FieldType::Location,
            other => FieldType::Other(other.to_string()),
        }
    }

    /// Compound parents (addresses, geolocations) have no value of their own: their components
    /// are separate fields.
    pub fn is_compound(&self) -> bool {
        matches!(self, FieldType::Address | FieldType::Location)
    }
}

impl ObjectDescribe {
    pub fn field(&self, name: &str) -> Option<&FieldDescribe> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Whether `field` is a compound parent: typed address/location, or named by another
    /// field's `compoundFieldName` (a person `Name` is typed `string` but is such a parent).
    pub fn is_compound_parent(&self, field: &FieldDescribe) -> bool {
        field.kind().is_compound()
            || self.fields.iter().any(|f| {
                f.name != field.name && f.compound_field_name.as_deref() == Some(&field.name)
            })
    }

    /// Whether `field` is a person-name compound `Name` (Contact, Lead, User, person accounts):
    /// named by its components' `compoundFieldName` and holding a value of its own, which the
    /// replica keeps in a `name` column beside the components.
    pub fn is_person_name(&self, field: &FieldDescribe) -> bool {
        field.name == "Name" && !field.kind().is_compound() && self.is_compound_parent(field)
    }

    /// The component of compound field `parent` that a change event calls `sub`
    /// (`BillingAddress` + `Street` -> `BillingStreet`; `Name` + `FirstName` -> `FirstName`;
    /// `Loc__c` + `Latitude` -> `Loc__Latitude__s`).
    pub fn component(&self, parent: &str, sub: &str) -> Option<&FieldDescribe> {
        let components = || {
            self.fields.iter().filter(move |f| {
                f.name != parent && f.compound_field_name.as_deref() == Some(parent)
            })
        };
        let exact = components().find(|f| f.name == sub);
        exact.or_else(|| {
            components().find(|f| {
                let base = f.name.strip_suffix("__s").unwrap_or(&f.name);
                base.ends_with(sub)
            })
        })
    }
}

/// The change types of a CDC event header, decoded by symbol name (never by enum index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ChangeType {
    Create,
    Update,
    Delete,
    Undelete,
    GapCreate,
    GapUpdate,
    GapDelete,
    GapUndelete,
    GapOverflow,
}

impl ChangeType {
    /// The enum symbols in the order the emulator publishes them.
    pub const SYMBOLS: [&'static str; 9] = [
        "CREATE",
        "UPDATE",
        "DELETE",
        "UNDELETE",
        "GAP_CREATE",
        "GAP_UPDATE",
        "GAP_DELETE",
        "GAP_UNDELETE",
        "GAP_OVERFLOW",
    ];

    pub fn from_symbol(symbol: &str) -> Option<ChangeType> {
        Some(match symbol {
            "CREATE" => ChangeType::Create,
            "UPDATE" => ChangeType::Update,
            "DELETE" => ChangeType::Delete,
            "UNDELETE" => ChangeType::Undelete,
            "GAP_CREATE" => ChangeType::GapCreate,
            "GAP_UPDATE" => ChangeType::GapUpdate,
            "GAP_DELETE" => ChangeType::GapDelete,
            "GAP_UNDELETE" => ChangeType::GapUndelete,
            "GAP_OVERFLOW" => ChangeType::GapOverflow,
            _ => return None,
        })
    }

    pub fn symbol(self) -> &'static str {
        match self {
            ChangeType::Create => "CREATE",
            ChangeType::Update => "UPDATE",
            ChangeType::Delete => "DELETE",
            ChangeType::Undelete => "UNDELETE",
            ChangeType::GapCreate => "GAP_CREATE",
            ChangeType::GapUpdate => "GAP_UPDATE",
            ChangeType::GapDelete => "GAP_DELETE",
            ChangeType::GapUndelete => "GAP_UNDELETE",
            ChangeType::GapOverflow => "GAP_OVERFLOW",
        }
    }
}

impl fmt::Display for ChangeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.symbol())
    }
}

/// An opaque position in a Pub/Sub topic. Stored and sent back exactly as received.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct ReplayId(pub Vec<u8>);

impl ReplayId {
    /// The observed 8-byte big-endian form, for logs and the emulator; `None` for other lengths.
    pub fn as_u64(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.0.as_slice().try_into().ok()?;
        Some(u64::from_be_bytes(bytes))
    }

    /// ```
    /// use sfmirror::model::ReplayId;
    /// let id = ReplayId::from_u64(17_086_068);
    /// assert_eq!(id.0, [0, 0, 0, 0, 0x01, 0x04, 0xB6, 0x74]);
    /// assert_eq!(id.to_string(), "17086068");
    /// ```
    pub fn from_u64(value: u64) -> ReplayId {
        ReplayId(value.to_be_bytes().to_vec())
    }
}

impl fmt::Debug for ReplayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ReplayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_u64() {
            Some(n) => write!(f, "{n}"),
            None => {
                f.write_str("0x")?;
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    }
}

/// The ChangeEventHeader of a CDC event, with the three bitmap lists decoded to field names
/// (`Name`, or `BillingAddress.Street` for a compound component). Entity and field names are
/// shared with the decoding plan of the event's schema rather than copied per event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ChangeHeader {
    pub entity_name: Arc<str>,
    pub record_ids: Vec<String>,
    pub change_type: ChangeType,
    pub change_origin: String,
    pub transaction_key: String,
    pub sequence_number: i32,
    pub commit_timestamp: i64,
    pub commit_number: i64,
    pub commit_user: String,
    pub changed_fields: Vec<Arc<str>>,
    pub nulled_fields: Vec<Arc<str>>,
    pub diff_fields: Vec<Arc<str>>,
}

/// A decoded field value. Salesforce's Avro schemas use only these primitive shapes for record
/// fields; dates and datetimes arrive as epoch milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Boolean(bool),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    String(String),
    Bytes(Vec<u8>),
}

/// One non-null field of an event body. `path` is the top-level field name, or `Parent.Sub`
/// for a component of a compound field; it is shared between events of one schema.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldValue {
    pub path: Arc<str>,
    pub value: Value,
}

/// One change event as delivered: position, schema, header and the non-null body fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    pub replay_id: ReplayId,
    pub schema_id: Arc<str>,
    pub header: ChangeHeader,
    pub fields: Vec<FieldValue>,
    /// Every body field path the writer schema has (shared by all events of the schema): what
    /// a CREATE's absent values mean "null" for.
    pub schema_fields: Arc<[Arc<str>]>,
}

impl ChangeEvent {
    pub fn value(&self, path: &str) -> Option<&Value> {
        self.fields
            .iter()
            .find(|f| &*f.path == path)
            .map(|f| &f.value)
    }
}

/// How long Salesforce keeps change events: a replay position older than this cannot be
/// resumed, and changes not applied by then are gone from the stream.
pub const EVENT_RETENTION_SECS: i64 = 72 * 3600;

/// Whether `name` is safe to use as a Postgres identifier derived from Salesforce metadata:
/// `[A-Za-z][A-Za-z0-9_]*`, at most 63 bytes.
pub fn is_safe_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

#[cfg(test)]
mod tests {
    use super::*;

    fn describe(json: &str) -> ObjectDescribe {
        serde_json::from_str(json).expect("valid describe")
    }

    #[test]
    fn components_map_event_sub_fields_to_describe_fields() {
        let d = describe(
            r#"{"name":"Account","fields":[
            {"name":"Name","type":"string","compoundFieldName":"Name"},
            {"name":"BillingStreet","type":"textarea","compoundFieldName":"BillingAddress"},
            {"name":"BillingCity","type":"string","compoundFieldName":"BillingAddress"},
            {"name":"BillingAddress","type":"address"},
            {"name":"FirstName","type":"string","compoundFieldName":"PName"},
            {"name":"PName","type":"string"},
            {"name":"Loc__Latitude__s","type":"double","compoundFieldName":"Loc__c"},
            {"name":"Loc__c","type":"location"}]}"#,
        );
        assert_eq!(
            d.component("BillingAddress", "City")
                .map(|f| f.name.as_str()),
            Some("BillingCity")
        );
        assert_eq!(
            d.component("PName", "FirstName").map(|f| f.name.as_str()),
            Some("FirstName")
        );
        assert_eq!(
            d.component("Loc__c", "Latitude").map(|f| f.name.as_str()),
            Some("Loc__Latitude__s")
        );
        assert!(d.component("BillingAddress", "Planet").is_none());
        let name = d.field("Name").expect("Name");
        assert!(
            !d.is_compound_parent(name),
            "self-reference is not a parent"
        );
        assert!(d.is_compound_parent(d.field("PName").expect("PName")));
        assert!(d.is_compound_parent(d.field("BillingAddress").expect("addr")));
    }

    #[test]
    fn identifiers() {
        assert!(is_safe_identifier("invoice__c"));
        assert!(is_safe_identifier("A1"));
        assert!(!is_safe_identifier("1a"));
        assert!(!is_safe_identifier("a-b"));
        assert!(!is_safe_identifier("a\"b"));
        assert!(!is_safe_identifier(""));
    }

    #[test]
    fn replay_ids_round_trip_and_print() {
        let r = ReplayId::from_u64(17086068);
        assert_eq!(r.0, vec![0, 0, 0, 0, 1, 4, 0xB6, 0x74]);
        assert_eq!(r.as_u64(), Some(17086068));
        assert_eq!(ReplayId(vec![1, 2]).to_string(), "0x0102");
    }

    #[test]
    fn change_type_symbols_round_trip() {
        for s in ChangeType::SYMBOLS {
            let t = ChangeType::from_symbol(s).expect("known symbol");
            assert_eq!(t.symbol(), s);
        }
        assert!(ChangeType::from_symbol("SNAPSHOT").is_none());
    }
}
