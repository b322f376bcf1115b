//! Relationship paths, subqueries and aggregates, bound against the built-in org's describes.

use super::*;
use crate::emulator::store::{ObjectDef, Org, Record};
use serde_json::{Value as J, json};
use std::sync::Arc;

struct TestOrg(Org);

impl Catalog for TestOrg {
    fn object(&self, name: &str) -> Option<Arc<ObjectDef>> {
        self.0
            .object_names()
            .into_iter()
            .find(|n| n.eq_ignore_ascii_case(name))
            .and_then(|n| self.0.object(&n).ok())
    }
}

fn org() -> TestOrg {
    let def = crate::emulator::load_org(None).expect("built-in org");
    TestOrg(Org::new(def).expect("org"))
}

fn bound(soql: &str) -> Query {
    let mut q = parse(soql).unwrap_or_else(|e| panic!("{soql}: {e}"));
    q.bind_in(&org()).unwrap_or_else(|e| panic!("{soql}: {e}"));
    q
}

fn bind_err(soql: &str) -> SoqlError {
    let mut q = parse(soql).unwrap_or_else(|e| panic!("{soql}: {e}"));
    match q.bind_in(&org()) {
        Ok(()) => panic!("{soql}: expected an error"),
        Err(e) => e,
    }
}

fn rec(v: J) -> Record {
    match v {
        J::Object(m) => m,
        _ => panic!("test record must be an object"),
    }
}

const ACME: &str = "001000000000001AAA";
const BETA: &str = "001000000000002AAA";

fn parents() -> Parents {
    let mut p = Parents::default();
    p.insert(
        "Account",
        ACME.into(),
        Arc::new(rec(json!({"Id": ACME, "Name": "Acme", "ParentId": BETA}))),
    );
    p.insert(
        "Account",
        BETA.into(),
        Arc::new(rec(json!({"Id": BETA, "Name": "Beta", "ParentId": null}))),
    );
    p
}

fn contacts() -> Vec<Record> {
    vec![
        rec(json!({"Id": "003000000000001AAA", "LastName": "Ames", "AccountId": ACME})),
        rec(json!({"Id": "003000000000002AAA", "LastName": "Bell", "AccountId": BETA})),
        rec(json!({"Id": "003000000000003AAA", "LastName": "Cole", "AccountId": null})),
    ]
}

/// The contacts `q` selects, joined, filtered and sorted.
fn run(q: &Query) -> Vec<Record> {
    let p = parents();
    let mut out: Vec<Record> = contacts()
        .into_iter()
        .map(|mut r| {
            q.join(&mut r, &p);
            r
        })
        .filter(|r| q.matches(r))
        .collect();
    q.sort(&mut out);
    out
}

#[test]
fn child_to_parent_paths_bind_from_relationship_names_and_join() {
    let q = bound(
        "SELECT Id, account.name FROM Contact WHERE Account.Name LIKE 'a%' OR \
         Account.Name = null ORDER BY Account.Name DESC",
    );
    assert_eq!(q.fields, vec!["Id", "Account.Name"]);
    assert_eq!(
        q.joins(),
        [Join {
            path: "Account".into(),
            from: String::new(),
            fk: "AccountId".into(),
            target: "Account".into(),
            fields: vec!["Name".into()],
        }]
    );
    let got = run(&q);
    let names: Vec<&J> = got.iter().map(|r| &r["Account.Name"]).collect();
    assert_eq!(names, [&json!("Acme"), &J::Null]);
    assert_eq!(got[0]["Account."], json!(ACME));
    assert_eq!(
        got[1]["Account."],
        J::Null,
        "an empty reference joins nothing"
    );
}

