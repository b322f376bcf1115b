//! Values as SOQL compares them: literals, the comparison family a field's type gives
//! (case-insensitive text, exact ids, numbers, booleans, dates), record values read as that
//! family, ordering, and `LIKE` patterns. It holds Salesforce's comparison rules in one place
//! so that filters and `ORDER BY` agree; it knows no syntax and no record layout beyond one
//! JSON value.

use super::lexer::StrChar;
use crate::model::FieldType;
use crate::model::id::id18;
use crate::model::time::{date_ms, datetime_ms};
use serde_json::Value as J;
use std::cmp::Ordering;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum LitKind {
    Null,
    Bool(bool),
    Num {
        f: f64,
        i: Option<i64>,
    },
    Str(String),
    Date(i64),
    DateTime(i64),
    /// A relative date literal (`TODAY`, `LAST_N_DAYS:7`): `[start, end)` in epoch ms.
    Range(i64, i64),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Lit {
    pub(super) kind: LitKind,
}

/// How a field's values compare; chosen from the describe type when bound, or guessed from
/// the literal before binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    /// Case-insensitive text.
    Text,
    /// Record ids: exact, with 15-character literals widened to 18.
    Id,
    Number,
    Bool,
    Date,
    DateTime,
    /// Unbound `ORDER BY`: compare JSON values by their own kind.
    Auto,
}

/// A comparable value: literals after binding, and record values when evaluated.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Val {
    Null,
    /// Case-folded text.
    Text(String),
    Id(String),
    Num {
        f: f64,
        i: Option<i64>,
    },
    Bool(bool),
    /// Epoch milliseconds (dates at 00:00 UTC).
    Ms(i64),
    /// A relative date literal's `[start, end)`: a value before it is less, in it equal,
    /// after it greater, so `=`, `<`, `<=`, `>`, `>=` and `IN` read it as Salesforce does.
    Range(i64, i64),
}

impl Val {
    fn rank(&self) -> u8 {
        match self {
            Val::Null => 0,
            Val::Bool(_) => 1,
            Val::Num { .. } => 2,
            Val::Ms(_) | Val::Range(..) => 3,
            Val::Text(_) => 4,
            Val::Id(_) => 5,
        }
    }
}

pub(super) fn compare(a: &Val, b: &Val) -> Option<Ordering> {
    match (a, b) {
        (Val::Text(x), Val::Text(y)) | (Val::Id(x), Val::Id(y)) => Some(x.cmp(y)),
        (Val::Num { f: fa, i: ia }, Val::Num { f: fb, i: ib }) => match (ia, ib) {
            // Exact for longs beyond 2^53, which f64 would round together.
            (Some(x), Some(y)) => Some(x.cmp(y)),
            _ => fa.partial_cmp(fb),
        },
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        (Val::Ms(x), Val::Ms(y)) => Some(x.cmp(y)),
        (Val::Ms(x), Val::Range(start, end)) => Some(if x < start {
            Ordering::Less
        } else if x >= end {
            Ordering::Greater
        } else {
            Ordering::Equal
        }),
        _ => None,
    }
}

/// A total order for sorting, where mismatched kinds (only possible unbound) still order.
pub(super) fn order(a: &Val, b: &Val) -> Ordering {
    compare(a, b).unwrap_or_else(|| a.rank().cmp(&b.rank()))
}

/// Case folding shared by `=`, `LIKE` and ordering, so they agree on what "same text" means.
fn fold(s: &str) -> String {
    s.chars().flat_map(char::to_lowercase).collect()
}

fn num_val(n: &serde_json::Number) -> Option<Val> {
    Some(Val::Num {
        f: n.as_f64()?,
        i: n.as_i64(),
    })
}

fn parse_num(s: &str) -> Option<Val> {
    let f: f64 = s.parse().ok().filter(|f: &f64| f.is_finite())?;
    Some(Val::Num {
        f,
        i: s.parse().ok(),
    })
}

/// The 18-character form of a 15- or 18-character id; `None` if `s` is not id-shaped.
fn canonical_id(s: &str) -> Option<String> {
    if !s.chars().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    match s.len() {
        15 => Some(id18(s)),
        18 => s.get(..15).map(id18),
        _ => None,
    }
}

/// A record's value as `family`; `None` is null (including values that do not parse as the
/// field's type, which Salesforce could never hold).
pub(super) fn value_of(family: Family, v: Option<&J>) -> Option<Val> {
    let v = match v {
        None | Some(J::Null) => {
            // Salesforce: "null matches FALSE values" on boolean fields.
            return (family == Family::Bool).then_some(Val::Bool(false));
        }
        Some(v) => v,
    };
    match family {
        Family::Text => match v {
            J::String(s) => Some(Val::Text(fold(s))),
            J::Number(n) => Some(Val::Text(n.to_string())),
            J::Bool(b) => Some(Val::Text(b.to_string())),
            _ => None,
        },
        Family::Id => match v {
            J::String(s) => Some(Val::Id(canonical_id(s).unwrap_or_else(|| s.clone()))),
            _ => None,
        },
        Family::Number => match v {
            J::Number(n) => num_val(n),
            J::String(s) => parse_num(s.trim()),
            _ => None,
        },
        Family::Bool => Some(Val::Bool(match v {
            J::Bool(b) => *b,
            J::String(s) => s.eq_ignore_ascii_case("true"),
            _ => false,
        })),
        Family::Date => match v {
            J::String(s) => date_ms(s).map(Val::Ms),
            _ => None,
        },
        Family::DateTime => match v {
            J::String(s) => datetime_ms(s).map(Val::Ms),
            _ => None,
        },
        Family::Auto => match v {
            J::String(s) => Some(Val::Text(fold(s))),
            J::Number(n) => num_val(n),
            J::Bool(b) => Some(Val::Bool(*b)),
            _ => None,
        },
    }
}

