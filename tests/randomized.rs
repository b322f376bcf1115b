//! Randomized end to end: thousands of mixed changes over every default object on the
//! multi-entity channel, the subscriber killed and restarted at random points; at the end the
//! replica equals the org, every row and every column. `SFMIRROR_TEST_SEED` replays a run.

use crate::common;
use crate::common::{Daemon, TestDb, object_drift, wait_for};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value as J, json};
use sfmirror::config::Config;
use sfmirror::emulator::Emulator;
use sfmirror::emulator::store::Org;
use sfmirror::model::FieldType;
use std::time::Duration;

const OBJECTS: [&str; 5] = [
    "Account",
    "Contact",
    "Opportunity",
    "Custom__c",
    "Invoice__c",
];

/// A random value for a writable field, within its type, length and scale.
fn random_value(rng: &mut StdRng, f: &sfmirror::model::FieldDescribe) -> Option<J> {
    let word = |rng: &mut StdRng, max: i64| {
        let len = rng.random_range(1..=12.min(max.max(1))) as usize;
        let chars = ['a', 'b', 'é', 'Z', ' ', '7', '\'', '"', '\n', '漢'];
        (0..len)
            .map(|_| chars[rng.random_range(0..chars.len())])
            .collect::<String>()
    };
    Some(match f.kind() {
        FieldType::Boolean => J::Bool(rng.random()),
        FieldType::Int => json!(rng.random_range(-1000..100_000)),
        FieldType::Long => json!(rng.random_range(-1_000_000i64..9_000_000_000_000)),
        FieldType::Double | FieldType::Currency | FieldType::Percent => {
            let int_digits = (f.precision - f.scale).clamp(1, 6) as u32;
            let max = 10f64.powi(int_digits as i32) - 1.0;
            json!(rng.random_range(-max..max))
        }
        FieldType::Date => json!(format!(
            "20{:02}-{:02}-{:02}",
            rng.random_range(0..40),
            rng.random_range(1..13),
            rng.random_range(1..29)
        )),
        FieldType::Datetime => json!(format!(
            "20{:02}-{:02}-{:02}T{:02}:{:02}:{:02}.000+0000",
            rng.random_range(0..40),
            rng.random_range(1..13),
            rng.random_range(1..29),
            rng.random_range(0..24),
            rng.random_range(0..60),
            rng.random_range(0..60)
        )),
        FieldType::Time => json!(format!(
            "{:02}:{:02}:{:02}.{:03}Z",
            rng.random_range(0..24),
            rng.random_range(0..60),
            rng.random_range(0..60),
            rng.random_range(0..1000)
        )),
        FieldType::Base64 => json!("c2ZtaXJyb3I="),
        FieldType::Email => json!(format!("u{}@example.com", rng.random_range(0..1000))),
        FieldType::Reference | FieldType::Id => return None,
        FieldType::Address | FieldType::Location => return None,
        _ => json!(word(rng, f.length)),
    })
}

fn random_fields(rng: &mut StdRng, org: &Org, object: &str, creating: bool) -> Map<String, J> {
    let def = org.object(object).expect("object");
    let mut out = Map::new();
    for f in &def.describe.fields {
        let writable = if creating { f.createable } else { f.updateable };
        if !writable || !rng.random_bool(if creating { 0.6 } else { 0.15 }) {
            continue;
        }
        if f.nillable && !creating && rng.random_bool(0.3) {
            out.insert(f.name.clone(), J::Null);
        } else if let Some(v) = random_value(rng, f) {
            out.insert(f.name.clone(), v);
        }
    }
    // Required fields.
    for f in &def.describe.fields {
        if creating
            && f.createable
            && !f.nillable
            && !f.defaulted_on_create
            && let Some(v) = random_value(rng, f)
        {
            out.insert(f.name.clone(), v);
        }
    }
    out
}

