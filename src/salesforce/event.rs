//! Change events: writer schema -> decoding plan, Avro payload -> [`ChangeEvent`], and the
//! `changedFields` / `nulledFields` / `diffFields` bitmaps -> field names.
//!
//! Invariant 5 lives here: every payload is decoded with the schema its `schema_id` names.
//! Field positions, enum symbols and compound layouts are read from that schema when the plan
//! is built (once per schema id), never from constants.

use super::avro::{AvroError, Node, Reader, Record};
use crate::model::bitmap::{for_each_set_bit, hex_digits};
use crate::model::{ChangeEvent, ChangeHeader, ChangeType, FieldValue, ReplayId};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("schema {schema_id}: {message}")]
    Schema { schema_id: String, message: String },
    #[error("event {replay_id} (schema {schema_id}): {source}")]
    Payload {
        replay_id: ReplayId,
        schema_id: String,
        source: AvroError,
    },
    #[error("event {replay_id} (schema {schema_id}): {message}")]
    Header {
        replay_id: ReplayId,
        schema_id: String,
        message: String,
    },
}

/// Which header field a writer-schema position holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HeaderSlot {
    EntityName,
    RecordIds,
    ChangeType,
    ChangeOrigin,
    TransactionKey,
    SequenceNumber,
    CommitTimestamp,
    CommitNumber,
    CommitUser,
    NulledFields,
    DiffFields,
    ChangedFields,
    Unknown,
}

impl HeaderSlot {
    fn of(name: &str) -> HeaderSlot {
        match name {
            "entityName" => HeaderSlot::EntityName,
            "recordIds" => HeaderSlot::RecordIds,
            "changeType" => HeaderSlot::ChangeType,
            "changeOrigin" => HeaderSlot::ChangeOrigin,
            "transactionKey" => HeaderSlot::TransactionKey,
            "sequenceNumber" => HeaderSlot::SequenceNumber,
            "commitTimestamp" => HeaderSlot::CommitTimestamp,
            "commitNumber" => HeaderSlot::CommitNumber,
            "commitUser" => HeaderSlot::CommitUser,
            "nulledFields" => HeaderSlot::NulledFields,
            "diffFields" => HeaderSlot::DiffFields,
            "changedFields" => HeaderSlot::ChangedFields,
            _ => HeaderSlot::Unknown,
        }
    }
}

/// One top-level body field of the writer schema.
#[derive(Debug)]
struct BodyField {
    name: Arc<str>,
    node: Node,
    /// For a compound field: `Parent.Sub` for each sub-field of its record branch.
    sub_paths: Option<Vec<Arc<str>>>,
}

/// Everything needed to decode events of one schema id, built once.
#[derive(Debug)]
pub struct EventPlan {
    pub schema_id: String,
    /// Record name, e.g. `AccountChangeEvent`.
    pub record_name: String,
    /// `schema_id`, shared by every event decoded with this plan.
    shared_schema_id: Arc<str>,
    /// The entity name the record name implies (`Account`, `Employee__c`): events that carry
    /// it share this allocation; any other name is still taken from the payload.
    entity: Arc<str>,
    header_index: usize,
    header: Vec<(HeaderSlot, Node)>,
    /// Top-level fields by schema position; `None` at the header's position.
    body: Vec<Option<BodyField>>,
    /// All body field paths, compound fields expanded.
    paths: Arc<[Arc<str>]>,
}

