//! Property test of the merge (invariants 3 and 4) against a real Postgres: random valid
//! histories of CREATE / UPDATE / DELETE / UNDELETE over a few records, delivered with
//! duplicates, replays from older positions and random batch cuts, always converge to the
//! state of the history applied once, in soft and hard delete mode.

use crate::common::TestDb;
use proptest::prelude::*;
use sfmirror::config::DeleteMode;
use sfmirror::model::{
    ChangeEvent, ChangeHeader, ChangeType, FieldValue, ObjectDescribe, ReplayId, Value,
};
use sfmirror::replica::ApplySettings;
use sfmirror::replica::apply::apply_events;
use sfmirror::replica::schema::TableSchema;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const DESCRIBE: &str = r#"{"name":"Account","keyPrefix":"001","fields":[
  {"name":"Id","type":"id"},
  {"name":"Name","type":"string"},
  {"name":"Score__c","type":"double","precision":18,"scale":2},
  {"name":"Active__c","type":"boolean"},
  {"name":"Seats__c","type":"int"},
  {"name":"BillingStreet","type":"textarea","compoundFieldName":"BillingAddress"},
  {"name":"BillingCity","type":"string","compoundFieldName":"BillingAddress"},
  {"name":"BillingAddress","type":"address"},
  {"name":"LastModifiedDate","type":"datetime"}]}"#;

const PATHS: [&str; 7] = [
    "Name",
    "Score__c",
    "Active__c",
    "Seats__c",
    "BillingAddress.Street",
    "BillingAddress.City",
    "LastModifiedDate",
];

/// A record in the model: path -> value (absent = null).
type State = BTreeMap<&'static str, Value>;

#[derive(Debug, Clone)]
enum Intent {
    Create(usize, Vec<(usize, Option<u8>)>),
    Update(usize, Vec<(usize, Option<u8>)>),
    Delete(usize),
    Undelete(usize),
}

fn value_for(path_index: usize, seed: u8) -> Value {
    match path_index {
        0 => Value::String(format!("name-{seed}")),
        1 => Value::Double(f64::from(seed) / 4.0),
        2 => Value::Boolean(seed.is_multiple_of(2)),
        3 => Value::Int(i32::from(seed) * 3),
        4 => Value::String(format!("{seed} main st")),
        _ => Value::String(["Paris", "Lyon", "Oslo"][usize::from(seed) % 3].to_string()),
    }
}

fn intent() -> impl Strategy<Value = Intent> {
    let fields = proptest::collection::vec((0usize..6, proptest::option::of(any::<u8>())), 1..4);
    prop_oneof![
        (0usize..3, fields.clone()).prop_map(|(r, f)| Intent::Create(r, f)),
        (0usize..3, fields).prop_map(|(r, f)| Intent::Update(r, f)),
        (0usize..3).prop_map(Intent::Delete),
        (0usize..3).prop_map(Intent::Undelete),
    ]
}

/// The "channel" of a snapshot row: a repair, applied in a transaction of its own.
const REPAIR: u8 = 2;

fn id(r: usize) -> String {
    format!("001000000000{r:03}AAA")
}

/// Turns intents into the valid history Salesforce would have produced, with the model state.
/// A record's full state right after one event of the history: what a REST snapshot taken
/// then returns, to be applied whenever it arrives.
fn snapshot_after(events: &[ChangeEvent], k: usize) -> Option<ChangeEvent> {
    let rid = events.get(k)?.header.record_ids[0].clone();
    let mut state = State::new();
    let mut live = false;
    for e in events[..=k]
        .iter()
        .filter(|e| e.header.record_ids[0] == rid)
    {
        match e.header.change_type {
            ChangeType::Create | ChangeType::Undelete => {
                state = e
                    .fields
                    .iter()
                    .map(|f| (path_name(&f.path), f.value.clone()))
                    .collect();
                live = true;
            }
            ChangeType::Update => {
                for p in e.header.nulled_fields.iter() {
                    state.remove(path_name(p));
                }
                for f in &e.fields {
                    state.insert(path_name(&f.path), f.value.clone());
                }
            }
            ChangeType::Delete => live = false,
            _ => {}
        }
    }
    if !live {
        return None;
    }
    let source = &events[k];
    let mut snap = source.clone();
    snap.header.change_type = ChangeType::Create;
    snap.header.changed_fields.clear();
    snap.header.nulled_fields.clear();
    snap.fields = state
        .into_iter()
        .map(|(p, value)| FieldValue {
            path: Arc::from(p),
            value,
        })
        .collect();
    Some(snap)
}

