//! The set-up every command shares: the replica pool with the settings every writer uses, and
//! the org's clients. `run`, `backfill`, `verify`, `check` and `status` all start here, so
//! they connect, trust certificates and log in the same way.
//!
//! Connecting never changes the replica: migrating the control schema is a step of its own
//! ([`Setup::migrate`]) that only `run` and `backfill` take. `check` and `status` read the
//! replica as they find it, and `status` never logs in to Salesforce.

use crate::config::Config;
use crate::replica::{self, ApplySettings, ReplicaError, migrate, repair_queue};
use crate::salesforce::{Salesforce, SourceError};

/// The replica as a command uses it.
pub struct Setup {
    pub pool: deadpool_postgres::Pool,
    pub settings: ApplySettings,
}

impl Setup {
    /// Connects to the replica named in `cfg`: an unreachable server or refused login fails
    /// here. Nothing is created or migrated.
    pub async fn connect(cfg: &Config) -> Result<Setup, ReplicaError> {
        Setup::connect_as(cfg, "sfmirror").await
    }

    /// [`Setup::connect`], naming every session `application_name` (the daemon names them
    /// after its instance, so that a standby can end the sessions of an instance that froze).
    pub async fn connect_as(cfg: &Config, application_name: &str) -> Result<Setup, ReplicaError> {
        Ok(Setup {
            pool: replica::connect_as(&cfg.replica, application_name).await?,
            settings: ApplySettings::from_config(cfg),
        })
    }

    /// Creates the schemas and applies pending control-schema migrations.
    pub async fn migrate(&self) -> Result<(), ReplicaError> {
        let mut client = self.pool.get().await?;
        migrate::migrate(
            &mut client,
            &self.settings.data_schema,
            &self.settings.control_schema,
        )
        .await?;
        Ok(())
    }
}

impl Setup {
    /// Requeues repairs parked under a configuration other than `fingerprint`: what failed
    /// definitely may work now.
    pub async fn requeue_changed(&self, fingerprint: &str) -> Result<u64, ReplicaError> {
        let client = self.pool.get().await?;
        let n = repair_queue::requeue_changed(&client, &self.settings.control_schema, fingerprint)
            .await?;
        if n > 0 {
            tracing::info!(
                repairs = n,
                "parked repairs requeued: the configuration changed"
            );
        }
        Ok(n)
    }

    /// Requeues parked repairs of `objects` (all when empty).
    pub async fn requeue(&self, objects: &[String]) -> Result<u64, ReplicaError> {
        let client = self.pool.get().await?;
        repair_queue::requeue(&client, &self.settings.control_schema, objects).await
    }
}

/// The org's clients, logged in once: bad credentials fail here with one clear message.
pub async fn login(cfg: &Config) -> Result<Salesforce, SourceError> {
    let salesforce = Salesforce::new(&cfg.salesforce)?;
    salesforce.login().await?;
    Ok(salesforce)
}
