//! The repair queue: durable obligations to re-read records or whole objects over REST.
//!
//! Requests are inserted in the transaction of the batch that created them, so the checkpoint
//! can only move past an undeliverable change together with the promise to repair it
//! (invariant 2). A record already queued is not queued twice.

use super::apply::RepairRequest;
use super::{ReplicaError, quote};
use crate::model::ReplayId;

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
                             ON CONFLICT (object, record_id) WHERE kind = 'record' DO NOTHING"
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
                                 reason = EXCLUDED.reason,
                                 next_attempt_at = LEAST(repair_queue.next_attempt_at, now())"
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

/// Pending repairs per object (for status and the `sfmirror_repairs_pending` gauge).
pub async fn pending(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
) -> Result<Vec<(String, i64)>, ReplicaError> {
    let rows = client
        .query(
            &format!(
                "SELECT object, count(*) FROM {}.repair_queue GROUP BY object ORDER BY object",
                quote(control_schema)
            ),
            &[],
        )
        .await
        .map_err(ReplicaError::pg("count pending repairs"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}