fn path_name(p: &str) -> &'static str {
    PATHS.iter().find(|x| **x == p).copied().unwrap_or("Name")
}

fn history(intents: &[Intent]) -> (Vec<ChangeEvent>, HashMap<String, (State, bool)>) {
    let schema_fields: Arc<[Arc<str>]> = PATHS.iter().map(|p| Arc::from(*p)).collect();
    let mut model: HashMap<String, (State, bool)> = HashMap::new(); // (fields, deleted)
    let mut events = Vec::new();
    for (n, intent) in intents.iter().enumerate() {
        let ts = 1_700_000_000_000i64 + n as i64 * 1000;
        let (change_type, rid, changed, nulled, body): (
            ChangeType,
            String,
            Vec<String>,
            Vec<String>,
            State,
        ) = match intent {
            Intent::Create(r, fields) => {
                if model.contains_key(&id(*r)) {
                    continue;
                }
                let mut st = State::new();
                st.insert(PATHS[0], value_for(0, *r as u8));
                for (p, v) in fields {
                    match v {
                        Some(seed) => {
                            st.insert(PATHS[*p], value_for(*p, *seed));
                        }
                        None if *p != 0 => {
                            st.remove(PATHS[*p]);
                        }
                        None => {}
                    }
                }
                st.insert(PATHS[6], Value::Long(ts));
                model.insert(id(*r), (st.clone(), false));
                (ChangeType::Create, id(*r), vec![], vec![], st)
            }
            Intent::Update(r, fields) => {
                let Some((st, false)) = model.get_mut(&id(*r)) else {
                    continue;
                };
                let mut changed = vec!["LastModifiedDate".to_string()];
                let mut nulled = vec![];
                let mut body = State::new();
                for (p, v) in fields {
                    let path = PATHS[*p];
                    match v {
                        Some(seed) => {
                            let val = value_for(*p, *seed);
                            st.insert(path, val.clone());
                            body.insert(path, val);
                            changed.push(path.to_string());
                        }
                        None if *p != 0 => {
                            st.remove(path);
                            body.remove(path);
                            changed.push(path.to_string());
                            nulled.push(path.to_string());
                        }
                        None => {}
                    }
                }
                st.insert(PATHS[6], Value::Long(ts));
                body.insert(PATHS[6], Value::Long(ts));
                changed.sort();
                changed.dedup();
                nulled.retain(|p| !body.contains_key(p.as_str()));
                nulled.sort();
                nulled.dedup();
                (ChangeType::Update, id(*r), changed, nulled, body)
            }
            Intent::Delete(r) => {
                let Some((_, deleted @ false)) = model.get_mut(&id(*r)) else {
                    continue;
                };
                *deleted = true;
                (ChangeType::Delete, id(*r), vec![], vec![], State::new())
            }
            Intent::Undelete(r) => {
                let Some((st, deleted @ true)) = model.get_mut(&id(*r)) else {
                    continue;
                };
                *deleted = false;
                (ChangeType::Undelete, id(*r), vec![], vec![], st.clone())
            }
        };
        events.push(ChangeEvent {
            replay_id: ReplayId::from_u64(n as u64 + 1),
            schema_id: "s".into(),
            header: ChangeHeader {
                entity_name: "Account".into(),
                record_ids: vec![rid],
                change_type,
                change_origin: String::new(),
                transaction_key: format!("tx{n}"),
                sequence_number: 1,
                commit_timestamp: ts,
                commit_number: n as i64,
                commit_user: String::new(),
                changed_fields: changed.into_iter().map(Into::into).collect(),
                nulled_fields: nulled.into_iter().map(Into::into).collect(),
                diff_fields: vec![],
            },
            fields: body
                .into_iter()
                .map(|(p, value)| FieldValue {
                    path: Arc::from(p),
                    value,
                })
                .collect(),
            schema_fields: schema_fields.clone(),
        });
    }
    (events, model)
}

