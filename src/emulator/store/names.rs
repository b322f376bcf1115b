//! Person names, derived as Salesforce derives them. On Contact, Lead, User and person
//! accounts, `Name` is a compound whose components (`compoundFieldName: "Name"`) are
//! FirstName, MiddleName, LastName, Suffix and Salutation; its own value is derived: the
//! non-blank FirstName, MiddleName, LastName and Suffix joined by single spaces (Salutation is
//! not part of it). Change events carry the components, never the derived value.
//!
//! On a person-account org (an Account describe with `IsPersonAccount`), an Account is a
//! person account when its `RecordTypeId` is the record type whose developer name is
//! `PersonAccount`; only those derive `Name`, business accounts set it directly.
//!
//! It owns the derivation and the person-account rule; records and their events are
//! [`super::records`]'s.

use super::{ObjectDef, Record};
use serde_json::Value as J;

/// The developer name Salesforce gives the person-account record type.
pub const PERSON_ACCOUNT_RECORD_TYPE: &str = "PersonAccount";

/// The components that make a person's `Name`, in order.
const NAME_PARTS: [&str; 4] = ["FirstName", "MiddleName", "LastName", "Suffix"];

/// The id of `raw` describe's person-account record type, if it has one.
pub(super) fn person_record_type(raw: &J) -> Option<String> {
    raw.get("recordTypeInfos")?
        .as_array()?
        .iter()
        .find(|rt| rt.get("developerName").and_then(J::as_str) == Some(PERSON_ACCOUNT_RECORD_TYPE))?
        .get("recordTypeId")?
        .as_str()
        .map(str::to_string)
}

/// Whether the object derives a person `Name` at all.
fn has_person_name(def: &ObjectDef) -> bool {
    def.describe
        .field("Name")
        .is_some_and(|f| def.describe.is_person_name(f))
}

/// Whether the object tells person accounts from business ones.
fn is_person_account_object(def: &ObjectDef) -> bool {
    def.describe.field("IsPersonAccount").is_some()
}

/// Whether `record` (of a person-account object) has the person-account record type. Ids
/// compare on their 15-character case-sensitive form: a client may send either form.
fn has_person_record_type(def: &ObjectDef, record: &Record) -> bool {
    let (Some(rt), Some(J::String(id))) = (&def.person_record_type, record.get("RecordTypeId"))
    else {
        return false;
    };
    id.get(..15).is_some_and(|id| rt.get(..15) == Some(id))
}

/// The derived `Name` of a person: the non-blank parts joined by single spaces.
pub fn person_name(record: &Record) -> J {
    let parts: Vec<&str> = NAME_PARTS
        .iter()
        .filter_map(|p| record.get(*p).and_then(J::as_str))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        J::Null
    } else {
        J::String(parts.join(" "))
    }
}

/// Sets what a write derives on `record`: `IsPersonAccount` from the record type, and a
/// person's `Name` from its parts. Returns the fields whose value changed.
pub(super) fn derive(def: &ObjectDef, record: &mut Record) -> Vec<String> {
    let mut changed = Vec::new();
    if !has_person_name(def) {
        return changed;
    }
    if is_person_account_object(def) {
        let person = J::Bool(has_person_record_type(def, record));
        if record.get("IsPersonAccount") != Some(&person) {
            record.insert("IsPersonAccount".into(), person.clone());
            changed.push("IsPersonAccount".to_string());
        }
        if person != J::Bool(true) {
            return changed;
        }
    }
    let name = person_name(record);
    if record.get("Name").unwrap_or(&J::Null) != &name {
        record.insert("Name".into(), name);
        changed.push("Name".to_string());
    }
    changed
}

