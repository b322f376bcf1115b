//! Change events as Salesforce builds them: an Avro schema per object (record
//! `<Object>ChangeEvent`, namespace `com.sforce.eventbus`, the header first, every other field
//! `["null", T]` with default null, compound fields as nested records, datetimes as epoch ms),
//! and the encoding of one change into a payload with `changedFields` / `nulledFields` bitmaps.
//!
//! It builds schemas and encodes what it is given; it must not decide what changed (the
//! store's) or where an event goes (the bus's).

use super::avro::{avro_type, schema_id};
use crate::model::time::{date_ms, datetime_ms, time_ms};
use crate::model::{ChangeType, FieldDescribe, FieldType, ObjectDescribe};
use apache_avro::types::Value as AV;
use serde_json::{Value as J, json};
use std::collections::HashSet;

/// Fields Salesforce leaves out of change events besides the derived ones: the id (it is in
/// the header), the recycle bin flag, SystemModstamp, and the merge survivor's id. Derived
/// fields (formulas and [`crate::model::DERIVED_FIELDS_NOT_IN_CHANGE_EVENTS`]) are left out by
/// [`FieldDescribe::is_derived`], the rule the replica reads too; roll-up summary fields are
/// calculated but stored, and are sent.
const EXCLUDED: &[&str] = &["Id", "IsDeleted", "SystemModstamp", "MasterRecordId"];

/// Whether change events carry `f` at all (in the schema, the bitmaps and the values).
pub fn in_change_events(f: &FieldDescribe) -> bool {
    !EXCLUDED.contains(&f.name.as_str()) && !f.is_derived()
}

/// One top-level body field of a change event schema.
#[derive(Debug, Clone)]
pub enum CdcField {
    Scalar {
        field: String,
        kind: FieldType,
    },
    Compound {
        name: String,
        /// (sub-field name in the event, describe field name, type)
        subs: Vec<(String, String, FieldType)>,
    },
}

impl CdcField {
    pub fn name(&self) -> &str {
        match self {
            CdcField::Scalar { field, .. } => field,
            CdcField::Compound { name, .. } => name,
        }
    }
}

/// The change event schema of one object (one schema id).
#[derive(Debug)]
pub struct CdcSchema {
    pub schema_id: String,
    pub json: String,
    pub avro: apache_avro::Schema,
    /// Body fields; schema position = index + 1 (position 0 is the header).
    pub fields: Vec<CdcField>,
}

/// The event-side name of a compound component: `BillingStreet` under `BillingAddress` is
/// `Street`; `Loc__Latitude__s` under `Loc__c` is `Latitude`; person-name parts keep theirs.
fn sub_name(parent: &str, field: &str) -> String {
    let prefix = parent
        .strip_suffix("Address")
        .or_else(|| parent.strip_suffix("__c").map(|p| p.trim_end_matches('_')))
        .unwrap_or("");
    let mut s = field;
    if !prefix.is_empty()
        && let Some(rest) = s.strip_prefix(prefix)
    {
        s = rest.trim_start_matches('_');
    }
    s.strip_suffix("__s").unwrap_or(s).to_string()
}

/// The sub-fields of Salesforce's `Address` event record, in the order real schemas give them.
const ADDRESS_ORDER: [&str; 11] = [
    "Street",
    "City",
    "State",
    "PostalCode",
    "Country",
    "StateCode",
    "CountryCode",
    "Latitude",
    "Longitude",
    "Xyz",
    "GeocodeAccuracy",
];

/// Lays out an address's sub-fields as real event schemas do, whatever order describe lists
/// the components in. An org with state and country picklists (StateCode / CountryCode
/// components) gets the eleven-field record of real captures, whose `Xyz` sub-field no
/// describe lists and no event fills; an org without them gets the eight-field record
/// Salesforce's own documentation shows.
fn address_layout(subs: &mut Vec<(String, String, FieldType)>) {
    let rank = |name: &str| {
        ADDRESS_ORDER
            .iter()
            .position(|n| *n == name)
            .unwrap_or(ADDRESS_ORDER.len())
    };
    let picklists = subs
        .iter()
        .any(|(sub, _, _)| sub == "StateCode" || sub == "CountryCode");
    if picklists && !subs.iter().any(|(sub, _, _)| sub == "Xyz") {
        subs.push(("Xyz".to_string(), String::new(), FieldType::String));
    }
    subs.sort_by_key(|(sub, _, _)| rank(sub));
}

