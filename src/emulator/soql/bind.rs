//! Binding: a parsed [`Query`] resolved against its object's describe. Names become the
//! describe's spelling, literals take the type of their field (a datetime field needs a
//! datetime literal, a text field a quoted string), and operators are checked against field
//! types (`INVALID_FIELD`, `INVALID_QUERY_FILTER_OPERATOR`), as Salesforce checks them. It
//! must not read records.

use super::items::{Agg, AggFunc, HIDDEN, Item};
use super::parser::{Cond, CondOp, Expr, shorten};
use super::relations::{Catalog, NoCatalog, Resolver, child_relationship};
use super::value::{Family, LitKind, family_of, literal_as, type_name};
use super::{Query, SoqlError, invalid_type};
use crate::emulator::store::ObjectDef;
use crate::model::{FieldDescribe, FieldType, ObjectDescribe};
use std::sync::Arc;

fn no_such_column(name: &str, object: &str) -> SoqlError {
    SoqlError::invalid_field(format!(
        "No such column '{name}' on entity '{object}'. If you are attempting to use a custom \
         field, be sure to append the '__c' after the custom field name. Please reference your \
         WSDL or the describe call for the appropriate names."
    ))
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

fn resolve(d: &ObjectDescribe, name: &str) -> Result<FieldDescribe, SoqlError> {
    d.fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case(name))
        .cloned()
        .ok_or_else(|| no_such_column(name, &d.name))
}

/// The index an aggregate marker (`HIDDEN` and an index, from HAVING or ORDER BY) names.
fn marker(name: &str) -> Option<usize> {
    name.strip_prefix(HIDDEN)?.parse().ok()
}

/// Binds one query; `Binder` carries what its parts share.
struct Binder<'a> {
    resolver: Resolver<'a>,
    describe: &'a ObjectDescribe,
}

impl Binder<'_> {
    fn path(&mut self, path: &str) -> Result<(String, FieldDescribe), SoqlError> {
        self.resolver.resolve(self.describe, path, resolve)
    }

    /// Types a condition's literals by the field and checks the operator suits its type.
    /// In HAVING (`aggs` given) a condition may test an aggregate.
    fn cond(&mut self, c: &mut Cond, aggs: Option<&[Agg]>) -> Result<(), SoqlError> {
        let (name, kind, family) = match (marker(&c.field), aggs) {
            (Some(i), Some(aggs)) => {
                let a = aggs
                    .get(i)
                    .ok_or_else(|| no_such_column(&c.field, &self.describe.name))?;
                let family = agg_family(a.func, a.family);
                let kind = if family == Family::Number {
                    FieldType::Double
                } else {
                    FieldType::String
                };
                (a.key.clone(), kind, family)
            }
            _ => {
                let (name, f) = self.path(&c.field)?;
                if !filterable(&f) {
                    return Err(SoqlError::invalid_field(format!(
                        "field '{}' can not be filtered in a query call",
                        f.name
                    )));
                }
                let kind = f.kind();
                let family = family_of(&kind);
                (name, kind, family)
            }
        };
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
                        "value of filter criterion for field '{name}' must be of type {} and \
                         should {}be enclosed in quotes",
                        type_name(&kind),
                        if quoted { "" } else { "not " }
                    ))
                }
            })?;
            vals.push(v);
        }
        c.field = name;
        c.family = family;
        c.vals = vals;
        Ok(())
    }

    fn expr(&mut self, e: &mut Expr, aggs: Option<&[Agg]>) -> Result<(), SoqlError> {
        match e {
            Expr::Cond(c) => self.cond(c, aggs),
            Expr::And(es) | Expr::Or(es) => es.iter_mut().try_for_each(|e| self.expr(e, aggs)),
            Expr::Not(e) => self.expr(e, aggs),
        }
    }
}

/// How an aggregate's values compare: counts, sums and averages are numbers; MIN and MAX
/// compare like their field.
fn agg_family(func: AggFunc, arg: Family) -> Family {
    match func {
        AggFunc::Min | AggFunc::Max => arg,
        _ => Family::Number,
    }
}

fn grouped_error(what: &str, name: &str) -> SoqlError {
    SoqlError::malformed(format!("{what} must be grouped or aggregated: {name}"))
}

impl Query {
    /// Resolves names against the describe: canonical object and field names, typed literals,
    /// operators checked against field types. On error the query is left as it was. Without
    /// the org's other objects, relationship paths and subqueries do not bind: see
    /// [`Query::bind_in`].
    pub fn bind(&mut self, describe: &ObjectDescribe) -> Result<(), SoqlError> {
        self.bind_with(describe, None, &NoCatalog)
    }

    /// Like [`Query::bind`], with the objects of `catalog` reachable through relationships.
    pub fn bind_in(&mut self, catalog: &dyn Catalog) -> Result<(), SoqlError> {
        let root = catalog
            .object(&self.object)
            .ok_or_else(|| invalid_type(&self.object))?;
        self.bind_with(&root.describe, Some(root.clone()), catalog)
    }

