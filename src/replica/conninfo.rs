//! `replica.url` read as libpq reads it, for the two settings tokio-postgres does not know:
//! `sslmode` beyond disable/prefer/require, and `sslrootcert`.
//!
//! Owns taking those two out of the URL (`postgres://...?sslmode=verify-full&sslrootcert=...`)
//! or out of a `key=value` connection string, and deciding the TLS policy they mean. The rest
//! of the string goes to tokio-postgres unchanged. This module does no I/O: certificates are
//! read by [`super::tls`]. Messages never repeat the URL, which may hold a password.

use std::path::PathBuf;

/// How much TLS the replica connection asks for, with libpq's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain connection.
    Disable,
    /// TLS when the server offers it, else plain (the default, as in libpq).
    Prefer,
    /// TLS or no connection; the certificate is not checked unless `sslrootcert` is given.
    Require,
    /// TLS, and the server's certificate must chain to a trusted CA; its names are not checked.
    VerifyCa,
    /// TLS, a trusted chain, and a certificate naming the host connected to.
    VerifyFull,
}

impl SslMode {
    const ALL: [SslMode; 5] = [
        SslMode::Disable,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(text: &str) -> Option<SslMode> {
        SslMode::ALL.into_iter().find(|m| m.as_str() == text)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The CA certificates a server's chain is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// No `sslrootcert`: verify-ca and verify-full use the system's roots; prefer and require
    /// do not check the chain.
    Absent,
    /// `sslrootcert=system`: the operating system's trusted roots.
    System,
    /// A PEM file of CA certificates.
    File(PathBuf),
}

/// What certificate checks a TLS session needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// Any certificate (require or prefer without `sslrootcert`): encrypted, not authenticated.
    None,
    /// The chain must lead to one of `roots`; with `host_name`, the certificate must also
    /// name the host.
    Chain { roots: RootCert, host_name: bool },
}

/// `replica.url` split into what tokio-postgres reads and the TLS policy.
#[derive(Clone)]
pub struct ConnInfo {
    /// The connection string without `sslmode` and `sslrootcert`. May hold a password.
    rest: String,
    pub sslmode: SslMode,
    pub root_cert: RootCert,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnInfo")
            .field("sslmode", &self.sslmode)
            .field("root_cert", &self.root_cert)
            .finish_non_exhaustive()
    }
}

/// Why `replica.url` cannot be used. The message never holds the URL itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConnInfoError(pub String);

const MODES: &str = "disable, prefer, require, verify-ca or verify-full";

impl ConnInfo {
    /// Reads `sslmode` and `sslrootcert` out of `url` (a `postgres://` URL or a `key=value`
    /// string) and checks they make sense together.
    pub fn parse(url: &str) -> Result<ConnInfo, ConnInfoError> {
        let (rest, taken) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            split_url(url)?
        } else {
            split_keywords(url)?
        };
        let mut sslmode = None;
        let mut root = None;
        // As in libpq, a setting given twice takes its last value.
        for (key, value) in taken {
            if key == "sslmode" {
                sslmode = Some(SslMode::parse(&value).ok_or_else(|| {
                    ConnInfoError(format!("sslmode `{value}` is not one of {MODES}"))
                })?);
            } else {
                root = Some(value);
            }
        }
        let root_cert = match root.as_deref() {
            None | Some("") => RootCert::Absent,
            Some("system") => RootCert::System,
            Some(path) => RootCert::File(PathBuf::from(path)),
        };
        let sslmode = match (sslmode, &root_cert) {
            // The system's roots vouch for any host name they have a certificate for, so
            // trusting them without checking the name would accept any public site: libpq
            // refuses the weaker modes with them, and so do we.
            (None, RootCert::System) => SslMode::VerifyFull,
            (Some(mode), RootCert::System) if mode != SslMode::VerifyFull => {
                return Err(ConnInfoError(format!(
                    "sslrootcert=system needs sslmode=verify-full (or no sslmode), not {mode}"
                )));
            }
            (Some(mode), _) => mode,
            (None, _) => SslMode::Prefer,
        };
        Ok(ConnInfo {
            rest,
            sslmode,
            root_cert,
        })
    }

    /// The certificate checks a TLS session must pass. As in libpq, a given `sslrootcert`
    /// makes prefer and require check the chain like verify-ca.
    pub fn verification(&self) -> Verification {
        match (self.sslmode, &self.root_cert) {
            (SslMode::VerifyFull, roots) => Verification::Chain {
                roots: roots.clone(),
                host_name: true,
            },
            (SslMode::VerifyCa, roots) => Verification::Chain {
                roots: roots.clone(),
                host_name: false,
            },
            (SslMode::Disable | SslMode::Prefer | SslMode::Require, RootCert::Absent) => {
                Verification::None
            }
            (SslMode::Disable | SslMode::Prefer | SslMode::Require, roots) => Verification::Chain {
                roots: roots.clone(),
                host_name: false,
            },
        }
    }

    /// The settings for tokio-postgres: the rest of the string, with the TLS negotiation the
    /// mode needs (verify-ca and verify-full insist on TLS like require).
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConnInfoError> {
        let mut pg: tokio_postgres::Config = self
            .rest
            .parse()
            .map_err(|e: tokio_postgres::Error| ConnInfoError(e.to_string()))?;
        pg.ssl_mode(match self.sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        Ok(pg)
    }
}

