//! Formula fields of the org's objects, computed on read as Salesforce does: a record holds no
//! formula values; every read (REST GET, SOQL, Bulk query, sObject Collections, all of which
//! come through [`Org::get`] and [`Org::scan`]) gets them evaluated from the record, its
//! parents (through relationship names) and the org's clock. Nothing is stored, so a
//! formula's value changes with the fields it reads and with the clock, and never makes a
//! change event of its own.
//!
//! It owns which fields are formulas and what they read; the language is
//! [`crate::emulator::formula`]'s.

use super::{Data, ObjectDef, Org, Record};
use crate::emulator::formula::{FValue, Fields, Formula, from_json, to_json};
use crate::model::{FieldType, ObjectDescribe};
use serde_json::Value as J;
use std::collections::HashMap;
use std::sync::Arc;

/// How many formulas deep a formula may read other formulas (its own fields' or a parent's)
/// before it reads null: Salesforce refuses cycles when a formula is saved; this only keeps a
/// describe that has one from looping.
const MAX_DEPTH: u8 = 8;

/// One formula field of an object.
#[derive(Debug)]
pub struct FormulaField {
    pub name: String,
    kind: FieldType,
    scale: i64,
    /// `formulaTreatNullNumberAsZero`: blank number fields read as 0.
    null_as_zero: bool,
    /// None when the formula uses something the emulator does not support: it reads as null.
    formula: Option<Formula>,
}

/// A formula the emulator cannot evaluate: object, field, and the construct.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UnsupportedFormula {
    pub object: String,
    pub field: String,
    pub construct: String,
}

/// The reference field of `describe` whose relationship name is `relationship` (as the raw
/// describe gives it: the typed describe does not keep relationship names).
fn reference_named<'a>(raw: &'a J, relationship: &str) -> Option<&'a J> {
    raw.get("fields")?.as_array()?.iter().find(|f| {
        f.get("relationshipName")
            .and_then(J::as_str)
            .is_some_and(|r| r.eq_ignore_ascii_case(relationship))
    })
}

/// The formula fields of an object, and those it cannot evaluate.
pub(super) fn formula_fields(
    describe: &ObjectDescribe,
    raw: &J,
) -> (Vec<FormulaField>, Vec<UnsupportedFormula>) {
    let raw_field = |name: &str| {
        raw.get("fields")
            .and_then(J::as_array)
            .and_then(|fs| {
                fs.iter()
                    .find(|f| f.get("name").and_then(J::as_str) == Some(name))
            })
            .cloned()
            .unwrap_or(J::Null)
    };
    let mut fields = Vec::new();
    let mut unsupported = Vec::new();
    for f in describe.fields.iter().filter(|f| f.is_formula()) {
        let text = f.calculated_formula.as_deref().unwrap_or_default();
        let parsed = Formula::parse(text).and_then(|formula| {
            // A reference must name a field, or start with a relationship name; what lies
            // past the relationship is checked when it is read.
            for path in formula.references() {
                let known = match path.as_slice() {
                    [field] => describe
                        .fields
                        .iter()
                        .any(|d| d.name.eq_ignore_ascii_case(field)),
                    [relationship, ..] => reference_named(raw, relationship).is_some(),
                    [] => true,
                };
                if !known {
                    return Err(crate::emulator::formula::Unsupported {
                        construct: format!("unknown field {}", path.join(".")),
                    });
                }
            }
            Ok(formula)
        });
        let formula = match parsed {
            Ok(formula) => Some(formula),
            Err(e) => {
                unsupported.push(UnsupportedFormula {
                    object: describe.name.clone(),
                    field: f.name.clone(),
                    construct: e.construct,
                });
                None
            }
        };
        fields.push(FormulaField {
            name: f.name.clone(),
            kind: f.kind(),
            scale: f.scale,
            null_as_zero: raw_field(&f.name)
                .get("formulaTreatNullNumberAsZero")
                .and_then(J::as_bool)
                .unwrap_or(false),
            formula,
        });
    }
    (fields, unsupported)
}

/// What a formula reads: one record of one object, its parents through the org's data.
struct RecordFields<'a> {
    objects: &'a HashMap<String, Arc<ObjectDef>>,
    data: &'a Data,
    now_ms: i64,
    def: &'a ObjectDef,
    record: &'a Record,
    null_as_zero: bool,
    depth: u8,
}

