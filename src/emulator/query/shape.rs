//! How REST writes query results: each record starts with `attributes` and then carries the
//! SELECT list in order; a relationship path becomes a nested parent record
//! (`"Account": {"attributes": {...}, "Name": "Acme"}`, or `null` when the reference is
//! empty), a subquery a nested query result (`{"totalSize", "done", "records"}`, or `null`
//! when there are no children), an aggregate query's rows `AggregateResult`s whose
//! `attributes` carry no URL.
//!
//! This crate's `serde_json` sorts object keys, so records are kept as a [`Shape`] shared by
//! all rows (names in SELECT order) and [`Row`]s of values, and serialized by hand.

use super::exec::Answer;
use crate::emulator::soql::{Item, Query as Soql};
use crate::emulator::store::Record;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value as J;

/// The layout of one level of records: their object and named columns in order.
pub(super) struct Shape {
    object: String,
    aggregate: bool,
    columns: Vec<(String, Column)>,
}

enum Column {
    /// A value, read from the record under this key.
    Value(String),
    /// A parent record, reached through the relationship path `path`.
    Parent(String, Shape),
    /// A subquery's children: the index of the subquery.
    Children(usize, Shape),
}

pub(super) enum Cell {
    Value(J),
    Parent(Option<Row>),
    Children(Vec<Row>),
}

/// One record: its id (for `attributes.url`) and a cell per column of its shape.
pub(super) struct Row {
    id: String,
    cells: Vec<Cell>,
}

impl Shape {
    /// The shape of `q`'s records.
    pub(super) fn of(q: &Soql) -> Shape {
        let mut shape = Shape {
            object: q.object.clone(),
            aggregate: q.is_aggregate(),
            columns: Vec::new(),
        };
        for item in q.items() {
            let name = q.output_key(item);
            match item {
                Item::Field(path, _) if !shape.aggregate && path.contains('.') => {
                    shape.add_path(q, path, "");
                }
                Item::Field(path, _) => shape.columns.push((name, Column::Value(path.clone()))),
                Item::Agg(_) => shape.columns.push((name.clone(), Column::Value(name))),
                Item::Child(i) => {
                    if let Some(c) = q.children().get(*i) {
                        shape
                            .columns
                            .push((name, Column::Children(*i, Shape::of(&c.query))));
                    }
                }
            }
        }
        shape
    }

