//! TLS for the replica connection: tokio-postgres' TLS hooks over tokio-rustls, with the
//! aws-lc-rs provider the rest of the crate uses, checking certificates as `sslmode` and
//! `sslrootcert` ask ([`super::conninfo`] decides the policy).
//!
//! Owns reading the CA certificates, the certificate checks, the handshake, and telling a
//! refused certificate (definite: retrying meets the same certificate) from a handshake cut
//! short (transient). It does not decide whether to use TLS: tokio-postgres negotiates that
//! from the mode [`super::conninfo::ConnInfo::pg_config`] sets.

use super::conninfo::{ConnInfo, RootCert, SslMode, Verification};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Why a TLS session with the replica could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The server's certificate failed a check the mode asks for. Definite.
    #[error("replica.url: certificate verify failed: {reason} under sslmode={mode}")]
    CertificateRefused { reason: String, mode: SslMode },
    /// TLS needs a host name and the connection has none (a `hostaddr` without `host`).
    #[error("replica.url: sslmode={mode} needs a host name to check the certificate against")]
    NoHostName { mode: SslMode },
    /// The handshake failed otherwise (connection lost, protocol error). Transient.
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
}

impl TlsError {
    /// Whether retrying the same connection cannot help.
    pub fn is_definite(&self) -> bool {
        !matches!(self, TlsError::Handshake(_))
    }
}

/// Makes the TLS sessions of one pool. Cloned into every connection attempt; counts the
/// handshakes that succeeded, so the caller can tell whether a `prefer` connection got TLS.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<rustls::ClientConfig>,
    mode: SslMode,
    handshakes: Arc<AtomicU64>,
}

impl MakeRustlsConnect {
    /// The connector for `info`, its CA certificates read now (a missing or empty
    /// `sslrootcert` is a configuration error, reported before any connection).
    pub fn new(info: &ConnInfo) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = match info.verification() {
            // Never used for a plain connection: skip reading the roots.
            _ if info.sslmode == SslMode::Disable => None,
            Verification::None => None,
            Verification::Chain { roots, host_name } => Some((root_store(&roots)?, host_name)),
        };
        let verifier = PgVerifier {
            roots: roots.as_ref().map(|r| Arc::new(r.0.clone())),
            host_name: roots.as_ref().is_some_and(|r| r.1),
            provider: provider.clone(),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        // The protocol name Postgres servers expect; required for direct TLS negotiation.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeRustlsConnect {
            config: Arc::new(config),
            mode: info.sslmode,
            handshakes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How many TLS handshakes have succeeded with this connector (and its clones).
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

/// The CA certificates `roots` names: a PEM file, or the system's store.
fn root_store(roots: &RootCert) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        RootCert::File(path) => {
            let shown = path.display();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {shown}: cannot read: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("sslrootcert {shown}: not PEM certificates: {e}"))?;
            for cert in certs {
                store.add(cert).map_err(|e| {
                    format!("sslrootcert {shown}: not a usable CA certificate: {e}")
                })?;
            }
            if store.is_empty() {
                return Err(format!("sslrootcert {shown} holds no certificate"));
            }
        }
        RootCert::System | RootCert::Absent => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                return Err(format!(
                    "no system CA certificates found{why}; name a CA file with sslrootcert"
                ));
            }
        }
    }
    Ok(store)
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        // Unix sockets come with no name; tokio-postgres does not start TLS on them.
        let server_name = ServerName::try_from(domain.to_string()).ok();
        Ok(RustlsConnect {
            server_name,
            config: self.config.clone(),
            mode: self.mode,
            handshakes: self.handshakes.clone(),
        })
    }
}

/// One connection's TLS handshake.
pub struct RustlsConnect {
    server_name: Option<ServerName<'static>>,
    config: Arc<rustls::ClientConfig>,
    mode: SslMode,
    handshakes: Arc<AtomicU64>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let mode = self.mode;
            let name = self.server_name.ok_or(TlsError::NoHostName { mode })?;
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await
                .map_err(|e| handshake_error(e, mode))?;
            self.handshakes.fetch_add(1, Ordering::Relaxed);
            Ok(RustlsStream(stream))
        })
    }
}

