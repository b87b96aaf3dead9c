-- Daemon secrets and settings that must survive restarts (e.g. the session signing key).
CREATE TABLE meta (
    key    TEXT PRIMARY KEY NOT NULL,
    value  BLOB NOT NULL
);
