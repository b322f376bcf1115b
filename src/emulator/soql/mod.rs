//! The emulator's SOQL engine: what a query *means*. It parses the subset of SOQL that sfmirror
//! and ordinary REST / Bulk API 2.0 clients send, binds it against an object's describe, and
//! evaluates it over the store's records. It must not page, shape responses, speak HTTP or
//! take the store's lock: the REST `query` / `queryAll` endpoints and Bulk query jobs
//! ([`super::query`]) own paging, `attributes` and snapshots, and hand it records.
//!
//! # Phases
//!
//! A query passes through one module per phase, in order: `lexer` (text to tokens), `parser`
//! and `select` (tokens to a [`Query`] and its syntax tree; syntax only), `bind`
//! ([`Query::bind`] / [`Query::bind_in`]: names and literal types from the describes, with
//! `relations` resolving relationship names) and `eval` / `aggregate` (join, filter, sort,
//! limit, project; group and aggregate). `value` holds the comparison rules that the parser,
//! binding and evaluation share, so that filters, `ORDER BY` and `GROUP BY` agree.
//!
//! # Supported
//!
//! `SELECT items FROM Object [WHERE ...] [GROUP BY ...] [HAVING ...] [ORDER BY ...]
//! [LIMIT n] [OFFSET n]`, where items are fields, child-to-parent relationship paths
//! (`Account.Owner.Name`, up to five levels, by the describes' `relationshipName`),
//! parent-to-child subqueries (`(SELECT ... FROM Contacts WHERE ... ORDER BY ... LIMIT n)`,
//! by `childRelationships`), `COUNT()`, aggregates (`COUNT`, `COUNT_DISTINCT`, `SUM`, `AVG`,
//! `MIN`, `MAX`, with aliases or `exprN` names) and `FIELDS(ALL | STANDARD | CUSTOM)` (the
//! first two with a LIMIT of at most 200). Conditions: comparisons, `LIKE`, `IN` / `NOT IN`,
//! `AND` / `OR` / `NOT`, string, number, boolean, `null`, date and datetime literals, and
//! relative date literals (`TODAY`, `LAST_N_DAYS:n`, `THIS_QUARTER`, ...; module `dates`);
//! HAVING also on aggregates. A relationship reaches only objects the org has (the built-in
//! org has no User, so `Owner.Name` is refused), and a polymorphic one the first of its
//! objects the org has. Anything else that is valid SOQL (TYPEOF, semi-joins, date functions,
//! GROUP BY ROLLUP, WITH, FOR, ...) is rejected with `MALFORMED_QUERY` naming the feature, so
//! a client never gets a silently different answer from the emulator than from Salesforce.
//!
//! # Salesforce behaviours reproduced on purpose
//!
//! They surprise people coming from SQL:
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
//! # Robustness
//!
//! Nothing here panics on any input: every index is checked and nesting depth is bounded.

mod aggregate;
mod bind;
mod dates;
mod eval;
mod items;
mod lexer;
mod parser;
mod relations;
mod select;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_joins;
mod value;

use items::Agg;
pub use items::{AggFunc, Child, Item};
use parser::{Expr, OrderKey, Parser};
pub use relations::{Catalog, Join, Parents};
use std::fmt;

pub const MALFORMED_QUERY: &str = "MALFORMED_QUERY";
pub const INVALID_FIELD: &str = "INVALID_FIELD";
pub const INVALID_TYPE: &str = "INVALID_TYPE";
/// Salesforce's code for an operator or literal the field's type does not allow (`LIKE` on a
/// number, `<` on a boolean, a malformed id).
pub const INVALID_QUERY_FILTER_OPERATOR: &str = "INVALID_QUERY_FILTER_OPERATOR";

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

