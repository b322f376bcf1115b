//! Advisory locks the writers coordinate with, all inside Postgres so that every wait is one
//! the deadlock detector can see.
//!
//! - A backfill holds a session lock per object ([`try_backfill`]), so two backfills of one
//!   object never interleave; the daemon never takes it.
//! - A channel's batch holds a transaction lock ([`hold_batch`]); the batch after it, running
//!   beside it, waits for it by asking for the same lock shared ([`wait_for_batch`]). Should a
//!   third transaction close a cycle through the two, Postgres breaks it with a deadlock error
//!   (transient) instead of leaving all three waiting.

use super::ReplicaError;

/// A backfill's lock on one object: held by a connection of its own, taken out of the pool,
/// so that dropping the guard closes the connection and releases the lock on every path
/// (an error, a panic, a cancelled task).
pub struct BackfillLock {
    _session: deadpool_postgres::ClientWrapper,
}

/// Takes the backfill lock of `object` in `data_schema`; `None` when another backfill holds
/// it.
pub async fn try_backfill(
    pool: &deadpool_postgres::Pool,
    data_schema: &str,
    object: &str,
) -> Result<Option<BackfillLock>, ReplicaError> {
    let session = deadpool_postgres::Object::take(pool.get().await?);
    let key = format!("sfmirror backfill {data_schema}.{object}");
    let taken: bool = session
        .query_one("SELECT pg_try_advisory_lock(hashtext($1))", &[&key])
        .await
        .map_err(ReplicaError::pg(format!("lock the backfill of {object}")))?
        .get(0);
    Ok(taken.then_some(BackfillLock { _session: session }))
}

/// Takes `key` for the rest of the batch's transaction.
pub async fn hold_batch(
    tx: &impl deadpool_postgres::GenericClient,
    key: i64,
) -> Result<(), ReplicaError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&key])
        .await
        .map_err(ReplicaError::pg("take the batch's advisory lock"))?;
    Ok(())
}

/// Waits, inside the transaction, until the batch holding `key` has ended.
pub async fn wait_for_batch(
    tx: &impl deadpool_postgres::GenericClient,
    key: i64,
) -> Result<(), ReplicaError> {
    tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&key])
        .await
        .map_err(ReplicaError::pg("wait for the batch before"))?;
    Ok(())
}
