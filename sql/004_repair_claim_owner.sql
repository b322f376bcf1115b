-- Who holds a repair's claim: the Postgres backend pid of the connection that claimed it.
-- A worker's connections close when its process dies, so a claim whose backend is gone is
-- free at once, instead of when its lease runs out (ten minutes after a crash, otherwise).
ALTER TABLE repair_queue ADD COLUMN claimed_by integer;

-- Claims held: few at a time, probed on every claim to find those whose holder is gone.
CREATE INDEX repair_queue_claimed ON repair_queue (claimed_by) WHERE claimed_by IS NOT NULL;
