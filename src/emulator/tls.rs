//! TLS for the emulator (`--tls`): a throwaway certificate authority generated at start-up,
//! a server certificate it signs for the local names, and the CA written to a file that
//! clients trust (`ca_file` in the start-up line).
//!
//! Real Salesforce clients (salesforce-pubsub-api-client, grpc-java, jsforce over https) refuse
//! plaintext, so the emulator must speak TLS to be driven by them. A CA plus a leaf, rather
//! than one self-signed leaf, because several TLS stacks (webpki among them) refuse a
//! certificate that is both the trust anchor and the server's end entity.
//!
//! The private keys live only in memory; the CA key is dropped once the leaf is signed. It
//! must not know what is served over the connections it secures.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The certificate material of one emulator run.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The CA certificate clients trust (PEM), also written to `ca_file`.
    pub ca_pem: String,
    pub ca_file: PathBuf,
    /// The server's certificate chain (leaf, then CA) and key, PEM.
    pub chain_pem: String,
    pub key_pem: String,
}

/// A failed set-up: the file or directory concerned, and what went wrong.
#[derive(Debug)]
pub struct TlsError {
    pub path: String,
    pub message: String,
}

fn tls_err(path: &Path, message: String) -> TlsError {
    TlsError {
        path: path.display().to_string(),
        message,
    }
}

/// Generates a CA and a server certificate for `localhost`, the loopback addresses and the
/// hosts of `listen`; writes the CA to `dir/ca.pem` (creating `dir`).
pub fn generate(dir: &Path, listen: &[SocketAddr]) -> Result<TlsMaterial, TlsError> {
    let rc = |e: rcgen::Error| tls_err(dir, format!("cannot generate a certificate: {e}"));
    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sfmirror emulator CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rc)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for addr in listen {
        let ip = addr.ip();
        if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
            names.push(ip.to_string());
        }
    }
    let leaf_key = KeyPair::generate().map_err(rc)?;
    let mut leaf_params = CertificateParams::new(names).map_err(rc)?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).map_err(rc)?;

    std::fs::create_dir_all(dir)
        .map_err(|e| tls_err(dir, format!("cannot create the certificate directory: {e}")))?;
    let ca_file = dir.join("ca.pem");
    let ca_pem = ca_cert.pem();
    std::fs::write(&ca_file, &ca_pem)
        .map_err(|e| tls_err(&ca_file, format!("cannot write the CA certificate: {e}")))?;
    Ok(TlsMaterial {
        chain_pem: format!("{}{}", leaf.pem(), ca_pem),
        ca_pem,
        ca_file,
        key_pem: leaf_key.serialize_pem(),
    })
}

/// A rustls server configuration for the REST listener (HTTP/2 and HTTP/1.1 by ALPN).
fn rest_config(material: &TlsMaterial) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(material.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes())
        .map_err(|e| format!("server key: {e}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A listener for axum that hands out connections once their TLS handshake is done.
/// Handshakes run in their own tasks, so a client that stalls mid-handshake holds up nobody.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, material: &TlsMaterial) -> Result<TlsListener, String> {
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let acceptor = TlsAcceptor::from(Arc::new(rest_config(material)?));
        let (tx, ready) = mpsc::channel(64);
        let accept_task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "emulator REST accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match acceptor.accept(tcp).await {
                        Ok(tls) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    }
                });
            }
        });
        Ok(TlsListener {
            local,
            ready,
            accept_task,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task only ends when aborted, i.e. when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_signs_a_server_certificate_for_the_loopback_names() {
        let dir = std::env::temp_dir().join(format!("sfm-tls-test-{}", std::process::id()));
        let material = generate(&dir, &[SocketAddr::from(([127, 0, 0, 2], 0))]).expect("tls");
        let written = std::fs::read_to_string(&material.ca_file).expect("ca file");
        assert_eq!(written, material.ca_pem);
        assert!(material.chain_pem.matches("BEGIN CERTIFICATE").count() == 2);
        rest_config(&material).expect("rustls accepts the chain and key");
        let _ = std::fs::remove_dir_all(dir);
    }
}
