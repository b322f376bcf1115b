//! Platform events (`/event/<Name>__e`): the objects of the org whose API name ends in `__e`
//! are event types, not record tables. Their Avro schema is what Salesforce serves for them:
//! record `<Name>__e` in namespace `com.sforce.eventbus`, `CreatedDate` (epoch ms) and
//! `CreatedById` required, every custom field `["null", T]` with default null.
//!
//! Clients publish with `Publish` / `PublishStream`; the emulator checks each event against the
//! topic's current schema (the schema id must match and the payload must decode completely)
//! before it gets a replay id, as Salesforce does, so a client with a stale or wrong schema
//! learns it at publish time.
//!
//! This module owns the event types and their checks; it must not publish: the store puts
//! checked events on the bus.

use super::avro::{avro_type, schema_id};
use crate::model::ObjectDescribe;
use serde_json::{Value as J, json};

/// Describe fields that are not part of a platform event's payload.
const NOT_IN_PAYLOAD: &[&str] = &["ReplayId", "EventUuid", "Id"];

/// One platform event type.
#[derive(Debug)]
pub struct EventType {
    pub name: String,
    pub channel: String,
    pub schema_id: String,
    pub json: String,
    pub avro: apache_avro::Schema,
}

/// The channel of an event type: `/event/Order_Shipped__e`.
pub fn event_channel(name: &str) -> String {
    format!("/event/{name}")
}

impl EventType {
    pub fn build(describe: &ObjectDescribe) -> Result<EventType, String> {
        let mut fields = vec![
            json!({"name": "CreatedDate", "type": "long", "doc": "CreatedDate:DateTime"}),
            json!({"name": "CreatedById", "type": "string", "doc": "CreatedBy:EntityId"}),
        ];
        for f in &describe.fields {
            if NOT_IN_PAYLOAD.contains(&f.name.as_str())
                || f.name == "CreatedDate"
                || f.name == "CreatedById"
            {
                continue;
            }
            if !crate::model::is_safe_identifier(&f.name) {
                return Err(format!(
                    "{}: field name {:?} is not valid",
                    describe.name, f.name
                ));
            }
            fields.push(json!({
                "name": f.name,
                "type": ["null", avro_type(&f.kind())],
                "doc": format!("Data:{}", f.field_type),
                "default": null,
            }));
        }
        let json = json!({
            "type": "record",
            "name": describe.name,
            "namespace": "com.sforce.eventbus",
            "fields": fields,
        })
        .to_string();
        let avro = apache_avro::Schema::parse_str(&json)
            .map_err(|e| format!("{}: generated schema does not parse: {e}", describe.name))?;
        Ok(EventType {
            name: describe.name.clone(),
            channel: event_channel(&describe.name),
            schema_id: schema_id(&json),
            json,
            avro,
        })
    }

    /// Checks one published payload: it must be a complete datum of this schema.
    pub fn validate(&self, payload: &[u8]) -> Result<(), String> {
        let mut reader = payload;
        let datum = apache_avro::from_avro_datum(&self.avro, &mut reader, None)
            .map_err(|e| format!("the payload does not match schema {}: {e}", self.schema_id))?;
        // The reader fills what it cannot read from a short payload with nulls; a value that
        // does not fit the schema is how a truncated payload shows.
        if !datum.validate(&self.avro) {
            return Err(format!(
                "the payload is not a complete {} record (schema {})",
                self.name, self.schema_id
            ));
        }
        if !reader.is_empty() {
            return Err(format!(
                "the payload has {} bytes after the end of a {} record",
                reader.len(),
                self.name
            ));
        }
        // The reader also takes the end of the payload for a null union branch, so a payload
        // cut just before its last optional fields decodes: written again, the record it
        // decoded to is longer than what was sent.
        let complete = apache_avro::to_avro_datum(&self.avro, datum)
            .map_err(|e| format!("the payload does not match schema {}: {e}", self.schema_id))?;
        if complete.len() != payload.len() {
            return Err(format!(
                "the payload is truncated: a complete {} record is {} bytes, {} were sent",
                self.name,
                complete.len(),
                payload.len()
            ));
        }
        Ok(())
    }
}

/// Is `describe` a platform event type rather than an sObject?
pub fn is_event_type(describe: &ObjectDescribe) -> bool {
    describe.name.ends_with("__e")
}

/// A describe field as it appears in a platform event's describe (for tests and the org file).
pub fn describe_field(name: &str, field_type: &str) -> J {
    json!({"name": name, "type": field_type, "nillable": true, "createable": true,
           "updateable": false, "custom": name.ends_with("__c")})
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value as AV;

    #[test]
    fn builds_the_salesforce_shape_and_validates_payloads() {
        let describe: ObjectDescribe = serde_json::from_value(json!({
            "name": "Order_Shipped__e",
            "fields": [
                describe_field("ReplayId", "string"),
                describe_field("CreatedDate", "datetime"),
                describe_field("CreatedById", "reference"),
                describe_field("EventUuid", "string"),
                describe_field("Order_Number__c", "string"),
                describe_field("Weight__c", "double"),
            ]
        }))
        .expect("describe");
        let t = EventType::build(&describe).expect("schema");
        assert_eq!(t.channel, "/event/Order_Shipped__e");
        let parsed: J = serde_json::from_str(&t.json).expect("json");
        let names: Vec<&str> = parsed["fields"]
            .as_array()
            .expect("fields")
            .iter()
            .filter_map(|f| f["name"].as_str())
            .collect();
        assert_eq!(
            names,
            ["CreatedDate", "CreatedById", "Order_Number__c", "Weight__c"]
        );
        let datum = AV::Record(vec![
            ("CreatedDate".into(), AV::Long(1_700_000_000_000)),
            (
                "CreatedById".into(),
                AV::String("005000000000001AAA".into()),
            ),
            (
                "Order_Number__c".into(),
                AV::Union(1, Box::new(AV::String("A-1".into()))),
            ),
            ("Weight__c".into(), AV::Union(0, Box::new(AV::Null))),
        ]);
        let bytes = apache_avro::to_avro_datum(&t.avro, datum).expect("encode");
        t.validate(&bytes).expect("valid");
        assert!(t.validate(&bytes[..bytes.len() / 2]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(t.validate(&longer).is_err());
        // A payload cut anywhere short of its end is refused, whatever field the cut falls in.
        for cut in 0..bytes.len() {
            assert!(
                t.validate(&bytes[..cut]).is_err(),
                "a payload cut to {cut} of {} bytes was accepted",
                bytes.len()
            );
        }
        // Also when the cut removes only trailing optional (union) fields.
        let nulls = AV::Record(vec![
            ("CreatedDate".into(), AV::Long(1)),
            (
                "CreatedById".into(),
                AV::String("005000000000001AAA".into()),
            ),
            ("Order_Number__c".into(), AV::Union(0, Box::new(AV::Null))),
            ("Weight__c".into(), AV::Union(0, Box::new(AV::Null))),
        ]);
        let bytes = apache_avro::to_avro_datum(&t.avro, nulls).expect("encode");
        for cut in 0..bytes.len() {
            assert!(t.validate(&bytes[..cut]).is_err(), "cut to {cut}");
        }
    }
}
