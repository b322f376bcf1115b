//! Emulator behaviour beyond plain CDC: TLS, platform events (Publish / PublishStream),
//! custom channels, idle close, overflowing transactions, diffs of long texts, and the
//! control API's reset / seed / workload / settings.

use crate::common;
use apache_avro::types::Value as AV;
use serde_json::json;
use sfmirror::emulator::{Emulator, EmulatorConfig};
use sfmirror::model::{ChangeType, ReplayId};
use sfmirror::proto::pub_sub_client::PubSubClient;
use sfmirror::proto::{
    FetchRequest, ProducerEvent, PublishRequest, ReplayPreset, SchemaRequest, TopicRequest,
};
use sfmirror::salesforce::event::EventPlan;
use std::time::Duration;
use tonic::transport::Channel;

/// The record id a real org's GAP_OVERFLOW header carries.
const OVERFLOW_ID: &str = "000000000000000AAA";

/// A bare Pub/Sub client: exactly the requests a test sends, no flow control of our own.
struct Raw {
    client: PubSubClient<Channel>,
    token: String,
    instance: String,
    tenant: String,
}

impl Raw {
    async fn connect(emulator: &Emulator) -> Raw {
        Raw {
            client: PubSubClient::connect(emulator.pubsub_endpoint.clone())
                .await
                .expect("connect"),
            token: emulator.access_token.clone(),
            instance: emulator.rest_url.clone(),
            tenant: emulator.org.org_id.clone(),
        }
    }

    fn request<T>(&self, body: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(body);
        let md = r.metadata_mut();
        md.insert("accesstoken", self.token.parse().expect("ascii"));
        md.insert("instanceurl", self.instance.parse().expect("ascii"));
        md.insert("tenantid", self.tenant.parse().expect("ascii"));
        r
    }

    async fn schema(&mut self, schema_id: &str) -> String {
        let r = self.request(SchemaRequest {
            schema_id: schema_id.to_string(),
        });
        self.client
            .get_schema(r)
            .await
            .expect("schema")
            .into_inner()
            .schema_json
    }

    /// Subscribes from EARLIEST asking for `n` events, once.
    async fn subscribe_once(
        &mut self,
        topic: &str,
        n: i32,
    ) -> tonic::Streaming<sfmirror::proto::FetchResponse> {
        let first = FetchRequest {
            topic_name: topic.to_string(),
            replay_preset: ReplayPreset::Earliest as i32,
            num_requested: n,
            ..Default::default()
        };
        // The request stream stays open (the client never closes its side) but sends nothing
        // more: the server must decide what to do with a starved stream.
        let outbound = futures::stream::iter(vec![first]).chain(futures::stream::pending());
        let r = self.request(outbound);
        self.client
            .subscribe(r)
            .await
            .expect("subscribe")
            .into_inner()
    }
}

use futures::StreamExt;

/// Events of `topic` from EARLIEST, decoded: (replay, event).
async fn events_of(
    raw: &mut Raw,
    topic: &str,
    n: usize,
) -> Vec<(ReplayId, sfmirror::model::ChangeEvent)> {
    let mut stream = raw.subscribe_once(topic, 100).await;
    let mut out = Vec::new();
    while out.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("events in time")
            .expect("no error")
            .expect("open");
        for e in r.events {
            let ev = e.event.expect("event");
            let schema = raw.schema(&ev.schema_id).await;
            let plan = EventPlan::from_json(&ev.schema_id, &schema).expect("plan");
            let (decoded, warnings) = plan
                .decode(ReplayId(e.replay_id.clone()), &ev.payload)
                .expect("decodes");
            assert!(warnings.is_empty(), "{warnings:?}");
            out.push((ReplayId(e.replay_id), decoded));
        }
    }
    out
}

