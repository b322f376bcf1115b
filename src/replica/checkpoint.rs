//! Replay positions per channel, in `<control_schema>.checkpoints`.
//!
//! The checkpoint is written by [`save`] inside the transaction that applies the batch it
//! covers, never on its own: so a crash leaves the replica at exactly some committed batch and
//! its position (invariant 1). A keepalive position is only saved when nothing is pending.
//!
//! A batch whose transaction started while the one before it was still in flight moves the
//! checkpoint with [`advance`] instead, once that batch has ended: from the position that
//! batch committed, and only from there. A batch therefore never commits after one that
//! rolled back, and the stored position never skips a batch. (A position not yet committed
//! does not count: the UPDATE compares with what its statement sees.)
//!
//! Every write checks the writer still owns the channel ([`ownership::check`], in the same
//! transaction): a former owner's write after a takeover fails with
//! [`ReplicaError::Fenced`] instead of moving the new owner's position.
//!
//! A checkpoint with an empty replay id is a marker: "resume at LATEST, and re-read every
//! object of the channel changed since `commit_timestamp`". It is what a first start and a
//! replay id that Salesforce refused (past retention) leave behind, so the channel never jumps
//! to LATEST without the repair that covers the jump (invariant 2).

use super::ownership::{self, Fence};
use super::{ReplicaError, quote};
use crate::model::ReplayId;

/// What a channel's checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub replay_id: ReplayId,
    /// Epoch ms of the newest applied event's commit, if known.
    pub commit_timestamp_ms: Option<i64>,
}

/// A loaded checkpoint: the position, and when the channel was last caught up.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub checkpoint: Checkpoint,
    /// Epoch ms of the last keepalive that found nothing pending, if any.
    pub caught_up_ms: Option<i64>,
}

/// `channel`'s checkpoint and its caught-up moment.
pub async fn load_with_caught_up(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    channel: &str,
) -> Result<Option<Loaded>, ReplicaError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT replay_id, (extract(epoch FROM commit_timestamp) * 1000)::bigint,
                        (extract(epoch FROM caught_up_at) * 1000)::bigint
                 FROM {}.checkpoints WHERE channel = $1",
                quote(control_schema)
            ),
            &[&channel],
        )
        .await
        .map_err(ReplicaError::pg(format!("load checkpoint of {channel}")))?;
    Ok(row.map(|r| Loaded {
        checkpoint: Checkpoint {
            replay_id: ReplayId(r.get(0)),
            commit_timestamp_ms: r.get(1),
        },
        caught_up_ms: r.get(2),
    }))
}

/// Records a keepalive: everything up to `position` was delivered and is committed, so the
/// channel is caught up now. An empty `position` (a keepalive that named none) moves only the
/// caught-up moment. Nothing is written for a channel without a checkpoint row.
pub async fn caught_up(
    client: &mut deadpool_postgres::Client,
    control_schema: &str,
    fence: &Fence,
    position: &ReplayId,
) -> Result<(), ReplicaError> {
    let channel = &fence.channel;
    let tx = super::begin(client, "keepalive").await?;
    ownership::check(&tx, control_schema, fence).await?;
    tx.execute(
        &format!(
            "UPDATE {}.checkpoints
                 SET replay_id = CASE WHEN $2 = ''::bytea THEN replay_id ELSE $2 END,
                     caught_up_at = now(),
                     updated_at = CASE WHEN $2 = ''::bytea OR $2 = replay_id
                                       THEN updated_at ELSE now() END
                 WHERE channel = $1",
            quote(control_schema)
        ),
        &[&channel, &position.0],
    )
    .await
    .map_err(ReplicaError::pg(format!("record keepalive of {channel}")))?;
    tx.commit()
        .await
        .map_err(ReplicaError::pg(format!("commit keepalive of {channel}")))?;
    Ok(())
}

/// `channel`'s checkpoint, if it has one.
pub async fn load(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    channel: &str,
) -> Result<Option<Checkpoint>, ReplicaError> {
    Ok(load_with_caught_up(client, control_schema, channel)
        .await?
        .map(|l| l.checkpoint))
}

/// Turns `channel`'s checkpoint into a marker at its own time (its newest commit, else when it
/// was written): the stored replay id was refused, so the channel restarts at LATEST.
pub async fn to_marker(
    client: &mut deadpool_postgres::Client,
    control_schema: &str,
    fence: &Fence,
) -> Result<(), ReplicaError> {
    let channel = &fence.channel;
    let tx = super::begin(client, "checkpoint reset").await?;
    ownership::check(&tx, control_schema, fence).await?;
    tx.execute(
        &format!(
            "UPDATE {}.checkpoints SET replay_id = '',
                     commit_timestamp = coalesce(commit_timestamp, updated_at), updated_at = now()
                 WHERE channel = $1",
            quote(control_schema)
        ),
        &[&channel],
    )
    .await
    .map_err(ReplicaError::pg(format!("reset checkpoint of {channel}")))?;
    tx.commit().await.map_err(ReplicaError::pg(format!(
        "commit checkpoint reset of {channel}"
    )))?;
    Ok(())
}

