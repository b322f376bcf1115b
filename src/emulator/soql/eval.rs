//! Evaluation: what a bound [`Query`] answers over records. The WHERE clause with
//! Salesforce's two-valued logic, `ORDER BY` with its null placement, `LIMIT`, and projection
//! of the selected fields (compound addresses and locations as REST's nested objects). It
//! reads records and never changes them; it must not parse or resolve names.

use super::Query;
use super::lexer::CmpOp;
use super::parser::{Cond, CondOp, Expr};
use super::value::{Val, compare, like_match, order, value_of};
use crate::emulator::store::Record;
use crate::model::{FieldDescribe, FieldType, ObjectDescribe};
use serde_json::{Map, Value as J};
use std::cmp::Ordering;

impl Cond {
    pub(super) fn eval(&self, record: &Record, bound: bool) -> bool {
        let v = value_of(self.family, lookup(record, &self.field, bound));
        match &self.op {
            CondOp::Cmp(op) => {
                let Some(lit) = self.vals.first() else {
                    return false;
                };
                match (op, lit, v) {
                    (CmpOp::Eq, Val::Null, v) => v.is_none(),
                    (CmpOp::Ne, Val::Null, v) => v.is_some(),
                    (_, Val::Null, _) => false,
                    (op, _, None) => *op == CmpOp::Ne,
                    (op, lit, Some(v)) => match compare(&v, lit) {
                        Some(o) => op.holds(o),
                        None => *op == CmpOp::Ne,
                    },
                }
            }
            CondOp::Like(pattern) => match v {
                Some(Val::Text(s)) => {
                    let chars: Vec<char> = s.chars().collect();
                    like_match(pattern, &chars)
                }
                _ => false,
            },
            CondOp::In => self.contains(v.as_ref()),
            CondOp::NotIn => !self.contains(v.as_ref()),
        }
    }

    fn contains(&self, v: Option<&Val>) -> bool {
        match v {
            None => self.vals.contains(&Val::Null),
            Some(v) => self
                .vals
                .iter()
                .any(|l| compare(v, l) == Some(Ordering::Equal)),
        }
    }
}

impl Expr {
    pub(super) fn eval(&self, record: &Record, bound: bool) -> bool {
        match self {
            Expr::Cond(c) => c.eval(record, bound),
            Expr::And(es) => es.iter().all(|e| e.eval(record, bound)),
            Expr::Or(es) => es.iter().any(|e| e.eval(record, bound)),
            Expr::Not(e) => !e.eval(record, bound),
        }
    }
}

/// A field's value in a record: exact key, or (before binding, when names are as typed) any
/// key equal ignoring case.
fn lookup<'a>(record: &'a Record, name: &str, bound: bool) -> Option<&'a J> {
    record.get(name).or_else(|| {
        if bound {
            return None;
        }
        record
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    })
}

/// The REST shape of a compound field: an object of its components, or null if all are null.
fn compound_value(d: &ObjectDescribe, parent: &FieldDescribe, record: &Record) -> J {
    const ADDRESS: &[(&str, &str)] = &[
        ("city", "City"),
        ("country", "Country"),
        ("geocodeAccuracy", "GeocodeAccuracy"),
        ("latitude", "Latitude"),
        ("longitude", "Longitude"),
        ("postalCode", "PostalCode"),
        ("state", "State"),
        ("street", "Street"),
    ];
    // Only orgs with state and country picklists have these components; Salesforce then
    // includes them in the address.
    const ADDRESS_CODES: &[(&str, &str)] =
        &[("countryCode", "CountryCode"), ("stateCode", "StateCode")];
    const LOCATION: &[(&str, &str)] = &[("latitude", "Latitude"), ("longitude", "Longitude")];
    let mut out = Map::new();
    let mut any = false;
    let parts = if parent.kind() == FieldType::Location {
        LOCATION
    } else {
        ADDRESS
    };
    for (key, sub) in parts {
        let v = d
            .component(&parent.name, sub)
            .and_then(|c| record.get(&c.name))
            .cloned()
            .unwrap_or(J::Null);
        any |= !v.is_null();
        out.insert((*key).to_string(), v);
    }
    if parent.kind() == FieldType::Address {
        for (key, sub) in ADDRESS_CODES {
            if let Some(c) = d.component(&parent.name, sub) {
                let v = record.get(&c.name).cloned().unwrap_or(J::Null);
                any |= !v.is_null();
                out.insert((*key).to_string(), v);
            }
        }
    }
    if any { J::Object(out) } else { J::Null }
}