impl EventPlan {
    /// Builds the plan from the schema JSON that GetSchema returned for `schema_id`.
    pub fn from_json(schema_id: &str, schema_json: &str) -> Result<EventPlan, EventError> {
        let err = |message: String| EventError::Schema {
            schema_id: schema_id.to_string(),
            message,
        };
        let schema = apache_avro::Schema::parse_str(schema_json)
            .map_err(|e| err(format!("not a valid Avro schema: {e}")))?;
        let node = Node::compile(&schema).map_err(|e| err(e.to_string()))?;
        let Node::Record(top) = node else {
            return Err(err("top-level schema is not a record".to_string()));
        };
        let header_index = top
            .fields
            .iter()
            .position(|(name, _)| name == "ChangeEventHeader")
            .ok_or_else(|| err("no ChangeEventHeader field".to_string()))?;
        let header_record = top.fields[header_index]
            .1
            .record()
            .ok_or_else(|| err("ChangeEventHeader is not a record".to_string()))?;
        let header = header_record
            .fields
            .iter()
            .map(|(name, node)| (HeaderSlot::of(name), node.clone()))
            .collect::<Vec<_>>();
        for required in [HeaderSlot::ChangeType, HeaderSlot::RecordIds] {
            if !header.iter().any(|(s, _)| *s == required) {
                return Err(err(format!("ChangeEventHeader lacks {required:?}")));
            }
        }
        let body = top
            .fields
            .iter()
            .enumerate()
            .map(|(i, (name, node))| {
                (i != header_index).then(|| BodyField {
                    name: Arc::from(name.as_str()),
                    node: node.clone(),
                    sub_paths: node.record().map(|r| sub_paths(name, r)),
                })
            })
            .collect::<Vec<Option<BodyField>>>();
        let mut paths = Vec::new();
        for f in body.iter().flatten() {
            match &f.sub_paths {
                Some(subs) => paths.extend(subs.iter().cloned()),
                None => paths.push(f.name.clone()),
            }
        }
        let entity = match top.name.strip_suffix("ChangeEvent") {
            Some(custom) if custom.ends_with("__") => format!("{custom}c"),
            Some(standard) => standard.to_string(),
            None => top.name.clone(),
        };
        Ok(EventPlan {
            schema_id: schema_id.to_string(),
            record_name: top.name.clone(),
            shared_schema_id: Arc::from(schema_id),
            entity: Arc::from(entity),
            header_index,
            header,
            body,
            paths: paths.into(),
        })
    }

    /// Every body field path (`Name`, `BillingAddress.Street`), in schema order.
    pub fn field_paths(&self) -> &Arc<[Arc<str>]> {
        &self.paths
    }

    /// Decodes one payload. Returns the event and warnings about bitmap bits the schema does
    /// not define (reported, not fatal).
    pub fn decode(
        &self,
        replay_id: ReplayId,
        payload: &[u8],
    ) -> Result<(ChangeEvent, Vec<String>), EventError> {
        let payload_err = |source| EventError::Payload {
            replay_id: replay_id.clone(),
            schema_id: self.schema_id.clone(),
            source,
        };
        let mut r = Reader::new(payload);
        let mut header = None;
        let mut warnings = Vec::new();
        let mut fields = Vec::new();
        for (i, slot) in self.body.iter().enumerate() {
            if i == self.header_index {
                let h = self
                    .decode_header(&mut r, &mut warnings)
                    .map_err(|e| match e {
                        HeaderError::Avro(a) => payload_err(a),
                        HeaderError::Bad(message) => EventError::Header {
                            replay_id: replay_id.clone(),
                            schema_id: self.schema_id.clone(),
                            message,
                        },
                    })?;
                // Size the body once from what the header says it carries: every field of a
                // CREATE or UNDELETE, the changed ones (plus enrichment) of an UPDATE.
                fields.reserve(match h.change_type {
                    ChangeType::Create | ChangeType::Undelete => self.paths.len(),
                    _ => h.changed_fields.len() + 4,
                });
                header = Some(h);
                continue;
            }
            let Some(field) = slot else { continue };
            decode_body_field(&mut r, field, &mut fields).map_err(payload_err)?;
        }
        if !r.is_at_end() {
            return Err(payload_err(AvroError::Corrupt {
                offset: r.offset(),
                message: format!(
                    "{} trailing bytes after the record",
                    payload.len() - r.offset()
                ),
            }));
        }
        let Some(header) = header else {
            return Err(EventError::Header {
                replay_id,
                schema_id: self.schema_id.clone(),
                message: "payload has no header".to_string(),
            });
        };
        // A sparse CREATE gives back what it did not use (batches hold events a while).
        if fields.capacity() - fields.len() > 16 {
            fields.shrink_to_fit();
        }
        Ok((
            ChangeEvent {
                replay_id,
                schema_id: self.shared_schema_id.clone(),
                header,
                fields,
                schema_fields: self.paths.clone(),
            },
            warnings,
        ))
    }

