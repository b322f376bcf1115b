//! Advisory locks the writers coordinate with, all inside Postgres so that every wait is one
//! the deadlock detector can see.
//!
//! - A backfill holds a session lock per object ([`try_backfill`]), so two backfills of one
//!   object never interleave; the daemon never takes it.
//! - A channel's batch holds a transaction lock ([`hold_batch`]); the batch after it, running
//!   beside it, waits for it by asking for the same lock shared ([`wait_for_batch`]). Should a
//!   third transaction close a cycle through the two, Postgres breaks it with a deadlock error
//!   (transient) instead of leaving all three waiting.
//! - In hard delete mode, a batch that deletes records of an object holds that object's
//!   delete lock shared ([`share_deletes`]), and a snapshot merge of the object holds it
//!   exclusively ([`exclude_deletes`]). A hard delete leaves no row for the two to meet on:
//!   without the lock, a snapshot row of a record being deleted (read while it was live)
//!   could be inserted after the delete, with a tombstone check that could not yet see the
//!   tombstone, and bring the record back. With it, whichever comes second sees what the
//!   first committed. Batches share the lock, so the stream never waits for itself.

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

fn delete_key(data_schema: &str, object: &str) -> String {
    format!("sfmirror hard delete {data_schema}.{object}")
}

/// Holds `object`'s delete lock shared until the transaction ends (before hard deletes).
pub async fn share_deletes(
    tx: &impl deadpool_postgres::GenericClient,
    data_schema: &str,
    object: &str,
) -> Result<(), ReplicaError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtext($1))",
        &[&delete_key(data_schema, object)],
    )
    .await
    .map_err(ReplicaError::pg(format!("lock the deletes of {object}")))?;
    Ok(())
}

/// Holds `object`'s delete lock exclusively until the transaction ends (before a snapshot
/// merge in hard delete mode): waits for batches deleting its records to end.
pub async fn exclude_deletes(
    tx: &impl deadpool_postgres::GenericClient,
    data_schema: &str,
    object: &str,
) -> Result<(), ReplicaError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&delete_key(data_schema, object)],
    )
    .await
    .map_err(ReplicaError::pg(format!(
        "wait for deletes of {object} in flight"
    )))?;
    Ok(())
}
