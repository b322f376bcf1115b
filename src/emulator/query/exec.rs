//! Running a bound query over the org: the parent records its relationship paths reach, the
//! matching records (joined, filtered, sorted, offset, limited), aggregate rows, and the
//! child records of parent-to-child subqueries. The SOQL engine decides what each step means;
//! this module only gathers records from the store for it, one object scan at a time.

use crate::emulator::soql::{Catalog, Parents, Query as Soql};
use crate::emulator::store::{ObjectDef, Org, Record};
use serde_json::Value as J;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The org's objects, for binding relationship paths and subqueries.
pub(super) struct OrgCatalog<'a>(pub(super) &'a Org);

impl Catalog for OrgCatalog<'_> {
    fn object(&self, name: &str) -> Option<Arc<ObjectDef>> {
        super::find_object(self.0, name)
    }
}

/// Every record of each object the joins of `q` (and of its subqueries) reach, by id; with
/// `all`, those in the recycle bin too.
fn parents(org: &Org, q: &Soql, all: bool) -> Parents {
    let mut targets: HashSet<&str> = HashSet::new();
    for j in q.joins() {
        targets.insert(&j.target);
    }
    for c in q.children() {
        for j in c.query.joins() {
            targets.insert(&j.target);
        }
    }
    let mut out = Parents::default();
    for target in targets {
        for (id, r) in org.scan(target, all, |r| {
            let id = r.get("Id").and_then(J::as_str)?.to_string();
            Some((id, r.clone()))
        }) {
            out.insert(target, id, r);
        }
    }
    out
}

/// The records of `q`'s object that match it, joined with their parents, in id order.
fn joined(org: &Org, q: &Soql, all: bool, parents: &Parents) -> Vec<Record> {
    if q.joins().is_empty() {
        return org.scan(&q.object, all, |r| q.matches(r).then(|| Record::clone(r)));
    }
    org.scan(&q.object, all, |r| {
        let mut r = Record::clone(r);
        q.join(&mut r, parents);
        q.matches(&r).then_some(r)
    })
}

/// What a query answers: records (joined with their parents, filtered, ordered, offset and
/// limited) with, per subquery, each record's children; or aggregate rows.
pub(super) struct Answer {
    pub(super) records: Vec<Record>,
    /// Per subquery, in `q.children()` order: the children of each record by its id.
    pub(super) children: Vec<HashMap<String, Vec<Record>>>,
}

/// Compound fields (addresses, locations) of `q` as REST's nested objects, in place.
fn project_compound(org: &Org, q: &Soql, records: &mut [Record]) {
    let Some(def) = super::find_object(org, &q.object) else {
        return;
    };
    if super::selects_compound(q, &def).is_none() {
        return;
    }
    for r in records.iter_mut() {
        let projected = q.project(&def.describe, r);
        r.extend(projected);
    }
}

/// Runs `q` (not `COUNT()`); with `all`, over the recycle bin too. Compound fields come as
/// REST's nested objects, in the records and their children.
pub(super) fn run(org: &Org, q: &Soql, all: bool) -> Answer {
    let parents = parents(org, q, all);
    let matched = joined(org, q, all, &parents);
    if q.is_aggregate() {
        return Answer {
            records: q.aggregate(matched.iter()),
            children: Vec::new(),
        };
    }
    let mut records = matched;
    q.sort(&mut records);
    let skip = q.offset().unwrap_or(0);
    records.drain(..skip.min(records.len()));
    if let Some(n) = q.limit() {
        records.truncate(n);
    }
    project_compound(org, q, &mut records);
    let ids: HashSet<&str> = records
        .iter()
        .filter_map(|r| r.get("Id").and_then(J::as_str))
        .collect();
    let children = q
        .children()
        .iter()
        .map(|c| {
            let mut by_parent: HashMap<String, Vec<Record>> = HashMap::new();
            for r in joined(org, &c.query, all, &parents) {
                let Some(parent) = r.get(&c.field).and_then(J::as_str) else {
                    continue;
                };
                if ids.contains(parent) {
                    by_parent.entry(parent.to_string()).or_default().push(r);
                }
            }
            for kids in by_parent.values_mut() {
                c.query.sort(kids);
                if let Some(n) = c.query.limit() {
                    kids.truncate(n);
                }
                project_compound(org, &c.query, kids);
            }
            by_parent
        })
        .collect();
    Answer { records, children }
}

/// How many records `COUNT()` counts.
pub(super) fn count(org: &Org, q: &Soql, all: bool) -> usize {
    let parents = parents(org, q, all);
    let n = joined(org, q, all, &parents).len();
    let n = n.saturating_sub(q.offset().unwrap_or(0));
    q.limit().map_or(n, |l| n.min(l))
}
