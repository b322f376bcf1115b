//! Formula fields: a parser and evaluator for the part of Salesforce's formula language the
//! emulator supports — field references (on the record, and on parents through relationship
//! names like `Account__r.Name`), number / text / boolean literals and `null`, arithmetic,
//! `&`, comparisons, `&&` / `||`, and the functions IF, CASE, AND, OR, NOT, ISBLANK, ISNULL,
//! ISPICKVAL, TEXT, BLANKVALUE, NULLVALUE, TODAY, NOW, YEAR, MONTH and DAY.
//!
//! Anything else is refused at parse time as [`Unsupported`], naming the construct, so the org
//! can list it once at start-up; such a field then reads as null.
//!
//! It owns the language only: where a referenced value comes from (the record, its parents,
//! the org's clock) is the caller's, through [`Fields`] and `now_ms`; how a value is stored in
//! a record is [`to_json`] / [`from_json`] against the field's describe type.

use crate::model::FieldType;
use crate::model::time::format_datetime;
use chrono::{Datelike, NaiveDate, TimeZone, Utc};
use serde_json::Value as J;
use std::fmt;

const MS_PER_DAY: i64 = 86_400_000;

/// A value while a formula is evaluated. Percent fields are fractions here (10 % is 0.1), as
/// in Salesforce formulas.
#[derive(Debug, Clone, PartialEq)]
pub enum FValue {
    Null,
    Number(f64),
    Text(String),
    Bool(bool),
    Date(NaiveDate),
    /// Epoch milliseconds, UTC.
    DateTime(i64),
}

impl FValue {
    /// Blank as ISBLANK means it: null, or empty text.
    fn is_blank(&self) -> bool {
        match self {
            FValue::Null => true,
            FValue::Text(s) => s.is_empty(),
            _ => false,
        }
    }

    fn truthy(&self) -> bool {
        matches!(self, FValue::Bool(true))
    }

    /// The text `&` and TEXT() make of a value; null is empty.
    fn text(&self) -> String {
        match self {
            FValue::Null => String::new(),
            FValue::Number(n) => format_number(*n),
            FValue::Text(s) => s.clone(),
            FValue::Bool(b) => b.to_string(),
            FValue::Date(d) => d.format("%Y-%m-%d").to_string(),
            FValue::DateTime(ms) => Utc
                .timestamp_millis_opt(*ms)
                .single()
                .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
                .unwrap_or_default(),
        }
    }
}

/// Numbers as TEXT() writes them: no trailing `.0` on whole numbers.
fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Where a formula's field references get their values.
pub trait Fields {
    /// The value at `path`: `["Total__c"]` on the record, `["Account__r", "Name"]` on its
    /// parent. A path that leads nowhere (no parent set, unknown field) is null.
    fn value(&self, path: &[String]) -> FValue;
}

/// Why a formula cannot be evaluated: the construct the emulator does not support.
#[derive(Debug, Clone, PartialEq)]
pub struct Unsupported {
    pub construct: String,
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.construct)
    }
}

