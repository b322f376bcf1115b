//! The SOQL parser: tokens to a [`Query`] with its syntax tree (conditions, `ORDER BY` keys,
//! `LIMIT`). It checks syntax only, and rejects by name what valid SOQL may hold that the
//! subset lacks; field names and literal types are checked later, against the describe, by
//! binding. It must not read records or describes.

use super::items::{Agg, HIDDEN};
use super::lexer::{CmpOp, StrChar, Tok, Token};
use super::value::{Family, Lit, LitKind, Pat, Val, compile_like, guess_family, literal_as};
use super::{MAX_FIELDS_ROWS, MAX_OFFSET, Query, SoqlError, dates};

/// Bounds recursion on parenthesized conditions: deeper input would risk a stack overflow,
/// which aborts the process rather than failing one request.
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum CondOp {
    Cmp(CmpOp),
    Like(Vec<Pat>),
    In,
    NotIn,
}

/// One field expression: `field op literal(s)`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Cond {
    pub(super) field: String,
    pub(super) op: CondOp,
    pub(super) lits: Vec<Lit>,
    pub(super) family: Family,
    pub(super) vals: Vec<Val>,
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
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Expr {
    Cond(Cond),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Not(Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct OrderKey {
    pub(super) field: String,
    pub(super) desc: bool,
    pub(super) nulls_first: bool,
    pub(super) family: Family,
}

/// SOQL's reserved words: never field or object names.
const RESERVED: &[&str] = &[
    "AND", "ASC", "DESC", "EXCLUDES", "FIRST", "FROM", "GROUP", "HAVING", "IN", "INCLUDES", "LAST",
    "LIKE", "LIMIT", "NOT", "NULL", "NULLS", "OR", "SELECT", "WHERE", "WITH",
];

/// Words that may follow the object name; anything else there would be an alias.
const CLAUSES: &[&str] = &[
    "WHERE", "ORDER", "LIMIT", "USING", "WITH", "GROUP", "HAVING", "OFFSET", "FOR", "UPDATE",
];

pub(super) fn is_reserved(s: &str) -> bool {
    RESERVED.iter().any(|r| r.eq_ignore_ascii_case(s))
}

/// Token text short enough for a message.
pub(super) fn shorten(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX).collect();
        out.push('…');
        out
    }
}

pub(super) struct Parser {
    pub(super) toks: Vec<Token>,
    pub(super) i: usize,
    pub(super) eof: Token,
    /// The moment relative date literals (`TODAY`) are read at, in epoch ms.
    pub(super) now_ms: i64,
    /// While HAVING and ORDER BY are read: the query's aggregates, which they may use.
    pub(super) aggs: Option<Vec<Agg>>,
}

impl Parser {
    pub(super) fn peek_n(&self, n: usize) -> &Token {
        self.toks.get(self.i + n).unwrap_or(&self.eof)
    }

    pub(super) fn peek(&self) -> &Token {
        self.peek_n(0)
    }

    pub(super) fn advance(&mut self) -> Token {
        let t = self.peek().clone();
        if self.i < self.toks.len() {
            self.i += 1;
        }
        t
    }

    pub(super) fn is_kw_at(&self, n: usize, kw: &str) -> bool {
        matches!(&self.peek_n(n).tok, Tok::Ident(s) if s.eq_ignore_ascii_case(kw))
    }

    pub(super) fn is_kw(&self, kw: &str) -> bool {
        self.is_kw_at(0, kw)
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        let hit = self.is_kw(kw);
        if hit {
            self.advance();
        }
        hit
    }

    pub(super) fn eat(&mut self, tok: &Tok) -> bool {
        let hit = &self.peek().tok == tok;
        if hit {
            self.advance();
        }
        hit
    }

    pub(super) fn unexpected(&self, expected: &str) -> SoqlError {
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

    pub(super) fn unsupported(&self, what: &str, pos: usize) -> SoqlError {
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
            "FOR" => "FOR VIEW / FOR REFERENCE / FOR UPDATE",
            "UPDATE" => "UPDATE TRACKING / UPDATE VIEWSTAT",
            _ => return Ok(()),
        };
        Err(self.unsupported(what, t.pos))
    }

    /// A plain field name, rejecting by name what the subset lacks in its place.
    pub(super) fn field_name(&mut self, expected: &str) -> Result<(String, usize), SoqlError> {
        let t = self.peek().clone();
        let Tok::Ident(name) = &t.tok else {
            return Err(self.unexpected(expected));
        };
        if self.peek_n(1).tok == Tok::LParen {
            return Err(self.unsupported(&format!("function {name}()"), t.pos));
        }
        if name.split('.').any(is_reserved) {
            return Err(self.unexpected(expected));
        }
        self.advance();
        Ok((name.clone(), t.pos))
    }

    pub(super) fn query(&mut self) -> Result<Query, SoqlError> {
        let q = self.query_body(false)?;
        self.reject_unsupported_clause()?;
        if self.peek().tok != Tok::Eof {
            return Err(self.unexpected("end of query"));
        }
        Ok(q)
    }

    fn whole_number(&mut self, after: &str) -> Result<u64, SoqlError> {
        let t = self.peek().clone();
        let n = match &t.tok {
            Tok::Num(text) => text.parse::<u64>().ok(),
            _ => None,
        };
        let Some(n) = n else {
            return Err(self.unexpected(&format!("a non-negative whole number after {after}")));
        };
        self.advance();
        Ok(n)
    }

