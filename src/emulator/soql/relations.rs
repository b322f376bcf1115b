//! Relationships: child-to-parent paths (`Account.Owner.Name`) and parent-to-child
//! relationship names (`Contacts`), resolved as Salesforce resolves them, from the describes:
//! a reference field's `relationshipName` (a custom `Account__c` is `Account__r`) and an
//! object's `childRelationships[].relationshipName`. Binding uses it to check paths and plan
//! [`Join`]s; evaluation uses [`Query::join`] to copy what a record's parents hold into the
//! record under path keys (`Account.` for the parent's id, `Account.Name` for its name), so
//! filters, sorting, grouping and projection read relationship fields like any other.
//!
//! It must not take the store's lock: the caller hands it the parents ([`Parents`]).

use super::{Query, SoqlError};
use crate::emulator::store::{ObjectDef, Record};
use crate::model::FieldDescribe;
use serde_json::Value as J;
use std::collections::HashMap;
use std::sync::Arc;

/// The objects a query may reach through relationships.
pub trait Catalog {
    /// An object by API name, ignoring case.
    fn object(&self, name: &str) -> Option<Arc<ObjectDef>>;
}

/// A catalog without objects: only plain fields bind.
pub(super) struct NoCatalog;

impl Catalog for NoCatalog {
    fn object(&self, _: &str) -> Option<Arc<ObjectDef>> {
        None
    }
}

/// One parent record a query reaches: through `fk` of the record at `from` (`""` for the
/// queried record itself), a record of `target`, whose `fields` are copied under `path`.
#[derive(Debug, Clone, PartialEq)]
pub struct Join {
    /// The relationship path in the describe's spelling: `Account`, `Account.Owner`.
    pub path: String,
    pub from: String,
    pub fk: String,
    pub target: String,
    /// The target's fields the query reads (its id is always copied, under `path.`).
    pub fields: Vec<String>,
}

/// Parent records by object and id, gathered by the caller for [`Query::join`].
#[derive(Default)]
pub struct Parents {
    by_object: HashMap<String, HashMap<String, Arc<Record>>>,
}

impl Parents {
    pub fn insert(&mut self, object: &str, id: String, record: Arc<Record>) {
        self.by_object
            .entry(object.to_string())
            .or_default()
            .insert(id, record);
    }

    fn get(&self, object: &str, id: &str) -> Option<&Record> {
        self.by_object.get(object)?.get(id).map(|r| &**r)
    }
}

fn relationship_error(name: &str, object: &str, why: &str) -> SoqlError {
    SoqlError::invalid_field(format!(
        "Didn't understand relationship '{name}' in field path. If you are attempting to use a \
         custom relationship, be sure to append the '__r' after the custom relationship name. \
         Please reference your WSDL or the describe call for the appropriate names. ({why} on \
         {object})"
    ))
}

/// The error Salesforce gives for a subquery on a name that is no child relationship.
pub(super) fn child_error(name: &str) -> SoqlError {
    SoqlError {
        code: super::INVALID_TYPE,
        message: format!(
            "Didn't understand relationship '{name}' in FROM part of query call. If you are \
             attempting to use a custom relationship, be sure to append the '__r' after the \
             custom relationship name. Please reference your WSDL or the describe call for the \
             appropriate names."
        ),
    }
}

/// The reference field of `def` whose relationship is `name`, the relationship's canonical
/// name, and the object it reaches.
fn reference(
    catalog: &dyn Catalog,
    def: &ObjectDef,
    name: &str,
) -> Result<(String, String, Arc<ObjectDef>), SoqlError> {
    let object = &def.describe.name;
    let field = def
        .raw
        .get("fields")
        .and_then(J::as_array)
        .into_iter()
        .flatten()
        .find(|f| {
            f.get("relationshipName")
                .and_then(J::as_str)
                .is_some_and(|r| r.eq_ignore_ascii_case(name))
        })
        .ok_or_else(|| relationship_error(name, object, "no such relationship"))?;
    let text = |key: &str| field.get(key).and_then(J::as_str);
    let (Some(fk), Some(canonical)) = (text("name"), text("relationshipName")) else {
        return Err(relationship_error(name, object, "no such relationship"));
    };
    // A polymorphic reference (`Owner` of a custom object: Group or User) reaches the first
    // of its objects that the org has.
    let targets: Vec<&str> = field
        .get("referenceTo")
        .and_then(J::as_array)
        .into_iter()
        .flatten()
        .filter_map(J::as_str)
        .collect();
    let target = targets
        .iter()
        .find_map(|t| catalog.object(t))
        .ok_or_else(|| {
            relationship_error(
                name,
                object,
                &format!(
                    "the emulator's org has no {} object",
                    targets.first().copied().unwrap_or("such")
                ),
            )
        })?;
    Ok((fk.to_string(), canonical.to_string(), target))
}

