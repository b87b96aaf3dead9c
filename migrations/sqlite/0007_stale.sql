-- A device that is online but has missed several of its usual intervals is stale; set and
-- cleared with an `event: status` each (presence "stale", then "online" again).
ALTER TABLE devices ADD COLUMN stale INTEGER NOT NULL DEFAULT 0;
