//! Binding: a parsed [`Query`] resolved against its object's describe. Names become the
//! describe's spelling, literals take the type of their field (a datetime field needs a
//! datetime literal, a text field a quoted string), and operators are checked against field
//! types (`INVALID_FIELD`, `INVALID_QUERY_FILTER_OPERATOR`), as Salesforce checks them. It
//! must not read records.

use super::parser::{Cond, CondOp, Expr, shorten};
use super::value::{Family, LitKind, family_of, literal_as, type_name};
use super::{Query, SoqlError, invalid_type};
use crate::model::{FieldDescribe, FieldType, ObjectDescribe};

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

impl Query {
    /// Resolves names against the describe: canonical object and field names, typed literals,
    /// operators checked against field types. On error the query is left as it was.
    pub fn bind(&mut self, describe: &ObjectDescribe) -> Result<(), SoqlError> {
        if !self.object.eq_ignore_ascii_case(&describe.name) {
            return Err(invalid_type(&self.object));
        }
        let mut q = self.clone();
        q.object = describe.name.clone();
        let mut fields: Vec<String> = Vec::with_capacity(q.fields.len());
        for name in &q.fields {
            let set = match name.as_str() {
                "FIELDS(ALL)" => Some(None),
                "FIELDS(STANDARD)" => Some(Some(false)),
                "FIELDS(CUSTOM)" => Some(Some(true)),
                _ => None,
            };
            let Some(custom) = set else {
                let canonical = resolve(describe, name)?.name.clone();
                // A field already brought in by FIELDS() is not selected twice.
                if !fields.contains(&canonical) {
                    fields.push(canonical);
                }
                continue;
            };
            for f in &describe.fields {
                if custom.is_none_or(|c| c == f.custom) && !fields.contains(&f.name) {
                    fields.push(f.name.clone());
                }
            }
        }
        q.fields = fields;
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
}
