//! The emulator as the Salesforce clients people use meet it (issue 17): trailing slashes,
//! Salesforce's error envelopes on every refusal, keep-alive after an error, versions,
//! discovery and identity, records by id (15 or 18 characters) and by external id,
//! getUpdated / getDeleted, OAuth revoke / introspect, gzip. Each check is against what
//! Salesforce documents, sent over plain HTTP with reqwest (or raw TCP where the connection
//! itself is the point).

use crate::common;
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value as J, json};
use sfmirror::emulator::Emulator;
use std::io::{Read, Write};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const V: &str = "v62.0";

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> J {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}) on HTTP {}: {}", self.status, self.text()))
    }

    /// Asserts Salesforce's REST error: the status and `[{"message", "errorCode", "fields"}]`.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        let body = self.json();
        let first = &body[0];
        assert_eq!(first["errorCode"], code, "{}", self.text());
        assert!(
            first["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text()
        );
        assert!(first["fields"].is_array(), "{}", self.text());
    }

    /// Asserts OAuth's own error shape.
    fn assert_oauth_error(&self, status: u16, error: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        let body = self.json();
        assert_eq!(body["error"], error, "{}", self.text());
        assert!(body["error_description"].is_string(), "{}", self.text());
    }
}

impl Api {
    fn new(emulator: &Emulator) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: emulator.rest_url.clone(),
            token: emulator.access_token.clone(),
        }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("/services/")
            || path.starts_with("/emulator/")
            || path.starts_with("/id/")
        {
            format!("{}{path}", self.base)
        } else {
            format!("{}/services/data/{V}{path}", self.base)
        }
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    async fn send(&self, req: RequestBuilder) -> Answer {
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("body").to_vec();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send(self.request(Method::GET, path)).await
    }

    async fn json(&self, method: Method, path: &str, body: &J) -> Answer {
        self.send(self.request(method, path).json(body)).await
    }
}

