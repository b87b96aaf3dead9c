//! The PostgreSQL backend: one database shared by every instance, its schema in
//! `migrations/postgres/`. SQL for PostgreSQL lives only here.
//!
//! Event ids in commit order: every append to the log (a batch of readings, a command
//! change, a presence timeout) first takes one transaction-level advisory lock, then reads
//! and moves `log_head.last`. PostgreSQL makes a transaction visible before it releases its
//! locks, so the next appender can only draw its ids once the previous ones are visible: a
//! reader that sees id N has already been able to see every id below it, and tailing
//! `seq > N` never passes an id that commits later ([`tail`]).

mod tail;
mod writer;

pub use writer::Writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection as _, Postgres, QueryBuilder, Transaction};
use tokio::sync::Notify;

use crate::config::{StorageConfig, redact_url};
use crate::feed::{Kind, Kinds};
use crate::store::alert::{ALERT_COLUMNS, AlertChange, AlertOutcome, AlertRow, AlertState};
use crate::store::health::Health;
use crate::store::log::EventRow;
use crate::store::rollup::RollupRow;
use crate::store::{
    CommandRow, Dequeue, DeviceRow, Gauges, Inserted, LogEntry, NewCommand, Page,
    RETENTION_CHUNK_ROWS, RETENTION_PER_CALL, ROLLUP_SWEEP_DEVICES, RollupSweep, StoreError,
    StoredReading,
};

crate::store::rows::decoders!(PgRow);

/// The advisory lock every append to the log takes first: "telebrdg" in ASCII,
/// 8387229063746577511 (README, "Running several instances").
pub(crate) const APPEND_LOCK: i64 = 0x7465_6c65_6272_6467;
/// The channel each commit notifies with its last seq; every instance's tail listens.
pub(crate) const CHANNEL: &str = "telebridge_log";
/// How long getting a connection may take before the work fails (the server is away).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Read access to the shared database, and the writes that are not batches.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Wakes this instance's tail after a local commit, without waiting for the NOTIFY.
    wake: Arc<Notify>,
    /// Whether the writer commits, and what waits for it.
    health: Arc<Health>,
}

/// The reading columns, as the decoders name them.
const READING_COLUMNS: &str = "seq, device, topic, ts, received_at, payload, flags";

/// Binds a page's device, after, from, to and limit as `$1` to `$5`.
fn bind_page<'q>(
    page: &'q Page,
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    q.bind(page.device.as_str())
        .bind(page.after)
        .bind(page.from.unwrap_or(i64::MIN))
        .bind(page.to.unwrap_or(i64::MAX))
        .bind(page.limit)
}

/// The kinds of the events table that `kinds` asks for.
fn event_kinds(kinds: Kinds) -> Vec<&'static str> {
    Kind::EVENTS
        .into_iter()
        .filter(|k| kinds.has(*k))
        .map(Kind::as_str)
        .collect()
}

/// An open append: the lock is held and `next` is the first seq it may use.
struct Append<'c> {
    tx: Transaction<'c, Postgres>,
    next: i64,
}

/// Takes the append lock (held until the transaction ends) and reads the head: the first
/// seq this transaction may use.
async fn lock_append(conn: &mut sqlx::PgConnection) -> Result<i64, StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *conn)
        .await?;
    // FOR UPDATE besides: a writer that moves the head without the advisory lock (a
    // mistaken tool) is then waited for, rather than handed the same ids.
    let last: i64 = sqlx::query_scalar("SELECT last FROM log_head FOR UPDATE")
        .fetch_one(&mut *conn)
        .await?;
    Ok(last + 1)
}

/// Readings rolled up per transaction by the backfill.
const BACKFILL_CHUNK: i64 = 20_000;