/// Records `checkpoint` for `fence`'s channel. Call it in the batch's transaction. A
/// keepalive position (no commit time) keeps the commit time of the last applied event.
pub async fn save(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    fence: &Fence,
    checkpoint: &Checkpoint,
) -> Result<(), ReplicaError> {
    ownership::check(client, control_schema, fence).await?;
    let channel = &fence.channel;
    let ts = checkpoint.commit_timestamp_ms;
    client
        .execute(
            &format!(
                "INSERT INTO {}.checkpoints AS c
                   (channel, replay_id, commit_timestamp, updated_at, epoch)
                 VALUES ($1, $2, to_timestamp($3::bigint / 1000.0), now(), $4)
                 ON CONFLICT (channel) DO UPDATE SET
                   replay_id = EXCLUDED.replay_id,
                   commit_timestamp = coalesce(EXCLUDED.commit_timestamp, c.commit_timestamp),
                   updated_at = now(), epoch = EXCLUDED.epoch",
                quote(control_schema)
            ),
            &[&channel, &checkpoint.replay_id.0, &ts, &fence.epoch],
        )
        .await
        .map_err(ReplicaError::pg(format!("save checkpoint of {channel}")))?;
    Ok(())
}

/// Moves `channel`'s checkpoint from `from` to `checkpoint`, inside the batch's transaction.
/// Returns false, changing nothing, when the committed position is not `from`: the batch
/// before did not commit (or has not yet: call this after it ended), or something else moved
/// it.
pub async fn advance(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    fence: &Fence,
    from: &ReplayId,
    checkpoint: &Checkpoint,
) -> Result<bool, ReplicaError> {
    ownership::check(client, control_schema, fence).await?;
    let channel = &fence.channel;
    let moved = client
        .execute(
            &format!(
                "UPDATE {}.checkpoints AS c
                 SET replay_id = $3,
                     commit_timestamp = coalesce(to_timestamp($4::bigint / 1000.0),
                                                 c.commit_timestamp),
                     updated_at = now(), epoch = $5
                 WHERE channel = $1 AND replay_id = $2",
                quote(control_schema)
            ),
            &[
                &channel,
                &from.0,
                &checkpoint.replay_id.0,
                &checkpoint.commit_timestamp_ms,
                &fence.epoch,
            ],
        )
        .await
        .map_err(ReplicaError::pg(format!("advance checkpoint of {channel}")))?;
    Ok(moved == 1)
}

/// A stored checkpoint as `status` shows it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub channel: String,
    /// Empty for a marker (see the module docs).
    pub replay_id: ReplayId,
    /// Epoch ms of the newest applied event's commit, if known.
    pub commit_timestamp_ms: Option<i64>,
    /// Epoch ms of the last time the checkpoint moved.
    pub updated_ms: Option<i64>,
    /// Epoch ms of the last keepalive that found the channel caught up.
    pub caught_up_ms: Option<i64>,
}

/// Every channel's checkpoint, by channel name. `caught_up` says whether the control schema
/// has the caught-up column (migration 6); `status` also reads older schemas.
pub async fn list(
    client: &impl deadpool_postgres::GenericClient,
    control_schema: &str,
    caught_up: bool,
) -> Result<Vec<Stored>, ReplicaError> {
    let caught_up_column = if caught_up {
        "(extract(epoch FROM caught_up_at) * 1000)::bigint"
    } else {
        "NULL::bigint"
    };
    let rows = client
        .query(
            &format!(
                "SELECT channel, replay_id, (extract(epoch FROM commit_timestamp) * 1000)::bigint,
                        (extract(epoch FROM updated_at) * 1000)::bigint, {caught_up_column}
                 FROM {}.checkpoints ORDER BY channel",
                quote(control_schema)
            ),
            &[],
        )
        .await
        .map_err(ReplicaError::pg("reading checkpoints"))?;
    Ok(rows
        .iter()
        .map(|r| Stored {
            channel: r.get(0),
            replay_id: ReplayId(r.get(1)),
            commit_timestamp_ms: r.get(2),
            updated_ms: r.get(3),
            caught_up_ms: r.get(4),
        })
        .collect())
}
