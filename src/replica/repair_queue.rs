//! The repair queue: durable obligations to re-read records or whole objects over REST.
//!
//! Requests are inserted in the transaction of the batch that created them, so the checkpoint
//! can only move past an undeliverable change together with the promise to repair it
//! (invariant 2). A record already queued is not queued twice, and one entity repair per
//! object covers the earliest `since` asked for.
//!
//! Repairs are claimed with a lease (`next_attempt_at` pushed into the future) and the backend
//! pid of the claiming connection (`claimed_by`), so a worker that dies leaves them to be
//! retried: at once when its process is gone (its connections, and so that backend, are
//! gone), at the latest when the lease runs out. They are completed only if nobody asked
//! again after the claim (`requested_at`), so a new obligation arriving mid-repair is not
//! swallowed. A claim taken over while its first holder still works (a connection lost) only
//! repeats a repair, which is harmless: its rows go through the version guard; a pid reused
//! by another backend only makes a dead claim wait for its lease. Behind a pooler in
//! transaction mode (PgBouncer, Supavisor) backend pids say nothing about the daemon, and
//! claims are taken over by the lease alone.
//!
//! A repair that failed transiently goes back with a backoff ([`fail`]); one that failed
//! definitely is parked ([`park`]): never due, kept with its error, until the operator
//! requeues it ([`requeue`]) or the daemon starts under another configuration
//! ([`requeue_changed`]). A new request for a parked repair is folded into it and stays
//! parked, so nothing asked for is lost while it waits.

use super::{ReplicaError, quote};
use crate::backoff::Backoff;
use crate::model::ReplayId;
use std::time::Duration;

/// What the stream could not deliver, to be fetched over REST.
#[derive(Debug, Clone, PartialEq)]
pub enum RepairRequest {
    /// Re-read one record.
    Record {
        object: String,
        id: String,
        reason: String,
    },
    /// Re-read every record of `object` changed since `since_ms` (epoch ms).
    Entity {
        object: String,
        since_ms: i64,
        reason: String,
    },
}

/// Inserts `requests`, noting the channel and replay id that caused them.
pub async fn enqueue(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    channel: &str,
    replay_id: Option<&ReplayId>,
    requests: &[RepairRequest],
) -> Result<(), ReplicaError> {
    if requests.is_empty() {
        return Ok(());
    }
    let ctl = quote(control_schema);
    let replay = replay_id.map(|r| r.0.clone());
    for r in requests {
        match r {
            RepairRequest::Record { object, id, reason } => {
                client
                    .execute(
                        &format!(
                            "INSERT INTO {ctl}.repair_queue
                               (object, kind, record_id, reason, channel, replay_id)
                             VALUES ($1, 'record', $2, $3, $4, $5)
                             ON CONFLICT (object, record_id) WHERE kind = 'record' DO UPDATE
                             SET requested_at = now(), reason = EXCLUDED.reason,
                                 next_attempt_at = CASE WHEN repair_queue.parked_at IS NULL
                                     THEN LEAST(repair_queue.next_attempt_at, now())
                                     ELSE repair_queue.next_attempt_at END"
                        ),
                        &[object, id, reason, &channel, &replay],
                    )
                    .await
                    .map_err(ReplicaError::pg(format!(
                        "queue record repair {object} {id}"
                    )))?;
            }
            RepairRequest::Entity {
                object,
                since_ms,
                reason,
            } => {
                client
                    .execute(
                        &format!(
                            "INSERT INTO {ctl}.repair_queue
                               (object, kind, since, reason, channel, replay_id)
                             VALUES ($1, 'entity', to_timestamp($2::bigint / 1000.0), $3, $4, $5)
                             ON CONFLICT (object) WHERE kind = 'entity' DO UPDATE
                             SET since = LEAST(repair_queue.since, EXCLUDED.since),
                                 reason = EXCLUDED.reason, requested_at = now(),
                                 next_attempt_at = CASE WHEN repair_queue.parked_at IS NULL
                                     THEN LEAST(repair_queue.next_attempt_at, now())
                                     ELSE repair_queue.next_attempt_at END"
                        ),
                        &[object, since_ms, reason, &channel, &replay],
                    )
                    .await
                    .map_err(ReplicaError::pg(format!("queue entity repair {object}")))?;
            }
        }
    }
    Ok(())
}

/// Queued repairs of one object: how many are waiting, and how many of those are parked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub object: String,
    pub pending: i64,
    pub parked: i64,
}

/// Queued repairs per object (for the `sfmirror_repairs_pending` and `_parked` gauges).
pub async fn pending(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
) -> Result<Vec<Pending>, ReplicaError> {
    let rows = client
        .query(
            &format!(
                "SELECT object, count(*), count(*) FILTER (WHERE parked_at IS NOT NULL)
                 FROM {}.repair_queue GROUP BY object ORDER BY object",
                quote(control_schema)
            ),
            &[],
        )
        .await
        .map_err(ReplicaError::pg("count pending repairs"))?;
    Ok(rows
        .iter()
        .map(|r| Pending {
            object: r.get(0),
            pending: r.get(1),
            parked: r.get(2),
        })
        .collect())
}

