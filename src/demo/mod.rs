//! `sfmirror demo`: the whole product in about a minute on one machine, with no server to set
//! up first. An emulated org (in this process) is seeded, backfilled into a replica
//! ([`postgres`] finds or starts one), and mirrored by the daemon running as a child process
//! ([`daemon`]), while the demo shows each thing sfmirror promises: a live workload, a
//! field-level merge, a gap and an overflow repaired, a SIGKILL survived, a new field, verify,
//! and the daemon's own metrics. `--follow` then keeps it all running with a status line.
//!
//! It writes only to its own schemas (`salesforce_demo`, `sfmirror_demo`), which it recreates
//! on each run, and keeps its files (the generated config, the daemon's log, an embedded
//! cluster) in one temporary directory that it removes at the end.

pub mod daemon;
pub mod org;
pub mod postgres;
mod story;

pub use org::{Control, RestWriter};

use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

pub const DATA_SCHEMA: &str = "salesforce_demo";
pub const CONTROL_SCHEMA: &str = "sfmirror_demo";

/// What the command line asked of the demo.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// `DATABASE_URL`: mirror into that server.
    pub database_url: Option<String>,
    /// Start a private cluster even when a server is available.
    pub embedded: bool,
    /// A smaller org and shorter pauses (tests, CI).
    pub quick: bool,
    /// Keep everything running with a live status line until Ctrl-C.
    pub follow: bool,
    /// The daemon's and the demo's logs at info instead of warn.
    pub verbose: bool,
}

/// The demo's temporary directory; removed (with what is in it) when dropped.
struct DemoDir(PathBuf);

impl DemoDir {
    fn create() -> anyhow::Result<DemoDir> {
        let dir = std::env::temp_dir().join(format!("sfmirror-demo-{}", std::process::id()));
        // A directory left by an earlier process with the same pid is stale.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Traversable by the `postgres` user whatever the umask: as root, the embedded
        // cluster lives in here and runs as that user. The config inside is mode 0600.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        Ok(DemoDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for DemoDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the demo until its story ends (or, with `follow`, until Ctrl-C). Ctrl-C at any point
/// stops the daemon and removes the embedded cluster and the demo's files.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    crate::shutdown::on_signal(shutdown.clone());
    // Declared first, dropped last: the cluster inside it is stopped before it is removed.
    let dir = DemoDir::create()?;
    let outcome = story::run(&opts, dir.path(), shutdown).await;
    drop(dir);
    outcome
}
