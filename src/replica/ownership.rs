//! Who replicates which channel: instances, channel leases and the fencing epoch, in
//! `<control_schema>.{instances, channel_leases, ownership_log, batch_audit, start_attempts}`.
//!
//! Several instances may run with one configuration (a hot standby, or more channels than one
//! host should carry). Each channel has one lease row. Its owner renews the lease every few
//! seconds; another instance may take the channel only once the lease has expired (database
//! time, so no host clock matters). A takeover locks the row `FOR UPDATE` and increments the
//! channel's epoch.
//!
//! # Why a former owner can never commit after a takeover
//!
//! Every transaction that moves a channel's checkpoint first runs [`check`]: it locks the
//! lease row `FOR KEY SHARE` and compares the epoch with the one its owner took. The lock is
//! held until that transaction ends, and it conflicts with the takeover's `FOR UPDATE`. So
//! either the former owner's transaction holds the lock first, and the takeover waits until it
//! has committed (the new owner then reads the checkpoint that transaction wrote), or the
//! takeover committed first, and the former owner's check reads the new epoch and its
//! transaction rolls back ([`ReplicaError::Fenced`]). A paused owner holding the lock in an
//! open transaction would block a takeover for ever: the taker waits at most a lock timeout,
//! then ends that instance's sessions ([`terminate_sessions`]), which rolls the transaction
//! back, and tries again.
//!
//! Renewing a lease only updates non-key columns, which takes a lock compatible with
//! `FOR KEY SHARE`: a long batch never delays its own owner's renewal.

use super::{ReplicaError, quote};
use std::time::Duration;

/// This process as the other instances see it.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Unique per daemon run: `<host>/<pid>/<random>`.
    pub id: String,
    pub host: String,
    pub pid: i32,
}

impl Instance {
    /// A fresh identity for a daemon run on this host.
    pub fn new() -> Instance {
        let host = hostname();
        let pid = std::process::id() as i32;
        let nonce: u32 = rand::random();
        Instance {
            id: format!("{host}/{pid}/{nonce:08x}"),
            host,
            pid,
        }
    }

    /// The `application_name` of this instance's connections, by which a taker finds the
    /// sessions of an instance that froze (at most 63 bytes, as Postgres keeps).
    pub fn application_name(&self) -> String {
        application_name(&self.id)
    }
}

impl Default for Instance {
    fn default() -> Self {
        Instance::new()
    }
}

/// `sfmirror <pid>/<nonce> <host>`: the unique part first, since Postgres keeps 63 bytes.
fn application_name(instance: &str) -> String {
    let mut parts = instance.rsplitn(3, '/');
    let (nonce, pid, host) = (parts.next(), parts.next(), parts.next());
    let name = match (nonce, pid, host) {
        (Some(nonce), Some(pid), Some(host)) => format!("sfmirror {pid}/{nonce} {host}"),
        _ => format!("sfmirror {instance}"),
    };
    let mut end = name.len().min(63);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// This host's name, as the kernel knows it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// What lets a transaction move a channel's checkpoint: the epoch its owner took it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub channel: String,
    pub epoch: i64,
    pub instance: String,
}

/// Locks `fence.channel`'s lease row until the end of the transaction `client` is in and checks
/// that the channel is still owned at `fence.epoch`; [`ReplicaError::Fenced`] otherwise.
pub async fn check(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    fence: &Fence,
) -> Result<(), ReplicaError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT epoch, instance FROM {}.channel_leases WHERE channel = $1 FOR KEY SHARE",
                quote(control_schema)
            ),
            &[&fence.channel],
        )
        .await
        .map_err(ReplicaError::pg(format!(
            "check ownership of {}",
            fence.channel
        )))?;
    let (epoch, owner): (i64, Option<String>) = match row {
        Some(r) => (r.get(0), r.get(1)),
        None => (0, None),
    };
    if epoch == fence.epoch {
        Ok(())
    } else {
        Err(ReplicaError::Fenced {
            channel: fence.channel.clone(),
            epoch: fence.epoch,
            current: epoch,
            owner: owner.unwrap_or_default(),
        })
    }
}