    /// Reads the header; the bitmap lists are decoded to names straight from the payload.
    fn decode_header(
        &self,
        r: &mut Reader<'_>,
        warnings: &mut Vec<String>,
    ) -> Result<ChangeHeader, HeaderError> {
        let mut h = ChangeHeader {
            entity_name: self.entity.clone(),
            record_ids: Vec::new(),
            change_type: ChangeType::Update,
            change_origin: String::new(),
            transaction_key: String::new(),
            sequence_number: 0,
            commit_timestamp: 0,
            commit_number: 0,
            commit_user: String::new(),
            changed_fields: Vec::new(),
            nulled_fields: Vec::new(),
            diff_fields: Vec::new(),
        };
        let mut change_type = None;
        for (slot, node) in &self.header {
            match slot {
                HeaderSlot::EntityName => {
                    let name = text(r, node)?;
                    if *name != *self.entity {
                        h.entity_name = Arc::from(name.as_ref());
                    }
                }
                HeaderSlot::ChangeOrigin => h.change_origin = text(r, node)?.into_owned(),
                HeaderSlot::TransactionKey => h.transaction_key = text(r, node)?.into_owned(),
                HeaderSlot::CommitUser => h.commit_user = text(r, node)?.into_owned(),
                HeaderSlot::RecordIds => h.record_ids = r.string_list(node)?,
                HeaderSlot::NulledFields => {
                    self.read_bitmaps(r, node, &mut h.nulled_fields, warnings)?
                }
                HeaderSlot::DiffFields => {
                    self.read_bitmaps(r, node, &mut h.diff_fields, warnings)?
                }
                HeaderSlot::ChangedFields => {
                    self.read_bitmaps(r, node, &mut h.changed_fields, warnings)?
                }
                HeaderSlot::SequenceNumber => {
                    h.sequence_number = i32::try_from(integer(r, node)?).map_err(|_| {
                        HeaderError::Bad("sequenceNumber out of int range".to_string())
                    })?
                }
                HeaderSlot::CommitTimestamp => h.commit_timestamp = integer(r, node)?,
                HeaderSlot::CommitNumber => h.commit_number = integer(r, node)?,
                HeaderSlot::ChangeType => {
                    let symbol = text(r, node)?;
                    let symbol = symbol.as_ref();
                    change_type = Some(ChangeType::from_symbol(symbol).ok_or_else(|| {
                        HeaderError::Bad(format!("unknown changeType `{symbol}`"))
                    })?);
                }
                HeaderSlot::Unknown => r.skip(node)?,
            }
        }
        h.change_type =
            change_type.ok_or_else(|| HeaderError::Bad("changeType is null".to_string()))?;
        Ok(h)
    }

    /// Decodes bitmap strings to field names: element `0x..` over top-level fields, elements
    /// `p-0x..` over the sub-fields of compound field `p`.
    pub fn bitmap_names(
        &self,
        bitmaps: &[impl AsRef<str>],
        warnings: &mut Vec<String>,
    ) -> Vec<Arc<str>> {
        let mut names = Vec::new();
        let mut parents = Vec::new();
        for element in bitmaps {
            self.bitmap_element(element.as_ref(), &mut names, &mut parents, warnings);
        }
        self.settle_parents(&mut names, &parents);
        names
    }

    /// [`Self::bitmap_names`] for one header list, read straight from the payload.
    fn read_bitmaps(
        &self,
        r: &mut Reader<'_>,
        node: &Node,
        names: &mut Vec<Arc<str>>,
        warnings: &mut Vec<String>,
    ) -> Result<(), HeaderError> {
        let mut parents = Vec::new();
        r.for_each_str(node, |e| {
            self.bitmap_element(e, names, &mut parents, warnings)
        })?;
        self.settle_parents(names, &parents);
        Ok(())
    }

    /// Resolves a compound parent's own top-level bit. Salesforce marks a changed sub-field in
    /// a `p-0x..` element and usually leaves the parent's bit clear, but its documented
    /// example (`['0x650004E0','4-0x10','7-0x06']`) sets both. Where the list has a `p-0x..`
    /// element for the parent, that element says which sub-fields, and the parent's bit adds
    /// nothing; alone, the bit stands for the whole compound, so it becomes every sub-field.
    /// A parent name never survives: it has no column of its own.
    fn settle_parents(&self, names: &mut Vec<Arc<str>>, parents: &[usize]) {
        for &p in parents {
            let Some(Some(field)) = self.body.get(p) else {
                continue;
            };
            let Some(subs) = &field.sub_paths else {
                continue;
            };
            if let Some(i) = names.iter().position(|n| *n == field.name) {
                names.remove(i);
            }
            let named_subs = names.iter().any(|n| {
                n.strip_prefix(&*field.name)
                    .is_some_and(|rest| rest.starts_with('.'))
            });
            if !named_subs {
                names.extend(subs.iter().cloned());
            }
        }
    }

