-- One ordered event log: presence and command lifecycle changes, stored in the transaction
-- that changes the device or command row. Their seq comes from the same counter as
-- readings.seq (the writer assigns both), so the two tables together are the log: every
-- SSE event id is a seq in one of them, and no seq is in both. A reading stays one row.
CREATE TABLE events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT NOT NULL,             -- status, command
    device  TEXT NOT NULL,
    at      INTEGER NOT NULL,          -- Unix ms of the change
    data    TEXT NOT NULL              -- the SSE event's data, JSON, as streamed live
);
-- Per-device history of one kind (status-history), in log order.
CREATE INDEX events_device ON events(device, kind, seq);

-- Log positions that retention has removed everything up to, per table: a resume point
-- below one of them gets `event: gap`. Databases from before this migration: readings
-- below the oldest stored one are gone.
INSERT INTO meta (key, value)
SELECT 'readings_purged_through',
       CASE WHEN (SELECT min(seq) FROM readings) IS NOT NULL
            THEN (SELECT min(seq) FROM readings) - 1
            ELSE coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'readings'), 0) END;
-- No presence or command event before this migration was stored: a resume point from
-- before it has lost those kinds.
INSERT INTO meta (key, value)
SELECT 'events_purged_through',
       coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'readings'), 0);
