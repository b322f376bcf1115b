//! Aggregate queries: rows grouped by GROUP BY (or one row for the whole result), the
//! aggregate functions over each group, then HAVING, ORDER BY, OFFSET and LIMIT over the
//! groups. A result row holds each grouped field under its path and each aggregate under its
//! key (alias, `exprN`, or a hidden key for those only HAVING or ORDER BY use); the caller
//! shapes it as an `AggregateResult` with [`Query::output_key`].
//!
//! As in Salesforce: COUNT and COUNT_DISTINCT count non-null values; SUM, AVG, MIN and MAX
//! ignore nulls and are null over none; text groups ignore case; without GROUP BY there is
//! exactly one row, even over no records.

use super::Query;
use super::items::{Agg, AggFunc};
use super::value::{Val, compare, order, value_of};
use crate::emulator::store::Record;
use serde_json::Value as J;
use std::cmp::Ordering;
use std::collections::HashSet;

/// One aggregate's running state over a group.
#[derive(Default)]
struct Acc {
    count: u64,
    distinct: HashSet<String>,
    sum: f64,
    /// The exact sum while every value is a whole number.
    int_sum: Option<i128>,
    best: Option<(Val, J)>,
}

impl Acc {
    fn new() -> Acc {
        Acc {
            int_sum: Some(0),
            ..Acc::default()
        }
    }

    fn add(&mut self, a: &Agg, raw: Option<&J>) {
        let Some(raw) = raw.filter(|v| !v.is_null()) else {
            return;
        };
        let Some(v) = value_of(a.family, Some(raw)) else {
            return;
        };
        self.count += 1;
        match a.func {
            AggFunc::Count => {}
            AggFunc::CountDistinct => {
                self.distinct.insert(format!("{v:?}"));
            }
            AggFunc::Sum | AggFunc::Avg => {
                if let Val::Num { f, i } = v {
                    self.sum += f;
                    self.int_sum = match (self.int_sum, i) {
                        (Some(s), Some(i)) => s.checked_add(i128::from(i)),
                        _ => None,
                    };
                }
            }
            AggFunc::Min | AggFunc::Max => {
                let better = match &self.best {
                    None => true,
                    Some((b, _)) => {
                        let o = order(&v, b);
                        if a.func == AggFunc::Min {
                            o == Ordering::Less
                        } else {
                            o == Ordering::Greater
                        }
                    }
                };
                if better {
                    self.best = Some((v, raw.clone()));
                }
            }
        }
    }

    fn value(&self, func: AggFunc) -> J {
        match func {
            AggFunc::Count => J::from(self.count),
            AggFunc::CountDistinct => J::from(self.distinct.len()),
            _ if self.count == 0 => J::Null,
            AggFunc::Sum => match self.int_sum.and_then(|s| i64::try_from(s).ok()) {
                Some(s) => J::from(s),
                None => J::from(self.sum),
            },
            // Salesforce returns an average as a decimal number.
            AggFunc::Avg => J::from(self.sum / self.count as f64),
            AggFunc::Min | AggFunc::Max => self
                .best
                .as_ref()
                .map(|(_, raw)| raw.clone())
                .unwrap_or(J::Null),
        }
    }
}

struct Group {
    key: Vec<Option<Val>>,
    /// The grouped values as the first record of the group has them.
    values: Vec<J>,
    accs: Vec<Acc>,
}

impl Query {
    /// The aggregate rows over `records` (already joined and matching the WHERE clause),
    /// grouped, filtered by HAVING, sorted, offset and limited.
    pub fn aggregate<'a>(&self, records: impl Iterator<Item = &'a Record>) -> Vec<Record> {
        let mut groups: Vec<Group> = Vec::new();
        for r in records {
            let key: Vec<Option<Val>> = self
                .group_by
                .iter()
                .map(|(g, fam)| value_of(*fam, r.get(g)))
                .collect();
            let i = match groups.iter().position(|g| same_key(&g.key, &key)) {
                Some(i) => i,
                None => {
                    groups.push(Group {
                        key,
                        values: self
                            .group_by
                            .iter()
                            .map(|(g, _)| r.get(g).cloned().unwrap_or(J::Null))
                            .collect(),
                        accs: self.aggs.iter().map(|_| Acc::new()).collect(),
                    });
                    groups.len() - 1
                }
            };
            if let Some(g) = groups.get_mut(i) {
                for (acc, a) in g.accs.iter_mut().zip(&self.aggs) {
                    acc.add(a, r.get(&a.arg));
                }
            }
        }
        if self.group_by.is_empty() && groups.is_empty() {
            groups.push(Group {
                key: Vec::new(),
                values: Vec::new(),
                accs: self.aggs.iter().map(|_| Acc::new()).collect(),
            });
        }
        // Groups come sorted by their grouped values unless ORDER BY says otherwise.
        groups.sort_by(|a, b| {
            for (x, y) in a.key.iter().zip(&b.key) {
                let o = match (x, y) {
                    (None, None) => Ordering::Equal,
                    (None, Some(_)) => Ordering::Less,
                    (Some(_), None) => Ordering::Greater,
                    (Some(x), Some(y)) => order(x, y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
            Ordering::Equal
        });
        let mut rows: Vec<Record> = groups
            .into_iter()
            .map(|g| {
                let mut row = Record::new();
                for ((name, _), v) in self.group_by.iter().zip(g.values) {
                    row.insert(name.clone(), v);
                }
                for (a, acc) in self.aggs.iter().zip(&g.accs) {
                    row.insert(a.key.clone(), acc.value(a.func));
                }
                row
            })
            .filter(|row| self.having.as_ref().is_none_or(|h| h.eval(row, true)))
            .collect();
        self.sort(&mut rows);
        let skip = self.offset.unwrap_or(0);
        rows.drain(..skip.min(rows.len()));
        if let Some(n) = self.limit {
            rows.truncate(n);
        }
        for row in rows.iter_mut() {
            for a in self.aggs.iter().filter(|a| a.hidden) {
                row.remove(&a.key);
            }
        }
        rows
    }
}

fn same_key(a: &[Option<Val>], b: &[Option<Val>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (None, None) => true,
            (Some(x), Some(y)) => compare(x, y) == Some(Ordering::Equal),
            _ => false,
        })
}
