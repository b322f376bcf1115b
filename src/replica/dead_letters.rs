//! Events that could not be decoded, kept with their raw bytes in
//! `<control_schema>.dead_letters` for `sfmirror inspect-event`.
//!
//! A dead letter is written in the transaction of the batch whose checkpoint passes it,
//! together with the entity repair that covers what it described (invariant 2): the event is
//! never skipped without trace.

use super::{ReplicaError, quote};
use crate::model::ReplayId;

/// One undecodable event.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub replay_id: ReplayId,
    pub schema_id: String,
    pub payload: Vec<u8>,
    pub error: String,
}

/// Records `letters` received on `channel`; call it in the batch's transaction.
pub async fn record(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    channel: &str,
    letters: &[&DeadLetter],
) -> Result<(), ReplicaError> {
    if letters.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO {}.dead_letters (channel, replay_id, schema_id, payload, error)
         VALUES ($1, $2, $3, $4, $5)",
        quote(control_schema)
    );
    for d in letters {
        client
            .execute(
                &sql,
                &[&channel, &d.replay_id.0, &d.schema_id, &d.payload, &d.error],
            )
            .await
            .map_err(ReplicaError::pg(format!("write dead letter on {channel}")))?;
    }
    Ok(())
}

/// How many dead letters are kept.
pub async fn count(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
) -> Result<i64, ReplicaError> {
    Ok(client
        .query_one(
            &format!(
                "SELECT count(*) FROM {}.dead_letters",
                quote(control_schema)
            ),
            &[],
        )
        .await
        .map_err(ReplicaError::pg("counting dead letters"))?
        .get(0))
}