impl RecordFields<'_> {
    fn formula_value(&self, def: &ObjectDef, record: &Record, f: &FormulaField) -> J {
        if self.depth >= MAX_DEPTH {
            return J::Null;
        }
        let Some(formula) = &f.formula else {
            return J::Null;
        };
        let fields = RecordFields {
            objects: self.objects,
            data: self.data,
            now_ms: self.now_ms,
            def,
            record,
            null_as_zero: f.null_as_zero,
            depth: self.depth + 1,
        };
        to_json(formula.eval(&fields, self.now_ms), &f.kind, f.scale)
    }
}

impl Fields for RecordFields<'_> {
    fn value(&self, path: &[String]) -> FValue {
        match path {
            [] => FValue::Null,
            [name] => {
                let Some(field) = self
                    .def
                    .describe
                    .fields
                    .iter()
                    .find(|f| f.name.eq_ignore_ascii_case(name))
                else {
                    return FValue::Null;
                };
                let stored;
                let value = match self.def.formulas.iter().find(|f| f.name == field.name) {
                    Some(formula) => {
                        stored = self.formula_value(self.def, self.record, formula);
                        &stored
                    }
                    None => self.record.get(&field.name).unwrap_or(&J::Null),
                };
                let kind = field.kind();
                let v = from_json(value, &kind);
                let numeric = matches!(
                    kind,
                    FieldType::Int
                        | FieldType::Long
                        | FieldType::Double
                        | FieldType::Currency
                        | FieldType::Percent
                );
                if v == FValue::Null && numeric && self.null_as_zero {
                    FValue::Number(0.0)
                } else {
                    v
                }
            }
            [relationship, rest @ ..] => {
                let Some(reference) = reference_named(&self.def.raw, relationship) else {
                    return FValue::Null;
                };
                let Some(id) = reference
                    .get("name")
                    .and_then(J::as_str)
                    .and_then(|n| self.record.get(n))
                    .and_then(J::as_str)
                else {
                    return FValue::Null;
                };
                // A polymorphic reference names several objects: the parent is in one.
                let targets = reference
                    .get("referenceTo")
                    .and_then(J::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(J::as_str);
                for target in targets {
                    let (Some(def), Some(parent)) = (
                        self.objects.get(target),
                        self.data.records.get(target).and_then(|r| r.get(id)),
                    ) else {
                        continue;
                    };
                    if parent.get("IsDeleted") == Some(&J::Bool(true)) {
                        return FValue::Null;
                    }
                    let fields = RecordFields {
                        objects: self.objects,
                        data: self.data,
                        now_ms: self.now_ms,
                        def,
                        record: parent,
                        null_as_zero: self.null_as_zero,
                        depth: self.depth,
                    };
                    return fields.value(rest);
                }
                FValue::Null
            }
        }
    }
}

impl Org {
    /// `record` of `def` as a read returns it: with its formula fields evaluated now. Called
    /// under the org's lock (`data`), so parents are read at the same instant. A record of an
    /// object without formulas is handed back shared, uncopied.
    pub(super) fn with_formulas(
        &self,
        data: &Data,
        def: &ObjectDef,
        record: &Arc<Record>,
    ) -> Arc<Record> {
        if def.formulas.is_empty() {
            return record.clone();
        }
        let Ok(objects) = self.objects.read() else {
            return record.clone();
        };
        let reader = RecordFields {
            objects: &objects,
            data,
            now_ms: self.now_ms(),
            def,
            record,
            null_as_zero: false,
            depth: 0,
        };
        let mut out = Record::clone(record);
        for f in &def.formulas {
            out.insert(f.name.clone(), reader.formula_value(def, record, f));
        }
        Arc::new(out)
    }

    /// Formula fields the emulator cannot evaluate (they read as null), as listed at start-up.
    pub fn unsupported_formulas(&self) -> Vec<UnsupportedFormula> {
        self.unsupported_formulas
            .read()
            .map(|u| u.clone())
            .unwrap_or_default()
    }

