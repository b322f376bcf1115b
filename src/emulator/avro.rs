//! What every Avro schema the emulator serves shares, whether a change event's
//! ([`super::cdc`]) or a platform event's ([`super::platform`]): the Avro type that carries
//! each field type, and the schema id that names a schema.
//!
//! It owns no schema and encodes nothing; it must not know either kind of event, so that both
//! can build on it without knowing each other.

use crate::model::FieldType;
use base64::Engine;
use sha2::{Digest, Sha256};

/// The Avro type that carries a field of `kind` in Salesforce's event schemas.
pub fn avro_type(kind: &FieldType) -> &'static str {
    match kind {
        FieldType::Boolean => "boolean",
        FieldType::Int => "int",
        FieldType::Long | FieldType::Date | FieldType::Datetime | FieldType::Time => "long",
        FieldType::Double | FieldType::Currency | FieldType::Percent => "double",
        _ => "string",
    }
}

/// A schema id like Salesforce's: 22 URL-safe base64 characters, here a fingerprint of the
/// schema JSON, so the same schema always gets the same id.
pub fn schema_id(schema_json: &str) -> String {
    let digest = Sha256::digest(schema_json.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..16])
}
