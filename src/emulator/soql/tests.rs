//! The SOQL engine's behaviour, through its public face: parse, bind, run, project.

use super::*;
use crate::emulator::store::Record;
use crate::model::ObjectDescribe;
use crate::model::id::id18;
use proptest::prelude::*;
use serde_json::{Value as J, json};

fn account() -> ObjectDescribe {
    serde_json::from_str(include_str!("../org/Account.json")).expect("Account describe")
}

fn opportunity() -> ObjectDescribe {
    serde_json::from_str(include_str!("../org/Opportunity.json")).expect("Opportunity describe")
}

fn rec(v: J) -> Record {
    match v {
        J::Object(m) => m,
        _ => panic!("test record must be an object"),
    }
}

fn acc_id(n: u32) -> String {
    id18(&format!("001000000000{n:03}"))
}

/// Four accounts covering nulls, case, numbers, dates and addresses.
fn accounts() -> Vec<Record> {
    vec![
        rec(json!({
            "Id": acc_id(1), "Name": "Acme", "Type": "Customer", "NumberOfEmployees": 100,
            "AnnualRevenue": 1000.5, "CreatedDate": "2024-01-10T10:00:00.000+0000",
            "LastActivityDate": "2024-01-31", "IsPartner": true, "BillingCity": "Paris",
            "BillingStreet": "1 rue de Rivoli", "BillingCountry": "France",
            "BillingLatitude": 48.85, "OwnerId": id18("005000000000001"),
        })),
        rec(json!({
            "Id": acc_id(2), "Name": "acme corp", "Type": null, "NumberOfEmployees": 5,
            "AnnualRevenue": null, "CreatedDate": "2024-01-31T10:00:00.000+0000",
            "LastActivityDate": null, "IsPartner": false,
        })),
        rec(json!({
            "Id": acc_id(3), "Name": "Zeta_1%", "Type": "Partner", "AnnualRevenue": 20,
            "CreatedDate": "2024-02-01T00:00:00.000+0000", "LastActivityDate": "2023-12-01",
        })),
        rec(json!({
            "Id": acc_id(4), "Name": "beta", "Type": "customer", "NumberOfEmployees": 100,
            "AnnualRevenue": -3, "CreatedDate": "2023-06-01T00:00:00.000+0000",
            "LastActivityDate": "2024-02-29", "IsPartner": true,
        })),
    ]
}

fn bound(soql: &str) -> Query {
    let mut q = parse(soql).unwrap_or_else(|e| panic!("{soql}: {e}"));
    q.bind(&account()).unwrap_or_else(|e| panic!("{soql}: {e}"));
    q
}

/// Names of the accounts `soql` returns, in result order.
fn names(soql: &str) -> Vec<String> {
    let data = accounts();
    bound(soql)
        .run(data.iter())
        .iter()
        .map(|r| r.get("Name").and_then(J::as_str).unwrap_or("?").to_string())
        .collect()
}

/// Like `names`, but sorted, for filters whose result order does not matter.
fn matching(where_clause: &str) -> Vec<String> {
    let mut n = names(&format!("SELECT Name FROM Account WHERE {where_clause}"));
    n.sort();
    n
}

fn err(soql: &str) -> SoqlError {
    match parse(soql) {
        Err(e) => e,
        Ok(mut q) => match q.bind(&account()) {
            Err(e) => e,
            Ok(()) => panic!("{soql}: expected an error"),
        },
    }
}

fn v(names: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    out.sort();
    out
}

#[test]
fn parses_fields_object_and_clauses() {
    let q = parse("SELECT Id, Name FROM Account WHERE Name = 'x' ORDER BY Name LIMIT 10")
        .expect("parses");
    assert_eq!(q.object, "Account");
    assert_eq!(q.fields, vec!["Id", "Name"]);
    assert!(!q.count_only);
    assert_eq!(q.limit(), Some(10));
    let q = parse("SELECT Id FROM Account").expect("parses");
    assert_eq!(q.limit(), None);
    assert!(q.matches(&Record::new()));
}

#[test]
fn names_are_canonicalized_case_insensitively() {
    let mut q = parse(
        "select id, NAME, billingcity from ACCOUNT where annualrevenue > 1 \
                       order by createddate",
    )
    .expect("parses");
    assert_eq!(q.object, "ACCOUNT");
    q.bind(&account()).expect("binds");
    assert_eq!(q.object, "Account");
    assert_eq!(q.fields, vec!["Id", "Name", "BillingCity"]);
    let data = accounts();
    let got: Vec<_> = q
        .run(data.iter())
        .iter()
        .map(|r| r["Name"].clone())
        .collect();
    assert_eq!(got, vec![json!("Acme"), json!("Zeta_1%")]);
}

#[test]
fn keywords_are_case_insensitive() {
    assert_eq!(
        names(
            "sElEcT Name fRoM Account wHeRe Name lIkE 'a%' aNd IsPartner = TRUE \
               oRdEr bY Name dEsC nUlLs fIrSt lImIt 5"
        ),
        vec!["Acme"]
    );
    assert_eq!(matching("Type = NULL"), v(&["acme corp"]));
}

