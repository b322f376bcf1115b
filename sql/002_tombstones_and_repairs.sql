-- Deletions and repair obligations.

-- A hard delete (delete_mode = "hard") removes the row and leaves its version here, so an
-- older event or snapshot row cannot bring the record back (invariant 3).
CREATE TABLE tombstones (
    object        text NOT NULL,
    id            text NOT NULL,
    version       bigint NOT NULL,
    commit_number bigint,
    deleted_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (object, id)
);

-- What the stream could not deliver and a REST/Bulk fetch must repair. Rows are inserted in
-- the same transaction as the batch whose checkpoint moves past the event (invariant 2), and
-- deleted in the same transaction as the repaired rows.
CREATE TABLE repair_queue (
    repair_id       bigserial PRIMARY KEY,
    object          text NOT NULL,
    -- 'record': fetch record_id; 'entity': re-read the object's changes since `since`.
    kind            text NOT NULL CHECK (kind IN ('record', 'entity')),
    record_id       text,
    since           timestamptz,
    reason          text NOT NULL,
    channel         text,
    replay_id       bytea,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'record') = (record_id IS NOT NULL))
);
CREATE UNIQUE INDEX repair_queue_record ON repair_queue (object, record_id) WHERE kind = 'record';
CREATE INDEX repair_queue_due ON repair_queue (next_attempt_at);

-- Events that could not be decoded or applied, kept with their raw bytes for inspection
-- (`sfmirror inspect-event`). Each is written together with an entity repair covering it.
CREATE TABLE dead_letters (
    dead_letter_id bigserial PRIMARY KEY,
    channel        text NOT NULL,
    replay_id      bytea NOT NULL,
    schema_id      text NOT NULL,
    payload        bytea NOT NULL,
    error          text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
