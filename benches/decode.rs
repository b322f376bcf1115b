//! Decode throughput: Avro payload + bitmaps -> ChangeEvent, on one core.
//!
//! Budget (design.md): >= 500,000 events/s. Run with `cargo bench --bench decode [-- N]`.
//! Payloads are real emulator Account events: a CREATE with every field populated and UPDATEs
//! with a few changed fields and a compound component, mixed 1:3.
//!
//! For comparison it then decodes the same payloads, in the same loop, with apache-avro's
//! `from_avro_datum` into its generic `Value` tree: the reason sfmirror keeps its own decoder.
//! That side does less (no bitmaps, no `ChangeEvent`), so it is a bound, not a like-for-like.

use sfmirror::emulator::cdc::{CdcSchema, HeaderInfo, encode};
use sfmirror::model::{ChangeType, ObjectDescribe, ReplayId};
use sfmirror::salesforce::event::EventPlan;
use std::collections::HashSet;
use std::time::Instant;

fn main() {
    let describe: ObjectDescribe =
        serde_json::from_str(include_str!("../src/emulator/org/Account.json")).expect("describe");
    let schema = CdcSchema::build(&describe).expect("schema");
    let plan = EventPlan::from_json(&schema.schema_id, &schema.json).expect("plan");

    let mut full = serde_json::Map::new();
    for f in &describe.fields {
        let v = match f.kind() {
            sfmirror::model::FieldType::Boolean => serde_json::json!(true),
            sfmirror::model::FieldType::Int => serde_json::json!(42),
            sfmirror::model::FieldType::Double | sfmirror::model::FieldType::Currency => {
                serde_json::json!(12.5)
            }
            sfmirror::model::FieldType::Datetime => {
                serde_json::json!("2026-01-02T03:04:05.000+0000")
            }
            sfmirror::model::FieldType::Date => serde_json::json!("2026-01-02"),
            _ => serde_json::json!(format!("{} value", f.name)),
        };
        full.insert(f.name.clone(), v);
    }
    let header = |change_type, changed: Vec<String>| HeaderInfo {
        entity: "Account",
        record_ids: vec!["0015g00000AbCdEAAV".to_string()],
        change_type,
        change_origin: "com/salesforce/api/rest/62.0",
        transaction_key: "0b5e4c5a-8f1e-4f5e-9d6c-3a2b1c0d9e8f",
        sequence_number: 1,
        commit_timestamp: 1_767_322_245_000,
        commit_number: 1_725_346_778_429_841_409,
        commit_user: "0055g00000AbCdEAAV",
        changed,
        nulled: vec![],
        diff: vec![],
    };
    let create = encode(&schema, &header(ChangeType::Create, vec![]), &full).expect("create");
    let changed: HashSet<String> = ["Rating", "BillingCity", "LastModifiedDate"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut body = serde_json::Map::new();
    for f in &changed {
        body.insert(f.clone(), full[f].clone());
    }
    let update = encode(
        &schema,
        &header(ChangeType::Update, schema.bitmap(&changed)),
        &body,
    )
    .expect("update");
    let payloads = [
        create.as_slice(),
        update.as_slice(),
        update.as_slice(),
        update.as_slice(),
    ];

    // N events from the command line (`cargo bench --bench decode -- N`), for profiling runs.
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let t0 = Instant::now();
    let mut fields = 0usize;
    for i in 0..n {
        let p = payloads[(i % 4) as usize];
        let (event, _) = plan.decode(ReplayId::from_u64(i), p).expect("decodes");
        fields += event.fields.len() + event.header.changed_fields.len();
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "decode: {n} events in {secs:.3} s = {:.0} events/s (1 CREATE : 3 UPDATE; {} bytes / {} bytes; {fields} fields seen)",
        n as f64 / secs,
        create.len(),
        update.len()
    );

    let avro_schema = apache_avro::Schema::parse_str(&schema.json).expect("schema parses");
    let t0 = Instant::now();
    let mut fields = 0usize;
    for i in 0..n {
        let mut p = payloads[(i % 4) as usize];
        let value = apache_avro::from_avro_datum(&avro_schema, &mut p, None).expect("decodes");
        if let apache_avro::types::Value::Record(f) = std::hint::black_box(value) {
            fields += f.len();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "apache-avro from_avro_datum: {n} events in {secs:.3} s = {:.0} events/s (same payloads; Avro only, no bitmaps; {fields} record fields read)",
        n as f64 / secs,
    );
}