/// What the replica sees: the history on one channel with at-least-once replays, interleaved
/// with the same history arriving on a second channel (an object on both
/// `/data/ChangeEvents` and its own channel), each channel in order. Each entry is (event,
/// channel).
fn deliveries(n: usize, replays: &[(usize, usize)], interleave: &[bool]) -> Vec<(usize, u8)> {
    let first = replayed(n, replays);
    let mut out = Vec::with_capacity(first.len() + n);
    let (mut a, mut b) = (first.into_iter().peekable(), (0..n).peekable());
    let mut pick = interleave.iter().cycle();
    while a.peek().is_some() || b.peek().is_some() {
        let from_a = if interleave.is_empty() {
            true
        } else {
            *pick.next().unwrap_or(&true)
        };
        let next = if (from_a && a.peek().is_some()) || b.peek().is_none() {
            a.next().map(|i| (i, 0))
        } else {
            b.next().map(|i| (i, 1))
        };
        out.extend(next);
    }
    out
}

/// Delivery with at-least-once behaviour: after position `at`, restart from `back`.
fn replayed(n: usize, replays: &[(usize, usize)]) -> Vec<usize> {
    let mut out: Vec<usize> = (0..n).collect();
    for &(at, back) in replays {
        if n == 0 {
            break;
        }
        let at = at % n;
        let back = back % (at + 1);
        let mut replayed: Vec<usize> = (back..n).collect();
        out.truncate(
            out.iter()
                .position(|&i| i == at)
                .map(|p| p + 1)
                .unwrap_or(out.len()),
        );
        out.append(&mut replayed);
    }
    out
}