fn config(emulator: &Emulator, db: &TestDb) -> Config {
    let mut cfg = common::TestConfig::new(emulator, &db.url)
        .channels(&[("/data/ChangeEvents", &OBJECTS)])
        .build();
    cfg.sync.batch_max_events = 200;
    cfg.sync.batch_max_wait_ms = 20;
    cfg.sync.reconnect_min_ms = 50;
    cfg.sync.reconnect_max_ms = 500;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_with_random_kills_converges() {
    let seed: u64 = std::env::var("SFMIRROR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("SFMIRROR_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(&emulator, &db);
    let org = emulator.org.clone();

    let mut daemon = Daemon::spawn(&cfg, None);
    wait_for(
        "the first subscription",
        Duration::from_secs(30),
        async || emulator.subscription_count() >= 1,
    )
    .await;

    // A channel without a checkpoint starts at LATEST (the first-start snapshot covers what
    // came before); kills are only meaningful once a checkpoint exists.
    let mut ids: Vec<(String, String, bool)> = Vec::new(); // (object, id, deleted)
    let first = org
        .create(
            "Account",
            &random_fields(&mut rng, &org, "Account", true),
            "",
        )
        .expect("create");
    ids.push(("Account".to_string(), first, false));
    let client = db.client().await;
    wait_for(
        "the first checkpoint",
        Duration::from_secs(30),
        async || {
            client
                .query_opt("SELECT 1 FROM sfmirror.checkpoints", &[])
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await;
    let mut kills = 0;
    let mut next_kill = rng.random_range(150..600);
    let total = 3000;
    for n in 0..total {
        if n == next_kill {
            // Kill without warning: in-flight transactions roll back, nothing is flushed.
            daemon.task.abort();
            let _ = (&mut daemon.task).await;
            kills += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..50))).await;
            daemon = Daemon::spawn(&cfg, None);
            next_kill = n + rng.random_range(150..600);
        }
        let object = OBJECTS[rng.random_range(0..OBJECTS.len())];
        let live: Vec<usize> = (0..ids.len())
            .filter(|&i| ids[i].0 == object && !ids[i].2)
            .collect();
        let dead: Vec<usize> = (0..ids.len())
            .filter(|&i| ids[i].0 == object && ids[i].2)
            .collect();
        let roll = rng.random_range(0..100);
        let origin = "com/salesforce/api/rest/62.0";
        if roll < 35 || live.is_empty() {
            let fields = random_fields(&mut rng, &org, object, true);
            let id = org.create(object, &fields, origin).expect("create");
            ids.push((object.to_string(), id, false));
        } else if roll < 80 {
            let i = live[rng.random_range(0..live.len())];
            let fields = random_fields(&mut rng, &org, object, false);
            if !fields.is_empty() {
                org.update(object, &ids[i].1, &fields, origin)
                    .expect("update");
            }
        } else if roll < 88 && live.len() > 2 {
            let picked: Vec<String> = live
                .iter()
                .take(rng.random_range(2..=live.len().min(5)))
                .map(|&i| ids[i].1.clone())
                .collect();
            let fields = random_fields(&mut rng, &org, object, false);
            if !fields.is_empty() {
                org.mass_update(object, &picked, &fields, origin)
                    .expect("mass update");
            }
        } else if roll < 95 {
            let i = live[rng.random_range(0..live.len())];
            org.delete(object, &ids[i].1, origin).expect("delete");
            ids[i].2 = true;
        } else if let Some(&i) = dead.first() {
            org.undelete(object, &ids[i].1, origin).expect("undelete");
            ids[i].2 = false;
        }
        if n % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    assert!(kills >= 3, "the subscriber was killed {kills} times");

    let t0 = std::time::Instant::now();
    loop {
        let mut drift = Vec::new();
        for o in OBJECTS {
            drift.extend(object_drift(&emulator, &db, "salesforce", o).await);
        }
        if drift.is_empty() {
            break;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let queue: Vec<String> = client
                .query(
                    "SELECT object || ' ' || kind || ' ' || coalesce(record_id, '') || ' '
                            || reason || ' ' || coalesce(last_error, '')
                     FROM sfmirror.repair_queue UNION ALL
                     SELECT 'dead letter ' || error FROM sfmirror.dead_letters",
                    &[],
                )
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect())
                .unwrap_or_default();
            panic!(
                "seed {seed}: replica differs from the org after {kills} kills: {:#?}\nqueue: {queue:#?}",
                &drift[..drift.len().min(20)]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Every repair drains (the first start's snapshot, and any same-second re-reads).
    let t0 = std::time::Instant::now();
    loop {
        let left: Vec<String> = client
            .query(
                "SELECT object || ' ' || kind || ' ' || coalesce(record_id, '') || ' ' || reason
                        || ' attempts=' || attempts || ' ' || coalesce(last_error, '')
                 FROM sfmirror.repair_queue",
                &[],
            )
            .await
            .expect("queue")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "seed {seed}: repairs left: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.stop().await;
    emulator.stop().await;
}