    /// Appends the names one bitmap element selects. Names are the plan's shared strings, so
    /// this allocates nothing but the list itself (and warnings). A compound parent named by
    /// its own bit also goes to `parents`, by schema position (see [`Self::settle_parents`]).
    fn bitmap_element(
        &self,
        element: &str,
        names: &mut Vec<Arc<str>>,
        parents: &mut Vec<usize>,
        warnings: &mut Vec<String>,
    ) {
        let (parent, hex) = match element.split_once('-') {
            Some((p, h)) => match p.trim().parse::<usize>() {
                Ok(p) => (Some(p), h),
                Err(_) => {
                    warnings.push(format!("bitmap element `{element}` has a bad parent index"));
                    return;
                }
            },
            None => (None, element),
        };
        let Some(digits) = hex_digits(hex) else {
            warnings.push(format!("bitmap element `{element}` is not hex"));
            return;
        };
        match parent {
            None => for_each_set_bit(digits, |bit| match self.body.get(bit) {
                Some(Some(f)) => {
                    if f.sub_paths.is_some() {
                        parents.push(bit);
                    }
                    names.push(f.name.clone())
                }
                Some(None) => {} // the header's own bit carries no field
                None => warnings.push(format!(
                    "bitmap `{element}` sets bit {bit}, schema has {} fields",
                    self.body.len()
                )),
            }),
            Some(p) => {
                let subs = self
                    .body
                    .get(p)
                    .and_then(|f| f.as_ref())
                    .and_then(|f| f.sub_paths.as_ref());
                let Some(subs) = subs else {
                    warnings.push(format!(
                        "bitmap `{element}` names field {p}, which is not a compound field"
                    ));
                    return;
                };
                for_each_set_bit(digits, |bit| match subs.get(bit) {
                    Some(path) => names.push(path.clone()),
                    None => warnings.push(format!(
                        "bitmap `{element}` sets sub-field bit {bit}, compound has {}",
                        subs.len()
                    )),
                });
            }
        }
    }
}

enum HeaderError {
    Avro(AvroError),
    Bad(String),
}

impl From<AvroError> for HeaderError {
    fn from(e: AvroError) -> Self {
        HeaderError::Avro(e)
    }
}

/// A header string (or enum symbol), tolerating a nullable union around it; borrowed from the
/// payload or the schema where it can be.
fn text<'x, 'a: 'x, 'n: 'x>(
    r: &mut Reader<'a>,
    node: &'n Node,
) -> Result<Cow<'x, str>, HeaderError> {
    match node {
        Node::String => Ok(Cow::Borrowed(r.str()?)),
        Node::Enum(symbols) => Ok(Cow::Borrowed(r.enum_symbol(symbols)?)),
        Node::Null => Ok(Cow::Borrowed("")),
        Node::Union(branches) => {
            let b = r.branch(branches)?;
            text(r, b)
        }
        other => match r.value(other)? {
            Some(v) => Err(HeaderError::Bad(format!("expected text, got {v:?}"))),
            None => Ok(Cow::Borrowed("")),
        },
    }
}

fn integer(r: &mut Reader<'_>, node: &Node) -> Result<i64, HeaderError> {
    Ok(match r.value(node)? {
        Some(crate::model::Value::Long(v)) => v,
        Some(crate::model::Value::Int(v)) => i64::from(v),
        Some(other) => return Err(HeaderError::Bad(format!("expected integer, got {other:?}"))),
        None => 0,
    })
}

fn sub_paths(parent: &str, record: &Record) -> Vec<Arc<str>> {
    record
        .fields
        .iter()
        .map(|(sub, _)| Arc::from(format!("{parent}.{sub}").as_str()))
        .collect()
}

fn decode_body_field(
    r: &mut Reader<'_>,
    field: &BodyField,
    out: &mut Vec<FieldValue>,
) -> Result<(), AvroError> {
    let node = match &field.node {
        Node::Union(branches) => r.branch(branches)?,
        other => other,
    };
    match (node, &field.sub_paths) {
        (Node::Null, _) => {}
        (Node::Record(rec), Some(paths)) => {
            for ((_, sub), path) in rec.fields.iter().zip(paths) {
                if let Some(value) = r.value(sub)? {
                    out.push(FieldValue {
                        path: path.clone(),
                        value,
                    });
                }
            }
        }
        (other, _) => {
            if let Some(value) = r.value(other)? {
                out.push(FieldValue {
                    path: field.name.clone(),
                    value,
                });
            }
        }
    }
    Ok(())
}

