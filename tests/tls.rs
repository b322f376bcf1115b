//! TLS to the replica, against a cluster with `ssl=on` and a certificate for `localhost` only
//! (see [`common::tls_cluster`]): each `sslmode` connects as libpq's would, the session is
//! encrypted when it should be (`pg_stat_ssl`), and a refused certificate is a definite error
//! that names `replica.url`, what failed and the mode.

use crate::common;
use crate::common::tls_cluster::{TlsCluster, certificate_authority, tls_cluster};
use sfmirror::config::{ReplicaConfig, Secret};
use sfmirror::replica::{self, ReplicaError};

fn replica_config(url: &str) -> ReplicaConfig {
    ReplicaConfig {
        url: Secret::new(url),
        url_file: None,
        password: Secret::default(),
        password_file: None,
        schema: "salesforce".to_string(),
        control_schema: "sfmirror".to_string(),
        pool_size: 2,
        delete_mode: Default::default(),
    }
}

/// Connects as the daemon does and says whether the session is encrypted.
async fn encrypted(url: &str) -> Result<bool, ReplicaError> {
    let pool = replica::connect(&replica_config(url)).await?;
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    Ok(row.get(0))
}

fn ca_query(cluster: &TlsCluster, mode: &str) -> String {
    format!("sslmode={mode}&sslrootcert={}", cluster.ca_file.display())
}

#[tokio::test]
async fn require_and_prefer_encrypt_and_disable_does_not() {
    let cluster = tls_cluster();
    assert!(
        encrypted(&cluster.url("127.0.0.1", "sslmode=require"))
            .await
            .expect("require connects without checking the certificate"),
        "require: encrypted"
    );
    assert!(
        encrypted(&cluster.url("127.0.0.1", "application_name=t"))
            .await
            .expect("prefer is the default"),
        "prefer: TLS when the server offers it"
    );
    assert!(
        !encrypted(&cluster.url("127.0.0.1", "sslmode=disable"))
            .await
            .expect("disable connects"),
        "disable: plaintext"
    );
}

#[tokio::test]
async fn verify_full_connects_with_the_right_ca_and_host() {
    let cluster = tls_cluster();
    let url = cluster.url("localhost", &ca_query(&cluster, "verify-full"));
    assert!(encrypted(&url).await.expect("verify-full"), "encrypted");
    // The same in key=value form, connecting by address while checking the name.
    let keywords = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname=postgres \
         sslmode=verify-full sslrootcert='{}'",
        cluster.port,
        cluster.ca_file.display()
    );
    assert!(
        encrypted(&keywords).await.expect("key=value verify-full"),
        "encrypted"
    );
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_from_another_ca() {
    let cluster = tls_cluster();
    let dir = std::env::temp_dir().join(format!("sfm-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let other = dir.join(format!("other-ca-{}.pem", rand::random::<u32>()));
    std::fs::write(&other, certificate_authority(&["localhost"]).0).expect("write CA");
    let url = cluster.url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", other.display()),
    );
    let err = encrypted(&url).await.expect_err("another CA's certificate");
    let text = err.to_string();
    assert!(
        !err.is_transient(),
        "a refused certificate is definite: {text}"
    );
    assert!(
        text.contains("replica.url")
            && text.contains("certificate verify failed")
            && text.contains("trusted CA")
            && text.contains("sslmode=verify-full"),
        "{text}"
    );
    // require with a root file checks the chain too, as in libpq.
    let url = cluster.url(
        "localhost",
        &format!("sslmode=require&sslrootcert={}", other.display()),
    );
    let err = encrypted(&url).await.expect_err("require with sslrootcert");
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("sslmode=require"), "{err}");
    let _ = std::fs::remove_file(other);
}

#[tokio::test]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let cluster = tls_cluster();
    // The certificate names localhost, not 127.0.0.1.
    let err = encrypted(&cluster.url("127.0.0.1", &ca_query(&cluster, "verify-full")))
        .await
        .expect_err("a host the certificate does not name");
    let text = err.to_string();
    assert!(!err.is_transient(), "{text}");
    assert!(
        text.contains("replica.url")
            && text.contains("certificate verify failed")
            && text.contains("127.0.0.1")
            && text.contains("sslmode=verify-full"),
        "{text}"
    );
    assert!(
        encrypted(&cluster.url("127.0.0.1", &ca_query(&cluster, "verify-ca")))
            .await
            .expect("verify-ca checks the chain only"),
        "encrypted"
    );
}

/// The main test server runs without TLS (unless `DATABASE_URL` names one that has it).
#[tokio::test]
async fn require_against_a_server_without_tls_is_definite() {
    let admin = common::admin_url();
    let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(conn);
    let ssl: String = client
        .query_one("SHOW ssl", &[])
        .await
        .expect("show ssl")
        .get(0);
    if ssl == "on" {
        eprintln!("skipped: the test server offers TLS");
        return;
    }
    let url = if admin.contains('?') {
        format!("{admin}&sslmode=require")
    } else {
        format!("{admin}?sslmode=require")
    };
    let err = encrypted(&url).await.expect_err("no TLS on offer");
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("sslmode"), "{err}");
    // prefer falls back to plaintext, as every other test's connection does.
    assert!(!encrypted(&admin).await.expect("prefer"), "plaintext");
}
