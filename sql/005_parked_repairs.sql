-- Repairs that cannot succeed by being tried again (a definite error: an object or field the
-- integration user cannot read, a value that does not fit its column) are parked: kept with
-- their error and never due (next_attempt_at = 'infinity'), until the operator requeues them
-- (`sfmirror requeue`) or the daemon starts with a different configuration.
ALTER TABLE repair_queue ADD COLUMN parked_at timestamptz;
-- A fingerprint of the configuration the repair was parked under.
ALTER TABLE repair_queue ADD COLUMN parked_config text;