    /// A query up to its end, or (`nested`, a subquery) up to its closing parenthesis.
    pub(super) fn query_body(&mut self, nested: bool) -> Result<Query, SoqlError> {
        self.expect_kw("SELECT")?;
        let select = self.select_list(nested)?;
        self.expect_kw("FROM")?;
        let t = self.peek().clone();
        let object = match &t.tok {
            // A subquery names a relationship, never a path.
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
        let mut group_by = Vec::new();
        if self.is_kw("GROUP") && self.is_kw_at(1, "BY") {
            let pos = self.peek().pos;
            if nested {
                return Err(self.unsupported("GROUP BY in a subquery", pos));
            }
            self.advance();
            self.advance();
            if self.is_kw("ROLLUP") || self.is_kw("CUBE") {
                return Err(self.unsupported("GROUP BY ROLLUP / CUBE", pos));
            }
            loop {
                let (name, pos) = self.field_name("a field name")?;
                if group_by
                    .iter()
                    .any(|(g, _): &(String, Family)| g.eq_ignore_ascii_case(&name))
                {
                    return Err(SoqlError::malformed(format!(
                        "duplicate field in GROUP BY: {name} (at position {pos})"
                    )));
                }
                group_by.push((name, Family::Auto));
                if !self.eat(&Tok::Comma) {
                    break;
                }
            }
        }

        // HAVING and ORDER BY may use aggregates; a subquery has its own (none).
        let saved = self.aggs.replace(select.aggs);
        let having = if self.is_kw("HAVING") {
            let pos = self.peek().pos;
            self.advance();
            if group_by.is_empty() {
                return Err(SoqlError::malformed(format!(
                    "HAVING at position {pos} needs a GROUP BY clause"
                )));
            }
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
        let aggs = std::mem::replace(&mut self.aggs, saved).unwrap_or_default();

        self.reject_unsupported_clause()?;
        let mut limit = None;
        if self.eat_kw("LIMIT") {
            let n = self.whole_number("LIMIT")?;
            limit = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }

        let mut offset = None;
        if self.is_kw("OFFSET") {
            let pos = self.peek().pos;
            self.advance();
            if nested {
                return Err(self.unsupported("OFFSET in a subquery", pos));
            }
            let n = self.whole_number("OFFSET")?;
            if n > MAX_OFFSET {
                return Err(SoqlError {
                    code: "NUMBER_OUTSIDE_VALID_RANGE",
                    message: format!("Maximum SOQL offset allowed is {MAX_OFFSET}"),
                });
            }
            offset = Some(usize::try_from(n).unwrap_or(usize::MAX));
        }

        // FIELDS(ALL) and FIELDS(CUSTOM) are bounded, FIELDS(STANDARD) is not.
        let bounded = select
            .fields
            .iter()
            .any(|f| f == "FIELDS(ALL)" || f == "FIELDS(CUSTOM)");
        if bounded && limit.is_none_or(|n| n > MAX_FIELDS_ROWS) {
            return Err(SoqlError::malformed(format!(
                "The SOQL FIELDS function must have a LIMIT of at most {MAX_FIELDS_ROWS}"
            )));
        }
        Ok(Query {
            object,
            count_only: select.count_only,
            fields: select.fields,
            items: select.items,
            children: select.children,
            aggs,
            group_by,
            having,
            filter,
            order,
            limit,
            offset,
            joins: Vec::new(),
            bound: false,
        })
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
        let field = self.operand()?;
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
            Tok::Ident(w) if dates::kind(w).is_some() => return self.date_literal(w.clone()),
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

    /// `TODAY`, `LAST_N_DAYS:7`, ...: the range it stands for at [`Parser::now_ms`].
    fn date_literal(&mut self, word: String) -> Result<Lit, SoqlError> {
        let pos = self.peek().pos;
        self.advance();
        let mut n = 0;
        if dates::kind(&word) == Some(true) {
            if !self.eat(&Tok::Other(':')) {
                return Err(self.unexpected(&format!("':' and a number after {word}")));
            }
            let t = self.peek().clone();
            n = match &t.tok {
                Tok::Num(text) => text.parse::<i64>().ok().filter(|n| *n >= 0),
                _ => None,
            }
            .ok_or_else(|| self.unexpected(&format!("a whole number after {word}:")))?;
            self.advance();
        }
        let (start, end) = dates::range(&word, n, self.now_ms).ok_or_else(|| {
            SoqlError::malformed(format!(
                "date literal {word} out of range at position {pos}"
            ))
        })?;
        Ok(Lit {
            kind: LitKind::Range(start, end),
        })
    }

    /// A field, or while HAVING and ORDER BY are read an aggregate call, named by the marker
    /// binding resolves (`HIDDEN` and the aggregate's index).
    fn operand(&mut self) -> Result<String, SoqlError> {
        if self.at_aggregate()
            && let Some(mut aggs) = self.aggs.take()
        {
            let i = self.aggregate_ref(&mut aggs);
            self.aggs = Some(aggs);
            return Ok(format!("{HIDDEN}{}", i?));
        }
        Ok(self.field_name("a field name")?.0)
    }

    fn order_list(&mut self) -> Result<Vec<OrderKey>, SoqlError> {
        let mut keys = Vec::new();
        loop {
            let field = self.operand()?;
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
