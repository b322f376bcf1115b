//! Snapshot rows against a real Postgres: the guarded merge keeps a row the stream has moved
//! past and asks for it to be read again; rows it may write are written.

mod common;

use common::TestDb;
use serde_json::json;
use sfmirror::config::DeleteMode;
use sfmirror::model::ObjectDescribe;
use sfmirror::replica::apply::{ApplySettings, RepairRequest};
use sfmirror::replica::schema::TableSchema;
use sfmirror::replica::snapshot::{apply_snapshot, row_from_json};

const DESCRIBE: &str = r#"{"name":"Account","keyPrefix":"001","fields":[
  {"name":"Id","type":"id"},
  {"name":"Name","type":"string"},
  {"name":"AnnualRevenue","type":"currency","precision":18,"scale":2},
  {"name":"SystemModstamp","type":"datetime"}]}"#;

#[tokio::test]
async fn rows_the_stream_moved_past_are_kept_and_read_again() {
    let db = TestDb::create().await;
    let mut cfg = deadpool_postgres::Config::new();
    cfg.url = Some(db.url.clone());
    let pool = cfg.create_pool(None, tokio_postgres::NoTls).expect("pool");
    let mut client = pool.get().await.expect("client");
    sfmirror::replica::migrate::migrate(&mut client, "salesforce", "sfmirror")
        .await
        .expect("migrate");
    let describe: ObjectDescribe = serde_json::from_str(DESCRIBE).expect("describe");
    let table = TableSchema::from_describe(describe).expect("table");
    table.ensure(&client, "salesforce").await.expect("ensure");
    let settings = ApplySettings {
        data_schema: "salesforce".to_string(),
        control_schema: "sfmirror".to_string(),
        delete_mode: DeleteMode::Soft,
        repair_margin_ms: 0,
    };
    // The stream already wrote a newer state of `newer`; `older` holds an older one.
    let snapshot_ms = 1_767_322_245_000i64;
    client
        .batch_execute(&format!(
            "INSERT INTO salesforce.account (id, name, _sfm_version) VALUES
               ('001000000000001AAA', 'from the stream', {}),
               ('001000000000002AAA', 'stale', {})",
            snapshot_ms + 5_000,
            snapshot_ms - 5_000
        ))
        .await
        .expect("seed");
    let stamp = "2026-01-02T02:50:45.000+0000";
    let rows: Vec<_> = [
        ("001000000000001AAA", "read earlier"),
        ("001000000000002AAA", "read now"),
        ("001000000000003AAA", "new"),
    ]
    .iter()
    .map(|(id, name)| {
        row_from_json(
            &table,
            &json!({"Id": id, "Name": name, "AnnualRevenue": 1250.5, "SystemModstamp": stamp}),
        )
        .expect("row")
    })
    .collect();
    let tx = client.transaction().await.expect("tx");
    let outcome = apply_snapshot(&tx, &settings, &table, &rows, None)
        .await
        .expect("apply");
    tx.commit().await.expect("commit");
    let asked: Vec<&str> = outcome
        .repairs
        .iter()
        .map(|r| match r {
            RepairRequest::Record { id, .. } => id.as_str(),
            RepairRequest::Entity { object, .. } => object.as_str(),
        })
        .collect();
    assert_eq!(
        asked,
        ["001000000000001AAA"],
        "only the newer row is read again"
    );
    let names: Vec<(String, Option<String>, Option<String>)> = client
        .query(
            "SELECT id, name, annualrevenue::text FROM salesforce.account ORDER BY id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        names,
        [
            (
                "001000000000001AAA".to_string(),
                Some("from the stream".to_string()),
                None
            ),
            (
                "001000000000002AAA".to_string(),
                Some("read now".to_string()),
                Some("1250.50".to_string())
            ),
            (
                "001000000000003AAA".to_string(),
                Some("new".to_string()),
                Some("1250.50".to_string())
            ),
        ]
    );
}