    /// Logs each formula the emulator cannot evaluate, once, and keeps the list.
    pub(super) fn note_unsupported(&self, found: Vec<UnsupportedFormula>) {
        for u in &found {
            tracing::warn!(
                object = %u.object,
                field = %u.field,
                construct = %u.construct,
                "the emulator does not evaluate this formula field; it reads as null"
            );
        }
        if let Ok(mut list) = self.unsupported_formulas.write() {
            for u in found {
                if !list.contains(&u) {
                    list.push(u);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn org() -> Org {
        Org::new(crate::emulator::load_org(None).expect("built-in org")).expect("org")
    }

    fn fields(v: J) -> Record {
        v.as_object().cloned().expect("object")
    }

    /// A formula field in describe form.
    fn formula_field(name: &str, kind: &str, formula: &str, null_as_zero: bool) -> J {
        json!({"name": name, "type": kind, "label": name, "calculated": true,
               "calculatedFormula": formula, "formulaTreatNullNumberAsZero": null_as_zero,
               "createable": false, "updateable": false, "nillable": true, "custom": true,
               "scale": 2, "precision": 18, "length": 0})
    }

    #[test]
    fn formulas_read_other_formulas_parents_and_blank_numbers_as_zero() {
        let org = org();
        org.add_field(
            "Invoice__c",
            formula_field("Due_Twice__c", "currency", "Amount_Due__c * 2", false),
        )
        .expect("add");
        org.add_field(
            "Invoice__c",
            formula_field("Lines_Plus__c", "double", "Line_Count__c + 1", true),
        )
        .expect("add");
        org.add_field(
            "Invoice__c",
            formula_field("Lines_Or_Null__c", "double", "Line_Count__c + 1", false),
        )
        .expect("add");
        let account = org
            .create("Account", &fields(json!({"Name": "Acme"})), "")
            .expect("account");
        let id = org
            .create(
                "Invoice__c",
                &fields(json!({"Name": "I", "Total__c": 10, "Account__c": account})),
                "",
            )
            .expect("invoice");
        let r = org.get("Invoice__c", &id).expect("read");
        assert_eq!(
            r["Amount_Due__c"],
            json!(10.0),
            "no rate: BLANKVALUE gives 1"
        );
        assert_eq!(r["Due_Twice__c"], json!(20.0), "a formula over a formula");
        assert_eq!(r["Lines_Plus__c"], json!(1.0), "blank as zero");
        assert_eq!(r["Lines_Or_Null__c"], J::Null, "blank stays blank");
        assert_eq!(r["Summary__c"], "I ()");
        assert_eq!(r["Account_Name__c"], "Acme");
        // Nothing is stored: the record itself has no formula values.
        let stored = org.data().records["Invoice__c"][&id].clone();
        assert!(!stored.contains_key("Amount_Due__c"));
        // A deleted parent reads as no parent.
        org.delete("Account", &account, "").expect("delete");
        let r = org.get("Invoice__c", &id).expect("read");
        assert_eq!(r["Account_Name__c"], J::Null);
        // Scans (queries, Bulk) see the same values.
        let scanned = org.scan("Invoice__c", false, |r| Some(r["Due_Twice__c"].clone()));
        assert_eq!(scanned, [json!(20.0)]);
    }

    #[test]
    fn unsupported_formulas_are_listed_and_read_as_null() {
        let org = org();
        assert!(org.unsupported_formulas().is_empty());
        org.add_field(
            "Invoice__c",
            formula_field("Lookup__c", "double", "VLOOKUP(a, b, c)", false),
        )
        .expect("add");
        org.add_field(
            "Invoice__c",
            formula_field("Typo__c", "double", "Totl__c * 2", false),
        )
        .expect("add");
        let listed: Vec<(String, String)> = org
            .unsupported_formulas()
            .into_iter()
            .map(|u| (u.field, u.construct))
            .collect();
        assert_eq!(
            listed,
            [
                ("Lookup__c".to_string(), "function VLOOKUP".to_string()),
                ("Typo__c".to_string(), "unknown field Totl__c".to_string())
            ]
        );
        let id = org
            .create(
                "Invoice__c",
                &fields(json!({"Name": "I", "Total__c": 1})),
                "",
            )
            .expect("invoice");
        let r = org.get("Invoice__c", &id).expect("read");
        assert_eq!(r["Lookup__c"], J::Null);
        assert_eq!(r["Typo__c"], J::Null);
    }
}