impl Query {
    /// Whether `record` satisfies the WHERE clause (true without one).
    pub fn matches(&self, record: &Record) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|f| f.eval(record, self.bound))
    }

    /// Orders records by ORDER BY (stable: ties keep their input order).
    pub fn sort(&self, records: &mut [Record]) {
        if self.order.is_empty() || records.len() < 2 {
            return;
        }
        // Keys are computed once: datetimes parse from strings, too slow per comparison.
        let keys: Vec<Vec<Option<Val>>> = records
            .iter()
            .map(|r| {
                self.order
                    .iter()
                    .map(|k| value_of(k.family, lookup(r, &k.field, self.bound)))
                    .collect()
            })
            .collect();
        let mut idx: Vec<usize> = (0..records.len()).collect();
        idx.sort_by(|&a, &b| {
            for (n, key) in self.order.iter().enumerate() {
                let va = keys.get(a).and_then(|k| k.get(n)).and_then(Option::as_ref);
                let vb = keys.get(b).and_then(|k| k.get(n)).and_then(Option::as_ref);
                let o = match (va, vb) {
                    (None, None) => Ordering::Equal,
                    (None, Some(_)) if key.nulls_first => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (Some(_), None) if key.nulls_first => Ordering::Greater,
                    (Some(_), None) => Ordering::Less,
                    (Some(x), Some(y)) if key.desc => order(y, x),
                    (Some(x), Some(y)) => order(x, y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
        let mut taken: Vec<Option<Record>> = records
            .iter_mut()
            .map(|r| Some(std::mem::take(r)))
            .collect();
        for (slot, i) in records.iter_mut().zip(idx) {
            *slot = taken.get_mut(i).and_then(Option::take).unwrap_or_default();
        }
    }

    /// The selected fields of `record`, with compound address / location fields as nested
    /// objects like REST. Inserted in SELECT order, but this crate's `serde_json` lacks
    /// `preserve_order`, so a `Record` iterates by key: a caller that must emit SELECT order
    /// (Bulk CSV columns) walks [`Query::fields`] and reads each key from the result.
    pub fn project(&self, describe: &ObjectDescribe, record: &Record) -> Record {
        let mut out = Record::new();
        for name in &self.fields {
            let field = describe
                .fields
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(name));
            let v = match field {
                Some(f) if f.kind().is_compound() => compound_value(describe, f, record),
                _ => lookup(record, name, self.bound).cloned().unwrap_or(J::Null),
            };
            out.insert(name.clone(), v);
        }
        out
    }

    /// Filters, sorts and limits `records` (whole records; `project` shapes them).
    pub fn run<'a>(&self, records: impl Iterator<Item = &'a Record>) -> Vec<Record> {
        let matching = records.filter(|r| self.matches(r));
        let skip = self.offset.unwrap_or(0);
        let mut out: Vec<Record> = match (self.order.is_empty(), self.limit) {
            // Without ORDER BY the first n matches are the answer; stop early.
            (true, Some(n)) => matching.take(n.saturating_add(skip)).cloned().collect(),
            _ => matching.cloned().collect(),
        };
        self.sort(&mut out);
        out.drain(..skip.min(out.len()));
        if let Some(n) = self.limit {
            out.truncate(n);
        }
        out
    }
}