    /// Adds the relationship path `path` (whose part after `prefix` is left to place) as
    /// nested parent shapes; a parent appears once, where its first field is selected.
    fn add_path(&mut self, q: &Soql, path: &str, prefix: &str) {
        let rest = path
            .get(prefix.len()..)
            .unwrap_or_default()
            .trim_start_matches('.');
        let Some((rel, _)) = rest.split_once('.') else {
            self.columns
                .push((rest.to_string(), Column::Value(path.to_string())));
            return;
        };
        let here = if prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{prefix}.{rel}")
        };
        let existing = self.columns.iter_mut().find_map(|(_, c)| match c {
            Column::Parent(p, s) if *p == here => Some(s),
            _ => None,
        });
        if let Some(s) = existing {
            s.add_path(q, path, &here);
            return;
        }
        let object = q
            .joins()
            .iter()
            .find(|j| j.path == here)
            .map(|j| j.target.clone())
            .unwrap_or_default();
        let mut s = Shape {
            object,
            aggregate: false,
            columns: Vec::new(),
        };
        s.add_path(q, path, &here);
        self.columns
            .push((rel.to_string(), Column::Parent(here, s)));
    }

    /// A row of this shape from a joined record; `children` gives a subquery's rows.
    fn row(&self, record: &Record, id: String, children: &dyn Fn(usize) -> Vec<Row>) -> Row {
        let cells = self
            .columns
            .iter()
            .map(|(_, c)| match c {
                Column::Value(key) => Cell::Value(record.get(key).cloned().unwrap_or(J::Null)),
                Column::Parent(path, s) => Cell::Parent(
                    record
                        .get(&format!("{path}."))
                        .and_then(J::as_str)
                        .map(|id| s.row(record, id.to_string(), &|_| Vec::new())),
                ),
                Column::Children(i, _) => Cell::Children(children(*i)),
            })
            .collect();
        Row { id, cells }
    }

    /// The rows of an answer (whose query's shape this is).
    pub(super) fn rows(&self, answer: Answer) -> Vec<Row> {
        let kid_shape = |i: usize| {
            self.columns.iter().find_map(|(_, c)| match c {
                Column::Children(j, s) if *j == i => Some(s),
                _ => None,
            })
        };
        let Answer { records, children } = answer;
        records
            .into_iter()
            .map(|record| {
                let id = record_id(&record);
                let of_child = |i: usize| -> Vec<Row> {
                    let (Some(by_parent), Some(shape)) = (children.get(i), kid_shape(i)) else {
                        return Vec::new();
                    };
                    by_parent
                        .get(&id)
                        .map(|rs| {
                            rs.iter()
                                .map(|r| shape.row(r, record_id(r), &|_| Vec::new()))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                self.row(&record, id.clone(), &of_child)
            })
            .collect()
    }

    /// A retrieved record (no subqueries, no relationships).
    pub(super) fn plain_row(&self, record: &Record) -> Row {
        self.row(record, record_id(record), &|_| Vec::new())
    }
}

fn record_id(record: &Record) -> String {
    match record.get("Id") {
        Some(J::String(s)) => s.clone(),
        _ => String::new(),
    }
}

/// A row with its shape, serialized as REST writes a record.
pub(super) struct RowJson<'a> {
    pub(super) shape: &'a Shape,
    pub(super) row: &'a Row,
    pub(super) version: &'a str,
}

struct Attributes<'a> {
    kind: &'a str,
    url: Option<String>,
}

impl Serialize for Attributes<'_> {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("type", self.kind)?;
        if let Some(url) = &self.url {
            map.serialize_entry("url", url)?;
        }
        map.end()
    }
}

/// A subquery's children as REST nests them: a complete query result.
struct ChildrenJson<'a> {
    shape: &'a Shape,
    rows: &'a [Row],
    version: &'a str,
}

impl Serialize for ChildrenJson<'_> {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("totalSize", &self.rows.len())?;
        map.serialize_entry("done", &true)?;
        let records: Vec<RowJson> = self
            .rows
            .iter()
            .map(|row| RowJson {
                shape: self.shape,
                row,
                version: self.version,
            })
            .collect();
        map.serialize_entry("records", &records)?;
        map.end()
    }
}

impl Serialize for RowJson<'_> {
    fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
        let shape = self.shape;
        let mut map = s.serialize_map(Some(shape.columns.len() + 1))?;
        let attributes = if shape.aggregate {
            Attributes {
                kind: "AggregateResult",
                url: None,
            }
        } else {
            Attributes {
                kind: &shape.object,
                url: Some(format!(
                    "/services/data/{}/sobjects/{}/{}",
                    self.version, shape.object, self.row.id
                )),
            }
        };
        map.serialize_entry("attributes", &attributes)?;
        for ((name, column), cell) in shape.columns.iter().zip(&self.row.cells) {
            match (column, cell) {
                (_, Cell::Value(v)) => map.serialize_entry(name, v)?,
                (Column::Parent(_, sub), Cell::Parent(Some(row))) => map.serialize_entry(
                    name,
                    &RowJson {
                        shape: sub,
                        row,
                        version: self.version,
                    },
                )?,
                (Column::Children(_, sub), Cell::Children(rows)) if !rows.is_empty() => map
                    .serialize_entry(
                        name,
                        &ChildrenJson {
                            shape: sub,
                            rows,
                            version: self.version,
                        },
                    )?,
                _ => map.serialize_entry(name, &J::Null)?,
            }
        }
        map.end()
    }
}
