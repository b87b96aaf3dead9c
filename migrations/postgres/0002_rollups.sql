-- Stored rollups of numeric payload fields, per device, tier and bucket of device time,
-- merged in the transaction that stores the readings they summarize (see the SQLite
-- migration of the same name). The field '' counts every reading of the bucket.
CREATE TABLE rollups (
    device    TEXT NOT NULL,
    tier      BIGINT NOT NULL,    -- bucket width, ms: 60000 or 3600000
    bucket    BIGINT NOT NULL,    -- bucket start, Unix ms of device time
    field     TEXT NOT NULL,      -- dotted field name; '' counts every reading
    n         BIGINT NOT NULL,
    total     DOUBLE PRECISION NOT NULL,
    lo        DOUBLE PRECISION NOT NULL,
    hi        DOUBLE PRECISION NOT NULL,
    first_v   DOUBLE PRECISION NOT NULL,
    first_ts  BIGINT NOT NULL,
    last_v    DOUBLE PRECISION NOT NULL,
    last_ts   BIGINT NOT NULL,
    seq_lo    BIGINT,
    seq_hi    BIGINT,
    PRIMARY KEY (device, tier, bucket, field)
)
-- Every batch updates the open buckets' rows in place: room on the page lets PostgreSQL
-- keep the new version there (a HOT update, no index entry), instead of bloating the table.
WITH (fillfactor = 70);

-- A device's readings by device time: time ranges and telling a redelivered reading from
-- a new one are seeks.
CREATE INDEX readings_time ON readings (device, ts);

-- Readings stored before this migration are rolled up when an instance opens the database.
INSERT INTO meta (key, value) VALUES
    ('rollups_backfill_to', convert_to(coalesce((SELECT max(seq) FROM readings), 0)::text, 'UTF8')),
    ('rollups_backfill_done', convert_to('0', 'UTF8'));