    fn bind_with(
        &mut self,
        describe: &ObjectDescribe,
        root: Option<Arc<ObjectDef>>,
        catalog: &dyn Catalog,
    ) -> Result<(), SoqlError> {
        if !self.object.eq_ignore_ascii_case(&describe.name) {
            return Err(invalid_type(&self.object));
        }
        let mut q = self.clone();
        q.object = describe.name.clone();
        let mut b = Binder {
            resolver: Resolver {
                catalog,
                root: root.clone(),
                joins: Vec::new(),
            },
            describe,
        };
        let aggregate = q.is_aggregate();
        let mut fields: Vec<String> = Vec::with_capacity(q.fields.len());
        let mut items: Vec<Item> = Vec::with_capacity(q.items.len());
        for item in &q.items {
            let Item::Field(name, alias) = item else {
                items.push(item.clone());
                continue;
            };
            if alias.is_some() && !aggregate {
                return Err(SoqlError::malformed(format!(
                    "an alias on {name} is only allowed in an aggregate query"
                )));
            }
            let set = match name.as_str() {
                "FIELDS(ALL)" => Some(None),
                "FIELDS(STANDARD)" => Some(Some(false)),
                "FIELDS(CUSTOM)" => Some(Some(true)),
                _ => None,
            };
            let Some(custom) = set else {
                let (canonical, _) = b.path(name)?;
                // A field already brought in by FIELDS() is not selected twice.
                if !fields.contains(&canonical) {
                    fields.push(canonical.clone());
                    items.push(Item::Field(canonical, alias.clone()));
                }
                continue;
            };
            for f in &describe.fields {
                if custom.is_none_or(|c| c == f.custom) && !fields.contains(&f.name) {
                    fields.push(f.name.clone());
                    items.push(Item::Field(f.name.clone(), None));
                }
            }
        }
        q.fields = fields;
        q.items = items;
        for a in q.aggs.iter_mut() {
            let (name, f) = b.path(&a.arg)?;
            let family = family_of(&f.kind());
            if matches!(a.func, AggFunc::Sum | AggFunc::Avg) && family != Family::Number {
                return Err(SoqlError::invalid_field(format!(
                    "field {name} does not support aggregate operator {}",
                    a.func.name()
                )));
            }
            a.arg = name;
            a.family = family;
        }
        let mut group_by = Vec::with_capacity(q.group_by.len());
        for (g, _) in &q.group_by {
            let (name, f) = b.path(g)?;
            if !sortable(&f) || f.is_formula() {
                return Err(SoqlError::invalid_field(format!(
                    "field '{}' can not be grouped in a query call",
                    f.name
                )));
            }
            group_by.push((name, family_of(&f.kind())));
        }
        q.group_by = group_by;
        if q.count_only && !q.group_by.is_empty() {
            return Err(SoqlError::malformed(
                "COUNT() cannot be used with GROUP BY: use COUNT(field)",
            ));
        }
        if aggregate {
            for f in &q.fields {
                if !q.group_by.iter().any(|(g, _)| g == f) {
                    return Err(grouped_error("Field", f));
                }
            }
            if !q.children.is_empty() {
                return Err(SoqlError::malformed(
                    "a subquery cannot be used in an aggregate query",
                ));
            }
            if q.group_by.is_empty() && q.limit.is_some() {
                return Err(SoqlError::malformed(
                    "an aggregate query with LIMIT must have a GROUP BY clause",
                ));
            }
        }
        if let Some(filter) = q.filter.as_mut() {
            b.expr(filter, None)?;
        }
        if let Some(having) = q.having.as_mut() {
            let aggs = q.aggs.clone();
            b.expr(having, Some(&aggs))?;
            check_grouped(having, &q.group_by, &aggs)?;
        }
        for key in q.order.iter_mut() {
            if let Some(a) = marker(&key.field).and_then(|i| q.aggs.get(i)) {
                key.field = a.key.clone();
                key.family = agg_family(a.func, a.family);
                continue;
            }
            let (name, f) = b.path(&key.field)?;
            if !sortable(&f) {
                return Err(SoqlError::invalid_field(format!(
                    "field '{}' can not be sorted in a query call",
                    f.name
                )));
            }
            if aggregate && !q.group_by.iter().any(|(g, _)| *g == name) {
                return Err(grouped_error("Ordered field", &name));
            }
            key.field = name;
            key.family = family_of(&f.kind());
        }
        for child in q.children.iter_mut() {
            let parent = root
                .clone()
                .ok_or_else(|| super::relations::child_error(&child.relationship))?;
            let (name, field, def) = child_relationship(catalog, &parent, &child.relationship)?;
            child.query.object = def.describe.name.clone();
            child
                .query
                .bind_with(&def.describe, Some(def.clone()), catalog)?;
            child.relationship = name;
            child.field = field;
        }
        q.joins = b.resolver.joins;
        q.bound = true;
        *self = q;
        Ok(())
    }
}

/// In HAVING, a field must be grouped.
fn check_grouped(e: &Expr, group_by: &[(String, Family)], aggs: &[Agg]) -> Result<(), SoqlError> {
    match e {
        Expr::Cond(c) => {
            if group_by.iter().any(|(g, _)| *g == c.field) || aggs.iter().any(|a| a.key == c.field)
            {
                Ok(())
            } else {
                Err(grouped_error("Field", &c.field))
            }
        }
        Expr::And(es) | Expr::Or(es) => {
            es.iter().try_for_each(|e| check_grouped(e, group_by, aggs))
        }
        Expr::Not(e) => check_grouped(e, group_by, aggs),
    }
}