#[test]
fn paths_reach_several_levels_and_custom_relationships() {
    let q = bound("SELECT Account.Parent.Name FROM Contact ORDER BY Account.Parent.Name");
    assert_eq!(q.fields, vec!["Account.Parent.Name"]);
    assert_eq!(q.joins().len(), 2);
    assert_eq!(q.joins()[0].fields, vec!["ParentId"]);
    assert_eq!(q.joins()[1].from, "Account");
    let got = run(&q);
    assert_eq!(got[2]["Account.Parent.Name"], json!("Beta"));
    assert_eq!(got[2]["Account.Parent."], json!(BETA));

    let q = bound("SELECT Name, Account__r.Name FROM Invoice__c WHERE Account__r.Industry = 'x'");
    assert_eq!(q.fields, vec!["Name", "Account__r.Name"]);
    assert_eq!(q.joins()[0].fk, "Account__c");
    assert_eq!(q.joins()[0].fields, vec!["Name", "Industry"]);
}

#[test]
fn unknown_relationships_are_refused_like_salesforce() {
    for soql in [
        "SELECT Account__c.Name FROM Invoice__c",
        "SELECT Accounts.Name FROM Contact",
        "SELECT Id FROM Contact WHERE Nope.Name = 'x'",
    ] {
        let e = bind_err(soql);
        assert_eq!(e.code, INVALID_FIELD, "{soql}");
        assert!(e.message.contains("Didn't understand relationship"), "{e}");
    }
    // The org has no User object, so Owner reaches nothing here (Salesforce would answer).
    let e = bind_err("SELECT Owner.Name FROM Account");
    assert!(e.message.contains("no User object"), "{e}");
    let e = bind_err("SELECT Account.Nope FROM Contact");
    assert!(
        e.message
            .contains("No such column 'Nope' on entity 'Account'"),
        "{e}"
    );
    // Without the org's other objects a path cannot bind.
    let mut q = parse("SELECT Account.Name FROM Contact").expect("parses");
    let contact = org().object("Contact").expect("Contact");
    assert_eq!(
        q.bind(&contact.describe).expect_err("no catalog").code,
        INVALID_FIELD
    );
}

#[test]
fn subqueries_bind_to_child_relationships() {
    let q = bound(
        "SELECT Name, (SELECT LastName, Account.Name FROM contacts WHERE LastName != null \
         ORDER BY LastName LIMIT 5) FROM Account",
    );
    let child = &q.children()[0];
    assert_eq!(child.relationship, "Contacts");
    assert_eq!(child.field, "AccountId");
    assert_eq!(child.query.object, "Contact");
    assert_eq!(child.query.fields, vec!["LastName", "Account.Name"]);
    assert_eq!(child.query.limit(), Some(5));
    assert_eq!(q.items()[1], Item::Child(0));
    assert_eq!(q.output_key(&q.items()[1]), "Contacts");
    assert!(q.bulk_unsupported().is_some());

    let e = bind_err("SELECT Id, (SELECT Id FROM Nothings) FROM Account");
    assert_eq!(e.code, INVALID_TYPE);
    assert!(e.message.contains("in FROM part of query call"), "{e}");
    for soql in [
        "SELECT Id, (SELECT Id, (SELECT Id FROM Contacts) FROM Contacts) FROM Account",
        "SELECT Id, (SELECT COUNT(Id) FROM Contacts) FROM Account",
        "SELECT Id, (SELECT Id FROM Contacts OFFSET 1) FROM Account",
    ] {
        assert_eq!(parse(soql).expect_err(soql).code, MALFORMED_QUERY, "{soql}");
    }
}