fn header_schema() -> J {
    let strings = json!({"type": "array", "items": "string"});
    json!({
        "type": "record",
        "name": "ChangeEventHeader",
        "fields": [
            {"name": "entityName", "type": "string"},
            {"name": "recordIds", "type": strings},
            {"name": "changeType", "type": {"type": "enum", "name": "ChangeType",
                "symbols": ChangeType::SYMBOLS}},
            {"name": "changeOrigin", "type": "string"},
            {"name": "transactionKey", "type": "string"},
            {"name": "sequenceNumber", "type": "int"},
            {"name": "commitTimestamp", "type": "long"},
            {"name": "commitNumber", "type": "long"},
            {"name": "commitUser", "type": "string"},
            {"name": "nulledFields", "type": strings},
            {"name": "diffFields", "type": strings},
            {"name": "changedFields", "type": strings}
        ]
    })
}

impl CdcSchema {
    /// Builds the schema of `describe`'s change events.
    pub fn build(describe: &ObjectDescribe) -> Result<CdcSchema, String> {
        let mut fields: Vec<CdcField> = Vec::new();
        let mut emitted_compounds = HashSet::new();
        for f in &describe.fields {
            if !in_change_events(f) {
                continue;
            }
            let parent = f
                .compound_field_name
                .as_deref()
                .filter(|p| *p != f.name && describe.field(p).is_some());
            if let Some(parent) = parent {
                if emitted_compounds.insert(parent.to_string()) {
                    let mut subs: Vec<(String, String, FieldType)> = describe
                        .fields
                        .iter()
                        .filter(|c| {
                            c.name != parent && c.compound_field_name.as_deref() == Some(parent)
                        })
                        .map(|c| (sub_name(parent, &c.name), c.name.clone(), c.kind()))
                        .collect();
                    if describe
                        .field(parent)
                        .is_some_and(|p| p.field_type == "address")
                    {
                        address_layout(&mut subs);
                    }
                    fields.push(CdcField::Compound {
                        name: parent.to_string(),
                        subs,
                    });
                }
                continue;
            }
            if describe.is_compound_parent(f) {
                continue; // emitted at its first component
            }
            fields.push(CdcField::Scalar {
                field: f.name.clone(),
                kind: f.kind(),
            });
        }
        let mut named_records: HashSet<String> = HashSet::new();
        let mut body = vec![json!({"name": "ChangeEventHeader", "type": header_schema(),
            "doc": "Data:EventHeader"})];
        for f in &fields {
            match f {
                CdcField::Scalar { field, kind } => body.push(json!({
                    "name": field, "type": ["null", avro_type(kind)], "default": null
                })),
                CdcField::Compound { name, subs } => {
                    let record_name = if name.ends_with("Address") {
                        "Address".to_string()
                    } else {
                        format!("{}_Compound", name.trim_end_matches("__c"))
                    };
                    let sub_fields: Vec<J> = subs
                        .iter()
                        .map(|(sub, _, kind)| {
                            json!({"name": sub, "type": ["null", avro_type(kind)], "default": null})
                        })
                        .collect();
                    // An Avro name may be defined once; later uses of the same layout refer to it.
                    let record = if named_records.insert(record_name.clone()) {
                        json!({"type": "record", "name": record_name, "fields": sub_fields})
                    } else {
                        J::String(record_name)
                    };
                    body.push(json!({"name": name, "type": ["null", record], "default": null}));
                }
            }
        }
        let entity = describe.name.trim_end_matches("__c");
        let record_name = if describe.name.ends_with("__c") {
            format!("{entity}__ChangeEvent")
        } else {
            format!("{entity}ChangeEvent")
        };
        let schema_json = json!({
            "type": "record",
            "name": record_name,
            "namespace": "com.sforce.eventbus",
            "fields": body,
        })
        .to_string();
        let avro = apache_avro::Schema::parse_str(&schema_json)
            .map_err(|e| format!("{}: generated schema does not parse: {e}", describe.name))?;
        let schema_id = schema_id(&schema_json);
        Ok(CdcSchema {
            schema_id,
            json: schema_json,
            avro,
            fields,
        })
    }

