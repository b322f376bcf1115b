//! The org's objects and what describes them: the object definitions, their change event
//! schemas (every one ever published, so stored events stay decodable), the platform event
//! types, the channels each object's events go to, and schema changes (a field added or
//! removed). It must not touch record values beyond what a schema change does to them.

use super::{ApiError, ObjectDef, Org};
use crate::emulator::cdc::CdcSchema;
use crate::emulator::platform::EventType;
use crate::model::ObjectDescribe;
use serde_json::Value as J;
use std::collections::HashSet;
use std::sync::Arc;

/// The channel of one object: `/data/AccountChangeEvent`, `/data/Invoice__ChangeEvent`.
pub fn object_channel(object: &str) -> String {
    match object.strip_suffix("__c") {
        Some(base) => format!("/data/{base}__ChangeEvent"),
        None => format!("/data/{object}ChangeEvent"),
    }
}

pub const ALL_CHANGES_CHANNEL: &str = "/data/ChangeEvents";

pub(super) fn is_custom_channel_name(name: &str) -> bool {
    name.strip_prefix("/data/")
        .and_then(|n| n.strip_suffix("__chn"))
        .is_some_and(|n| {
            n.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

impl Org {
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

    /// The current schema id of the object whose own channel is `channel`.
    pub fn channel_schema_id(&self, channel: &str) -> Option<String> {
        self.objects.read().ok().and_then(|o| {
            o.values()
                .find(|d| d.channels.get(1).is_some_and(|c| c == channel))
                .map(|d| d.schema.schema_id.clone())
        })
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
        let (formulas, unsupported) = super::formulas::formula_fields(&describe, &raw);
        let person_record_type = super::names::person_record_type(&raw);
        self.note_unsupported(unsupported);
        let updated = Arc::new(ObjectDef {
            describe,
            raw,
            schema,
            channels: def.channels.clone(),
            formulas,
            person_record_type,
        });
        if let Ok(mut o) = self.objects.write() {
            o.insert(object.to_string(), updated);
        }
        Ok(schema_id)
    }
}