/// Pending repairs of one object and kind, as `status` shows them.
#[derive(Debug, Clone)]
pub struct Summary {
    pub object: String,
    /// `record` or `entity`.
    pub kind: String,
    pub pending: i64,
    /// Of those, how many failed at least once.
    pub retrying: i64,
    /// Of those, how many are parked (failed definitely; see [`park`]).
    pub parked: i64,
    /// Epoch ms of the oldest request.
    pub oldest_requested_ms: Option<i64>,
    /// The error of the repair that failed last, if any did.
    pub last_error: Option<String>,
}

/// The repair queue by object and kind. `parking` says whether the control schema has the
/// parking columns (migration 5): `status` also reads a replica whose daemon has not been
/// restarted since this binary was installed.
pub async fn summary(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    parking: bool,
) -> Result<Vec<Summary>, ReplicaError> {
    let (parked, not_parked) = if parking {
        (
            "count(*) FILTER (WHERE parked_at IS NOT NULL)",
            "AND parked_at IS NULL",
        )
    } else {
        ("0::bigint", "")
    };
    let rows = client
        .query(
            &format!(
                "SELECT object, kind, count(*),
                        count(*) FILTER (WHERE attempts > 0 {not_parked}), {parked},
                        (extract(epoch FROM min(requested_at)) * 1000)::bigint,
                        (array_agg(last_error ORDER BY next_attempt_at DESC)
                            FILTER (WHERE last_error IS NOT NULL))[1]
                 FROM {}.repair_queue GROUP BY object, kind ORDER BY object, kind",
                quote(control_schema)
            ),
            &[],
        )
        .await
        .map_err(ReplicaError::pg("reading the repair queue"))?;
    Ok(rows
        .iter()
        .map(|r| Summary {
            object: r.get(0),
            kind: r.get(1),
            pending: r.get(2),
            retrying: r.get(3),
            parked: r.get(4),
            oldest_requested_ms: r.get(5),
            last_error: r.get(6),
        })
        .collect())
}

/// What a queued repair asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum RepairKind {
    Record(String),
    /// Everything changed since this epoch ms.
    Entity(i64),
}

/// A claimed repair.
#[derive(Debug, Clone)]
pub struct Repair {
    pub repair_id: i64,
    pub object: String,
    pub kind: RepairKind,
    pub attempts: i32,
    /// Epoch ms of the claim; the repair is done only if not asked for again after it.
    pub claimed_at_ms: i64,
}

/// Claims up to `limit` due repairs for `lease_secs` (record repairs first, grouped by
/// object). Other workers skip claimed rows.
pub async fn claim(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    limit: i64,
    lease_secs: i64,
) -> Result<Vec<Repair>, ReplicaError> {
    let rows = client
        .query(
            &format!(
                "WITH due AS (
                   SELECT repair_id FROM {ctl}.repair_queue
                   WHERE repair_id IN (
                       -- Each branch on its own index: the due ones, and the claims whose
                       -- holder is gone (a handful at most).
                       SELECT repair_id FROM {ctl}.repair_queue WHERE next_attempt_at <= now()
                       UNION ALL
                       SELECT repair_id FROM {ctl}.repair_queue r
                       WHERE claimed_by IS NOT NULL AND NOT EXISTS (
                           SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.claimed_by))
                   ORDER BY kind DESC, object, next_attempt_at, repair_id
                   LIMIT $1 FOR UPDATE SKIP LOCKED)
                 UPDATE {ctl}.repair_queue q
                 SET next_attempt_at = now() + make_interval(secs => $2::bigint),
                     claimed_by = pg_backend_pid()
                 FROM due WHERE q.repair_id = due.repair_id
                 RETURNING q.repair_id, q.object, q.kind, q.record_id,
                           (extract(epoch FROM q.since) * 1000)::bigint, q.attempts,
                           (extract(epoch FROM now()) * 1000)::bigint",
                ctl = quote(control_schema)
            ),
            &[&limit, &lease_secs],
        )
        .await
        .map_err(ReplicaError::pg("claim repairs"))?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let kind: String = r.get(2);
        let kind = if kind == "record" {
            RepairKind::Record(r.get::<_, Option<String>>(3).unwrap_or_default())
        } else {
            RepairKind::Entity(r.get::<_, Option<i64>>(4).unwrap_or(0))
        };
        out.push(Repair {
            repair_id: r.get(0),
            object: r.get(1),
            kind,
            attempts: r.get(5),
            claimed_at_ms: r.get(6),
        });
    }
    Ok(out)
}