    /// Positions of the event fields that carry the describe fields in `changed`, as bitmap
    /// strings: element 0 over top-level fields, `p-0x..` per compound parent.
    pub fn bitmap(&self, changed: &HashSet<String>) -> Vec<String> {
        let mut top = Vec::new();
        let mut nested = Vec::new();
        for (i, f) in self.fields.iter().enumerate() {
            let pos = i + 1;
            match f {
                CdcField::Scalar { field, .. } => {
                    if changed.contains(field) {
                        top.push(pos);
                    }
                }
                CdcField::Compound { subs, .. } => {
                    let bits: Vec<usize> = subs
                        .iter()
                        .enumerate()
                        .filter(|(_, (_, field, _))| changed.contains(field))
                        .map(|(j, _)| j)
                        .collect();
                    if !bits.is_empty() {
                        nested.push(format!("{pos}-{}", crate::model::bitmap::encode_bits(bits)));
                    }
                }
            }
        }
        let mut out = Vec::new();
        if !top.is_empty() {
            out.push(crate::model::bitmap::encode_bits(top));
        }
        out.extend(nested);
        out
    }
}

/// Everything about one change that goes into its header.
pub struct HeaderInfo<'a> {
    pub entity: &'a str,
    pub record_ids: Vec<String>,
    pub change_type: ChangeType,
    pub change_origin: &'a str,
    pub transaction_key: &'a str,
    pub sequence_number: i32,
    pub commit_timestamp: i64,
    pub commit_number: i64,
    pub commit_user: &'a str,
    pub changed: Vec<String>,
    pub nulled: Vec<String>,
    pub diff: Vec<String>,
}

/// A record's value in REST JSON form -> the Avro value of its event field.
fn avro_value(kind: &FieldType, value: &J) -> AV {
    let inner = match (kind, value) {
        (_, J::Null) => return AV::Union(0, Box::new(AV::Null)),
        (FieldType::Boolean, J::Bool(b)) => AV::Boolean(*b),
        (FieldType::Int, v) => AV::Int(v.as_i64().unwrap_or_default() as i32),
        (FieldType::Long, v) => AV::Long(v.as_i64().unwrap_or_default()),
        (FieldType::Double | FieldType::Currency | FieldType::Percent, v) => {
            AV::Double(v.as_f64().unwrap_or_default())
        }
        (FieldType::Datetime, J::String(s)) => AV::Long(datetime_ms(s).unwrap_or_default()),
        (FieldType::Date, J::String(s)) => AV::Long(date_ms(s).unwrap_or_default()),
        (FieldType::Time, J::String(s)) => AV::Long(time_ms(s).unwrap_or_default()),
        (_, J::String(s)) => AV::String(s.clone()),
        (_, other) => AV::String(other.to_string()),
    };
    AV::Union(1, Box::new(inner))
}

