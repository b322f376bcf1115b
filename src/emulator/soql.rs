//! The emulator's SOQL engine: parses the subset of SOQL that sfmirror and ordinary REST /
//! Bulk API 2.0 clients send, binds it against an object's describe, and evaluates it over
//! the store's records. The REST `query` / `queryAll` endpoints and Bulk query jobs own
//! paging, `attributes` and HTTP; this module owns what a query *means*.
//!
//! Supported: `SELECT f, ... | COUNT() FROM Object [WHERE ...] [ORDER BY ...] [LIMIT n]`, with
//! comparisons, `LIKE`, `IN` / `NOT IN`, `AND` / `OR` / `NOT`, and string, number, boolean,
//! `null`, date and datetime literals. Anything else that is valid SOQL (GROUP BY,
//! subqueries, relationship paths, TYPEOF, aggregates, date functions, relative date literals,
//! OFFSET, ...) is rejected with `MALFORMED_QUERY` naming the feature, so a client never gets a
//! silently different answer from the emulator than from Salesforce.
//!
//! Salesforce behaviours reproduced on purpose (they surprise people coming from SQL):
//! - `AND` and `OR` cannot be mixed without parentheses, and `NOT` inside an `AND`/`OR` chain
//!   must be parenthesized: `a AND b OR c` and `a AND NOT b` are `MALFORMED_QUERY`.
//! - Logic is two-valued: `x != v` and `x NOT IN (...)` are true when `x` is null; `<`, `>`,
//!   `LIKE`, `IN` are false for null (unless `IN` lists `null` explicitly).
//! - On boolean fields null is false: `IsX = null` is `IsX = false`.
//! - Text `=`, `IN`, `LIKE`, ordering and ranges ignore case; ids compare exactly, and a
//!   15-character id literal matches the 18-character form.
//! - Literals are typed by the field: a datetime field needs a datetime literal, a number
//!   field an unquoted number, a text field a quoted string (`INVALID_FIELD` otherwise).
//! - `ORDER BY` defaults to `NULLS FIRST` ascending and `NULLS LAST` descending.
//!
//! Nothing here panics on any input: every index is checked and nesting depth is bounded.

use super::store::Record;
use crate::model::id::id18;
use crate::model::time::{date_ms, datetime_ms};
use crate::model::{FieldDescribe, FieldType, ObjectDescribe};
use serde_json::{Map, Value as J};
use std::cmp::Ordering;
use std::fmt;

pub const MALFORMED_QUERY: &str = "MALFORMED_QUERY";
pub const INVALID_FIELD: &str = "INVALID_FIELD";
pub const INVALID_TYPE: &str = "INVALID_TYPE";
/// Salesforce's code for an operator or literal the field's type does not allow (`LIKE` on a
/// number, `<` on a boolean, a malformed id).
pub const INVALID_QUERY_FILTER_OPERATOR: &str = "INVALID_QUERY_FILTER_OPERATOR";

/// Bounds recursion on parenthesized conditions: deeper input would risk a stack overflow,
/// which aborts the process rather than failing one request.
const MAX_DEPTH: usize = 64;

/// An error as Salesforce reports it for a query (every one is HTTP 400).
#[derive(Debug, Clone, PartialEq)]
pub struct SoqlError {
    pub code: &'static str,
    pub message: String,
}

impl SoqlError {
    fn malformed(message: impl Into<String>) -> SoqlError {
        SoqlError {
            code: MALFORMED_QUERY,
            message: message.into(),
        }
    }

    fn invalid_field(message: impl Into<String>) -> SoqlError {
        SoqlError {
            code: INVALID_FIELD,
            message: message.into(),
        }
    }

    fn bad_operator(message: impl Into<String>) -> SoqlError {
        SoqlError {
            code: INVALID_QUERY_FILTER_OPERATOR,
            message: message.into(),
        }
    }
}

impl fmt::Display for SoqlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for SoqlError {}

/// The error for a `FROM` object the org does not have (the caller looks objects up).
pub fn invalid_type(object: &str) -> SoqlError {
    SoqlError {
        code: INVALID_TYPE,
        message: format!(
            "sObject type '{object}' is not supported. If you are attempting to use a custom \
             object, be sure to append the '__c' after the entity name. Please reference your \
             WSDL or the describe call for the appropriate names."
        ),
    }
}

fn no_such_column(name: &str, object: &str) -> SoqlError {
    SoqlError::invalid_field(format!(
        "No such column '{name}' on entity '{object}'. If you are attempting to use a custom \
         field, be sure to append the '__c' after the custom field name. Please reference your \
         WSDL or the describe call for the appropriate names."
    ))
}

// ---------------------------------------------------------------------------------------------
// Lexer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn holds(self, o: Ordering) -> bool {
        match self {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::Ne => o != Ordering::Equal,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::Le => o != Ordering::Greater,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Ge => o != Ordering::Less,
        }
    }

    fn is_range(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}

/// A character of a string literal. Escaping matters only to `LIKE`, where `\%` and `\_` are
/// literal while a bare `%` / `_` is a wildcard.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StrChar {
    Plain(char),
    Escaped(char),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A name or keyword; may contain dots (`Owner.Name`), which we reject as relationships.
    Ident(String),
    Str(Vec<StrChar>),
    Num(String),
    Date(i64),
    DateTime(i64),
    Cmp(CmpOp),
    Comma,
    LParen,
    RParen,
    Other(char),
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// 1-based character position in the query, as Salesforce counts columns.
    pos: usize,
    /// The source text, for messages.
    text: String,
}

fn lex(src: &str) -> Result<Vec<Token>, SoqlError> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        let start = i;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let tok = if c.is_ascii_alphabetic() || c == '_' {
            i += 1;
            while let Some(&d) = chars.get(i) {
                let next_starts_name = chars
                    .get(i + 1)
                    .is_some_and(|n| n.is_ascii_alphabetic() || *n == '_');
                if d.is_ascii_alphanumeric() || d == '_' || (d == '.' && next_starts_name) {
                    i += 1;
                } else {
                    break;
                }
            }
            Tok::Ident(chars[start..i].iter().collect())
        } else if c == '\'' {
            let (tok, end) = lex_string(&chars, start)?;
            i = end;
            tok
        } else if c.is_ascii_digit()
            || ((c == '-' || c == '+') && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            let (tok, end) = lex_number(&chars, start)?;
            i = end;
            tok
        } else {
            i += 1;
            let next = chars.get(i).copied();
            match c {
                ',' => Tok::Comma,
                '(' => Tok::LParen,
                ')' => Tok::RParen,
                '=' => Tok::Cmp(CmpOp::Eq),
                '!' if next == Some('=') => {
                    i += 1;
                    Tok::Cmp(CmpOp::Ne)
                }
                '<' if next == Some('=') => {
                    i += 1;
                    Tok::Cmp(CmpOp::Le)
                }
                '<' if next == Some('>') => {
                    i += 1;
                    Tok::Cmp(CmpOp::Ne)
                }
                '<' => Tok::Cmp(CmpOp::Lt),
                '>' if next == Some('=') => {
                    i += 1;
                    Tok::Cmp(CmpOp::Ge)
                }
                '>' => Tok::Cmp(CmpOp::Gt),
                other => Tok::Other(other),
            }
        };
        out.push(Token {
            tok,
            pos: start + 1,
            text: chars[start..i].iter().collect(),
        });
    }
    Ok(out)
}

/// A quoted string starting at `start` (the quote); returns the token and the index after it.
fn lex_string(chars: &[char], start: usize) -> Result<(Tok, usize), SoqlError> {
    let unterminated = || {
        SoqlError::malformed(format!(
            "unterminated string literal starting at position {}",
            start + 1
        ))
    };
    let mut out = Vec::new();
    let mut i = start + 1;
    loop {
        match chars.get(i) {
            None => return Err(unterminated()),
            Some('\'') => return Ok((Tok::Str(out), i + 1)),
            Some('\\') => {
                let Some(&e) = chars.get(i + 1) else {
                    return Err(unterminated());
                };
                let decoded = match e {
                    'n' => '\n',
                    'r' => '\r',
                    't' => '\t',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    '"' | '\'' | '\\' | '%' | '_' => e,
                    _ => {
                        return Err(SoqlError::malformed(format!(
                            "invalid escape sequence '\\{e}' in string literal at position {}",
                            i + 1
                        )));
                    }
                };
                out.push(StrChar::Escaped(decoded));
                i += 2;
            }
            Some(&c) => {
                out.push(StrChar::Plain(c));
                i += 1;
            }
        }
    }
}

fn digits_at(chars: &[char], from: usize, n: usize) -> Option<u32> {
    let mut v: u32 = 0;
    for k in 0..n {
        let d = chars.get(from + k)?.to_digit(10)?;
        v = v * 10 + d;
    }
    Some(v)
}

/// A number, or a date / datetime literal (which also start with a digit).
fn lex_number(chars: &[char], start: usize) -> Result<(Tok, usize), SoqlError> {
    let is_date = digits_at(chars, start, 4).is_some()
        && chars.get(start + 4) == Some(&'-')
        && digits_at(chars, start + 5, 2).is_some()
        && chars.get(start + 7) == Some(&'-')
        && digits_at(chars, start + 8, 2).is_some();
    if is_date {
        return lex_date(chars, start);
    }
    let mut i = start;
    if matches!(chars.get(i), Some('-' | '+')) {
        i += 1;
    }
    while chars.get(i).is_some_and(char::is_ascii_digit) {
        i += 1;
    }
    if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
        i += 1;
        while chars.get(i).is_some_and(char::is_ascii_digit) {
            i += 1;
        }
    }
    Ok((Tok::Num(chars[start..i].iter().collect()), i))
}