/// Adjusts the required fields a new record misses: a person account's `Name` is derived, so
/// not required, and its `LastName` is (as Salesforce requires it of any person).
pub(super) fn adjust_required(def: &ObjectDef, record: &Record, missing: &mut Vec<String>) {
    if !has_person_name(def) || !is_person_account_object(def) {
        return;
    }
    if has_person_record_type(def, record) {
        missing.retain(|f| f != "Name");
        let blank = record
            .get("LastName")
            .and_then(J::as_str)
            .is_none_or(|s| s.trim().is_empty());
        if blank && !missing.iter().any(|f| f == "LastName") {
            missing.push("LastName".to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_person_name_joins_its_non_blank_parts() {
        let r = |v: J| v.as_object().cloned().expect("object");
        assert_eq!(
            person_name(&r(
                json!({"Salutation": "Dr.", "FirstName": "Ada", "MiddleName": " ",
                                  "LastName": "Lovelace", "Suffix": "III"})
            )),
            json!("Ada Lovelace III")
        );
        assert_eq!(
            person_name(&r(json!({"LastName": "Byron"}))),
            json!("Byron")
        );
        assert_eq!(person_name(&r(json!({"Salutation": "Mr."}))), J::Null);
    }
}

#[cfg(test)]
mod org_tests {
    use super::super::{ApiError, Org};
    use super::*;
    use crate::model::{ChangeEvent, ReplayId};
    use crate::salesforce::event::EventPlan;
    use serde_json::json;

    fn org(person_accounts: bool) -> Org {
        let mut definition = crate::emulator::load_org(None).expect("built-in org");
        if person_accounts {
            crate::emulator::with_person_accounts(&mut definition).expect("person accounts");
        }
        Org::new(definition).expect("org")
    }

    fn fields(v: J) -> Record {
        v.as_object().cloned().expect("object")
    }

    /// The last event on `channel`, decoded as a client decodes it.
    fn last_event(org: &Org, channel: &str) -> ChangeEvent {
        let events = org.bus.read_after(channel, 0, 10_000);
        let e = events.last().expect("an event");
        let json = org.schema_json(&e.schema_id).expect("schema");
        let plan = EventPlan::from_json(&e.schema_id, &json).expect("plan");
        plan.decode(ReplayId::from_u64(e.replay), &e.payload)
            .expect("decodes")
            .0
    }

    fn changed(e: &ChangeEvent) -> Vec<String> {
        let mut c: Vec<String> = e
            .header
            .changed_fields
            .iter()
            .map(|s| s.to_string())
            .collect();
        c.sort();
        c
    }

    #[test]
    fn a_contact_name_is_derived_and_its_parts_travel_in_events() {
        let org = org(false);
        let id = org
            .create(
                "Contact",
                &fields(json!({"Salutation": "Dr.", "FirstName": "Ada", "LastName": "King"})),
                "",
            )
            .expect("contact");
        assert_eq!(org.get("Contact", &id).expect("read")["Name"], "Ada King");
        let e = last_event(&org, "/data/ContactChangeEvent");
        assert_eq!(
            e.value("Name.Salutation"),
            Some(&crate::model::Value::String("Dr.".into()))
        );
        assert!(e.value("Name").is_none(), "the derived value is not sent");
        org.update("Contact", &id, &fields(json!({"LastName": "Lovelace"})), "")
            .expect("update");
        assert_eq!(
            org.get("Contact", &id).expect("read")["Name"],
            "Ada Lovelace"
        );
        let e = last_event(&org, "/data/ContactChangeEvent");
        assert_eq!(changed(&e), ["LastModifiedDate", "Name.LastName"]);
    }

    #[test]
    fn person_accounts_derive_their_name_business_accounts_set_it() {
        let org = org(true);
        let def = org.object("Account").expect("account");
        let rt = def
            .person_record_type
            .clone()
            .expect("a PersonAccount record type");
        // A client may send the 15-character id.
        let person = org
            .create(
                "Account",
                &fields(json!({"RecordTypeId": &rt[..15], "Salutation": "Ms.",
                               "FirstName": "Martha", "MiddleName": "J.", "LastName": "Brown",
                               "Suffix": "Jr.", "PersonEmail": "martha@example.com",
                               "Loyalty_Tier__pc": "Gold"})),
                "",
            )
            .expect("person account");
        let r = org.get("Account", &person).expect("read");
        assert_eq!(r["IsPersonAccount"], true);
        assert_eq!(r["Name"], "Martha J. Brown Jr.");
        let e = last_event(&org, "/data/AccountChangeEvent");
        assert_eq!(
            e.value("Name.FirstName"),
            Some(&crate::model::Value::String("Martha".into()))
        );
        assert_eq!(
            e.value("Name.Suffix"),
            Some(&crate::model::Value::String("Jr.".into()))
        );
        assert_eq!(
            e.value("PersonEmail"),
            Some(&crate::model::Value::String("martha@example.com".into()))
        );
        assert_eq!(
            e.value("IsPersonAccount"),
            Some(&crate::model::Value::Boolean(true))
        );

        org.update(
            "Account",
            &person,
            &fields(json!({"FirstName": "Marta"})),
            "",
        )
        .expect("update");
        assert_eq!(
            org.get("Account", &person).expect("read")["Name"],
            "Marta J. Brown Jr."
        );
        let e = last_event(&org, "/data/AccountChangeEvent");
        assert_eq!(changed(&e), ["LastModifiedDate", "Name.FirstName"]);

        let business = org
            .create("Account", &fields(json!({"Name": "Acme"})), "")
            .expect("business account");
        let r = org.get("Account", &business).expect("read");
        assert_eq!(r["IsPersonAccount"], false);
        assert_eq!(r["Name"], "Acme");
        org.update(
            "Account",
            &business,
            &fields(json!({"Name": "Acme Corp"})),
            "",
        )
        .expect("rename");
        assert_eq!(
            org.get("Account", &business).expect("read")["Name"],
            "Acme Corp"
        );

        let missing = |v: J| match org.create("Account", &fields(v), "") {
            Err(ApiError { code, fields, .. }) => (code, fields),
            Ok(id) => panic!("created {id}"),
        };
        assert_eq!(
            missing(json!({"RecordTypeId": rt, "FirstName": "No"})),
            ("REQUIRED_FIELD_MISSING", vec!["LastName".to_string()])
        );
        assert_eq!(
            missing(json!({"Industry": "Banking"})),
            ("REQUIRED_FIELD_MISSING", vec!["Name".to_string()])
        );
    }
}
