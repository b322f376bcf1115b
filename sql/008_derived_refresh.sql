-- Derived columns (formula fields, person-name Name, fields Salesforce never sends in change
-- events) are re-read after changes and swept on a schedule.
-- Runs with search_path set to the control schema; names are unqualified.

-- Records whose derived columns must be read again, queued in the transaction of the batch
-- that applied their change (so a crash loses none). A change to a record already queued
-- gives it a new `seq`: a re-read removes only the rows whose `seq` it saw, so a change that
-- arrives while its record is being read leaves the record queued for the next round.
CREATE SEQUENCE derived_refresh_seq;
CREATE TABLE derived_refresh (
    object    text NOT NULL,
    record_id text COLLATE "C" NOT NULL,
    seq       bigint NOT NULL DEFAULT nextval('derived_refresh_seq'),
    queued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (object, record_id)
);

-- The scheduled sweep of each object's derived columns (formulas that read other records or
-- the clock change without any event on the record).
CREATE TABLE derived_sweeps (
    object       text PRIMARY KEY,
    started_at   timestamptz,
    completed_at timestamptz,
    rows         bigint,
    error        text
);