fn lex_date(chars: &[char], start: usize) -> Result<(Tok, usize), SoqlError> {
    let text_to = |end: usize| -> String { chars[start..end.min(chars.len())].iter().collect() };
    let (Some(y), Some(m), Some(d)) = (
        digits_at(chars, start, 4),
        digits_at(chars, start + 5, 2),
        digits_at(chars, start + 8, 2),
    ) else {
        return Err(SoqlError::malformed(format!(
            "invalid date literal at position {}",
            start + 1
        )));
    };
    let date_end = start + 10;
    let Some(date) = chrono::NaiveDate::from_ymd_opt(y as i32, m, d) else {
        return Err(SoqlError::malformed(format!(
            "invalid date literal '{}' at position {}",
            text_to(date_end),
            start + 1
        )));
    };
    if chars.get(date_end) != Some(&'T') {
        let ms = date_ms(&text_to(date_end)).ok_or_else(|| {
            SoqlError::malformed(format!("invalid date literal at position {}", start + 1))
        })?;
        return Ok((Tok::Date(ms), date_end));
    }
    // A datetime: Thh:mm:ss[.fff](Z|±hh[:]mm). Salesforce requires the zone.
    let bad = |end: usize, why: &str| {
        SoqlError::malformed(format!(
            "invalid datetime literal '{}' at position {}: {why}",
            text_to(end),
            start + 1
        ))
    };
    let t = date_end + 1;
    let (Some(h), Some(mi), Some(s)) = (
        digits_at(chars, t, 2),
        digits_at(chars, t + 3, 2),
        digits_at(chars, t + 6, 2),
    ) else {
        return Err(bad(t + 8, "expected hh:mm:ss after T"));
    };
    if chars.get(t + 2) != Some(&':') || chars.get(t + 5) != Some(&':') {
        return Err(bad(t + 8, "expected hh:mm:ss after T"));
    }
    let mut i = t + 8;
    let mut millis: u32 = 0;
    if chars.get(i) == Some(&'.') {
        i += 1;
        let frac_start = i;
        while chars.get(i).is_some_and(char::is_ascii_digit) {
            i += 1;
        }
        if i == frac_start {
            return Err(bad(i, "expected digits after the decimal point"));
        }
        // Salesforce keeps milliseconds; further digits are dropped.
        for k in 0..3 {
            let digit = chars
                .get(frac_start + k)
                .filter(|_| frac_start + k < i)
                .and_then(|c| c.to_digit(10))
                .unwrap_or(0);
            millis = millis * 10 + digit;
        }
    }
    let offset_minutes: i64 = match chars.get(i) {
        Some('Z' | 'z') => {
            i += 1;
            0
        }
        Some(&sign @ ('+' | '-')) => {
            let Some(oh) = digits_at(chars, i + 1, 2) else {
                return Err(bad(i + 1, "expected a ±hh:mm offset"));
            };
            let mut j = i + 3;
            if chars.get(j) == Some(&':') {
                j += 1;
            }
            let Some(om) = digits_at(chars, j, 2) else {
                return Err(bad(j, "expected a ±hh:mm offset"));
            };
            if oh > 23 || om > 59 {
                return Err(bad(j + 2, "offset out of range"));
            }
            i = j + 2;
            let v = i64::from(oh) * 60 + i64::from(om);
            if sign == '-' { -v } else { v }
        }
        _ => return Err(bad(i, "a time zone (Z or ±hh:mm) is required")),
    };
    let Some(naive) = date.and_hms_milli_opt(h, mi, s, millis) else {
        return Err(bad(i, "time out of range"));
    };
    let ms = naive.and_utc().timestamp_millis() - offset_minutes * 60_000;
    Ok((Tok::DateTime(ms), i))
}

// ---------------------------------------------------------------------------------------------
// Syntax tree and values
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum LitKind {
    Null,
    Bool(bool),
    Num { f: f64, i: Option<i64> },
    Str(String),
    Date(i64),
    DateTime(i64),
}

#[derive(Debug, Clone, PartialEq)]
struct Lit {
    kind: LitKind,
}

/// How a field's values compare; chosen from the describe type when bound, or guessed from
/// the literal before binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
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
enum Val {
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
}

impl Val {
    fn rank(&self) -> u8 {
        match self {
            Val::Null => 0,
            Val::Bool(_) => 1,
            Val::Num { .. } => 2,
            Val::Ms(_) => 3,
            Val::Text(_) => 4,
            Val::Id(_) => 5,
        }
    }
}

