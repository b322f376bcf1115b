//! The SELECT list: plain and relationship fields (`Account.Name`), `FIELDS(...)`,
//! `COUNT()`, aggregate functions with their aliases, and parent-to-child subqueries
//! (`(SELECT Id FROM Contacts)`). Syntax only, like the rest of the parser: names are resolved
//! by binding. The parsed shapes are in `items`.

use super::SoqlError;
use super::items::{Agg, AggFunc, Child, HIDDEN, Item, Select};
use super::lexer::Tok;
use super::parser::{Parser, is_reserved};
use super::value::Family;

impl Parser {
    /// `FUNC(field)` at the current token, as an aggregate of `aggs` (an equal one is reused,
    /// else a hidden one is added): the index. For HAVING and ORDER BY.
    pub(super) fn aggregate_ref(&mut self, aggs: &mut Vec<Agg>) -> Result<usize, SoqlError> {
        let (func, arg) = self.aggregate_call()?;
        if let Some(i) = aggs
            .iter()
            .position(|a| a.func == func && a.arg.eq_ignore_ascii_case(&arg))
        {
            return Ok(i);
        }
        aggs.push(Agg {
            func,
            arg,
            key: format!("{HIDDEN}{}", aggs.len()),
            hidden: true,
            family: Family::Auto,
        });
        Ok(aggs.len() - 1)
    }

    /// Whether the current token starts an aggregate call `FUNC(`.
    pub(super) fn at_aggregate(&self) -> bool {
        matches!(&self.peek().tok, Tok::Ident(w) if AggFunc::from_name(w).is_some())
            && self.peek_n(1).tok == Tok::LParen
    }

    fn aggregate_call(&mut self) -> Result<(AggFunc, String), SoqlError> {
        let t = self.peek().clone();
        let Tok::Ident(word) = &t.tok else {
            return Err(self.unexpected("an aggregate function"));
        };
        let func = AggFunc::from_name(word).ok_or_else(|| self.unexpected("a function"))?;
        self.advance();
        self.advance();
        let (arg, _) = self.field_name("a field name")?;
        if !self.eat(&Tok::RParen) {
            return Err(self.unexpected("')'"));
        }
        Ok((func, arg))
    }

    /// An alias after a SELECT item: a plain name that is no keyword, followed by the next
    /// item or FROM (so a misspelt FROM is reported as such).
    fn alias(&mut self) -> Option<String> {
        let t = self.peek().clone();
        let next_ok = self.peek_n(1).tok == Tok::Comma || self.is_kw_at(1, "FROM");
        match &t.tok {
            Tok::Ident(w) if next_ok && !w.contains('.') && !is_reserved(w) => {
                self.advance();
                Some(w.clone())
            }
            _ => None,
        }
    }

    pub(super) fn select_list(&mut self, nested: bool) -> Result<Select, SoqlError> {
        let mut count_pos: Option<usize> = None;
        let mut s = Select::default();
        let mut unaliased = 0;
        loop {
            let t = self.peek().clone();
            match &t.tok {
                Tok::LParen if nested => {
                    return Err(SoqlError::malformed(format!(
                        "a subquery cannot hold another subquery (at position {})",
                        t.pos
                    )));
                }
                Tok::LParen => {
                    self.advance();
                    if !self.is_kw("SELECT") {
                        return Err(self.unexpected("SELECT"));
                    }
                    let query = self.query_body(true)?;
                    if !self.eat(&Tok::RParen) {
                        return Err(self.unexpected("')' closing the subquery"));
                    }
                    let relationship = query.object.clone();
                    if s.children
                        .iter()
                        .any(|c| c.relationship.eq_ignore_ascii_case(&relationship))
                    {
                        return Err(SoqlError::malformed(format!(
                            "duplicate subquery on {relationship} (at position {})",
                            t.pos
                        )));
                    }
                    s.items.push(Item::Child(s.children.len()));
                    s.children.push(Child {
                        relationship,
                        field: String::new(),
                        query,
                    });
                }
                Tok::Ident(word) if word.eq_ignore_ascii_case("TYPEOF") => {
                    return Err(self.unsupported("TYPEOF", t.pos));
                }
                Tok::Ident(word)
                    if word.eq_ignore_ascii_case("FIELDS")
                        && self.peek_n(1).tok == Tok::LParen
                        && self.peek_n(3).tok == Tok::RParen =>
                {
                    let set = match &self.peek_n(2).tok {
                        Tok::Ident(set) => set.to_ascii_uppercase(),
                        _ => String::new(),
                    };
                    if !["ALL", "STANDARD", "CUSTOM"].contains(&set.as_str()) {
                        return Err(
                            self.unexpected("FIELDS(ALL), FIELDS(STANDARD) or FIELDS(CUSTOM)")
                        );
                    }
                    // Expanded from the describe when the query is bound; a field name never
                    // has parentheses, so the marker cannot clash with one.
                    let marker = format!("FIELDS({set})");
                    s.items.push(Item::Field(marker.clone(), None));
                    s.fields.push(marker);
                    for _ in 0..4 {
                        self.advance();
                    }
                }
                Tok::Ident(word)
                    if word.eq_ignore_ascii_case("COUNT")
                        && self.peek_n(1).tok == Tok::LParen
                        && self.peek_n(2).tok == Tok::RParen =>
                {
                    if count_pos.is_some() {
                        return Err(SoqlError::malformed(format!(
                            "duplicate COUNT() at position {}",
                            t.pos
                        )));
                    }
                    count_pos = Some(t.pos);
                    for _ in 0..3 {
                        self.advance();
                    }
                }
                Tok::Ident(_) if self.at_aggregate() => {
                    if nested {
                        return Err(SoqlError::malformed(format!(
                            "aggregate functions are not allowed in a subquery (at position {})",
                            t.pos
                        )));
                    }
                    let (func, arg) = self.aggregate_call()?;
                    let (key, hidden) = match self.alias() {
                        Some(alias) => (alias, false),
                        None => {
                            unaliased += 1;
                            (format!("expr{}", unaliased - 1), false)
                        }
                    };
                    if s.aggs.iter().any(|a| a.key.eq_ignore_ascii_case(&key)) {
                        return Err(SoqlError::malformed(format!(
                            "duplicate alias: {key} (at position {})",
                            t.pos
                        )));
                    }
                    s.items.push(Item::Agg(s.aggs.len()));
                    s.aggs.push(Agg {
                        func,
                        arg,
                        key,
                        hidden,
                        family: Family::Auto,
                    });
                }
                Tok::Ident(word) if self.peek_n(1).tok == Tok::LParen => {
                    return Err(self.unsupported(&format!("function {word}()"), t.pos));
                }
                _ => {
                    let (name, pos) = self.field_name("a field name")?;
                    if s.fields.iter().any(|f| f.eq_ignore_ascii_case(&name)) {
                        return Err(SoqlError::malformed(format!(
                            "duplicate field selected: {name} (at position {pos})"
                        )));
                    }
                    let alias = if nested { None } else { self.alias() };
                    s.items.push(Item::Field(name.clone(), alias));
                    s.fields.push(name);
                }
            }
            if !self.eat(&Tok::Comma) {
                break;
            }
        }
        if let Some(pos) = count_pos
            && !s.items.is_empty()
        {
            return Err(SoqlError::malformed(format!(
                "COUNT() at position {pos} cannot be combined with fields in the SELECT list"
            )));
        }
        s.count_only = count_pos.is_some();
        Ok(s)
    }
}