/// `altered`: a column's type was changed by hand (`varchar` instead of `text`), so rows that
/// write it cannot go as the table's row type and take the per-column statements.
#[allow(clippy::too_many_arguments)]
async fn converge(
    db_url: &str,
    schema: &str,
    mode: DeleteMode,
    altered: bool,
    events: &[ChangeEvent],
    order: &[(usize, u8)],
    cuts: &[usize],
    model: &HashMap<String, (State, bool)>,
) -> Result<(), String> {
    let mut cfg = deadpool_postgres::Config::new();
    cfg.url = Some(db_url.to_string());
    let pool = cfg
        .create_pool(None, tokio_postgres::NoTls)
        .map_err(|e| e.to_string())?;
    let mut client = pool.get().await.map_err(|e| e.to_string())?;
    let control = format!("{schema}_ctl");
    sfmirror::replica::migrate::migrate(&mut client, schema, &control)
        .await
        .map_err(|e| e.to_string())?;
    let describe: ObjectDescribe = serde_json::from_str(DESCRIBE).map_err(|e| e.to_string())?;
    let table = Arc::new(TableSchema::from_describe(describe).map_err(|e| e.to_string())?);
    table
        .ensure(&client, schema)
        .await
        .map_err(|e| e.to_string())?;
    if altered {
        client
            .batch_execute(&format!(
                "ALTER TABLE {schema}.account ALTER COLUMN billingcity TYPE varchar(100)"
            ))
            .await
            .map_err(|e| e.to_string())?;
    }
    let tables: HashMap<String, Arc<TableSchema>> = [("Account".to_string(), table)].into();
    let settings = ApplySettings {
        data_schema: schema.to_string(),
        control_schema: control,
        delete_mode: mode,
        repair_margin_ms: 0,
        audit_batches: false,
    };
    // The daemon applies each channel's stream in its own batches (contiguous parts of that
    // channel's order), and each repair in its own transaction: a batch ends at its size or
    // where the next delivery comes from elsewhere.
    let delivered: Vec<(ChangeEvent, u8)> = order
        .iter()
        .map(|&(i, channel)| (events[i].clone(), channel))
        .collect();
    let mut start = 0;
    let mut cut_iter = cuts.iter();
    while start < delivered.len() {
        let size = cut_iter.next().copied().unwrap_or(7).max(1);
        let channel = delivered[start].1;
        let mut end = start + 1;
        while end < delivered.len()
            && end - start < size
            && delivered[end].1 == channel
            && channel != REPAIR
        {
            end += 1;
        }
        let batch: Vec<ChangeEvent> = delivered[start..end]
            .iter()
            .map(|(e, _)| e.clone())
            .collect();
        let tx = client.transaction().await.map_err(|e| e.to_string())?;
        apply_events(&tx, &settings, &tables, batch)
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        start = end;
    }
    let rows = client
        .query(
            &format!(
                "SELECT id, name, score__c::float8, active__c, seats__c, billingstreet, billingcity,
                        (extract(epoch FROM lastmodifieddate) * 1000)::bigint, _sfm_deleted
                 FROM {schema}.account"
            ),
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut seen = 0;
    for row in &rows {
        let rid: String = row.get(0);
        let (want, deleted) = model.get(&rid).ok_or(format!("unexpected row {rid}"))?;
        let is_deleted: bool = row.get(8);
        if *deleted {
            if mode == DeleteMode::Hard {
                return Err(format!("{rid} deleted in the org but present"));
            }
            if !is_deleted {
                return Err(format!("{rid} deleted in the org, not in the replica"));
            }
            // A soft-deleted row keeps the values the record had when it was deleted (checked
            // below like a live row's).
        } else if is_deleted {
            return Err(format!("{rid} live in the org, deleted in the replica"));
        }
        seen += 1;
        let got: Vec<Option<Value>> = vec![
            row.get::<_, Option<String>>(1).map(Value::String),
            row.get::<_, Option<f64>>(2).map(Value::Double),
            row.get::<_, Option<bool>>(3).map(Value::Boolean),
            row.get::<_, Option<i32>>(4).map(Value::Int),
            row.get::<_, Option<String>>(5).map(Value::String),
            row.get::<_, Option<String>>(6).map(Value::String),
            row.get::<_, Option<i64>>(7).map(Value::Long),
        ];
        for (i, g) in got.iter().enumerate() {
            let w = want.get(PATHS[i]);
            if g.as_ref() != w {
                return Err(format!("{rid}.{}: model {w:?}, replica {g:?}", PATHS[i]));
            }
        }
    }
    let expected = model
        .values()
        .filter(|(_, deleted)| !(*deleted && mode == DeleteMode::Hard))
        .count();
    if seen != expected {
        return Err(format!("{seen} rows, expected {expected}"));
    }
    Ok(())
}

#[test]
fn random_histories_with_replays_converge() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let db = rt.block_on(TestDb::create());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    });
    let strategy = (
        proptest::collection::vec(intent(), 1..24),
        proptest::collection::vec((any::<usize>(), any::<usize>()), 0..3),
        proptest::collection::vec(1usize..6, 0..10),
        any::<bool>(),
        proptest::collection::vec(any::<bool>(), 0..8),
        proptest::collection::vec((any::<usize>(), any::<usize>()), 0..4),
        any::<bool>(),
    );
    let result = runner.run(
        &strategy,
        |(intents, replays, cuts, hard, interleave, snaps, altered)| {
            let (mut events, model) = history(&intents);
            let mut order = deliveries(events.len(), &replays, &interleave);
            // Late snapshot rows (a repair fetched the record earlier than it is applied).
            let n = events.len();
            for (k, delay) in snaps {
                if n == 0 {
                    break;
                }
                let k = k % n;
                if let Some(snap) = snapshot_after(&events, k) {
                    let first_k = order.iter().position(|&(i, _)| i == k).unwrap_or(0);
                    let at = (first_k + 1 + delay % (order.len() - first_k)).min(order.len());
                    events.push(snap);
                    order.insert(at, (events.len() - 1, REPAIR));
                }
            }
            let mode = if hard {
                DeleteMode::Hard
            } else {
                DeleteMode::Soft
            };
            let schema = format!("case_{}", rand::random::<u32>());
            let outcome = rt.block_on(converge(
                &db.url, &schema, mode, altered, &events, &order, &cuts, &model,
            ));
            let summary: Vec<_> = events
                .iter()
                .map(|e| {
                    (
                        e.header.change_type,
                        e.header.record_ids[0].clone(),
                        e.header.changed_fields.clone(),
                        e.header.nulled_fields.clone(),
                    )
                })
                .collect();
            prop_assert!(
                outcome.is_ok(),
                "{:?}\nmode {:?}, altered column {}\nhistory {:#?}\ndelivery order {:?}",
                outcome,
                mode,
                altered,
                summary,
                order
            );
            Ok(())
        },
    );
    drop(db);
    if let Err(e) = result {
        panic!("{e}");
    }
}
