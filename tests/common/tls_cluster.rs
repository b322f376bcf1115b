//! A private Postgres cluster with `ssl=on`, for the replica's TLS tests: a CA and a server
//! certificate generated here (rcgen), the certificate naming `localhost` only, so that
//! connecting by `127.0.0.1` is connecting by a name the certificate does not hold.
//!
//! Started like the main private cluster (initdb/pg_ctl, as the `postgres` user when root),
//! in its own directory, shared by the test processes of a run under a file lock and reused
//! by later runs together with its certificates. It is started even when `DATABASE_URL` is
//! set: that server's TLS set-up is not ours to know.

use super::start_cluster;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The running TLS cluster.
#[derive(Debug, Clone)]
pub struct TlsCluster {
    pub port: u16,
    /// The CA that signed the server's certificate (PEM).
    pub ca_file: PathBuf,
}

impl TlsCluster {
    /// A URL for the `postgres` database with the given query (`sslmode=...`).
    pub fn url(&self, host: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{query}", self.port)
    }
}

static CLUSTER: OnceLock<TlsCluster> = OnceLock::new();

/// The cluster, started on first use.
pub fn tls_cluster() -> TlsCluster {
    CLUSTER.get_or_init(start).clone()
}

/// A CA and a certificate it signs for `names`: (CA PEM, server certificate PEM, key PEM).
pub fn certificate_authority(names: &[&str]) -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sfmirror test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("server key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "sfmirror test server");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn write_certificates(root: &Path) {
    let (ca, cert, key) = certificate_authority(&["localhost"]);
    std::fs::write(root.join("ca.pem"), ca).expect("write CA");
    std::fs::write(root.join("server.crt"), cert).expect("write certificate");
    let key_file = root.join("server.key");
    std::fs::write(&key_file, key).expect("write key");
    use std::os::unix::fs::PermissionsExt;
    // The server refuses a key others can read.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn start() -> TlsCluster {
    let port = start_cluster(
        "sfmirror-test-pg-tls",
        "-c max_connections=50 -c fsync=off -c ssl=on -c ssl_cert_file={root}/server.crt \
         -c ssl_key_file={root}/server.key",
        |root| {
            ["ca.pem", "server.crt", "server.key"]
                .iter()
                .all(|f| root.join(f).exists())
        },
        write_certificates,
    );
    TlsCluster {
        port,
        ca_file: std::env::temp_dir()
            .join("sfmirror-test-pg-tls")
            .join("ca.pem"),
    }
}
