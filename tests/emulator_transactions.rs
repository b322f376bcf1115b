//! All-or-none requests roll back as Salesforce rolls a transaction back: when a later part
//! fails, what the earlier parts created, changed or deleted is undone, and no change event
//! of theirs ever reaches the bus.

use crate::emulator_rest::{Api, start};
use reqwest::{Method, StatusCode};
use serde_json::{Value as J, json};

fn acct(name: &str) -> J {
    json!({"attributes": {"type": "Account"}, "Name": name})
}

async fn create(api: &Api, name: &str) -> String {
    let a = api.post("/sobjects/Account", &json!({"Name": name})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    a.json()["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_roll_back_earlier_records_and_their_events() {
    let (emulator, api) = start().await;
    let kept = create(&api, "Kept").await;
    let tip = emulator.org.bus.tip();
    let accounts = emulator.org.records("Account").len();

    // The second record fails: the first, already created, is rolled back without an id.
    let a = api
        .post(
            "/composite/sobjects",
            &json!({"allOrNone": true, "records": [acct("One"),
                    {"attributes": {"type": "Account"}, "Nope__c": 1}]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let r = a.json();
    assert_eq!(r[0]["success"], false);
    assert_eq!(
        r[0]["errors"][0]["statusCode"],
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    );
    assert!(r[0].get("id").is_none(), "{r}");
    assert_eq!(r[1]["errors"][0]["statusCode"], "INVALID_FIELD");
    assert_eq!(emulator.org.records("Account").len(), accounts);

    // Update: the first change is undone when the second id is unknown.
    let a = api
        .send(
            api.request(Method::PATCH, "/composite/sobjects")
                .json(&json!({
                "allOrNone": true,
                "records": [
                    {"attributes": {"type": "Account"}, "id": kept, "Phone": "555"},
                    {"attributes": {"type": "Account"}, "id": "001000000000000AAA", "Phone": "1"},
                ]})),
        )
        .await
        .json();
    assert_eq!(
        a[0]["errors"][0]["statusCode"],
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    );
    assert_eq!(a[0]["id"], kept.as_str());
    let record = emulator.org.get("Account", &kept).expect("kept");
    assert_eq!(
        record.get("Phone").unwrap_or(&J::Null),
        &J::Null,
        "the update was rolled back"
    );

    // Delete: the same id twice deletes it, then fails; the delete is undone.
    let a = api
        .send(api.request(
            Method::DELETE,
            &format!("/composite/sobjects?ids={kept},{kept}&allOrNone=true"),
        ))
        .await
        .json();
    assert_eq!(
        a[0]["errors"][0]["statusCode"],
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    );
    assert_eq!(a[1]["errors"][0]["statusCode"], "ENTITY_IS_DELETED");
    assert!(emulator.org.get("Account", &kept).is_ok(), "not deleted");

    assert_eq!(
        emulator.org.bus.tip(),
        tip,
        "no change event of a rolled-back request is published"
    );

    // Without allOrNone the same requests keep what succeeded, with its events.
    let a = api
        .post(
            "/composite/sobjects",
            &json!({"records": [acct("Two"), {"attributes": {"type": "Account"}, "Nope__c": 1}]}),
        )
        .await
        .json();
    assert_eq!(a[0]["success"], true);
    assert!(emulator.org.bus.tip() > tip);
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_rolls_back_subrequests_that_ran_before_a_failure() {
    let (emulator, api) = start().await;
    let tip = emulator.org.bus.tip();
    let a = api
        .post(
            "/composite",
            &json!({"allOrNone": true, "compositeRequest": [
                {"method": "POST", "url": "/services/data/v62.0/sobjects/Account",
                 "referenceId": "acct", "body": {"Name": "Rolled back"}},
                {"method": "POST", "url": "/services/data/v62.0/sobjects/Contact",
                 "referenceId": "ct", "body": {"LastName": "X", "AccountId": "@{acct.id}",
                                               "Nope__c": 1}},
                {"method": "GET", "url": "/services/data/v62.0/limits", "referenceId": "after"},
            ]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let r = a.json()["compositeResponse"].clone();
    assert_eq!(r[0]["httpStatusCode"], 400, "{r}");
    assert_eq!(r[0]["body"][0]["errorCode"], "PROCESSING_HALTED");
    assert_eq!(r[1]["httpStatusCode"], 400);
    assert_eq!(r[1]["body"][0]["errorCode"], "INVALID_FIELD");
    assert_eq!(r[2]["body"][0]["errorCode"], "PROCESSING_HALTED");
    assert!(
        emulator.org.records("Account").is_empty(),
        "the account is gone"
    );
    assert_eq!(emulator.org.bus.tip(), tip, "and its event never published");

    // All succeed: kept, with their events in order.
    let a = api
        .post(
            "/composite",
            &json!({"allOrNone": true, "compositeRequest": [
                {"method": "POST", "url": "/services/data/v62.0/sobjects/Account",
                 "referenceId": "acct", "body": {"Name": "Kept"}},
                {"method": "PATCH", "url": "/services/data/v62.0/sobjects/Account/@{acct.id}",
                 "referenceId": "upd", "body": {"Phone": "1"}},
            ]}),
        )
        .await
        .json();
    assert_eq!(a["compositeResponse"][1]["httpStatusCode"], 204, "{a}");
    assert_eq!(emulator.org.records("Account").len(), 1);
    assert!(emulator.org.bus.tip() > tip);
    emulator.stop().await;
}
