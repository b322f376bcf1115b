//! The emulator's Pub/Sub API as a client sees it: replay presets, flow control, keepalives,
//! errors with Salesforce's `error-code` trailer, and metadata auth.

use crate::common;
use serde_json::json;
use sfmirror::config::Config;
use sfmirror::demo::RestWriter;
use sfmirror::emulator::{Emulator, EmulatorConfig};
use sfmirror::model::{ChangeType, ReplayId};
use sfmirror::proto::FetchRequest;
use sfmirror::proto::pub_sub_client::PubSubClient;
use sfmirror::salesforce::SourceError;
use sfmirror::salesforce::auth::Authenticator;
use sfmirror::salesforce::event::EventPlan;
use sfmirror::salesforce::pubsub::{PubSub, StartAt};
use std::sync::Arc;
use std::time::Duration;

const TOPIC: &str = "/data/AccountChangeEvent";

async fn client(emulator: &Emulator) -> (PubSub, Config) {
    let cfg = common::TestConfig::new(emulator, "postgres://unused@127.0.0.1/x")
        .channels(&[(TOPIC, &["Account"])])
        .build();
    let http = reqwest::Client::new();
    let auth = Arc::new(Authenticator::new(cfg.salesforce.clone(), http));
    (
        PubSub::connect(&cfg.salesforce, auth).expect("connect"),
        cfg,
    )
}

async fn create_accounts(emulator: &Emulator, n: usize) -> Vec<String> {
    let w = RestWriter::new(emulator);
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            w.create("Account", json!({"Name": format!("A{i}")}))
                .await
                .expect("create"),
        );
    }
    ids
}

