//! What the benchmarks share: a throwaway database, the emulator as a separate process (so a
//! benchmark's peak RSS is sfmirror's own), and the peak RSS itself.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};

/// This process's peak resident set size (`VmHWM`), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// A database of its own on the server `DATABASE_URL` names (an admin URL).
pub struct BenchDb {
    admin: tokio_postgres::Client,
    name: String,
    pub url: String,
}

impl BenchDb {
    pub async fn create(prefix: &str) -> anyhow::Result<BenchDb> {
        let admin_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let name = format!("{prefix}_{}", std::process::id());
        let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => anyhow::bail!("DATABASE_URL has no database part"),
        };
        Ok(BenchDb { admin, name, url })
    }

    pub async fn drop(self) -> anyhow::Result<()> {
        self.admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await?;
        Ok(())
    }
}

/// `sfmirror emulator` as a child process on free ports; killed when dropped.
pub struct EmulatorProcess {
    child: Child,
    /// The start-up line: URLs and credentials.
    pub info: serde_json::Value,
}

impl EmulatorProcess {
    /// The emulator's process id (to sample its CPU time). Each bench compiles this module
    /// on its own, and not every bench samples it.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn start(extra_args: &[&str]) -> anyhow::Result<EmulatorProcess> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sfmirror"))
            .args([
                "emulator",
                "--listen-rest",
                "127.0.0.1:0",
                "--listen-grpc",
                "127.0.0.1:0",
            ])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take();
        // Owned from here on, so an early return still kills it.
        let mut process = EmulatorProcess {
            child,
            info: serde_json::Value::Null,
        };
        let stdout = stdout.ok_or_else(|| anyhow::anyhow!("no emulator stdout"))?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        process.info = serde_json::from_str(&line)?;
        Ok(process)
    }

    /// A string from the start-up line (`rest_url`, `client_id`, ...).
    pub fn get(&self, key: &str) -> String {
        self.info[key].as_str().unwrap_or_default().to_string()
    }

    /// The `[salesforce]` section for this emulator (client credentials flow).
    pub fn salesforce_toml(&self) -> String {
        format!(
            "[salesforce]\nlogin_url = \"{}\"\nauth = \"client_credentials\"\nclient_id = \"{}\"\n\
             client_secret = \"{}\"\npubsub_endpoint = \"{}\"\n",
            self.get("rest_url"),
            self.get("client_id"),
            self.get("client_secret"),
            self.get("pubsub_endpoint"),
        )
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