/// Removes completed repairs (call in the transaction that applied their rows). Repairs asked
/// for again after their claim stay, due at once.
pub async fn complete(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    repairs: &[&Repair],
) -> Result<(), ReplicaError> {
    let ctl = quote(control_schema);
    let ids: Vec<i64> = repairs.iter().map(|r| r.repair_id).collect();
    let claimed: Vec<i64> = repairs.iter().map(|r| r.claimed_at_ms).collect();
    client
        .execute(
            &format!(
                "DELETE FROM {ctl}.repair_queue q USING unnest($1::bigint[], $2::bigint[]) AS c(id, at)
                 WHERE q.repair_id = c.id AND q.requested_at <= to_timestamp(c.at / 1000.0)"
            ),
            &[&ids, &claimed],
        )
        .await
        .map_err(ReplicaError::pg("complete repairs"))?;
    client
        .execute(
            &format!(
                "UPDATE {ctl}.repair_queue SET next_attempt_at = now(), claimed_by = NULL
                 WHERE repair_id = ANY($1) AND parked_at IS NULL"
            ),
            &[&ids],
        )
        .await
        .map_err(ReplicaError::pg("release re-requested repairs"))?;
    Ok(())
}

/// Extends the lease of a repair still in progress (a large entity repair, chunk by chunk), so
/// that no other worker takes it over while it is making progress.
pub async fn renew(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    repair: &Repair,
    lease_secs: i64,
) -> Result<(), ReplicaError> {
    client
        .execute(
            &format!(
                "UPDATE {}.repair_queue
                 SET next_attempt_at = greatest(next_attempt_at,
                                                now() + make_interval(secs => $2::bigint))
                 WHERE repair_id = $1 AND parked_at IS NULL",
                quote(control_schema)
            ),
            &[&repair.repair_id, &lease_secs],
        )
        .await
        .map_err(ReplicaError::pg("renew repair lease"))?;
    Ok(())
}

/// How long a repair that failed transiently waits before its next attempt: from one second,
/// doubling with each failed attempt, up to an hour.
pub fn retry_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(3600))
}

/// Records a failed attempt of repairs that may succeed later: each is due again after the
/// [`retry_backoff`] of its attempts so far, and the error is kept for `status`.
pub async fn fail(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    repairs: &[&Repair],
    error: &str,
) -> Result<(), ReplicaError> {
    let backoff = retry_backoff();
    let ids: Vec<i64> = repairs.iter().map(|r| r.repair_id).collect();
    let waits: Vec<f64> = repairs
        .iter()
        .map(|r| {
            backoff
                .delay_for(u32::try_from(r.attempts).unwrap_or(0))
                .as_secs_f64()
        })
        .collect();
    client
        .execute(
            &format!(
                "UPDATE {}.repair_queue q
                 SET attempts = attempts + 1, last_error = $3, claimed_by = NULL,
                     next_attempt_at = now() + make_interval(secs => f.wait)
                 FROM unnest($1::bigint[], $2::float8[]) AS f(id, wait)
                 WHERE q.repair_id = f.id AND q.parked_at IS NULL",
                quote(control_schema)
            ),
            &[&ids, &waits, &error],
        )
        .await
        .map_err(ReplicaError::pg("record repair failure"))?;
    Ok(())
}

/// Parks repairs that failed definitely: never due again, kept with `error`, until
/// [`requeue`] or [`requeue_changed`]. `config` is the fingerprint of the configuration they
/// failed under.
pub async fn park(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    repairs: &[&Repair],
    error: &str,
    config: &str,
) -> Result<(), ReplicaError> {
    let ids: Vec<i64> = repairs.iter().map(|r| r.repair_id).collect();
    client
        .execute(
            &format!(
                "UPDATE {}.repair_queue
                 SET attempts = attempts + 1, last_error = $2, claimed_by = NULL,
                     next_attempt_at = 'infinity', parked_at = now(), parked_config = $3
                 WHERE repair_id = ANY($1)",
                quote(control_schema)
            ),
            &[&ids, &error, &config],
        )
        .await
        .map_err(ReplicaError::pg("park repairs"))?;
    Ok(())
}

/// Makes parked repairs due again (those of `objects`, or all when empty); returns how many.
pub async fn requeue(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    objects: &[String],
) -> Result<u64, ReplicaError> {
    unpark(
        client,
        control_schema,
        "cardinality($1::text[]) = 0 OR object = ANY($1)",
        &objects,
    )
    .await
}

/// Makes due again the parked repairs that were parked under another configuration than
/// `config` (a fingerprint); returns how many.
pub async fn requeue_changed(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    config: &str,
) -> Result<u64, ReplicaError> {
    unpark(
        client,
        control_schema,
        "parked_config IS DISTINCT FROM $1",
        &config,
    )
    .await
}

/// Makes the parked repairs for which `condition` (on `$1`) holds due again, with a fresh
/// attempt count.
async fn unpark(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    condition: &str,
    param: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<u64, ReplicaError> {
    client
        .execute(
            &format!(
                "UPDATE {}.repair_queue
                 SET parked_at = NULL, parked_config = NULL, attempts = 0,
                     next_attempt_at = now()
                 WHERE parked_at IS NOT NULL AND ({condition})",
                quote(control_schema)
            ),
            &[param],
        )
        .await
        .map_err(ReplicaError::pg("requeue parked repairs"))
}