fn accounts() -> Vec<Record> {
    vec![
        rec(
            json!({"Id": ACME, "Name": "Acme", "Type": "Customer", "NumberOfEmployees": 10,
                   "AnnualRevenue": 1.5, "CreatedDate": "2024-01-10T10:00:00.000+0000"}),
        ),
        rec(
            json!({"Id": BETA, "Name": "Beta", "Type": "customer", "NumberOfEmployees": 5,
                   "AnnualRevenue": null, "CreatedDate": "2024-03-10T10:00:00.000+0000"}),
        ),
        rec(
            json!({"Id": "001000000000003AAA", "Name": "Zeta", "Type": "Partner",
                   "NumberOfEmployees": null, "AnnualRevenue": 4,
                   "CreatedDate": "2023-01-10T10:00:00.000+0000"}),
        ),
        rec(
            json!({"Id": "001000000000004AAA", "Name": "Acme", "Type": null,
                   "NumberOfEmployees": 1, "CreatedDate": "2022-01-10T10:00:00.000+0000"}),
        ),
    ]
}

fn aggregate(soql: &str) -> Vec<Record> {
    let q = bound(soql);
    let data = accounts();
    q.aggregate(data.iter().filter(|r| q.matches(r)))
}

#[test]
fn group_by_with_aggregates_aliases_and_expr_names() {
    let q = bound(
        "SELECT Type, COUNT(Id), SUM(NumberOfEmployees) total, MAX(CreatedDate), \
         COUNT_DISTINCT(Name) FROM Account GROUP BY Type",
    );
    let keys: Vec<String> = q.items().iter().map(|i| q.output_key(i)).collect();
    assert_eq!(keys, ["Type", "expr0", "total", "expr1", "expr2"]);
    assert!(q.is_aggregate());
    assert_eq!(q.bulk_unsupported(), Some("GROUP BY"));
    let data = accounts();
    let rows = q.aggregate(data.iter());
    // Text groups ignore case; null groups first.
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["Type"], J::Null);
    assert_eq!(rows[1]["Type"], json!("Customer"));
    assert_eq!(rows[1]["expr0"], json!(2));
    assert_eq!(rows[1]["total"], json!(15));
    assert_eq!(rows[1]["expr1"], json!("2024-03-10T10:00:00.000+0000"));
    assert_eq!(rows[1]["expr2"], json!(2));
    assert_eq!(rows[2]["total"], J::Null, "SUM over nulls only is null");
}

#[test]
fn aggregates_without_group_by_make_one_row() {
    let rows = aggregate("SELECT COUNT(Id), AVG(AnnualRevenue), MIN(Name) m FROM Account");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["expr0"], json!(4));
    assert_eq!(rows[0]["expr1"], json!(2.75));
    assert_eq!(rows[0]["m"], json!("Acme"));
    let rows = aggregate("SELECT COUNT(Id), SUM(AnnualRevenue) FROM Account WHERE Name = 'x'");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["expr0"], json!(0));
    assert_eq!(rows[0]["expr1"], J::Null);
}

#[test]
fn having_order_by_aggregates_and_limit() {
    let rows = aggregate(
        "SELECT Name, COUNT(Id) n FROM Account GROUP BY Name HAVING COUNT(Id) > 1 \
         ORDER BY Name",
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["Name"], json!("Acme"));
    assert_eq!(rows[0]["n"], json!(2));
    let rows = aggregate(
        "SELECT Name FROM Account GROUP BY Name ORDER BY SUM(NumberOfEmployees) DESC NULLS \
         LAST LIMIT 2",
    );
    let names: Vec<&J> = rows.iter().map(|r| &r["Name"]).collect();
    assert_eq!(names, [&json!("Acme"), &json!("Beta")]);
    assert_eq!(rows[0].len(), 1, "hidden aggregates are not in the rows");
}