fn compare(a: &Val, b: &Val) -> Option<Ordering> {
    match (a, b) {
        (Val::Text(x), Val::Text(y)) | (Val::Id(x), Val::Id(y)) => Some(x.cmp(y)),
        (Val::Num { f: fa, i: ia }, Val::Num { f: fb, i: ib }) => match (ia, ib) {
            // Exact for longs beyond 2^53, which f64 would round together.
            (Some(x), Some(y)) => Some(x.cmp(y)),
            _ => fa.partial_cmp(fb),
        },
        (Val::Bool(x), Val::Bool(y)) => Some(x.cmp(y)),
        (Val::Ms(x), Val::Ms(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// A total order for sorting, where mismatched kinds (only possible unbound) still order.
fn order(a: &Val, b: &Val) -> Ordering {
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
fn value_of(family: Family, v: Option<&J>) -> Option<Val> {
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

fn family_of(kind: &FieldType) -> Family {
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
fn type_name(kind: &FieldType) -> &'static str {
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
fn guess_family(lits: &[Lit]) -> Family {
    lits.iter()
        .find_map(|l| match l.kind {
            LitKind::Null => None,
            LitKind::Bool(_) => Some(Family::Bool),
            LitKind::Num { .. } => Some(Family::Number),
            LitKind::Str(_) => Some(Family::Text),
            LitKind::Date(_) => Some(Family::Date),
            LitKind::DateTime(_) => Some(Family::DateTime),
        })
        .unwrap_or(Family::Text)
}

/// A literal as `family`, or `None` if it is of another type.
fn literal_as(family: Family, lit: &Lit) -> Option<Val> {
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
        _ => None,
    }
}

/// One `LIKE` pattern element, literal characters already case-folded.
#[derive(Debug, Clone, PartialEq)]
enum Pat {
    Lit(char),
    One,
    Any,
}

fn compile_like(chars: &[StrChar]) -> Vec<Pat> {
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
fn like_match(p: &[Pat], s: &[char]) -> bool {
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

#[derive(Debug, Clone, PartialEq)]
enum CondOp {
    Cmp(CmpOp),
    Like(Vec<Pat>),
    In,
    NotIn,
}

/// One field expression: `field op literal(s)`.
#[derive(Debug, Clone, PartialEq)]
struct Cond {
    field: String,
    op: CondOp,
    lits: Vec<Lit>,
    family: Family,
    vals: Vec<Val>,
}

impl Cond {
    fn new(field: String, op: CondOp, lits: Vec<Lit>) -> Cond {
        let family = match op {
            CondOp::Like(_) => Family::Text,
            _ => guess_family(&lits),
        };
        let vals = lits.iter().filter_map(|l| literal_as(family, l)).collect();
        Cond {
            field,
            op,
            lits,
            family,
            vals,
        }
    }

    fn eval(&self, record: &Record, bound: bool) -> bool {
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

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Cond(Cond),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
}

impl Expr {
    fn eval(&self, record: &Record, bound: bool) -> bool {
        match self {
            Expr::Cond(c) => c.eval(record, bound),
            Expr::And(es) => es.iter().all(|e| e.eval(record, bound)),
            Expr::Or(es) => es.iter().any(|e| e.eval(record, bound)),
            Expr::Not(e) => !e.eval(record, bound),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct OrderKey {
    field: String,
    desc: bool,
    nulls_first: bool,
    family: Family,
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

// ---------------------------------------------------------------------------------------------
// Parser
// ---------------------------------------------------------------------------------------------

/// SOQL's reserved words: never field or object names.
const RESERVED: &[&str] = &[
    "AND", "ASC", "DESC", "EXCLUDES", "FIRST", "FROM", "GROUP", "HAVING", "IN", "INCLUDES", "LAST",
    "LIKE", "LIMIT", "NOT", "NULL", "NULLS", "OR", "SELECT", "WHERE", "WITH",
];

const AGGREGATES: &[&str] = &["COUNT", "COUNT_DISTINCT", "SUM", "AVG", "MIN", "MAX"];

/// Words that may follow the object name; anything else there would be an alias.
const CLAUSES: &[&str] = &[
    "WHERE", "ORDER", "LIMIT", "USING", "WITH", "GROUP", "HAVING", "OFFSET", "FOR", "UPDATE",
];

fn is_reserved(s: &str) -> bool {
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(s))
}

/// Token text short enough for a message.
fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}

struct Parser {
    toks: Vec<Token>,
    i: usize,
    eof: Token,
}

impl Parser {
    fn peek_n(&self, n: usize) -> &Token {
        self.toks.get(self.i + n).unwrap_or(&self.eof)
    }

    fn peek(&self) -> &Token {
        self.peek_n(0)
    }

    fn advance(&mut self) -> Token {
        let t = self.peek().clone();
        if self.i < self.toks.len() {
            self.i += 1;
        }
        t
    }

    fn is_kw_at(&self, n: usize, kw: &str) -> bool {
        matches!(&self.peek_n(n).tok, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }

    fn is_kw(&self, kw: &str) -> bool {
        self.is_kw_at(0, kw)
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        let hit = self.is_kw(kw);
        if hit {
            self.advance();
        }
        hit
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        let hit = &self.peek().tok == tok;
        if hit {
            self.advance();
        }
        hit
    }

    fn unexpected(&self, expected: &str) -> SoqlError {
        let t = self.peek();
        if t.tok == Tok::Eof {
            SoqlError::malformed(format!(
                "unexpected end of query at position {}, expected {expected}",
                t.pos
            ))
        } else {
            SoqlError::malformed(format!(
                "unexpected token '{}' at position {}, expected {expected}",
                shorten(&t.text),
                t.pos
            ))
        }
    }

    fn unsupported(&self, what: &str, pos: usize) -> SoqlError {
        SoqlError::malformed(format!(
            "{what} is not supported by the emulator (at position {pos})"
        ))
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), SoqlError> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(self.unexpected(kw))
        }
    }

    /// Rejects, by name, the clauses valid SOQL may have at a clause boundary that the subset
    /// lacks, so the client learns why rather than seeing "unexpected token".
    fn reject_unsupported_clause(&self) -> Result<(), SoqlError> {
        let t = self.peek();
        let Tok::Ident(word) = &t.tok else {
            return Ok(());
        };
        let what = match word.to_ascii_uppercase().as_str() {
            "USING" => "USING SCOPE",
            "WITH" => "WITH",
            "GROUP" => "GROUP BY",
            "HAVING" => "HAVING",
            "OFFSET" => "OFFSET",
            "FOR" => "FOR VIEW / FOR REFERENCE / FOR UPDATE",
            "UPDATE" => "UPDATE TRACKING / UPDATE VIEWSTAT",
            _ => return Ok(()),
        };
        Err(self.unsupported(what, t.pos))
    }

    /// A plain field name, rejecting by name what the subset lacks in its place.
    fn field_name(&mut self, expected: &str) -> Result<(String, usize), SoqlError> {
        let t = self.peek().clone();
        let Tok::Ident(name) = &t.tok else {
            return Err(self.unexpected(expected));
        };
        if self.peek_n(1).tok == Tok::LParen {
            return Err(self.unsupported(&format!("function {name}()"), t.pos));
        }
        if name.contains('.') {
            return Err(self.unsupported(&format!("relationship field '{name}'"), t.pos));
        }
        if is_reserved(name) {
            return Err(self.unexpected(expected));
        }
        self.advance();
        Ok((name.clone(), t.pos))
    }

    fn query(&mut self) -> Result<Query, SoqlError> {
        self.expect_kw("SELECT")?;
        let (count_only, fields) = self.select_list()?;
        self.expect_kw("FROM")?;
        let t = self.peek().clone();
        let object = match &t.tok {
            Tok::Ident(name) if name.contains('.') => {
                return Err(self.unexpected("an object name"));
            }
            Tok::Ident(name) if !is_reserved(name) => name.clone(),
            _ => return Err(self.unexpected("an object name")),
        };
        self.advance();
        let t = self.peek().clone();
        match &t.tok {
            Tok::Comma => return Err(self.unsupported("querying several objects", t.pos)),
            Tok::Ident(word) if !CLAUSES.iter().any(|c| c.eq_ignore_ascii_case(word)) => {
                return Err(self.unsupported(&format!("object alias '{word}'"), t.pos));
            }
            _ => {}
        }

        self.reject_unsupported_clause()?;
        let filter = if self.eat_kw("WHERE") {
            Some(self.condition(0)?)
        } else {
            None
        };

        self.reject_unsupported_clause()?;
        let mut order = Vec::new();
        if self.is_kw("ORDER") && self.is_kw_at(1, "BY") {
            self.advance();
            self.advance();
            order = self.order_list()?;
        }

        self.reject_unsupported_clause()?;
        let mut limit = None;
        if self.eat_kw("LIMIT") {
            let t = self.peek().clone();
            let n = match &t.tok {
                Tok::Num(text) => text.parse::<u64>().ok(),
                _ => None,
            };
            let Some(n) = n else {
                return Err(self.unexpected("a non-negative whole number after LIMIT"));
            };
            self.advance();
            limit = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }

        self.reject_unsupported_clause()?;
        if self.peek().tok != Tok::Eof {
            return Err(self.unexpected("end of query"));
        }
        Ok(Query {
            object,
            count_only,
            fields,
            filter,
            order,
            limit,
            bound: false,
        })
    }

    fn select_list(&mut self) -> Result<(bool, Vec<String>), SoqlError> {
        let mut count_pos: Option<usize> = None;
        let mut fields: Vec<String> = Vec::new();
        loop {
            let t = self.peek().clone();
            match &t.tok {
                Tok::LParen => {
                    return Err(self.unsupported("a subquery in the SELECT list", t.pos));
                }
                Tok::Ident(word) if word.eq_ignore_ascii_case("TYPEOF") => {
                    return Err(self.unsupported("TYPEOF", t.pos));
                }
                Tok::Ident(word) if self.peek_n(1).tok == Tok::LParen => {
                    let upper = word.to_ascii_uppercase();
                    if upper == "COUNT" && self.peek_n(2).tok == Tok::RParen {
                        if count_pos.is_some() {
                            return Err(SoqlError::malformed(format!(
                                "duplicate COUNT() at position {}",
                                t.pos
                            )));
                        }
                        count_pos = Some(t.pos);
                        self.advance();
                        self.advance();
                        self.advance();
                    } else if AGGREGATES.contains(&upper.as_str()) {
                        let arg = match (&self.peek_n(2).tok, &self.peek_n(3).tok) {
                            (Tok::Ident(a), Tok::RParen) => a.clone(),
                            _ => "...".to_string(),
                        };
                        return Err(
                            self.unsupported(&format!("aggregate function {word}({arg})"), t.pos)
                        );
                    } else {
                        return Err(self.unsupported(&format!("function {word}()"), t.pos));
                    }
                }
                _ => {
                    let (name, pos) = self.field_name("a field name")?;
                    if fields.iter().any(|f| f.eq_ignore_ascii_case(&name)) {
                        return Err(SoqlError::malformed(format!(
                            "duplicate field selected: {name} (at position {pos})"
                        )));
                    }
                    fields.push(name);
                }
            }
            if !self.eat(&Tok::Comma) {
                break;
            }
        }
        if let Some(pos) = count_pos
            && !fields.is_empty()
        {
            return Err(SoqlError::malformed(format!(
                "COUNT() at position {pos} cannot be combined with fields in the SELECT list"
            )));
        }
        Ok((count_pos.is_some(), fields))
    }

    /// `NOT simple | simple (AND simple)* | simple (OR simple)*`: Salesforce requires
    /// parentheses whenever logical operators are mixed, so no precedence is ever applied.
    fn condition(&mut self, depth: usize) -> Result<Expr, SoqlError> {
        if depth > MAX_DEPTH {
            return Err(SoqlError::malformed(format!(
                "WHERE clause nested more than {MAX_DEPTH} levels deep at position {}",
                self.peek().pos
            )));
        }
        if self.eat_kw("NOT") {
            let inner = self.simple(depth)?;
            if self.is_kw("AND") || self.is_kw("OR") {
                return Err(self.mixed_logic("NOT"));
            }
            return Ok(Expr::Not(Box::new(inner)));
        }
        let first = self.simple(depth)?;
        let mut items = vec![first];
        let mut joiner: Option<&'static str> = None;
        loop {
            let word = if self.is_kw("AND") {
                "AND"
            } else if self.is_kw("OR") {
                "OR"
            } else {
                break;
            };
            if joiner.is_some_and(|j| j != word) {
                return Err(self.mixed_logic(word));
            }
            joiner = Some(word);
            self.advance();
            items.push(self.simple(depth)?);
        }
        Ok(match joiner {
            Some("AND") => Expr::And(items),
            Some(_) => Expr::Or(items),
            None => items.pop().unwrap_or(Expr::And(Vec::new())),
        })
    }

    fn mixed_logic(&self, word: &str) -> SoqlError {
        let t = self.peek();
        SoqlError::malformed(format!(
            "unexpected token '{}' at position {}: {word} must be grouped with parentheses \
             when AND, OR and NOT are mixed",
            shorten(&t.text),
            t.pos
        ))
    }

    fn simple(&mut self, depth: usize) -> Result<Expr, SoqlError> {
        let t = self.peek().clone();
        if t.tok == Tok::LParen {
            if self.is_kw_at(1, "SELECT") {
                return Err(self.unsupported("a subquery", t.pos));
            }
            self.advance();
            let inner = self.condition(depth + 1)?;
            if !self.eat(&Tok::RParen) {
                return Err(self.unexpected("')'"));
            }
            return Ok(inner);
        }
        if self.is_kw("NOT") {
            return Err(self.mixed_logic("NOT"));
        }
        self.field_expr().map(Expr::Cond)
    }

    fn field_expr(&mut self) -> Result<Cond, SoqlError> {
        let (field, _) = self.field_name("a field name")?;
        let t = self.peek().clone();
        match &t.tok {
            Tok::Cmp(op) => {
                let op = *op;
                self.advance();
                let lit = self.literal()?;
                Ok(Cond::new(field, CondOp::Cmp(op), vec![lit]))
            }
            Tok::Ident(w) if w.eq_ignore_ascii_case("LIKE") => {
                self.advance();
                let t = self.peek().clone();
                let Tok::Str(chars) = &t.tok else {
                    return Err(self.unexpected("a string literal after LIKE"));
                };
                self.advance();
                let pattern = compile_like(chars);
                let lit = Lit {
                    kind: LitKind::Str(decode(chars)),
                };
                Ok(Cond::new(field, CondOp::Like(pattern), vec![lit]))
            }
            Tok::Ident(w) if w.eq_ignore_ascii_case("IN") => {
                self.advance();
                let lits = self.literal_list()?;
                Ok(Cond::new(field, CondOp::In, lits))
            }
            Tok::Ident(w) if w.eq_ignore_ascii_case("NOT") => {
                self.advance();
                if !self.eat_kw("IN") {
                    return Err(self.unexpected("IN after NOT"));
                }
                let lits = self.literal_list()?;
                Ok(Cond::new(field, CondOp::NotIn, lits))
            }
            Tok::Ident(w)
                if w.eq_ignore_ascii_case("INCLUDES") || w.eq_ignore_ascii_case("EXCLUDES") =>
            {
                Err(self.unsupported(&w.to_ascii_uppercase(), t.pos))
            }
            _ => Err(self.unexpected("a comparison operator")),
        }
    }

    fn literal_list(&mut self) -> Result<Vec<Lit>, SoqlError> {
        let t = self.peek().clone();
        if t.tok == Tok::Other(':') {
            return Err(self.unsupported("a bind variable", t.pos));
        }
        if !self.eat(&Tok::LParen) {
            return Err(self.unexpected("'('"));
        }
        if self.is_kw("SELECT") {
            return Err(self.unsupported("a semi-join subquery", t.pos));
        }
        let mut lits = vec![self.literal()?];
        while self.eat(&Tok::Comma) {
            lits.push(self.literal()?);
        }
        if !self.eat(&Tok::RParen) {
            return Err(self.unexpected("',' or ')'"));
        }
        Ok(lits)
    }

    fn literal(&mut self) -> Result<Lit, SoqlError> {
        let t = self.peek().clone();
        let kind = match &t.tok {
            Tok::Str(chars) => LitKind::Str(decode(chars)),
            Tok::Num(text) => {
                let Some(f) = text.parse::<f64>().ok().filter(|f| f.is_finite()) else {
                    return Err(SoqlError::malformed(format!(
                        "number '{}' out of range at position {}",
                        shorten(text),
                        t.pos
                    )));
                };
                LitKind::Num {
                    f,
                    i: text.parse().ok(),
                }
            }
            Tok::Date(ms) => LitKind::Date(*ms),
            Tok::DateTime(ms) => LitKind::DateTime(*ms),
            Tok::Ident(w) if w.eq_ignore_ascii_case("true") => LitKind::Bool(true),
            Tok::Ident(w) if w.eq_ignore_ascii_case("false") => LitKind::Bool(false),
            Tok::Ident(w) if w.eq_ignore_ascii_case("null") => LitKind::Null,
            Tok::Ident(w) if self.peek_n(1).tok == Tok::Other(':') || !is_reserved(w) => {
                // TODAY, LAST_N_DAYS:7, ...: valid SOQL the subset lacks.
                return Err(self.unsupported(&format!("date literal or value '{w}'"), t.pos));
            }
            Tok::Other(':') => return Err(self.unsupported("a bind variable", t.pos)),
            _ => return Err(self.unexpected("a literal value")),
        };
        self.advance();
        Ok(Lit { kind })
    }

    fn order_list(&mut self) -> Result<Vec<OrderKey>, SoqlError> {
        let mut keys = Vec::new();
        loop {
            let (field, _) = self.field_name("a field name")?;
            let desc = if self.eat_kw("DESC") {
                true
            } else {
                self.eat_kw("ASC");
                false
            };
            let nulls_first = if self.eat_kw("NULLS") {
                if self.eat_kw("FIRST") {
                    true
                } else if self.eat_kw("LAST") {
                    false
                } else {
                    return Err(self.unexpected("FIRST or LAST"));
                }
            } else {
                !desc
            };
            keys.push(OrderKey {
                field,
                desc,
                nulls_first,
                family: Family::Auto,
            });
            if !self.eat(&Tok::Comma) {
                break;
            }
        }
        Ok(keys)
    }
}

fn decode(chars: &[StrChar]) -> String {
    chars
        .iter()
        .map(|c| match *c {
            StrChar::Plain(c) | StrChar::Escaped(c) => c,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Query
// ---------------------------------------------------------------------------------------------

/// A parsed query. `parse` checks syntax; `bind` resolves it against the object's describe
/// (canonical names, typed literals) and must succeed before results are faithful: an unbound
/// query compares by the literals' own types.
#[derive(Debug, Clone)]
pub struct Query {
    /// The `FROM` object: as written until bound, then the describe's spelling.
    pub object: String,
    /// `SELECT COUNT()`: the caller reports `totalSize` and no records.
    pub count_only: bool,
    /// Selected fields in SELECT order (empty for `COUNT()`); canonical once bound.
    pub fields: Vec<String>,
    filter: Option<Expr>,
    order: Vec<OrderKey>,
    limit: Option<usize>,
    bound: bool,
}

/// Parses `soql` (syntax only: names and literal types are checked by [`Query::bind`]).
pub fn parse(soql: &str) -> Result<Query, SoqlError> {
    let toks = lex(soql)?;
    let eof = Token {
        tok: Tok::Eof,
        pos: soql.chars().count() + 1,
        text: String::new(),
    };
    Parser { toks, i: 0, eof }.query()
}

/// Whether Salesforce refuses `field` in WHERE: compound parents (only DISTANCE() can use a
/// location), long text areas (the describe's `filterable: false`), and binary.
fn filterable(f: &FieldDescribe) -> bool {
    let kind = f.kind();
    !(kind.is_compound()
        || kind == FieldType::Base64
        || (kind == FieldType::Textarea && f.length > 255))
}

fn sortable(f: &FieldDescribe) -> bool {
    filterable(f) && f.kind() != FieldType::Multipicklist
}

fn resolve<'a>(d: &'a ObjectDescribe, name: &str) -> Result<&'a FieldDescribe, SoqlError> {
    d.fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case(name))
        .ok_or_else(|| no_such_column(name, &d.name))
}

/// Types a condition's literals by the field and checks the operator suits its type.
fn bind_cond(d: &ObjectDescribe, c: &mut Cond) -> Result<(), SoqlError> {
    let f = resolve(d, &c.field)?;
    if !filterable(f) {
        return Err(SoqlError::invalid_field(format!(
            "field '{}' can not be filtered in a query call",
            f.name
        )));
    }
    let kind = f.kind();
    let family = family_of(&kind);
    let bad_op =
        || SoqlError::bad_operator(format!("invalid operator on {} field", type_name(&kind)));
    match &c.op {
        CondOp::Like(_) if family != Family::Text => return Err(bad_op()),
        CondOp::Cmp(op) if op.is_range() && family == Family::Bool => return Err(bad_op()),
        _ => {}
    }
    let mut vals = Vec::with_capacity(c.lits.len());
    for lit in &c.lits {
        let v = literal_as(family, lit).ok_or_else(|| match (&lit.kind, family) {
            (LitKind::Str(s), Family::Id) => {
                SoqlError::bad_operator(format!("invalid ID field: {}", shorten(s)))
            }
            _ => {
                let quoted = matches!(family, Family::Text | Family::Id);
                SoqlError::invalid_field(format!(
                    "value of filter criterion for field '{}' must be of type {} and should {}be \
                     enclosed in quotes",
                    f.name,
                    type_name(&kind),
                    if quoted { "" } else { "not " }
                ))
            }
        })?;
        vals.push(v);
    }
    c.field = f.name.clone();
    c.family = family;
    c.vals = vals;
    Ok(())
}

fn bind_expr(d: &ObjectDescribe, e: &mut Expr) -> Result<(), SoqlError> {
    match e {
        Expr::Cond(c) => bind_cond(d, c),
        Expr::And(es) | Expr::Or(es) => es.iter_mut().try_for_each(|e| bind_expr(d, e)),
        Expr::Not(e) => bind_expr(d, e),
    }
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
    /// Resolves names against the describe: canonical object and field names, typed literals,
    /// operators checked against field types. On error the query is left as it was.
    pub fn bind(&mut self, describe: &ObjectDescribe) -> Result<(), SoqlError> {
        if !self.object.eq_ignore_ascii_case(&describe.name) {
            return Err(invalid_type(&self.object));
        }
        let mut q = self.clone();
        q.object = describe.name.clone();
        for name in q.fields.iter_mut() {
            *name = resolve(describe, name)?.name.clone();
        }
        if let Some(filter) = q.filter.as_mut() {
            bind_expr(describe, filter)?;
        }
        for key in q.order.iter_mut() {
            let f = resolve(describe, &key.field)?;
            if !sortable(f) {
                return Err(SoqlError::invalid_field(format!(
                    "field '{}' can not be sorted in a query call",
                    f.name
                )));
            }
            key.field = f.name.clone();
            key.family = family_of(&f.kind());
        }
        q.bound = true;
        *self = q;
        Ok(())
    }

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

    /// The LIMIT, if any.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// Whether the query has an ORDER BY (otherwise results come in id order).
    pub fn has_order(&self) -> bool {
        !self.order.is_empty()
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
        let mut out: Vec<Record> = match (self.order.is_empty(), self.limit) {
            // Without ORDER BY the first n matches are the answer; stop early.
            (true, Some(n)) => matching.take(n).cloned().collect(),
            _ => matching.cloned().collect(),
        };
        self.sort(&mut out);
        if let Some(n) = self.limit {
            out.truncate(n);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn account() -> ObjectDescribe {
        serde_json::from_str(include_str!("org/Account.json")).expect("Account describe")
    }

    fn opportunity() -> ObjectDescribe {
        serde_json::from_str(include_str!("org/Opportunity.json")).expect("Opportunity describe")
    }

    fn rec(v: J) -> Record {
        match v {
            J::Object(m) => m,
            _ => panic!("test record must be an object"),
        }
    }

    fn acc_id(n: u32) -> String {
        id18(&format!("001000000000{n:03}"))
    }

    /// Four accounts covering nulls, case, numbers, dates and addresses.
    fn accounts() -> Vec<Record> {
        vec![
            rec(json!({
                "Id": acc_id(1), "Name": "Acme", "Type": "Customer", "NumberOfEmployees": 100,
                "AnnualRevenue": 1000.5, "CreatedDate": "2024-01-10T10:00:00.000+0000",
                "LastActivityDate": "2024-01-31", "IsPartner": true, "BillingCity": "Paris",
                "BillingStreet": "1 rue de Rivoli", "BillingCountry": "France",
                "BillingLatitude": 48.85, "OwnerId": id18("005000000000001"),
            })),
            rec(json!({
                "Id": acc_id(2), "Name": "acme corp", "Type": null, "NumberOfEmployees": 5,
                "AnnualRevenue": null, "CreatedDate": "2024-01-31T10:00:00.000+0000",
                "LastActivityDate": null, "IsPartner": false,
            })),
            rec(json!({
                "Id": acc_id(3), "Name": "Zeta_1%", "Type": "Partner", "AnnualRevenue": 20,
                "CreatedDate": "2024-02-01T00:00:00.000+0000", "LastActivityDate": "2023-12-01",
            })),
            rec(json!({
                "Id": acc_id(4), "Name": "beta", "Type": "customer", "NumberOfEmployees": 100,
                "AnnualRevenue": -3, "CreatedDate": "2023-06-01T00:00:00.000+0000",
                "LastActivityDate": "2024-02-29", "IsPartner": true,
            })),
        ]
    }

    fn bound(soql: &str) -> Query {
        let mut q = parse(soql).unwrap_or_else(|e| panic!("{soql}: {e}"));
        q.bind(&account()).unwrap_or_else(|e| panic!("{soql}: {e}"));
        q
    }

    /// Names of the accounts `soql` returns, in result order.
    fn names(soql: &str) -> Vec<String> {
        let data = accounts();
        bound(soql)
            .run(data.iter())
            .iter()
            .map(|r| r.get("Name").and_then(J::as_str).unwrap_or("?").to_string())
            .collect()
    }

    /// Like `names`, but sorted, for filters whose result order does not matter.
    fn matching(where_clause: &str) -> Vec<String> {
        let mut n = names(&format!("SELECT Name FROM Account WHERE {where_clause}"));
        n.sort();
        n
    }

    fn err(soql: &str) -> SoqlError {
        match parse(soql) {
            Err(e) => e,
            Ok(mut q) => match q.bind(&account()) {
                Err(e) => e,
                Ok(()) => panic!("{soql}: expected an error"),
            },
        }
    }

    fn v(names: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        out.sort();
        out
    }

    #[test]
    fn parses_fields_object_and_clauses() {
        let q = parse("SELECT Id, Name FROM Account WHERE Name = 'x' ORDER BY Name LIMIT 10")
            .expect("parses");
        assert_eq!(q.object, "Account");
        assert_eq!(q.fields, vec!["Id", "Name"]);
        assert!(!q.count_only);
        assert_eq!(q.limit(), Some(10));
        let q = parse("SELECT Id FROM Account").expect("parses");
        assert_eq!(q.limit(), None);
        assert!(q.matches(&Record::new()));
    }

    #[test]
    fn names_are_canonicalized_case_insensitively() {
        let mut q = parse(
            "select id, NAME, billingcity from ACCOUNT where annualrevenue > 1 \
                           order by createddate",
        )
        .expect("parses");
        assert_eq!(q.object, "ACCOUNT");
        q.bind(&account()).expect("binds");
        assert_eq!(q.object, "Account");
        assert_eq!(q.fields, vec!["Id", "Name", "BillingCity"]);
        let data = accounts();
        let got: Vec<_> = q
            .run(data.iter())
            .iter()
            .map(|r| r["Name"].clone())
            .collect();
        assert_eq!(got, vec![json!("Acme"), json!("Zeta_1%")]);
    }

    #[test]
    fn keywords_are_case_insensitive() {
        assert_eq!(
            names(
                "sElEcT Name fRoM Account wHeRe Name lIkE 'a%' aNd IsPartner = TRUE \
                   oRdEr bY Name dEsC nUlLs fIrSt lImIt 5"
            ),
            vec!["Acme"]
        );
        assert_eq!(matching("Type = NULL"), v(&["acme corp"]));
    }

    #[test]
    fn text_comparisons_ignore_case() {
        assert_eq!(matching("Name = 'ACME'"), v(&["Acme"]));
        assert_eq!(matching("Type = 'customer'"), v(&["Acme", "beta"]));
        // != is true for null, as in Salesforce (not SQL's three-valued logic).
        assert_eq!(matching("Type != 'CUSTOMER'"), v(&["Zeta_1%", "acme corp"]));
        assert_eq!(matching("Type <> 'Customer'"), v(&["Zeta_1%", "acme corp"]));
        assert_eq!(matching("Name < 'B'"), v(&["Acme", "acme corp"]));
        assert_eq!(
            matching("Name <= 'beta'"),
            v(&["Acme", "acme corp", "beta"])
        );
        assert_eq!(matching("Name > 'Beta'"), v(&["Zeta_1%"]));
        assert_eq!(matching("Name >= 'BETA'"), v(&["Zeta_1%", "beta"]));
        // Null never satisfies a range.
        assert_eq!(matching("Type < 'zzz'"), v(&["Acme", "Zeta_1%", "beta"]));
    }

    #[test]
    fn string_literal_escapes() {
        let data = [rec(json!({"Name": "O'Brien \\ \"x\"\n"}))];
        let q = bound(r#"SELECT Name FROM Account WHERE Name = 'o\'brien \\ \"x\"\n'"#);
        assert_eq!(q.run(data.iter()).len(), 1);
        let e = err(r"SELECT Name FROM Account WHERE Name = 'a\qb'");
        assert_eq!(e.code, MALFORMED_QUERY);
        assert!(
            e.message.contains("'\\q'") && e.message.contains("position 41"),
            "{e}"
        );
    }

    #[test]
    fn numeric_comparisons() {
        assert_eq!(matching("NumberOfEmployees = 100"), v(&["Acme", "beta"]));
        assert_eq!(
            matching("NumberOfEmployees != 100"),
            v(&["Zeta_1%", "acme corp"])
        );
        assert_eq!(matching("NumberOfEmployees < 100"), v(&["acme corp"]));
        assert_eq!(
            matching("NumberOfEmployees <= 100"),
            v(&["Acme", "acme corp", "beta"])
        );
        assert_eq!(matching("NumberOfEmployees > 5"), v(&["Acme", "beta"]));
        assert_eq!(
            matching("NumberOfEmployees >= 5.0"),
            v(&["Acme", "acme corp", "beta"])
        );
        // Currency with decimals and signs; numeric, not lexicographic ("1000.5" < "20").
        assert_eq!(matching("AnnualRevenue > 20"), v(&["Acme"]));
        assert_eq!(matching("AnnualRevenue >= 20.0"), v(&["Acme", "Zeta_1%"]));
        assert_eq!(matching("AnnualRevenue < -2.5"), v(&["beta"]));
        assert_eq!(matching("AnnualRevenue = +1000.50"), v(&["Acme"]));
        assert_eq!(
            matching("AnnualRevenue IN (20, -3)"),
            v(&["Zeta_1%", "beta"])
        );
    }

    #[test]
    fn long_values_compare_exactly() {
        let big = 9_007_199_254_740_993_i64; // 2^53 + 1: equal to 2^53 as f64
        let data = [rec(json!({"NumberOfEmployees": big}))];
        let q = bound("SELECT Id FROM Account WHERE NumberOfEmployees > 9007199254740992");
        assert_eq!(q.run(data.iter()).len(), 1);
    }

    #[test]
    fn boolean_comparisons_treat_null_as_false() {
        assert_eq!(matching("IsPartner = true"), v(&["Acme", "beta"]));
        assert_eq!(matching("IsPartner = false"), v(&["Zeta_1%", "acme corp"]));
        assert_eq!(matching("IsPartner != true"), v(&["Zeta_1%", "acme corp"]));
        assert_eq!(matching("IsPartner != false"), v(&["Acme", "beta"]));
        assert_eq!(matching("IsPartner = null"), v(&["Zeta_1%", "acme corp"]));
        assert_eq!(matching("IsPartner != null"), v(&["Acme", "beta"]));
        assert_eq!(
            matching("IsPartner IN (false)"),
            v(&["Zeta_1%", "acme corp"])
        );
        let e = err("SELECT Id FROM Account WHERE IsPartner < true");
        assert_eq!(e.code, INVALID_QUERY_FILTER_OPERATOR);
        assert!(e.message.contains("boolean"), "{e}");
        let e = err("SELECT Id FROM Account WHERE IsPartner = 'true'");
        assert_eq!(e.code, INVALID_FIELD);
        assert!(
            e.message.contains("'IsPartner'") && e.message.contains("boolean"),
            "{e}"
        );
    }

    #[test]
    fn date_comparisons() {
        assert_eq!(matching("LastActivityDate = 2024-01-31"), v(&["Acme"]));
        assert_eq!(
            matching("LastActivityDate != 2024-01-31"),
            v(&["Zeta_1%", "acme corp", "beta"])
        );
        assert_eq!(matching("LastActivityDate < 2024-01-31"), v(&["Zeta_1%"]));
        assert_eq!(
            matching("LastActivityDate <= 2024-01-31"),
            v(&["Acme", "Zeta_1%"])
        );
        assert_eq!(matching("LastActivityDate > 2024-01-31"), v(&["beta"]));
        assert_eq!(
            matching("LastActivityDate >= 2023-12-01"),
            v(&["Acme", "Zeta_1%", "beta"])
        );
        assert_eq!(
            matching("LastActivityDate IN (2024-02-29, 2023-12-01)"),
            v(&["Zeta_1%", "beta"])
        );
        let e = err("SELECT Id FROM Account WHERE LastActivityDate > 2024-01-01T00:00:00Z");
        assert_eq!(e.code, INVALID_FIELD);
        assert!(
            e.message.contains("'LastActivityDate'") && e.message.contains("type date"),
            "{e}"
        );
        let e = err("SELECT Id FROM Account WHERE LastActivityDate > '2024-01-01'");
        assert_eq!(e.code, INVALID_FIELD);
    }

    #[test]
    fn datetime_comparisons_and_literal_forms() {
        // All spell the instant Acme was created.
        for lit in [
            "2024-01-10T10:00:00Z",
            "2024-01-10T10:00:00.000Z",
            "2024-01-10T11:00:00+01:00",
            "2024-01-10T10:00:00.000+0000",
            "2024-01-10T05:30:00.000-04:30",
            "2024-01-10T10:00:00.0004Z",
        ] {
            assert_eq!(
                matching(&format!("CreatedDate = {lit}")),
                v(&["Acme"]),
                "{lit}"
            );
        }
        assert_eq!(
            matching("CreatedDate != 2024-01-10T10:00:00Z"),
            v(&["Zeta_1%", "acme corp", "beta"])
        );
        assert_eq!(matching("CreatedDate < 2024-01-10T10:00:00Z"), v(&["beta"]));
        assert_eq!(
            matching("CreatedDate <= 2024-01-10T10:00:00Z"),
            v(&["Acme", "beta"])
        );
        assert_eq!(
            matching("CreatedDate > 2024-01-31T10:00:00.001Z"),
            v(&["Zeta_1%"])
        );
        assert_eq!(
            matching("CreatedDate >= 2024-01-31T12:00:00+02:00"),
            v(&["Zeta_1%", "acme corp"])
        );
        // A date literal on a datetime field is refused, as Salesforce does.
        let e = err("SELECT Id FROM Account WHERE CreatedDate > 2024-01-01");
        assert_eq!(e.code, INVALID_FIELD);
        assert!(
            e.message.contains("'CreatedDate'") && e.message.contains("dateTime"),
            "{e}"
        );
        for bad in [
            "2024-01-10T10:00:00",
            "2024-01-10T10:00Z",
            "2024-01-10T25:00:00Z",
            "2024-01-10T10:00:00.Z",
            "2024-01-10T10:00:00+1:00",
        ] {
            let e = err(&format!("SELECT Id FROM Account WHERE CreatedDate > {bad}"));
            assert_eq!(e.code, MALFORMED_QUERY, "{bad}");
            assert!(
                e.message.contains("datetime literal") && e.message.contains("position 44"),
                "{bad}: {e}"
            );
        }
        let e = err("SELECT Id FROM Account WHERE LastActivityDate = 2024-02-30");
        assert_eq!(e.code, MALFORMED_QUERY);
        assert!(
            e.message.contains("'2024-02-30'") && e.message.contains("position 49"),
            "{e}"
        );
    }

    #[test]
    fn id_comparisons() {
        let id15 = "001000000000002";
        assert_eq!(matching(&format!("Id = '{id15}'")), v(&["acme corp"]));
        assert_eq!(
            matching(&format!("Id = '{}'", acc_id(2))),
            v(&["acme corp"])
        );
        // Ids order like their base-62 value (what PK chunking relies on).
        assert_eq!(
            matching(&format!("Id > '{}'", acc_id(2))),
            v(&["Zeta_1%", "beta"])
        );
        assert_eq!(
            matching(&format!("Id <= '{id15}'")),
            v(&["Acme", "acme corp"])
        );
        assert_eq!(
            matching(&format!("Id IN ('{}', '001000000000004')", acc_id(1))),
            v(&["Acme", "beta"])
        );
        assert_eq!(
            matching("OwnerId = null"),
            v(&["Zeta_1%", "acme corp", "beta"])
        );
        let e = err("SELECT Id FROM Account WHERE Id = 'abc'");
        assert_eq!(e.code, INVALID_QUERY_FILTER_OPERATOR);
        assert!(e.message.contains("invalid ID field: abc"), "{e}");
        let e = err("SELECT Id FROM Account WHERE Id LIKE '001%'");
        assert_eq!(e.code, INVALID_QUERY_FILTER_OPERATOR);
        assert!(e.message.contains("id field"), "{e}");
        let e = err("SELECT Id FROM Account WHERE OwnerId = 5");
        assert_eq!(e.code, INVALID_FIELD);
        assert!(
            e.message
                .contains("type id and should be enclosed in quotes"),
            "{e}"
        );
    }

    #[test]
    fn like_wildcards_escapes_and_case() {
        assert_eq!(matching("Name LIKE 'acme%'"), v(&["Acme", "acme corp"]));
        assert_eq!(matching("Name LIKE '%CORP'"), v(&["acme corp"]));
        assert_eq!(matching("Name LIKE '_eta'"), v(&["beta"]));
        assert_eq!(
            matching("Name LIKE '%e%'"),
            v(&["Acme", "Zeta_1%", "acme corp", "beta"])
        );
        assert_eq!(matching("Name LIKE 'acme'"), v(&["Acme"]));
        assert_eq!(
            matching("Name LIKE '%%a%%'"),
            v(&["Acme", "Zeta_1%", "acme corp", "beta"])
        );
        // Escaped wildcards are literal.
        assert_eq!(matching(r"Name LIKE '%\_1\%'"), v(&["Zeta_1%"]));
        assert_eq!(matching(r"Name LIKE 'acme\%'"), Vec::<String>::new());
        // Null never matches; NOT LIKE is spelled NOT (... LIKE ...).
        assert_eq!(matching("Type LIKE '%'"), v(&["Acme", "Zeta_1%", "beta"]));
        assert_eq!(matching("NOT Type LIKE 'c%'"), v(&["Zeta_1%", "acme corp"]));
        let e = err("SELECT Id FROM Account WHERE NumberOfEmployees LIKE '1%'");
        assert_eq!(e.code, INVALID_QUERY_FILTER_OPERATOR);
        let e = err("SELECT Id FROM Account WHERE Name LIKE 5");
        assert_eq!(e.code, MALFORMED_QUERY);
        assert!(
            e.message.contains("'5'") && e.message.contains("string literal"),
            "{e}"
        );
        let e = err("SELECT Id FROM Account WHERE Name NOT LIKE 'a%'");
        assert!(
            e.message.contains("'LIKE'") && e.message.contains("IN after NOT"),
            "{e}"
        );
    }

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

    #[test]
    fn in_and_not_in() {
        assert_eq!(
            matching("Name IN ('ACME', 'Beta', 'nope')"),
            v(&["Acme", "beta"])
        );
        assert_eq!(matching("Type IN ('Partner')"), v(&["Zeta_1%"]));
        // NOT IN, like !=, keeps nulls; an explicit null in the list matches nulls.
        assert_eq!(
            matching("Type NOT IN ('customer')"),
            v(&["Zeta_1%", "acme corp"])
        );
        assert_eq!(
            matching("Type IN ('Partner', null)"),
            v(&["Zeta_1%", "acme corp"])
        );
        assert_eq!(
            matching("Type NOT IN ('Partner', null)"),
            v(&["Acme", "beta"])
        );
        assert_eq!(
            matching("NumberOfEmployees NOT IN (100)"),
            v(&["Zeta_1%", "acme corp"])
        );
        let e = err("SELECT Id FROM Account WHERE Name IN ('a', 1)");
        assert_eq!(e.code, INVALID_FIELD);
        let e = err("SELECT Id FROM Account WHERE Name IN ()");
        assert!(
            e.message.contains("')'") && e.message.contains("position 39"),
            "{e}"
        );
        let e = err("SELECT Id FROM Account WHERE Name IN 'a'");
        assert!(e.message.contains("expected '('"), "{e}");
    }

    #[test]
    fn null_semantics() {
        assert_eq!(matching("Type = null"), v(&["acme corp"]));
        assert_eq!(matching("Type != null"), v(&["Acme", "Zeta_1%", "beta"]));
        // A field absent from the record is null.
        assert_eq!(matching("NumberOfEmployees = null"), v(&["Zeta_1%"]));
        assert_eq!(
            matching("AnnualRevenue > -1000"),
            v(&["Acme", "Zeta_1%", "beta"])
        );
        assert_eq!(matching("AnnualRevenue < null"), Vec::<String>::new());
        assert_eq!(matching("LastActivityDate = null"), v(&["acme corp"]));
        assert_eq!(
            matching("CreatedDate != null"),
            v(&["Acme", "Zeta_1%", "acme corp", "beta"])
        );
    }

    #[test]
    fn logic_and_parentheses() {
        assert_eq!(
            matching("Type = 'Customer' AND (NumberOfEmployees = 5 OR Name = 'beta')"),
            v(&["beta"])
        );
        assert_eq!(
            matching("(Type = 'Customer' AND NumberOfEmployees = 5) OR Name = 'beta'"),
            v(&["beta"])
        );
        // The same three conditions grouped two ways give different answers.
        assert_eq!(
            matching("(Type = null AND NumberOfEmployees = 5) OR Name = 'beta'"),
            v(&["acme corp", "beta"])
        );
        assert_eq!(
            matching("Type = null AND (NumberOfEmployees = 5 OR Name = 'beta')"),
            v(&["acme corp"])
        );
        assert_eq!(
            matching("Name = 'Acme' OR Name = 'beta' OR Type = 'Partner'"),
            v(&["Acme", "Zeta_1%", "beta"])
        );
        assert_eq!(
            matching("IsPartner = true AND NumberOfEmployees = 100 AND Name LIKE 'b%'"),
            v(&["beta"])
        );
        assert_eq!(
            matching("NOT Name = 'Acme'"),
            v(&["Zeta_1%", "acme corp", "beta"])
        );
        assert_eq!(
            matching("NOT (Name = 'Acme' OR Type = null)"),
            v(&["Zeta_1%", "beta"])
        );
        assert_eq!(
            matching("IsPartner = true AND (NOT Name = 'Acme')"),
            v(&["beta"])
        );
        assert_eq!(matching("((((Name = 'beta'))))"), v(&["beta"]));
        assert_eq!(matching("NOT (NOT (Name = 'beta'))"), v(&["beta"]));
    }

    #[test]
    fn mixing_logic_without_parentheses_is_refused_like_salesforce() {
        for (soql, token, pos) in [
            (
                "SELECT Id FROM Account WHERE Name = 'a' AND Name = 'b' OR Name = 'c'",
                "OR",
                56,
            ),
            (
                "SELECT Id FROM Account WHERE Name = 'a' OR Name = 'b' AND Name = 'c'",
                "AND",
                55,
            ),
            (
                "SELECT Id FROM Account WHERE Name = 'a' AND NOT Name = 'b'",
                "NOT",
                45,
            ),
            (
                "SELECT Id FROM Account WHERE NOT Name = 'a' AND Name = 'b'",
                "AND",
                45,
            ),
            ("SELECT Id FROM Account WHERE NOT NOT Name = 'a'", "NOT", 34),
        ] {
            let e = err(soql);
            assert_eq!(e.code, MALFORMED_QUERY, "{soql}");
            assert!(
                e.message.contains(&format!("'{token}' at position {pos}")),
                "{soql}: {e}"
            );
        }
    }

    #[test]
    fn order_by_nulls_and_direction() {
        // ASC defaults to NULLS FIRST; ties keep input order (stable).
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY NumberOfEmployees"),
            vec!["Zeta_1%", "acme corp", "Acme", "beta"]
        );
        // DESC defaults to NULLS LAST.
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY NumberOfEmployees DESC"),
            vec!["Acme", "beta", "acme corp", "Zeta_1%"]
        );
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY NumberOfEmployees ASC NULLS LAST"),
            vec!["acme corp", "Acme", "beta", "Zeta_1%"]
        );
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY NumberOfEmployees DESC NULLS FIRST"),
            vec!["Zeta_1%", "Acme", "beta", "acme corp"]
        );
        // Multiple keys; text ignores case.
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY NumberOfEmployees DESC, Name DESC"),
            vec!["beta", "Acme", "acme corp", "Zeta_1%"]
        );
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY Name"),
            vec!["Acme", "acme corp", "beta", "Zeta_1%"]
        );
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY CreatedDate DESC"),
            vec!["Zeta_1%", "acme corp", "Acme", "beta"]
        );
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY LastActivityDate, Name"),
            vec!["acme corp", "Zeta_1%", "Acme", "beta"]
        );
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY IsPartner DESC, Id DESC"),
            vec!["beta", "Acme", "Zeta_1%", "acme corp"]
        );
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY AnnualRevenue"),
            vec!["acme corp", "beta", "Zeta_1%", "Acme"]
        );
    }

    #[test]
    fn limit_applies_after_sorting() {
        assert_eq!(
            names("SELECT Name FROM Account ORDER BY Name DESC LIMIT 2"),
            vec!["Zeta_1%", "beta"]
        );
        assert_eq!(names("SELECT Name FROM Account LIMIT 3").len(), 3);
        assert_eq!(names("SELECT Name FROM Account LIMIT 0").len(), 0);
        assert_eq!(
            names("SELECT Name FROM Account WHERE IsPartner = true LIMIT 100"),
            vec!["Acme", "beta"]
        );
        for (bad, pos) in [
            ("LIMIT -1", 30),
            ("LIMIT 1.5", 30),
            ("LIMIT x", 30),
            ("LIMIT", 29),
        ] {
            let e = err(&format!("SELECT Id FROM Account {bad}"));
            assert_eq!(e.code, MALFORMED_QUERY);
            assert!(
                e.message.contains(&format!("position {pos}")) && e.message.contains("after LIMIT"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn count() {
        let q = bound("SELECT COUNT() FROM Account WHERE IsPartner = true");
        assert!(q.count_only);
        assert!(q.fields.is_empty());
        let data = accounts();
        assert_eq!(q.run(data.iter()).len(), 2);
        assert!(q.project(&account(), &data[0]).is_empty());
        assert_eq!(
            bound("select count() from account limit 3")
                .run(data.iter())
                .len(),
            3
        );
        let e = err("SELECT COUNT(), Name FROM Account");
        assert_eq!(e.code, MALFORMED_QUERY);
        assert!(e.message.contains("COUNT() at position 8"), "{e}");
        let e = err("SELECT COUNT(Id) FROM Account");
        assert!(
            e.message.contains("COUNT(Id)") && e.message.contains("not supported"),
            "{e}"
        );
    }

    #[test]
    fn projection_in_select_order_with_addresses() {
        let d = account();
        let data = accounts();
        let q = bound("SELECT name, BillingAddress, NumberOfEmployees, Fax FROM Account");
        let p = q.project(&d, &data[0]);
        assert_eq!(p.keys().count(), 4);
        assert_eq!(p["Name"], json!("Acme"));
        assert_eq!(p["NumberOfEmployees"], json!(100));
        assert_eq!(p["Fax"], J::Null);
        assert_eq!(
            p["BillingAddress"],
            json!({"street": "1 rue de Rivoli", "city": "Paris", "state": null,
                   "postalCode": null, "country": "France", "latitude": 48.85,
                   "longitude": null, "geocodeAccuracy": null})
        );
        let p = q.project(&d, &data[1]);
        assert_eq!(p["BillingAddress"], J::Null);
        assert_eq!(
            q.fields,
            vec!["Name", "BillingAddress", "NumberOfEmployees", "Fax"]
        );
    }

    #[test]
    fn unsupported_features_are_named() {
        for (soql, what) in [
            ("SELECT Id FROM Account GROUP BY Name", "GROUP BY"),
            (
                "SELECT Id FROM Account WHERE Name = 'a' GROUP BY Name",
                "GROUP BY",
            ),
            (
                "SELECT Id FROM Account ORDER BY Name LIMIT 5 OFFSET 10",
                "OFFSET",
            ),
            ("SELECT Id FROM Account WITH SECURITY_ENFORCED", "WITH"),
            ("SELECT Id FROM Account FOR UPDATE", "FOR "),
            ("SELECT Id FROM Account USING SCOPE mine", "USING SCOPE"),
            (
                "SELECT Id, (SELECT Id FROM Contacts) FROM Account",
                "subquery",
            ),
            (
                "SELECT Id FROM Account WHERE Id IN (SELECT AccountId FROM Contact)",
                "subquery",
            ),
            (
                "SELECT Owner.Name FROM Account",
                "relationship field 'Owner.Name'",
            ),
            (
                "SELECT Id FROM Account WHERE Owner.Name = 'x'",
                "relationship field 'Owner.Name'",
            ),
            (
                "SELECT Id FROM Account ORDER BY Owner.Name",
                "relationship field 'Owner.Name'",
            ),
            (
                "SELECT TYPEOF What WHEN Account THEN Name END FROM Event",
                "TYPEOF",
            ),
            (
                "SELECT MAX(AnnualRevenue) FROM Account",
                "aggregate function MAX(AnnualRevenue)",
            ),
            ("SELECT FIELDS(ALL) FROM Account", "function FIELDS()"),
            (
                "SELECT Id FROM Account WHERE CALENDAR_YEAR(CreatedDate) = 2024",
                "CALENDAR_YEAR()",
            ),
            (
                "SELECT Id FROM Account WHERE CreatedDate = TODAY",
                "'TODAY'",
            ),
            (
                "SELECT Id FROM Account WHERE CreatedDate = LAST_N_DAYS:7",
                "'LAST_N_DAYS'",
            ),
            ("SELECT Id FROM Account WHERE Id IN :ids", "bind variable"),
            ("SELECT Id FROM Account WHERE Name = :name", "bind variable"),
            (
                "SELECT Id FROM Account WHERE Type INCLUDES ('a')",
                "INCLUDES",
            ),
            ("SELECT Id FROM Account a", "object alias 'a'"),
            ("SELECT Id FROM Account, Contact", "several objects"),
        ] {
            let e = err(soql);
            assert_eq!(e.code, MALFORMED_QUERY, "{soql}");
            assert!(
                e.message.contains(what) && e.message.contains("not supported"),
                "{soql}: {e}"
            );
            assert!(e.message.contains("position"), "{soql}: {e}");
        }
    }

    #[test]
    fn syntax_errors_say_what_and_where() {
        for (soql, needle) in [
            (
                "SELECT Id FORM Account",
                "unexpected token 'FORM' at position 11, expected FROM",
            ),
            (
                "SELECT Id FROM",
                "unexpected end of query at position 15, expected an object name",
            ),
            ("", "unexpected end of query at position 1, expected SELECT"),
            (
                "DELETE FROM Account",
                "unexpected token 'DELETE' at position 1",
            ),
            (
                "SELECT FROM Account",
                "unexpected token 'FROM' at position 8, expected a field name",
            ),
            (
                "SELECT Id, FROM Account",
                "unexpected token 'FROM' at position 12",
            ),
            (
                "SELECT Id FROM Account WHERE",
                "unexpected end of query at position 29",
            ),
            (
                "SELECT Id FROM Account WHERE Name",
                "position 34, expected a comparison operator",
            ),
            (
                "SELECT Id FROM Account WHERE Name =",
                "position 36, expected a literal value",
            ),
            (
                "SELECT Id FROM Account WHERE (Name = 'a'",
                "position 41, expected ')'",
            ),
            (
                "SELECT Id FROM Account WHERE Name = 'a' LIMIT 1 ORDER BY Name",
                "'ORDER' at position 49",
            ),
            (
                "SELECT Id FROM Account WHERE Name = 'abc",
                "unterminated string literal starting at position 37",
            ),
            (
                "SELECT Id FROM Account ORDER BY Name NULLS",
                "expected FIRST or LAST",
            ),
            (
                "SELECT Id FROM Account;",
                "unexpected token ';' at position 23, expected end of query",
            ),
            (
                "SELECT Id, id FROM Account",
                "duplicate field selected: id (at position 12)",
            ),
            (
                "SELECT Id FROM Account WHERE Name = 'a' ORDER Name",
                "'ORDER' at position 41",
            ),
        ] {
            let e = err(soql);
            assert_eq!(e.code, MALFORMED_QUERY, "{soql}");
            assert!(e.message.contains(needle), "{soql}: {e}");
        }
        let deep = format!(
            "SELECT Id FROM Account WHERE {}Name = 'a'{}",
            "(".repeat(500),
            ")".repeat(500)
        );
        let e = err(&deep);
        assert!(e.message.contains("nested"), "{e}");
    }

    #[test]
    fn unknown_and_unusable_fields() {
        for soql in [
            "SELECT Id, Foo FROM Account",
            "SELECT Id FROM Account WHERE Foo = 'x'",
            "SELECT Id FROM Account ORDER BY Foo",
        ] {
            let e = err(soql);
            assert_eq!(e.code, INVALID_FIELD, "{soql}");
            assert!(
                e.message
                    .starts_with("No such column 'Foo' on entity 'Account'."),
                "{soql}: {e}"
            );
        }
        let e = err("SELECT Id FROM Account WHERE BillingAddress = null");
        assert_eq!(e.code, INVALID_FIELD);
        assert_eq!(
            e.message,
            "field 'BillingAddress' can not be filtered in a query call"
        );
        let e = err("SELECT Id FROM Account WHERE description LIKE '%x%'");
        assert_eq!(
            e.message,
            "field 'Description' can not be filtered in a query call"
        );
        let e = err("SELECT Id FROM Account ORDER BY billingaddress");
        assert_eq!(
            e.message,
            "field 'BillingAddress' can not be sorted in a query call"
        );
        let e = err("SELECT Id FROM Account WHERE Name = 5");
        assert_eq!(e.code, INVALID_FIELD);
        assert_eq!(
            e.message,
            "value of filter criterion for field 'Name' must be of type string and should be \
             enclosed in quotes"
        );
        let e = err("SELECT Id FROM Account WHERE NumberOfEmployees = '5'");
        assert_eq!(
            e.message,
            "value of filter criterion for field 'NumberOfEmployees' must be of type integer and \
             should not be enclosed in quotes"
        );
    }

    #[test]
    fn invalid_type() {
        let e = super::invalid_type("Foo");
        assert_eq!(e.code, INVALID_TYPE);
        assert!(
            e.message
                .starts_with("sObject type 'Foo' is not supported."),
            "{e}"
        );
        let mut q = parse("SELECT Id FROM Foo").expect("parses");
        let e = q.bind(&account()).expect_err("wrong object");
        assert_eq!(e.code, INVALID_TYPE);
        assert!(e.message.contains("'Foo'"), "{e}");
    }

    #[test]
    fn failed_bind_leaves_the_query_unchanged() {
        let mut q = parse("SELECT name FROM account WHERE Nope = 1").expect("parses");
        assert!(q.bind(&account()).is_err());
        assert_eq!(q.object, "account");
        assert_eq!(q.fields, vec!["name"]);
    }

    #[test]
    fn other_objects_bind_too() {
        let d = opportunity();
        let mut q = parse(
            "SELECT Name, Amount FROM opportunity WHERE CloseDate >= 2024-01-01 AND \
             Probability > 50 AND StageName IN ('Closed Won') ORDER BY Amount DESC",
        )
        .expect("parses");
        q.bind(&d).expect("binds");
        let data = [
            rec(json!({"Name": "a", "Amount": 10, "Probability": 90,
                       "CloseDate": "2024-05-01", "StageName": "closed won"})),
            rec(json!({"Name": "b", "Amount": 20, "Probability": 90,
                       "CloseDate": "2023-05-01", "StageName": "Closed Won"})),
            rec(json!({"Name": "c", "Amount": 30, "Probability": 60,
                       "CloseDate": "2024-01-01", "StageName": "Closed Won"})),
        ];
        let got: Vec<_> = q
            .run(data.iter())
            .iter()
            .map(|r| r["Name"].clone())
            .collect();
        assert_eq!(got, vec![json!("c"), json!("a")]);
    }

    #[test]
    fn unbound_queries_compare_by_literal_type() {
        let q = parse(
            "SELECT Name FROM Account WHERE name = 'ACME' OR NumberOfEmployees > 50 \
                       ORDER BY NumberOfEmployees DESC",
        )
        .expect("parses");
        let data = accounts();
        let got: Vec<_> = q
            .run(data.iter())
            .iter()
            .map(|r| r["Name"].clone())
            .collect();
        assert_eq!(got, vec![json!("Acme"), json!("beta")]);
        assert_eq!(q.project(&account(), &data[3])["Name"], json!("beta"));
    }

    /// Words and fragments that push random input deep into the grammar.
    fn soup_piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("SELECT ".to_string()),
            Just("FROM ".to_string()),
            Just("Account ".to_string()),
            Just("WHERE ".to_string()),
            Just("ORDER BY ".to_string()),
            Just("LIMIT ".to_string()),
            Just("AND ".to_string()),
            Just("OR ".to_string()),
            Just("NOT ".to_string()),
            Just("IN ".to_string()),
            Just("LIKE ".to_string()),
            Just("NULLS LAST ".to_string()),
            Just("COUNT() ".to_string()),
            Just("Name ".to_string()),
            Just("CreatedDate ".to_string()),
            Just("BillingAddress ".to_string()),
            Just("Id ".to_string()),
            Just(", ".to_string()),
            Just("( ".to_string()),
            Just(") ".to_string()),
            Just("= ".to_string()),
            Just("<= ".to_string()),
            Just("!= ".to_string()),
            Just("null ".to_string()),
            Just("'a%_\\'' ".to_string()),
            Just("-12.5 ".to_string()),
            Just("2024-02-29 ".to_string()),
            Just("2024-01-31T10:00:00.000+0000 ".to_string()),
            Just("2024-01-31T10:00:00+01:00".to_string()),
            "[ -~]{0,3}",
        ]
    }

    fn check_no_panic(s: &str) {
        let data = accounts();
        if let Ok(mut q) = parse(s) {
            let _ = q.run(data.iter());
            let _ = q.bind(&account());
            let mut out = q.run(data.iter());
            q.sort(&mut out);
            for r in &data {
                let _ = q.project(&account(), r);
                let _ = q.matches(r);
            }
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(s in ".*") {
            check_no_panic(&s);
        }

        #[test]
        fn token_soup_never_panics(parts in proptest::collection::vec(soup_piece(), 0..24)) {
            check_no_panic(&parts.concat());
            check_no_panic(&format!("SELECT Name FROM Account WHERE {}", parts.concat()));
        }
    }
}