async fn start() -> (Emulator, Api) {
    let emulator = common::emulator().await;
    let api = Api::new(&emulator);
    (emulator, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_takes_a_trailing_slash() {
    let (emulator, api) = start().await;
    let created = api
        .json(
            Method::POST,
            "/sobjects/Account/",
            &json!({"Name": "Slash"}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let id = created.json()["id"].as_str().expect("id").to_string();
    for path in [
        "/services/data/",
        "/sobjects/",
        "/sobjects/Account/",
        "/sobjects/Account/describe/",
        "/limits/",
        "/jobs/query/",
        "/",
        &format!("/sobjects/Account/{id}/"),
    ] {
        let a = api.get(path).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
        a.json();
    }
    for endpoint in ["query", "queryAll"] {
        let a = api
            .send(
                api.request(Method::GET, &format!("/{endpoint}/"))
                    .query(&[("q", "SELECT Id, Name FROM Account")]),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{endpoint}/: {}", a.text());
        assert_eq!(a.json()["records"][0]["Name"], "Slash");
    }
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_carries_salesforce_error_envelope() {
    let (emulator, api) = start().await;
    api.get("/no/such/resource")
        .await
        .assert_error(404, "NOT_FOUND");
    api.get("/services/nothing")
        .await
        .assert_error(404, "NOT_FOUND");
    api.send(api.request(Method::PUT, "/sobjects/Account"))
        .await
        .assert_error(405, "METHOD_NOT_ALLOWED");
    // Bad JSON, a body that is not JSON, and a media type Salesforce does not take.
    api.send(
        api.request(Method::POST, "/sobjects/Account")
            .header("content-type", "application/json")
            .body("{\"Name\": "),
    )
    .await
    .assert_error(400, "JSON_PARSER_ERROR");
    api.send(
        api.request(Method::POST, "/sobjects/Account")
            .header("content-type", "text/plain")
            .body("Name=x"),
    )
    .await
    .assert_error(415, "UNSUPPORTED_MEDIA_TYPE");
    api.send(
        api.request(Method::POST, "/composite/sobjects/Account")
            .header("content-type", "application/json")
            .body("[oops"),
    )
    .await
    .assert_error(400, "JSON_PARSER_ERROR");
    // Ids: malformed, well-formed but unknown, deleted.
    api.get("/sobjects/Account/not-an-id")
        .await
        .assert_error(400, "MALFORMED_ID");
    api.get("/sobjects/Account/001000000000000")
        .await
        .assert_error(404, "NOT_FOUND");
    let id = api
        .json(
            Method::POST,
            "/sobjects/Account",
            &json!({"Name": "Doomed"}),
        )
        .await
        .json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let gone = api
        .send(api.request(Method::DELETE, &format!("/sobjects/Account/{id}")))
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT);
    api.get(&format!("/sobjects/Account/{id}"))
        .await
        .assert_error(404, "ENTITY_IS_DELETED");
    api.json(
        Method::PATCH,
        &format!("/sobjects/Account/{id}"),
        &json!({"Name": "x"}),
    )
    .await
    .assert_error(404, "ENTITY_IS_DELETED");
    // A reference field that does not hold an id.
    api.json(
        Method::POST,
        "/sobjects/Contact",
        &json!({"LastName": "Ref", "AccountId": "nope"}),
    )
    .await
    .assert_error(400, "MALFORMED_ID");
    // Versions: retired ones are 410, ones newer than the newest served are 404.
    api.send(
        api.http
            .get(format!("{}/services/data/v30.0/sobjects", api.base))
            .bearer_auth(&api.token),
    )
    .await
    .assert_error(410, "UNSUPPORTED_API_VERSION");
    api.send(
        api.http
            .get(format!("{}/services/data/v99.0/sobjects", api.base))
            .bearer_auth(&api.token),
    )
    .await
    .assert_error(404, "NOT_FOUND");
    // No session: 401 with the envelope, even with a body the route never reads.
    api.send(
        api.http
            .post(api.url("/sobjects/Account"))
            .json(&json!({"Name": "anonymous"})),
    )
    .await
    .assert_error(401, "INVALID_SESSION_ID");
    // OAuth keeps its own shape, even for a request axum itself refuses.
    api.send(api.http.post(format!("{}/services/oauth2/token", api.base)))
        .await
        .assert_oauth_error(400, "invalid_request");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_list_what_is_served_and_the_version_resource_indexes_it() {
    let (emulator, api) = start().await;
    let versions = api.get("/services/data").await.json();
    let list: Vec<&str> = versions
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["version"].as_str().expect("version"))
        .collect();
    assert_eq!(list.first(), Some(&"31.0"));
    assert_eq!(list.last(), Some(&"65.0"));
    assert_eq!(versions[31]["label"], "Winter '25", "{versions}"); // 62.0
    assert_eq!(versions[31]["url"], "/services/data/v62.0");
    let index = api.get("").await;
    assert_eq!(index.status, StatusCode::OK, "{}", index.text());
    let index = index.json();
    assert_eq!(index["sobjects"], "/services/data/v62.0/sobjects");
    assert_eq!(index["query"], "/services/data/v62.0/query");
    // `sobjects/X/`: the object's summary and recent items.
    let info = api.get("/sobjects/Invoice__c/").await.json();
    assert_eq!(info["objectDescribe"]["name"], "Invoice__c");
    assert_eq!(info["objectDescribe"]["keyPrefix"], "a0I");
    assert_eq!(info["recentItems"], json!([]));
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_leaves_the_keep_alive_connection_usable() {
    let emulator = common::emulator().await;
    let addr = emulator.rest_url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let big = format!("{{\"Name\": \"{}\"}}", "x".repeat(200_000));
    // Refused before any route reads the body: no session, then an unknown route.
    for path in [
        "/services/data/v62.0/sobjects/Account",
        "/services/data/v62.0/nowhere",
    ] {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{big}",
            big.len()
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
        let (status, body) = read_response(&mut tcp).await;
        assert!(status == 401 || status == 404, "{status}: {body}");
        assert!(body.contains("errorCode"), "{body}");
    }
    let req = format!("GET /services/data HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("write");
    let (status, body) = read_response(&mut tcp).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"version\""), "{body}");
    emulator.stop().await;
}

/// One HTTP/1.1 response with a `Content-Length` body: (status, body).
async fn read_response(tcp: &mut tokio::net::TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no status line: {head}"));
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())
                        .flatten()
                })
                .unwrap_or_else(|| panic!("no content-length: {head}"));
            while buf.len() < end + 4 + len {
                let n = tcp.read(&mut chunk).await.expect("read body");
                assert!(n > 0, "the connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            buf.drain(..end + 4 + len);
            return (status, body);
        }
        let n = tcp.read(&mut chunk).await.expect("read");
        assert!(
            n > 0,
            "the server closed the connection: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_record_get_honours_fields_and_takes_15_character_ids() {
    let (emulator, api) = start().await;
    let id = api
        .json(
            Method::POST,
            "/sobjects/Account",
            &json!({"Name": "Fields", "BillingCity": "Lyon", "Phone": "555"}),
        )
        .await
        .json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let full = api.get(&format!("/sobjects/Account/{}", &id[..15])).await;
    assert_eq!(full.status, StatusCode::OK, "{}", full.text());
    let text = full.text();
    assert!(text.starts_with("{\"attributes\":"), "{text}");
    assert_eq!(full.json()["Id"], id.as_str());
    assert_eq!(
        full.json()["BillingAddress"]["city"],
        "Lyon",
        "compound included"
    );
    // Describe order: Id before Name before BillingCity.
    let at = |k: &str| {
        text.find(&format!("\"{k}\":"))
            .unwrap_or_else(|| panic!("{k}"))
    };
    assert!(
        at("Id") < at("Name") && at("Name") < at("BillingCity"),
        "{text}"
    );
    // ?fields= keeps describe order, not the order asked.
    let some = api
        .get(&format!("/sobjects/Account/{id}?fields=Phone,Name"))
        .await;
    assert_eq!(some.status, StatusCode::OK, "{}", some.text());
    let keys: Vec<String> = {
        let t = some.text();
        ["attributes", "Name", "Phone"]
            .iter()
            .filter(|k| t.contains(&format!("\"{k}\":")))
            .map(|k| k.to_string())
            .collect()
    };
    assert_eq!(keys, ["attributes", "Name", "Phone"]);
    let t = some.text();
    assert!(t.find("\"Name\"") < t.find("\"Phone\""), "{t}");
    assert_eq!(some.json().as_object().map(|o| o.len()), Some(3), "{t}");
    api.get(&format!("/sobjects/Account/{id}?fields=Name,Nope__c"))
        .await
        .assert_error(400, "INVALID_FIELD");
    // 15-character ids in PATCH and DELETE too.
    let patched = api
        .json(
            Method::PATCH,
            &format!("/sobjects/Account/{}", &id[..15]),
            &json!({"Phone": "556"}),
        )
        .await;
    assert_eq!(patched.status, StatusCode::NO_CONTENT, "{}", patched.text());
    assert_eq!(
        emulator.org.get("Account", &id).expect("record")["Phone"],
        "556"
    );
    let deleted = api
        .send(api.request(Method::DELETE, &format!("/sobjects/Account/{}", &id[..15])))
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_get_and_delete_by_external_id() {
    let (emulator, api) = start().await;
    let path = "/sobjects/Invoice__c/External_Id__c/INV-1";
    let created = api
        .json(Method::PATCH, path, &json!({"Name": "First"}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let c = created.json();
    assert_eq!(c["created"], true);
    assert_eq!(c["success"], true);
    let id = c["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("a0I"), "{id}");
    // The same key again updates: 200 with created=false from 46.0, 204 before.
    let again = api
        .json(Method::PATCH, path, &json!({"Name": "Second"}))
        .await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    assert_eq!(
        again.json(),
        json!({"id": id, "success": true, "errors": [], "created": false})
    );
    let old = api
        .send(
            api.http
                .patch(format!(
                    "{}/services/data/v45.0/sobjects/Invoice__c/External_Id__c/inv-1",
                    api.base
                ))
                .bearer_auth(&api.token)
                .json(&json!({"Name": "Third"})),
        )
        .await;
    assert_eq!(old.status, StatusCode::NO_CONTENT, "{}", old.text());
    let got = api.get(path).await;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text());
    assert_eq!(got.json()["Name"], "Third");
    assert_eq!(got.json()["Id"], id.as_str());
    // Two records with the same key (written around the unique check, as a data load may):
    // 300 with both URLs.
    let twin = api
        .json(
            Method::POST,
            "/sobjects/Invoice__c",
            &json!({"Name": "Twin", "External_Id__c": "INV-2"}),
        )
        .await;
    assert_eq!(twin.status, StatusCode::CREATED, "{}", twin.text());
    let twin2 = api
        .json(
            Method::POST,
            "/sobjects/Invoice__c",
            &json!({"Name": "Twin 2", "External_Id__c": "INV-2"}),
        )
        .await;
    assert_eq!(twin2.status, StatusCode::CREATED, "{}", twin2.text());
    let many = api.get("/sobjects/Invoice__c/External_Id__c/INV-2").await;
    assert_eq!(many.status, StatusCode::MULTIPLE_CHOICES, "{}", many.text());
    assert_eq!(many.json().as_array().map(Vec::len), Some(2));
    assert!(
        many.json()[0]
            .as_str()
            .expect("url")
            .starts_with("/services/data/v62.0/sobjects/Invoice__c/")
    );
    let many = api
        .json(
            Method::PATCH,
            "/sobjects/Invoice__c/External_Id__c/INV-2",
            &json!({"Name": "x"}),
        )
        .await;
    assert_eq!(many.status, StatusCode::MULTIPLE_CHOICES, "{}", many.text());
    // A field that is not an External ID: refused on a custom object, even with idLookup
    // (Name); a standard object may use an idLookup field.
    api.json(Method::PATCH, "/sobjects/Invoice__c/Name/First", &json!({}))
        .await
        .assert_error(404, "NOT_FOUND");
    api.get("/sobjects/Invoice__c/External_Id__c/none")
        .await
        .assert_error(404, "NOT_FOUND");
    // Delete by external id.
    let deleted = api.send(api.request(Method::DELETE, path)).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.text());
    api.get(path).await.assert_error(404, "NOT_FOUND");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_updated_and_get_deleted_follow_the_replication_window() {
    let (emulator, api) = start().await;
    let now = emulator.org.now_ms();
    let iso = |ms: i64| sfmirror::model::time::format_datetime(ms);
    let a = api
        .json(Method::POST, "/sobjects/Account", &json!({"Name": "Kept"}))
        .await
        .json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    let b = api
        .json(Method::POST, "/sobjects/Account", &json!({"Name": "Gone"}))
        .await
        .json()["id"]
        .as_str()
        .expect("id")
        .to_string();
    api.send(api.request(Method::DELETE, &format!("/sobjects/Account/{b}")))
        .await;
    let window = |start: i64, end: i64| vec![("start", iso(start)), ("end", iso(end))];
    let hour = 3_600_000;
    let up = api
        .send(
            api.request(Method::GET, "/sobjects/Account/updated/")
                .query(&window(now - hour, now + hour)),
        )
        .await;
    assert_eq!(up.status, StatusCode::OK, "{}", up.text());
    let up = up.json();
    assert_eq!(up["ids"], json!([a]));
    // latestDateCovered: the end, cut to the minute, but never after now.
    let covered = up["latestDateCovered"].as_str().expect("latestDateCovered");
    let covered_ms = sfmirror::model::time::datetime_ms(covered).expect("datetime");
    assert_eq!(covered_ms % 60_000, 0, "{covered}");
    assert!(covered_ms <= emulator.org.now_ms(), "{covered}");
    let del = api
        .send(
            api.request(Method::GET, "/sobjects/Account/deleted/")
                .query(&window(now - hour, now + hour)),
        )
        .await
        .json();
    assert_eq!(del["deletedRecords"][0]["id"], b.as_str(), "{del}");
    assert!(del["deletedRecords"][0]["deletedDate"].is_string());
    assert!(del["earliestDateAvailable"].is_string());
    // A window before the records: nothing.
    let before = api
        .send(
            api.request(Method::GET, "/sobjects/Account/updated")
                .query(&window(now - 3 * hour, now - 2 * hour)),
        )
        .await
        .json();
    assert_eq!(before["ids"], json!([]));
    // Refusals: start after end, start more than 30 days back, missing parameters.
    api.send(
        api.request(Method::GET, "/sobjects/Account/updated")
            .query(&window(now, now - hour)),
    )
    .await
    .assert_error(400, "INVALID_REPLICATION_DATE");
    api.send(
        api.request(Method::GET, "/sobjects/Account/deleted")
            .query(&window(now - 31 * 24 * hour, now)),
    )
    .await
    .assert_error(400, "INVALID_REPLICATION_DATE");
    api.get("/sobjects/Account/updated")
        .await
        .assert_error(400, "MISSING_ARGUMENT");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_refuses_a_wrong_secret_everywhere_and_revokes_and_introspects() {
    let (emulator, api) = start().await;
    let c = emulator.credentials.clone();
    let token_url = format!("{}/services/oauth2/token", api.base);
    let form = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    for grant in [
        form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &c.client_id),
        ]),
        form(&[
            ("grant_type", "password"),
            ("client_id", &c.client_id),
            ("username", &c.username),
            ("password", &c.password),
        ]),
        form(&[
            ("grant_type", "refresh_token"),
            ("client_id", &c.client_id),
            ("refresh_token", &c.refresh_token),
        ]),
    ] {
        let mut wrong = grant.clone();
        wrong.push(("client_secret".into(), "wrong".into()));
        api.send(api.http.post(&token_url).form(&wrong))
            .await
            .assert_oauth_error(400, "invalid_client");
    }
    // Parameters in the query string are as good as in the body.
    let ok = api
        .send(api.http.post(&token_url).query(&[
            ("grant_type", "password"),
            ("client_id", c.client_id.as_str()),
            ("client_secret", c.client_secret.as_str()),
            ("username", c.username.as_str()),
            ("password", c.password.as_str()),
        ]))
        .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let ok = ok.json();
    let token = ok["access_token"].as_str().expect("token").to_string();
    // The identity URL is served, and says who the token is.
    let id_url = ok["id"].as_str().expect("id").to_string();
    let path = id_url
        .strip_prefix(&api.base)
        .expect("identity on the emulator");
    let who = api
        .send(
            api.http
                .get(format!("{}{path}", api.base))
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(who.status, StatusCode::OK, "{}", who.text());
    assert_eq!(who.json()["username"], c.username.as_str());
    assert_eq!(who.json()["organization_id"], emulator.org.org_id.as_str());
    // Introspect, revoke, introspect again.
    let introspect = |t: String| {
        api.http
            .post(format!("{}/services/oauth2/introspect", api.base))
            .form(&[
                ("token", t),
                ("client_id", c.client_id.clone()),
                ("client_secret", c.client_secret.clone()),
            ])
    };
    let active = api.send(introspect(token.clone())).await.json();
    assert_eq!(active["active"], true, "{active}");
    assert_eq!(active["username"], c.username.as_str());
    let revoked = api
        .send(
            api.http
                .post(format!("{}/services/oauth2/revoke", api.base))
                .form(&[("token", token.as_str())]),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.text());
    assert_eq!(
        api.send(introspect(token.clone())).await.json(),
        json!({"active": false})
    );
    api.send(api.http.get(api.url("/sobjects")).bearer_auth(&token))
        .await
        .assert_error(401, "INVALID_SESSION_ID");
    api.send(
        api.http
            .post(format!("{}/services/oauth2/revoke", api.base))
            .form(&[("token", "unknown")]),
    )
    .await
    .assert_oauth_error(400, "unsupported_token_type");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_request_bodies_are_read_and_responses_gzipped_when_asked() {
    let (emulator, api) = start().await;
    let body = serde_json::to_vec(&json!({"Name": "Zipped"})).expect("json");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&body).expect("gzip");
    let zipped = enc.finish().expect("gzip");
    let created = api
        .send(
            api.request(Method::POST, "/sobjects/Account")
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(zipped),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let id = created.json()["id"].as_str().expect("id").to_string();
    assert_eq!(
        emulator.org.get("Account", &id).expect("record")["Name"],
        "Zipped"
    );
    let described = api
        .send(
            api.request(Method::GET, "/sobjects/Account/describe")
                .header("accept-encoding", "gzip"),
        )
        .await;
    assert_eq!(described.status, StatusCode::OK);
    assert_eq!(
        described
            .headers
            .get("content-encoding")
            .and_then(|v| v.to_str().ok()),
        Some("gzip")
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(&described.body[..])
        .read_to_string(&mut text)
        .expect("gunzip");
    let d: J = serde_json::from_str(&text).expect("json");
    assert_eq!(d["name"], "Account");
    // Without Accept-Encoding: plain.
    let plain = api.get("/sobjects/Account/describe").await;
    assert!(plain.headers.get("content-encoding").is_none());
    assert_eq!(plain.json()["name"], "Account");
    // Not gzip at all: refused with the envelope.
    api.send(
        api.request(Method::POST, "/sobjects/Account")
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body("not gzip"),
    )
    .await
    .assert_error(400, "INVALID_CONTENT_ENCODING");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_create_update_and_delete_with_all_or_none() {
    let (emulator, api) = start().await;
    let acct = |name: &str| json!({"attributes": {"type": "Account"}, "Name": name});
    let created = api
        .json(
            Method::POST,
            "/composite/sobjects",
            &json!({"allOrNone": false, "records": [acct("One"), acct("Two"),
                    {"attributes": {"type": "Contact"}, "FirstName": "no last name"}]}),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text());
    let results = created.json();
    assert_eq!(results[0]["success"], true);
    assert_eq!(results[1]["success"], true);
    assert_eq!(results[2]["success"], false);
    assert_eq!(
        results[2]["errors"][0]["statusCode"],
        "REQUIRED_FIELD_MISSING"
    );
    let one = results[0]["id"].as_str().expect("id").to_string();
    let two = results[1]["id"].as_str().expect("id").to_string();
    // All or none: one bad record, nothing written, the others rolled back.
    let before = emulator.org.records("Account").len();
    let refused = api
        .json(
            Method::POST,
            "/composite/sobjects",
            &json!({"allOrNone": true, "records": [acct("Three"),
                    {"attributes": {"type": "Account"}, "Nope__c": 1}]}),
        )
        .await
        .json();
    assert_eq!(
        refused[0]["errors"][0]["statusCode"],
        "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    );
    assert_eq!(refused[1]["errors"][0]["statusCode"], "INVALID_FIELD");
    assert_eq!(emulator.org.records("Account").len(), before);
    // Update, then delete (with one unknown id, all or none: nothing deleted).
    let updated = api
        .json(
            Method::PATCH,
            "/composite/sobjects",
            &json!({"records": [{"attributes": {"type": "Account"}, "id": one, "Phone": "1"},
                                {"attributes": {"type": "Account"}, "id": &two[..15], "Phone": "2"}]}),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text());
    assert_eq!(updated.json()[1]["success"], true, "{}", updated.text());
    assert_eq!(
        emulator.org.get("Account", &two).expect("two")["Phone"],
        "2"
    );
    let unknown = "001000000000000AAA";
    let refused = api
        .send(api.request(
            Method::DELETE,
            &format!("/composite/sobjects?ids={one},{unknown}&allOrNone=true"),
        ))
        .await
        .json();
    assert_eq!(refused[0]["success"], false, "{refused}");
    assert!(emulator.org.get("Account", &one).is_ok(), "nothing deleted");
    let deleted = api
        .send(api.request(
            Method::DELETE,
            &format!("/composite/sobjects?ids={one},{two}"),
        ))
        .await
        .json();
    assert_eq!(
        deleted,
        json!([{"id": one, "success": true, "errors": []},
                               {"id": two, "success": true, "errors": []}])
    );
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_runs_subrequests_with_references_and_batch_and_tree() {
    let (emulator, api) = start().await;
    let composite = api
        .json(
            Method::POST,
            "/composite",
            &json!({"allOrNone": true, "compositeRequest": [
                {"method": "POST", "url": "/services/data/v62.0/sobjects/Account",
                 "referenceId": "acct", "body": {"Name": "Composite"}},
                {"method": "POST", "url": "/services/data/v62.0/sobjects/Contact",
                 "referenceId": "ct", "body": {"LastName": "Ref", "AccountId": "@{acct.id}"}},
                {"method": "GET", "url": "/services/data/v62.0/sobjects/Account/@{acct.id}?fields=Name",
                 "referenceId": "read"},
                {"method": "GET", "url": "/services/data/v62.0/query?q=SELECT+Id+FROM+Contact+WHERE+AccountId+%3D+%27@{acct.id}%27",
                 "referenceId": "q"},
            ]}),
        )
        .await;
    assert_eq!(composite.status, StatusCode::OK, "{}", composite.text());
    let c = composite.json();
    let r = &c["compositeResponse"];
    assert_eq!(r[0]["httpStatusCode"], 201, "{c}");
    let acct = r[0]["body"]["id"].as_str().expect("account id").to_string();
    assert_eq!(
        r[0]["httpHeaders"]["Location"],
        format!("/services/data/v62.0/sobjects/Account/{acct}").as_str()
    );
    assert_eq!(r[1]["httpStatusCode"], 201, "{c}");
    let contact = r[1]["body"]["id"].as_str().expect("contact id").to_string();
    assert_eq!(
        emulator.org.get("Contact", &contact).expect("contact")["AccountId"],
        acct.as_str()
    );
    assert_eq!(r[2]["body"]["Name"], "Composite", "{c}");
    assert_eq!(r[3]["body"]["records"][0]["Id"], contact.as_str(), "{c}");
    // allOrNone: the first failure halts the rest.
    let halted = api
        .json(
            Method::POST,
            "/composite",
            &json!({"allOrNone": true, "compositeRequest": [
                {"method": "GET", "url": "/services/data/v62.0/sobjects/Account/001000000000000AAA",
                 "referenceId": "missing"},
                {"method": "POST", "url": "/services/data/v62.0/sobjects/Account",
                 "referenceId": "never", "body": {"Name": "never"}},
            ]}),
        )
        .await
        .json();
    let h = &halted["compositeResponse"];
    assert_eq!(h[0]["httpStatusCode"], 404, "{halted}");
    assert_eq!(h[0]["body"][0]["errorCode"], "NOT_FOUND");
    assert_eq!(
        h[1]["body"][0]["errorCode"], "PROCESSING_HALTED",
        "{halted}"
    );
    // An unresolvable reference.
    let bad = api
        .json(
            Method::POST,
            "/composite",
            &json!({"compositeRequest": [
                {"method": "GET", "url": "/services/data/v62.0/sobjects/Account/@{nope.id}",
                 "referenceId": "x"}]}),
        )
        .await
        .json();
    assert_eq!(
        bad["compositeResponse"][0]["body"][0]["errorCode"],
        "PROCESSING_HALTED"
    );

    // Batch: independent subrequests, URLs relative to /services/data.
    let batch = api
        .json(
            Method::POST,
            "/composite/batch",
            &json!({"batchRequests": [
                {"method": "PATCH", "url": format!("v62.0/sobjects/Account/{acct}"),
                 "richInput": {"Phone": "42"}},
                {"method": "GET", "url": "v62.0/sobjects/Account/not-an-id"},
                {"method": "GET", "url": format!("v62.0/sobjects/Account/{acct}?fields=Phone")},
            ]}),
        )
        .await
        .json();
    assert_eq!(batch["hasErrors"], true, "{batch}");
    assert_eq!(batch["results"][0]["statusCode"], 204);
    assert_eq!(batch["results"][1]["statusCode"], 400);
    assert_eq!(
        batch["results"][1]["result"][0]["errorCode"],
        "MALFORMED_ID"
    );
    assert_eq!(batch["results"][2]["result"]["Phone"], "42");

    // Tree: an account with two contacts, all created, ids by reference.
    let tree = api
        .json(
            Method::POST,
            "/composite/tree/Account",
            &json!({"records": [{
                "attributes": {"type": "Account", "referenceId": "a1"}, "Name": "Tree",
                "Contacts": {"records": [
                    {"attributes": {"type": "Contact", "referenceId": "c1"}, "LastName": "One"},
                    {"attributes": {"type": "Contact", "referenceId": "c2"}, "LastName": "Two"}]}
            }]}),
        )
        .await;
    assert_eq!(tree.status, StatusCode::CREATED, "{}", tree.text());
    let t = tree.json();
    assert_eq!(t["hasErrors"], false);
    let refs: Vec<&str> = t["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["referenceId"].as_str().expect("ref"))
        .collect();
    assert_eq!(refs, ["a1", "c1", "c2"]);
    let tree_acct = t["results"][0]["id"].as_str().expect("id");
    let c2 = t["results"][2]["id"].as_str().expect("id");
    assert_eq!(
        emulator.org.get("Contact", c2).expect("c2")["AccountId"],
        tree_acct
    );
    // One bad child: nothing created.
    let before = emulator.org.records("Contact").len();
    let refused = api
        .json(
            Method::POST,
            "/composite/tree/Account",
            &json!({"records": [{
                "attributes": {"type": "Account", "referenceId": "a2"}, "Name": "Tree 2",
                "Contacts": {"records": [
                    {"attributes": {"type": "Contact", "referenceId": "bad"}, "FirstName": "x"}]}
            }]}),
        )
        .await;
    assert_eq!(
        refused.status,
        StatusCode::BAD_REQUEST,
        "{}",
        refused.text()
    );
    let r = refused.json();
    assert_eq!(r["hasErrors"], true);
    assert_eq!(r["results"][0]["referenceId"], "bad");
    assert_eq!(
        r["results"][0]["errors"][0]["statusCode"],
        "REQUIRED_FIELD_MISSING"
    );
    assert_eq!(emulator.org.records("Contact").len(), before);
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_queries_take_offset_and_bulk_refuses_it() {
    let (emulator, api) = start().await;
    for i in 0..5 {
        let made = api
            .json(
                Method::POST,
                "/sobjects/Account",
                &json!({"Name": format!("Off {i}")}),
            )
            .await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    }
    let page = api
        .send(api.request(Method::GET, "/query/").query(&[(
            "q",
            "SELECT Name FROM Account ORDER BY Name DESC LIMIT 2 OFFSET 1",
        )]))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    let names: Vec<J> = page.json()["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| r["Name"].clone())
        .collect();
    assert_eq!(names, [json!("Off 3"), json!("Off 2")]);
    assert_eq!(page.json()["totalSize"], 2);
    api.send(
        api.request(Method::GET, "/query")
            .query(&[("q", "SELECT Name FROM Account OFFSET 2001")]),
    )
    .await
    .assert_error(400, "NUMBER_OUTSIDE_VALID_RANGE");
    api.json(
        Method::POST,
        "/jobs/query",
        &json!({"operation": "query", "query": "SELECT Name FROM Account OFFSET 1"}),
    )
    .await
    .assert_error(400, "FUNCTIONALITY_NOT_ENABLED");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_date_literals_follow_the_org_clock_in_rest_and_bulk() {
    let (emulator, api) = start().await;
    let made = api
        .json(Method::POST, "/sobjects/Account", &json!({"Name": "Dated"}))
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    assert_eq!(
        total(&api, "SELECT Id FROM Account WHERE CreatedDate = TODAY").await,
        1
    );
    assert_eq!(
        total(&api, "SELECT Id FROM Account WHERE CreatedDate = YESTERDAY").await,
        0
    );
    // Two days later on the org's clock.
    let advanced = api
        .json(
            Method::POST,
            "/emulator/advance-clock",
            &json!({"seconds": 2 * 86_400}),
        )
        .await;
    assert_eq!(advanced.status, StatusCode::OK, "{}", advanced.text());
    assert_eq!(
        total(&api, "SELECT Id FROM Account WHERE CreatedDate = TODAY").await,
        0
    );
    assert_eq!(
        total(
            &api,
            "SELECT Id FROM Account WHERE CreatedDate = N_DAYS_AGO:2"
        )
        .await,
        1
    );
    assert_eq!(
        total(
            &api,
            "SELECT Id FROM Account WHERE CreatedDate = LAST_N_DAYS:3"
        )
        .await,
        1
    );
    // Bulk API 2.0 takes them too.
    let job = api
        .json(
            Method::POST,
            "/jobs/query",
            &json!({"operation": "query",
                    "query": "SELECT Id FROM Account WHERE CreatedDate = LAST_N_DAYS:3"}),
        )
        .await;
    assert_eq!(job.status, StatusCode::OK, "{}", job.text());
    emulator.stop().await;
}

/// `totalSize` of a REST query.
async fn total(api: &Api, soql: &str) -> u64 {
    let a = api
        .send(api.request(Method::GET, "/query").query(&[("q", soql)]))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{soql}: {}", a.text());
    a.json()["totalSize"].as_u64().expect("totalSize")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_function_selects_by_describe_with_its_limit_rule() {
    let (emulator, api) = start().await;
    let made = api
        .json(
            Method::POST,
            "/sobjects/Invoice__c",
            &json!({"Name": "Fields", "External_Id__c": "F-1"}),
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    let page = api
        .send(
            api.request(Method::GET, "/query")
                .query(&[("q", "SELECT FIELDS(CUSTOM) FROM Invoice__c LIMIT 10")]),
        )
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text());
    let record = &page.json()["records"][0];
    assert_eq!(record["External_Id__c"], "F-1", "{record}");
    assert!(record.get("Name").is_none(), "Name is standard: {record}");
    let standard = api
        .send(
            api.request(Method::GET, "/query")
                .query(&[("q", "SELECT FIELDS(STANDARD) FROM Invoice__c")]),
        )
        .await;
    assert_eq!(standard.status, StatusCode::OK, "{}", standard.text());
    assert_eq!(standard.json()["records"][0]["Name"], "Fields");
    api.send(
        api.request(Method::GET, "/query")
            .query(&[("q", "SELECT FIELDS(ALL) FROM Invoice__c")]),
    )
    .await
    .assert_error(400, "MALFORMED_QUERY");
    emulator.stop().await;
}