/// One channel's lease as read by [`leases`].
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub channel: String,
    pub epoch: i64,
    pub instance: Option<String>,
    pub host: Option<String>,
    pub pid: Option<i32>,
    /// Whether the lease has run out (database time).
    pub expired: bool,
}

/// The columns [`Lease::from_row`] reads, in its order.
const LEASE_COLUMNS: &str =
    "channel, epoch, instance, host, pid, expires_at <= clock_timestamp() AS expired";

impl Lease {
    fn from_row(r: &tokio_postgres::Row) -> Lease {
        Lease {
            channel: r.get(0),
            epoch: r.get(1),
            instance: r.get(2),
            host: r.get(3),
            pid: r.get(4),
            expired: r.get(5),
        }
    }

    /// Whether instance `me` may take this channel: the lease ran out, was never held, is
    /// already `me`'s, or its owner is gone (`owner_gone`, a process of this host that no
    /// longer runs).
    pub fn takeable(&self, me: &str, owner_gone: impl Fn(&Lease) -> bool) -> bool {
        self.expired
            || self.instance.is_none()
            || self.instance.as_deref() == Some(me)
            || owner_gone(self)
    }
}

/// Every channel's lease.
pub async fn leases(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
) -> Result<Vec<Lease>, ReplicaError> {
    let rows = client
        .query(
            &format!(
                "SELECT {LEASE_COLUMNS} FROM {}.channel_leases ORDER BY channel",
                quote(control_schema)
            ),
            &[],
        )
        .await
        .map_err(ReplicaError::pg("read channel leases"))?;
    Ok(rows.iter().map(Lease::from_row).collect())
}

/// What one heartbeat found.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    /// The channels of `owned` whose leases were renewed; the others were taken over.
    pub renewed: Vec<String>,
    /// Instances whose heartbeat is younger than the lease, this one included.
    pub live_instances: i64,
}

/// Records this instance's heartbeat and renews the leases it holds on `owned` (each with the
/// epoch it took it with) for `ttl`, in one transaction.
pub async fn heartbeat(
    client: &mut deadpool_postgres::Client,
    control_schema: &str,
    me: &Instance,
    owned: &[(String, i64)],
    ttl: Duration,
) -> Result<Heartbeat, ReplicaError> {
    let ctl = quote(control_schema);
    let ttl_ms = ttl.as_millis() as i64;
    let tx = super::begin(client, "heartbeat").await?;
    tx.execute(
        &format!(
            "INSERT INTO {ctl}.instances (instance, host, pid) VALUES ($1, $2, $3)
             ON CONFLICT (instance) DO UPDATE SET heartbeat_at = clock_timestamp()"
        ),
        &[&me.id, &me.host, &me.pid],
    )
    .await
    .map_err(ReplicaError::pg("record heartbeat"))?;
    let channels: Vec<&str> = owned.iter().map(|(c, _)| c.as_str()).collect();
    let epochs: Vec<i64> = owned.iter().map(|(_, e)| *e).collect();
    let rows = tx
        .query(
            &format!(
                "UPDATE {ctl}.channel_leases l
                 SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
                 FROM unnest($1::text[], $2::bigint[]) AS o(channel, epoch)
                 WHERE l.channel = o.channel AND l.epoch = o.epoch AND l.instance = $4
                 RETURNING l.channel"
            ),
            &[&channels, &epochs, &ttl_ms, &me.id],
        )
        .await
        .map_err(ReplicaError::pg("renew channel leases"))?;
    let renewed = rows.iter().map(|r| r.get(0)).collect();
    let live: i64 = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM {ctl}.instances
                 WHERE heartbeat_at > clock_timestamp() - $1::bigint * interval '1 millisecond'"
            ),
            &[&ttl_ms],
        )
        .await
        .map_err(ReplicaError::pg("count live instances"))?
        .get(0);
    // Instances gone for a day are forgotten.
    tx.execute(
        &format!(
            "DELETE FROM {ctl}.instances WHERE heartbeat_at < clock_timestamp() - interval '1 day'"
        ),
        &[],
    )
    .await
    .map_err(ReplicaError::pg("forget old instances"))?;
    tx.commit()
        .await
        .map_err(ReplicaError::pg("commit heartbeat"))?;
    Ok(Heartbeat {
        renewed,
        live_instances: live.max(1),
    })
}