/// Rolls up the readings stored before rollups existed (migration 0002 says up to which
/// seq), chunk by chunk under the append lock, so that instances starting together do it
/// once between them and an interrupted start resumes.
async fn backfill_rollups(pool: &PgPool) -> Result<(), StoreError> {
    let mut announced = false;
    loop {
        let mut tx = pool.begin().await?;
        lock_append(&mut tx).await?;
        let (to, done): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT convert_from(value, 'UTF8')::bigint FROM meta WHERE key = 'rollups_backfill_to'), \
             (SELECT convert_from(value, 'UTF8')::bigint FROM meta WHERE key = 'rollups_backfill_done')",
        )
        .fetch_one(&mut *tx)
        .await?;
        if done >= to {
            tx.rollback().await?;
            if announced {
                tracing::info!("rollups of the earlier readings done");
            }
            return Ok(());
        }
        if !announced {
            announced = true;
            tracing::info!(
                through_seq = to,
                "rolling up the readings stored before rollups existed"
            );
        }
        let rows = sqlx::query(
            "SELECT seq, device, topic, ts, received_at, payload, flags FROM readings \
             WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
        )
        .bind(done)
        .bind(to)
        .bind(BACKFILL_CHUNK)
        .fetch_all(&mut *tx)
        .await?;
        let readings: Vec<StoredReading> = rows
            .iter()
            .map(reading_from_row)
            .collect::<Result<_, _>>()?;
        let done = readings.last().map_or(to, |r| r.seq);
        writer::upsert_rollups(&mut tx, &crate::store::rollup::of_stored(&readings)).await?;
        sqlx::query("UPDATE meta SET value = convert_to($1::text, 'UTF8') WHERE key = 'rollups_backfill_done'")
            .bind(done.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
}

/// Begins a transaction that appends to the log.
async fn begin_append(pool: &PgPool) -> Result<Append<'static>, StoreError> {
    let mut tx = pool.begin().await?;
    let next = lock_append(&mut tx).await?;
    Ok(Append { tx, next })
}