pub(super) fn family_of(kind: &FieldType) -> Family {
    match kind {
        FieldType::Id | FieldType::Reference => Family::Id,
        FieldType::Boolean => Family::Bool,
        FieldType::Int
        | FieldType::Long
        | FieldType::Double
        | FieldType::Currency
        | FieldType::Percent => Family::Number,
        FieldType::Date => Family::Date,
        FieldType::Datetime => Family::DateTime,
        _ => Family::Text,
    }
}

/// The type name Salesforce uses in filter messages.
pub(super) fn type_name(kind: &FieldType) -> &'static str {
    match kind {
        FieldType::Id | FieldType::Reference => "id",
        FieldType::Boolean => "boolean",
        FieldType::Int => "integer",
        FieldType::Long => "long",
        FieldType::Double | FieldType::Currency | FieldType::Percent => "double",
        FieldType::Date => "date",
        FieldType::Datetime => "dateTime",
        _ => "string",
    }
}

/// The family a literal implies when no describe is known yet.
pub(super) fn guess_family(lits: &[Lit]) -> Family {
    lits.iter()
        .find_map(|l| match l.kind {
            LitKind::Null => None,
            LitKind::Bool(_) => Some(Family::Bool),
            LitKind::Num { .. } => Some(Family::Number),
            LitKind::Str(_) => Some(Family::Text),
            LitKind::Date(_) => Some(Family::Date),
            LitKind::DateTime(_) | LitKind::Range(..) => Some(Family::DateTime),
        })
        .unwrap_or(Family::Text)
}

/// A literal as `family`, or `None` if it is of another type.
pub(super) fn literal_as(family: Family, lit: &Lit) -> Option<Val> {
    match (family, &lit.kind) {
        (Family::Bool, LitKind::Null) => Some(Val::Bool(false)),
        (_, LitKind::Null) => Some(Val::Null),
        (Family::Text | Family::Auto, LitKind::Str(s)) => Some(Val::Text(fold(s))),
        (Family::Id, LitKind::Str(s)) => canonical_id(s).map(Val::Id),
        (Family::Number | Family::Auto, LitKind::Num { f, i }) => Some(Val::Num { f: *f, i: *i }),
        (Family::Bool | Family::Auto, LitKind::Bool(b)) => Some(Val::Bool(*b)),
        (Family::Date, LitKind::Date(ms)) | (Family::DateTime, LitKind::DateTime(ms)) => {
            Some(Val::Ms(*ms))
        }
        (Family::Date | Family::DateTime | Family::Auto, LitKind::Range(start, end)) => {
            Some(Val::Range(*start, *end))
        }
        _ => None,
    }
}

/// One `LIKE` pattern element, literal characters already case-folded.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Pat {
    Lit(char),
    One,
    Any,
}

pub(super) fn compile_like(chars: &[StrChar]) -> Vec<Pat> {
    let mut out = Vec::new();
    for c in chars {
        match *c {
            StrChar::Plain('%') => {
                // Consecutive `%` mean the same as one; collapsing keeps matching linear-ish.
                if out.last() != Some(&Pat::Any) {
                    out.push(Pat::Any);
                }
            }
            StrChar::Plain('_') => out.push(Pat::One),
            StrChar::Plain(c) | StrChar::Escaped(c) => out.extend(c.to_lowercase().map(Pat::Lit)),
        }
    }
    out
}

/// Wildcard matching with single-star backtracking: O(len(p) * len(s)) at worst, no recursion.
pub(super) fn like_match(p: &[Pat], s: &[char]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match (p.get(pi), s.get(si)) {
            (Some(Pat::Any), _) => {
                star = Some((pi, si));
                pi += 1;
                continue;
            }
            (Some(Pat::One), _) => {
                pi += 1;
                si += 1;
                continue;
            }
            (Some(Pat::Lit(c)), Some(d)) if c == d => {
                pi += 1;
                si += 1;
                continue;
            }
            _ => {}
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    while p.get(pi) == Some(&Pat::Any) {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_matcher_backtracks() {
        let p = compile_like(&"a%b%c".chars().map(StrChar::Plain).collect::<Vec<_>>());
        let m = |s: &str| like_match(&p, &s.chars().collect::<Vec<_>>());
        assert!(m("abc") && m("aXbYc") && m("abbbc") && m("abcbc"));
        assert!(!m("acb") && !m("ab") && !m("xabc"));
        let empty = compile_like(&[]);
        assert!(like_match(&empty, &[]));
        assert!(!like_match(&empty, &['a']));
    }
}
