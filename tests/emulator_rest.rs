//! The emulator's REST read side as a client sees it: `query` / `queryAll` with locators,
//! sObject Collections retrieve, `limits`, and Bulk API 2.0 query jobs with CSV results.
//! Every response is checked for `Sforce-Limit-Info`.

use crate::common;
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value as J, json};
use sfmirror::demo::RestWriter;
use sfmirror::emulator::Emulator;

pub(crate) const V: &str = "v62.0";

pub(crate) struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) token: String,
}

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn json(&self) -> J {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    /// Asserts a Salesforce error: the status and `[{"message", "errorCode"}]`.
    pub(crate) fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.body);
        let body = self.json();
        let first = &body[0];
        assert_eq!(first["errorCode"], code, "{}", self.body);
        assert!(
            first["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.body
        );
    }
}

impl Api {
    pub(crate) fn new(emulator: &Emulator) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: emulator.rest_url.clone(),
            token: emulator.access_token.clone(),
        }
    }

    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = if path.starts_with("/services/") || path.starts_with("/emulator/") {
            format!("{}{path}", self.base)
        } else {
            format!("{}/services/data/{V}{path}", self.base)
        };
        self.http.request(method, url).bearer_auth(&self.token)
    }

    /// Sends and reads the answer; every answer must carry `Sforce-Limit-Info`.
    pub(crate) async fn send(&self, req: RequestBuilder) -> Answer {
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.text().await.expect("body");
        let limit = headers
            .get("sforce-limit-info")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no Sforce-Limit-Info on HTTP {status}: {body}"));
        assert!(limit.starts_with("api-usage="), "{limit}");
        Answer {
            status,
            headers,
            body,
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        self.send(self.request(Method::GET, path)).await
    }

    pub(crate) async fn query(&self, endpoint: &str, soql: &str) -> Answer {
        self.send(
            self.request(Method::GET, &format!("/{endpoint}"))
                .query(&[("q", soql)]),
        )
        .await
    }

    pub(crate) async fn post(&self, path: &str, body: &J) -> Answer {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    /// Creates records without events through the control API: fast seeding.
    pub(crate) async fn seed(&self, object: &str, records: Vec<J>) -> Vec<String> {
        let a = self
            .post(
                "/emulator/gap",
                &json!({"object": object, "change_type": "GAP_CREATE", "create": records}),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.json()["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_str().expect("id").to_string())
            .collect()
    }

    pub(crate) async fn create_job(&self, body: J) -> Answer {
        self.post("/jobs/query", &body).await
    }

    /// Polls the job until JobComplete; returns the states seen.
    pub(crate) async fn wait_job(&self, id: &str) -> Vec<String> {
        let mut seen = Vec::new();
        for _ in 0..10 {
            let a = self.get(&format!("/jobs/query/{id}")).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.body);
            let state = a.json()["state"].as_str().expect("state").to_string();
            seen.push(state.clone());
            if state == "JobComplete" {
                return seen;
            }
        }
        panic!("job {id} never completed: {seen:?}");
    }
}

pub(crate) async fn start() -> (Emulator, Api) {
    let emulator = common::emulator().await;
    let api = Api::new(&emulator);
    (emulator, api)
}

fn names(page: &J, field: &str) -> Vec<String> {
    page["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r[field].as_str().expect("string field").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_pages_follow_locators_over_a_snapshot() {
    let (emulator, api) = start().await;
    let seeded: Vec<J> = (0..450)
        .map(|i| json!({"Name": format!("Acct {i:03}")}))
        .collect();
    let ids = api.seed("Account", seeded).await;
    let soql = "SELECT Name, Id FROM Account ORDER BY Name";

    // batchSize below 200 is raised to 200.
    let first = api
        .send(
            api.request(Method::GET, "/query")
                .query(&[("q", soql)])
                .header("Sforce-Query-Options", "batchSize=50"),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert!(first.header("content-type").starts_with("application/json"));
    let page = first.json();
    assert_eq!(page["totalSize"], 450);
    assert_eq!(page["done"], false);
    assert_eq!(page["records"].as_array().map(Vec::len), Some(200));
    // attributes first, then the fields in SELECT order (Name before Id).
    let record0 = format!(
        r#"{{"attributes":{{"type":"Account","url":"/services/data/{V}/sobjects/Account/{id}"}},"Name":"Acct 000","Id":"{id}"}}"#,
        id = ids[0]
    );
    assert!(first.body.contains(&record0), "{}", &first.body[..300]);
    assert!(
        first
            .body
            .starts_with(r#"{"totalSize":450,"done":false,"nextRecordsUrl":"#),
        "{}",
        &first.body[..100]
    );
    let next = page["nextRecordsUrl"].as_str().expect("nextRecordsUrl");
    let locator = next
        .strip_prefix(&format!("/services/data/{V}/query/"))
        .and_then(|l| l.strip_suffix("-200"))
        .unwrap_or_else(|| panic!("unexpected nextRecordsUrl {next}"));
    assert!(
        locator.starts_with("01g") && locator.len() == 18,
        "{locator}"
    );

    // Records written now are not in the snapshot the locator pages through.
    RestWriter::new(&emulator)
        .create("Account", json!({"Name": "Acct 000 late"}))
        .await
        .expect("create");

    let mut all = names(&page, "Name");
    let second = api.get(next).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);
    let p2 = second.json();
    assert_eq!(p2["totalSize"], 450);
    assert_eq!(p2["done"], false);
    all.extend(names(&p2, "Name"));
    let next2 = p2["nextRecordsUrl"].as_str().expect("next").to_string();
    assert!(next2.ends_with(&format!("{locator}-400")), "{next2}");
    // The queryAll form of the same locator works too.
    let third = api
        .get(&next2.replace("/query/", "/queryAll/"))
        .await
        .json();
    assert_eq!(third["done"], true);
    assert!(third.get("nextRecordsUrl").is_none(), "{third}");
    assert_eq!(third["records"].as_array().map(Vec::len), Some(50));
    all.extend(names(&third, "Name"));
    let expected: Vec<String> = (0..450).map(|i| format!("Acct {i:03}")).collect();
    assert_eq!(all, expected);

    // A locator stays valid: the second page again.
    assert_eq!(api.get(next).await.json(), p2);

    // A fresh query sees the new record; in one page since it is under 2,000.
    let fresh = api.query("query", soql).await.json();
    assert_eq!(fresh["totalSize"], 451);
    assert_eq!(fresh["done"], true);
    assert!(fresh.get("nextRecordsUrl").is_none());

    // Default page size 2,000; larger requests are capped at 2,000.
    api.seed(
        "Account",
        (0..1700)
            .map(|i| json!({"Name": format!("More {i}")}))
            .collect(),
    )
    .await;
    for batch in [None, Some("batchSize=5000")] {
        let mut req = api
            .request(Method::GET, "/query")
            .query(&[("q", "SELECT Id FROM Account")]);
        if let Some(b) = batch {
            req = req.header("Sforce-Query-Options", b);
        }
        let page = api.send(req).await.json();
        assert_eq!(page["totalSize"], 2151);
        assert_eq!(page["records"].as_array().map(Vec::len), Some(2000));
        let next = page["nextRecordsUrl"].as_str().expect("next");
        assert!(next.ends_with("-2000"), "{next}");
        let last = api.get(next).await.json();
        assert_eq!(last["records"].as_array().map(Vec::len), Some(151));
        assert_eq!(last["done"], true);
    }

    // Unknown, malformed and out-of-range locators.
    for bad in [
        "01g5g0000000zzzAAA-200".to_string(),
        "nodash".to_string(),
        format!("{locator}-abc"),
        format!("{locator}-450"),
    ] {
        api.get(&format!("/query/{bad}"))
            .await
            .assert_error(400, "INVALID_QUERY_LOCATOR");
    }
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_all_sees_deleted_records_and_count_counts() {
    let (emulator, api) = start().await;
    let writer = RestWriter::new(&emulator);
    let mut ids = Vec::new();
    for name in ["Alpha", "Beta", "Gamma"] {
        ids.push(
            writer
                .create("Account", json!({"Name": name}))
                .await
                .expect("create"),
        );
    }
    writer.delete("Account", &ids[1]).await.expect("delete");

    let soql = "SELECT Id, Name, IsDeleted FROM Account ORDER BY Name";
    let live = api.query("query", soql).await.json();
    assert_eq!(live["totalSize"], 2);
    assert_eq!(names(&live, "Name"), ["Alpha", "Gamma"]);

    let all = api.query("queryAll", soql).await.json();
    assert_eq!(all["totalSize"], 3);
    assert_eq!(names(&all, "Name"), ["Alpha", "Beta", "Gamma"]);
    let deleted = &all["records"][1];
    assert_eq!(deleted["Id"], ids[1].as_str());
    assert_eq!(deleted["IsDeleted"], true);
    assert_eq!(
        deleted["attributes"]["url"],
        format!("/services/data/{V}/sobjects/Account/{}", ids[1])
    );

    let bin = api
        .query("queryAll", "SELECT Id FROM Account WHERE IsDeleted = true")
        .await
        .json();
    assert_eq!(bin["totalSize"], 1);
    assert_eq!(bin["records"][0]["Id"], ids[1].as_str());

    let count = api.query("query", "SELECT COUNT() FROM Account").await;
    assert_eq!(count.status, StatusCode::OK);
    assert_eq!(count.body, r#"{"totalSize":2,"done":true,"records":[]}"#);
    let count_all = api
        .query("queryAll", "SELECT COUNT() FROM Account")
        .await
        .json();
    assert_eq!(
        count_all,
        json!({"totalSize": 3, "done": true, "records": []})
    );

    // Compound fields come back as nested objects; LIMIT applies.
    writer
        .update("Account", &ids[0], json!({"BillingCity": "Paris"}))
        .await
        .expect("update");
    let nested = api
        .query(
            "query",
            "SELECT BillingAddress, Name FROM Account ORDER BY Name LIMIT 1",
        )
        .await
        .json();
    assert_eq!(nested["totalSize"], 1);
    assert_eq!(nested["records"][0]["BillingAddress"]["city"], "Paris");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_errors_use_salesforce_codes() {
    let (emulator, api) = start().await;
    for (soql, code) in [
        ("SELEKT Id FROM Account", "MALFORMED_QUERY"),
        ("SELECT Id FROM Account WHERE", "MALFORMED_QUERY"),
        ("SELECT Nope__c FROM Account", "INVALID_FIELD"),
        ("SELECT Id FROM Nope__c", "INVALID_TYPE"),
        (
            "SELECT Id FROM Account WHERE NumberOfEmployees LIKE '5'",
            "INVALID_QUERY_FILTER_OPERATOR",
        ),
    ] {
        for endpoint in ["query", "queryAll"] {
            api.query(endpoint, soql).await.assert_error(400, code);
        }
    }
    api.get("/query").await.assert_error(400, "MALFORMED_QUERY");
    api.query("query", "  ")
        .await
        .assert_error(400, "MALFORMED_QUERY");

    // Object names ignore case, like Salesforce.
    let lower = api.query("query", "SELECT id FROM account").await;
    assert_eq!(lower.status, StatusCode::OK, "{}", lower.body);

    // Retired API versions are gone (410, Salesforce's end-of-life policy); versions newer
    // than the newest served are unknown resources.
    for (version, status, code) in [
        ("v9.0", 410, "UNSUPPORTED_API_VERSION"),
        ("v99.0", 404, "NOT_FOUND"),
    ] {
        let a = api
            .send(
                api.http
                    .get(format!("{}/services/data/{version}/query", api.base))
                    .bearer_auth(&api.token)
                    .query(&[("q", "SELECT Id FROM Account")]),
            )
            .await;
        a.assert_error(status, code);
    }

    // Every route needs a session.
    for (method, path) in [
        (Method::GET, "/query?q=SELECT+Id+FROM+Account"),
        (Method::GET, "/queryAll?q=SELECT+Id+FROM+Account"),
        (Method::GET, "/query/01g5g0000000001AAA-2000"),
        (Method::GET, "/composite/sobjects/Account?ids=x&fields=Id"),
        (Method::POST, "/composite/sobjects/Account"),
        (Method::GET, "/limits"),
        (Method::GET, "/jobs/query"),
        (Method::POST, "/jobs/query"),
        (Method::GET, "/jobs/query/7505g0000000001AAA"),
        (Method::GET, "/jobs/query/7505g0000000001AAA/results"),
    ] {
        let url = format!("{}/services/data/{V}{path}", api.base);
        api.send(api.http.request(method.clone(), &url))
            .await
            .assert_error(401, "INVALID_SESSION_ID");
        api.send(api.http.request(method, url).bearer_auth("00D!expired"))
            .await
            .assert_error(401, "INVALID_SESSION_ID");
    }
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_retrieve_answers_in_id_order_with_nulls() {
    let (emulator, api) = start().await;
    let writer = RestWriter::new(&emulator);
    let a = writer
        .create(
            "Account",
            json!({"Name": "Alpha", "BillingCity": "Paris", "NumberOfEmployees": 5}),
        )
        .await
        .expect("create");
    let b = writer
        .create("Account", json!({"Name": "Beta"}))
        .await
        .expect("create");
    let c = writer
        .create("Account", json!({"Name": "Gamma"}))
        .await
        .expect("create");
    writer.delete("Account", &c).await.expect("delete");
    let missing = "001000000000000AAA";

    let answer = api
        .post(
            "/composite/sobjects/Account",
            &json!({
                "ids": [b, c, missing, &a[..15], "garbage"],
                "fields": ["name", "Id", "BillingAddress", "NumberOfEmployees"],
            }),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let first = format!(
        r#"[{{"attributes":{{"type":"Account","url":"/services/data/{V}/sobjects/Account/{b}"}},"Name":"Beta","Id":"{b}","BillingAddress":null,"NumberOfEmployees":null}},null,null,{{"attributes""#
    );
    assert!(answer.body.starts_with(&first), "{}", answer.body);
    let list = answer.json();
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 5);
    assert!(list[1].is_null() && list[2].is_null() && list[4].is_null());
    assert_eq!(list[3]["Id"], a.as_str());
    assert_eq!(list[3]["NumberOfEmployees"], 5);
    assert_eq!(list[3]["BillingAddress"]["city"], "Paris");

    // The GET form has the same semantics.
    let got = api
        .get(&format!(
            "/composite/sobjects/Account?ids={a},{c}&fields=Id,Name"
        ))
        .await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.body);
    assert_eq!(
        got.body,
        format!(
            r#"[{{"attributes":{{"type":"Account","url":"/services/data/{V}/sobjects/Account/{a}"}},"Id":"{a}","Name":"Alpha"}},null]"#
        )
    );

    api.post(
        "/composite/sobjects/Account",
        &json!({"ids": [a], "fields": ["Id", "Nope__c"]}),
    )
    .await
    .assert_error(400, "INVALID_FIELD");
    api.get(&format!("/composite/sobjects/Account?ids={a}&fields=Bogus"))
        .await
        .assert_error(400, "INVALID_FIELD");
    let too_many: Vec<String> = (0..2001).map(|_| a.clone()).collect();
    let refused = api
        .post(
            "/composite/sobjects/Account",
            &json!({"ids": too_many, "fields": ["Id"]}),
        )
        .await;
    refused.assert_error(400, "EXCEEDED_ID_LIMIT");
    assert!(refused.body.contains("2000"), "{}", refused.body);
    let at_limit: Vec<String> = (0..2000).map(|_| a.clone()).collect();
    let ok = api
        .post(
            "/composite/sobjects/Account",
            &json!({"ids": at_limit, "fields": ["Id"]}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(ok.json().as_array().map(Vec::len), Some(2000));
    api.post(
        "/composite/sobjects/Nope__c",
        &json!({"ids": [a], "fields": ["Id"]}),
    )
    .await
    .assert_error(404, "NOT_FOUND");
    api.post("/composite/sobjects/Account", &json!({"ids": [a]}))
        .await
        .assert_error(400, "MISSING_ARGUMENT");
    api.get("/composite/sobjects/Account?fields=Id")
        .await
        .assert_error(400, "MISSING_ARGUMENT");
    api.send(
        api.request(Method::POST, "/composite/sobjects/Account")
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await
    .assert_error(400, "JSON_PARSER_ERROR");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_report_usage() {
    let (emulator, api) = start().await;
    let a = api.get("/limits").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let usage = a.header("sforce-limit-info").to_string();
    let (used, max) = usage
        .strip_prefix("api-usage=")
        .and_then(|u| u.split_once('/'))
        .expect("api-usage=used/max");
    let (used, max): (i64, i64) = (used.parse().expect("used"), max.parse().expect("max"));
    let limits = a.json();
    assert_eq!(limits["DailyApiRequests"]["Max"], max);
    assert_eq!(limits["DailyApiRequests"]["Remaining"], max - used);
    assert_eq!(limits["DailyBulkV2QueryJobs"]["Max"], 10_000);
    assert_eq!(limits["DailyBulkV2QueryJobs"]["Remaining"], 10_000);
    assert!(limits["DailyBulkV2QueryFileStorageMB"]["Max"].is_i64());
    assert!(limits["DailyBulkV2QueryFileStorageMB"]["Remaining"].is_i64());

    let job = api
        .create_job(json!({"operation": "query", "query": "SELECT Id FROM Account"}))
        .await;
    assert_eq!(job.status, StatusCode::OK, "{}", job.body);
    let after = api.get("/limits/").await.json();
    assert_eq!(after["DailyBulkV2QueryJobs"]["Remaining"], 9_999);
    assert!(
        after["DailyApiRequests"]["Remaining"].as_i64() < Some(max - used),
        "{after}"
    );
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_job_runs_through_its_states_and_writes_salesforce_csv() {
    let (emulator, api) = start().await;
    let writer = RestWriter::new(&emulator);
    let tricky = writer
        .create(
            "Invoice__c",
            json!({
                "Name": "Comma, \"quoted\"", "Paid__c": true, "Line_Count__c": 3,
                "Total__c": 1000.5, "Sent_At__c": "2022-01-10T13:01:28.000+0000",
                "Memo__c": "line1\nline2", "Due_Date__c": "2024-04-26",
            }),
        )
        .await
        .expect("create");
    let plain = writer
        .create("Invoice__c", json!({"Name": "Plain"}))
        .await
        .expect("create");

    let created = api
        .create_job(json!({
            "operation": "query",
            "query": "SELECT Id, Name, Paid__c, Line_Count__c, Total__c, Sent_At__c, Memo__c, \
                      Due_Date__c FROM Invoice__c ORDER BY Name",
            "contentType": "CSV", "columnDelimiter": "COMMA", "lineEnding": "LF",
        }))
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let info = created.json();
    let id = info["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("750") && id.len() == 18, "{id}");
    assert_eq!(info["operation"], "query");
    assert_eq!(info["object"], "Invoice__c");
    assert_eq!(info["createdById"], emulator.org.user_id.as_str());
    assert_eq!(info["state"], "UploadComplete");
    assert_eq!(info["concurrencyMode"], "Parallel");
    assert_eq!(info["contentType"], "CSV");
    assert_eq!(info["apiVersion"], 62.0);
    assert_eq!(info["lineEnding"], "LF");
    assert_eq!(info["columnDelimiter"], "COMMA");
    for stamp in ["createdDate", "systemModstamp"] {
        let s = info[stamp].as_str().expect("stamp");
        assert!(s.len() == 28 && s.ends_with(".000+0000"), "{s}");
    }
    assert!(
        created.body.starts_with(&format!(
            r#"{{"id":"{id}","operation":"query","object":"Invoice__c""#
        )),
        "{}",
        created.body
    );

    let results = format!("/jobs/query/{id}/results");
    api.get(&results).await.assert_error(400, "INVALIDJOBSTATE");
    let polled = api.get(&format!("/jobs/query/{id}")).await.json();
    assert_eq!(polled["state"], "InProgress");
    assert_eq!(polled["numberRecordsProcessed"], 0);
    api.get(&results).await.assert_error(400, "INVALIDJOBSTATE");
    let done = api.get(&format!("/jobs/query/{id}")).await.json();
    assert_eq!(done["state"], "JobComplete");
    assert_eq!(done["jobType"], "V2Query");
    assert_eq!(done["numberRecordsProcessed"], 2);
    assert_eq!(done["retries"], 0);
    assert!(done["totalProcessingTime"].is_i64(), "{done}");
    assert_eq!(done["apiVersion"], 62.0);

    let csv = api.get(&results).await;
    assert_eq!(csv.status, StatusCode::OK, "{}", csv.body);
    assert_eq!(csv.header("content-type"), "text/csv; charset=UTF-8");
    assert_eq!(csv.header("sforce-numberofrecords"), "2");
    assert_eq!(csv.header("sforce-locator"), "null");
    assert_eq!(
        csv.body,
        format!(
            "\"Id\",\"Name\",\"Paid__c\",\"Line_Count__c\",\"Total__c\",\"Sent_At__c\",\
             \"Memo__c\",\"Due_Date__c\"\n\
             \"{tricky}\",\"Comma, \"\"quoted\"\"\",\"true\",\"3\",\"1000.5\",\
             \"2022-01-10T13:01:28.000Z\",\"line1\nline2\",\"2024-04-26\"\n\
             \"{plain}\",\"Plain\",\"false\",\"\",\"\",\"\",\"\",\"\"\n"
        )
    );
    // Results are a snapshot: later changes do not show.
    writer
        .update("Invoice__c", &plain, json!({"Name": "Renamed"}))
        .await
        .expect("update");
    assert_eq!(api.get(&results).await.body, csv.body);

    // Results must be asked for with the job's API version.
    let other = api
        .send(
            api.http
                .get(format!(
                    "{}/services/data/v61.0/jobs/query/{id}/results",
                    api.base
                ))
                .bearer_auth(&api.token),
        )
        .await;
    assert_eq!(other.status.as_u16(), 409, "{}", other.body);
    assert!(other.json()[0]["errorCode"].is_string());

    let listed = api.get("/jobs/query").await.json();
    assert_eq!(listed["done"], true);
    assert_eq!(listed["records"][0]["id"], id.as_str());
    // The list's filters: every job here is a Parallel V2Query without PK chunking.
    for (filter, listed_here) in [
        ("jobType=V2Query", true),
        ("jobType=V2Ingest", false),
        ("concurrencyMode=Parallel", true),
        ("isPkChunkingEnabled=true", false),
    ] {
        let page = api.get(&format!("/jobs/query?{filter}")).await.json();
        let count = page["records"].as_array().map_or(0, Vec::len);
        assert_eq!(count > 0, listed_here, "{filter}: {page}");
    }

    // A finished job cannot be aborted; it can be deleted, and is then gone.
    api.send(
        api.request(Method::PATCH, &format!("/jobs/query/{id}"))
            .json(&json!({"state": "Aborted"})),
    )
    .await
    .assert_error(400, "INVALIDJOBSTATE");
    let deleted = api
        .send(api.request(Method::DELETE, &format!("/jobs/query/{id}")))
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    api.get(&format!("/jobs/query/{id}"))
        .await
        .assert_error(404, "NOT_FOUND");
    api.get(&results).await.assert_error(404, "NOT_FOUND");
    api.send(api.request(Method::DELETE, &format!("/jobs/query/{id}")))
        .await
        .assert_error(404, "NOT_FOUND");
    api.send(
        api.request(Method::PATCH, "/jobs/query/7505g0000000zzzAAA")
            .json(&json!({"state": "Aborted"})),
    )
    .await
    .assert_error(404, "NOT_FOUND");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_results_come_in_chunks_with_locators() {
    let (emulator, api) = start().await;
    let ids = api
        .seed(
            "Account",
            (0..25)
                .map(|i| json!({"Name": format!("N{i:02}"), "Description": format!("a;b {i}")}))
                .collect(),
        )
        .await;
    let writer = RestWriter::new(&emulator);
    writer.delete("Account", &ids[3]).await.expect("delete");
    writer.delete("Account", &ids[17]).await.expect("delete");

    let created = api
        .create_job(json!({
            "operation": "queryAll",
            "query": "SELECT Name, IsDeleted, Description FROM Account ORDER BY Name",
            "columnDelimiter": "SEMICOLON", "lineEnding": "CRLF",
        }))
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.body);
    let info = created.json();
    assert_eq!(info["operation"], "queryAll");
    assert_eq!(info["columnDelimiter"], "SEMICOLON");
    assert_eq!(info["lineEnding"], "CRLF");
    let id = info["id"].as_str().expect("id").to_string();
    let states = api.wait_job(&id).await;
    assert_eq!(states, ["InProgress", "JobComplete"]);

    let results = format!("/jobs/query/{id}/results");
    let mut rows = Vec::new();
    let mut locator: Option<String> = None;
    let mut chunks = Vec::new();
    loop {
        let mut req = api
            .request(Method::GET, &results)
            .query(&[("maxRecords", "10")]);
        if let Some(l) = &locator {
            req = req.query(&[("locator", l)]);
        }
        let chunk = api.send(req).await;
        assert_eq!(chunk.status, StatusCode::OK, "{}", chunk.body);
        let lines: Vec<&str> = chunk
            .body
            .strip_suffix("\r\n")
            .expect("ends with CRLF")
            .split("\r\n")
            .collect();
        assert_eq!(lines[0], "\"Name\";\"IsDeleted\";\"Description\"");
        assert_eq!(
            chunk.header("sforce-numberofrecords"),
            (lines.len() - 1).to_string()
        );
        rows.extend(lines[1..].iter().map(|l| l.to_string()));
        let next = chunk.header("sforce-locator").to_string();
        chunks.push((locator.clone(), chunk.body.clone(), lines.len() - 1));
        if next == "null" {
            break;
        }
        locator = Some(next);
    }
    assert_eq!(chunks.iter().map(|c| c.2).collect::<Vec<_>>(), [10, 10, 5]);
    let expected: Vec<String> = (0..25)
        .map(|i| {
            let deleted = i == 3 || i == 17;
            format!("\"N{i:02}\";\"{deleted}\";\"a;b {i}\"")
        })
        .collect();
    assert_eq!(rows, expected);

    // Locators can be used again while the job exists.
    let (second_locator, second_body, _) = &chunks[1];
    let again = api
        .send(api.request(Method::GET, &results).query(&[
            ("locator", second_locator.as_deref().expect("locator")),
            ("maxRecords", "10"),
        ]))
        .await;
    assert_eq!(&again.body, second_body);

    // Without maxRecords, one chunk holds everything.
    let whole = api.get(&results).await;
    assert_eq!(whole.header("sforce-numberofrecords"), "25");
    assert_eq!(whole.header("sforce-locator"), "null");

    for query in ["locator=bm9wZQ", "locator=MTAwMA", "locator=%21%21"] {
        api.get(&format!("{results}?{query}"))
            .await
            .assert_error(400, "INVALID_QUERY_LOCATOR");
    }
    for query in ["maxRecords=0", "maxRecords=-3", "maxRecords=ten"] {
        let a = api.get(&format!("{results}?{query}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{query}: {}", a.body);
    }

    // A plain query job does not see the deleted records.
    let live = api
        .create_job(json!({"operation": "query", "query": "SELECT Id FROM Account"}))
        .await
        .json();
    let live_id = live["id"].as_str().expect("id");
    api.wait_job(live_id).await;
    let csv = api.get(&format!("/jobs/query/{live_id}/results")).await;
    assert_eq!(csv.header("sforce-numberofrecords"), "23");
    assert!(!csv.body.contains(&ids[3]) && csv.body.contains(&ids[4]));
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_refuses_what_salesforce_refuses_and_jobs_can_be_aborted() {
    let (emulator, api) = start().await;
    let refused = api
        .create_job(
            json!({"operation": "query", "query": "SELECT Id, BillingAddress FROM Account"}),
        )
        .await;
    refused.assert_error(400, "FUNCTIONALITY_NOT_ENABLED");
    assert!(refused.body.contains("compound"), "{}", refused.body);
    let refused = api
        .create_job(json!({"operation": "query", "query": "SELECT Site__c FROM Invoice__c"}))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("compound"), "{}", refused.body);
    let refused = api
        .create_job(json!({"operation": "query", "query": "SELECT COUNT() FROM Account"}))
        .await;
    refused.assert_error(400, "FUNCTIONALITY_NOT_ENABLED");
    assert!(refused.body.contains("COUNT()"), "{}", refused.body);

    for (query, code) in [
        ("SELECT FROM Account", "MALFORMED_QUERY"),
        ("SELECT Id FROM Nope__c", "INVALID_TYPE"),
        ("SELECT Nope__c FROM Account", "INVALID_FIELD"),
    ] {
        api.create_job(json!({"operation": "query", "query": query}))
            .await
            .assert_error(400, code);
    }
    for (body, code) in [
        (json!({"query": "SELECT Id FROM Account"}), "INVALIDJOB"),
        (json!({"operation": "query"}), "INVALIDJOB"),
        (
            json!({"operation": "insert", "query": "SELECT Id FROM Account"}),
            "JSON_PARSER_ERROR",
        ),
        (
            json!({"operation": "query", "query": "SELECT Id FROM Account", "columnDelimiter": "COLON"}),
            "JSON_PARSER_ERROR",
        ),
        (
            json!({"operation": "query", "query": "SELECT Id FROM Account", "lineEnding": "CR"}),
            "JSON_PARSER_ERROR",
        ),
        (
            json!({"operation": "query", "query": "SELECT Id FROM Account", "contentType": "JSON"}),
            "JSON_PARSER_ERROR",
        ),
    ] {
        api.create_job(body).await.assert_error(400, code);
    }
    api.send(
        api.request(Method::POST, "/jobs/query")
            .header("content-type", "application/json")
            .body("{"),
    )
    .await
    .assert_error(400, "JSON_PARSER_ERROR");
    // Bulk API 2.0 query exists from API 47.0 on.
    api.send(
        api.http
            .post(format!("{}/services/data/v46.0/jobs/query", api.base))
            .bearer_auth(&api.token)
            .json(&json!({"operation": "query", "query": "SELECT Id FROM Account"})),
    )
    .await
    .assert_error(404, "NOT_FOUND");

    // Abort a job before it completes: it stays aborted and has no results.
    let job = |query: &'static str| json!({"operation": "query", "query": query});
    let id = api.create_job(job("SELECT Id FROM Account")).await.json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let patch = |id: &str, state: &str| {
        api.request(Method::PATCH, &format!("/jobs/query/{id}"))
            .json(&json!({ "state": state }))
    };
    api.send(patch(&id, "JobComplete"))
        .await
        .assert_error(400, "INVALIDJOBSTATE");
    let aborted = api.send(patch(&id, "Aborted")).await;
    assert_eq!(aborted.status, StatusCode::OK, "{}", aborted.body);
    assert_eq!(aborted.json()["state"], "Aborted");
    assert_eq!(
        api.get(&format!("/jobs/query/{id}")).await.json()["state"],
        "Aborted"
    );
    api.get(&format!("/jobs/query/{id}/results"))
        .await
        .assert_error(400, "INVALIDJOBSTATE");
    api.send(patch(&id, "Aborted"))
        .await
        .assert_error(400, "INVALIDJOBSTATE");
    let gone = api
        .send(api.request(Method::DELETE, &format!("/jobs/query/{id}")))
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);

    // A job in progress cannot be deleted until it is done.
    let id = api.create_job(job("SELECT Id FROM Account")).await.json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert_eq!(
        api.get(&format!("/jobs/query/{id}")).await.json()["state"],
        "InProgress"
    );
    api.send(api.request(Method::DELETE, &format!("/jobs/query/{id}")))
        .await
        .assert_error(400, "INVALIDJOBSTATE");
    api.wait_job(&id).await;
    let gone = api
        .send(api.request(Method::DELETE, &format!("/jobs/query/{id}")))
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);

    // Only the newest jobs are kept: creating many forgets the oldest finished ones.
    let first = api.create_job(job("SELECT Id FROM Account")).await.json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    api.wait_job(&first).await;
    for _ in 0..55 {
        let a = api.create_job(job("SELECT Id FROM Account")).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    api.get(&format!("/jobs/query/{first}"))
        .await
        .assert_error(404, "NOT_FOUND");
    let listed = api.get("/jobs/query").await.json();
    assert_eq!(listed["records"].as_array().map(Vec::len), Some(50));
    emulator.stop().await;
}
