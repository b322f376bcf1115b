//! Advisory locks the writers coordinate with, all inside Postgres so that every wait is one
//! the deadlock detector can see.
//!
//! - A backfill holds a session lock per object ([`try_backfill`]), so two backfills of one
//!   object never interleave; the daemon never takes it.
//! - A channel's batch holds a transaction lock ([`hold_batch`]); the batch after it, running
//!   beside it, waits for it by asking for the same lock shared ([`wait_for_batch`]). Should a
//!   third transaction close a cycle through the two, Postgres breaks it with a deadlock error
//!   (transient) instead of leaving all three waiting.
//! - In hard delete mode, a stream batch holds the write lock of every object it writes,
//!   shared ([`share_writes`]), from the start of its transaction; a snapshot merge of an
//!   object (backfill, repair) holds that object's lock exclusively ([`exclude_writes`]). A
//!   hard delete leaves no row for the two to meet on: without the lock, a snapshot row of a
//!   record being deleted (read while it was live) could be inserted after the delete, with a
//!   tombstone check that could not yet see the tombstone, and bring the record back; and an
//!   older stream change could do the same beside a snapshot's delete. With it, whichever
//!   comes second sees what the first committed (both run at READ COMMITTED). Batches share
//!   the lock, so the stream never waits for itself; a batch writing an object waits for a
//!   snapshot chunk of it in progress (one chunk, a fraction of a second), and a snapshot
//!   chunk for the batches in flight. Taking the locks before any row lock keeps the order
//!   the same everywhere; any other cycle is one the deadlock detector breaks.
//!
//! In soft delete mode a deleted record keeps its row, on which every writer meets, and no
//! write lock is taken.

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

fn write_key(data_schema: &str, object: &str) -> String {
    format!("sfmirror writes {data_schema}.{object}")
}

/// Holds `object`'s write lock shared until the transaction ends (a stream batch in hard
/// delete mode, before its first write).
pub async fn share_writes(
    tx: &impl deadpool_postgres::GenericClient,
    data_schema: &str,
    object: &str,
) -> Result<(), ReplicaError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared(hashtext($1))",
        &[&write_key(data_schema, object)],
    )
    .await
    .map_err(ReplicaError::pg(format!("lock the writes of {object}")))?;
    Ok(())
}

/// Holds `object`'s write lock exclusively until the transaction ends (a snapshot merge in
/// hard delete mode, before it reads or writes anything): waits for the batches writing it.
pub async fn exclude_writes(
    tx: &impl deadpool_postgres::GenericClient,
    data_schema: &str,
    object: &str,
) -> Result<(), ReplicaError> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&write_key(data_schema, object)],
    )
    .await
    .map_err(ReplicaError::pg(format!(
        "wait for the batches writing {object}"
    )))?;
    Ok(())
}
