//! What a SELECT list holds once parsed: its items, aggregates and subqueries. Data only,
//! shared by the parser (`select`, `parser`), binding and evaluation, so none of them depends
//! on another for these types.

use super::Query;
use super::value::Family;

/// SOQL's aggregate functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggFunc {
    Count,
    CountDistinct,
    Sum,
    Avg,
    Min,
    Max,
}

impl AggFunc {
    pub(super) fn from_name(name: &str) -> Option<AggFunc> {
        Some(match name.to_ascii_uppercase().as_str() {
            "COUNT" => AggFunc::Count,
            "COUNT_DISTINCT" => AggFunc::CountDistinct,
            "SUM" => AggFunc::Sum,
            "AVG" => AggFunc::Avg,
            "MIN" => AggFunc::Min,
            "MAX" => AggFunc::Max,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            AggFunc::Count => "COUNT",
            AggFunc::CountDistinct => "COUNT_DISTINCT",
            AggFunc::Sum => "SUM",
            AggFunc::Avg => "AVG",
            AggFunc::Min => "MIN",
            AggFunc::Max => "MAX",
        }
    }
}

/// One aggregate expression: in the SELECT list, or only in HAVING / ORDER BY (`hidden`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Agg {
    pub(super) func: AggFunc,
    /// The field (path) aggregated; canonical once bound.
    pub(super) arg: String,
    /// The key of its value in a result row: the alias, `exprN`, or a hidden key.
    pub(super) key: String,
    pub(super) hidden: bool,
    /// How the argument's values compare (MIN, MAX, COUNT_DISTINCT); set by binding.
    pub(super) family: Family,
}

/// One element of the SELECT list, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A field or relationship path (`Name`, `Account.Owner.Name`), with its alias in an
    /// aggregate query.
    Field(String, Option<String>),
    /// A parent-to-child subquery: an index into the query's children.
    Child(usize),
    /// An aggregate: an index into the query's aggregates.
    Agg(usize),
}

/// A parent-to-child subquery: `(SELECT ... FROM Contacts)`.
#[derive(Debug, Clone)]
pub struct Child {
    /// The relationship name: as written until bound, then the describe's spelling.
    pub relationship: String,
    /// The child object's field that references the parent (`AccountId`); set by binding.
    pub field: String,
    /// The subquery, whose object is the child object once bound.
    pub query: Query,
}

/// What the SELECT list holds.
#[derive(Default)]
pub(super) struct Select {
    pub(super) count_only: bool,
    pub(super) items: Vec<Item>,
    pub(super) fields: Vec<String>,
    pub(super) children: Vec<Child>,
    pub(super) aggs: Vec<Agg>,
}

/// The key of a hidden aggregate (never a field name: those have no control characters).
pub(super) const HIDDEN: char = '\u{1}';