/// A parsed query. `parse` checks syntax; `bind` resolves it against the object's describe
/// (canonical names, typed literals) and must succeed before results are faithful: an unbound
/// query compares by the literals' own types.
#[derive(Debug, Clone)]
pub struct Query {
    /// The `FROM` object: as written until bound, then the describe's spelling.
    pub object: String,
    /// `SELECT COUNT()`: the caller reports `totalSize` and no records.
    pub count_only: bool,
    /// Selected fields and relationship paths (`Account.Name`) in SELECT order (empty for
    /// `COUNT()`); canonical once bound. A path is also the key its value has in a record
    /// that [`Query::join`] enriched.
    pub fields: Vec<String>,
    /// The SELECT list in order: fields, subqueries and aggregates.
    items: Vec<Item>,
    /// Parent-to-child subqueries.
    children: Vec<Child>,
    /// Aggregates: those of the SELECT list, then those only HAVING or ORDER BY use.
    aggs: Vec<Agg>,
    /// Grouped fields (paths) and how their values compare (set by binding).
    group_by: Vec<(String, value::Family)>,
    having: Option<Expr>,
    /// The parent records its relationship paths reach, shallowest first; set by binding.
    joins: Vec<Join>,
    filter: Option<Expr>,
    order: Vec<OrderKey>,
    limit: Option<usize>,
    /// `OFFSET n`: rows skipped after sorting, before LIMIT.
    offset: Option<usize>,
    bound: bool,
}

/// The largest LIMIT a query with `FIELDS(ALL)` or `FIELDS(CUSTOM)` may have (and it must
/// have one).
pub const MAX_FIELDS_ROWS: usize = 200;

/// The largest `OFFSET` Salesforce takes.
pub const MAX_OFFSET: u64 = 2000;
/// What [`Query::bulk_unsupported`] names for a query with a parent-to-child subquery.
pub const PARENT_TO_CHILD: &str = "Parent-to-child relationship queries";

/// Parses `soql` (syntax only: names and literal types are checked by [`Query::bind`]);
/// relative date literals are read at the wall clock's now.
pub fn parse(soql: &str) -> Result<Query, SoqlError> {
    parse_at(soql, chrono::Utc::now().timestamp_millis())
}

/// Parses `soql` with relative date literals (`TODAY`, `LAST_N_DAYS:7`) read at `now_ms`:
/// the org's clock, which the control API can move.
pub fn parse_at(soql: &str, now_ms: i64) -> Result<Query, SoqlError> {
    let toks = lexer::lex(soql)?;
    let eof = lexer::Token {
        tok: lexer::Tok::Eof,
        pos: soql.chars().count() + 1,
        text: String::new(),
    };
    Parser {
        toks,
        i: 0,
        eof,
        now_ms,
        aggs: None,
    }
    .query()
}

impl Query {
    /// The LIMIT, if any.
    pub fn limit(&self) -> Option<usize> {
        self.limit
    }

    /// The OFFSET, if any.
    pub fn offset(&self) -> Option<usize> {
        self.offset
    }

    /// Whether the query has an ORDER BY (otherwise results come in id order).
    pub fn has_order(&self) -> bool {
        !self.order.is_empty()
    }

    /// The SELECT list in order.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// The parent-to-child subqueries.
    pub fn children(&self) -> &[Child] {
        &self.children
    }

    /// The parent records the query reaches through relationships (empty when it uses none).
    pub fn joins(&self) -> &[Join] {
        &self.joins
    }

    /// An aggregate query: aggregate functions or GROUP BY. Its rows are `AggregateResult`s.
    pub fn is_aggregate(&self) -> bool {
        !self.aggs.is_empty() || !self.group_by.is_empty()
    }

    /// Whether the query uses TYPEOF, GROUP BY, aggregates or subqueries: what Bulk API 2.0
    /// refuses. The name of the first one, for the error.
    pub fn bulk_unsupported(&self) -> Option<&'static str> {
        if !self.group_by.is_empty() {
            Some("GROUP BY")
        } else if self.count_only || !self.aggs.is_empty() {
            Some("Aggregate functions such as COUNT()")
        } else if !self.children.is_empty() {
            Some(PARENT_TO_CHILD)
        } else {
            None
        }
    }

    /// The key a SELECT item's value has in a REST record: an aggregate's alias or `exprN`,
    /// a grouped field's alias or its own name (the last part of a path), otherwise the
    /// field's name.
    pub fn output_key(&self, item: &Item) -> String {
        match item {
            Item::Field(path, alias) => alias.clone().unwrap_or_else(|| {
                if self.is_aggregate() {
                    path.rsplit('.').next().unwrap_or(path).to_string()
                } else {
                    path.clone()
                }
            }),
            Item::Child(i) => self
                .children
                .get(*i)
                .map(|c| c.relationship.clone())
                .unwrap_or_default(),
            Item::Agg(i) => self.aggs.get(*i).map(|a| a.key.clone()).unwrap_or_default(),
        }
    }
}
