-- Each reading named its device and topic in full (about 34 bytes of a 100-byte reading's
-- 175); now it names a source: one row per (device, topic), which is one per device while
-- the telemetry template stays the same. A reading is then a seq, a source id of a byte or
-- two, its device time, the receive time as a lag behind it (a byte or two, none when the
-- device sent no time), the payload and flags; the device index holds small integers.
CREATE TABLE sources (
    id      INTEGER PRIMARY KEY,
    device  TEXT NOT NULL,
    topic   TEXT NOT NULL,
    UNIQUE (device, topic)
);
INSERT INTO sources (device, topic) SELECT DISTINCT device, topic FROM readings ORDER BY device, topic;

CREATE TABLE readings_new (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    src          INTEGER NOT NULL,         -- sources.id: the device and topic
    ts           INTEGER NOT NULL,         -- device time (Unix ms), else received_at
    lag          INTEGER NOT NULL,         -- received_at - ts, ms
    payload      BLOB NOT NULL,            -- as sent: TEXT for JSON objects, BLOB when raw
    flags        INTEGER NOT NULL DEFAULT 0 -- 1: not a JSON object (raw), 2: unreadable ts
);
INSERT INTO readings_new (seq, src, ts, lag, payload, flags)
SELECT r.seq, s.id, r.ts, r.received_at - r.ts, r.payload, r.flags
FROM readings r JOIN sources s ON s.device = r.device AND s.topic = r.topic
ORDER BY r.seq;
-- Ids never go back: the new table's counter starts where the old one's was, even when
-- retention had deleted every row.
DELETE FROM sqlite_sequence WHERE name = 'readings_new';
INSERT INTO sqlite_sequence (name, seq)
SELECT 'readings_new', max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'readings'), 0),
                           coalesce((SELECT max(seq) FROM readings), 0));
DROP TABLE readings;
ALTER TABLE readings_new RENAME TO readings;
-- Ordered by source, then seq: history paging and the latest reading per device are seeks.
CREATE INDEX readings_src ON readings(src);