/// A refused certificate as a [`TlsError::CertificateRefused`]; any other failure as it is.
fn handshake_error(e: io::Error, mode: SslMode) -> TlsError {
    let certificate = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|r| match r {
            rustls::Error::InvalidCertificate(c) => Some(c.clone()),
            _ => None,
        });
    let Some(certificate) = certificate else {
        return TlsError::Handshake(e);
    };
    let reason = match certificate {
        // A CA of the same name but another key shows as a bad signature.
        CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
            "the server's certificate does not chain to a trusted CA (sslrootcert, or the \
             system's roots without it): {certificate:?}"
        ),
        CertificateError::NotValidForName => {
            "the server's certificate does not name the host connected to".to_string()
        }
        other => other.to_string(),
    };
    TlsError::CertificateRefused { reason, mode }
}

/// Checks a server certificate as the mode asks: not at all (the session is still
/// encrypted, and the handshake signature still checked), the chain only, or the chain and
/// the host name.
#[derive(Debug)]
struct PgVerifier {
    /// `None`: any certificate is accepted.
    roots: Option<Arc<RootCertStore>>,
    host_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PgVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.host_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS session with the replica.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// `tls-server-end-point` (RFC 5929), so SCRAM can bind the login to this session: the
    /// server certificate hashed with its signature's hash (SHA-256 for MD5 and SHA-1).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| server_end_point(cert.as_ref()))
            .map(ChannelBinding::tls_server_end_point)
            .unwrap_or_else(ChannelBinding::none)
    }
}

/// The certificate's hash for `tls-server-end-point`, or `None` for a signature algorithm
/// with no single hash (Ed25519, RSA-PSS): the login then goes without channel binding.
fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    let oid = signature_algorithm(der)?;
    // Object identifier bodies: sha{1,256,384,512}WithRSAEncryption, md5WithRSAEncryption,
    // ecdsa-with-SHA{1,256,384,512}.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let hash = match oid {
        [rsa @ .., 0x04 | 0x05 | 0x0b] if rsa == RSA => 256,
        [rsa @ .., 0x0c] if rsa == RSA => 384,
        [rsa @ .., 0x0d] if rsa == RSA => 512,
        [ecdsa @ .., 0x01] if ecdsa == ECDSA => 256,
        [ecdsa @ .., 0x03, 0x02] if ecdsa == ECDSA => 256,
        [ecdsa @ .., 0x03, 0x03] if ecdsa == ECDSA => 384,
        [ecdsa @ .., 0x03, 0x04] if ecdsa == ECDSA => 512,
        _ => return None,
    };
    Some(match hash {
        384 => sha2::Sha384::digest(der).to_vec(),
        512 => sha2::Sha512::digest(der).to_vec(),
        _ => sha2::Sha256::digest(der).to_vec(),
    })
}

/// The signature algorithm's object identifier of a DER certificate:
/// `SEQUENCE { tbsCertificate, SEQUENCE { OID, params }, signature }`.
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    let (tag, certificate, _) = der_element(der)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = der_element(certificate)?;
    let (tag, algorithm, _) = der_element(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, oid, _) = der_element(algorithm)?;
    (tag == 0x06).then_some(oid)
}

/// One DER element: its tag, its contents, and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = input.get(2..2 + n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let body = input.get(header..header.checked_add(len)?)?;
    Some((tag, body, &input[header + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_binding_hashes_by_the_signature_algorithm() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let der = cert.der().to_vec();
        let hash = server_end_point(&der).expect("ECDSA with SHA-384 has a hash");
        use sha2::Digest;
        assert_eq!(hash, sha2::Sha384::digest(&der).to_vec());

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(
            server_end_point(cert.der()).map(|h| h.len()),
            Some(32),
            "SHA-256"
        );

        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(server_end_point(cert.der()), None, "Ed25519 has no hash");
        assert_eq!(server_end_point(b"\x30\x05junk"), None);
    }

    #[test]
    fn a_missing_or_empty_root_file_is_named() {
        let dir = std::env::temp_dir().join(format!("sfm-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let missing = dir.join("missing.pem");
        let info = ConnInfo::parse(&format!(
            "host=h sslmode=verify-full sslrootcert={}",
            missing.display()
        ))
        .expect("parses");
        let err = MakeRustlsConnect::new(&info).err().expect("no file");
        assert!(
            err.contains("missing.pem") && err.contains("cannot read"),
            "{err}"
        );

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let info = ConnInfo::parse(&format!(
            "host=h sslmode=verify-ca sslrootcert={}",
            empty.display()
        ))
        .expect("parses");
        let err = MakeRustlsConnect::new(&info).err().expect("no certificate");
        assert!(err.contains("holds no certificate"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
