//! The emulator's SOQL beyond one object, as a REST or Bulk API 2.0 client sees it:
//! child-to-parent relationship fields as nested records, parent-to-child subqueries as nested
//! query results, aggregate queries as `AggregateResult`s, and what Bulk API 2.0 takes and
//! refuses.

use crate::emulator_rest::{Api, V, start};
use reqwest::{Method, StatusCode};
use serde_json::{Value as J, json};

/// Two accounts (Acme with two contacts, Beta with none) and a contact without an account.
async fn seed(api: &Api) -> (Vec<String>, Vec<String>) {
    let accounts = api
        .seed(
            "Account",
            vec![
                json!({"Name": "Acme", "Industry": "Energy"}),
                json!({"Name": "Beta"}),
            ],
        )
        .await;
    let contacts = api
        .seed(
            "Contact",
            vec![
                json!({"LastName": "Ames", "AccountId": accounts[0]}),
                json!({"LastName": "Bell", "AccountId": accounts[0]}),
                json!({"LastName": "Cole"}),
            ],
        )
        .await;
    (accounts, contacts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relationship_fields_are_nested_records_or_null() {
    let (emulator, api) = start().await;
    let (accounts, contacts) = seed(&api).await;
    let a = api
        .query(
            "query/",
            "SELECT Id, Account.Name, LastName FROM Contact ORDER BY LastName",
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let acme = &accounts[0];
    // Written as Salesforce writes it: the parent where its first field is selected,
    // `attributes` first.
    let first = format!(
        r#"{{"attributes":{{"type":"Contact","url":"/services/data/{V}/sobjects/Contact/{c}"}},"Id":"{c}","Account":{{"attributes":{{"type":"Account","url":"/services/data/{V}/sobjects/Account/{acme}"}},"Name":"Acme"}},"LastName":"Ames"}}"#,
        c = contacts[0]
    );
    assert!(a.body.contains(&first), "{}", a.body);
    let records = a.json()["records"].clone();
    assert_eq!(records[2]["LastName"], "Cole");
    assert_eq!(records[2]["Account"], J::Null, "an empty reference is null");

    // In WHERE and ORDER BY too, and through queryAll.
    let a = api
        .query(
            "queryAll",
            "SELECT LastName FROM Contact WHERE Account.Industry = 'energy' \
             ORDER BY Account.Name DESC, LastName DESC",
        )
        .await
        .json();
    assert_eq!(a["totalSize"], 2);
    assert_eq!(a["records"][0]["LastName"], "Bell");
    let a = api
        .query(
            "query",
            "SELECT COUNT() FROM Contact WHERE Account.Name = null",
        )
        .await
        .json();
    assert_eq!(a["totalSize"], 1);
    assert_eq!(a["records"], json!([]));

    // Later pages carry the nesting too.
    let many: Vec<J> = (0..250)
        .map(|n| json!({"LastName": format!("Z{n:03}"), "AccountId": accounts[1]}))
        .collect();
    api.seed("Contact", many).await;
    let first = api
        .send(
            api.request(Method::GET, "/query")
                .query(&[(
                    "q",
                    "SELECT LastName, Account.Name FROM Contact WHERE LastName LIKE 'Z%'",
                )])
                .header("Sforce-Query-Options", "batchSize=200"),
        )
        .await
        .json();
    assert_eq!(first["done"], false);
    let next = first["nextRecordsUrl"].as_str().expect("next page");
    let second = api.get(next).await.json();
    assert_eq!(second["records"].as_array().map(Vec::len), Some(50));
    assert_eq!(second["records"][0]["Account"]["Name"], "Beta");

    // A custom relationship: Account__c is Account__r.
    let invoice = api
        .post(
            "/sobjects/Invoice__c",
            &json!({"Name": "INV-1", "Account__c": acme}),
        )
        .await;
    assert_eq!(invoice.status, StatusCode::CREATED, "{}", invoice.body);
    let a = api
        .query(
            "query",
            "SELECT Name, Account__r.Name, Account__r.Industry FROM Invoice__c",
        )
        .await
        .json();
    assert_eq!(a["records"][0]["Account__r"]["Name"], "Acme", "{a}");
    assert_eq!(
        a["records"][0]["Account__r"]["attributes"]["type"], "Account",
        "{a}"
    );

    for (soql, code) in [
        ("SELECT Accounts.Name FROM Contact", "INVALID_FIELD"),
        ("SELECT Account.Nope FROM Contact", "INVALID_FIELD"),
        // The built-in org has no User object for Owner to reach.
        ("SELECT Owner.Name FROM Account", "INVALID_FIELD"),
    ] {
        api.query("query", soql).await.assert_error(400, code);
    }
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subqueries_nest_query_results_or_null() {
    let (emulator, api) = start().await;
    let (accounts, contacts) = seed(&api).await;
    let a = api
        .query(
            "query",
            "SELECT Name, (SELECT LastName, Account.Name FROM Contacts ORDER BY LastName DESC) \
             FROM Account ORDER BY Name",
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let expected = format!(
        r#""Name":"Acme","Contacts":{{"totalSize":2,"done":true,"records":[{{"attributes":{{"type":"Contact","url":"/services/data/{V}/sobjects/Contact/{bell}"}},"LastName":"Bell","Account":{{"attributes":{{"type":"Account","url":"/services/data/{V}/sobjects/Account/{acme}"}},"Name":"Acme"}}}}"#,
        bell = contacts[1],
        acme = accounts[0],
    );
    assert!(a.body.contains(&expected), "{}", a.body);
    let body = a.json();
    assert_eq!(body["totalSize"], 2, "children are not counted");
    assert_eq!(body["records"][1]["Name"], "Beta");
    assert_eq!(
        body["records"][1]["Contacts"],
        J::Null,
        "no children is null"
    );

    // Compound fields of the children come as REST's nested objects.
    api.send(
        api.request(Method::PATCH, &format!("/sobjects/Contact/{}", contacts[0]))
            .json(&json!({"MailingCity": "Lyon"})),
    )
    .await;
    let compound = api
        .query(
            "query",
            "SELECT Name, (SELECT MailingAddress FROM Contacts ORDER BY LastName) FROM Account \
             WHERE Name = 'Acme'",
        )
        .await
        .json();
    let kids = &compound["records"][0]["Contacts"]["records"];
    assert_eq!(kids[0]["MailingAddress"]["city"], "Lyon", "{compound}");
    assert_eq!(kids[1]["MailingAddress"], J::Null, "{compound}");

    let limited = api
        .query(
            "query",
            "SELECT Id, (SELECT Id FROM Contacts WHERE LastName != 'Ames' LIMIT 1) FROM Account \
             WHERE Name = 'Acme'",
        )
        .await
        .json();
    assert_eq!(limited["records"][0]["Contacts"]["totalSize"], 1);
    api.query("query", "SELECT Id, (SELECT Id FROM Nothings) FROM Account")
        .await
        .assert_error(400, "INVALID_TYPE");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_answer_aggregate_results() {
    let (emulator, api) = start().await;
    seed(&api).await;
    let a = api
        .query(
            "query",
            "SELECT Account.Name, COUNT(Id) n, MAX(LastName) FROM Contact \
             GROUP BY Account.Name HAVING COUNT(Id) > 0 ORDER BY Account.Name",
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(
        a.body.contains(
            r#"{"attributes":{"type":"AggregateResult"},"Name":"Acme","n":2,"expr0":"Bell"}"#
        ),
        "{}",
        a.body
    );
    let body = a.json();
    assert_eq!(body["totalSize"], 2);
    assert_eq!(body["done"], true);
    assert_eq!(body["records"][0]["Name"], J::Null);

    let one = api
        .query(
            "query",
            "SELECT COUNT(Id), COUNT_DISTINCT(AccountId) FROM Contact",
        )
        .await
        .json();
    assert_eq!(one["records"][0]["expr0"], 3);
    assert_eq!(one["records"][0]["expr1"], 1);
    api.query("query", "SELECT LastName, COUNT(Id) FROM Contact")
        .await
        .assert_error(400, "MALFORMED_QUERY");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_takes_relationship_fields_and_refuses_the_rest() {
    let (emulator, api) = start().await;
    let (accounts, contacts) = seed(&api).await;
    let job = |query: &str| json!({"operation": "query", "query": query});
    let created = api
        .create_job(job(
            "SELECT Id, Account.Name FROM Contact WHERE CreatedDate = TODAY ORDER BY LastName",
        ))
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let id = created.json()["id"].as_str().expect("id").to_string();
    api.wait_job(&id).await;
    let csv = api.get(&format!("/jobs/query/{id}/results")).await;
    assert_eq!(
        csv.body,
        format!(
            "\"Id\",\"Account.Name\"\n\"{}\",\"Acme\"\n\"{}\",\"Acme\"\n\"{}\",\"\"\n",
            contacts[0], contacts[1], contacts[2]
        )
    );
    // Datetimes through a relationship are written like any datetime column.
    let created = api
        .create_job(job(
            "SELECT Account.CreatedDate FROM Contact WHERE Account.Name = 'Acme'",
        ))
        .await
        .json();
    let id = created["id"].as_str().expect("id").to_string();
    api.wait_job(&id).await;
    let csv = api.get(&format!("/jobs/query/{id}/results")).await.body;
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("\"Account.CreatedDate\""));
    assert!(
        lines.all(|l| l.ends_with(".000Z\"")),
        "UTC with Z: {csv} (accounts {accounts:?})"
    );

    // The Bulk API 2.0 guide's list of what a query job does not take.
    for (query, needle) in [
        (
            "SELECT Name, COUNT(Id) FROM Account GROUP BY Name",
            "GROUP BY",
        ),
        ("SELECT Id FROM Account OFFSET 5", "OFFSET"),
        ("SELECT MAX(Name) FROM Account", "Aggregate"),
        ("SELECT COUNT() FROM Account", "COUNT()"),
        (
            "SELECT Id, (SELECT Id FROM Contacts) FROM Account",
            "Aggregate Relationships not supported in Bulk V2 Query",
        ),
        (
            "SELECT TYPEOF What WHEN Account THEN Name END FROM Event",
            "TYPEOF",
        ),
    ] {
        let refused = api.create_job(job(query)).await;
        refused.assert_error(400, "FUNCTIONALITY_NOT_ENABLED");
        assert!(refused.body.contains(needle), "{query}: {}", refused.body);
    }

    // A query the org can no longer run when the job runs: the job fails with the reason.
    let created = api
        .create_job(job("SELECT Id, Memo__c FROM Invoice__c"))
        .await
        .json();
    let id = created["id"].as_str().expect("id").to_string();
    emulator
        .org
        .remove_field("Invoice__c", "Memo__c")
        .expect("field removed");
    let info = api.get(&format!("/jobs/query/{id}")).await.json();
    assert_eq!(info["state"], "Failed", "{info}");
    let message = info["errorMessage"].as_str().expect("errorMessage");
    assert!(message.contains("No such column 'Memo__c'"), "{message}");
    api.get(&format!("/jobs/query/{id}/results"))
        .await
        .assert_error(400, "INVALIDJOBSTATE");
    emulator.stop().await;
}
