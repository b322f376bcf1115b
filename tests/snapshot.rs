//! Snapshot rows against a real Postgres: the guarded merge keeps a row the stream has moved
//! past and asks for it to be read again; rows it may write are written.

use crate::common::TestDb;
use serde_json::json;
use sfmirror::config::DeleteMode;
use sfmirror::model::ObjectDescribe;
use sfmirror::replica::ApplySettings;
use sfmirror::replica::repair_queue::RepairRequest;
use sfmirror::replica::schema::TableSchema;
use sfmirror::replica::snapshot::{apply_snapshot, row_from_json};

const DESCRIBE: &str = r#"{"name":"Account","keyPrefix":"001","fields":[
  {"name":"Id","type":"id"},
  {"name":"Name","type":"string"},
  {"name":"AnnualRevenue","type":"currency","precision":18,"scale":2},
  {"name":"SystemModstamp","type":"datetime"}]}"#;

#[tokio::test]
async fn rows_the_stream_moved_past_are_kept_and_read_again() {
    let (_db, pool, table, settings) = fresh(DeleteMode::Soft).await;
    let mut client = pool.get().await.expect("client");
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

/// A hard DELETE of the stream and a snapshot row of the same record (read while it was
/// live) in transactions that overlap: whichever order they reach Postgres in, the record
/// stays deleted. The snapshot's tombstone check cannot see a tombstone that is not committed
/// yet, and a hard delete leaves no row for the two to meet on, so the merge must wait for
/// the delete (`replica::locks`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_row_never_brings_back_a_record_deleted_beside_it() {
    for existed in [true, false] {
        let (_db, pool, table, settings) = fresh(DeleteMode::Hard).await;
        let table = std::sync::Arc::new(table);
        let id = "001000000000009AAA";
        let read_ms = 1_767_322_245_000i64;
        if existed {
            let client = pool.get().await.expect("client");
            client
                .execute(
                    "INSERT INTO salesforce.account (id, name, _sfm_version) VALUES ($1, 'live', $2)",
                    &[&id, &(read_ms - 10_000)],
                )
                .await
                .expect("seed");
        }
        // The stream deletes the record after the snapshot read it, and has not committed.
        let mut stream = pool.get().await.expect("client");
        let stream_tx = stream.transaction().await.expect("tx");
        let tables: std::collections::HashMap<_, _> =
            [("Account".to_string(), table.clone())].into();
        sfmirror::replica::apply::apply_events(
            &stream_tx,
            &settings,
            &tables,
            vec![delete_event(id, read_ms + 5_000)],
        )
        .await
        .expect("delete");
        // The snapshot merge runs beside it.
        let snapshot = {
            let (pool, table, settings) = (pool.clone(), table.clone(), settings.clone());
            tokio::spawn(async move {
                let mut client = pool.get().await.expect("client");
                let tx = client.transaction().await.expect("tx");
                let row = row_from_json(
                    &table,
                    &json!({"Id": id, "Name": "read while live",
                            "SystemModstamp": "2026-01-02T02:50:45.000+0000"}),
                )
                .expect("row");
                apply_snapshot(&tx, &settings, &table, &[row], None)
                    .await
                    .expect("snapshot");
                tx.commit().await.expect("commit snapshot");
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        stream_tx.commit().await.expect("commit delete");
        snapshot.await.expect("snapshot task");
        let client = pool.get().await.expect("client");
        let left = client
            .query_opt("SELECT name FROM salesforce.account WHERE id = $1", &[&id])
            .await
            .expect("read");
        assert!(
            left.is_none(),
            "the deleted record came back (row existed before: {existed})"
        );
    }
}

/// The other way round: a snapshot that read the record deleted (newer) and a stream change
/// of it that is older, applied beside it. The older change must not bring the record back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_stream_change_never_brings_back_a_record_a_snapshot_deletes_beside_it() {
    let (_db, pool, table, settings) = fresh(DeleteMode::Hard).await;
    let table = std::sync::Arc::new(table);
    let id = "001000000000008AAA";
    let deleted_ms = 1_767_322_245_000i64;
    {
        let client = pool.get().await.expect("client");
        client
            .execute(
                "INSERT INTO salesforce.account (id, name, _sfm_version) VALUES ($1, 'live', $2)",
                &[&id, &(deleted_ms - 60_000)],
            )
            .await
            .expect("seed");
    }
    // The snapshot read the record in the recycle bin and has not committed.
    let mut snapshot = pool.get().await.expect("client");
    let snapshot_tx = snapshot.transaction().await.expect("tx");
    let row = row_from_json(
        &table,
        &json!({"Id": id, "Name": "in the bin", "IsDeleted": true,
                "SystemModstamp": "2026-01-02T02:50:45.000+0000"}),
    )
    .expect("row");
    apply_snapshot(&snapshot_tx, &settings, &table, &[row], None)
        .await
        .expect("snapshot");
    // The stream, behind, applies an older change of the record beside it.
    let stream = {
        let (pool, table, settings) = (pool.clone(), table.clone(), settings.clone());
        tokio::spawn(async move {
            let mut client = pool.get().await.expect("client");
            let tx = client.transaction().await.expect("tx");
            let tables: std::collections::HashMap<_, _> = [("Account".to_string(), table)].into();
            let mut create = delete_event(id, deleted_ms - 30_000);
            create.header.change_type = sfmirror::model::ChangeType::Create;
            sfmirror::replica::apply::apply_events(&tx, &settings, &tables, vec![create])
                .await
                .expect("create");
            tx.commit().await.expect("commit create");
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    snapshot_tx.commit().await.expect("commit snapshot");
    stream.await.expect("stream task");
    let client = pool.get().await.expect("client");
    let left = client
        .query_opt("SELECT name FROM salesforce.account WHERE id = $1", &[&id])
        .await
        .expect("read");
    assert!(left.is_none(), "the older change brought the record back");
}

fn delete_event(id: &str, commit_ms: i64) -> sfmirror::model::ChangeEvent {
    use sfmirror::model::{ChangeEvent, ChangeHeader, ChangeType, ReplayId};
    ChangeEvent {
        replay_id: ReplayId::from_u64(1),
        schema_id: "s".into(),
        header: ChangeHeader {
            entity_name: "Account".into(),
            record_ids: vec![id.to_string()],
            change_type: ChangeType::Delete,
            change_origin: String::new(),
            transaction_key: "t".into(),
            sequence_number: 1,
            commit_timestamp: commit_ms,
            commit_number: 1,
            commit_user: String::new(),
            changed_fields: vec![],
            nulled_fields: vec![],
            diff_fields: vec![],
        },
        fields: vec![],
        schema_fields: std::sync::Arc::from(Vec::<std::sync::Arc<str>>::new()),
    }
}

/// A fresh replica table and what applying snapshot rows needs.
async fn fresh(mode: DeleteMode) -> (TestDb, deadpool_postgres::Pool, TableSchema, ApplySettings) {
    let describe: ObjectDescribe = serde_json::from_str(DESCRIBE).expect("describe");
    crate::common::fresh_replica(describe, mode).await
}

fn rows(table: &TableSchema, ids: &[&str]) -> Vec<sfmirror::replica::snapshot::SnapshotRow> {
    ids.iter()
        .map(|id| {
            row_from_json(
                table,
                &json!({"Id": id, "Name": format!("name of {id}"), "AnnualRevenue": 1250.555,
                        "SystemModstamp": "2026-01-02T02:50:45.000+0000"}),
            )
            .expect("row")
        })
        .collect()
}

/// Applies `rows` in one transaction; returns whether the staging table was used, and the
/// table's (id, name, annualrevenue::text, version) after.
async fn apply(
    pool: &deadpool_postgres::Pool,
    table: &TableSchema,
    settings: &ApplySettings,
    rows: &[sfmirror::replica::snapshot::SnapshotRow],
) -> (bool, Vec<(String, Option<String>, Option<String>, i64)>) {
    let mut client = pool.get().await.expect("client");
    let tx = client.transaction().await.expect("tx");
    apply_snapshot(&tx, settings, table, rows, None)
        .await
        .expect("apply");
    let staged: bool = tx
        .query_one("SELECT to_regclass('pg_temp._sfm_stage') IS NOT NULL", &[])
        .await
        .expect("staging?")
        .get(0);
    tx.commit().await.expect("commit");
    let table_rows = client
        .query(
            "SELECT id, name, annualrevenue::text, _sfm_version FROM salesforce.account
             ORDER BY id",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    (staged, table_rows)
}

#[tokio::test]
async fn a_first_load_is_copied_straight_in_and_equals_the_merge() {
    let (_db, pool, table, settings) = fresh(DeleteMode::Soft).await;
    let ids = ["001000000000001AAA", "001000000000002AAA"];
    let (staged, got) = apply(&pool, &table, &settings, &rows(&table, &ids)).await;
    assert!(!staged, "records the replica never saw need no merge");
    let want: Vec<_> = ids
        .iter()
        .map(|id| {
            (
                id.to_string(),
                Some(format!("name of {id}")),
                // Rounded to the column's scale, as the merge's cast does.
                Some("1250.56".to_string()),
                1_767_322_245_000i64,
            )
        })
        .collect();
    assert_eq!(got, want);

    // The same records again (a second backfill): known now, so they go through the guard.
    let (staged, again) = apply(&pool, &table, &settings, &rows(&table, &ids)).await;
    assert!(staged, "known records are merged");
    assert_eq!(again, want);
}

#[tokio::test]
async fn a_chunk_that_meets_a_known_record_or_a_tombstone_is_merged() {
    let (_db, pool, table, settings) = fresh(DeleteMode::Hard).await;
    let client = pool.get().await.expect("client");
    client
        .batch_execute(
            "INSERT INTO sfmirror.tombstones (object, id, version)
             VALUES ('Account', '001000000000009AAA', 1867322245000)",
        )
        .await
        .expect("tombstone");
    let (staged, got) = apply(
        &pool,
        &table,
        &settings,
        &rows(&table, &["001000000000001AAA", "001000000000009AAA"]),
    )
    .await;
    assert!(staged);
    let ids: Vec<&str> = got.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        ids,
        ["001000000000001AAA"],
        "a record deleted later stays deleted"
    );
}

#[tokio::test]
async fn a_column_type_changed_by_hand_takes_the_converting_merge() {
    let (_db, pool, table, settings) = fresh(DeleteMode::Soft).await;
    let client = pool.get().await.expect("client");
    // Binary numeric bytes would not be valid text; the merge's INSERT converts instead.
    client
        .batch_execute("ALTER TABLE salesforce.account ALTER COLUMN annualrevenue TYPE text")
        .await
        .expect("alter");
    let (staged, got) = apply(
        &pool,
        &table,
        &settings,
        &rows(&table, &["001000000000001AAA"]),
    )
    .await;
    assert!(staged, "a table whose types differ is not copied into");
    assert_eq!(got[0].2.as_deref(), Some("1250.56"));
}

#[tokio::test]
async fn a_record_the_stream_inserts_during_the_copy_is_left_to_the_guard() {
    // The look finds nothing, but another transaction (the stream) is inserting one of the
    // records with a newer version: the straight COPY waits for it, fails on the key once it
    // commits, and the chunk is merged instead, which keeps the stream's newer row.
    let (_db, pool, table, settings) = fresh(DeleteMode::Soft).await;
    let mut other = pool.get().await.expect("client");
    let stream = other.transaction().await.expect("tx");
    stream
        .batch_execute(
            "INSERT INTO salesforce.account (id, name, _sfm_version)
             VALUES ('001000000000002AAA', 'from the stream', 1867322245000)",
        )
        .await
        .expect("insert");
    let table = std::sync::Arc::new(table);
    let snapshot = {
        let (pool, table, settings) = (pool.clone(), table.clone(), settings.clone());
        tokio::spawn(async move {
            let ids = ["001000000000001AAA", "001000000000002AAA"];
            let rows = rows(&table, &ids);
            apply(&pool, &table, &settings, &rows).await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stream.commit().await.expect("commit");
    let (staged, got) = snapshot.await.expect("join");
    assert!(staged, "the refused COPY was undone and the chunk merged");
    let names: Vec<(&str, Option<&str>)> =
        got.iter().map(|r| (r.0.as_str(), r.1.as_deref())).collect();
    assert_eq!(
        names,
        [
            ("001000000000001AAA", Some("name of 001000000000001AAA")),
            ("001000000000002AAA", Some("from the stream")),
        ]
    );
}