/// Reads events until `n` arrived (or a timeout), returning their replay ids.
async fn read_events(
    sub: &mut sfmirror::salesforce::pubsub::Subscription,
    n: usize,
) -> Vec<(ReplayId, sfmirror::proto::ProducerEvent)> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("events in time")
            .expect("no stream error")
            .expect("stream open");
        assert!(
            r.pending_num_requested <= 100,
            "never more than 100 outstanding"
        );
        for e in r.events {
            out.push((ReplayId(e.replay_id), e.event.expect("body")));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presets_deliver_from_the_right_place_and_payloads_decode() {
    let emulator = common::emulator().await;
    let (pubsub, _) = client(&emulator).await;
    let ids = create_accounts(&emulator, 5).await;

    // EARLIEST: everything retained, in order, decodable by the schema GetSchema returns.
    let mut sub = pubsub
        .subscribe(TOPIC, StartAt::Earliest)
        .await
        .expect("subscribe");
    let events = read_events(&mut sub, 5).await;
    let schema_json = pubsub
        .get_schema(&events[0].1.schema_id)
        .await
        .expect("schema");
    let plan = EventPlan::from_json(&events[0].1.schema_id, &schema_json).expect("plan");
    for ((replay, ev), id) in events.iter().zip(&ids) {
        let (decoded, warnings) = plan.decode(replay.clone(), &ev.payload).expect("decodes");
        assert!(warnings.is_empty());
        assert_eq!(decoded.header.change_type, ChangeType::Create);
        assert_eq!(decoded.header.record_ids, std::slice::from_ref(id));
        assert_eq!(&*decoded.header.entity_name, "Account");
    }
    let replays: Vec<u64> = events
        .iter()
        .map(|e| e.0.as_u64().expect("8 bytes"))
        .collect();
    assert!(
        replays.windows(2).all(|w| w[0] < w[1]),
        "increasing: {replays:?}"
    );

    // CUSTOM: strictly after the given id.
    let mut sub = pubsub
        .subscribe(TOPIC, StartAt::After(events[2].0.clone()))
        .await
        .expect("subscribe custom");
    let after = read_events(&mut sub, 2).await;
    assert_eq!(after[0].0, events[3].0);
    assert_eq!(after[1].0, events[4].0);

    // LATEST: only what comes next.
    let mut sub = pubsub
        .subscribe(TOPIC, StartAt::Latest)
        .await
        .expect("subscribe latest");
    let new_ids = create_accounts(&emulator, 1).await;
    let next = read_events(&mut sub, 1).await;
    let (decoded, _) = plan
        .decode(next[0].0.clone(), &next[0].1.payload)
        .expect("decodes");
    assert_eq!(decoded.header.record_ids, new_ids);
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_never_exceeds_what_was_requested() {
    let emulator = common::emulator().await;
    create_accounts(&emulator, 30).await;
    let (_, cfg) = client(&emulator).await;
    let token = emulator.access_token.clone();
    let mut raw = PubSubClient::connect(cfg.salesforce.pubsub_endpoint.clone())
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(FetchRequest {
        topic_name: TOPIC.into(),
        replay_preset: 1, // EARLIEST
        num_requested: 7,
        ..Default::default()
    })
    .await
    .expect("send");
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("accesstoken", token.parse().expect("ascii"));
    req.metadata_mut()
        .insert("instanceurl", emulator.rest_url.parse().expect("ascii"));
    req.metadata_mut()
        .insert("tenantid", emulator.org.org_id.parse().expect("ascii"));
    let mut stream = raw.subscribe(req).await.expect("subscribe").into_inner();
    let mut got = 0;
    while got < 7 {
        let r = stream.message().await.expect("ok").expect("open");
        got += r.events.len();
        assert_eq!(r.pending_num_requested as usize, 7 - got);
    }
    assert_eq!(got, 7);
    // Nothing more arrives until more is requested.
    let idle = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(idle.is_err(), "no event beyond the allowance");
    tx.send(FetchRequest {
        num_requested: 3,
        ..Default::default()
    })
    .await
    .expect("send more");
    let mut more = 0;
    while more < 3 {
        more += stream
            .message()
            .await
            .expect("ok")
            .expect("open")
            .events
            .len();
    }
    assert_eq!(more, 3);
    emulator.stop().await;
}

/// The error of a refused subscription, whether the server refused the call or its stream.
async fn refused(
    opened: Result<sfmirror::salesforce::pubsub::Subscription, SourceError>,
) -> SourceError {
    match opened {
        Err(e) => e,
        Ok(mut sub) => sub.next().await.expect_err("refused"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_replay_ids_auth_and_topics_fail_like_salesforce() {
    let emulator = common::emulator().await;
    let (pubsub, _) = client(&emulator).await;

    let far_future = ReplayId::from_u64(u64::MAX / 2);
    let err = refused(pubsub.subscribe(TOPIC, StartAt::After(far_future)).await).await;
    assert!(err.is_replay_rejected(), "{err}");
    match &err {
        SourceError::Grpc {
            code, error_code, ..
        } => {
            assert_eq!(*code, tonic::Code::InvalidArgument);
            assert_eq!(
                error_code,
                "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"
            );
        }
        other => panic!("unexpected {other}"),
    }

    let err = refused(
        pubsub
            .subscribe("/data/NoSuchChangeEvent", StartAt::Latest)
            .await,
    )
    .await;
    assert!(!err.is_transient(), "topic not found is definite: {err}");

    let err = pubsub
        .get_schema("nonexistent")
        .await
        .expect_err("unknown schema");
    assert!(!err.is_transient(), "{err}");

    // An expired session is refused with the auth error code, and renewed by the client.
    let _ = pubsub.get_topic(TOPIC).await.expect("topic before expiry");
    reqwest::Client::new()
        .post(format!("{}/emulator/expire-tokens", emulator.rest_url))
        .send()
        .await
        .expect("expire");
    let info = pubsub
        .get_topic(TOPIC)
        .await
        .expect("renewed transparently");
    assert_eq!(info.tenant_guid, emulator.org.org_id);
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_carry_the_latest_replay_id() {
    let emulator = Emulator::start(EmulatorConfig {
        keepalive: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .expect("emulator");
    create_accounts(&emulator, 2).await;
    let (pubsub, _) = client(&emulator).await;
    let mut sub = pubsub
        .subscribe(TOPIC, StartAt::Earliest)
        .await
        .expect("subscribe");
    let events = read_events(&mut sub, 2).await;
    let keepalive = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("keepalive in time")
        .expect("ok")
        .expect("open");
    assert!(keepalive.events.is_empty());
    let latest = ReplayId(keepalive.latest_replay_id);
    assert!(latest.as_u64() >= events[1].0.as_u64());
    emulator.stop().await;
}

/// The delivery allocation error as Salesforce sends it: the `error-code` trailer names
/// `subscription.limit.exceeded`.
fn assert_limit_exceeded(err: &SourceError) {
    match err {
        SourceError::Grpc {
            code, error_code, ..
        } => {
            assert_eq!(*code, tonic::Code::ResourceExhausted, "{err}");
            assert_eq!(
                error_code,
                "sfdc.platform.eventbus.grpc.subscription.limit.exceeded"
            );
        }
        other => panic!("unexpected {other}"),
    }
}

/// `(Max, Remaining)` of one `/limits` key.
async fn limit(emulator: &Emulator, key: &str) -> (i64, i64) {
    let limits: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/services/data/v62.0/limits", emulator.rest_url))
        .bearer_auth(&emulator.access_token)
        .send()
        .await
        .expect("limits")
        .json()
        .await
        .expect("JSON");
    (
        limits[key]["Max"].as_i64().expect("Max"),
        limits[key]["Remaining"].as_i64().expect("Remaining"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_allocation_is_counted_org_wide_and_enforced() {
    let emulator = Emulator::start(EmulatorConfig {
        delivery_allocation: Some(5),
        ..Default::default()
    })
    .await
    .expect("emulator");
    let (pubsub, _) = client(&emulator).await;
    create_accounts(&emulator, 3).await;
    assert_eq!(
        limit(&emulator, "DailyDeliveredPlatformEvents").await,
        (5, 5)
    );
    let (monthly_max, _) = limit(&emulator, "MonthlyPlatformEventsUsageEntitlement").await;
    assert!(monthly_max > 0);

    // Two subscribers, two channels: every delivery counts against the one allocation.
    let mut first = pubsub
        .subscribe(TOPIC, StartAt::Earliest)
        .await
        .expect("subscribe");
    assert_eq!(read_events(&mut first, 3).await.len(), 3);
    assert_eq!(
        limit(&emulator, "DailyDeliveredPlatformEvents").await,
        (5, 2)
    );
    let mut second = pubsub
        .subscribe("/data/ChangeEvents", StartAt::Earliest)
        .await
        .expect("subscribe while 2 remain");
    // Only the 2 left are delivered, then the stream ends with the limit error.
    let mut delivered = 0;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), second.next())
            .await
            .expect("an answer in time")
        {
            Ok(Some(r)) => delivered += r.events.len(),
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(delivered, 2, "nothing past the allocation");
    assert_limit_exceeded(&err);
    assert_eq!(
        limit(&emulator, "DailyDeliveredPlatformEvents").await,
        (5, 0)
    );

    // The first stream, still open, ends at its next delivery attempt.
    create_accounts(&emulator, 1).await;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), first.next())
            .await
            .expect("an answer in time")
        {
            Ok(Some(r)) => assert!(r.events.is_empty(), "no event past the allocation"),
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_limit_exceeded(&err);
    // New Subscribe calls are refused.
    let err = refused(pubsub.subscribe(TOPIC, StartAt::Earliest).await).await;
    assert_limit_exceeded(&err);

    // The window rolls with the emulator's clock.
    emulator.org.advance_clock(24 * 3_600_000 + 60_000);
    assert_eq!(
        limit(&emulator, "DailyDeliveredPlatformEvents").await,
        (5, 5)
    );
    let mut again = pubsub
        .subscribe(TOPIC, StartAt::Latest)
        .await
        .expect("subscribe after the window rolled");
    create_accounts(&emulator, 1).await;
    assert_eq!(read_events(&mut again, 1).await.len(), 1);

    // The control API lifts the allocation at run time.
    let settings =
        common::control(&emulator, "settings", json!({"delivery_allocation": null})).await;
    assert_eq!(settings["delivery_allocation"], serde_json::Value::Null);
    assert_eq!(emulator.org.delivery_allocation(), None);
    emulator.stop().await;
}
