-- Stored rollups of numeric payload fields, per device, tier and bucket of device time,
-- merged in the transaction that stores the readings they summarize. The field '' counts
-- every reading of the bucket and keeps the bucket's seq range (seq_lo..seq_hi): a
-- device's readings of a time range are found through readings_device with it, so no index
-- on time costs bytes in every reading.
CREATE TABLE rollups (
    device    TEXT NOT NULL,
    tier      INTEGER NOT NULL,   -- bucket width, ms: 60000 or 3600000
    bucket    INTEGER NOT NULL,   -- bucket start, Unix ms of device time
    field     TEXT NOT NULL,      -- dotted field name; '' counts every reading
    n         INTEGER NOT NULL,   -- values
    total     REAL NOT NULL,      -- their sum
    lo        REAL NOT NULL,
    hi        REAL NOT NULL,
    first_v   REAL NOT NULL,      -- the value of the earliest device time
    first_ts  INTEGER NOT NULL,
    last_v    REAL NOT NULL,      -- the value of the latest device time
    last_ts   INTEGER NOT NULL,
    seq_lo    INTEGER,            -- '' rows only
    seq_hi    INTEGER,
    PRIMARY KEY (device, tier, bucket, field)
) WITHOUT ROWID;

-- Readings stored before this migration are rolled up when the daemon opens the file.
INSERT INTO meta (key, value) VALUES ('rollups_backfill_to', coalesce((SELECT max(seq) FROM readings), 0));
INSERT INTO meta (key, value) VALUES ('rollups_backfill_done', 0);
