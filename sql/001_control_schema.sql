-- Control schema, first migration: where each channel stands.
-- Runs with search_path set to the control schema (default `sfmirror`); names are unqualified.

-- One row per Pub/Sub channel: the replay id of the last event whose effects are committed.
-- Written in the same transaction as the rows that event changed (invariant 1).
CREATE TABLE checkpoints (
    channel          text PRIMARY KEY,
    replay_id        bytea NOT NULL,
    -- commitTimestamp of the newest applied event, for lag and for repairs after an expired
    -- replay id; NULL when the position came from a keepalive without events.
    commit_timestamp timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
