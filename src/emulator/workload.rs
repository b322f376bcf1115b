//! Generated activity for the emulator: valid random values for any object of the org (from
//! its describe alone, so a user's own org works too), seeding records, a steady random
//! workload at a given rate, and a pre-built backlog of change events for benchmarks.
//!
//! Everything goes through the same [`Org`] mutations as REST calls, so every change produces
//! the event Salesforce would; it must not write records any other way.

use super::store::{ApiError, ObjectDef, Org};
use crate::model::{FieldDescribe, FieldType};
use base64::Engine;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value as J};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const ORIGIN: &str = "com/salesforce/api/rest/62.0;client=sfmirror-emulator-workload";

/// The objects a workload or backlog uses when none are named.
pub const DEFAULT_OBJECTS: &[&str] = &["Account", "Contact", "Opportunity"];

/// Can the workload set this field?
fn settable(f: &FieldDescribe, creating: bool) -> bool {
    let allowed = if creating { f.createable } else { f.updateable };
    allowed
        && !f.calculated
        && !matches!(
            f.kind(),
            FieldType::Id | FieldType::Reference | FieldType::Address | FieldType::Location
        )
}

fn picklist_values(def: &ObjectDef, field: &str) -> Vec<String> {
    def.raw
        .get("fields")
        .and_then(J::as_array)
        .and_then(|fields| {
            fields
                .iter()
                .find(|f| f.get("name").and_then(J::as_str) == Some(field))
        })
        .and_then(|f| f.get("picklistValues"))
        .and_then(J::as_array)
        .map(|values| {
            values
                .iter()
                .filter(|v| v.get("active").and_then(J::as_bool).unwrap_or(true))
                .filter_map(|v| v.get("value").and_then(J::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn words(rng: &mut SmallRng, n: usize) -> String {
    const WORDS: &[&str] = &[
        "acme", "blue", "cloud", "delta", "ember", "field", "global", "harbor", "iron", "jade",
        "kite", "lumen", "maple", "north", "orbit", "pine", "quartz", "river", "stone", "tide",
    ];
    (0..n)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn fit(mut s: String, length: i64) -> String {
    if length > 0 && s.chars().count() as i64 > length {
        s = s.chars().take(length as usize).collect();
    }
    s
}

/// A number that fits the field's precision and scale.
fn number(f: &FieldDescribe, rng: &mut SmallRng) -> f64 {
    let int_digits = if f.precision > 0 {
        (f.precision - f.scale).clamp(1, 6)
    } else {
        5
    };
    let max = 10f64.powi(int_digits as i32) - 1.0;
    let scale = if f.precision > 0 {
        f.scale.clamp(0, 4)
    } else {
        2
    };
    let m = 10f64.powi(scale as i32);
    let x: f64 = rng.random_range(-max.min(90.0)..max);
    (x * m).round() / m
}

/// A valid random value for `f` (never null).
pub fn random_value(def: &ObjectDef, f: &FieldDescribe, rng: &mut SmallRng, n: u64) -> J {
    match f.kind() {
        FieldType::Boolean => J::Bool(rng.random_bool(0.5)),
        FieldType::Int | FieldType::Long => {
            let digits = if f.digits > 0 { f.digits.min(9) } else { 6 };
            J::from(rng.random_range(0..10i64.pow(digits as u32)))
        }
        FieldType::Double | FieldType::Currency | FieldType::Percent => J::from(number(f, rng)),
        FieldType::Date => J::String(format!(
            "20{:02}-{:02}-{:02}",
            rng.random_range(20..30),
            rng.random_range(1..13),
            rng.random_range(1..29)
        )),
        FieldType::Datetime => J::String(format!(
            "20{:02}-{:02}-{:02}T{:02}:{:02}:{:02}.000+0000",
            rng.random_range(20..30),
            rng.random_range(1..13),
            rng.random_range(1..29),
            rng.random_range(0..24),
            rng.random_range(0..60),
            rng.random_range(0..60)
        )),
        FieldType::Time => J::String(format!(
            "{:02}:{:02}:{:02}.{:03}Z",
            rng.random_range(0..24),
            rng.random_range(0..60),
            rng.random_range(0..60),
            rng.random_range(0..1000)
        )),
        FieldType::Picklist | FieldType::Combobox => {
            let values = picklist_values(def, &f.name);
            if values.is_empty() {
                J::String(fit(words(rng, 2), f.length))
            } else {
                J::String(values[rng.random_range(0..values.len())].clone())
            }
        }
        FieldType::Multipicklist => {
            let values = picklist_values(def, &f.name);
            if values.is_empty() {
                J::String(fit(words(rng, 1), f.length))
            } else {
                let a = &values[rng.random_range(0..values.len())];
                let b = &values[rng.random_range(0..values.len())];
                J::String(if a == b {
                    a.clone()
                } else {
                    format!("{a};{b}")
                })
            }
        }
        FieldType::Email => J::String(format!("user{n}.{}@example.com", rng.random_range(0..1000))),
        FieldType::Phone => J::String(format!("+1 555 {:04}", rng.random_range(0..10_000))),
        FieldType::Url => J::String(format!("https://example.com/{n}/{}", words(rng, 1))),
        FieldType::Base64 => {
            let bytes: Vec<u8> = (0..rng.random_range(1..48)).map(|_| rng.random()).collect();
            J::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        FieldType::Textarea if f.length > 255 => {
            // Long texts, sometimes long enough that their updates travel as diffs.
            let lines = if rng.random_bool(0.3) { 30 } else { 2 };
            let text = (0..lines)
                .map(|i| format!("{i}: {}", words(rng, 8)))
                .collect::<Vec<_>>()
                .join("\n");
            J::String(fit(text, f.length))
        }
        _ => J::String(fit(
            format!("{} {n} {}", f.label, words(rng, 2)),
            f.length.max(1),
        )),
    }
}

/// Values for a new record: every required field, and most others.
pub fn random_record(def: &ObjectDef, rng: &mut SmallRng, n: u64) -> Map<String, J> {
    let mut out = Map::new();
    for f in def.describe.fields.iter().filter(|f| settable(f, true)) {
        let required = !f.nillable && !f.defaulted_on_create && f.kind() != FieldType::Boolean;
        if required || rng.random_bool(0.6) {
            out.insert(f.name.clone(), random_value(def, f, rng, n));
        }
    }
    out
}

/// One to three field changes for an update, sometimes clearing a nillable field.
pub fn random_update(def: &ObjectDef, rng: &mut SmallRng, n: u64) -> Map<String, J> {
    let candidates: Vec<&FieldDescribe> = def
        .describe
        .fields
        .iter()
        .filter(|f| settable(f, false))
        .collect();
    let mut out = Map::new();
    if candidates.is_empty() {
        return out;
    }
    for _ in 0..rng.random_range(1..=3) {
        let f = candidates[rng.random_range(0..candidates.len())];
        let v = if f.nillable && f.kind() != FieldType::Boolean && rng.random_bool(0.1) {
            J::Null
        } else {
            random_value(def, f, rng, n)
        };
        out.insert(f.name.clone(), v);
    }
    out
}

/// Creates `count` records of `object` (each with its CREATE event when `events`); returns
/// their ids.
pub fn seed(
    org: &Org,
    object: &str,
    count: usize,
    seed: u64,
    events: bool,
) -> Result<Vec<String>, ApiError> {
    let def = org.object(object)?;
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let fields = random_record(&def, &mut rng, i as u64);
            if events {
                org.create(object, &fields, ORIGIN)
            } else {
                org.create_silently(object, &fields)
            }
        })
        .collect()
}

/// A random mix of changes over some objects: creates, updates, deletes and undeletes.
pub struct Mix {
    objects: Vec<Arc<ObjectDef>>,
    /// Live records (object index, id); deleted ones (for undeletes).
    live: Vec<(usize, String)>,
    deleted: Vec<(usize, String)>,
    rng: SmallRng,
    n: u64,
}

impl Mix {
    pub fn new(org: &Org, objects: &[String], seed: u64) -> Result<Mix, ApiError> {
        let objects = objects
            .iter()
            .map(|o| org.object(o))
            .collect::<Result<Vec<_>, _>>()?;
        if objects.is_empty() {
            return Err(ApiError::new(400, "INVALID_TYPE", "no objects to work on"));
        }
        Ok(Mix {
            objects,
            live: Vec::new(),
            deleted: Vec::new(),
            rng: SmallRng::seed_from_u64(seed),
            n: 0,
        })
    }

    /// Makes one change; `Ok(false)` when the chosen change did not apply (e.g. the record
    /// was deleted meanwhile through REST) and nothing was published.
    pub fn step(&mut self, org: &Org) -> Result<bool, ApiError> {
        self.n += 1;
        let roll = self.rng.random_range(0..100);
        if roll < 40 || self.live.len() < 10 {
            let o = self.rng.random_range(0..self.objects.len());
            let def = &self.objects[o];
            let fields = random_record(def, &mut self.rng, self.n);
            let id = org.create(&def.describe.name, &fields, ORIGIN)?;
            self.live.push((o, id));
            return Ok(true);
        }
        if roll < 88 {
            let (o, id) = self.live[self.rng.random_range(0..self.live.len())].clone();
            let def = &self.objects[o];
            let fields = random_update(def, &mut self.rng, self.n);
            return Ok(org.update(&def.describe.name, &id, &fields, ORIGIN).is_ok());
        }
        if roll < 97 || self.deleted.is_empty() {
            let (o, id) = self
                .live
                .swap_remove(self.rng.random_range(0..self.live.len()));
            let done = org
                .delete(&self.objects[o].describe.name, &id, ORIGIN)
                .is_ok();
            if done {
                self.deleted.push((o, id));
            }
            return Ok(done);
        }
        let (o, id) = self
            .deleted
            .swap_remove(self.rng.random_range(0..self.deleted.len()));
        let done = org
            .undelete(&self.objects[o].describe.name, &id, ORIGIN)
            .is_ok();
        if done {
            self.live.push((o, id));
        }
        Ok(done)
    }
}

/// A pre-built backlog: `events` change events over `objects`.
#[derive(Debug, Clone)]
pub struct BacklogSpec {
    pub events: usize,
    pub objects: Vec<String>,
}

impl std::str::FromStr for BacklogSpec {
    type Err = String;

    /// `N` or `N:Object,Object`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (n, objects) = match s.split_once(':') {
            Some((n, o)) => (
                n,
                o.split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            None => (s, DEFAULT_OBJECTS.iter().map(|o| o.to_string()).collect()),
        };
        let events = n
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: expected N or N:Object,Object (N a count of events)"))?;
        Ok(BacklogSpec { events, objects })
    }
}

/// Generates the backlog; returns the number of events published.
pub fn build_backlog(org: &Org, spec: &BacklogSpec) -> Result<usize, ApiError> {
    let mut mix = Mix::new(org, &spec.objects, 0x5f3759df)?;
    let mut made = 0;
    while made < spec.events {
        if mix.step(org)? {
            made += 1;
        }
    }
    Ok(made)
}

/// The control API's steady workload.
#[derive(Default)]
pub struct Workload {
    running: Mutex<Option<Running>>,
}

struct Running {
    stop: CancellationToken,
    rate: f64,
    objects: Vec<String>,
    changes: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    started: Instant,
}

impl Workload {
    /// Starts (or restarts) changes at `rate` per second over `objects`.
    pub fn start(&self, org: Arc<Org>, rate: f64, objects: Vec<String>) -> Result<(), ApiError> {
        if !(rate > 0.0 && rate <= 1_000_000.0) {
            return Err(ApiError::new(
                400,
                "INVALID_FIELD",
                "`rate` must be between 0 and 1,000,000 changes a second",
            ));
        }
        let mut mix = Mix::new(&org, &objects, rand::random())?;
        self.stop();
        let stop = CancellationToken::new();
        let changes = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (stopped, made, failed) = (stop.clone(), changes.clone(), errors.clone());
        tokio::spawn(async move {
            // Ticks of 10 ms; each tick catches up to where the rate says we should be, so
            // the average holds even when a tick runs late.
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let due = (started.elapsed().as_secs_f64() * rate) as u64;
                while made.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < due {
                    match mix.step(&org) {
                        Ok(_) => made.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            tracing::debug!(error = %e.message, "workload change refused");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }
        });
        if let Ok(mut r) = self.running.lock() {
            *r = Some(Running {
                stop,
                rate,
                objects,
                changes,
                errors,
                started: Instant::now(),
            });
        }
        Ok(())
    }

    /// Stops the workload; returns how many changes it made.
    pub fn stop(&self) -> u64 {
        let running = self.running.lock().ok().and_then(|mut r| r.take());
        match running {
            Some(r) => {
                r.stop.cancel();
                r.changes.load(Ordering::Relaxed)
            }
            None => 0,
        }
    }

    /// What is running, for stats.
    pub fn status(&self) -> J {
        let guard = self.running.lock();
        match guard.as_ref().ok().and_then(|r| r.as_ref()) {
            Some(r) => serde_json::json!({
                "running": true,
                "rate": r.rate,
                "objects": r.objects,
                "changes": r.changes.load(Ordering::Relaxed),
                "errors": r.errors.load(Ordering::Relaxed),
                "seconds": r.started.elapsed().as_secs_f64(),
            }),
            None => serde_json::json!({"running": false}),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn org() -> Org {
        Org::new(super::super::load_org(None).expect("built-in org")).expect("org")
    }

    #[test]
    fn random_records_are_valid_for_every_object_of_the_built_in_org() {
        let org = org();
        for object in org.object_names() {
            let ids =
                seed(&org, &object, 30, 7, true).unwrap_or_else(|e| panic!("{object}: {e:?}"));
            assert_eq!(ids.len(), 30);
            let def = org.object(&object).expect("object");
            let mut rng = SmallRng::seed_from_u64(3);
            for (i, id) in ids.iter().enumerate() {
                let change = random_update(&def, &mut rng, i as u64);
                org.update(&object, id, &change, ORIGIN)
                    .unwrap_or_else(|e| panic!("{object} update {change:?}: {e:?}"));
            }
        }
    }

    #[test]
    fn a_backlog_has_exactly_the_events_asked_for() {
        let org = org();
        let before = org.bus.counts()["/data/ChangeEvents"];
        let spec: BacklogSpec = "500:Account,Contact".parse().expect("spec");
        assert_eq!(build_backlog(&org, &spec).expect("backlog"), 500);
        assert_eq!(org.bus.counts()["/data/ChangeEvents"] - before, 500);
        assert!("x:Account".parse::<BacklogSpec>().is_err());
    }
}
