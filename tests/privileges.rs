//! Least privilege: the SQL of the README's "Least privilege" section, run as written (names
//! made unique per test), gives roles that are enough. A writer with CREATE on the database
//! creates its schemas and backfills; a writer without it, owning schemas made for it,
//! backfills too; a read-only consumer reads a table the writer creates after the grants and
//! cannot write. A role lacking a privilege is stopped with the schema and the privilege named.

use crate::common;
use crate::common::{TestConfig, TestDb};
use serde_json::{Map, Value as J, json};
use sfmirror::config::Config;
use sfmirror::emulator::Emulator;
use sfmirror::sync::backfill;
use sfmirror::sync::setup::Setup;

/// The ```sql blocks of the README's "Least privilege" section, in order.
fn readme_sql() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("### Least privilege")
        .expect("the README has a Least privilege section");
    let section = &readme[start + 1..];
    let end = section.find("\n#").unwrap_or(section.len());
    let section = &section[..end];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sql\n") {
        let body = &rest[open + "```sql\n".len()..];
        let close = body.find("```").expect("closed sql block");
        blocks.push(body[..close].to_string());
        rest = &body[close + 3..];
    }
    assert_eq!(blocks.len(), 3, "three cases in the README: {blocks:?}");
    blocks
}

/// The README's names replaced by this test's.
fn with_names(sql: &str, db: &TestDb, writer: &str, reader: &str) -> String {
    sql.replace("salesforce_replica", &db.name)
        .replace("sfmirror_app", writer)
        .replace("sfmirror_reader", reader)
}

/// Roles are cluster-wide: dropped at the end, after the databases that hold their grants.
struct Roles {
    names: Vec<String>,
}

impl Roles {
    fn new(prefix: &str) -> Roles {
        let tag = format!("{}_{}", std::process::id(), rand::random::<u32>());
        Roles {
            names: ["w1", "w2", "r"]
                .iter()
                .map(|r| format!("{prefix}_{r}_{tag}"))
                .collect(),
        }
    }

    async fn drop_all(self) {
        let admin = admin().await;
        for name in &self.names {
            admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {name}"))
                .await
                .unwrap_or_else(|e| panic!("drop role {name}: {e}"));
        }
    }
}

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&common::admin_url(), tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(conn);
    client
}

/// The test database's URL, logging in as `role`.
fn url_as(db: &TestDb, role: &str) -> String {
    let url = db.url.replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(url, db.url, "the test URL names its user: {}", db.url);
    url
}

fn seed(emulator: &Emulator, n: usize) {
    for i in 0..n {
        let fields: Map<String, J> = match json!({"Name": format!("Least {i}")}) {
            J::Object(m) => m,
            _ => unreachable!(),
        };
        emulator
            .org
            .create("Account", &fields, "test")
            .expect("account");
    }
}

fn config(emulator: &Emulator, url: &str) -> Config {
    TestConfig::new(emulator, url)
        .channel("/data/ChangeEvents", &["Account"])
        .build()
}

async fn backfill_as(emulator: &Emulator, db: &TestDb, role: &str) -> i64 {
    let cfg = config(emulator, &url_as(db, role));
    let report = backfill::backfill(&cfg, &[], None)
        .await
        .unwrap_or_else(|e| panic!("backfill as {role}: {e}"));
    assert!(report.is_complete(), "{report:#?}");
    db.client()
        .await
        .query_one("SELECT count(*) FROM salesforce.account", &[])
        .await
        .expect("rows arrived")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_roles_are_enough_and_a_reader_cannot_write() {
    let sql = readme_sql();
    let roles = Roles::new("sfm_lp");
    let (w1, w2, r) = (&roles.names[0], &roles.names[1], &roles.names[2]);
    let emulator = common::emulator().await;
    seed(&emulator, 3);
    let accounts = emulator.org.records("Account").len() as i64;

    // 1. CREATE on the database: sfmirror creates both schemas.
    let db1 = TestDb::create().await;
    db1.client()
        .await
        .batch_execute(&with_names(&sql[0], &db1, w1, r))
        .await
        .expect("case 1 SQL");
    assert_eq!(backfill_as(&emulator, &db1, w1).await, accounts);

    // 2. No CREATE on the database, schemas made for the role beforehand.
    let db2 = TestDb::create().await;
    let admin2 = db2.client().await;
    admin2
        .batch_execute(&with_names(&sql[1], &db2, w2, r))
        .await
        .expect("case 2 SQL");
    let may_create: bool = admin2
        .query_one(
            "SELECT has_database_privilege($1, current_database(), 'CREATE')",
            &[w2],
        )
        .await
        .expect("privilege")
        .get(0);
    assert!(!may_create, "case 2's role has no CREATE on the database");

    // 3. The reader, granted before the writer creates its first table.
    admin2
        .batch_execute(&with_names(&sql[2], &db2, w2, r))
        .await
        .expect("case 3 SQL");
    assert_eq!(backfill_as(&emulator, &db2, w2).await, accounts);

    let (reader, conn) = tokio_postgres::connect(&url_as(&db2, r), tokio_postgres::NoTls)
        .await
        .expect("reader logs in");
    tokio::spawn(conn);
    let read: i64 = reader
        .query_one("SELECT count(*) FROM salesforce.account", &[])
        .await
        .expect("the reader reads a table created after the grants")
        .get(0);
    assert_eq!(read, accounts);
    for write in [
        "INSERT INTO salesforce.account (id) VALUES ('001000000000000AAA')",
        "UPDATE salesforce.account SET name = 'x'",
        "DELETE FROM salesforce.account",
        "CREATE TABLE salesforce.mine (x int)",
        "SELECT count(*) FROM sfmirror.checkpoints",
    ] {
        let err = reader.batch_execute(write).await.expect_err(write);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{write}: {err}"
        );
    }
    drop(reader);
    drop(admin2);
    drop(db1);
    drop(db2);
    roles.drop_all().await;
    emulator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_privilege_is_named_with_its_schema() {
    let roles = Roles::new("sfm_np");
    let (bare, usage_only) = (&roles.names[0], &roles.names[1]);
    let emulator = common::emulator().await;
    let db = TestDb::create().await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {bare} LOGIN; CREATE ROLE {usage_only} LOGIN;
             CREATE SCHEMA sfmirror; GRANT USAGE ON SCHEMA sfmirror TO {usage_only};"
        ))
        .await
        .expect("roles");

    // Neither the schema nor CREATE on the database.
    let other = TestDb::create().await;
    let cfg = config(&emulator, &url_as(&other, bare));
    let setup = Setup::connect(&cfg).await.expect("connect");
    let err = setup.migrate().await.expect_err("cannot create the schema");
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(
        text.contains("schema sfmirror") && text.contains("CREATE on the database"),
        "{text}"
    );
    drop(setup);

    // The schema exists, with USAGE but not CREATE.
    let cfg = config(&emulator, &url_as(&db, usage_only));
    let setup = Setup::connect(&cfg).await.expect("connect");
    let err = setup
        .migrate()
        .await
        .expect_err("cannot create in the schema");
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(
        text.contains("schema sfmirror")
            && text.contains("lacks CREATE")
            && text.contains(usage_only),
        "{text}"
    );
    drop(setup);
    drop(admin);
    drop(db);
    drop(other);
    roles.drop_all().await;
    emulator.stop().await;
}