fn is_ours(key: &str) -> bool {
    key == "sslmode" || key == "sslrootcert"
}

/// Splits the query of a URL. Like tokio-postgres, the user and password run to the first
/// `@`, so the query starts at the first `?` after it.
fn split_url(url: &str) -> Result<(String, Vec<(String, String)>), ConnInfoError> {
    let after_credentials = url.find('@').map(|i| i + 1).unwrap_or(0);
    let Some(q) = url[after_credentials..]
        .find('?')
        .map(|i| i + after_credentials)
    else {
        return Ok((url.to_string(), Vec::new()));
    };
    let (base, query) = (&url[..q], &url[q + 1..]);
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&') {
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (pair, None),
        };
        let key = percent_decode(key)?;
        if !is_ours(&key) {
            kept.push(pair);
            continue;
        }
        let value = value.ok_or_else(|| ConnInfoError(format!("{key} has no value")))?;
        taken.push((key, percent_decode(value)?));
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, taken))
}

fn percent_decode(text: &str) -> Result<String, ConnInfoError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ConnInfoError("a URL parameter is not UTF-8".to_string()))
}

/// Splits a `key=value` connection string, with libpq's quoting: a value is a run of
/// non-space characters or a single-quoted string, and a backslash escapes the next
/// character. Pairs other than ours are kept as written.
fn split_keywords(text: &str) -> Result<(String, Vec<(String, String)>), ConnInfoError> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|c| c.1);
    let offset = |i: usize| chars.get(i).map(|c| c.0).unwrap_or(text.len());
    let mut kept: Vec<&str> = Vec::new();
    let mut taken = Vec::new();
    let mut i = 0;
    loop {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i).is_none() {
            break;
        }
        let key_start = i;
        while at(i).is_some_and(|c| !c.is_whitespace() && c != '=') {
            i += 1;
        }
        let key = &text[offset(key_start)..offset(i)];
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i) != Some('=') {
            return Err(ConnInfoError(format!(
                "the connection string has `{key}` without `=` and a value"
            )));
        }
        i += 1;
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let mut value = String::new();
        if at(i) == Some('\'') {
            i += 1;
            loop {
                match at(i) {
                    None => {
                        return Err(ConnInfoError(format!(
                            "the quoted value of `{key}` is not closed"
                        )));
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        value.extend(at(i + 1));
                        i += 2;
                    }
                    Some(c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(c) = at(i).filter(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(at(i + 1));
                    i += 2;
                } else {
                    value.push(c);
                    i += 1;
                }
            }
        }
        if is_ours(key) {
            taken.push((key.to_string(), value));
        } else {
            kept.push(&text[offset(key_start)..offset(i)]);
        }
    }
    Ok((kept.join(" "), taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> ConnInfo {
        ConnInfo::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn url_settings_are_taken_out_and_the_rest_kept() {
        let info = parse(
            "postgres://u:p%3Fw@db.example:5433/replica?application_name=x&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
        );
        assert_eq!(info.sslmode, SslMode::VerifyFull);
        assert_eq!(info.root_cert, RootCert::File("/etc/ca.pem".into()));
        assert_eq!(
            info.rest,
            "postgres://u:p%3Fw@db.example:5433/replica?application_name=x&connect_timeout=5"
        );
        let pg = info.pg_config().expect("tokio-postgres reads the rest");
        assert_eq!(pg.get_dbname(), Some("replica"));
        assert_eq!(pg.get_password(), Some(&b"p?w"[..]));
        assert_eq!(
            pg.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require,
            "verify-full insists on TLS"
        );

        let info = parse("postgresql://u@h/db?sslmode=verify-ca");
        assert_eq!(info.rest, "postgresql://u@h/db");
        assert_eq!(info.sslmode, SslMode::VerifyCa);
    }

    #[test]
    fn a_question_mark_in_the_password_is_not_the_query() {
        let info = parse("postgres://u:a?b@h/db?sslmode=require");
        assert_eq!(info.rest, "postgres://u:a?b@h/db");
        assert_eq!(info.sslmode, SslMode::Require);
    }

    #[test]
    fn keyword_settings_are_taken_out_and_quoting_kept() {
        let info = parse(
            "host=db.example  password='it\\'s' sslmode = verify-full dbname=r \
             sslrootcert='/etc/my ca.pem' user=a\\ b",
        );
        assert_eq!(info.sslmode, SslMode::VerifyFull);
        assert_eq!(info.root_cert, RootCert::File("/etc/my ca.pem".into()));
        assert_eq!(
            info.rest,
            "host=db.example password='it\\'s' dbname=r user=a\\ b"
        );

        let info = parse("host=h password='a b\\'c' sslmode=require");
        assert_eq!(info.rest, "host=h password='a b\\'c'");
        let pg = info.pg_config().expect("rest parses");
        assert_eq!(pg.get_password(), Some(&b"a b'c"[..]));
        assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn defaults_and_libpq_rules() {
        let info = parse("postgres://u@h/db");
        assert_eq!(info.sslmode, SslMode::Prefer, "libpq's default");
        assert_eq!(info.verification(), Verification::None);

        // A given root certificate makes require check the chain, not the name.
        let info = parse("host=h sslmode=require sslrootcert=/ca.pem");
        assert_eq!(
            info.verification(),
            Verification::Chain {
                roots: RootCert::File("/ca.pem".into()),
                host_name: false
            }
        );
        // verify-ca without a root file uses the system's roots.
        let info = parse("host=h sslmode=verify-ca");
        assert_eq!(
            info.verification(),
            Verification::Chain {
                roots: RootCert::Absent,
                host_name: false
            }
        );
        let info = parse("host=h sslrootcert=system");
        assert_eq!(info.sslmode, SslMode::VerifyFull);
        assert_eq!(
            info.verification(),
            Verification::Chain {
                roots: RootCert::System,
                host_name: true
            }
        );
        let info = parse("postgres://h/db?sslmode=disable&sslmode=verify-full");
        assert_eq!(info.sslmode, SslMode::VerifyFull, "the last value counts");
        let info = parse("host=h sslmode=disable");
        assert_eq!(
            info.pg_config().expect("parses").get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn bad_settings_are_named_without_the_url() {
        let err = ConnInfo::parse("postgres://u:hunter2@h/db?sslmode=allow")
            .expect_err("allow is not supported")
            .to_string();
        assert!(
            err.contains("sslmode `allow`") && err.contains("verify-full"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");

        let err = ConnInfo::parse("host=h sslmode=Require password=hunter2")
            .expect_err("case matters, as in libpq")
            .to_string();
        assert!(
            err.contains("`Require`") && !err.contains("hunter2"),
            "{err}"
        );

        let err = ConnInfo::parse("host=h sslmode=require sslrootcert=system")
            .expect_err("system roots need the host name checked")
            .to_string();
        assert!(err.contains("verify-full"), "{err}");

        let err = ConnInfo::parse("host=h password='open sslmode=require")
            .expect_err("unclosed quote")
            .to_string();
        assert!(err.contains("`password`") && !err.contains("open"), "{err}");

        let err = ConnInfo::parse("postgres://h/db?sslmode")
            .expect_err("no value")
            .to_string();
        assert!(err.contains("sslmode"), "{err}");
    }
}