/// Reads a captured payload: raw Avro bytes, or the same as hex or base64 text (whitespace
/// ignored), as operators copy them out of logs and tools.
pub fn payload_from_capture(bytes: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let text: String = match std::str::from_utf8(bytes) {
        Ok(t) => t.chars().filter(|c| !c.is_whitespace()).collect(),
        Err(_) => return bytes.to_vec(),
    };
    if text.is_empty() {
        return bytes.to_vec();
    }
    let hex = text.strip_prefix("0x").unwrap_or(&text);
    if hex.len().is_multiple_of(2) && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        let decoded: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
            .collect();
        if let Some(d) = decoded {
            return d;
        }
    }
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        if let Ok(d) = engine.decode(&text) {
            return d;
        }
    }
    bytes.to_vec()
}

/// One event as JSON for operators: header (bitmaps decoded to names, compound fields as
/// `Parent.Sub`), the non-null field values, and any bitmap warnings.
pub fn inspect(schema_json: &str, payload: &[u8]) -> Result<serde_json::Value, EventError> {
    use serde_json::json;
    let plan = EventPlan::from_json("inspected", schema_json)?;
    let (event, warnings) = plan.decode(ReplayId::default(), payload)?;
    let mut fields = serde_json::Map::new();
    for f in &event.fields {
        let v = match &f.value {
            crate::model::Value::Boolean(b) => json!(b),
            crate::model::Value::Int(i) => json!(i),
            crate::model::Value::Long(i) => json!(i),
            crate::model::Value::Float(x) => json!(x),
            crate::model::Value::Double(x) => json!(x),
            crate::model::Value::String(s) => json!(s),
            crate::model::Value::Bytes(b) => {
                use base64::Engine;
                json!(base64::engine::general_purpose::STANDARD.encode(b))
            }
        };
        fields.insert(f.path.to_string(), v);
    }
    Ok(json!({
        "schema": plan.record_name,
        "header": event.header,
        "fields": fields,
        "warnings": warnings,
    }))
}

/// Decoding plans by schema id. GetSchema is called once per unseen id by the owner of the
/// cache; every later event of that schema reuses the plan.
/// A schema id names one immutable schema, so a schema that cannot be compiled is remembered
/// too: its events are refused at once instead of asking GetSchema again for each.
#[derive(Default)]
pub struct SchemaCache {
    plans: HashMap<String, Result<Arc<EventPlan>, String>>,
}

impl SchemaCache {
    /// The plan for `schema_id`, or why its schema cannot be used; `None` if not yet fetched.
    pub fn get(&self, schema_id: &str) -> Option<Result<Arc<EventPlan>, String>> {
        self.plans.get(schema_id).cloned()
    }

    pub fn insert(
        &mut self,
        schema_id: &str,
        schema_json: &str,
    ) -> Result<Arc<EventPlan>, EventError> {
        let plan = EventPlan::from_json(schema_id, schema_json).map(Arc::new);
        self.plans.insert(
            schema_id.to_string(),
            plan.as_ref().map(Arc::clone).map_err(|e| e.to_string()),
        );
        plan
    }

