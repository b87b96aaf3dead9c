-- PostgreSQL schema: the same tables as the SQLite backend's, shared by every instance.

-- Devices seen on any topic, with presence.
CREATE TABLE devices (
    id          TEXT PRIMARY KEY,
    first_seen  BIGINT NOT NULL,           -- Unix ms
    last_seen   BIGINT NOT NULL,           -- Unix ms of the last message of any kind
    online      BOOLEAN NOT NULL DEFAULT false,
    status_at   BIGINT                     -- Unix ms of the last presence change
);

-- Every reading. seq is the SSE event id, drawn from log_head under the append lock.
CREATE TABLE readings (
    seq          BIGINT PRIMARY KEY,
    device       TEXT NOT NULL,
    topic        TEXT NOT NULL,
    ts           BIGINT NOT NULL,          -- device time (Unix ms), else received_at
    received_at  BIGINT NOT NULL,          -- Unix ms
    payload      BYTEA NOT NULL,           -- as sent
    flags        BIGINT NOT NULL DEFAULT 0 -- 1: not a JSON object (raw), 2: unreadable ts
);
CREATE INDEX readings_device ON readings (device, seq);

-- Presence and command lifecycle changes; with readings, the one ordered log.
CREATE TABLE events (
    seq     BIGINT PRIMARY KEY,
    kind    TEXT NOT NULL,                 -- status, command
    device  TEXT NOT NULL,
    at      BIGINT NOT NULL,               -- Unix ms of the change
    data    TEXT NOT NULL                  -- the SSE event's data, JSON, as streamed live
);
CREATE INDEX events_device ON events (device, kind, seq);

-- Operator commands and their lifecycle. n keeps insertion order for listings.
CREATE TABLE commands (
    n            BIGINT GENERATED ALWAYS AS IDENTITY,
    id           TEXT PRIMARY KEY,          -- uuid
    device       TEXT NOT NULL,
    name         TEXT NOT NULL,
    params       TEXT NOT NULL,             -- JSON object
    status       TEXT NOT NULL,             -- queued, sent, acked, failed, timeout, expired
    idem_key     TEXT,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    sent_at      BIGINT,
    finished_at  BIGINT,
    result       TEXT,
    error        TEXT
);
CREATE INDEX commands_device ON commands (device, created_at);
CREATE UNIQUE INDEX commands_idem ON commands (device, idem_key) WHERE idem_key IS NOT NULL;
CREATE INDEX commands_open ON commands (status) WHERE status IN ('queued', 'sent');

-- Secrets and settings that must survive restarts (the session signing key).
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  BYTEA NOT NULL
);

-- The log's head: the last seq given out, and how far retention removed each part.
-- Appends take the transaction-level advisory lock first, then read and move `last`.
CREATE TABLE log_head (
    id                       BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    last                     BIGINT NOT NULL,
    readings_purged_through  BIGINT NOT NULL,
    events_purged_through    BIGINT NOT NULL
);
INSERT INTO log_head (last, readings_purged_through, events_purged_through) VALUES (0, 0, 0);