#[test]
fn aggregate_queries_are_checked_like_salesforce() {
    for (soql, code, needle) in [
        (
            "SELECT Name, COUNT(Id) FROM Account",
            MALFORMED_QUERY,
            "Field must be grouped or aggregated: Name",
        ),
        (
            "SELECT Type, COUNT(Id) FROM Account GROUP BY Type ORDER BY Name",
            MALFORMED_QUERY,
            "Ordered field must be grouped or aggregated: Name",
        ),
        (
            "SELECT SUM(Name) FROM Account",
            INVALID_FIELD,
            "does not support aggregate operator SUM",
        ),
        (
            "SELECT MAX(CreatedDate) FROM Account LIMIT 1",
            MALFORMED_QUERY,
            "GROUP BY",
        ),
        (
            "SELECT Name n FROM Account",
            MALFORMED_QUERY,
            "only allowed in an aggregate query",
        ),
        (
            "SELECT Type, COUNT(Id) FROM Account GROUP BY Type HAVING Name = 'x'",
            MALFORMED_QUERY,
            "must be grouped or aggregated",
        ),
    ] {
        let e = bind_err(soql);
        assert_eq!(e.code, code, "{soql}: {e}");
        assert!(e.message.contains(needle), "{soql}: {e}");
    }
    let e = parse("SELECT Name FROM Account HAVING COUNT(Id) > 1").expect_err("no GROUP BY");
    assert!(e.message.contains("needs a GROUP BY"), "{e}");
}

#[test]
fn grouping_by_a_relationship_path_names_the_field() {
    let q = bound("SELECT Account.Name, COUNT(Id) FROM Contact GROUP BY Account.Name");
    let keys: Vec<String> = q.items().iter().map(|i| q.output_key(i)).collect();
    assert_eq!(keys, ["Name", "expr0"]);
    let p = parents();
    let joined: Vec<Record> = contacts()
        .into_iter()
        .map(|mut r| {
            q.join(&mut r, &p);
            r
        })
        .collect();
    let rows = q.aggregate(joined.iter());
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1]["Account.Name"], json!("Acme"));
}

#[test]
fn count_cannot_be_grouped() {
    let e = bind_err("SELECT COUNT() FROM Account GROUP BY Name");
    assert_eq!(e.code, MALFORMED_QUERY);
    assert!(e.message.contains("COUNT(field)"), "{e}");
}

/// Fragments of relationship, subquery and aggregate syntax for random input.
fn soup_piece() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    prop_oneof![
        Just("SELECT ".to_string()),
        Just("FROM ".to_string()),
        Just("Contact ".to_string()),
        Just("Contacts ".to_string()),
        Just("Account ".to_string()),
        Just("Account.Name ".to_string()),
        Just("Account.Parent.Name ".to_string()),
        Just("Owner.Name ".to_string()),
        Just("WHERE ".to_string()),
        Just("GROUP BY ".to_string()),
        Just("HAVING ".to_string()),
        Just("ORDER BY ".to_string()),
        Just("LIMIT 2 ".to_string()),
        Just("COUNT(Id) ".to_string()),
        Just("SUM(NumberOfEmployees) ".to_string()),
        Just("MAX(Name) m ".to_string()),
        Just("COUNT() ".to_string()),
        Just("Name ".to_string()),
        Just("LastName ".to_string()),
        Just(", ".to_string()),
        Just("( ".to_string()),
        Just(") ".to_string()),
        Just("= ".to_string()),
        Just("> ".to_string()),
        Just("1 ".to_string()),
        Just("'a' ".to_string()),
        Just("null ".to_string()),
        "[ -~]{0,3}",
    ]
}

proptest::proptest! {
    #[test]
    fn relationship_soup_never_panics(
        parts in proptest::collection::vec(soup_piece(), 0..24)
    ) {
        let catalog = org();
        let p = parents();
        for text in [parts.concat(), format!("SELECT Id, {} FROM Contact", parts.concat())] {
            let Ok(mut q) = parse(&text) else { continue };
            if q.bind_in(&catalog).is_err() {
                continue;
            }
            let mut data: Vec<Record> = contacts()
                .into_iter()
                .map(|mut r| {
                    q.join(&mut r, &p);
                    r
                })
                .collect();
            q.sort(&mut data);
            let _ = q.aggregate(data.iter().filter(|r| q.matches(r)));
            for item in q.items() {
                let _ = q.output_key(item);
            }
        }
    }
}