/// What [`take`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Take {
    /// The channel is ours at this epoch.
    Taken {
        epoch: i64,
        previous: Option<String>,
    },
    /// Its lease is held (renewed meanwhile, or by a live instance).
    Held,
    /// Its lease ran out but its row is locked by a transaction of its former owner that did
    /// not end within the lock timeout: that instance is frozen or cut off mid-batch.
    Blocked,
}

/// Takes `channel` for `me` if its lease is [`Lease::takeable`] (with `owner_gone`). Waits at
/// most `lock_wait` for a former owner's batch to end.
pub async fn take(
    client: &mut deadpool_postgres::Client,
    control_schema: &str,
    me: &Instance,
    channel: &str,
    ttl: Duration,
    lock_wait: Duration,
    owner_gone: impl Fn(&Lease) -> bool,
) -> Result<Take, ReplicaError> {
    let ctl = quote(control_schema);
    client
        .execute(
            &format!(
                "INSERT INTO {ctl}.channel_leases (channel) VALUES ($1) ON CONFLICT DO NOTHING"
            ),
            &[&channel],
        )
        .await
        .map_err(ReplicaError::pg(format!("create the lease of {channel}")))?;
    let tx = super::begin(client, "takeover").await?;
    tx.execute(
        &format!("SET LOCAL lock_timeout = {}", lock_wait.as_millis().max(1)),
        &[],
    )
    .await
    .map_err(ReplicaError::pg("set the takeover's lock timeout"))?;
    let lease = match tx
        .query_one(
            &format!(
                "SELECT {LEASE_COLUMNS} FROM {ctl}.channel_leases WHERE channel = $1 FOR UPDATE"
            ),
            &[&channel],
        )
        .await
    {
        Ok(row) => Lease::from_row(&row),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            return Ok(Take::Blocked);
        }
        Err(e) => return Err(ReplicaError::pg(format!("lock the lease of {channel}"))(e)),
    };
    if !lease.takeable(&me.id, owner_gone) {
        return Ok(Take::Held);
    }
    let ttl_ms = ttl.as_millis() as i64;
    let epoch: i64 = tx
        .query_one(
            &format!(
                "UPDATE {ctl}.channel_leases
                 SET epoch = epoch + 1, instance = $2, host = $3, pid = $4,
                     acquired_at = clock_timestamp(),
                     expires_at = clock_timestamp() + $5::bigint * interval '1 millisecond'
                 WHERE channel = $1 RETURNING epoch"
            ),
            &[&channel, &me.id, &me.host, &me.pid, &ttl_ms],
        )
        .await
        .map_err(ReplicaError::pg(format!("take the lease of {channel}")))?
        .get(0);
    tx.execute(
        &format!(
            "INSERT INTO {ctl}.ownership_log (channel, epoch, instance, host, pid, previous)
             VALUES ($1, $2, $3, $4, $5, $6)"
        ),
        &[&channel, &epoch, &me.id, &me.host, &me.pid, &lease.instance],
    )
    .await
    .map_err(ReplicaError::pg(format!("log the takeover of {channel}")))?;
    tx.commit().await.map_err(ReplicaError::pg(format!(
        "commit the takeover of {channel}"
    )))?;
    Ok(Take::Taken {
        epoch,
        previous: lease.instance,
    })
}