/// The child relationship `name` of `def`: the child object and its field that references
/// `def`.
pub(super) fn child_relationship(
    catalog: &dyn Catalog,
    def: &ObjectDef,
    name: &str,
) -> Result<(String, String, Arc<ObjectDef>), SoqlError> {
    let rel = def
        .raw
        .get("childRelationships")
        .and_then(J::as_array)
        .into_iter()
        .flatten()
        .find(|r| {
            r.get("relationshipName")
                .and_then(J::as_str)
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .ok_or_else(|| child_error(name))?;
    let text = |key: &str| rel.get(key).and_then(J::as_str).map(str::to_string);
    let (Some(canonical), Some(child), Some(field)) = (
        text("relationshipName"),
        text("childSObject"),
        text("field"),
    ) else {
        return Err(child_error(name));
    };
    let def = catalog.object(&child).ok_or_else(|| child_error(name))?;
    Ok((canonical, field, def))
}

/// Resolves paths of a query on `root` and collects the joins they need.
pub(super) struct Resolver<'a> {
    pub(super) catalog: &'a dyn Catalog,
    pub(super) root: Option<Arc<ObjectDef>>,
    pub(super) joins: Vec<Join>,
}

impl Resolver<'_> {
    /// Resolves `path` (`Name`, `Account.Owner.Name`) from `describe`: the canonical path and
    /// the field it ends on. `plain` resolves a field of the queried object itself.
    pub(super) fn resolve(
        &mut self,
        describe: &crate::model::ObjectDescribe,
        path: &str,
        plain: impl Fn(&crate::model::ObjectDescribe, &str) -> Result<FieldDescribe, SoqlError>,
    ) -> Result<(String, FieldDescribe), SoqlError> {
        let parts: Vec<&str> = path.split('.').collect();
        let Some((last, hops)) = parts.split_last() else {
            return plain(describe, path).map(|f| (f.name.clone(), f));
        };
        if hops.is_empty() {
            return plain(describe, path).map(|f| (f.name.clone(), f));
        }
        // Salesforce allows five levels of parents.
        if hops.len() > 5 {
            return Err(SoqlError::malformed(format!(
                "relationship path '{path}' reaches more than 5 levels of parents"
            )));
        }
        let mut def = self
            .root
            .clone()
            .filter(|d| d.describe.name == describe.name)
            .or_else(|| self.catalog.object(&describe.name))
            .ok_or_else(|| {
                let first = hops.first().copied().unwrap_or(path);
                relationship_error(first, &describe.name, "no such relationship")
            })?;
        let mut prefix = String::new();
        for hop in hops {
            let (fk, rel, target) = reference(self.catalog, &def, hop)?;
            let from = prefix.clone();
            prefix = if prefix.is_empty() {
                rel
            } else {
                format!("{prefix}.{rel}")
            };
            if !self.joins.iter().any(|j| j.path == prefix) {
                self.joins.push(Join {
                    path: prefix.clone(),
                    from: from.clone(),
                    fk: fk.clone(),
                    target: target.describe.name.clone(),
                    fields: Vec::new(),
                });
            }
            // The record the hop starts from must carry the reference.
            if !from.is_empty() {
                self.need(&from, &fk);
            }
            def = target;
        }
        let field = plain(&def.describe, last)?;
        self.need(&prefix, &field.name);
        let canonical = format!("{prefix}.{}", field.name);
        Ok((canonical, field))
    }

    fn need(&mut self, path: &str, field: &str) {
        if let Some(j) = self.joins.iter_mut().find(|j| j.path == path)
            && !j.fields.iter().any(|f| f == field)
        {
            j.fields.push(field.to_string());
        }
    }
}

impl Query {
    /// Copies into `record` what its parents hold for this query: under `path.` the parent's
    /// id (null when the reference is empty or reaches no record), under `path.Field` its
    /// values. A query without relationship paths leaves the record as it is.
    pub fn join(&self, record: &mut Record, parents: &Parents) {
        for j in &self.joins {
            let source = if j.from.is_empty() {
                record.get(&j.fk)
            } else {
                record.get(&format!("{}.{}", j.from, j.fk))
            };
            let parent = source
                .and_then(J::as_str)
                .and_then(|id| parents.get(&j.target, id));
            let id = parent.and_then(|p| p.get("Id")).cloned().unwrap_or(J::Null);
            let values: Vec<(String, J)> = j
                .fields
                .iter()
                .map(|f| {
                    let v = parent.and_then(|p| p.get(f)).cloned().unwrap_or(J::Null);
                    (format!("{}.{f}", j.path), v)
                })
                .collect();
            record.insert(format!("{}.", j.path), id);
            record.extend(values);
        }
    }
}
