//! Streaming replication against the emulator: every change type, compound and typed fields,
//! multi-record events, delete modes, schema changes mid-stream, and the faults a long-lived
//! subscriber meets (expired tokens, dropped streams, unavailable service, corrupt payloads).

use crate::common;
use crate::common::{Daemon, TestConfig, TestDb, control, object_drift, wait_for};
use serde_json::json;
use sfmirror::config::Config;
use sfmirror::demo::RestWriter;
use sfmirror::emulator::{Emulator, EmulatorConfig};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn config(
    emulator: &Emulator,
    db: &TestDb,
    channels: &[(&str, &[&str])],
    delete_mode: &str,
) -> Config {
    let mut cfg = TestConfig::new(emulator, &db.url)
        .channels(channels)
        .build();
    cfg.replica.delete_mode = match delete_mode {
        "hard" => sfmirror::config::DeleteMode::Hard,
        _ => sfmirror::config::DeleteMode::Soft,
    };
    cfg.sync.batch_max_wait_ms = 20;
    cfg.sync.reconnect_min_ms = 50;
    cfg.sync.reconnect_max_ms = 500;
    cfg.sync.repair_idle_ms = 100;
    cfg
}

async fn converged(emulator: &Emulator, db: &TestDb, objects: &[&str]) {
    let t0 = std::time::Instant::now();
    loop {
        let mut drift = Vec::new();
        for o in objects {
            drift.extend(object_drift(emulator, db, "salesforce", o).await);
        }
        if drift.is_empty() {
            return;
        }
        if t0.elapsed() > WAIT {
            panic!(
                "replica did not converge: {:#?}",
                &drift[..drift.len().min(20)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The org's `limits` resource.
async fn limits(emulator: &Emulator) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("{}/services/data/v62.0/limits", emulator.rest_url))
        .bearer_auth(&emulator.access_token)
        .send()
        .await
        .expect("limits")
        .json()
        .await
        .expect("json")
}

/// A JSON object literal as the field map the emulator's org takes.
fn fields(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// Waits until the repair worker has emptied the queue.
async fn repairs_drained(client: &tokio_postgres::Client) {
    wait_for("the repair queue to drain", WAIT, async || {
        client
            .query_one("SELECT count(*) FROM sfmirror.repair_queue", &[])
            .await
            .map(|r| r.get::<_, i64>(0) == 0)
            .unwrap_or(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_type_over_three_channels_converges() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[
            ("/data/AccountChangeEvent", &["Account"]),
            ("/data/ContactChangeEvent", &["Contact"]),
            ("/data/OpportunityChangeEvent", &["Opportunity"]),
        ],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);

    let mut accounts = Vec::new();
    for i in 0..6 {
        accounts.push(
            w.create(
                "Account",
                json!({
                    "Name": format!("Acme {i}"), "Type": "Customer", "Industry": "Energy",
                    "BillingStreet": "1 Main St\nSuite 2", "BillingCity": "Paris",
                    "BillingPostalCode": "75001", "BillingLatitude": 48.856613,
                    "BillingLongitude": 2.352222, "ShippingCountry": "France",
                    "Phone": "+33 1 23 45 67 89", "Website": "https://acme.example",
                    "AnnualRevenue": 1234567.0, "NumberOfEmployees": 250 + i,
                    "Description": "Unicode: é ü 漢字 🚀, quotes ' \" and a\ttab",
                    "Rating": "Warm", "YearStarted": "1999"
                }),
            )
            .await
            .expect("account"),
        );
    }
    let contact = w
        .create(
            "Contact",
            json!({"LastName": "Curie", "FirstName": "Marie", "Salutation": "Dr.",
                   "Email": "marie@example.org", "Birthdate": "1867-11-07",
                   "MailingCity": "Warsaw", "AccountId": accounts[0]}),
        )
        .await
        .expect("contact");
    let opportunity = w
        .create(
            "Opportunity",
            json!({"Name": "Big deal", "StageName": "Prospecting", "CloseDate": "2027-03-31",
                   "Amount": 99999.99, "Probability": 12.5, "AccountId": accounts[1]}),
        )
        .await
        .expect("opportunity");

    // Field-level updates, including nulls and compound components.
    w.update(
        "Account",
        &accounts[0],
        json!({"Rating": "Hot", "Phone": null, "BillingCity": "Lyon"}),
    )
    .await
    .expect("update");
    w.update(
        "Contact",
        &contact,
        json!({"FirstName": "Maria", "Birthdate": null}),
    )
    .await
    .expect("update");
    w.update(
        "Opportunity",
        &opportunity,
        json!({"StageName": "Closed Won", "Amount": 120000.5}),
    )
    .await
    .expect("update");
    // One transaction, several records, one event with several recordIds.
    control(
        &emulator,
        "mass-update",
        json!({"object": "Account", "ids": [accounts[2], accounts[3], accounts[4]],
               "fields": {"Industry": "Banking", "Description": null}}),
    )
    .await;
    // Delete; delete then undelete.
    w.delete("Account", &accounts[5]).await.expect("delete");
    w.delete("Account", &accounts[4]).await.expect("delete");
    control(
        &emulator,
        "undelete",
        json!({"object": "Account", "id": accounts[4]}),
    )
    .await;
    w.update("Account", &accounts[4], json!({"Site": "HQ"}))
        .await
        .expect("update after undelete");

    converged(&emulator, &db, &["Account", "Contact", "Opportunity"]).await;
    let client = db.client().await;
    let deleted: bool = client
        .query_one(
            "SELECT _sfm_deleted FROM salesforce.account WHERE id = $1",
            &[&accounts[5]],
        )
        .await
        .expect("deleted row kept")
        .get(0);
    assert!(deleted, "soft delete keeps the row, marked");
    let types: Vec<(String, String)> = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = 'salesforce' AND table_name = 'opportunity'
               AND column_name IN ('amount', 'probability', 'closedate', 'createddate')
             ORDER BY column_name",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        types,
        [
            ("amount".to_string(), "numeric".to_string()),
            ("closedate".into(), "date".into()),
            ("createddate".into(), "timestamp with time zone".into()),
            ("probability".into(), "numeric".into()),
        ]
    );
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_delete_removes_rows_and_keeps_a_tombstone() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/ChangeEvents", &["Account"])],
        "hard",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let keep = w
        .create("Account", json!({"Name": "keep"}))
        .await
        .expect("create");
    let gone = w
        .create("Account", json!({"Name": "gone"}))
        .await
        .expect("create");
    w.delete("Account", &gone).await.expect("delete");
    let client = db.client().await;
    wait_for("the tombstone", WAIT, async || {
        client
            .query_opt(
                "SELECT 1 FROM sfmirror.tombstones WHERE object = 'Account' AND id = $1",
                &[&gone],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    let ids: Vec<String> = client
        .query("SELECT id FROM salesforce.account", &[])
        .await
        .expect("rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [keep]);
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_added_mid_stream_becomes_a_column() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let id = w
        .create("Account", json!({"Name": "before"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    let new_schema = control(
        &emulator,
        "add-field",
        json!({"object": "Account", "field": {
            "name": "Loyalty_Tier__c", "type": "double", "label": "Loyalty Tier",
            "precision": 4, "scale": 1, "nillable": true, "createable": true,
            "updateable": true, "custom": true}}),
    )
    .await;
    assert!(
        new_schema["schema_id"]
            .as_str()
            .is_some_and(|s| s.len() == 22)
    );
    // A new checkbox is false on every existing record at once, with no change event: only
    // reading the object again brings that into the rows the replica already has.
    control(
        &emulator,
        "add-field",
        json!({"object": "Account", "field": {
            "name": "Vip__c", "type": "boolean", "label": "VIP", "nillable": false,
            "createable": true, "updateable": true, "custom": true, "defaultValue": false}}),
    )
    .await;
    w.update(
        "Account",
        &id,
        json!({"Loyalty_Tier__c": 3.5, "Name": "after"}),
    )
    .await
    .expect("update with the new field");
    w.create("Account", json!({"Name": "new", "Loyalty_Tier__c": 1.0}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    let client = db.client().await;
    let tier: f64 = client
        .query_one(
            "SELECT loyalty_tier__c::float8 FROM salesforce.account WHERE id = $1",
            &[&id],
        )
        .await
        .expect("new column")
        .get(0);
    assert_eq!(tier, 3.5);
    let vip: Option<bool> = client
        .query_one(
            "SELECT vip__c FROM salesforce.account WHERE id = $1",
            &[&id],
        )
        .await
        .expect("checkbox column")
        .get(0);
    assert_eq!(vip, Some(false), "the existing record was read again");
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_the_repair_worker_adds_first_still_brings_the_re_read() {
    // A repair that describes the object after a field was added creates the column before
    // any event of the new schema reaches the channel; the re-read of existing records must
    // not depend on which task got there first.
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let id = w
        .create("Account", json!({"Name": "before the checkbox"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    let client = db.client().await;
    repairs_drained(&client).await;
    control(
        &emulator,
        "add-field",
        json!({"object": "Account", "field": {
            "name": "Vip__c", "type": "boolean", "label": "VIP", "nillable": false,
            "createable": true, "updateable": true, "custom": true, "defaultValue": false}}),
    )
    .await;
    // An entity repair of a recent window (it describes afresh, so it adds the column).
    client
        .execute(
            "INSERT INTO sfmirror.repair_queue (object, kind, since, reason)
             VALUES ('Account', 'entity', now(), 'a recent window')",
            &[],
        )
        .await
        .expect("queue a repair");
    wait_for("the existing record's checkbox", WAIT, async || {
        client
            .query_opt(
                "SELECT vip__c FROM salesforce.account WHERE id = $1 AND vip__c IS NOT NULL",
                &[&id],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    converged(&emulator, &db, &["Account"]).await;
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_picklists_and_the_xyz_sub_field_no_describe_lists() {
    // Turning on state and country picklists gives Address records the layout of real
    // captures: StateCode, CountryCode, and `Xyz`, which no describe lists. The new components
    // become columns, `Xyz` is left out, and the channel goes on.
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let id = w
        .create("Account", json!({"Name": "Acme", "BillingCity": "Paris"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    for name in ["BillingStateCode", "BillingCountryCode"] {
        control(
            &emulator,
            "add-field",
            json!({"object": "Account", "field": {
                "name": name, "type": "picklist", "label": name, "length": 255,
                "nillable": true, "createable": true, "updateable": true,
                "compoundFieldName": "BillingAddress", "picklistValues": []}}),
        )
        .await;
    }
    let schema: serde_json::Value = serde_json::from_str(
        &emulator
            .org
            .schema_json(
                &emulator
                    .org
                    .object("Account")
                    .expect("Account")
                    .schema
                    .schema_id,
            )
            .expect("schema"),
    )
    .expect("schema JSON");
    assert!(
        schema.to_string().contains("\"Xyz\""),
        "the new Address record carries Xyz"
    );
    w.update(
        "Account",
        &id,
        json!({"BillingCity": "Sacramento", "BillingStateCode": "CA", "BillingCountryCode": "US"}),
    )
    .await
    .expect("update");
    let other = w
        .create("Account", json!({"Name": "Beta", "BillingStateCode": "NY"}))
        .await
        .expect("create");
    w.update("Account", &other, json!({"BillingStateCode": null}))
        .await
        .expect("null a component");
    converged(&emulator, &db, &["Account"]).await;
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT billingcity, billingstatecode, billingcountrycode
             FROM salesforce.account WHERE id = $1",
            &[&id],
        )
        .await
        .expect("row");
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("Sacramento")
    );
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("CA"));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("US"));
    let xyz: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_schema = 'salesforce' AND table_name = 'account'
               AND column_name LIKE '%xyz%'",
            &[],
        )
        .await
        .expect("columns")
        .get(0);
    assert_eq!(xyz, 0, "no column for a field describe does not list");
    assert!(!daemon.task.is_finished(), "the channel is still running");
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_deleted_from_the_org_keeps_its_column_and_stops_nothing() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    for name in ["Tier__c", "Rank__c"] {
        control(
            &emulator,
            "add-field",
            json!({"object": "Account", "field": {
                "name": name, "type": "double", "label": name, "precision": 6, "scale": 0,
                "nillable": true, "createable": true, "updateable": true, "custom": true}}),
        )
        .await;
    }
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let id = w
        .create(
            "Account",
            json!({"Name": "Acme", "Tier__c": 1, "Rank__c": 1}),
        )
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    let client = db.client().await;
    let values = async || -> (Option<f64>, Option<f64>, String) {
        let row = client
            .query_one(
                "SELECT tier__c::float8, rank__c::float8, name FROM salesforce.account
                 WHERE id = $1",
                &[&id],
            )
            .await
            .expect("row");
        (row.get(0), row.get(1), row.get(2))
    };

    // While the daemon runs: the change made before the deletion reaches the kept column,
    // even when it is planned after a newer schema (a field added since) made the daemon
    // describe the object again. The long linger holds that change in the batch until the
    // newer event has been decoded.
    daemon.stop().await;
    let mut lingering = cfg.clone();
    lingering.sync.batch_linger_ms = 3000;
    lingering.sync.batch_max_wait_ms = 10_000;
    let daemon = Daemon::start(&emulator, &lingering).await;
    w.update("Account", &id, json!({"Tier__c": 3}))
        .await
        .expect("update");
    control(
        &emulator,
        "remove-field",
        json!({"object": "Account", "field": "Tier__c"}),
    )
    .await;
    control(
        &emulator,
        "add-field",
        json!({"object": "Account", "field": {
            "name": "Extra__c", "type": "string", "label": "Extra", "length": 20,
            "nillable": true, "createable": true, "updateable": true, "custom": true}}),
    )
    .await;
    w.update(
        "Account",
        &id,
        json!({"Name": "after Tier__c", "Extra__c": "x"}),
    )
    .await
    .expect("update");
    converged(&emulator, &db, &["Account"]).await;
    assert_eq!(
        values().await,
        (Some(3.0), Some(1.0), "after Tier__c".into())
    );

    // Deleted while the daemon was down: the backlog's events still carry the field, which
    // the fresh describe no longer lists. They replicate the rest; the column keeps its last
    // value; the channel goes on.
    daemon.stop().await;
    w.update(
        "Account",
        &id,
        json!({"Rank__c": 4, "Name": "before Rank__c"}),
    )
    .await
    .expect("update");
    control(
        &emulator,
        "remove-field",
        json!({"object": "Account", "field": "Rank__c"}),
    )
    .await;
    let daemon = Daemon::start(&emulator, &cfg).await;
    converged(&emulator, &db, &["Account"]).await;
    assert_eq!(
        values().await,
        (Some(3.0), Some(1.0), "before Rank__c".into())
    );
    w.update("Account", &id, json!({"Name": "still replicating"}))
        .await
        .expect("update");
    converged(&emulator, &db, &["Account"]).await;
    assert_eq!(values().await.2, "still replicating");
    assert!(!daemon.task.is_finished(), "the channel is still running");
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_dropped_streams_and_refusals_are_survived() {
    sfmirror::telemetry::init_logging();
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    w.create("Account", json!({"Name": "one"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;

    // Expire every token (the writer registers its own again), then drop the streams.
    control(&emulator, "expire-tokens", json!({})).await;
    emulator.org.register_token(&emulator.access_token, None);
    control(&emulator, "drop-streams", json!({})).await;
    w.create("Account", json!({"Name": "two"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;

    // Service refused for a moment: the channel backs off and comes back.
    let subs_before = emulator.subscription_count();
    control(&emulator, "refuse", json!({"seconds": 0.5})).await;
    w.create("Account", json!({"Name": "three"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    wait_for("a new subscription after the refusal", WAIT, async || {
        emulator.subscription_count() > subs_before
    })
    .await;
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_refused_together_share_one_new_login() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let objects = ["Account", "Contact", "Opportunity"];
    let cfg = config(
        &emulator,
        &db,
        &[
            ("/data/AccountChangeEvent", &["Account"]),
            ("/data/ContactChangeEvent", &["Contact"]),
            ("/data/OpportunityChangeEvent", &["Opportunity"]),
        ],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    w.create("Account", json!({"Name": "one"}))
        .await
        .expect("create");
    converged(&emulator, &db, &objects).await;

    control(&emulator, "expire-tokens", json!({})).await;
    emulator.org.register_token(&emulator.access_token, None);
    control(&emulator, "drop-streams", json!({})).await;
    w.create("Account", json!({"Name": "two"}))
        .await
        .expect("create");
    w.create("Contact", json!({"LastName": "Two"}))
        .await
        .expect("create");
    converged(&emulator, &db, &objects).await;
    wait_for("all three channels back", WAIT, async || {
        emulator.subscription_count() >= 6
    })
    .await;
    // Every token now valid was issued after the expiry: the writer's, and the daemon's.
    assert_eq!(
        emulator.org.token_count(),
        2,
        "the three channels renewed the refused session with one login"
    );
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_access_token_that_cannot_be_renewed_stops_the_channel() {
    // With `auth = "access_token"` nothing can get a new session: once Salesforce refuses the
    // token, retrying for ever would only hide the problem. The channel stops with the login's
    // own message, and with it the daemon (its only channel).
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let mut cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let token = emulator.org.issue_token(None);
    let text = format!(
        r#"
        [salesforce]
        auth = "access_token"
        access_token = "{token}"
        instance_url = "{rest}"
        pubsub_endpoint = "{grpc}"
        [replica]
        url = "{db}"
        [[channels]]
        name = "/data/AccountChangeEvent"
        objects = ["Account"]
        "#,
        rest = emulator.rest_url,
        grpc = emulator.pubsub_endpoint,
        db = db.url,
    );
    cfg.salesforce = Config::from_toml(&text).expect("config").salesforce;
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    w.create("Account", json!({"Name": "one"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;

    control(&emulator, "expire-tokens", json!({})).await;
    emulator.org.register_token(&emulator.access_token, None);
    control(&emulator, "drop-streams", json!({})).await;
    let ended = tokio::time::timeout(WAIT, daemon.task)
        .await
        .expect("the daemon stops instead of retrying for ever")
        .expect("join");
    let err = ended.expect_err("the channel stopped with an error");
    assert!(err.to_string().contains("every channel stopped"), "{err}");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemon_leaves_no_task_behind() {
    // The crash tests kill the daemon by dropping its future; a task that outlived it (the
    // repair worker) would go on writing to the replica as a second, invisible daemon.
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let id = w
        .create("Account", json!({"Name": "one"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    let client = db.client().await;
    repairs_drained(&client).await;
    daemon.task.abort();
    let _ = daemon.task.await;

    client
        .execute(
            "INSERT INTO sfmirror.repair_queue (object, kind, record_id, reason)
             VALUES ('Account', 'record', $1, 'left for the next daemon')",
            &[&id],
        )
        .await
        .expect("queue a repair");
    // The test config's repair worker polls every 100 ms.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let left: i64 = client
        .query_one("SELECT count(*) FROM sfmirror.repair_queue", &[])
        .await
        .expect("queue")
        .get(0);
    assert_eq!(left, 1, "no repair worker runs after the daemon was killed");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_payloads_are_dead_lettered_and_the_channel_goes_on() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    control(&emulator, "corrupt", json!({"count": 1})).await;
    w.create("Account", json!({"Name": "corrupted event"}))
        .await
        .expect("create");
    w.create("Account", json!({"Name": "fine"}))
        .await
        .expect("create");
    let client = db.client().await;
    wait_for("the dead letter", WAIT, async || {
        client
            .query_opt("SELECT 1 FROM sfmirror.dead_letters", &[])
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
    let dead = client
        .query_one(
            "SELECT channel, length(payload), error FROM sfmirror.dead_letters",
            &[],
        )
        .await
        .expect("one dead letter");
    assert_eq!(dead.get::<_, String>(0), "/data/AccountChangeEvent");
    assert!(dead.get::<_, i32>(1) > 0, "raw bytes kept");
    // The entity repair queued with the dead letter brings the lost record in, and the
    // channel goes on with later events.
    w.create("Account", json!({"Name": "after"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_in_a_backlog_is_covered_from_before_its_own_commit() {
    // The undecodable event's commit time cannot be read. The event after it in the backlog
    // committed an hour later, so a repair window that starts from that one would miss the
    // lost change; the window must start no later than the last position known before it.
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let lost = w
        .create("Account", json!({"Name": "lost's first name"}))
        .await
        .expect("create");
    let later = w
        .create("Account", json!({"Name": "later"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    daemon.stop().await;

    control(&emulator, "corrupt", json!({"count": 1})).await;
    w.update(
        "Account",
        &lost,
        json!({"Name": "changed by the lost event"}),
    )
    .await
    .expect("update");
    control(&emulator, "advance-clock", json!({"seconds": 3600})).await;
    w.update("Account", &later, json!({"Name": "an hour later"}))
        .await
        .expect("update");
    let daemon = Daemon::start(&emulator, &cfg).await;
    converged(&emulator, &db, &["Account"]).await;
    let client = db.client().await;
    let dead: i64 = client
        .query_one("SELECT count(*) FROM sfmirror.dead_letters", &[])
        .await
        .expect("dead letters")
        .get(0);
    assert_eq!(dead, 1);
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_overflows_and_wildcards_are_repaired_until_the_replica_equals_the_org() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let mut cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    cfg.sync.repair_idle_ms = 50;
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            w.create("Account", json!({"Name": format!("gap {i}")}))
                .await
                .expect("create"),
        );
    }
    converged(&emulator, &db, &["Account"]).await;
    // Changes Salesforce could not send as events: only gap events arrive.
    control(
        &emulator,
        "gap",
        json!({"object": "Account", "change_type": "GAP_UPDATE", "ids": [ids[0], ids[1]],
               "fields": {"Rating": "Cold", "Phone": "555-0199"}}),
    )
    .await;
    control(
        &emulator,
        "gap",
        json!({"object": "Account", "change_type": "GAP_CREATE",
               "create": [{"Name": "created without an event"}]}),
    )
    .await;
    control(
        &emulator,
        "gap",
        json!({"object": "Account", "change_type": "GAP_DELETE", "ids": [ids[2]]}),
    )
    .await;
    // An overflow: many silent changes, one GAP_OVERFLOW for the entity.
    control(
        &emulator,
        "gap",
        json!({"object": "Account", "change_type": "GAP_OVERFLOW", "ids": [ids[3], ids[4]],
               "fields": {"Industry": "Mining"}}),
    )
    .await;
    // A wildcard (field type conversion): every record may have changed.
    control(
        &emulator,
        "gap",
        json!({"object": "Account", "change_type": "GAP_UPDATE", "ids": ["001*"]}),
    )
    .await;
    converged(&emulator, &db, &["Account"]).await;
    let client = db.client().await;
    repairs_drained(&client).await;
    let deleted: bool = client
        .query_one(
            "SELECT _sfm_deleted FROM salesforce.account WHERE id = $1",
            &[&ids[2]],
        )
        .await
        .expect("row")
        .get(0);
    assert!(deleted, "GAP_DELETE confirmed through queryAll");
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_events_queue_repairs_with_the_checkpoint_that_passes_them() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let mut cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    // The worker checks once at start, then sleeps: what the stream queues stays visible.
    cfg.sync.repair_idle_ms = 600_000;
    let daemon = Daemon::start(&emulator, &cfg).await;
    let client = db.client().await;
    let w = RestWriter::new(&emulator);
    let a = w
        .create("Account", json!({"Name": "a"}))
        .await
        .expect("create");
    let b = w
        .create("Account", json!({"Name": "b"}))
        .await
        .expect("create");
    control(
        &emulator,
        "gap",
        json!({"object": "Account", "change_type": "GAP_UPDATE", "ids": [a, b]}),
    )
    .await;
    control(
        &emulator,
        "gap",
        json!({"object": "Account", "change_type": "GAP_OVERFLOW"}),
    )
    .await;
    let tip = emulator.org.bus.tip().to_be_bytes().to_vec();
    wait_for("the last gap event", WAIT, async || {
        client
            .query_opt("SELECT replay_id FROM sfmirror.checkpoints", &[])
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, Vec<u8>>(0) == tip)
    })
    .await;
    let queued: Vec<(String, Option<String>)> = client
        .query(
            "SELECT kind, record_id FROM sfmirror.repair_queue ORDER BY kind, record_id",
            &[],
        )
        .await
        .expect("queue")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut want = [a, b];
    want.sort();
    // One entity repair: the overflow's, merged with the first start's if that is still there.
    assert_eq!(
        queued,
        [
            ("entity".to_string(), None),
            ("record".to_string(), Some(want[0].clone())),
            ("record".to_string(), Some(want[1].clone())),
        ]
    );
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_type_round_trips_with_values_and_nulls() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/Invoice__ChangeEvent", &["Invoice__c"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let account = w
        .create("Account", json!({"Name": "Buyer"}))
        .await
        .expect("account");
    let full = json!({
        "Name": "INV-0001", "Account__c": account, "Status__c": "Sent",
        "Tags__c": "Urgent;Export", "Channel__c": "Web", "Memo__c": "short memo",
        "Notes__c": "long\nnotes ".repeat(500), "Contact_Phone__c": "+1 555 0100",
        "Portal_Url__c": "https://billing.example/inv/1", "Billing_Email__c": "ap@example.com",
        "Tax_Id__c": "FR-123", "Paid__c": true, "Line_Count__c": 12,
        "Sequence__c": 9_007_199_254_740_993i64, "Exchange_Rate__c": 1.084512,
        "Total__c": 12345.67, "Discount__c": 7.5, "Due_Date__c": "2027-01-31",
        "Sent_At__c": "2026-11-20T08:15:30.000+0000", "Cutoff_Time__c": "17:30:00.000Z",
        "Attachment__c": "SGVsbG8sIHdvcmxkIQ==", "Site__Latitude__s": 48.8566,
        "Site__Longitude__s": 2.3522
    });
    let id = w.create("Invoice__c", full.clone()).await.expect("invoice");
    let empty = w
        .create("Invoice__c", json!({"Name": "INV-EMPTY"}))
        .await
        .expect("invoice");
    converged(&emulator, &db, &["Invoice__c"]).await;
    // Every nullable field set to null on the first invoice, one update.
    let mut nulls = serde_json::Map::new();
    for (k, _) in full.as_object().expect("object") {
        if k != "Name" && k != "Paid__c" {
            nulls.insert(k.clone(), serde_json::Value::Null);
        }
    }
    w.update("Invoice__c", &id, serde_json::Value::Object(nulls))
        .await
        .expect("nulls");
    w.update("Invoice__c", &empty, full.clone())
        .await
        .expect("values by update");
    converged(&emulator, &db, &["Invoice__c"]).await;
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT sequence__c, tags__c, cutoff_time__c::text, attachment__c,
                    site__latitude__s::float8
             FROM salesforce.invoice__c WHERE id = $1",
            &[&empty],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, i64>(0), 9_007_199_254_740_993);
    assert_eq!(row.get::<_, String>(1), "Urgent;Export");
    assert_eq!(row.get::<_, String>(2), "17:30:00");
    assert_eq!(row.get::<_, Vec<u8>>(3), b"Hello, world!");
    assert_eq!(row.get::<_, f64>(4), 48.8566);
    // Long text and binary columns compress with lz4 where the server has it (the long notes
    // above went through it), the other columns are left as the server makes them.
    let lz4: bool = client
        .query_opt(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
            &[],
        )
        .await
        .expect("settings")
        .and_then(|r| r.get::<_, Option<bool>>(0))
        .unwrap_or(false);
    let methods: Vec<(String, String)> = client
        .query(
            "SELECT format_type(atttypid, NULL), attcompression::text FROM pg_attribute
             WHERE attrelid = 'salesforce.invoice__c'::regclass AND attnum > 0
               AND left(attname, 5) <> '_sfm_' AND attname <> 'id'
             GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("columns")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (kind, method) in &methods {
        let want = if lz4 && (kind == "text" || kind == "bytea") {
            "l"
        } else {
            ""
        };
        assert_eq!(method, want, "{kind} columns: {methods:?}");
    }
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_move_an_idle_channels_checkpoint() {
    let db = TestDb::create().await;
    let emulator = Emulator::start(EmulatorConfig {
        keepalive: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .expect("emulator");
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    // Only Contacts change: the Account channel sees keepalives, never an event.
    w.create("Contact", json!({"LastName": "Idle"}))
        .await
        .expect("contact");
    let tip = emulator.org.bus.tip();
    let client = db.client().await;
    wait_for("the keepalive position", WAIT, async || {
        client
            .query_opt("SELECT replay_id FROM sfmirror.checkpoints", &[])
            .await
            .ok()
            .flatten()
            .map(|r| r.get::<_, Vec<u8>>(0))
            .is_some_and(|b| b == tip.to_be_bytes())
    })
    .await;
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_with_a_definite_error_stops_alone() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[
            ("/data/NoSuchThingChangeEvent", &["Account"]),
            ("/data/ContactChangeEvent", &["Contact"]),
        ],
        "soft",
    );
    let daemon = Daemon::spawn(&cfg, None);
    wait_for("the good channel", WAIT, async || {
        emulator.subscription_count() >= 1
    })
    .await;
    let w = RestWriter::new(&emulator);
    w.create("Contact", json!({"LastName": "Still here"}))
        .await
        .expect("contact");
    converged(&emulator, &db, &["Contact"]).await;
    assert!(
        !daemon.task.is_finished(),
        "the daemon keeps running the good channel"
    );
    daemon.stop().await;

    // The bad channel did stop rather than retry for ever: alone, it ends the daemon.
    let alone = config(
        &emulator,
        &db,
        &[("/data/NoSuchThingChangeEvent", &["Account"])],
        "soft",
    );
    let ended = tokio::time::timeout(WAIT, Daemon::spawn(&alone, None).task)
        .await
        .expect("a definite error stops the channel instead of retrying")
        .expect("the daemon task does not panic");
    let err = ended.expect_err("its only channel stopped");
    assert!(err.to_string().contains("every channel stopped"), "{err}");
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_is_resubscribed_by_the_watchdog() {
    let db = TestDb::create().await;
    // Keepalives far apart: an idle stream says nothing at all.
    let emulator = Emulator::start(EmulatorConfig {
        keepalive: Duration::from_secs(3600),
        ..Default::default()
    })
    .await
    .expect("emulator");
    let mut cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    cfg.sync.stale_stream_secs = 1;
    let daemon = Daemon::start(&emulator, &cfg).await;
    let first = emulator.subscription_count();
    wait_for("a resubscription", WAIT, async || {
        emulator.subscription_count() > first
    })
    .await;
    let w = RestWriter::new(&emulator);
    w.create("Account", json!({"Name": "after the watchdog"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_down_past_the_retention_converges_through_repairs() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            w.create("Account", json!({"Name": format!("kept {i}")}))
                .await
                .expect("create"),
        );
    }
    converged(&emulator, &db, &["Account"]).await;
    daemon.stop().await;

    // While the subscriber is down: every kind of change, then 73 hours pass and the events
    // are purged.
    let new = w
        .create("Account", json!({"Name": "created while down"}))
        .await
        .expect("create");
    w.update(
        "Account",
        &ids[0],
        json!({"Rating": "Hot", "Phone": "555-0142"}),
    )
    .await
    .expect("update");
    w.delete("Account", &ids[1]).await.expect("delete");
    w.delete("Account", &ids[2]).await.expect("delete");
    control(
        &emulator,
        "undelete",
        json!({"object": "Account", "id": ids[2]}),
    )
    .await;
    let purged = control(&emulator, "advance-clock", json!({"seconds": 73 * 3600})).await;
    assert!(purged["purged_events"].as_u64().unwrap_or(0) > 0);

    let daemon = Daemon::start(&emulator, &cfg).await;
    converged(&emulator, &db, &["Account"]).await;
    let client = db.client().await;
    let resets: i64 = client
        .query_one(
            "SELECT count(*) FROM salesforce.account WHERE id = $1 AND NOT _sfm_deleted",
            &[&new],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(
        resets, 1,
        "the record created while down arrived through the repair"
    );
    // The channel went on from LATEST: new changes stream in again.
    w.create("Account", json!({"Name": "after the reset"}))
        .await
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    daemon.stop().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_transaction_and_long_text_diffs_converge() {
    let db = TestDb::create().await;
    let emulator = Emulator::start(EmulatorConfig {
        overflow_threshold: 25,
        ..Default::default()
    })
    .await
    .expect("emulator");
    let objects = ["Account", "Contact", "Opportunity"];
    let mut cfg = config(&emulator, &db, &[("/data/ChangeEvents", &objects)], "soft");
    cfg.sync.repair_idle_ms = 50;
    // Overflow windows hold more than 5 records: the entity repairs go over Bulk API 2.0.
    cfg.sync.repair_bulk_threshold = 5;
    // Several chunks per Bulk repair: each commits and renews the repair's lease.
    cfg.sync.repair_chunk_rows = 3;
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let long = contract_text(50);
    let account = w
        .create("Account", json!({"Name": "Long text", "Description": long}))
        .await
        .expect("create");
    for i in 0..10 {
        w.create("Contact", json!({"LastName": format!("Before {i}")}))
            .await
            .expect("contact");
        w.create(
            "Opportunity",
            json!({"Name": format!("Deal {i}"), "StageName": "Prospecting",
                   "CloseDate": "2027-03-01"}),
        )
        .await
        .expect("opportunity");
    }
    converged(&emulator, &db, &objects).await;

    // A one-line edit of a long text arrives as a diff (diffFields); the replica must end
    // with the full new text.
    w.update(
        "Account",
        &account,
        json!({"Description": long.replacen("Clause 7: the supplier", "Clause 7: the buyer", 1)}),
    )
    .await
    .expect("update");

    // One transaction of 12 + 20 + 10 changes against a threshold of 25: the creates and part
    // of the contact updates get events, the rest only GAP_OVERFLOW per entity.
    let report = control(
        &emulator,
        "transaction",
        json!({"steps": [
            {"create": {"object": "Account", "count": 12, "fields": {"Name": "Bulk"}}},
            {"update_all": {"object": "Contact", "fields": {"Title": "Buyer", "Department": "Ops"}}},
            {"delete_all": {"object": "Opportunity"}}
        ]}),
    )
    .await;
    assert_eq!(
        report["overflow_events"],
        json!(["Contact", "Opportunity"]),
        "{report}"
    );
    converged(&emulator, &db, &objects).await;
    let client = db.client().await;
    repairs_drained(&client).await;
    let live_deals: i64 = client
        .query_one(
            "SELECT count(*) FROM salesforce.opportunity WHERE NOT _sfm_deleted",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(live_deals, 0, "deletions inside the overflow were found");
    let limits = limits(&emulator).await;
    let jobs = &limits["DailyBulkV2QueryJobs"];
    assert!(
        jobs["Max"].as_i64().unwrap_or(0) - jobs["Remaining"].as_i64().unwrap_or(0) >= 2,
        "both overflowed entities were re-read over Bulk API: {jobs}"
    );
    daemon.stop().await;
    emulator.stop().await;
}

/// API calls the emulator has counted so far, this `limits` call included.
async fn api_calls_used(emulator: &Emulator) -> i64 {
    let limits = limits(emulator).await;
    let api = &limits["DailyApiRequests"];
    api["Max"].as_i64().unwrap_or(0) - api["Remaining"].as_i64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_text_diffs_apply_in_place_and_fall_back_to_a_re_read() {
    let db = TestDb::create().await;
    let emulator = common::emulator().await;
    let objects = ["Account"];
    let cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &objects)],
        "soft",
    );
    let daemon = Daemon::start(&emulator, &cfg).await;
    let w = RestWriter::new(&emulator);
    let long = contract_text(60);
    let id = w
        .create("Account", json!({"Name": "Contract", "Description": long}))
        .await
        .expect("create");
    converged(&emulator, &db, &objects).await;
    let client = db.client().await;
    repairs_drained(&client).await;
    let description = async |client: &tokio_postgres::Client| -> Option<String> {
        client
            .query_one(
                "SELECT description FROM salesforce.account WHERE id = $1",
                &[&id],
            )
            .await
            .ok()
            .and_then(|r| r.get(0))
    };

    // A one-line edit arrives as a diff and is applied to the replica's value: the only API
    // call in between is the update itself (no re-read).
    let edited = long.replacen("Clause 7: the supplier", "Clause 7: the buyer", 1);
    let before = api_calls_used(&emulator).await;
    w.update("Account", &id, json!({"Description": edited}))
        .await
        .expect("update");
    wait_for("the edited text", WAIT, async || {
        description(&client).await.as_deref() == Some(edited.as_str())
    })
    .await;
    repairs_drained(&client).await;
    assert_eq!(
        api_calls_used(&emulator).await - before,
        2,
        "the update and this count: the diff was applied without reading the record again"
    );

    // The replica's value has drifted: the next diff does not fit it, so the column is left
    // alone (never set to the diff text) and the record is read again.
    client
        .execute(
            "UPDATE salesforce.account SET description = 'drifted' WHERE id = $1",
            &[&id],
        )
        .await
        .expect("drift");
    let edited_again = edited.replacen("Clause 9: the supplier", "Clause 9: nobody", 1);
    let before = api_calls_used(&emulator).await;
    w.update("Account", &id, json!({"Description": edited_again}))
        .await
        .expect("update");
    wait_for("the re-read text", WAIT, async || {
        let now = description(&client).await;
        assert!(
            !now.as_deref().unwrap_or("").starts_with("--- "),
            "a diff was stored as the value: {now:?}"
        );
        now.as_deref() == Some(edited_again.as_str())
    })
    .await;
    assert!(
        api_calls_used(&emulator).await - before > 2,
        "the record was read again"
    );
    converged(&emulator, &db, &objects).await;
    daemon.stop().await;
    emulator.stop().await;
}

/// A long text of `clauses` lines: long enough for Salesforce to send its edits as diffs.
fn contract_text(clauses: usize) -> String {
    (0..clauses)
        .map(|i| format!("Clause {i}: the supplier delivers on time and in full."))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The checkpoint move of a batch whose transaction started while the batch before it was in
/// flight: it moves only from the position that batch committed, so a batch never commits
/// after one that rolled back (which would skip that one's events), and the position that
/// batch has not committed yet does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_moves_the_checkpoint_only_from_where_the_batch_before_committed_it() {
    use sfmirror::model::ReplayId;
    use sfmirror::replica::checkpoint::{self, Checkpoint};
    const CHANNEL: &str = "/data/ChangeEvents";
    let db = TestDb::create().await;
    let pool = db.migrated_pool().await;
    let mut client = pool.get().await.expect("connection");
    let at = |n: u64| Checkpoint {
        replay_id: ReplayId::from_u64(n),
        commit_timestamp_ms: Some(n as i64),
    };
    let fence = owned(&mut client, CHANNEL).await;
    let fence = &fence;
    let stored = async || {
        let c = pool.get().await.expect("connection");
        checkpoint::load(&c, "sfmirror", CHANNEL)
            .await
            .expect("load")
            .map(|c| c.replay_id)
    };
    // Batch N+1's move, from N's position, in a transaction of its own: whether it moved.
    let behind = async |from: &ReplayId, to: u64| {
        let mut c = pool.get().await.expect("connection");
        let tx = c.transaction().await.expect("begin");
        let moved = checkpoint::advance(&tx, "sfmirror", fence, from, &at(to))
            .await
            .expect("advance");
        tx.commit().await.expect("commit");
        moved
    };
    checkpoint::save(&client, "sfmirror", fence, &at(1))
        .await
        .expect("save");

    for first_commits in [false, true] {
        let base = stored().await.expect("a checkpoint");
        let n = base.as_u64().expect("numeric");
        let next = ReplayId::from_u64(n + 1);
        // Batch N has moved the checkpoint and not committed yet.
        let mut first = pool.get().await.expect("connection");
        let tx = first.transaction().await.expect("begin");
        let moved = checkpoint::advance(&tx, "sfmirror", fence, &base, &at(n + 1))
            .await
            .expect("advance");
        assert!(moved, "batch N moves the checkpoint from where it is");
        assert!(
            !behind(&next, n + 2).await,
            "N's position does not count before N commits"
        );
        if first_commits {
            tx.commit().await.expect("commit N");
        } else {
            tx.rollback().await.expect("roll back N");
        }
        assert_eq!(
            behind(&next, n + 2).await,
            first_commits,
            "N+1 moves the checkpoint exactly when N committed"
        );
        let want = if first_commits {
            ReplayId::from_u64(n + 2)
        } else {
            base
        };
        assert_eq!(stored().await, Some(want));
    }
}

/// A backlog taken in batches of a few events, where every batch writes records the batch
/// before it also writes: two batches are in flight at once, the later one writing the
/// shared records only after the earlier one committed. The replica must end equal to the
/// org, and the checkpoint at the last event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_in_small_overlapping_batches_converges() {
    let emulator = common::emulator().await;
    let db = TestDb::create().await;
    let mut cfg = config(
        &emulator,
        &db,
        &[("/data/ChangeEvents", &["Account", "Contact"])],
        "soft",
    );
    cfg.sync.batch_max_events = 7;
    let org = emulator.org.clone();
    // A first start, so that the backlog below is read from the stream, not re-read.
    let daemon = Daemon::start(&emulator, &cfg).await;
    let first = org
        .create("Account", &fields(json!({"Name": "first"})), "")
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    repairs_drained(&db.client().await).await;
    daemon.stop().await;

    let mut records = vec![("Account", first)];
    for i in 0..12 {
        let object = if i % 3 == 0 { "Contact" } else { "Account" };
        let body = if object == "Contact" {
            json!({"LastName": format!("Contact {i}")})
        } else {
            json!({"Name": format!("Account {i}")})
        };
        records.push((
            object,
            org.create(object, &fields(body), "").expect("create"),
        ));
    }
    let mut deleted: Vec<(&str, String)> = Vec::new();
    for i in 0..400usize {
        // Mostly the same few records, so consecutive batches share them.
        let (object, id) = records[(i * 7 + i / 5) % records.len()].clone();
        match i % 23 {
            5 => {
                org.delete(object, &id, "").expect("delete");
                records.retain(|(_, r)| *r != id);
                deleted.push((object, id));
            }
            17 if !deleted.is_empty() => {
                let (object, id) = deleted.remove(0);
                org.undelete(object, &id, "").expect("undelete");
                records.push((object, id));
            }
            _ => {
                let body = if object == "Contact" {
                    json!({"Title": format!("title {i}"), "Department": if i % 2 == 0 { json!(null) } else { json!(format!("d{i}")) }})
                } else {
                    json!({"Description": format!("update {i}"), "NumberOfEmployees": i})
                };
                org.update(object, &id, &fields(body), "").expect("update");
            }
        }
    }
    let tip = org.bus.tip();
    let subscribed = emulator.subscription_count();
    let daemon = Daemon::start(&emulator, &cfg).await;
    converged(&emulator, &db, &["Account", "Contact"]).await;
    let client = db.client().await;
    wait_for("the checkpoint to reach the last event", WAIT, async || {
        client
            .query_one(
                "SELECT replay_id FROM sfmirror.checkpoints WHERE channel = '/data/ChangeEvents'",
                &[],
            )
            .await
            .map(|r| r.get::<_, Vec<u8>>(0) == tip.to_be_bytes().to_vec())
            .unwrap_or(false)
    })
    .await;
    // In one go: no batch failed (a lock cycle between the two in flight, say) and retried.
    assert_eq!(emulator.subscription_count(), subscribed + 1);
    daemon.stop().await;
}

/// Two batches in flight and a third transaction that closes a lock cycle through them: it
/// holds a record the earlier batch needs and then asks for one the later batch has written.
/// The later batch waits for the earlier one inside Postgres (on its advisory lock), so the
/// deadlock detector sees the cycle and breaks it; a wait inside the daemon would leave all
/// three blocked for good. The replica then converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_cycle_through_two_batches_in_flight_is_broken() {
    let emulator = common::emulator().await;
    let db = TestDb::create().await;
    let mut cfg = config(
        &emulator,
        &db,
        &[("/data/AccountChangeEvent", &["Account"])],
        "soft",
    );
    cfg.sync.batch_max_events = 1;
    let org = emulator.org.clone();
    let daemon = Daemon::start(&emulator, &cfg).await;
    let x = org
        .create("Account", &fields(json!({"Name": "X"})), "")
        .expect("create");
    let y = org
        .create("Account", &fields(json!({"Name": "Y"})), "")
        .expect("create");
    converged(&emulator, &db, &["Account"]).await;
    repairs_drained(&db.client().await).await;

    // The third transaction takes X first.
    let third = db.client().await;
    third.batch_execute("BEGIN").await.expect("begin");
    third
        .execute(
            "UPDATE salesforce.account SET description = 'held' WHERE id = $1",
            &[&x],
        )
        .await
        .expect("lock X");
    // Batch N (X) waits for it; batch N+1 (Y) writes Y, then waits for N.
    org.update("Account", &x, &fields(json!({"Description": "x2"})), "")
        .expect("update X");
    org.update("Account", &y, &fields(json!({"Description": "y2"})), "")
        .expect("update Y");
    let watcher = db.client().await;
    wait_for("a batch waiting for the one before", WAIT, async || {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event = 'advisory'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
    })
    .await;
    // Closing the cycle: Y is locked by N+1, which waits for N, which waits for this.
    let closed = tokio::time::timeout(
        WAIT,
        third.execute(
            "UPDATE salesforce.account SET description = 'held' WHERE id = $1",
            &[&y],
        ),
    )
    .await;
    assert!(
        closed.is_ok(),
        "the lock cycle was not broken: the third transaction still waits for Y"
    );
    third.batch_execute("ROLLBACK").await.expect("roll back");
    converged(&emulator, &db, &["Account"]).await;
    daemon.stop().await;
}

/// Takes `channel`'s lease in the `sfmirror` control schema, as a daemon would, and returns
/// the fence its checkpoint writes need.
async fn owned(
    client: &mut deadpool_postgres::Client,
    channel: &str,
) -> sfmirror::replica::ownership::Fence {
    use sfmirror::replica::ownership::{self, Fence, Instance, Take};
    let me = Instance::new();
    let lease = std::time::Duration::from_secs(60);
    let wait = std::time::Duration::from_secs(2);
    match ownership::take(client, "sfmirror", &me, channel, lease, wait, |_| false).await {
        Ok(Take::Taken { epoch, .. }) => Fence {
            channel: channel.to_string(),
            epoch,
            instance: me.id,
        },
        other => panic!("cannot take {channel}: {other:?}"),
    }
}
