-- The last moment each channel was caught up: a keepalive found every delivered position
-- committed. Replication lag after a restart counts from the later of this and the newest
-- applied commit, so a quiet night does not read as hours of lag.
ALTER TABLE checkpoints ADD COLUMN caught_up_at timestamptz;