#[test]
fn text_comparisons_ignore_case() {
    assert_eq!(matching("Name = 'ACME'"), v(&["Acme"]));
    assert_eq!(matching("Type = 'customer'"), v(&["Acme", "beta"]));
    // != is true for null, as in Salesforce (not SQL's three-valued logic).
    assert_eq!(matching("Type != 'CUSTOMER'"), v(&["Zeta_1%", "acme corp"]));
    assert_eq!(matching("Type <> 'Customer'"), v(&["Zeta_1%", "acme corp"]));
    assert_eq!(matching("Name < 'B'"), v(&["Acme", "acme corp"]));
    assert_eq!(
        matching("Name <= 'beta'"),
        v(&["Acme", "acme corp", "beta"])
    );
    assert_eq!(matching("Name > 'Beta'"), v(&["Zeta_1%"]));
    assert_eq!(matching("Name >= 'BETA'"), v(&["Zeta_1%", "beta"]));
    // Null never satisfies a range.
    assert_eq!(matching("Type < 'zzz'"), v(&["Acme", "Zeta_1%", "beta"]));
}

#[test]
fn string_literal_escapes() {
    let data = [rec(json!({"Name": "O'Brien \\ \"x\"\n"}))];
    let q = bound(r#"SELECT Name FROM Account WHERE Name = 'o\'brien \\ \"x\"\n'"#);
    assert_eq!(q.run(data.iter()).len(), 1);
    let e = err(r"SELECT Name FROM Account WHERE Name = 'a\qb'");
    assert_eq!(e.code, MALFORMED_QUERY);
    assert!(
        e.message.contains("'\\q'") && e.message.contains("position 41"),
        "{e}"
    );
}

#[test]
fn numeric_comparisons() {
    assert_eq!(matching("NumberOfEmployees = 100"), v(&["Acme", "beta"]));
    assert_eq!(
        matching("NumberOfEmployees != 100"),
        v(&["Zeta_1%", "acme corp"])
    );
    assert_eq!(matching("NumberOfEmployees < 100"), v(&["acme corp"]));
    assert_eq!(
        matching("NumberOfEmployees <= 100"),
        v(&["Acme", "acme corp", "beta"])
    );
    assert_eq!(matching("NumberOfEmployees > 5"), v(&["Acme", "beta"]));
    assert_eq!(
        matching("NumberOfEmployees >= 5.0"),
        v(&["Acme", "acme corp", "beta"])
    );
    // Currency with decimals and signs; numeric, not lexicographic ("1000.5" < "20").
    assert_eq!(matching("AnnualRevenue > 20"), v(&["Acme"]));
    assert_eq!(matching("AnnualRevenue >= 20.0"), v(&["Acme", "Zeta_1%"]));
    assert_eq!(matching("AnnualRevenue < -2.5"), v(&["beta"]));
    assert_eq!(matching("AnnualRevenue = +1000.50"), v(&["Acme"]));
    assert_eq!(
        matching("AnnualRevenue IN (20, -3)"),
        v(&["Zeta_1%", "beta"])
    );
}

#[test]
fn long_values_compare_exactly() {
    let big = 9_007_199_254_740_993_i64; // 2^53 + 1: equal to 2^53 as f64
    let data = [rec(json!({"NumberOfEmployees": big}))];
    let q = bound("SELECT Id FROM Account WHERE NumberOfEmployees > 9007199254740992");
    assert_eq!(q.run(data.iter()).len(), 1);
}

#[test]
fn boolean_comparisons_treat_null_as_false() {
    assert_eq!(matching("IsPartner = true"), v(&["Acme", "beta"]));
    assert_eq!(matching("IsPartner = false"), v(&["Zeta_1%", "acme corp"]));
    assert_eq!(matching("IsPartner != true"), v(&["Zeta_1%", "acme corp"]));
    assert_eq!(matching("IsPartner != false"), v(&["Acme", "beta"]));
    assert_eq!(matching("IsPartner = null"), v(&["Zeta_1%", "acme corp"]));
    assert_eq!(matching("IsPartner != null"), v(&["Acme", "beta"]));
    assert_eq!(
        matching("IsPartner IN (false)"),
        v(&["Zeta_1%", "acme corp"])
    );
    let e = err("SELECT Id FROM Account WHERE IsPartner < true");
    assert_eq!(e.code, INVALID_QUERY_FILTER_OPERATOR);
    assert!(e.message.contains("boolean"), "{e}");
    let e = err("SELECT Id FROM Account WHERE IsPartner = 'true'");
    assert_eq!(e.code, INVALID_FIELD);
    assert!(
        e.message.contains("'IsPartner'") && e.message.contains("boolean"),
        "{e}"
    );
}

#[test]
fn date_comparisons() {
    assert_eq!(matching("LastActivityDate = 2024-01-31"), v(&["Acme"]));
    assert_eq!(
        matching("LastActivityDate != 2024-01-31"),
        v(&["Zeta_1%", "acme corp", "beta"])
    );
    assert_eq!(matching("LastActivityDate < 2024-01-31"), v(&["Zeta_1%"]));
    assert_eq!(
        matching("LastActivityDate <= 2024-01-31"),
        v(&["Acme", "Zeta_1%"])
    );
    assert_eq!(matching("LastActivityDate > 2024-01-31"), v(&["beta"]));
    assert_eq!(
        matching("LastActivityDate >= 2023-12-01"),
        v(&["Acme", "Zeta_1%", "beta"])
    );
    assert_eq!(
        matching("LastActivityDate IN (2024-02-29, 2023-12-01)"),
        v(&["Zeta_1%", "beta"])
    );
    let e = err("SELECT Id FROM Account WHERE LastActivityDate > 2024-01-01T00:00:00Z");
    assert_eq!(e.code, INVALID_FIELD);
    assert!(
        e.message.contains("'LastActivityDate'") && e.message.contains("type date"),
        "{e}"
    );
    let e = err("SELECT Id FROM Account WHERE LastActivityDate > '2024-01-01'");
    assert_eq!(e.code, INVALID_FIELD);
}

#[test]
fn datetime_comparisons_and_literal_forms() {
    // All spell the instant Acme was created.
    for lit in [
        "2024-01-10T10:00:00Z",
        "2024-01-10T10:00:00.000Z",
        "2024-01-10T11:00:00+01:00",
        "2024-01-10T10:00:00.000+0000",
        "2024-01-10T05:30:00.000-04:30",
        "2024-01-10T10:00:00.0004Z",
    ] {
        assert_eq!(
            matching(&format!("CreatedDate = {lit}")),
            v(&["Acme"]),
            "{lit}"
        );
    }
    assert_eq!(
        matching("CreatedDate != 2024-01-10T10:00:00Z"),
        v(&["Zeta_1%", "acme corp", "beta"])
    );
    assert_eq!(matching("CreatedDate < 2024-01-10T10:00:00Z"), v(&["beta"]));
    assert_eq!(
        matching("CreatedDate <= 2024-01-10T10:00:00Z"),
        v(&["Acme", "beta"])
    );
    assert_eq!(
        matching("CreatedDate > 2024-01-31T10:00:00.001Z"),
        v(&["Zeta_1%"])
    );
    assert_eq!(
        matching("CreatedDate >= 2024-01-31T12:00:00+02:00"),
        v(&["Zeta_1%", "acme corp"])
    );
    // A date literal on a datetime field is refused, as Salesforce does.
    let e = err("SELECT Id FROM Account WHERE CreatedDate > 2024-01-01");
    assert_eq!(e.code, INVALID_FIELD);
    assert!(
        e.message.contains("'CreatedDate'") && e.message.contains("dateTime"),
        "{e}"
    );
    for bad in [
        "2024-01-10T10:00:00",
        "2024-01-10T10:00Z",
        "2024-01-10T25:00:00Z",
        "2024-01-10T10:00:00.Z",
        "2024-01-10T10:00:00+1:00",
    ] {
        let e = err(&format!("SELECT Id FROM Account WHERE CreatedDate > {bad}"));
        assert_eq!(e.code, MALFORMED_QUERY, "{bad}");
        assert!(
            e.message.contains("datetime literal") && e.message.contains("position 44"),
            "{bad}: {e}"
        );
    }
    let e = err("SELECT Id FROM Account WHERE LastActivityDate = 2024-02-30");
    assert_eq!(e.code, MALFORMED_QUERY);
    assert!(
        e.message.contains("'2024-02-30'") && e.message.contains("position 49"),
        "{e}"
    );
}

#[test]
fn id_comparisons() {
    let id15 = "001000000000002";
    assert_eq!(matching(&format!("Id = '{id15}'")), v(&["acme corp"]));
    assert_eq!(
        matching(&format!("Id = '{}'", acc_id(2))),
        v(&["acme corp"])
    );
    // Ids order like their base-62 value (what PK chunking relies on).
    assert_eq!(
        matching(&format!("Id > '{}'", acc_id(2))),
        v(&["Zeta_1%", "beta"])
    );
    assert_eq!(
        matching(&format!("Id <= '{id15}'")),
        v(&["Acme", "acme corp"])
    );
    assert_eq!(
        matching(&format!("Id IN ('{}', '001000000000004')", acc_id(1))),
        v(&["Acme", "beta"])
    );
    assert_eq!(
        matching("OwnerId = null"),
        v(&["Zeta_1%", "acme corp", "beta"])
    );
    let e = err("SELECT Id FROM Account WHERE Id = 'abc'");
    assert_eq!(e.code, INVALID_QUERY_FILTER_OPERATOR);
    assert!(e.message.contains("invalid ID field: abc"), "{e}");
    let e = err("SELECT Id FROM Account WHERE Id LIKE '001%'");
    assert_eq!(e.code, INVALID_QUERY_FILTER_OPERATOR);
    assert!(e.message.contains("id field"), "{e}");
    let e = err("SELECT Id FROM Account WHERE OwnerId = 5");
    assert_eq!(e.code, INVALID_FIELD);
    assert!(
        e.message
            .contains("type id and should be enclosed in quotes"),
        "{e}"
    );
}

#[test]
fn like_wildcards_escapes_and_case() {
    assert_eq!(matching("Name LIKE 'acme%'"), v(&["Acme", "acme corp"]));
    assert_eq!(matching("Name LIKE '%CORP'"), v(&["acme corp"]));
    assert_eq!(matching("Name LIKE '_eta'"), v(&["beta"]));
    assert_eq!(
        matching("Name LIKE '%e%'"),
        v(&["Acme", "Zeta_1%", "acme corp", "beta"])
    );
    assert_eq!(matching("Name LIKE 'acme'"), v(&["Acme"]));
    assert_eq!(
        matching("Name LIKE '%%a%%'"),
        v(&["Acme", "Zeta_1%", "acme corp", "beta"])
    );
    // Escaped wildcards are literal.
    assert_eq!(matching(r"Name LIKE '%\_1\%'"), v(&["Zeta_1%"]));
    assert_eq!(matching(r"Name LIKE 'acme\%'"), Vec::<String>::new());
    // Null never matches; NOT LIKE is spelled NOT (... LIKE ...).
    assert_eq!(matching("Type LIKE '%'"), v(&["Acme", "Zeta_1%", "beta"]));
    assert_eq!(matching("NOT Type LIKE 'c%'"), v(&["Zeta_1%", "acme corp"]));
    let e = err("SELECT Id FROM Account WHERE NumberOfEmployees LIKE '1%'");
    assert_eq!(e.code, INVALID_QUERY_FILTER_OPERATOR);
    let e = err("SELECT Id FROM Account WHERE Name LIKE 5");
    assert_eq!(e.code, MALFORMED_QUERY);
    assert!(
        e.message.contains("'5'") && e.message.contains("string literal"),
        "{e}"
    );
    let e = err("SELECT Id FROM Account WHERE Name NOT LIKE 'a%'");
    assert!(
        e.message.contains("'LIKE'") && e.message.contains("IN after NOT"),
        "{e}"
    );
}

#[test]
fn in_and_not_in() {
    assert_eq!(
        matching("Name IN ('ACME', 'Beta', 'nope')"),
        v(&["Acme", "beta"])
    );
    assert_eq!(matching("Type IN ('Partner')"), v(&["Zeta_1%"]));
    // NOT IN, like !=, keeps nulls; an explicit null in the list matches nulls.
    assert_eq!(
        matching("Type NOT IN ('customer')"),
        v(&["Zeta_1%", "acme corp"])
    );
    assert_eq!(
        matching("Type IN ('Partner', null)"),
        v(&["Zeta_1%", "acme corp"])
    );
    assert_eq!(
        matching("Type NOT IN ('Partner', null)"),
        v(&["Acme", "beta"])
    );
    assert_eq!(
        matching("NumberOfEmployees NOT IN (100)"),
        v(&["Zeta_1%", "acme corp"])
    );
    let e = err("SELECT Id FROM Account WHERE Name IN ('a', 1)");
    assert_eq!(e.code, INVALID_FIELD);
    let e = err("SELECT Id FROM Account WHERE Name IN ()");
    assert!(
        e.message.contains("')'") && e.message.contains("position 39"),
        "{e}"
    );
    let e = err("SELECT Id FROM Account WHERE Name IN 'a'");
    assert!(e.message.contains("expected '('"), "{e}");
}

#[test]
fn null_semantics() {
    assert_eq!(matching("Type = null"), v(&["acme corp"]));
    assert_eq!(matching("Type != null"), v(&["Acme", "Zeta_1%", "beta"]));
    // A field absent from the record is null.
    assert_eq!(matching("NumberOfEmployees = null"), v(&["Zeta_1%"]));
    assert_eq!(
        matching("AnnualRevenue > -1000"),
        v(&["Acme", "Zeta_1%", "beta"])
    );
    assert_eq!(matching("AnnualRevenue < null"), Vec::<String>::new());
    assert_eq!(matching("LastActivityDate = null"), v(&["acme corp"]));
    assert_eq!(
        matching("CreatedDate != null"),
        v(&["Acme", "Zeta_1%", "acme corp", "beta"])
    );
}

#[test]
fn logic_and_parentheses() {
    assert_eq!(
        matching("Type = 'Customer' AND (NumberOfEmployees = 5 OR Name = 'beta')"),
        v(&["beta"])
    );
    assert_eq!(
        matching("(Type = 'Customer' AND NumberOfEmployees = 5) OR Name = 'beta'"),
        v(&["beta"])
    );
    // The same three conditions grouped two ways give different answers.
    assert_eq!(
        matching("(Type = null AND NumberOfEmployees = 5) OR Name = 'beta'"),
        v(&["acme corp", "beta"])
    );
    assert_eq!(
        matching("Type = null AND (NumberOfEmployees = 5 OR Name = 'beta')"),
        v(&["acme corp"])
    );
    assert_eq!(
        matching("Name = 'Acme' OR Name = 'beta' OR Type = 'Partner'"),
        v(&["Acme", "Zeta_1%", "beta"])
    );
    assert_eq!(
        matching("IsPartner = true AND NumberOfEmployees = 100 AND Name LIKE 'b%'"),
        v(&["beta"])
    );
    assert_eq!(
        matching("NOT Name = 'Acme'"),
        v(&["Zeta_1%", "acme corp", "beta"])
    );
    assert_eq!(
        matching("NOT (Name = 'Acme' OR Type = null)"),
        v(&["Zeta_1%", "beta"])
    );
    assert_eq!(
        matching("IsPartner = true AND (NOT Name = 'Acme')"),
        v(&["beta"])
    );
    assert_eq!(matching("((((Name = 'beta'))))"), v(&["beta"]));
    assert_eq!(matching("NOT (NOT (Name = 'beta'))"), v(&["beta"]));
}

#[test]
fn mixing_logic_without_parentheses_is_refused_like_salesforce() {
    for (soql, token, pos) in [
        (
            "SELECT Id FROM Account WHERE Name = 'a' AND Name = 'b' OR Name = 'c'",
            "OR",
            56,
        ),
        (
            "SELECT Id FROM Account WHERE Name = 'a' OR Name = 'b' AND Name = 'c'",
            "AND",
            55,
        ),
        (
            "SELECT Id FROM Account WHERE Name = 'a' AND NOT Name = 'b'",
            "NOT",
            45,
        ),
        (
            "SELECT Id FROM Account WHERE NOT Name = 'a' AND Name = 'b'",
            "AND",
            45,
        ),
        ("SELECT Id FROM Account WHERE NOT NOT Name = 'a'", "NOT", 34),
    ] {
        let e = err(soql);
        assert_eq!(e.code, MALFORMED_QUERY, "{soql}");
        assert!(
            e.message.contains(&format!("'{token}' at position {pos}")),
            "{soql}: {e}"
        );
    }
}

#[test]
fn order_by_nulls_and_direction() {
    // ASC defaults to NULLS FIRST; ties keep input order (stable).
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY NumberOfEmployees"),
        vec!["Zeta_1%", "acme corp", "Acme", "beta"]
    );
    // DESC defaults to NULLS LAST.
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY NumberOfEmployees DESC"),
        vec!["Acme", "beta", "acme corp", "Zeta_1%"]
    );
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY NumberOfEmployees ASC NULLS LAST"),
        vec!["acme corp", "Acme", "beta", "Zeta_1%"]
    );
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY NumberOfEmployees DESC NULLS FIRST"),
        vec!["Zeta_1%", "Acme", "beta", "acme corp"]
    );
    // Multiple keys; text ignores case.
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY NumberOfEmployees DESC, Name DESC"),
        vec!["beta", "Acme", "acme corp", "Zeta_1%"]
    );
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY Name"),
        vec!["Acme", "acme corp", "beta", "Zeta_1%"]
    );
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY CreatedDate DESC"),
        vec!["Zeta_1%", "acme corp", "Acme", "beta"]
    );
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY LastActivityDate, Name"),
        vec!["acme corp", "Zeta_1%", "Acme", "beta"]
    );
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY IsPartner DESC, Id DESC"),
        vec!["beta", "Acme", "Zeta_1%", "acme corp"]
    );
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY AnnualRevenue"),
        vec!["acme corp", "beta", "Zeta_1%", "Acme"]
    );
}

