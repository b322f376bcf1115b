-- Per-object snapshot bookkeeping, and one pending entity repair per object.

-- When each object was last snapshotted (backfill or first start), so a later snapshot can
-- start from there minus a margin instead of from the beginning.
CREATE TABLE object_sync_state (
    object                 text PRIMARY KEY,
    -- Start of the last snapshot that completed: every change before it is in the replica.
    snapshot_started_at    timestamptz,
    snapshot_completed_at  timestamptz,
    snapshot_rows          bigint,
    -- A snapshot in progress (for resuming): its start, Bulk job id and last locator.
    running_started_at     timestamptz,
    running_job_id         text,
    running_locator        text,
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- Entity repairs of one object merge: the earliest `since` covers them all.
CREATE UNIQUE INDEX repair_queue_entity ON repair_queue (object) WHERE kind = 'entity';

-- When a repair was last asked for. A worker that claimed a repair deletes it only if nobody
-- asked again after the claim, so a request that arrives while the repair runs is not lost.
ALTER TABLE repair_queue ADD COLUMN requested_at timestamptz NOT NULL DEFAULT now();
