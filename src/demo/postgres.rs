//! Where the demo's replica lives: the server `DATABASE_URL` names, else a server on
//! 127.0.0.1:5432 that accepts the default login, else a private throwaway cluster the demo
//! starts itself with the machine's `initdb` and `pg_ctl` ([`Cluster`]) and removes when it
//! ends, also on Ctrl-C and on error (its `Drop`).
//!
//! A fresh laptop has PostgreSQL's binaries (`apt install postgresql`) more often than a
//! server it may log in to, so the cluster is what makes the demo work there.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use thiserror::Error;

/// Why no replica server could be found or started.
#[derive(Debug, Error)]
pub enum PostgresError {
    #[error(
        "no PostgreSQL server binaries (initdb, pg_ctl) found on PATH, via `pg_config --bindir` \
         or under /usr/lib/postgresql/*/bin: install them (e.g. `apt install postgresql`) or \
         set DATABASE_URL to a server the demo may use"
    )]
    NoBinaries,
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PostgresError {
    let what = what.into();
    move |source| PostgresError::Io { what, source }
}

/// The server the demo mirrors into, and how it was chosen.
pub enum Replica {
    /// `DATABASE_URL`.
    Given(String),
    /// 127.0.0.1:5432 with the default login.
    Local(String),
    /// A cluster of the demo's own; stopped and removed when dropped.
    Embedded(Cluster),
}

impl Replica {
    pub fn url(&self) -> &str {
        match self {
            Replica::Given(url) | Replica::Local(url) => url,
            Replica::Embedded(c) => &c.url,
        }
    }

    /// One line saying which server this is.
    pub fn describe(&self) -> String {
        match self {
            Replica::Given(url) => format!("the server DATABASE_URL names ({})", redact(url)),
            Replica::Local(url) => format!("the local server at 127.0.0.1:5432 ({url})"),
            Replica::Embedded(c) => format!(
                "a private cluster started for this demo (PostgreSQL {} in {}, port {}; removed \
                 at the end)",
                c.version,
                c.root.display(),
                c.port
            ),
        }
    }
}

/// A URL with its password (if any) replaced by `***`, for printing.
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end], &rest[at..]),
        None => url.to_string(),
    }
}

/// The default login a fresh local server accepts: the `postgres` superuser over TCP without
/// a password (`trust`), as the README's examples and CI use.
pub const LOCAL_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Chooses the replica: `database_url` when given (unless `embedded`), else [`LOCAL_URL`]
/// when it logs in within a few seconds, else a new [`Cluster`] under `dir`.
pub async fn choose(
    database_url: Option<&str>,
    embedded: bool,
    dir: &Path,
) -> Result<Replica, PostgresError> {
    if !embedded {
        if let Some(url) = database_url.filter(|u| !u.is_empty()) {
            return Ok(Replica::Given(url.to_string()));
        }
        if logs_in(LOCAL_URL).await {
            return Ok(Replica::Local(LOCAL_URL.to_string()));
        }
    }
    let dir = dir.to_path_buf();
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(&dir))
        .await
        .map_err(|e| PostgresError::Io {
            what: "starting the cluster".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
    Ok(Replica::Embedded(cluster))
}

/// Whether `url` accepts a connection and a query within a few seconds.
async fn logs_in(url: &str) -> bool {
    let attempt = async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client.simple_query("SELECT 1").await.map(|_| ())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), attempt).await,
        Ok(Ok(()))
    )
}

/// A throwaway PostgreSQL cluster: `initdb` into `<dir>/pg`, `pg_ctl start` on a free port of
/// 127.0.0.1 with its socket in the same directory, trust authentication for `postgres`. As
/// root the server runs as the `postgres` user (initdb refuses root). Dropping it stops the
/// server and removes the directory.
pub struct Cluster {
    pub url: String,
    pub port: u16,
    pub root: PathBuf,
    pub version: String,
    bin: PathBuf,
    as_postgres: bool,
}

impl Cluster {
    pub fn start(dir: &Path) -> Result<Cluster, PostgresError> {
        let bin = bin_dir().ok_or(PostgresError::NoBinaries)?;
        let as_postgres = is_root();
        let root = dir.join("pg");
        std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
        // From here on, Drop cleans up whatever was made.
        let mut cluster = Cluster {
            url: String::new(),
            port: 0,
            root,
            version: String::new(),
            bin,
            as_postgres,
        };
        if as_postgres {
            cluster.run(
                "chown",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&cluster.root),
            )?;
        }
        let data = cluster.data();
        cluster.pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        cluster.version = std::fs::read_to_string(cluster.root.join("data/PG_VERSION"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        // A port free now may be taken before the server binds it; a second try covers that.
        let mut last = None;
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(io("finding a free port"))?;
            let opts = format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c max_connections=50",
                cluster.root.display()
            );
            let log = cluster.root.join("server.log").display().to_string();
            match cluster.pg(
                "pg_ctl start",
                &[
                    "start", "-D", &data, "-w", "-t", "60", "-l", &log, "-o", &opts,
                ],
            ) {
                Ok(_) => {
                    cluster.port = port;
                    cluster.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                    return Ok(cluster);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(PostgresError::NoBinaries))
    }

    fn data(&self) -> String {
        self.root.join("data").display().to_string()
    }

    /// Runs `initdb` or `pg_ctl` (by its name in the bin directory), as `postgres` when root.
    fn pg(&self, what: &str, args: &[&str]) -> Result<Output, PostgresError> {
        let name = what.split(' ').next().unwrap_or(what);
        let program = self.bin.join(name);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        cmd.args(args);
        self.run(what, &mut cmd)
    }

    fn run(&self, what: &str, cmd: &mut Command) -> Result<Output, PostgresError> {
        let out = cmd.output().map_err(io(format!("running {what}")))?;
        if !out.status.success() {
            return Err(PostgresError::Command {
                what: what.to_string(),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .trim()
                .to_string(),
            });
        }
        Ok(out)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.root.join("data/postmaster.pid").exists() {
            // Immediate: nothing in a throwaway cluster needs a clean checkpoint.
            let data = self.data();
            let _ = self.pg(
                "pg_ctl stop",
                &["stop", "-D", &data, "-m", "immediate", "-w"],
            );
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The directory with `initdb` and `pg_ctl`: `pg_config --bindir`, then PATH, then the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian and Ubuntu keep them off PATH).
pub fn bin_dir() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").exists() && d.join("pg_ctl").exists();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_both(&dir) {
            return Some(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH")
        && let Some(d) = std::env::split_paths(&path).find(|d| has_both(d))
    {
        return Some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| {
                    let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some((v, e.path().join("bin")))
                })
                .filter(|(_, d)| has_both(d))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=h user=u"), "host=h user=u");
    }
}