/// Inserts `rows` into the events table, inside the caller's transaction.
async fn insert_events(conn: &mut sqlx::PgConnection, rows: &[EventRow]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind.as_str()).collect();
    let devices: Vec<&str> = rows.iter().map(|r| &*r.device).collect();
    let ats: Vec<i64> = rows.iter().map(|r| r.at).collect();
    let data: Vec<&str> = rows.iter().map(|r| r.data.as_str()).collect();
    sqlx::query(
        "INSERT INTO events (seq, kind, device, at, data) \
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[])",
    )
    .bind(seqs)
    .bind(kinds)
    .bind(devices)
    .bind(ats)
    .bind(data)
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the head past `last` and notifies every tail, inside the caller's transaction
/// (PostgreSQL delivers the notification at COMMIT).
async fn move_head(conn: &mut sqlx::PgConnection, last: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE log_head SET last = $1")
        .bind(last)
        .execute(&mut *conn)
        .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(last.to_string())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

impl Append<'_> {
    /// Appends `events` (numbered from `self.next`), moves the head and commits.
    async fn commit(mut self, events: &[EventRow]) -> Result<(), StoreError> {
        if let Some(last) = events.last() {
            insert_events(&mut self.tx, events).await?;
            move_head(&mut self.tx, last.seq).await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

/// Why connecting failed, with the URL's password left out.
fn connect_error(url: &str) -> impl Fn(sqlx::Error) -> StoreError + '_ {
    move |source| StoreError::Connect {
        url: redact_url(url),
        source,
    }
}

impl PgStore {
    /// Connects, migrates (one instance at a time: sqlx holds an advisory lock meanwhile)
    /// and returns the read side and this instance's writer.
    pub async fn open(
        cfg: &StorageConfig,
        url: &str,
        health: Arc<Health>,
    ) -> Result<(PgStore, Writer), StoreError> {
        let opts: PgConnectOptions = url.parse().map_err(connect_error(url))?;
        // A session that hangs inside a transaction (a frozen instance, a dead network)
        // would hold the append lock and stall every instance: the server ends it.
        let opts = opts.application_name("telebridge").options([
            ("idle_in_transaction_session_timeout", "15s"),
            // The append protocol relies on each statement seeing what committed before
            // it (the head read after the lock): never a snapshot from before the wait.
            ("default_transaction_isolation", "read committed"),
        ]);
        // One connection first: a pool would only say that it timed out, not why.
        sqlx::PgConnection::connect_with(&opts)
            .await
            .map_err(connect_error(url))?
            .close()
            .await
            .map_err(connect_error(url))?;
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts.clone())
            .await
            .map_err(connect_error(url))?;
        match sqlx::migrate!("./migrations/postgres").run(&pool).await {
            Ok(()) => {}
            Err(sqlx::migrate::MigrateError::VersionMissing(version)) => {
                return Err(StoreError::Newer {
                    path: redact_url(url),
                    version,
                });
            }
            Err(e) => return Err(e.into()),
        }
        backfill_rollups(&pool).await?;
        let wake = Arc::new(Notify::new());
        let store = PgStore {
            pool: pool.clone(),
            wake: wake.clone(),
            health: health.clone(),
        };
        let head = store.head().await?;
        let writer = Writer::new(opts, store.clone(), health, head);
        Ok((store, writer))
    }

    /// The last seq committed by any instance.
    pub async fn head(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT last FROM log_head")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Every device.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let rows =
            sqlx::query("SELECT id, first_seen, last_seen, online, stale FROM devices ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(device_from_row).collect()
    }

    /// The log after `after` in seq order (see [`crate::store::Store::replay`]).
    pub async fn replay(
        &self,
        after: i64,
        devices: Option<&[String]>,
        kinds: Kinds,
        limit: i64,
    ) -> Result<Vec<LogEntry>, StoreError> {
        let others = event_kinds(kinds);
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new("SELECT * FROM (");
        let mut arms = 0;
        if kinds.has(Kind::Reading) {
            q.push(
                "(SELECT seq, 'reading'::text AS kind, device, topic, ts, received_at, payload, flags \
                 FROM readings WHERE seq > ",
            )
            .push_bind(after);
            if let Some(d) = devices {
                q.push(" AND device = ANY(").push_bind(d.to_vec()).push(")");
            }
            q.push(" ORDER BY seq LIMIT ").push_bind(limit).push(")");
            arms += 1;
        }
        if !others.is_empty() {
            if arms > 0 {
                q.push(" UNION ALL ");
            }
            q.push(
                "(SELECT seq, kind, device, ''::text AS topic, at AS ts, at AS received_at, \
                 convert_to(data, 'UTF8') AS payload, 0::bigint AS flags FROM events WHERE seq > ",
            )
            .push_bind(after);
            if let Some(d) = devices {
                q.push(" AND device = ANY(").push_bind(d.to_vec()).push(")");
            }
            q.push(" AND kind = ANY(")
                .push_bind(others)
                .push(") ORDER BY seq LIMIT ")
                .push_bind(limit)
                .push(")");
            arms += 1;
        }
        if arms == 0 {
            return Ok(Vec::new());
        }
        // Each arm is bounded and ordered on its own; the outer query merges them.
        q.push(") AS log ORDER BY seq LIMIT ").push_bind(limit);
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Presence changes of one device (see [`crate::store::Store::status_history`]).
    pub async fn status_history(&self, page: &Page) -> Result<Vec<EventRow>, StoreError> {
        let rows = bind_page(
            page,
            sqlx::query(
                "SELECT seq, kind, device, at AS ts, convert_to(data, 'UTF8') AS payload \
                 FROM events WHERE device = $1 AND kind = 'status' AND seq > $2 AND at >= $3 AND at <= $4 \
                 ORDER BY seq LIMIT $5",
            ),
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// How far retention has removed the log: (readings, other events).
    pub async fn purged_through(&self) -> Result<(i64, i64), StoreError> {
        Ok(
            sqlx::query_as("SELECT readings_purged_through, events_purged_through FROM log_head")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// The latest reading of each device up to seq `through`, oldest first: one backward
    /// index seek per known device (readings_device is on (device, seq)), never a scan of
    /// every reading (`seq IN (SELECT max ...)` let the planner hash-join every reading).
    pub async fn latest(
        &self,
        devices: Option<&[String]>,
        through: Option<i64>,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            "SELECT {READING_COLUMNS} FROM devices d CROSS JOIN LATERAL (SELECT * FROM readings r \
             WHERE r.device = d.id AND r.seq <= "
        ));
        q.push_bind(through.unwrap_or(i64::MAX))
            .push(" ORDER BY r.seq DESC LIMIT 1) last");
        if let Some(d) = devices {
            q.push(" WHERE d.id = ANY(").push_bind(d.to_vec()).push(")");
        }
        q.push(" ORDER BY last.seq");
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter().map(reading_from_row).collect()
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, first_seen, last_seen, online, stale FROM devices WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// History of one device (see [`crate::store::Store::history`]). A time range is
    /// first narrowed to a seq range by the 1-minute rollups, as on SQLite: the plan walks
    /// readings_device in seq order, and without the bounds a `from=` deep into a device
    /// with months of readings filtered every row before it (0.7 s at 700,000 a device).
    pub async fn history(&self, page: &Page) -> Result<Vec<StoredReading>, StoreError> {
        let (lo, hi) = if page.from.is_some() || page.to.is_some() {
            match self.seq_bounds(&page.device, page.from, page.to).await? {
                Some(b) => b,
                None => return Ok(Vec::new()),
            }
        } else {
            (i64::MIN, i64::MAX)
        };
        let order = if page.newest_first { " DESC" } else { "" };
        let rows = bind_page(
            page,
            sqlx::query(AssertSqlSafe(format!(
                "SELECT {READING_COLUMNS} FROM readings \
                 WHERE device = $1 AND seq > $2 AND ts >= $3 AND ts <= $4 AND seq < $6 \
                 AND seq >= $7 AND seq <= $8 ORDER BY seq{order} LIMIT $5"
            ))),
        )
        .bind(page.before.unwrap_or(i64::MAX))
        .bind(lo)
        .bind(hi)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(reading_from_row).collect()
    }

    /// The smallest and largest seq of a device's readings with device time within
    /// [from, to], from the all-readings rows of the covering buckets; `None` when no
    /// reading is in the range.
    async fn seq_bounds(
        &self,
        device: &str,
        from: Option<i64>,
        to: Option<i64>,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let parts = crate::store::rollup::covering(from, to);
        let arms: Vec<String> = (0..parts.len())
            .map(|i| {
                let n = 1 + 3 * i;
                format!(
                    "SELECT seq_lo, seq_hi FROM rollups WHERE device = $1 AND tier = ${} \
                     AND bucket >= ${} AND bucket <= ${} AND field = ''",
                    n + 1,
                    n + 2,
                    n + 3
                )
            })
            .collect();
        let sql = format!(
            "SELECT min(seq_lo), max(seq_hi) FROM ({}) b",
            arms.join(" UNION ALL ")
        );
        let mut q =
            sqlx::query_as::<_, (Option<i64>, Option<i64>)>(AssertSqlSafe(sql)).bind(device);
        for (tier, lo, hi) in parts {
            q = q.bind(tier).bind(lo).bind(hi);
        }
        let (lo, hi) = q.fetch_one(&self.pool).await?;
        Ok(lo.zip(hi))
    }

    /// Stored rollup rows of one device and tier with bucket in [from, to), of the given
    /// fields (every field but the all-readings one when `None`), merged into buckets of
    /// `step` (a multiple of the tier) from `from`, by bucket.
    pub async fn rollups(
        &self,
        device: &str,
        tier: i64,
        step: i64,
        from: i64,
        to: i64,
        fields: Option<&[String]>,
    ) -> Result<Vec<RollupRow>, StoreError> {
        const FILTER: &str = "device = $1 AND tier = $2 AND bucket >= $3 AND bucket < $4 \
             AND (CASE WHEN $6::text[] IS NULL THEN field <> '' ELSE field = ANY($6) END)";
        // As on SQLite: a coarser step is merged here; a step's earliest reading is in its
        // first bucket and its latest in its last.
        let sql = if step > tier {
            format!(
                "WITH g AS (SELECT $3 + (bucket - $3) / $5 * $5 AS start, field, \
                 sum(n)::bigint AS n, sum(total) AS total, min(lo) AS lo, max(hi) AS hi, \
                 min(bucket) AS b0, max(bucket) AS b1 FROM rollups WHERE {FILTER} \
                 GROUP BY 1, 2) \
                 SELECT $1::text AS device, $2::bigint AS tier, g.start AS bucket, \
                 g.field AS field, g.n AS n, g.total AS total, g.lo AS lo, g.hi AS hi, \
                 f.first_v AS first_v, f.first_ts AS first_ts, l.last_v AS last_v, \
                 l.last_ts AS last_ts, NULL::bigint AS seq_lo, NULL::bigint AS seq_hi FROM g \
                 JOIN rollups f ON f.device = $1 AND f.tier = $2 AND f.bucket = g.b0 AND f.field = g.field \
                 JOIN rollups l ON l.device = $1 AND l.tier = $2 AND l.bucket = g.b1 AND l.field = g.field \
                 ORDER BY g.start, g.field"
            )
        } else {
            // The step is bound either way ($6 follows it), and PostgreSQL refuses a bound
            // parameter the statement does not use.
            format!(
                "SELECT device, tier, bucket, field, n, total, lo, hi, first_v, first_ts, last_v, \
                 last_ts, seq_lo, seq_hi FROM rollups WHERE {FILTER} AND $5::bigint > 0 \
                 ORDER BY bucket, field"
            )
        };
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(device)
            .bind(tier)
            .bind(from)
            .bind(to)
            .bind(step)
            .bind(fields)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(rollup_from_row).collect()
    }

    /// Tells this instance's tail that something was committed.
    fn committed(&self) {
        self.wake.notify_one();
    }

    /// Stores a new command and its first event, or finds the one with the same key.
    pub async fn insert_command(&self, c: NewCommand) -> Result<Inserted, StoreError> {
        let mut a = begin_append(&self.pool).await?;
        let inserted: Option<String> = sqlx::query_scalar(
            "INSERT INTO commands (id, device, name, params, status, idem_key, created_at, expires_at, sent_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (device, idem_key) WHERE idem_key IS NOT NULL DO NOTHING RETURNING id",
        )
        .bind(&c.id)
        .bind(&c.device)
        .bind(&c.name)
        .bind(&c.params)
        .bind(c.status)
        .bind(c.key.as_deref())
        .bind(c.created_at)
        .bind(c.expires_at)
        .bind(c.sent_at)
        .fetch_optional(&mut *a.tx)
        .await?;
        if inserted.is_none() {
            let (id, status): (String, String) = sqlx::query_as(
                "SELECT id, status FROM commands WHERE device = $1 AND idem_key = $2",
            )
            .bind(&c.device)
            .bind(c.key.as_deref())
            .fetch_one(&mut *a.tx)
            .await?;
            a.tx.rollback().await?;
            return Ok(Inserted::Existing { id, status });
        }
        let events = [EventRow::command(
            a.next,
            &c.id,
            &c.device,
            c.status,
            c.created_at,
            None,
        )];
        a.commit(&events).await?;
        self.committed();
        Ok(Inserted::New)
    }

    /// Fires, acknowledges or resolves an alert, with its `alert` event.
    pub async fn change_alert(&self, change: AlertChange) -> Result<AlertOutcome, StoreError> {
        let mut a = begin_append(&self.pool).await?;
        let (moved, at) = match &change {
            AlertChange::Fire(n) => {
                let sql = format!(
                    "INSERT INTO alerts (rule, device, severity, state, field, threshold, value, message, fired_at, fired_seq) \
                     SELECT $1, $2, $3, 'firing', $4, $5, $6, $7, $8, $9 WHERE NOT EXISTS \
                     (SELECT 1 FROM alerts WHERE rule = $1 AND device = $2 AND resolved_seq > $9) \
                     ON CONFLICT (rule, device) WHERE state <> 'resolved' DO NOTHING RETURNING {ALERT_COLUMNS}"
                );
                let row = sqlx::query(AssertSqlSafe(sql))
                    .bind(&n.rule)
                    .bind(&n.device)
                    .bind(n.severity)
                    .bind(n.field.as_deref())
                    .bind(n.threshold)
                    .bind(n.value)
                    .bind(&n.message)
                    .bind(n.at)
                    .bind(n.seq)
                    .fetch_optional(&mut *a.tx)
                    .await?;
                (row, n.at)
            }
            AlertChange::Resolve {
                rule,
                device,
                at,
                seq,
            } => {
                let sql = format!(
                    "UPDATE alerts SET state = 'resolved', resolved_at = $1, resolved_seq = $4 \
                     WHERE rule = $2 AND device = $3 AND state <> 'resolved' AND fired_seq <= $4 \
                     RETURNING {ALERT_COLUMNS}"
                );
                let row = sqlx::query(AssertSqlSafe(sql))
                    .bind(at)
                    .bind(rule)
                    .bind(device)
                    .bind(seq)
                    .fetch_optional(&mut *a.tx)
                    .await?;
                (row, *at)
            }
            AlertChange::Ack { id, by, at } => {
                let sql = format!(
                    "UPDATE alerts SET state = 'acknowledged', acked_at = $1, acked_by = $2 \
                     WHERE id = $3 AND state = 'firing' RETURNING {ALERT_COLUMNS}"
                );
                let row = sqlx::query(AssertSqlSafe(sql))
                    .bind(at)
                    .bind(by)
                    .bind(id)
                    .fetch_optional(&mut *a.tx)
                    .await?;
                (row, *at)
            }
        };
        let Some(row) = moved else {
            a.tx.rollback().await?;
            let current = match change {
                AlertChange::Fire(n) => self
                    .alerts(
                        &[AlertState::Firing, AlertState::Acknowledged],
                        Some(&n.device),
                        i64::MAX,
                    )
                    .await?
                    .into_iter()
                    .find(|r| r.rule == n.rule),
                AlertChange::Resolve { .. } => None,
                AlertChange::Ack { id, .. } => self.alert(id).await?,
            };
            return Ok(AlertOutcome::Unchanged(current));
        };
        let alert = alert_from_row(&row)?;
        let events = [EventRow::alert(a.next, &alert, at)];
        a.commit(&events).await?;
        self.committed();
        Ok(AlertOutcome::Changed(alert))
    }

    /// Alerts in the given states (all when empty), of one device or all, newest first.
    pub async fn alerts(
        &self,
        states: &[AlertState],
        device: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AlertRow>, StoreError> {
        let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let sql = format!(
            "SELECT {ALERT_COLUMNS} FROM alerts \
             WHERE ($1::text IS NULL OR device = $1) AND (cardinality($2::text[]) = 0 OR state = ANY($2)) \
             ORDER BY id DESC LIMIT $3"
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(device)
            .bind(states)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(alert_from_row).collect()
    }

    /// Devices known and online, and open alerts per severity.
    pub async fn gauges(&self) -> Result<Gauges, StoreError> {
        let (devices, online, stale): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE online), count(*) FILTER (WHERE online AND stale) FROM devices",
        )
        .fetch_one(&self.pool)
        .await?;
        let open_alerts = sqlx::query_as(
            "SELECT severity, count(*) FROM alerts WHERE state <> 'resolved' GROUP BY severity",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(Gauges {
            devices,
            online,
            stale,
            open_alerts,
        })
    }

    /// One alert.
    pub async fn alert(&self, id: i64) -> Result<Option<AlertRow>, StoreError> {
        let sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(alert_from_row).transpose()
    }

    /// Marks an online device stale, or a stale one fresh, with its `status` event; false
    /// when nothing moved (another instance did it first).
    pub async fn mark_stale(&self, device: &str, stale: bool, at: i64) -> Result<bool, StoreError> {
        let mut a = begin_append(&self.pool).await?;
        let sql = if stale {
            "UPDATE devices SET stale = true WHERE id = $1 AND online AND NOT stale RETURNING id"
        } else {
            "UPDATE devices SET stale = false WHERE id = $1 AND stale RETURNING id"
        };
        let moved: Option<String> = sqlx::query_scalar(sql)
            .bind(device)
            .fetch_optional(&mut *a.tx)
            .await?;
        let events: Vec<EventRow> = moved
            .iter()
            .map(|d| EventRow::stale(a.next, d, stale, at))
            .collect();
        a.commit(&events).await?;
        self.committed();
        Ok(moved.is_some())
    }

    /// Cancels a queued command, with its `cancelled` event; false when it is no longer
    /// queued.
    pub async fn cancel_command(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        self.dequeue(id, Dequeue::Cancelled, at).await
    }

    /// Moves a queued command out of the queue, with its event; false when it is no longer
    /// queued (another caller, on this instance or another, moved it first).
    async fn dequeue(&self, id: &str, how: Dequeue, at: i64) -> Result<bool, StoreError> {
        let mut a = begin_append(&self.pool).await?;
        let sql = format!(
            "UPDATE commands SET status = '{}', {} = $1 WHERE id = $2 AND status = 'queued' RETURNING device",
            how.status(),
            how.column()
        );
        let device: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
            .bind(at)
            .bind(id)
            .fetch_optional(&mut *a.tx)
            .await?;
        let events: Vec<EventRow> = device
            .iter()
            .map(|d| EventRow::command(a.next, id, d, how.status(), at, None))
            .collect();
        a.commit(&events).await?;
        self.committed();
        Ok(device.is_some())
    }

    /// One command.
    pub async fn command(&self, id: &str) -> Result<Option<CommandRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM commands WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(command_from_row).transpose()
    }

    /// Marks a queued command as published; false when it is no longer queued.
    pub async fn mark_sent(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        self.dequeue(id, Dequeue::Sent, at).await
    }

    /// Moves open commands matching `condition` (on `$3`) to `status`, with an event each.
    async fn finish_due(
        &self,
        status: &'static str,
        condition: &'static str,
        cutoff: i64,
        now: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        // Most ticks find nothing due: a plain read first, so that no tick of any instance
        // takes the cluster-wide append lock for nothing.
        let due: bool = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM commands WHERE {})",
            condition.replace("$3", "$1")
        )))
        .bind(cutoff)
        .fetch_one(&self.pool)
        .await?;
        if !due {
            return Ok(Vec::new());
        }
        let mut a = begin_append(&self.pool).await?;
        let done: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "UPDATE commands SET status = $1, finished_at = $2 WHERE {condition} RETURNING id, device"
        )))
        .bind(status)
        .bind(now)
        .bind(cutoff)
        .fetch_all(&mut *a.tx)
        .await?;
        let events: Vec<EventRow> = done
            .iter()
            .zip(a.next..)
            .map(|((id, device), seq)| EventRow::command(seq, id, device, status, now, None))
            .collect();
        a.commit(&events).await?;
        self.committed();
        Ok(done)
    }

    /// Queued commands whose ttl ran out become `expired`.
    pub async fn expire_due(&self, now: i64) -> Result<Vec<(String, String)>, StoreError> {
        self.finish_due(
            "expired",
            "status = 'queued' AND expires_at <= $3",
            now,
            now,
        )
        .await
    }

    /// Sent commands without an answer since before `cutoff` become `timeout`.
    pub async fn timeout_due(
        &self,
        cutoff: i64,
        now: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.finish_due("timeout", "status = 'sent' AND sent_at <= $3", cutoff, now)
            .await
    }

    /// Marks devices silent since before `cutoff` offline, each with its `status` event.
    pub async fn presence_sweep(&self, cutoff: i64) -> Result<Vec<String>, StoreError> {
        // After a fault, `last_seen` lags the readings still waiting: a sweep now would log
        // devices offline that are not. The next tick tries again.
        if self.health.backlog(Duration::from_secs(1)) {
            return Ok(Vec::new());
        }
        let now = crate::domain::now_ms();
        let mut a = begin_append(&self.pool).await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE devices SET online = false, status_at = $1 WHERE online AND last_seen < $2 \
             RETURNING id",
        )
        .bind(now)
        .bind(cutoff)
        .fetch_all(&mut *a.tx)
        .await?;
        let events: Vec<EventRow> = ids
            .iter()
            .zip(a.next..)
            .map(|(id, seq)| EventRow::status(seq, id, false, now))
            .collect();
        a.commit(&events).await?;
        self.committed();
        Ok(ids)
    }

    /// Deletes rollups of a tier older than `cutoff` for the devices after `after` (see
    /// [`crate::store::Store::rollup_retention`]). No append lock: deleting is the same
    /// whichever instance does it, and no log event comes of it.
    pub async fn rollup_retention(
        &self,
        tier: i64,
        cutoff: i64,
        after: &str,
    ) -> Result<RollupSweep, StoreError> {
        let mut tx = self.pool.begin().await?;
        let devices: Vec<String> =
            sqlx::query_scalar("SELECT id FROM devices WHERE id > $1 ORDER BY id LIMIT $2")
                .bind(after)
                .bind(ROLLUP_SWEEP_DEVICES)
                .fetch_all(&mut *tx)
                .await?;
        let mut sweep = RollupSweep::default();
        let mut done = after.to_owned();
        for device in &devices {
            let budget = RETENTION_CHUNK_ROWS - sweep.deleted as i64;
            let n = sqlx::query(
                "DELETE FROM rollups WHERE ctid IN (SELECT ctid FROM rollups \
                 WHERE device = $1 AND tier = $2 AND bucket < $3 AND (field <> '' OR \
                 seq_hi <= (SELECT readings_purged_through FROM log_head)) LIMIT $4)",
            )
            .bind(device)
            .bind(tier)
            .bind(cutoff)
            .bind(budget)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sweep.deleted += n;
            if n as i64 == budget {
                // Out of room for this call: this device may have more, so it comes again.
                sweep.next = Some(done);
                tx.commit().await?;
                return Ok(sweep);
            }
            done.clone_from(device);
        }
        tx.commit().await?;
        sweep.next = (devices.len() as i64 == ROLLUP_SWEEP_DEVICES).then_some(done);
        Ok(sweep)
    }

    /// Deletes readings received before `cutoff` and events before `events_cutoff`, oldest
    /// first in chunks, and records how far each is purged; at most `RETENTION_PER_CALL`.
    /// Each chunk holds the append lock, so instances never purge at once.
    pub async fn retention(&self, cutoff: i64, events_cutoff: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        for (table, time, cutoff, column) in [
            ("readings", "received_at", cutoff, "readings_purged_through"),
            ("events", "at", events_cutoff, "events_purged_through"),
        ] {
            let delete = format!(
                "DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} ORDER BY seq LIMIT $1) \
                 AND {time} < $2 RETURNING seq"
            );
            let record = format!("UPDATE log_head SET {column} = GREATEST({column}, $1)");
            loop {
                let mut a = begin_append(&self.pool).await?;
                let seqs: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(delete.clone()))
                    .bind(RETENTION_CHUNK_ROWS)
                    .bind(cutoff)
                    .fetch_all(&mut *a.tx)
                    .await?;
                if let Some(max) = seqs.iter().max() {
                    sqlx::query(AssertSqlSafe(record.clone()))
                        .bind(*max)
                        .execute(&mut *a.tx)
                        .await?;
                }
                a.commit(&[]).await?;
                total += seqs.len() as u64;
                if (seqs.len() as i64) < RETENTION_CHUNK_ROWS {
                    break;
                }
                if total >= RETENTION_PER_CALL {
                    return Ok(total);
                }
            }
        }
        Ok(total)
    }

    /// Queued commands of devices that are online now, oldest first.
    pub async fn queued_for_online(&self, now: i64) -> Result<Vec<CommandRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.* FROM commands c JOIN devices d ON d.id = c.device \
             WHERE c.status = 'queued' AND d.online AND c.expires_at > $1 \
             ORDER BY c.created_at, c.n LIMIT 1000",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(command_from_row).collect()
    }

    /// The command log, newest first.
    pub async fn commands(
        &self,
        device: Option<&str>,
        statuses: &[String],
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM commands WHERE ($1::text IS NULL OR device = $1) \
             AND (cardinality($3::text[]) = 0 OR status = ANY($3)) \
             ORDER BY created_at DESC, n DESC LIMIT $2",
        )
        .bind(device)
        .bind(limit)
        .bind(statuses)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(command_from_row).collect()
    }

    /// Whether any command is queued or waiting for its answer.
    pub async fn has_open_commands(&self) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM commands WHERE status IN ('queued', 'sent'))",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// The key that signs session cookies: made by the first instance, shared by all.
    pub async fn session_key(&self) -> Result<Vec<u8>, StoreError> {
        let fresh: [u8; 32] = rand::random();
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('session_key', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(fresh.to_vec())
        .execute(&self.pool)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'session_key'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Whether the database answers reads.
    pub async fn readable(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Presence as stored, of `devices`, read under the append lock.
    async fn presence(
        conn: &mut sqlx::PgConnection,
        devices: Vec<String>,
    ) -> Result<HashMap<String, bool>, StoreError> {
        let rows: Vec<(String, bool)> =
            sqlx::query_as("SELECT id, online FROM devices WHERE id = ANY($1)")
                .bind(devices)
                .fetch_all(conn)
                .await?;
        Ok(rows.into_iter().collect())
    }
}