#[test]
fn limit_applies_after_sorting() {
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY Name DESC LIMIT 2"),
        vec!["Zeta_1%", "beta"]
    );
    assert_eq!(names("SELECT Name FROM Account LIMIT 3").len(), 3);
    assert_eq!(names("SELECT Name FROM Account LIMIT 0").len(), 0);
    assert_eq!(
        names("SELECT Name FROM Account WHERE IsPartner = true LIMIT 100"),
        vec!["Acme", "beta"]
    );
    for (bad, pos) in [
        ("LIMIT -1", 30),
        ("LIMIT 1.5", 30),
        ("LIMIT x", 30),
        ("LIMIT", 29),
    ] {
        let e = err(&format!("SELECT Id FROM Account {bad}"));
        assert_eq!(e.code, MALFORMED_QUERY);
        assert!(
            e.message.contains(&format!("position {pos}")) && e.message.contains("after LIMIT"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn count() {
    let q = bound("SELECT COUNT() FROM Account WHERE IsPartner = true");
    assert!(q.count_only);
    assert!(q.fields.is_empty());
    let data = accounts();
    assert_eq!(q.run(data.iter()).len(), 2);
    assert!(q.project(&account(), &data[0]).is_empty());
    assert_eq!(
        bound("select count() from account limit 3")
            .run(data.iter())
            .len(),
        3
    );
    let e = err("SELECT COUNT(), Name FROM Account");
    assert_eq!(e.code, MALFORMED_QUERY);
    assert!(e.message.contains("COUNT() at position 8"), "{e}");
}

#[test]
fn projection_in_select_order_with_addresses() {
    let d = account();
    let data = accounts();
    let q = bound("SELECT name, BillingAddress, NumberOfEmployees, Fax FROM Account");
    let p = q.project(&d, &data[0]);
    assert_eq!(p.keys().count(), 4);
    assert_eq!(p["Name"], json!("Acme"));
    assert_eq!(p["NumberOfEmployees"], json!(100));
    assert_eq!(p["Fax"], J::Null);
    assert_eq!(
        p["BillingAddress"],
        json!({"street": "1 rue de Rivoli", "city": "Paris", "state": null,
               "postalCode": null, "country": "France", "latitude": 48.85,
               "longitude": null, "geocodeAccuracy": null})
    );
    let p = q.project(&d, &data[1]);
    assert_eq!(p["BillingAddress"], J::Null);
    assert_eq!(
        q.fields,
        vec!["Name", "BillingAddress", "NumberOfEmployees", "Fax"]
    );
}

#[test]
fn unsupported_features_are_named() {
    for (soql, what) in [
        ("SELECT Id FROM Account WITH SECURITY_ENFORCED", "WITH"),
        ("SELECT Id FROM Account FOR UPDATE", "FOR "),
        ("SELECT Id FROM Account USING SCOPE mine", "USING SCOPE"),
        (
            "SELECT Name, COUNT(Id) FROM Account GROUP BY ROLLUP(Name)",
            "ROLLUP",
        ),
        (
            "SELECT Id, (SELECT Id FROM Contacts WHERE Id IN (SELECT Id FROM Contact)) \
             FROM Account",
            "subquery",
        ),
        (
            "SELECT Id FROM Account WHERE Id IN (SELECT AccountId FROM Contact)",
            "subquery",
        ),
        (
            "SELECT TYPEOF What WHEN Account THEN Name END FROM Event",
            "TYPEOF",
        ),
        (
            "SELECT Id FROM Account WHERE CALENDAR_YEAR(CreatedDate) = 2024",
            "CALENDAR_YEAR()",
        ),
        (
            "SELECT Id FROM Account WHERE CreatedDate = SOMEDAY",
            "'SOMEDAY'",
        ),
        ("SELECT Id FROM Account WHERE Id IN :ids", "bind variable"),
        ("SELECT Id FROM Account WHERE Name = :name", "bind variable"),
        (
            "SELECT Id FROM Account WHERE Type INCLUDES ('a')",
            "INCLUDES",
        ),
        ("SELECT Id FROM Account a", "object alias 'a'"),
        ("SELECT Id FROM Account, Contact", "several objects"),
    ] {
        let e = err(soql);
        assert_eq!(e.code, MALFORMED_QUERY, "{soql}");
        assert!(
            e.message.contains(what) && e.message.contains("not supported"),
            "{soql}: {e}"
        );
        assert!(e.message.contains("position"), "{soql}: {e}");
    }
}

#[test]
fn syntax_errors_say_what_and_where() {
    for (soql, needle) in [
        (
            "SELECT Id FORM Account",
            "unexpected token 'FORM' at position 11, expected FROM",
        ),
        (
            "SELECT Id FROM",
            "unexpected end of query at position 15, expected an object name",
        ),
        ("", "unexpected end of query at position 1, expected SELECT"),
        (
            "DELETE FROM Account",
            "unexpected token 'DELETE' at position 1",
        ),
        (
            "SELECT FROM Account",
            "unexpected token 'FROM' at position 8, expected a field name",
        ),
        (
            "SELECT Id, FROM Account",
            "unexpected token 'FROM' at position 12",
        ),
        (
            "SELECT Id FROM Account WHERE",
            "unexpected end of query at position 29",
        ),
        (
            "SELECT Id FROM Account WHERE Name",
            "position 34, expected a comparison operator",
        ),
        (
            "SELECT Id FROM Account WHERE Name =",
            "position 36, expected a literal value",
        ),
        (
            "SELECT Id FROM Account WHERE (Name = 'a'",
            "position 41, expected ')'",
        ),
        (
            "SELECT Id FROM Account WHERE Name = 'a' LIMIT 1 ORDER BY Name",
            "'ORDER' at position 49",
        ),
        (
            "SELECT Id FROM Account WHERE Name = 'abc",
            "unterminated string literal starting at position 37",
        ),
        (
            "SELECT Id FROM Account ORDER BY Name NULLS",
            "expected FIRST or LAST",
        ),
        (
            "SELECT Id FROM Account;",
            "unexpected token ';' at position 23, expected end of query",
        ),
        (
            "SELECT Id, id FROM Account",
            "duplicate field selected: id (at position 12)",
        ),
        (
            "SELECT Id FROM Account WHERE Name = 'a' ORDER Name",
            "'ORDER' at position 41",
        ),
    ] {
        let e = err(soql);
        assert_eq!(e.code, MALFORMED_QUERY, "{soql}");
        assert!(e.message.contains(needle), "{soql}: {e}");
    }
    let deep = format!(
        "SELECT Id FROM Account WHERE {}Name = 'a'{}",
        "(".repeat(500),
        ")".repeat(500)
    );
    let e = err(&deep);
    assert!(e.message.contains("nested"), "{e}");
}

#[test]
fn unknown_and_unusable_fields() {
    for soql in [
        "SELECT Id, Foo FROM Account",
        "SELECT Id FROM Account WHERE Foo = 'x'",
        "SELECT Id FROM Account ORDER BY Foo",
    ] {
        let e = err(soql);
        assert_eq!(e.code, INVALID_FIELD, "{soql}");
        assert!(
            e.message
                .starts_with("No such column 'Foo' on entity 'Account'."),
            "{soql}: {e}"
        );
    }
    let e = err("SELECT Id FROM Account WHERE BillingAddress = null");
    assert_eq!(e.code, INVALID_FIELD);
    assert_eq!(
        e.message,
        "field 'BillingAddress' can not be filtered in a query call"
    );
    let e = err("SELECT Id FROM Account WHERE description LIKE '%x%'");
    assert_eq!(
        e.message,
        "field 'Description' can not be filtered in a query call"
    );
    let e = err("SELECT Id FROM Account ORDER BY billingaddress");
    assert_eq!(
        e.message,
        "field 'BillingAddress' can not be sorted in a query call"
    );
    let e = err("SELECT Id FROM Account WHERE Name = 5");
    assert_eq!(e.code, INVALID_FIELD);
    assert_eq!(
        e.message,
        "value of filter criterion for field 'Name' must be of type string and should be \
         enclosed in quotes"
    );
    let e = err("SELECT Id FROM Account WHERE NumberOfEmployees = '5'");
    assert_eq!(
        e.message,
        "value of filter criterion for field 'NumberOfEmployees' must be of type integer and \
         should not be enclosed in quotes"
    );
}

#[test]
fn invalid_type() {
    let e = super::invalid_type("Foo");
    assert_eq!(e.code, INVALID_TYPE);
    assert!(
        e.message
            .starts_with("sObject type 'Foo' is not supported."),
        "{e}"
    );
    let mut q = parse("SELECT Id FROM Foo").expect("parses");
    let e = q.bind(&account()).expect_err("wrong object");
    assert_eq!(e.code, INVALID_TYPE);
    assert!(e.message.contains("'Foo'"), "{e}");
}

#[test]
fn failed_bind_leaves_the_query_unchanged() {
    let mut q = parse("SELECT name FROM account WHERE Nope = 1").expect("parses");
    assert!(q.bind(&account()).is_err());
    assert_eq!(q.object, "account");
    assert_eq!(q.fields, vec!["name"]);
}

#[test]
fn other_objects_bind_too() {
    let d = opportunity();
    let mut q = parse(
        "SELECT Name, Amount FROM opportunity WHERE CloseDate >= 2024-01-01 AND \
         Probability > 50 AND StageName IN ('Closed Won') ORDER BY Amount DESC",
    )
    .expect("parses");
    q.bind(&d).expect("binds");
    let data = [
        rec(json!({"Name": "a", "Amount": 10, "Probability": 90,
                   "CloseDate": "2024-05-01", "StageName": "closed won"})),
        rec(json!({"Name": "b", "Amount": 20, "Probability": 90,
                   "CloseDate": "2023-05-01", "StageName": "Closed Won"})),
        rec(json!({"Name": "c", "Amount": 30, "Probability": 60,
                   "CloseDate": "2024-01-01", "StageName": "Closed Won"})),
    ];
    let got: Vec<_> = q
        .run(data.iter())
        .iter()
        .map(|r| r["Name"].clone())
        .collect();
    assert_eq!(got, vec![json!("c"), json!("a")]);
}

#[test]
fn unbound_queries_compare_by_literal_type() {
    let q = parse(
        "SELECT Name FROM Account WHERE name = 'ACME' OR NumberOfEmployees > 50 \
                   ORDER BY NumberOfEmployees DESC",
    )
    .expect("parses");
    let data = accounts();
    let got: Vec<_> = q
        .run(data.iter())
        .iter()
        .map(|r| r["Name"].clone())
        .collect();
    assert_eq!(got, vec![json!("Acme"), json!("beta")]);
    assert_eq!(q.project(&account(), &data[3])["Name"], json!("beta"));
}

/// Words and fragments that push random input deep into the grammar.
fn soup_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("SELECT ".to_string()),
        Just("FROM ".to_string()),
        Just("Account ".to_string()),
        Just("WHERE ".to_string()),
        Just("ORDER BY ".to_string()),
        Just("LIMIT ".to_string()),
        Just("AND ".to_string()),
        Just("OR ".to_string()),
        Just("NOT ".to_string()),
        Just("IN ".to_string()),
        Just("LIKE ".to_string()),
        Just("NULLS LAST ".to_string()),
        Just("COUNT() ".to_string()),
        Just("Name ".to_string()),
        Just("CreatedDate ".to_string()),
        Just("BillingAddress ".to_string()),
        Just("Id ".to_string()),
        Just(", ".to_string()),
        Just("( ".to_string()),
        Just(") ".to_string()),
        Just("= ".to_string()),
        Just("<= ".to_string()),
        Just("!= ".to_string()),
        Just("null ".to_string()),
        Just("'a%_\\'' ".to_string()),
        Just("-12.5 ".to_string()),
        Just("2024-02-29 ".to_string()),
        Just("2024-01-31T10:00:00.000+0000 ".to_string()),
        Just("2024-01-31T10:00:00+01:00".to_string()),
        "[ -~]{0,3}",
    ]
}

fn check_no_panic(s: &str) {
    let data = accounts();
    if let Ok(mut q) = parse(s) {
        let _ = q.run(data.iter());
        let _ = q.bind(&account());
        let mut out = q.run(data.iter());
        q.sort(&mut out);
        for r in &data {
            let _ = q.project(&account(), r);
            let _ = q.matches(r);
        }
    }
}

proptest! {
    #[test]
    fn garbage_never_panics(s in ".*") {
        check_no_panic(&s);
    }

    #[test]
    fn token_soup_never_panics(parts in proptest::collection::vec(soup_piece(), 0..24)) {
        check_no_panic(&parts.concat());
        check_no_panic(&format!("SELECT Name FROM Account WHERE {}", parts.concat()));
    }
}

#[test]
fn offset_skips_sorted_rows_before_limit_up_to_2000() {
    let all = names("SELECT Name FROM Account ORDER BY Name");
    assert!(all.len() >= 3, "{all:?}");
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY Name OFFSET 1"),
        all[1..].to_vec()
    );
    assert_eq!(
        names("SELECT Name FROM Account ORDER BY Name LIMIT 1 OFFSET 1"),
        all[1..2].to_vec()
    );
    // Without ORDER BY too (id order), and past the end.
    let by_id = names("SELECT Name FROM Account");
    assert_eq!(
        names("SELECT Name FROM Account LIMIT 2 OFFSET 1"),
        by_id[1..3].to_vec()
    );
    assert!(names("SELECT Name FROM Account OFFSET 2000").is_empty());
    let e = err("SELECT Name FROM Account OFFSET 2001");
    assert_eq!(e.code, "NUMBER_OUTSIDE_VALID_RANGE");
    assert_eq!(
        err("SELECT Name FROM Account OFFSET x").code,
        MALFORMED_QUERY
    );
    assert_eq!(
        err("SELECT Name FROM Account OFFSET 1 LIMIT 1").code,
        MALFORMED_QUERY,
        "OFFSET comes after LIMIT"
    );
}

