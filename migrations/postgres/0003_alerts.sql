-- Alerts the rules fired, and how each moved. Every change also appends an `alert` event to
-- the log in the same transaction. At most one open (not resolved) alert per rule and
-- device: the partial unique index is what makes firing idempotent across instances.
CREATE TABLE alerts (
    id           BIGSERIAL PRIMARY KEY,
    rule         TEXT NOT NULL,
    device       TEXT NOT NULL,
    severity     TEXT NOT NULL,             -- info, warning, critical
    state        TEXT NOT NULL,             -- firing, acknowledged, resolved
    field        TEXT,                      -- the payload field the rule watches
    threshold    DOUBLE PRECISION,
    value        DOUBLE PRECISION,          -- the value that fired it
    message      TEXT NOT NULL,
    fired_at     BIGINT NOT NULL,           -- Unix ms
    acked_at     BIGINT,
    acked_by     TEXT,
    resolved_at  BIGINT,
    -- The log position the instance that fired (resolved) it had evaluated through: one that
    -- lags behind never fires again what another resolved later, nor resolves what it fired.
    fired_seq    BIGINT NOT NULL DEFAULT 0,
    resolved_seq BIGINT
);
CREATE UNIQUE INDEX alerts_open ON alerts(rule, device) WHERE state <> 'resolved';
CREATE INDEX alerts_device ON alerts(device, id);
CREATE INDEX alerts_rule ON alerts(rule, device, resolved_seq);
