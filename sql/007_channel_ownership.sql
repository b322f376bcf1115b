-- Several instances with one configuration: each channel is owned by one instance at a time.
-- Runs with search_path set to the control schema; names are unqualified.

-- Every running instance, with its last heartbeat (database time). An instance counts as live
-- while its heartbeat is younger than the lease; live instances share the channels.
CREATE TABLE instances (
    instance     text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- One row per channel: who owns it, until when, and the fencing epoch. A takeover locks the
-- row FOR UPDATE and increments the epoch; every transaction that moves the channel's
-- checkpoint first locks it FOR KEY SHARE and checks the epoch is its own. So a former owner
-- never commits after a takeover: either its batch committed before the takeover could lock
-- the row, or it reads the new epoch and rolls back. Renewing the lease is a plain UPDATE of
-- non-key columns, which does not conflict with those FOR KEY SHARE locks.
CREATE TABLE channel_leases (
    channel     text PRIMARY KEY,
    epoch       bigint NOT NULL DEFAULT 0,
    instance    text,
    host        text,
    pid         integer,
    acquired_at timestamptz,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity'
);

-- The epoch of the owner that wrote each checkpoint.
ALTER TABLE checkpoints ADD COLUMN epoch bigint;

-- Every takeover, for the operator (and the tests' audit).
CREATE TABLE ownership_log (
    seq        bigserial PRIMARY KEY,
    channel    text NOT NULL,
    epoch      bigint NOT NULL,
    instance   text NOT NULL,
    host       text NOT NULL,
    pid        integer NOT NULL,
    previous   text,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Each committed batch, written only with `[ha] audit = true`: which owner (epoch, instance)
-- committed which replay positions. Diagnostics for fail-over drills; grows with every batch.
CREATE TABLE batch_audit (
    seq          bigserial PRIMARY KEY,
    channel      text NOT NULL,
    epoch        bigint NOT NULL,
    instance     text NOT NULL,
    first_replay bytea,
    last_replay  bytea NOT NULL,
    events       integer NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Consecutive daemon starts on a host that did not get to ready (every owned channel
-- subscribed, or a standby): the daemon waits longer before each new attempt, across
-- restarts (systemd's own restart delay is fixed).
CREATE TABLE start_attempts (
    host        text PRIMARY KEY,
    failed      integer NOT NULL DEFAULT 0,
    last_start  timestamptz NOT NULL DEFAULT clock_timestamp()
);