/// Names of the accounts a WHERE clause selects with relative dates read at `now`.
fn matching_at(where_clause: &str, now: &str) -> Vec<String> {
    let now_ms = crate::model::time::datetime_ms(now).expect("now");
    let soql = format!("SELECT Name FROM Account WHERE {where_clause}");
    let mut q = parse_at(&soql, now_ms).unwrap_or_else(|e| panic!("{soql}: {e}"));
    q.bind(&account()).unwrap_or_else(|e| panic!("{soql}: {e}"));
    let data = accounts();
    let mut n: Vec<String> = q
        .run(data.iter())
        .iter()
        .map(|r| r.get("Name").and_then(J::as_str).unwrap_or("?").to_string())
        .collect();
    n.sort();
    n
}

#[test]
fn relative_date_literals_are_ranges_at_the_given_moment() {
    // CreatedDate: Acme 2024-01-10, acme corp 2024-01-31, Zeta 2024-02-01, beta 2023-06-01.
    let now = "2024-02-01T12:00:00.000+0000";
    assert_eq!(matching_at("CreatedDate = TODAY", now), v(&["Zeta_1%"]));
    assert_eq!(
        matching_at("CreatedDate = YESTERDAY", now),
        v(&["acme corp"])
    );
    assert_eq!(
        matching_at("CreatedDate = LAST_MONTH", now),
        v(&["Acme", "acme corp"])
    );
    assert_eq!(
        matching_at("CreatedDate = LAST_N_DAYS:1", now),
        v(&["Zeta_1%", "acme corp"])
    );
    assert_eq!(matching_at("CreatedDate < THIS_YEAR", now), v(&["beta"]));
    assert_eq!(
        matching_at("CreatedDate >= LAST_N_DAYS:30", now),
        v(&["Acme", "Zeta_1%", "acme corp"])
    );
    assert_eq!(
        matching_at("CreatedDate > YESTERDAY", now),
        v(&["Zeta_1%"]),
        "after the range, not after its start"
    );
    assert_eq!(matching_at("CreatedDate != THIS_YEAR", now), v(&["beta"]));
    assert_eq!(
        matching_at("CreatedDate IN (TODAY, LAST_YEAR)", now),
        v(&["Zeta_1%", "beta"])
    );
    // Date fields too: LastActivityDate 2024-01-31 (Acme), 2023-12-01 (Zeta), 2024-02-29 (beta).
    assert_eq!(
        matching_at("LastActivityDate = LAST_MONTH", now),
        v(&["Acme"])
    );
    assert_eq!(
        matching_at("LastActivityDate = THIS_MONTH", now),
        v(&["beta"])
    );
    assert_eq!(
        matching_at("LastActivityDate = LAST_N_MONTHS:3", now),
        v(&["Acme", "Zeta_1%"])
    );
    // Refusals: a text field, a missing number, an unknown literal.
    assert_eq!(
        err("SELECT Id FROM Account WHERE Name = TODAY").code,
        INVALID_FIELD
    );
    assert_eq!(
        err("SELECT Id FROM Account WHERE CreatedDate = LAST_N_DAYS").code,
        MALFORMED_QUERY
    );
    assert_eq!(
        err("SELECT Id FROM Account WHERE CreatedDate = LAST_N_DAYS:x").code,
        MALFORMED_QUERY
    );
}

#[test]
fn fields_function_expands_in_describe_order_with_its_limit_rule() {
    let d = account();
    let q = bound("SELECT FIELDS(ALL) FROM Account LIMIT 200");
    let all: Vec<String> = d.fields.iter().map(|f| f.name.clone()).collect();
    assert_eq!(q.fields, all);
    let q = bound("SELECT FIELDS(STANDARD) FROM Account");
    assert!(
        q.fields
            .iter()
            .all(|n| d.field(n).is_some_and(|f| !f.custom))
    );
    assert_eq!(q.fields.first().map(String::as_str), Some("Id"));
    // A field named as well is not selected twice.
    let q = bound("SELECT Name, FIELDS(STANDARD) FROM Account");
    assert_eq!(q.fields.iter().filter(|n| *n == "Name").count(), 1);
    assert_eq!(q.fields.first().map(String::as_str), Some("Name"));
    for bad in [
        "SELECT FIELDS(ALL) FROM Account",
        "SELECT FIELDS(CUSTOM) FROM Account LIMIT 201",
        "SELECT FIELDS(SOME) FROM Account LIMIT 1",
    ] {
        assert_eq!(err(bad).code, MALFORMED_QUERY, "{bad}");
    }
}