/// Ends every session of `instance` (found by its `application_name`) on this database:
/// its open transactions roll back and the locks they held are released. A role may end its
/// own sessions; other roles' need `pg_signal_backend`. Returns how many were ended.
pub async fn terminate_sessions(
    client: &impl deadpool_postgres::GenericClient,
    instance: &str,
) -> Result<u64, ReplicaError> {
    let rows = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND datname = current_database()
               AND pid <> pg_backend_pid()",
            &[&application_name(instance)],
        )
        .await
        .map_err(ReplicaError::pg(format!(
            "end the sessions of instance {instance}"
        )))?;
    Ok(rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64)
}

/// Lets the leases `me` holds on `channels` run out at once (a clean stop: a standby takes
/// over at its next look, not a lease later), and removes `me` from the live instances.
pub async fn release(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    me: &Instance,
    channels: &[String],
) -> Result<(), ReplicaError> {
    let ctl = quote(control_schema);
    client
        .execute(
            &format!(
                "UPDATE {ctl}.channel_leases SET expires_at = '-infinity'
                 WHERE instance = $1 AND channel = ANY($2)"
            ),
            &[&me.id, &channels],
        )
        .await
        .map_err(ReplicaError::pg("release channel leases"))?;
    client
        .execute(
            &format!("DELETE FROM {ctl}.instances WHERE instance = $1"),
            &[&me.id],
        )
        .await
        .map_err(ReplicaError::pg("leave the live instances"))?;
    Ok(())
}

/// Records a committed batch of `fence`'s owner (only with `[ha] audit`). Call it in the
/// batch's transaction.
pub async fn audit_batch(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    fence: &Fence,
    first: Option<&[u8]>,
    last: &[u8],
    events: usize,
) -> Result<(), ReplicaError> {
    client
        .execute(
            &format!(
                "INSERT INTO {}.batch_audit (channel, epoch, instance, first_replay, last_replay,
                                             events)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                quote(control_schema)
            ),
            &[
                &fence.channel,
                &fence.epoch,
                &fence.instance,
                &first,
                &last,
                &(events as i32),
            ],
        )
        .await
        .map_err(ReplicaError::pg(format!(
            "audit a batch of {}",
            fence.channel
        )))?;
    Ok(())
}

/// Counts a start of the daemon on `host` and returns how many starts before it failed in a
/// row (0 after a start that got ready).
pub async fn start_attempt(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    host: &str,
) -> Result<u32, ReplicaError> {
    let before: i32 = client
        .query_one(
            &format!(
                "INSERT INTO {}.start_attempts AS s (host, failed) VALUES ($1, 1)
                 ON CONFLICT (host) DO UPDATE
                   SET failed = s.failed + 1, last_start = clock_timestamp()
                 RETURNING failed - 1",
                quote(control_schema)
            ),
            &[&host],
        )
        .await
        .map_err(ReplicaError::pg("count the start"))?
        .get(0);
    Ok(before.max(0) as u32)
}

/// Records that the daemon on `host` got ready: the next start waits for nothing.
pub async fn started(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    host: &str,
) -> Result<(), ReplicaError> {
    client
        .execute(
            &format!(
                "UPDATE {}.start_attempts SET failed = 0 WHERE host = $1",
                quote(control_schema)
            ),
            &[&host],
        )
        .await
        .map_err(ReplicaError::pg("record a good start"))?;
    Ok(())
}

/// Whether process `pid` runs on this host.
pub fn process_alive(pid: i32) -> bool {
    pid > 0 && std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_names_fit_postgres() {
        let long = format!("{}/4242/0badcafe", "h".repeat(80));
        let name = application_name(&long);
        assert!(name.len() <= 63);
        assert!(name.starts_with("sfmirror 4242/0badcafe h"), "{name}");
        let me = Instance::new();
        assert!(me.id.starts_with(&format!("{}/{}/", me.host, me.pid)));
        assert_ne!(Instance::new().id, me.id, "each run has its own identity");
    }

    #[test]
    fn this_process_is_alive() {
        assert!(process_alive(std::process::id() as i32));
        assert!(!process_alive(0));
        assert!(!process_alive(-4));
    }
}