fn fields(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().cloned().expect("object")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_both_apis_with_a_ca_clients_can_trust() {
    let dir = std::env::temp_dir().join(format!("sfm-emu-tls-{}", std::process::id()));
    let emulator = Emulator::start(EmulatorConfig {
        tls_dir: Some(dir.clone()),
        ..Default::default()
    })
    .await
    .expect("emulator");
    assert!(emulator.rest_url.starts_with("https://"));
    assert!(emulator.pubsub_endpoint.starts_with("https://"));
    let line = emulator.startup_json();
    let ca_file = line["ca_file"]
        .as_str()
        .expect("ca_file in the start-up line");
    let ca = std::fs::read(ca_file).expect("CA written");

    // REST over https with only the emulator's CA trusted.
    let cert = reqwest::Certificate::from_pem(&ca).expect("PEM");
    let http = reqwest::Client::builder()
        .tls_certs_only([cert])
        .build()
        .expect("client");
    let versions: serde_json::Value = http
        .get(format!("{}/services/data/", emulator.rest_url))
        .send()
        .await
        .expect("https answers")
        .json()
        .await
        .expect("json");
    assert!(versions.as_array().is_some_and(|v| !v.is_empty()));
    // Without the CA, the certificate is refused.
    let untrusting = reqwest::Client::builder()
        .tls_certs_only([])
        .build()
        .expect("client");
    assert!(
        untrusting
            .get(format!("{}/services/data/", emulator.rest_url))
            .send()
            .await
            .is_err()
    );

    // gRPC over TLS: sfmirror's own client with `ca_file`.
    let mut cfg = common::TestConfig::new(&emulator, "postgres://unused@127.0.0.1/x")
        .channels(&[("/data/AccountChangeEvent", &["Account"])])
        .build();
    cfg.salesforce.ca_file = Some(ca_file.into());
    let http = sfmirror::salesforce::client::http_client(&cfg.salesforce).expect("http");
    let auth = std::sync::Arc::new(sfmirror::salesforce::auth::Authenticator::new(
        cfg.salesforce.clone(),
        http,
    ));
    let pubsub =
        sfmirror::salesforce::pubsub::PubSub::connect(&cfg.salesforce, auth).expect("connect");
    let topic = pubsub
        .get_topic("/data/AccountChangeEvent")
        .await
        .expect("GetTopic over TLS");
    assert_eq!(topic.tenant_guid, emulator.org.org_id);
    emulator.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_events_are_published_checked_and_delivered() {
    let emulator = common::emulator().await;
    let mut raw = Raw::connect(&emulator).await;
    let topic = "/event/Order_Shipped__e";
    let info = raw
        .client
        .get_topic(raw.request(TopicRequest {
            topic_name: topic.into(),
        }))
        .await
        .expect("topic")
        .into_inner();
    assert!(info.can_publish && info.can_subscribe);
    let schema_json = raw.schema(&info.schema_id).await;
    let schema = apache_avro::Schema::parse_str(&schema_json).expect("schema");
    let datum = |n: &str| {
        AV::Record(vec![
            ("CreatedDate".into(), AV::Long(1_767_225_600_000)),
            (
                "CreatedById".into(),
                AV::String("005000000000001AAA".into()),
            ),
            (
                "Order_Number__c".into(),
                AV::Union(1, Box::new(AV::String(n.into()))),
            ),
            ("Shipped_At__c".into(), AV::Union(0, Box::new(AV::Null))),
            (
                "Weight_Kg__c".into(),
                AV::Union(1, Box::new(AV::Double(2.5))),
            ),
            (
                "Express__c".into(),
                AV::Union(1, Box::new(AV::Boolean(true))),
            ),
        ])
    };
    let good = apache_avro::to_avro_datum(&schema, datum("A-1")).expect("encode");
    let events = vec![
        ProducerEvent {
            id: "corr-1".into(),
            schema_id: info.schema_id.clone(),
            payload: good.clone().into(),
            headers: vec![],
        },
        ProducerEvent {
            id: "corr-2".into(),
            schema_id: "not-the-schema".into(),
            payload: good.clone().into(),
            headers: vec![],
        },
        ProducerEvent {
            id: "corr-3".into(),
            schema_id: info.schema_id.clone(),
            payload: good[..good.len() / 2].to_vec().into(),
            headers: vec![],
        },
        // Cut just before the trailing optional fields (all three, then the last one): the
        // Avro reader would take the end of the bytes for null branches.
        ProducerEvent {
            id: "corr-5".into(),
            schema_id: info.schema_id.clone(),
            payload: good[..good.len() - 12].to_vec().into(),
            headers: vec![],
        },
        ProducerEvent {
            id: "corr-6".into(),
            schema_id: info.schema_id.clone(),
            payload: good[..good.len() - 2].to_vec().into(),
            headers: vec![],
        },
    ];
    let answer = raw
        .client
        .publish(raw.request(PublishRequest {
            topic_name: topic.into(),
            events,
            auth_refresh: String::new(),
        }))
        .await
        .expect("publish")
        .into_inner();
    assert_eq!(answer.schema_id, info.schema_id);
    assert_eq!(answer.results.len(), 5);
    assert_eq!(answer.results[0].correlation_key, "corr-1");
    assert_eq!(answer.results[0].replay_id.len(), 8);
    assert!(answer.results[0].error.is_none());
    for bad in &answer.results[1..] {
        assert!(bad.replay_id.is_empty());
        assert!(bad.error.is_some(), "{bad:?}");
    }

    // PublishStream: one response per request.
    let second = apache_avro::to_avro_datum(&schema, datum("A-2")).expect("encode");
    let outbound = futures::stream::iter(vec![PublishRequest {
        topic_name: topic.into(),
        events: vec![ProducerEvent {
            id: "corr-4".into(),
            schema_id: info.schema_id.clone(),
            payload: second.into(),
            headers: vec![],
        }],
        auth_refresh: String::new(),
    }]);
    let mut responses = raw
        .client
        .publish_stream(raw.request(outbound))
        .await
        .expect("publish stream")
        .into_inner();
    let r = responses.message().await.expect("ok").expect("a response");
    assert_eq!(r.results[0].correlation_key, "corr-4");
    assert!(r.results[0].error.is_none());

    // Subscribers get exactly the accepted events, payload untouched.
    let mut stream = raw.subscribe_once(topic, 10).await;
    let got = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert_eq!(got.events.len(), 2);
    let first = got.events[0].event.as_ref().expect("event");
    assert_eq!(first.payload[..], good[..]);
    assert_eq!(got.events[0].replay_id, answer.results[0].replay_id);

    // CDC channels take no publishing.
    let refused = raw
        .client
        .publish(raw.request(PublishRequest {
            topic_name: "/data/AccountChangeEvent".into(),
            events: vec![],
            auth_refresh: String::new(),
        }))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_channel_carries_its_members_only() {
    let emulator = common::emulator().await;
    let org = &emulator.org;
    let account = org
        .create("Account", &fields(json!({"Name": "Chn"})), "")
        .expect("account");
    org.create("Contact", &fields(json!({"LastName": "Not here"})), "")
        .expect("contact");
    let deal = org
        .create(
            "Opportunity",
            &fields(json!({"Name": "Deal", "StageName": "Prospecting", "CloseDate": "2027-01-01"})),
            "",
        )
        .expect("opportunity");
    let mut raw = Raw::connect(&emulator).await;
    let events = events_of(&mut raw, "/data/SalesPipeline__chn", 2).await;
    let ids: Vec<(String, String)> = events
        .iter()
        .map(|(_, e)| {
            (
                e.header.entity_name.to_string(),
                e.header.record_ids[0].clone(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("Account".to_string(), account),
            ("Opportunity".to_string(), deal)
        ]
    );
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_without_credit_is_closed() {
    let emulator = Emulator::start(EmulatorConfig {
        idle_close: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .expect("emulator");
    for i in 0..3 {
        emulator
            .org
            .create("Account", &fields(json!({"Name": format!("I{i}")})), "")
            .expect("create");
    }
    let mut raw = Raw::connect(&emulator).await;
    let mut stream = raw.subscribe_once("/data/AccountChangeEvent", 1).await;
    let first = stream.message().await.expect("ok").expect("one event");
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.pending_num_requested, 0);
    // Nothing more requested: the server ends the call (OK) after the idle window.
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("closed in time");
    assert!(matches!(end, Ok(None)), "{end:?}");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_past_the_threshold_ends_in_one_overflow_event_per_entity() {
    let emulator = Emulator::start(EmulatorConfig {
        overflow_threshold: 5,
        ..Default::default()
    })
    .await
    .expect("emulator");
    for i in 0..3 {
        emulator
            .org
            .create("Contact", &fields(json!({"LastName": format!("C{i}")})), "")
            .expect("contact");
    }
    let report = common::control(
        &emulator,
        "transaction",
        json!({"steps": [
            {"create": {"object": "Account", "count": 4, "fields": {"Name": "Big"}}},
            {"update_all": {"object": "Contact", "fields": {"Title": "VP", "Department": "Ops"}}},
            {"create": {"object": "Opportunity", "count": 2,
                        "fields": {"Name": "O", "StageName": "Prospecting", "CloseDate": "2027-01-01"}}}
        ]}),
    )
    .await;
    // 4 creates fit; the first contact update counts 2 changes and crosses the threshold.
    assert_eq!(report["events"], 4, "{report}");
    assert_eq!(report["silent"], 5, "{report}");
    assert_eq!(report["overflow_events"], json!(["Contact", "Opportunity"]));

    let mut raw = Raw::connect(&emulator).await;
    let events = events_of(&mut raw, "/data/ChangeEvents", 3 + 4 + 2).await;
    let txn: Vec<_> = events[3..].iter().map(|(_, e)| &e.header).collect();
    assert!(
        txn.iter()
            .all(|h| h.transaction_key == txn[0].transaction_key)
    );
    let seq: Vec<i32> = txn.iter().map(|h| h.sequence_number).collect();
    assert_eq!(seq, [1, 2, 3, 4, 5, 6]);
    let overflow: Vec<(&str, &[String])> = txn
        .iter()
        .filter(|h| h.change_type == ChangeType::GapOverflow)
        .map(|h| (&*h.entity_name, h.record_ids.as_slice()))
        .collect();
    assert_eq!(
        overflow,
        [
            ("Contact", &[OVERFLOW_ID.to_string()][..]),
            ("Opportunity", &[OVERFLOW_ID.to_string()][..])
        ],
        "overflow events name the placeholder id, as a real org's do"
    );
    // The silent changes happened in the org all the same.
    let titles: Vec<_> = emulator
        .org
        .records("Contact")
        .iter()
        .map(|r| r["Title"].clone())
        .collect();
    assert!(titles.iter().all(|t| t == "VP"));
    assert_eq!(emulator.org.records("Opportunity").len(), 2);
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_edits_of_long_texts_travel_as_diffs() {
    let emulator = common::emulator().await;
    let org = &emulator.org;
    let text: String = (0..40)
        .map(|i| format!("Line {i}: the quick brown fox jumps over the lazy dog."))
        .collect::<Vec<_>>()
        .join("\n");
    let id = org
        .create(
            "Account",
            &fields(json!({"Name": "Diff", "Description": text})),
            "",
        )
        .expect("create");
    let edited = text.replacen("Line 5: the quick", "Line 5: the slow", 1);
    org.update(
        "Account",
        &id,
        &fields(json!({"Description": edited, "Phone": "555"})),
        "",
    )
    .expect("update");
    let short_edit = "short now".to_string();
    org.update(
        "Account",
        &id,
        &fields(json!({"Description": short_edit})),
        "",
    )
    .expect("update");
    let mut raw = Raw::connect(&emulator).await;
    let events = events_of(&mut raw, "/data/AccountChangeEvent", 3).await;
    let diffed = &events[1].1;
    assert_eq!(
        diffed.header.diff_fields,
        [std::sync::Arc::<str>::from("Description")]
    );
    assert!(
        diffed
            .header
            .changed_fields
            .iter()
            .any(|f| &**f == "Description")
    );
    let Some(sfmirror::model::Value::String(d)) = diffed.value("Description") else {
        panic!("a diff value: {:?}", diffed.value("Description"));
    };
    assert!(d.starts_with("--- \n+++ "), "{d}");
    assert!(d.contains("-Line 5: the quick") && d.contains("+Line 5: the slow"));
    assert_eq!(
        sfmirror::model::textdiff::apply(&text, d).as_deref(),
        Some(edited.as_str())
    );
    // A value below 1,000 characters is sent whole.
    let whole = &events[2].1;
    assert!(whole.header.diff_fields.is_empty());
    assert_eq!(
        whole.value("Description"),
        Some(&sfmirror::model::Value::String(short_edit))
    );
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_resets_seeds_and_runs_a_workload() {
    let emulator = common::emulator().await;
    let seeded = common::control(
        &emulator,
        "seed",
        json!({"object": "Invoice__c", "count": 25}),
    )
    .await;
    assert_eq!(seeded["ids"].as_array().map(Vec::len), Some(25));
    assert_eq!(emulator.org.records("Invoice__c").len(), 25);

    let settings = common::control(&emulator, "settings", json!({"overflow_threshold": 7})).await;
    assert_eq!(settings["overflow_threshold"], 7);

    let started = common::control(
        &emulator,
        "workload",
        json!({"rate": 400, "objects": ["Account", "Contact"]}),
    )
    .await;
    assert_eq!(started["running"], true);
    common::wait_for(
        "the workload to make changes",
        Duration::from_secs(10),
        async || emulator.org.bus.counts()["/data/ChangeEvents"] > 25 + 100,
    )
    .await;
    let stopped = common::control(&emulator, "workload/stop", json!({})).await;
    assert!(stopped["changes"].as_u64().is_some_and(|n| n >= 100));
    let stats: serde_json::Value = reqwest::get(format!("{}/emulator/stats", emulator.rest_url))
        .await
        .expect("stats")
        .json()
        .await
        .expect("json");
    assert_eq!(stats["workload"]["running"], false);
    assert_eq!(stats["overflow_threshold"], 7);

    let before = emulator.org.bus.tip();
    common::control(&emulator, "reset", json!({})).await;
    assert!(emulator.org.records("Account").is_empty());
    assert!(emulator.org.records("Invoice__c").is_empty());
    assert!(emulator.org.bus.counts().values().all(|n| *n == 0));
    assert!(emulator.org.bus.tip() >= before, "replay ids never go back");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_built_before_serving() {
    let emulator = Emulator::start(EmulatorConfig {
        backlog: Some("3000".parse().expect("spec")),
        ..Default::default()
    })
    .await
    .expect("emulator");
    assert_eq!(emulator.org.bus.counts()["/data/ChangeEvents"], 3000);
    let mut raw = Raw::connect(&emulator).await;
    let events = events_of(&mut raw, "/data/ChangeEvents", 100).await;
    let kinds: std::collections::HashSet<ChangeType> =
        events.iter().map(|(_, e)| e.header.change_type).collect();
    assert!(kinds.contains(&ChangeType::Create) && kinds.contains(&ChangeType::Update));
    emulator.stop().await;
}

/// An authenticated request to the emulator's REST API (version 62.0).
fn rest(emulator: &Emulator, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(
            method,
            format!("{}/services/data/v62.0{path}", emulator.rest_url),
        )
        .bearer_auth(&emulator.access_token)
}

async fn answer(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(json!(text)))
}

/// Formula fields are computed whenever a record is read, through every read path, from the
/// record, its parent and the clock; a write to one is refused, and a formula's value
/// changing makes no change event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formula_fields_are_computed_on_every_read_and_never_written() {
    use reqwest::Method;
    let emulator = common::emulator().await;
    let org = &emulator.org;
    assert_eq!(
        org.unsupported_formulas(),
        [],
        "the built-in org's formulas all evaluate"
    );
    let now = chrono::DateTime::from_timestamp_millis(org.now_ms()).expect("clock");
    let due = (now.date_naive() - chrono::Days::new(3)).to_string();
    let account = org
        .create(
            "Account",
            json!({"Name": "Acme"}).as_object().expect("map"),
            "",
        )
        .expect("account");
    let invoice = org
        .create(
            "Invoice__c",
            json!({"Name": "INV-1", "Account__c": account, "Status__c": "Sent",
                   "Total__c": 100.0, "Exchange_Rate__c": 1.5, "Due_Date__c": due})
            .as_object()
            .expect("map"),
            "",
        )
        .expect("invoice");

    // REST retrieve.
    let (status, got) = answer(rest(
        &emulator,
        Method::GET,
        &format!("/sobjects/Invoice__c/{invoice}"),
    ))
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["Amount_Due__c"], json!(150.0));
    assert_eq!(got["Summary__c"], "INV-1 (Sent)");
    assert_eq!(got["Account_Name__c"], "Acme");
    assert_eq!(got["Days_Overdue__c"], json!(3.0));

    // SOQL, a formula in the WHERE clause too.
    let soql = "SELECT Id, Account_Name__c, Days_Overdue__c FROM Invoice__c \
                WHERE Days_Overdue__c > 2";
    let (status, page) = answer(rest(&emulator, Method::GET, "/query").query(&[("q", soql)])).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["totalSize"], 1, "{page}");
    assert_eq!(page["records"][0]["Account_Name__c"], "Acme");

    // sObject Collections.
    let (status, rows) = answer(
        rest(&emulator, Method::POST, "/composite/sobjects/Invoice__c")
            .json(&json!({"ids": [invoice], "fields": ["Summary__c", "Amount_Due__c"]})),
    )
    .await;
    assert_eq!(status, 200, "{rows}");
    assert_eq!(rows[0]["Summary__c"], "INV-1 (Sent)");

    // The parent changes: the formula follows, and only the Account's event is published.
    let before = org.bus.counts();
    org.update(
        "Account",
        &account,
        json!({"Name": "Acme Corp"}).as_object().expect("map"),
        "",
    )
    .expect("update");
    let after = org.bus.counts();
    assert_eq!(
        after["/data/Invoice__ChangeEvent"], before["/data/Invoice__ChangeEvent"],
        "no event for a formula's new value"
    );
    assert_eq!(
        after["/data/AccountChangeEvent"],
        before["/data/AccountChangeEvent"] + 1
    );

    // The clock moves: TODAY() does too.
    org.advance_clock(2 * 86_400_000);

    // Bulk API 2.0 reads the same values.
    let (status, job) = answer(rest(&emulator, Method::POST, "/jobs/query").json(&json!({
        "operation": "query",
        "query": "SELECT Id, Account_Name__c, Days_Overdue__c FROM Invoice__c"
    })))
    .await;
    assert_eq!(status, 200, "{job}");
    let id = job["id"].as_str().expect("job id").to_string();
    // A job moves one state per poll.
    for _ in 0..3 {
        let (_, info) = answer(rest(&emulator, Method::GET, &format!("/jobs/query/{id}"))).await;
        if info["state"] == "JobComplete" {
            break;
        }
    }
    let csv = rest(&emulator, Method::GET, &format!("/jobs/query/{id}/results"))
        .send()
        .await
        .expect("results")
        .text()
        .await
        .expect("csv");
    let row = csv
        .lines()
        .find(|l| l.contains(&invoice))
        .unwrap_or_else(|| panic!("no row for the invoice: {csv}"));
    let cells: Vec<&str> = row.split(',').map(|c| c.trim_matches('"')).collect();
    assert_eq!(cells, [invoice.as_str(), "Acme Corp", "5.0"], "{csv}");

    // Writes to a formula are refused as Salesforce refuses them.
    let (status, err) = answer(
        rest(
            &emulator,
            Method::PATCH,
            &format!("/sobjects/Invoice__c/{invoice}"),
        )
        .json(&json!({"Summary__c": "mine"})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err[0]["errorCode"], "INVALID_FIELD_FOR_INSERT_UPDATE");
    let (status, err) = answer(
        rest(&emulator, Method::POST, "/sobjects/Invoice__c")
            .json(&json!({"Name": "INV-2", "Amount_Due__c": 1})),
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err[0]["errorCode"], "INVALID_FIELD_FOR_INSERT_UPDATE");
    emulator.stop().await;
}

/// A person-account org, from the built-in flag or from an org directory with such an
/// Account: person accounts derive their Name, business accounts set it, over REST and SOQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn person_account_orgs_derive_person_names_over_rest() {
    use reqwest::Method;
    let dir = std::env::temp_dir().join(format!("sfmirror-person-org-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("org dir");
    let org_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/emulator/org");
    for (from, to) in [
        ("PersonAccount.json", "Account.json"),
        ("Contact.json", "Contact.json"),
    ] {
        std::fs::copy(org_dir.join(from), dir.join(to)).expect("copy describe");
    }
    let flag = EmulatorConfig {
        person_accounts: true,
        ..Default::default()
    };
    let directory = EmulatorConfig {
        org_dir: Some(dir.clone()),
        ..Default::default()
    };
    for cfg in [flag, directory] {
        let emulator = Emulator::start(cfg).await.expect("emulator");
        let (status, describe) =
            answer(rest(&emulator, Method::GET, "/sobjects/Account/describe")).await;
        assert_eq!(status, 200, "{describe}");
        let person_type = describe["recordTypeInfos"]
            .as_array()
            .expect("record types")
            .iter()
            .find(|rt| rt["developerName"] == "PersonAccount")
            .and_then(|rt| rt["recordTypeId"].as_str())
            .expect("a PersonAccount record type")
            .to_string();
        let (status, created) = answer(rest(&emulator, Method::POST, "/sobjects/Account").json(
            &json!({
                "RecordTypeId": person_type, "Salutation": "Dr.", "FirstName": "Grace",
                "LastName": "Hopper", "PersonEmail": "grace@example.com"}),
        ))
        .await;
        assert_eq!(status, 201, "{created}");
        let (status, _) = answer(
            rest(&emulator, Method::POST, "/sobjects/Account").json(&json!({"Name": "Acme"})),
        )
        .await;
        assert_eq!(status, 201);
        let soql = "SELECT Name, IsPersonAccount, PersonEmail FROM Account ORDER BY Name";
        let (status, page) =
            answer(rest(&emulator, Method::GET, "/query").query(&[("q", soql)])).await;
        assert_eq!(status, 200, "{page}");
        let rows: Vec<(String, bool)> = page["records"]
            .as_array()
            .expect("records")
            .iter()
            .map(|r| {
                (
                    r["Name"].as_str().expect("Name").to_string(),
                    r["IsPersonAccount"].as_bool().expect("flag"),
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("Acme".to_string(), false),
                ("Grace Hopper".to_string(), true)
            ]
        );
        // A person needs a last name.
        let (status, err) = answer(
            rest(&emulator, Method::POST, "/sobjects/Account")
                .json(&json!({"RecordTypeId": person_type, "FirstName": "Ada"})),
        )
        .await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err[0]["errorCode"], "REQUIRED_FIELD_MISSING");
        emulator.stop().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}
