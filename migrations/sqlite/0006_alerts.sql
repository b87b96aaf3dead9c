-- Alerts the rules fired, and how each moved. Every change also appends an `alert` event to
-- the log in the same transaction. At most one open (not resolved) alert per rule and
-- device: the partial unique index is what makes firing idempotent.
CREATE TABLE alerts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    rule         TEXT NOT NULL,
    device       TEXT NOT NULL,
    severity     TEXT NOT NULL,             -- info, warning, critical
    state        TEXT NOT NULL,             -- firing, acknowledged, resolved
    field        TEXT,                      -- the payload field the rule watches
    threshold    REAL,
    value        REAL,                      -- the value that fired it
    message      TEXT NOT NULL,
    fired_at     INTEGER NOT NULL,          -- Unix ms
    acked_at     INTEGER,
    acked_by     TEXT,
    resolved_at  INTEGER,
    -- The log position the instance that fired (resolved) it had evaluated through: one that
    -- lags behind never fires again what another resolved later, nor resolves what it fired.
    fired_seq    INTEGER NOT NULL DEFAULT 0,
    resolved_seq INTEGER
);
CREATE UNIQUE INDEX alerts_open ON alerts(rule, device) WHERE state <> 'resolved';
CREATE INDEX alerts_device ON alerts(device, id);
CREATE INDEX alerts_rule ON alerts(rule, device, resolved_seq);