/// Encodes one change. `record` holds the field values to send (REST JSON form); fields not
/// in it are sent as null.
pub fn encode(
    schema: &CdcSchema,
    header: &HeaderInfo<'_>,
    record: &serde_json::Map<String, J>,
) -> Result<Vec<u8>, String> {
    let strings = |v: &[String]| AV::Array(v.iter().cloned().map(AV::String).collect());
    let symbol_index = ChangeType::SYMBOLS
        .iter()
        .position(|s| *s == header.change_type.symbol())
        .unwrap_or(0) as u32;
    let head = AV::Record(vec![
        ("entityName".into(), AV::String(header.entity.to_string())),
        ("recordIds".into(), strings(&header.record_ids)),
        (
            "changeType".into(),
            AV::Enum(symbol_index, header.change_type.symbol().to_string()),
        ),
        (
            "changeOrigin".into(),
            AV::String(header.change_origin.to_string()),
        ),
        (
            "transactionKey".into(),
            AV::String(header.transaction_key.to_string()),
        ),
        ("sequenceNumber".into(), AV::Int(header.sequence_number)),
        ("commitTimestamp".into(), AV::Long(header.commit_timestamp)),
        ("commitNumber".into(), AV::Long(header.commit_number)),
        (
            "commitUser".into(),
            AV::String(header.commit_user.to_string()),
        ),
        ("nulledFields".into(), strings(&header.nulled)),
        ("diffFields".into(), strings(&header.diff)),
        ("changedFields".into(), strings(&header.changed)),
    ]);
    let mut body = vec![("ChangeEventHeader".to_string(), head)];
    for f in &schema.fields {
        match f {
            CdcField::Scalar { field, kind } => {
                let v = record.get(field).unwrap_or(&J::Null);
                body.push((field.clone(), avro_value(kind, v)));
            }
            CdcField::Compound { name, subs } => {
                let present = subs
                    .iter()
                    .any(|(_, field, _)| !record.get(field).unwrap_or(&J::Null).is_null());
                let value = if present {
                    let inner = subs
                        .iter()
                        .map(|(sub, field, kind)| {
                            (
                                sub.clone(),
                                avro_value(kind, record.get(field).unwrap_or(&J::Null)),
                            )
                        })
                        .collect();
                    AV::Union(1, Box::new(AV::Record(inner)))
                } else {
                    AV::Union(0, Box::new(AV::Null))
                };
                body.push((name.clone(), value));
            }
        }
    }
    apache_avro::to_avro_datum(&schema.avro, AV::Record(body))
        .map_err(|e| format!("encoding a {} event: {e}", header.entity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ReplayId;
    use crate::salesforce::event::EventPlan;

    fn account() -> ObjectDescribe {
        serde_json::from_str(include_str!("org/Account.json")).expect("describe")
    }

    #[test]
    fn account_schema_has_salesforce_shape() {
        let s = CdcSchema::build(&account()).expect("builds");
        assert_eq!(s.schema_id.len(), 22);
        let names: Vec<&str> = s.fields.iter().map(|f| f.name()).collect();
        assert_eq!(&names[..4], ["Name", "Type", "RecordTypeId", "ParentId"]);
        assert!(names.contains(&"BillingAddress"));
        assert!(!names.contains(&"BillingStreet"));
        assert!(!names.contains(&"SystemModstamp"));
        let Some(CdcField::Compound { subs, .. }) =
            s.fields.iter().find(|f| f.name() == "BillingAddress")
        else {
            panic!("compound")
        };
        assert_eq!(subs[0].0, "Street");
        assert_eq!(subs[0].1, "BillingStreet");
        assert_eq!(sub_name("Loc__c", "Loc__Latitude__s"), "Latitude");
        assert_eq!(sub_name("Name", "FirstName"), "FirstName");
    }

    #[test]
    fn formulas_and_derived_fields_stay_out_roll_ups_go_in() {
        let mut d = account();
        let base = d.field("AnnualRevenue").expect("AnnualRevenue").clone();
        let mut formula = base.clone();
        formula.name = "Revenue_Per_Head__c".into();
        formula.calculated = true;
        formula.calculated_formula = Some("AnnualRevenue / NumberOfEmployees".into());
        let mut roll_up = base.clone();
        roll_up.name = "Open_Amount__c".into();
        roll_up.calculated = true;
        roll_up.calculated_formula = None;
        let mut activity = base;
        activity.name = "LastActivityDate".into();
        activity.field_type = "date".into();
        d.fields.extend([formula, roll_up, activity]);
        let s = CdcSchema::build(&d).expect("builds");
        let names: Vec<&str> = s.fields.iter().map(|f| f.name()).collect();
        assert!(!names.contains(&"Revenue_Per_Head__c"), "{names:?}");
        assert!(!names.contains(&"LastActivityDate"), "{names:?}");
        assert!(names.contains(&"Open_Amount__c"), "{names:?}");
        assert!(!s.json.contains("Revenue_Per_Head__c"));
        // Marking a formula changed sets no bit: only the roll-up's position.
        let changed: HashSet<String> = ["Revenue_Per_Head__c", "Open_Amount__c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let pos = names
            .iter()
            .position(|n| *n == "Open_Amount__c")
            .expect("roll-up")
            + 1;
        assert_eq!(
            s.bitmap(&changed),
            [crate::model::bitmap::encode_bits(vec![pos])]
        );
    }

    fn address_subs(d: &ObjectDescribe, parent: &str) -> Vec<String> {
        let s = CdcSchema::build(d).expect("builds");
        match s.fields.iter().find(|f| f.name() == parent) {
            Some(CdcField::Compound { subs, .. }) => subs.iter().map(|s| s.0.clone()).collect(),
            _ => panic!("{parent} is not a compound"),
        }
    }

    #[test]
    fn addresses_take_the_layout_of_real_event_schemas() {
        let mut d = account();
        // The captured org has no state and country picklists: the documentation's record.
        assert_eq!(
            address_subs(&d, "BillingAddress"),
            [
                "Street",
                "City",
                "State",
                "PostalCode",
                "Country",
                "Latitude",
                "Longitude",
                "GeocodeAccuracy"
            ]
        );
        // With them (described last here, as a field added later would be), the record of
        // real captures, `Xyz` included, in its order.
        for name in ["BillingStateCode", "BillingCountryCode"] {
            let mut f = d.field("BillingState").expect("BillingState").clone();
            f.name = name.to_string();
            f.field_type = "picklist".to_string();
            d.fields.push(f);
        }
        assert_eq!(
            address_subs(&d, "BillingAddress"),
            ADDRESS_ORDER
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
        // `Xyz` is never filled and never marked changed.
        let s = CdcSchema::build(&d).expect("builds");
        let all: HashSet<String> = d.fields.iter().map(|f| f.name.clone()).collect();
        let bitmap = s.bitmap(&all);
        let pos = s
            .fields
            .iter()
            .position(|f| f.name() == "BillingAddress")
            .expect("billing")
            + 1;
        let element = bitmap
            .iter()
            .find(|e| e.starts_with(&format!("{pos}-")))
            .expect("an element for the address");
        let bits = crate::model::bitmap::set_bits(&element[element.find('-').expect("dash") + 1..])
            .expect("hex");
        assert!(
            !bits.contains(&9),
            "Xyz (sub-field 9) is not marked: {element}"
        );
        assert_eq!(bits.len(), 10);
    }

    #[test]
    fn what_the_emulator_encodes_the_client_decodes() {
        let s = CdcSchema::build(&account()).expect("builds");
        let mut record = serde_json::Map::new();
        record.insert("Name".into(), json!("Acme"));
        record.insert("BillingCity".into(), json!("Paris"));
        record.insert("NumberOfEmployees".into(), json!(42));
        record.insert("AnnualRevenue".into(), json!(1.5e6));
        record.insert(
            "LastModifiedDate".into(),
            json!("2022-01-10T13:01:28.000+0000"),
        );
        let changed: HashSet<String> = ["Name", "BillingCity", "LastModifiedDate"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let bitmap = s.bitmap(&changed);
        let header = HeaderInfo {
            entity: "Account",
            record_ids: vec!["001000000000001AAA".into()],
            change_type: ChangeType::Update,
            change_origin: "com/salesforce/api/rest/62.0",
            transaction_key: "tk",
            sequence_number: 1,
            commit_timestamp: 1_641_819_688_123,
            commit_number: 99,
            commit_user: "005000000000001AAA",
            changed: bitmap.clone(),
            nulled: vec![],
            diff: vec![],
        };
        let bytes = encode(&s, &header, &record).expect("encodes");
        let plan = EventPlan::from_json(&s.schema_id, &s.json).expect("plan");
        let (ev, warnings) = plan.decode(ReplayId::from_u64(7), &bytes).expect("decodes");
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(ev.header.change_type, ChangeType::Update);
        assert_eq!(ev.header.commit_number, 99);
        let mut names: Vec<&str> = ev.header.changed_fields.iter().map(|n| &**n).collect();
        names.sort();
        assert_eq!(names, ["BillingAddress.City", "LastModifiedDate", "Name"]);
        assert_eq!(
            ev.value("BillingAddress.City"),
            Some(&crate::model::Value::String("Paris".into()))
        );
        assert_eq!(
            ev.value("NumberOfEmployees"),
            Some(&crate::model::Value::Int(42))
        );
        assert_eq!(
            ev.value("LastModifiedDate"),
            Some(&crate::model::Value::Long(1_641_819_688_000))
        );
        assert_eq!(
            bitmap.len(),
            2,
            "top-level element and one compound element"
        );
        assert!(bitmap[1].contains("-0x02"), "{bitmap:?}");
    }
}
