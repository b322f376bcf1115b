//! The SOQL lexer: query text to tokens, each with its 1-based position for messages. It
//! knows the shapes of names, string literals (and their escapes), numbers, and date and
//! datetime literals, which it turns into epoch milliseconds; it knows no grammar and no
//! describe, and must not: a token is only what the text says.

use super::SoqlError;
use crate::model::time::date_ms;
use std::cmp::Ordering;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub(super) fn holds(self, o: Ordering) -> bool {
        match self {
            CmpOp::Eq => o == Ordering::Equal,
            CmpOp::Ne => o != Ordering::Equal,
            CmpOp::Lt => o == Ordering::Less,
            CmpOp::Le => o != Ordering::Greater,
            CmpOp::Gt => o == Ordering::Greater,
            CmpOp::Ge => o != Ordering::Less,
        }
    }

    pub(super) fn is_range(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }
}

/// A character of a string literal. Escaping matters only to `LIKE`, where `\%` and `\_` are
/// literal while a bare `%` / `_` is a wildcard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum StrChar {
    Plain(char),
    Escaped(char),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
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
pub(super) struct Token {
    pub(super) tok: Tok,
    /// 1-based character position in the query, as Salesforce counts columns.
    pub(super) pos: usize,
    /// The source text, for messages.
    pub(super) text: String,
}

pub(super) fn lex(src: &str) -> Result<Vec<Token>, SoqlError> {
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