    pub fn len(&self) -> usize {
        self.plans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The synthetic schema of the protocol notes: 0 header, 1 Name, 2 Phone,
    /// 3 BillingAddress {Street, City, State}.
    fn plan() -> EventPlan {
        let json = format!(
            r#"{{"type":"record","name":"AccountChangeEvent","namespace":"com.sforce.eventbus",
            "fields":[{{"name":"ChangeEventHeader","type":{header}}},
            {{"name":"Name","type":["null","string"],"default":null}},
            {{"name":"Phone","type":["null","string"],"default":null}},
            {{"name":"BillingAddress","type":["null",{{"type":"record","name":"Address",
              "fields":[{{"name":"Street","type":["null","string"],"default":null}},
                        {{"name":"City","type":["null","string"],"default":null}},
                        {{"name":"State","type":["null","string"],"default":null}}]}}],
              "default":null}}]}}"#,
            header = HEADER
        );
        EventPlan::from_json("s1", &json).expect("plan builds")
    }

    pub(crate) const HEADER: &str = r#"{"type":"record","name":"ChangeEventHeader","fields":[
        {"name":"entityName","type":"string"},
        {"name":"recordIds","type":{"type":"array","items":"string"}},
        {"name":"changeType","type":{"type":"enum","name":"ChangeType","symbols":
          ["CREATE","UPDATE","DELETE","UNDELETE","GAP_CREATE","GAP_UPDATE","GAP_DELETE",
           "GAP_UNDELETE","GAP_OVERFLOW"]}},
        {"name":"changeOrigin","type":"string"},
        {"name":"transactionKey","type":"string"},
        {"name":"sequenceNumber","type":"int"},
        {"name":"commitTimestamp","type":"long"},
        {"name":"commitNumber","type":"long"},
        {"name":"commitUser","type":"string"},
        {"name":"nulledFields","type":{"type":"array","items":"string"}},
        {"name":"diffFields","type":{"type":"array","items":"string"}},
        {"name":"changedFields","type":{"type":"array","items":"string"}}]}"#;

    fn names(p: &EventPlan, bitmaps: &[&str]) -> (Vec<String>, Vec<String>) {
        let mut w = Vec::new();
        let list: Vec<String> = bitmaps.iter().map(|s| s.to_string()).collect();
        let names = p.bitmap_names(&list, &mut w);
        (names.iter().map(|n| n.to_string()).collect(), w)
    }

    #[test]
    fn synthetic_vectors_from_the_protocol_notes() {
        let p = plan();
        assert_eq!(names(&p, &["0x06"]).0, ["Name", "Phone"]);
        assert_eq!(names(&p, &["0x04"]).0, ["Phone"]);
        assert_eq!(
            names(&p, &["0x02", "3-0x05"]).0,
            ["Name", "BillingAddress.Street", "BillingAddress.State"]
        );
        assert_eq!(
            names(&p, &["3-0x07"]).0,
            [
                "BillingAddress.Street",
                "BillingAddress.City",
                "BillingAddress.State"
            ]
        );
        assert!(names(&p, &[]).0.is_empty());
    }

    #[test]
    fn tolerant_of_case_odd_digits_and_extra_bits() {
        let p = plan();
        assert_eq!(names(&p, &["0x6"]).0, ["Name", "Phone"]);
        assert_eq!(names(&p, &["3-0x5"]).0.len(), 2);
        assert_eq!(
            names(&p, &["0x0e"]).0,
            [
                "Name",
                "Phone",
                "BillingAddress.Street",
                "BillingAddress.City",
                "BillingAddress.State"
            ]
        );
        let (n, w) = names(&p, &["0x102"]);
        assert_eq!(n, ["Name"]);
        assert_eq!(w.len(), 1, "bit 8 is reported: {w:?}");
        let (_, w) = names(&p, &["1-0x01", "zz", "0xZZ"]);
        assert_eq!(w.len(), 3, "{w:?}");
    }

    #[test]
    fn real_account_vectors() {
        // Account order from the protocol notes: bits 17 = Rating, 22 = LastModifiedDate,
        // 7 = Fax, 4 = BillingAddress.
        let fields = [
            "Name",
            "Type",
            "ParentId",
            "BillingAddress",
            "ShippingAddress",
            "Phone",
            "Fax",
            "AccountNumber",
            "Website",
            "Sic",
            "Industry",
            "AnnualRevenue",
            "NumberOfEmployees",
            "Ownership",
            "TickerSymbol",
            "Description",
            "Rating",
            "Site",
            "OwnerId",
            "CreatedDate",
            "CreatedById",
            "LastModifiedDate",
        ];
        let body: Vec<String> = fields
            .iter()
            .map(|f| {
                if f.ends_with("Address") {
                    format!(
                        r#"{{"name":"{f}","type":["null",{{"type":"record","name":"{f}T","fields":[
                          {{"name":"Street","type":["null","string"],"default":null}},
                          {{"name":"City","type":["null","string"],"default":null}},
                          {{"name":"State","type":["null","string"],"default":null}}]}}],"default":null}}"#
                    )
                } else {
                    format!(r#"{{"name":"{f}","type":["null","string"],"default":null}}"#)
                }
            })
            .collect();
        let json = format!(
            r#"{{"type":"record","name":"AccountChangeEvent","fields":[
              {{"name":"ChangeEventHeader","type":{HEADER}}},{}]}}"#,
            body.join(",")
        );
        let p = EventPlan::from_json("acc", &json).expect("plan");
        assert_eq!(names(&p, &["0x420000"]).0, ["Rating", "LastModifiedDate"]);
        assert_eq!(names(&p, &["0x400080"]).0, ["Fax", "LastModifiedDate"]);
        assert_eq!(
            names(&p, &["0x400000", "4-0x01"]).0,
            ["LastModifiedDate", "BillingAddress.Street"]
        );
        assert_eq!(
            names(&p, &["0x400000", "4-0x06"]).0,
            [
                "LastModifiedDate",
                "BillingAddress.City",
                "BillingAddress.State"
            ]
        );
    }

    #[test]
    fn a_compound_parent_bit_never_names_the_parent() {
        let p = plan();
        // With its own element (the form of Salesforce's documented example), the element
        // says which sub-fields changed.
        assert_eq!(
            names(&p, &["0x0A", "3-0x02"]).0,
            ["Name", "BillingAddress.City"]
        );
        // The element may come first, as long as it is in the same list.
        assert_eq!(names(&p, &["3-0x04", "0x08"]).0, ["BillingAddress.State"]);
        // Alone, the parent's bit is the whole compound.
        assert_eq!(
            names(&p, &["0x08"]).0,
            [
                "BillingAddress.Street",
                "BillingAddress.City",
                "BillingAddress.State"
            ]
        );
    }

    #[test]
    fn the_documented_example_with_parent_bits_set() {
        // DOC-DESER's `['0x650004E0','4-0x10','7-0x06']` sets bit 7 and has a `7-0x..`
        // element; field 4 is a compound named only by its element. A schema of 31 fields
        // where 4 and 7 are compounds.
        let body: Vec<String> = (1..=30)
            .map(|i| {
                if i == 4 || i == 7 {
                    format!(
                        r#"{{"name":"C{i}","type":["null",{{"type":"record","name":"R{i}","fields":[
                          {{"name":"A","type":["null","string"],"default":null}},
                          {{"name":"B","type":["null","string"],"default":null}},
                          {{"name":"C","type":["null","string"],"default":null}},
                          {{"name":"D","type":["null","string"],"default":null}},
                          {{"name":"E","type":["null","string"],"default":null}}]}}],"default":null}}"#
                    )
                } else {
                    format!(r#"{{"name":"F{i}","type":["null","string"],"default":null}}"#)
                }
            })
            .collect();
        let json = format!(
            r#"{{"type":"record","name":"ThingChangeEvent","fields":[
              {{"name":"ChangeEventHeader","type":{HEADER}}},{}]}}"#,
            body.join(",")
        );
        let p = EventPlan::from_json("doc", &json).expect("plan");
        let (n, w) = names(&p, &["0x650004E0", "4-0x10", "7-0x06"]);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            n,
            [
                "F5", "F6", "F10", "F24", "F26", "F29", "F30", "C4.E", "C7.B", "C7.C"
            ]
        );
    }

    #[test]
    fn a_schema_that_cannot_be_used_is_remembered_with_its_reason() {
        let mut cache = SchemaCache::default();
        assert!(cache.get("bad").is_none(), "not fetched yet");
        assert!(
            cache
                .insert("bad", r#"{"type":"record","name":"X"}"#)
                .is_err()
        );
        match cache.get("bad") {
            Some(Err(reason)) => assert!(reason.contains("bad"), "{reason}"),
            other => panic!("the failure is cached: {other:?}"),
        }
        let header_only = format!(
            r#"{{"type":"record","name":"AccountChangeEvent","fields":[
              {{"name":"ChangeEventHeader","type":{HEADER}}}]}}"#
        );
        assert!(cache.insert("good", &header_only).is_ok());
        assert!(matches!(cache.get("good"), Some(Ok(_))));
    }

    #[test]
    fn captured_payloads_in_any_form() {
        let raw = vec![0x0e, 0x41, 0x00, 0xff];
        assert_eq!(payload_from_capture(&raw), raw);
        assert_eq!(payload_from_capture(b"0e4100ff\n"), raw);
        assert_eq!(payload_from_capture(b"0x0E 41 00 FF"), raw);
        assert_eq!(payload_from_capture(b"DkEA/w=="), raw);
    }

    proptest! {
        #[test]
        fn arbitrary_bitmap_strings_never_panic(list in proptest::collection::vec(".{0,12}", 0..4)) {
            let p = plan();
            let mut w = Vec::new();
            let _ = p.bitmap_names(&list, &mut w);
        }
    }
}