fn unsupported<T>(construct: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported {
        construct: construct.into(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Concat,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Func {
    If,
    Case,
    And,
    Or,
    Not,
    IsBlank,
    IsNull,
    IsPickval,
    Text,
    BlankValue,
    NullValue,
    Today,
    Now,
    Year,
    Month,
    Day,
}

impl Func {
    fn named(name: &str) -> Option<Func> {
        Some(match name.to_ascii_uppercase().as_str() {
            "IF" => Func::If,
            "CASE" => Func::Case,
            "AND" => Func::And,
            "OR" => Func::Or,
            "NOT" => Func::Not,
            "ISBLANK" => Func::IsBlank,
            "ISNULL" => Func::IsNull,
            "ISPICKVAL" => Func::IsPickval,
            "TEXT" => Func::Text,
            "BLANKVALUE" => Func::BlankValue,
            "NULLVALUE" => Func::NullValue,
            "TODAY" => Func::Today,
            "NOW" => Func::Now,
            "YEAR" => Func::Year,
            "MONTH" => Func::Month,
            "DAY" => Func::Day,
            _ => return None,
        })
    }

    /// Whether `n` arguments are what Salesforce accepts.
    fn arity_ok(self, n: usize) -> bool {
        match self {
            Func::Today | Func::Now => n == 0,
            Func::Not
            | Func::IsBlank
            | Func::IsNull
            | Func::Text
            | Func::Year
            | Func::Month
            | Func::Day => n == 1,
            Func::IsPickval | Func::BlankValue | Func::NullValue => n == 2,
            Func::If => n == 3,
            Func::And | Func::Or => n >= 1,
            // CASE(expr, value1, result1, ..., else_result)
            Func::Case => n >= 4 && n.is_multiple_of(2),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Lit(FValue),
    Field(Vec<String>),
    Neg(Box<Expr>),
    Not(Box<Expr>),
    Binary(Op, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Ident(String),
    Sym(&'static str),
}

fn lex(text: &str) -> Result<Vec<Tok>, Unsupported> {
    // Two-character symbols first, so that `<=` is not read as `<` then `=`.
    const SYMBOLS: [&str; 20] = [
        "&&", "||", "==", "!=", "<>", "<=", ">=", "+", "-", "*", "/", "^", "&", "(", ")", ",", "=",
        "<", ">", "!",
    ];
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && chars.get(i + 1) == Some(&'*') {
            // A comment runs to the next `*/`.
            let mut j = i + 2;
            while j + 1 < chars.len() && !(chars[j] == '*' && chars[j + 1] == '/') {
                j += 1;
            }
            i = j + 2;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            let n = s
                .parse::<f64>()
                .or_else(|_| unsupported(format!("number {s}")))?;
            out.push(Tok::Num(n));
        } else if c == '"' || c == '\'' {
            let mut s = String::new();
            i += 1;
            loop {
                match chars.get(i) {
                    None => return unsupported("an unterminated text literal"),
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some('n') => s.push('\n'),
                            Some('t') => s.push('\t'),
                            Some(other) => s.push(*other),
                            None => return unsupported("an unterminated text literal"),
                        }
                        i += 2;
                    }
                    Some(q) if *q == c => {
                        i += 1;
                        break;
                    }
                    Some(other) => {
                        s.push(*other);
                        i += 1;
                    }
                }
            }
            out.push(Tok::Str(s));
        } else if c.is_alphabetic() || c == '_' || c == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '.' | '$'))
            {
                i += 1;
            }
            out.push(Tok::Ident(chars[start..i].iter().collect()));
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let Some(sym) = SYMBOLS.iter().find(|s| rest.starts_with(**s)) else {
                return unsupported(format!("the character {c:?}"));
            };
            i += sym.chars().count();
            out.push(Tok::Sym(sym));
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek_sym(&self) -> Option<&'static str> {
        match self.toks.get(self.pos) {
            Some(Tok::Sym(s)) => Some(s),
            _ => None,
        }
    }

    fn eat(&mut self, sym: &str) -> bool {
        if self.peek_sym() == Some(sym) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, sym: &str) -> Result<(), Unsupported> {
        if self.eat(sym) {
            Ok(())
        } else {
            unsupported(format!("a formula that does not parse (expected `{sym}`)"))
        }
    }

    /// One precedence level of left-associative binary operators.
    fn level(
        &mut self,
        ops: &[(&str, Op)],
        next: fn(&mut Parser) -> Result<Expr, Unsupported>,
    ) -> Result<Expr, Unsupported> {
        let mut left = next(self)?;
        'outer: loop {
            for (sym, op) in ops {
                if self.eat(sym) {
                    let right = next(self)?;
                    left = Expr::Binary(*op, Box::new(left), Box::new(right));
                    continue 'outer;
                }
            }
            return Ok(left);
        }
    }

    fn or(&mut self) -> Result<Expr, Unsupported> {
        self.level(&[("||", Op::Or)], Parser::and)
    }

    fn and(&mut self) -> Result<Expr, Unsupported> {
        self.level(&[("&&", Op::And)], Parser::equality)
    }

    fn equality(&mut self) -> Result<Expr, Unsupported> {
        self.level(
            &[
                ("==", Op::Eq),
                ("=", Op::Eq),
                ("!=", Op::Ne),
                ("<>", Op::Ne),
            ],
            Parser::comparison,
        )
    }

    fn comparison(&mut self) -> Result<Expr, Unsupported> {
        self.level(
            &[("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)],
            Parser::additive,
        )
    }

    fn additive(&mut self) -> Result<Expr, Unsupported> {
        self.level(
            &[("+", Op::Add), ("-", Op::Sub), ("&", Op::Concat)],
            Parser::multiplicative,
        )
    }

    fn multiplicative(&mut self) -> Result<Expr, Unsupported> {
        self.level(&[("*", Op::Mul), ("/", Op::Div)], Parser::unary)
    }

    fn unary(&mut self) -> Result<Expr, Unsupported> {
        if self.eat("-") {
            return Ok(Expr::Neg(Box::new(self.unary()?)));
        }
        if self.eat("+") {
            return self.unary();
        }
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.power()
    }

    fn power(&mut self) -> Result<Expr, Unsupported> {
        let base = self.primary()?;
        if self.eat("^") {
            let exp = self.unary()?;
            return Ok(Expr::Binary(Op::Pow, Box::new(base), Box::new(exp)));
        }
        Ok(base)
    }

    fn primary(&mut self) -> Result<Expr, Unsupported> {
        let Some(tok) = self.toks.get(self.pos).cloned() else {
            return unsupported("a formula that ends too early");
        };
        self.pos += 1;
        match tok {
            Tok::Num(n) => Ok(Expr::Lit(FValue::Number(n))),
            Tok::Str(s) => Ok(Expr::Lit(FValue::Text(s))),
            Tok::Sym("(") => {
                let e = self.or()?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Sym(s) => unsupported(format!("a formula that does not parse (at `{s}`)")),
            Tok::Ident(name) => {
                if self.eat("(") {
                    let Some(func) = Func::named(&name) else {
                        return unsupported(format!("function {}", name.to_ascii_uppercase()));
                    };
                    let mut args = Vec::new();
                    if !self.eat(")") {
                        loop {
                            args.push(self.or()?);
                            if self.eat(")") {
                                break;
                            }
                            self.expect(",")?;
                        }
                    }
                    if !func.arity_ok(args.len()) {
                        return unsupported(format!(
                            "{} with {} arguments",
                            name.to_ascii_uppercase(),
                            args.len()
                        ));
                    }
                    return Ok(Expr::Call(func, args));
                }
                match name.to_ascii_uppercase().as_str() {
                    "TRUE" => return Ok(Expr::Lit(FValue::Bool(true))),
                    "FALSE" => return Ok(Expr::Lit(FValue::Bool(false))),
                    "NULL" => return Ok(Expr::Lit(FValue::Null)),
                    _ => {}
                }
                if name.starts_with('$') {
                    return unsupported(format!("global variable {name}"));
                }
                let path: Vec<String> = name.split('.').map(str::to_string).collect();
                if path.iter().any(String::is_empty) {
                    return unsupported(format!("field reference {name}"));
                }
                Ok(Expr::Field(path))
            }
        }
    }
}

/// A parsed formula.
#[derive(Debug, Clone, PartialEq)]
pub struct Formula {
    expr: Expr,
}

impl Formula {
    /// Parses `text`, or names the first construct the emulator does not support.
    pub fn parse(text: &str) -> Result<Formula, Unsupported> {
        let mut p = Parser {
            toks: lex(text)?,
            pos: 0,
        };
        let expr = p.or()?;
        if p.pos != p.toks.len() {
            return unsupported("a formula that does not parse (text after the end)");
        }
        Ok(Formula { expr })
    }

    /// Every field path the formula reads.
    pub fn references(&self) -> Vec<Vec<String>> {
        fn walk(e: &Expr, out: &mut Vec<Vec<String>>) {
            match e {
                Expr::Lit(_) => {}
                Expr::Field(p) => out.push(p.clone()),
                Expr::Neg(e) | Expr::Not(e) => walk(e, out),
                Expr::Binary(_, a, b) => {
                    walk(a, out);
                    walk(b, out);
                }
                Expr::Call(_, args) => args.iter().for_each(|a| walk(a, out)),
            }
        }
        let mut out = Vec::new();
        walk(&self.expr, &mut out);
        out
    }

    /// The formula's value for the record `fields` reads, at time `now_ms` (the org's clock).
    pub fn eval(&self, fields: &dyn Fields, now_ms: i64) -> FValue {
        eval(&self.expr, fields, now_ms)
    }
}

fn today(now_ms: i64) -> FValue {
    Utc.timestamp_millis_opt(now_ms)
        .single()
        .map(|t| FValue::Date(t.date_naive()))
        .unwrap_or(FValue::Null)
}

fn date_ms_of(d: NaiveDate) -> i64 {
    d.and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or_default()
}

fn add_days(d: NaiveDate, days: f64) -> FValue {
    // Salesforce drops the fraction when adding to a date.
    d.checked_add_signed(chrono::Duration::days(days.trunc() as i64))
        .map(FValue::Date)
        .unwrap_or(FValue::Null)
}

fn arith(op: Op, a: FValue, b: FValue) -> FValue {
    use FValue::*;
    match (op, a, b) {
        (_, Null, _) | (_, _, Null) => Null,
        (Op::Add, Number(x), Number(y)) => Number(x + y),
        (Op::Add, Text(x), Text(y)) => Text(x + &y),
        (Op::Add, Date(d), Number(n)) | (Op::Add, Number(n), Date(d)) => add_days(d, n),
        (Op::Add, DateTime(t), Number(n)) | (Op::Add, Number(n), DateTime(t)) => {
            DateTime(t + (n * MS_PER_DAY as f64).round() as i64)
        }
        (Op::Sub, Number(x), Number(y)) => Number(x - y),
        (Op::Sub, Date(d), Number(n)) => add_days(d, -n),
        (Op::Sub, Date(x), Date(y)) => Number((x - y).num_days() as f64),
        (Op::Sub, DateTime(t), Number(n)) => DateTime(t - (n * MS_PER_DAY as f64).round() as i64),
        (Op::Sub, DateTime(x), DateTime(y)) => Number((x - y) as f64 / MS_PER_DAY as f64),
        (Op::Mul, Number(x), Number(y)) => Number(x * y),
        // Division by zero is an error in Salesforce, which the API reads as null.
        (Op::Div, Number(_), Number(0.0)) => Null,
        (Op::Div, Number(x), Number(y)) => Number(x / y),
        (Op::Pow, Number(x), Number(y)) => {
            let r = x.powf(y);
            if r.is_finite() { Number(r) } else { Null }
        }
        _ => Null,
    }
}

/// Orders two values of one kind; None when they cannot be compared.
fn order(a: &FValue, b: &FValue) -> Option<std::cmp::Ordering> {
    use FValue::*;
    match (a, b) {
        (Number(x), Number(y)) => x.partial_cmp(y),
        (Text(x), Text(y)) => Some(x.cmp(y)),
        (Bool(x), Bool(y)) => Some(x.cmp(y)),
        (Date(x), Date(y)) => Some(x.cmp(y)),
        (DateTime(x), DateTime(y)) => Some(x.cmp(y)),
        (Date(x), DateTime(y)) => Some(date_ms_of(*x).cmp(y)),
        (DateTime(x), Date(y)) => Some(x.cmp(&date_ms_of(*y))),
        _ => None,
    }
}

fn equal(a: &FValue, b: &FValue) -> bool {
    // Blank text and null are one value to a formula.
    if a.is_blank() || b.is_blank() {
        return a.is_blank() && b.is_blank();
    }
    order(a, b) == Some(std::cmp::Ordering::Equal)
}

fn eval(e: &Expr, fields: &dyn Fields, now_ms: i64) -> FValue {
    let ev = |e: &Expr| eval(e, fields, now_ms);
    match e {
        Expr::Lit(v) => v.clone(),
        Expr::Field(path) => fields.value(path),
        Expr::Neg(e) => match ev(e) {
            FValue::Number(n) => FValue::Number(-n),
            _ => FValue::Null,
        },
        Expr::Not(e) => FValue::Bool(!ev(e).truthy()),
        Expr::Binary(op, a, b) => match op {
            Op::And => FValue::Bool(ev(a).truthy() && ev(b).truthy()),
            Op::Or => FValue::Bool(ev(a).truthy() || ev(b).truthy()),
            Op::Concat => FValue::Text(ev(a).text() + &ev(b).text()),
            Op::Eq => FValue::Bool(equal(&ev(a), &ev(b))),
            Op::Ne => FValue::Bool(!equal(&ev(a), &ev(b))),
            Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                use std::cmp::Ordering::*;
                match order(&ev(a), &ev(b)) {
                    None => FValue::Null,
                    Some(o) => FValue::Bool(match op {
                        Op::Lt => o == Less,
                        Op::Le => o != Greater,
                        Op::Gt => o == Greater,
                        _ => o != Less,
                    }),
                }
            }
            _ => arith(*op, ev(a), ev(b)),
        },
        Expr::Call(func, args) => call(*func, args, fields, now_ms),
    }
}

fn call(func: Func, args: &[Expr], fields: &dyn Fields, now_ms: i64) -> FValue {
    let ev = |i: usize| {
        args.get(i)
            .map(|e| eval(e, fields, now_ms))
            .unwrap_or(FValue::Null)
    };
    match func {
        Func::If => {
            if ev(0).truthy() {
                ev(1)
            } else {
                ev(2)
            }
        }
        Func::Case => {
            let subject = ev(0);
            let pairs = (args.len() - 2) / 2;
            for k in 0..pairs {
                if equal(&subject, &ev(1 + 2 * k)) {
                    return ev(2 + 2 * k);
                }
            }
            ev(args.len() - 1)
        }
        Func::And => FValue::Bool((0..args.len()).all(|i| ev(i).truthy())),
        Func::Or => FValue::Bool((0..args.len()).any(|i| ev(i).truthy())),
        Func::Not => FValue::Bool(!ev(0).truthy()),
        Func::IsBlank | Func::IsNull => FValue::Bool(ev(0).is_blank()),
        Func::IsPickval => FValue::Bool(equal(&ev(0), &ev(1)) && !ev(0).is_blank()),
        Func::Text => match ev(0) {
            FValue::Null => FValue::Null,
            v => FValue::Text(v.text()),
        },
        Func::BlankValue | Func::NullValue => {
            let v = ev(0);
            if v.is_blank() { ev(1) } else { v }
        }
        Func::Today => today(now_ms),
        Func::Now => FValue::DateTime(now_ms),
        Func::Year | Func::Month | Func::Day => {
            let date = match ev(0) {
                FValue::Date(d) => d,
                FValue::DateTime(ms) => match today(ms) {
                    FValue::Date(d) => d,
                    _ => return FValue::Null,
                },
                _ => return FValue::Null,
            };
            FValue::Number(match func {
                Func::Year => date.year() as f64,
                Func::Month => date.month() as f64,
                _ => date.day() as f64,
            })
        }
    }
}

/// A record's stored value (REST JSON form) as a formula sees it, by the field's type.
pub fn from_json(value: &J, kind: &FieldType) -> FValue {
    match (kind, value) {
        (_, J::Null) => FValue::Null,
        (FieldType::Boolean, J::Bool(b)) => FValue::Bool(*b),
        (FieldType::Percent, J::Number(n)) => n
            .as_f64()
            .map(|x| FValue::Number(x / 100.0))
            .unwrap_or(FValue::Null),
        (_, J::Number(n)) => n.as_f64().map(FValue::Number).unwrap_or(FValue::Null),
        (FieldType::Date, J::String(s)) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map(FValue::Date)
            .unwrap_or(FValue::Null),
        (FieldType::Datetime, J::String(s)) => crate::model::time::datetime_ms(s)
            .map(FValue::DateTime)
            .unwrap_or(FValue::Null),
        (_, J::String(s)) => FValue::Text(s.clone()),
        (_, J::Bool(b)) => FValue::Bool(*b),
        _ => FValue::Null,
    }
}

/// A formula's result as the API returns it for a field of type `kind` with `scale` decimal
/// places: numbers rounded to the scale, percents back to percent points, an empty text as
/// null, a checkbox never null. A result of the wrong kind reads as null.
pub fn to_json(value: FValue, kind: &FieldType, scale: i64) -> J {
    let round = |x: f64| {
        let f = 10f64.powi(scale.clamp(0, 18) as i32);
        // Half away from zero, as Salesforce rounds.
        let r = (x * f).round() / f;
        serde_json::Number::from_f64(r).map_or(J::Null, J::Number)
    };
    match (kind, value) {
        (FieldType::Boolean, v) => J::Bool(v.truthy()),
        (_, FValue::Null) => J::Null,
        (FieldType::Double | FieldType::Currency, FValue::Number(n)) => round(n),
        (FieldType::Percent, FValue::Number(n)) => round(n * 100.0),
        (FieldType::Int | FieldType::Long, FValue::Number(n)) => J::from(n.round() as i64),
        (FieldType::Date, FValue::Date(d)) => J::String(d.format("%Y-%m-%d").to_string()),
        (FieldType::Date, FValue::DateTime(ms)) => match today(ms) {
            FValue::Date(d) => J::String(d.format("%Y-%m-%d").to_string()),
            _ => J::Null,
        },
        (FieldType::Datetime, FValue::DateTime(ms)) => J::String(format_datetime(ms)),
        (FieldType::Datetime, FValue::Date(d)) => J::String(format_datetime(date_ms_of(d))),
        (
            FieldType::Double
            | FieldType::Currency
            | FieldType::Percent
            | FieldType::Int
            | FieldType::Long
            | FieldType::Date
            | FieldType::Datetime
            | FieldType::Time,
            _,
        ) => J::Null,
        (_, v) => {
            let s = v.text();
            if s.is_empty() { J::Null } else { J::String(s) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Rec(HashMap<String, FValue>);

    impl Fields for Rec {
        fn value(&self, path: &[String]) -> FValue {
            self.0.get(&path.join(".")).cloned().unwrap_or(FValue::Null)
        }
    }

    fn rec(pairs: &[(&str, FValue)]) -> Rec {
        Rec(pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect())
    }

    /// 2026-12-06T12:00:00Z
    const NOW: i64 = 1_796_558_400_000;

    fn run(text: &str, r: &Rec) -> FValue {
        Formula::parse(text)
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .eval(r, NOW)
    }

    fn num(n: f64) -> FValue {
        FValue::Number(n)
    }

    fn text(s: &str) -> FValue {
        FValue::Text(s.into())
    }

    #[test]
    fn arithmetic_follows_precedence() {
        let r = rec(&[("A", num(2.0)), ("B", num(3.0))]);
        assert_eq!(run("A + B * 4", &r), num(14.0));
        assert_eq!(run("(A + B) * 4", &r), num(20.0));
        // `^` binds tighter than a unary minus.
        assert_eq!(run("-A ^ 2 + 10 / 4", &r), num(-1.5));
        assert_eq!(run("A - B - 1", &r), num(-2.0));
        assert_eq!(
            run("A / 0", &r),
            FValue::Null,
            "division by zero reads as null"
        );
        assert_eq!(run("A + Missing__c", &r), FValue::Null, "null propagates");
    }

    #[test]
    fn text_concatenation_and_text_function() {
        let r = rec(&[
            ("Name", text("INV-1")),
            ("Status__c", text("Sent")),
            ("Total__c", num(12.5)),
            ("Count__c", num(3.0)),
        ]);
        assert_eq!(
            run(r#"Name & " (" & TEXT(Status__c) & ")""#, &r),
            text("INV-1 (Sent)")
        );
        assert_eq!(
            run("TEXT(Total__c) & '/' & TEXT(Count__c)", &r),
            text("12.5/3")
        );
        assert_eq!(
            run("Name & Nothing__c", &r),
            text("INV-1"),
            "null joins as empty"
        );
        assert_eq!(run("TEXT(Nothing__c)", &r), FValue::Null);
    }

    #[test]
    fn logic_comparisons_and_blanks() {
        let r = rec(&[
            ("Paid__c", FValue::Bool(false)),
            ("Total__c", num(100.0)),
            ("Empty__c", text("")),
            ("Status__c", text("Sent")),
        ]);
        assert_eq!(run("IF(Paid__c, 0, Total__c)", &r), num(100.0));
        assert_eq!(
            run("IF(NOT(Paid__c) && Total__c >= 100, 1, 2)", &r),
            num(1.0)
        );
        assert_eq!(run("IF(Paid__c || Total__c < 50, 1, 2)", &r), num(2.0));
        assert_eq!(
            run("AND(Total__c > 1, Total__c <> 5, !Paid__c)", &r),
            FValue::Bool(true)
        );
        assert_eq!(
            run("OR(Total__c = 1, Total__c == 2)", &r),
            FValue::Bool(false)
        );
        assert_eq!(
            run("ISBLANK(Empty__c) && ISBLANK(Nope__c)", &r),
            FValue::Bool(true)
        );
        assert_eq!(run("ISBLANK(Total__c)", &r), FValue::Bool(false));
        assert_eq!(run("ISPICKVAL(Status__c, 'Sent')", &r), FValue::Bool(true));
        assert_eq!(run("ISPICKVAL(Nope__c, '')", &r), FValue::Bool(false));
        assert_eq!(run("BLANKVALUE(Empty__c, 'none')", &r), text("none"));
        assert_eq!(run("NULLVALUE(Nope__c, 7) + 1", &r), num(8.0));
        assert_eq!(
            run("CASE(Status__c, 'Draft', 1, 'Sent', 2, 0)", &r),
            num(2.0)
        );
        assert_eq!(run("CASE(Nope__c, 'Draft', 1, 0)", &r), num(0.0));
        assert_eq!(
            run("Nope__c > 1", &r),
            FValue::Null,
            "ordering null is null"
        );
        assert_eq!(run("if(true, 'a', 'b') = \"a\"", &r), FValue::Bool(true));
    }

    #[test]
    fn dates_and_the_clock() {
        let due = NaiveDate::from_ymd_opt(2026, 11, 30).expect("date");
        let r = rec(&[("Due__c", FValue::Date(due))]);
        assert_eq!(
            run("TODAY()", &r),
            FValue::Date(NaiveDate::from_ymd_opt(2026, 12, 6).expect("date"))
        );
        assert_eq!(run("TODAY() - Due__c", &r), num(6.0));
        assert_eq!(run("YEAR(Due__c) * 100 + MONTH(Due__c)", &r), num(202611.0));
        assert_eq!(run("DAY(Due__c + 2)", &r), num(2.0));
        assert_eq!(run("Due__c < TODAY()", &r), FValue::Bool(true));
        assert_eq!(run("NOW()", &r), FValue::DateTime(NOW));
        assert_eq!(run("(NOW() + 0.5) - NOW()", &r), num(0.5));
        assert_eq!(run("TEXT(Due__c)", &r), text("2026-11-30"));
    }

    #[test]
    fn relationship_paths_are_field_references() {
        let f = Formula::parse("Account__r.Name & ' / ' & Account__r.Parent.Name").expect("ok");
        assert_eq!(
            f.references(),
            [
                vec!["Account__r".to_string(), "Name".to_string()],
                vec![
                    "Account__r".to_string(),
                    "Parent".to_string(),
                    "Name".to_string()
                ]
            ]
        );
        let r = rec(&[("Account__r.Name", text("Acme"))]);
        assert_eq!(f.eval(&r, NOW), text("Acme / "));
    }

    #[test]
    fn what_is_not_supported_is_named() {
        for (formula, construct) in [
            ("VLOOKUP(a, b, c)", "function VLOOKUP"),
            ("$User.Id", "global variable $User.Id"),
            ("IF(a, b)", "IF with 2 arguments"),
            ("CASE(a, 1, 2)", "CASE with 3 arguments"),
            ("a +", "a formula that ends too early"),
            ("a b", "a formula that does not parse (text after the end)"),
            ("a # b", "the character '#'"),
            ("'open", "an unterminated text literal"),
        ] {
            assert_eq!(
                Formula::parse(formula).map(|_| ()),
                Err(Unsupported {
                    construct: construct.to_string()
                }),
                "{formula}"
            );
        }
        // Comments are allowed.
        assert!(Formula::parse("/* total */ a + 1").is_ok());
    }

    #[test]
    fn results_take_the_field_type() {
        assert_eq!(
            to_json(num(2.0 / 3.0), &FieldType::Currency, 2),
            serde_json::json!(0.67)
        );
        assert_eq!(
            to_json(num(0.125), &FieldType::Percent, 1),
            serde_json::json!(12.5)
        );
        assert_eq!(
            to_json(FValue::Null, &FieldType::Boolean, 0),
            J::Bool(false)
        );
        assert_eq!(to_json(text(""), &FieldType::String, 0), J::Null);
        assert_eq!(
            to_json(num(3.0), &FieldType::String, 0),
            serde_json::json!("3")
        );
        assert_eq!(to_json(text("x"), &FieldType::Double, 2), J::Null);
        assert_eq!(
            to_json(FValue::DateTime(NOW), &FieldType::Datetime, 0),
            serde_json::json!("2026-12-06T12:00:00.000+0000")
        );
        assert_eq!(
            from_json(&serde_json::json!(10), &FieldType::Percent),
            num(0.1)
        );
        assert_eq!(
            from_json(&serde_json::json!("2026-01-02"), &FieldType::Date),
            FValue::Date(NaiveDate::from_ymd_opt(2026, 1, 2).expect("date"))
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever the text, parsing never panics, and what parses evaluates.
            #[test]
            fn any_text_parses_or_is_refused(s in "[ -~]{0,40}") {
                if let Ok(f) = Formula::parse(&s) {
                    let _ = f.eval(&rec(&[]), NOW);
                }
            }

            /// Integer arithmetic agrees with Rust's, through the parser.
            #[test]
            fn integer_arithmetic_agrees(a in -1000i64..1000, b in -1000i64..1000, c in 1i64..50) {
                let r = rec(&[("A", num(a as f64)), ("B", num(b as f64))]);
                prop_assert_eq!(run(&format!("A * B - {c} + A"), &r), num((a * b - c + a) as f64));
                prop_assert_eq!(run(&format!("(A + B) * {c}"), &r), num(((a + b) * c) as f64));
                prop_assert_eq!(
                    run("IF(A > B, A, B)", &r),
                    num(a.max(b) as f64)
                );
            }
        }
    }
}
