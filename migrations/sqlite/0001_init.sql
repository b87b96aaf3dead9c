-- Devices seen on any topic, with presence.
CREATE TABLE devices (
    id          TEXT PRIMARY KEY NOT NULL,
    first_seen  INTEGER NOT NULL,          -- Unix ms
    last_seen   INTEGER NOT NULL,          -- Unix ms of the last message of any kind
    online      INTEGER NOT NULL DEFAULT 0,
    status_at   INTEGER                    -- Unix ms of the last presence change
);

-- Every reading, in arrival order. seq is the SSE event id; AUTOINCREMENT keeps it
-- monotonic even after retention deleted every row.
CREATE TABLE readings (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    device       TEXT NOT NULL,
    topic        TEXT NOT NULL,
    ts           INTEGER NOT NULL,         -- device time (Unix ms), else received_at
    received_at  INTEGER NOT NULL,         -- Unix ms
    payload      BLOB NOT NULL,            -- as sent: TEXT for JSON objects, BLOB when raw
    flags        INTEGER NOT NULL DEFAULT 0 -- 1: not a JSON object (raw), 2: unreadable ts
);
-- An index on device alone is ordered by (device, seq): history paging per device.
CREATE INDEX readings_device ON readings(device);

-- Operator commands and their lifecycle.
CREATE TABLE commands (
    id           TEXT PRIMARY KEY NOT NULL, -- uuid
    device       TEXT NOT NULL,
    name         TEXT NOT NULL,
    params       TEXT NOT NULL,             -- JSON object
    status       TEXT NOT NULL,             -- queued, sent, acked, failed, timeout, expired
    idem_key     TEXT,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    sent_at      INTEGER,
    finished_at  INTEGER,
    result       TEXT,
    error        TEXT
);
CREATE INDEX commands_device ON commands(device, created_at);
CREATE UNIQUE INDEX commands_idem ON commands(device, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX commands_open ON commands(status) WHERE status IN ('queued', 'sent');
