//! SQLite's writer: the one connection that writes. It commits readings in batches (and
//! every other write: presence, commands, retention), appends their events to the log in the
//! same transaction, and publishes them live once committed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::mpsc;

use super::file_id;
use crate::domain;
use crate::ingest::{Item, Reading};
use crate::observability::Metrics;
use crate::store::alert::{ALERT_COLUMNS, AlertChange, AlertOutcome, NewAlert};
use crate::store::dedupe::{self, Recent};
use crate::store::health::{self, FaultKind, Health};
use crate::store::log::EventRow;
use crate::store::rollup::{self, RollupRow};
use crate::store::writer::{self, Backend, Commit, Committed};
use crate::store::{
    Control, Dequeue, Inserted, NewCommand, RETENTION_CHUNK_ROWS, RETENTION_PER_CALL,
    ROLLUP_SWEEP_DEVICES, RollupSweep, StoreError,
};

/// Rows per multi-row INSERT: one statement round trip per 250 rows instead of per row.
const ROWS_PER_INSERT: usize = 250;
/// Devices per multi-row upsert.
const DEVICES_PER_UPSERT: usize = 100;

/// What a write did, and the log events it appended (numbered from the seq it was given).
type Logged<T> = (T, Vec<EventRow>);

/// Stores a new command and its first event (`queued` or `sent`), or finds the one with the
/// same idempotency key, on `conn` (the writer's).
async fn insert_command(
    conn: &mut SqliteConnection,
    c: &NewCommand,
    seq: i64,
) -> Result<Logged<Inserted>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let result = sqlx::query(
        "INSERT INTO commands (id, device, name, params, status, idem_key, created_at, expires_at, sent_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .execute(&mut *tx)
    .await;
    match result {
        Ok(_) => {
            let events = vec![EventRow::command(
                seq,
                &c.id,
                &c.device,
                c.status,
                c.created_at,
                None,
            )];
            super::append(&mut tx, &events).await?;
            tx.commit().await?;
            Ok((Inserted::New, events))
        }
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() && c.key.is_some() => {
            let (id, status): (String, String) =
                sqlx::query_as("SELECT id, status FROM commands WHERE device = ? AND idem_key = ?")
                    .bind(&c.device)
                    .bind(c.key.as_deref())
                    .fetch_one(&mut *tx)
                    .await?;
            tx.rollback().await?;
            Ok((Inserted::Existing { id, status }, Vec::new()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Applies an alert change, with its `alert` event when it moved the alert, on `conn` (the
/// writer's).
async fn change_alert(
    conn: &mut SqliteConnection,
    change: &AlertChange,
    seq: i64,
) -> Result<Logged<AlertOutcome>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let (moved, at) = match change {
        AlertChange::Fire(a) => {
            let sql = format!(
                "INSERT INTO alerts (rule, device, severity, state, field, threshold, value, message, fired_at, fired_seq) \
                 SELECT ?, ?, ?, 'firing', ?, ?, ?, ?, ?, ? WHERE NOT EXISTS \
                 (SELECT 1 FROM alerts WHERE rule = ? AND device = ? AND resolved_seq > ?) \
                 ON CONFLICT (rule, device) WHERE state <> 'resolved' DO NOTHING RETURNING {ALERT_COLUMNS}"
            );
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(&a.rule)
                .bind(&a.device)
                .bind(a.severity)
                .bind(a.field.as_deref())
                .bind(a.threshold)
                .bind(a.value)
                .bind(&a.message)
                .bind(a.at)
                .bind(a.seq)
                .bind(&a.rule)
                .bind(&a.device)
                .bind(a.seq)
                .fetch_optional(&mut *tx)
                .await?;
            (row, a.at)
        }
        AlertChange::Resolve {
            rule,
            device,
            at,
            seq,
        } => {
            let sql = format!(
                "UPDATE alerts SET state = 'resolved', resolved_at = ?, resolved_seq = ? \
                 WHERE rule = ? AND device = ? AND state <> 'resolved' AND fired_seq <= ? \
                 RETURNING {ALERT_COLUMNS}"
            );
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(at)
                .bind(seq)
                .bind(rule)
                .bind(device)
                .bind(seq)
                .fetch_optional(&mut *tx)
                .await?;
            (row, *at)
        }
        AlertChange::Ack { id, by, at } => {
            let sql = format!(
                "UPDATE alerts SET state = 'acknowledged', acked_at = ?, acked_by = ? \
                 WHERE id = ? AND state = 'firing' RETURNING {ALERT_COLUMNS}"
            );
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(at)
                .bind(by)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            (row, *at)
        }
    };
    match moved {
        Some(row) => {
            let alert = super::alert_from_row(&row)?;
            let events = vec![EventRow::alert(seq, &alert, at)];
            super::append(&mut tx, &events).await?;
            tx.commit().await?;
            Ok((AlertOutcome::Changed(alert), events))
        }
        None => {
            let current = match change {
                AlertChange::Fire(NewAlert { rule, device, .. }) => {
                    let sql = format!(
                        "SELECT {ALERT_COLUMNS} FROM alerts WHERE rule = ? AND device = ? AND state <> 'resolved'"
                    );
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(rule)
                        .bind(device)
                        .fetch_optional(&mut *tx)
                        .await?
                }
                AlertChange::Resolve { .. } => None,
                AlertChange::Ack { id, .. } => {
                    let sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?");
                    sqlx::query(AssertSqlSafe(sql))
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?
                }
            };
            tx.rollback().await?;
            let current = current.as_ref().map(super::alert_from_row).transpose()?;
            Ok((AlertOutcome::Unchanged(current), Vec::new()))
        }
    }
}

/// Marks an online device stale, or a stale one fresh, with its `status` event, on `conn`
/// (the writer's); false when nothing moved.
async fn mark_stale(
    conn: &mut SqliteConnection,
    device: &str,
    stale: bool,
    at: i64,
    seq: i64,
) -> Result<Logged<bool>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let sql = if stale {
        "UPDATE devices SET stale = 1 WHERE id = ? AND online = 1 AND stale = 0 RETURNING id"
    } else {
        "UPDATE devices SET stale = 0 WHERE id = ? AND stale = 1 RETURNING id"
    };
    let moved: Option<String> = sqlx::query_scalar(sql)
        .bind(device)
        .fetch_optional(&mut *tx)
        .await?;
    let events: Vec<EventRow> = moved
        .iter()
        .map(|d| EventRow::stale(seq, d, stale, at))
        .collect();
    super::append(&mut tx, &events).await?;
    tx.commit().await?;
    Ok((moved.is_some(), events))
}

/// Moves a queued command out of the queue (published or cancelled), with its event, on
/// `conn` (the writer's); false when it is no longer queued.
async fn dequeue(
    conn: &mut SqliteConnection,
    id: &str,
    how: Dequeue,
    at: i64,
    seq: i64,
) -> Result<Logged<bool>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let sql = format!(
        "UPDATE commands SET status = '{}', {} = ? WHERE id = ? AND status = 'queued' RETURNING device",
        how.status(),
        how.column()
    );
    let device: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql))
        .bind(at)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
    let events: Vec<EventRow> = device
        .iter()
        .map(|d| EventRow::command(seq, id, d, how.status(), at, None))
        .collect();
    super::append(&mut tx, &events).await?;
    tx.commit().await?;
    Ok((device.is_some(), events))
}

/// Moves open commands matching `condition` (binding `cutoff`) to `status`, with an event
/// each, on `conn` (the writer's); returns their (id, device).
async fn finish_due(
    conn: &mut SqliteConnection,
    status: &'static str,
    condition: &'static str,
    cutoff: i64,
    now: i64,
    seq: i64,
) -> Result<Logged<Vec<(String, String)>>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let sql = format!(
        "UPDATE commands SET status = ?, finished_at = ? WHERE {condition} RETURNING id, device"
    );
    let done: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(sql))
        .bind(status)
        .bind(now)
        .bind(cutoff)
        .fetch_all(&mut *tx)
        .await?;
    let events: Vec<EventRow> = done
        .iter()
        .zip(seq..)
        .map(|((id, device), seq)| EventRow::command(seq, id, device, status, now, None))
        .collect();
    super::append(&mut tx, &events).await?;
    tx.commit().await?;
    Ok((done, events))
}

/// Room for writer work besides readings; senders wait when it is full.
pub(crate) const CONTROL_QUEUE: usize = 256;
/// Most control work done between two batches, so that commands cannot starve readings.
const CONTROL_PER_BATCH: usize = 64;

/// The one connection that writes.
pub struct Writer {
    /// The database file, and its identity when opened.
    pub(super) path: PathBuf,
    pub(super) file_id: Option<(u64, u64)>,
    pub(super) opts: SqliteConnectOptions,
    /// `None` after a failure: a failed statement may leave a transaction open (a failed
    /// COMMIT does, on SQLITE_FULL), so the connection is closed, which rolls it back, and
    /// a fresh one is opened for the retry.
    pub(super) conn: Option<SqliteConnection>,
    pub(super) next_seq: i64,
    pub(super) insert_sql: HashMap<usize, String>,
    pub(super) upsert_sql: HashMap<usize, String>,
    /// Presence as stored, so that a device that comes back by sending telemetry gets a
    /// `status` event too.
    pub(super) online: HashMap<Arc<str>, bool>,
    /// `last_seen` as last written, per device.
    pub(super) seen_written: HashMap<Arc<str>, i64>,
    /// The newest readings stored, to tell a redelivered one.
    pub(super) recent: Recent,
    /// Source ids by device and topic, as committed.
    pub(super) sources: HashMap<SourceKey, i64>,
    /// Work besides readings.
    pub(super) control_rx: mpsc::Receiver<Control>,
    /// What the writer reports about itself.
    pub(super) health: Arc<Health>,
    /// When the WAL's size was last looked at (or the next look, after a postponed one).
    pub(super) wal_checked: Instant,
    /// The connections' busy timeout, restored after the WAL restart.
    pub(super) busy_timeout: Duration,
}

/// One multi-row INSERT of `chunk`, each reading with its seq and source; the SQL text for
/// each row count is made once.
fn insert_readings<'q>(
    cache: &mut HashMap<usize, String>,
    chunk: &[(&Reading, i64, i64)],
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let sql = cache
        .entry(chunk.len())
        .or_insert_with(|| insert_sql(chunk.len()))
        .clone();
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for (r, seq, src) in chunk {
        q = q
            .bind(*seq)
            .bind(*src)
            .bind(r.ts)
            .bind(r.received_at - r.ts);
        // Checked to be UTF-8 JSON by ingest; stored as TEXT for SQLite's JSON functions.
        q = match std::str::from_utf8(&r.payload) {
            Ok(text) if r.flags & domain::flags::RAW == 0 => q.bind(text.to_owned()),
            _ => q.bind(r.payload.to_vec()),
        };
        q = q.bind(r.flags);
    }
    q
}

/// A reading's source: its device and topic.
pub(super) type SourceKey = (Arc<str>, Arc<str>);

/// The source id of each reading, from `known` or made now in the caller's transaction;
/// the ones made now, to remember once it commits.
async fn source_ids(
    conn: &mut SqliteConnection,
    known: &HashMap<SourceKey, i64>,
    readings: &[(&Reading, i64)],
) -> Result<(Vec<i64>, Vec<(SourceKey, i64)>), StoreError> {
    let mut fresh: Vec<(SourceKey, i64)> = Vec::new();
    let mut ids = Vec::with_capacity(readings.len());
    for (r, _) in readings {
        let key: SourceKey = (r.device.shared(), r.topic.clone());
        let id = match known.get(&key) {
            Some(id) => *id,
            None => match fresh.iter().find(|(k, _)| *k == key) {
                Some((_, id)) => *id,
                None => {
                    sqlx::query(
                        "INSERT INTO sources (device, topic) VALUES (?, ?) ON CONFLICT (device, topic) DO NOTHING",
                    )
                    .bind(key.0.clone())
                    .bind(key.1.clone())
                    .execute(&mut *conn)
                    .await?;
                    let id: i64 =
                        sqlx::query_scalar("SELECT id FROM sources WHERE device = ? AND topic = ?")
                            .bind(key.0.clone())
                            .bind(key.1.clone())
                            .fetch_one(&mut *conn)
                            .await?;
                    fresh.push((key, id));
                    id
                }
            },
        };
        ids.push(id);
    }
    Ok((ids, fresh))
}

/// How long the writer waits before it tries again to restart a WAL that a reader kept busy.
const WAL_RETRY: Duration = Duration::from_secs(5);
/// How long closing a failed connection may take before it is left to close on its own.
const CLOSE_DEADLINE: Duration = Duration::from_secs(1);

impl Writer {
    /// Keeps the WAL bounded: past `WAL_LIMIT_BYTES` (looked at every 250 ms), a RESTART
    /// checkpoint on our own connection copies the few frames the passive checkpoints have
    /// not, waits for readers to leave the WAL, and so lets the next commit write it from
    /// its start (`journal_size_limit` then cuts the file back).
    async fn bound_wal(&mut self, metrics: &Metrics) {
        if Instant::now() < self.wal_checked + Duration::from_millis(250) {
            return;
        }
        self.wal_checked = Instant::now();
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        if size <= super::WAL_LIMIT_BYTES {
            return;
        }
        let started = Instant::now();
        let Ok(mut conn) = self.take_conn().await else {
            return;
        };
        // No waiting for readers here (a long reader would hold every batch for the busy
        // timeout): if one is in the way, try again in a few seconds.
        let result: Result<bool, sqlx::Error> = async {
            sqlx::query("PRAGMA busy_timeout = 0")
                .execute(&mut conn)
                .await?;
            let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
                .fetch_one(&mut conn)
                .await?;
            sqlx::query(AssertSqlSafe(format!(
                "PRAGMA busy_timeout = {}",
                self.busy_timeout.as_millis()
            )))
            .execute(&mut conn)
            .await?;
            Ok(busy == 0)
        }
        .await;
        self.put_back(conn, result.is_ok()).await;
        match result {
            Ok(true) => {
                metrics.wal_restarts.inc();
                self.health.checkpoint(None);
                tracing::debug!(wal_bytes = size, took = ?started.elapsed(), "WAL restarted from its start");
            }
            Ok(false) => {
                self.wal_checked = Instant::now() + WAL_RETRY;
                tracing::debug!(
                    wal_bytes = size,
                    "WAL restart postponed: a reader is in the way"
                );
            }
            Err(e) => {
                // A checkpoint's trouble, not the writer's: commits go on into the WAL.
                self.wal_checked = Instant::now() + WAL_RETRY;
                self.health.checkpoint(Some(e.to_string()));
                tracing::warn!(error = %e, "WAL restart checkpoint failed; retrying later");
            }
        }
    }

    /// The writer's connection, opened afresh after a failure; never onto a file that
    /// replaced the one we opened.
    async fn take_conn(&mut self) -> Result<SqliteConnection, StoreError> {
        self.check_file()?;
        match self.conn.take() {
            Some(c) => Ok(c),
            None => Ok(SqliteConnection::connect_with(&self.opts).await?),
        }
    }

    /// Keeps a connection that worked; closes one that failed, rolling back whatever
    /// transaction a failed statement left open.
    async fn put_back(&mut self, conn: SqliteConnection, ok: bool) {
        if ok {
            self.conn = Some(conn);
        } else if tokio::time::timeout(CLOSE_DEADLINE, conn.close())
            .await
            .is_err()
        {
            tracing::warn!("closing the failed writer connection timed out; opening another");
        }
    }

    /// Fails when the file at our path is no longer the one we opened: committing (and
    /// acknowledging) into an unlinked file would lose the readings for good.
    fn check_file(&self) -> Result<(), StoreError> {
        let Some(ours) = self.file_id else {
            return Ok(());
        };
        let what = match file_id(&self.path) {
            Some(now) if now == ours => return Ok(()),
            Some(_) => "replaced by another file",
            None => "deleted",
        };
        Err(StoreError::Replaced {
            path: self.path.display().to_string(),
            what,
        })
    }

    /// One transaction for the whole batch, its events appended to the log in it, with
    /// seqs as [`writer::plan`] lays them out.
    async fn commit_on(
        &mut self,
        conn: &mut SqliteConnection,
        batch: &[Item],
    ) -> Result<Commit, StoreError> {
        let recent = &self.recent;
        let repeats = dedupe::repeats(batch, |r, hash| recent.contains(r, hash));
        let online = &self.online;
        let mut p = writer::plan(
            batch,
            &repeats,
            self.next_seq,
            |d| online.get(d).copied(),
            &self.seen_written,
        );
        if p.is_empty() {
            return Ok(Commit {
                last_seq: self.next_seq - 1,
                repeated: p.repeated,
                plan: p.plan,
                ..Commit::default()
            });
        }
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let (srcs, fresh) = source_ids(&mut tx, &self.sources, &p.readings).await?;
        let rows: Vec<(&Reading, i64, i64)> = p
            .readings
            .iter()
            .zip(srcs)
            .map(|((r, seq), src)| (*r, *seq, src))
            .collect();
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            insert_readings(&mut self.insert_sql, chunk)
                .execute(&mut *tx)
                .await?;
        }
        upsert_rollups(&mut tx, &rollup::of_batch(&p.readings)).await?;
        // One statement per 100 devices.
        for chunk in p.devices.chunks(DEVICES_PER_UPSERT) {
            let sql = self
                .upsert_sql
                .entry(chunk.len())
                .or_insert_with(|| upsert_sql(chunk.len()))
                .clone();
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (device, c) in chunk {
                q = q
                    .bind(device.shared())
                    .bind(c.first)
                    .bind(c.last)
                    .bind(c.online.map_or(-1, i64::from))
                    .bind(c.presence_at);
            }
            q.execute(&mut *tx).await?;
        }
        let mut unknown_acks = Vec::new();
        for (ack, ack_seq, slot) in std::mem::take(&mut p.acks) {
            // Only a sent command can be answered; anything else is an unknown or late ack.
            let sent_at: Option<Option<i64>> = sqlx::query_scalar(
                "UPDATE commands SET status = ?, finished_at = ?, result = ?, error = ? \
                 WHERE id = ? AND device = ? AND status = 'sent' RETURNING sent_at",
            )
            .bind(writer::ack_status(ack))
            .bind(ack.at)
            .bind(ack.result.as_deref())
            .bind(ack.error.as_deref())
            .bind(&ack.id)
            .bind(ack.device.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            p.answered(ack, ack_seq, slot, sent_at, &mut unknown_acks);
        }
        super::append(&mut tx, &p.plan.events).await?;
        // Last thing before COMMIT: a file deleted or replaced meanwhile gets nothing.
        self.check_file()?;
        tx.commit().await?;
        self.next_seq = p.next_seq;
        for (device, c) in &p.devices {
            self.seen_written.insert(device.shared(), c.last);
        }
        for (device, now) in &p.online {
            self.online.insert(device.shared(), *now);
        }
        self.sources.extend(fresh);
        for (r, _) in &p.readings {
            self.recent
                .insert(dedupe::id_of(r.device.shared(), r.ts, &r.payload));
        }
        p.finish();
        Ok(Commit {
            readings: p.readings.len() as u64,
            presence: p.presence,
            repeated: p.repeated,
            last_seq: p.next_seq - 1,
            plan: p.plan,
            unknown_acks,
        })
    }

    /// Runs `work` on the writer's connection: one that fails is closed (rolling back
    /// what it left open) and reported, and the next work opens a fresh one.
    async fn on_conn<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.health.begin_work();
        let result = match self.take_conn().await {
            Ok(mut conn) => {
                let r = work(&mut conn).await;
                self.put_back(conn, r.is_ok()).await;
                r
            }
            Err(e) => Err(e),
        };
        self.health.end_work();
        match &result {
            Ok(_) if self.health.faulty() => self.health.committed(0),
            Ok(_) => {}
            Err(e) => writer::report_failure(&self.health, self.fault_kind(e), e, 0),
        }
        result
    }

    /// Runs work that appends to the log, with the next seq; once committed, its events
    /// are published and the seq moves past them.
    async fn logged<T>(
        &mut self,
        committed: &Committed,
        work: impl AsyncFnOnce(&mut SqliteConnection, i64) -> Result<Logged<T>, StoreError>,
    ) -> Result<T, StoreError> {
        let seq = self.next_seq;
        let (value, events) = self.on_conn(async |c| work(c, seq).await).await?;
        if let Some(last) = events.last() {
            self.next_seq = last.seq + 1;
        }
        committed.publish_events(&events);
        Ok(value)
    }

    async fn do_control(&mut self, ctl: Control, committed: &Committed) {
        if ctl.abandoned() {
            // The caller gave up (WriterBusy) and acts as if it never happened: a command
            // stored now would never be published. Housekeeping asks again on its next tick.
            return;
        }
        match ctl {
            Control::InsertCommand { command, reply } => {
                let r = self
                    .logged(committed, async |c, seq| {
                        insert_command(c, &command, seq).await
                    })
                    .await;
                let _ = reply.send(r);
            }
            Control::Alert { change, reply } => {
                let r = self
                    .logged(committed, async |c, seq| {
                        change_alert(c, &change, seq).await
                    })
                    .await;
                let _ = reply.send(r);
            }
            Control::Stale {
                device,
                stale,
                at,
                reply,
            } => {
                let r = self
                    .logged(committed, async |c, seq| {
                        mark_stale(c, &device, stale, at, seq).await
                    })
                    .await;
                let _ = reply.send(r);
            }
            Control::Cancel { id, at, reply } => {
                let r = self
                    .logged(committed, async |c, seq| {
                        dequeue(c, &id, Dequeue::Cancelled, at, seq).await
                    })
                    .await;
                let _ = reply.send(r);
            }
            Control::MarkSent { id, at, reply } => {
                let r = self
                    .logged(committed, async |c, seq| {
                        dequeue(c, &id, Dequeue::Sent, at, seq).await
                    })
                    .await;
                let _ = reply.send(r);
            }
            Control::ExpireDue { now, reply } => {
                let r = self
                    .logged(committed, async |c, seq| {
                        finish_due(
                            c,
                            "expired",
                            "status = 'queued' AND expires_at <= ?",
                            now,
                            now,
                            seq,
                        )
                        .await
                    })
                    .await;
                let _ = reply.send(r);
            }
            Control::TimeoutDue { cutoff, now, reply } => {
                let r = self
                    .logged(committed, async |c, seq| {
                        finish_due(
                            c,
                            "timeout",
                            "status = 'sent' AND sent_at <= ?",
                            cutoff,
                            now,
                            seq,
                        )
                        .await
                    })
                    .await;
                let _ = reply.send(r);
            }
            Control::Retention {
                cutoff,
                events_cutoff,
                reply,
            } => {
                let result = self
                    .on_conn(async |c| retention(c, cutoff, events_cutoff).await)
                    .await;
                let _ = reply.send(result);
            }
            Control::RollupRetention {
                tier,
                cutoff,
                after,
                reply,
            } => {
                let result = self
                    .on_conn(async |c| rollup_retention(c, tier, cutoff, &after).await)
                    .await;
                let _ = reply.send(result);
            }
            Control::PresenceSweep { cutoff, reply } => {
                // After a fault, `last_seen` lags the readings still waiting: a sweep now
                // would log devices offline that are not. The next tick tries again.
                if self.health.backlog(Duration::from_secs(1)) {
                    let _ = reply.send(Ok(Vec::new()));
                    return;
                }
                let result = self
                    .logged(committed, async |c, seq| {
                        presence_sweep(c, cutoff, seq).await
                    })
                    .await;
                if let Ok(ids) = &result {
                    for id in ids {
                        self.online.insert(Arc::from(id.as_str()), false);
                    }
                }
                let _ = reply.send(result);
            }
        }
    }
}

impl Writer {
    /// The newest seq committed when the file was opened.
    pub fn head(&self) -> i64 {
        self.next_seq - 1
    }
}

impl Backend for Writer {
    async fn commit(&mut self, batch: &[Item]) -> Result<Commit, StoreError> {
        let mut conn = self.take_conn().await?;
        let r = self.commit_on(&mut conn, batch).await;
        self.put_back(conn, r.is_ok()).await;
        r
    }

    fn publish(&self, committed: &Committed, batch: &[Item], commit: &Commit) {
        committed.publish(
            batch,
            &commit.plan.order,
            &commit.plan.events,
            commit.last_seq,
        );
    }

    fn fault_kind(&self, e: &StoreError) -> FaultKind {
        let kind = match e {
            StoreError::Replaced { .. } => FaultKind::Replaced,
            StoreError::Query(q) | StoreError::Open { source: q, .. } => health::classify(q),
            _ => FaultKind::Error,
        };
        // SQLite reports a refused write as a plain I/O error: ask the file itself.
        match kind {
            FaultKind::Error => match std::fs::OpenOptions::new().write(true).open(&self.path) {
                Err(io) if matches!(io.raw_os_error(), Some(1 | 13 | 30)) => FaultKind::ReadOnly,
                _ => kind,
            },
            k => k,
        }
    }

    fn health(&self) -> &Arc<Health> {
        &self.health
    }

    fn start_seq(&self) -> Option<i64> {
        Some(self.next_seq - 1)
    }

    fn controls(&mut self) -> Option<&mut mpsc::Receiver<Control>> {
        Some(&mut self.control_rx)
    }

    async fn control(&mut self, ctl: Control, committed: &Committed) {
        self.do_control(ctl, committed).await;
    }

    async fn after_batch(&mut self, metrics: &Metrics, committed: &Committed) {
        self.bound_wal(metrics).await;
        // Readings come first, but never starve the rest (command inserts, retention,
        // presence) under a sustained flood.
        for _ in 0..CONTROL_PER_BATCH {
            let Ok(ctl) = self.control_rx.try_recv() else {
                break;
            };
            self.do_control(ctl, committed).await;
        }
    }

    async fn probe(&mut self) {
        let _ = self.on_conn(async |c| probe_write(c).await).await;
    }

    async fn close(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Err(e) = conn.close().await
        {
            tracing::warn!(error = %e, "closing the writer connection failed");
        }
    }
}

/// A write that needs a page of room: whether storage accepts writes again.
async fn probe_write(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO meta (key, value) VALUES ('write_probe', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
        .bind(domain::now_ms().to_string().into_bytes())
        .execute(conn)
        .await?;
    Ok(())
}

/// Marks devices silent since before `cutoff` offline, each with its `status` event, on
/// `conn` (the writer's).
async fn presence_sweep(
    conn: &mut SqliteConnection,
    cutoff: i64,
    seq: i64,
) -> Result<Logged<Vec<String>>, StoreError> {
    let now = domain::now_ms();
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE devices SET online = 0, status_at = ? WHERE online = 1 AND last_seen < ? RETURNING id",
    )
    .bind(now)
    .bind(cutoff)
    .fetch_all(&mut *tx)
    .await?;
    let events: Vec<EventRow> = ids
        .iter()
        .zip(seq..)
        .map(|(id, seq)| EventRow::status(seq, id, false, now))
        .collect();
    super::append(&mut tx, &events).await?;
    tx.commit().await?;
    Ok((ids, events))
}

/// Deletes readings received before `cutoff` and log events before `events_cutoff`,
/// oldest first in small chunks, and records how far each table is purged (a resume point
/// below that gets `event: gap`), on `conn` (the writer's).
async fn retention(
    conn: &mut SqliteConnection,
    cutoff: i64,
    events_cutoff: i64,
) -> Result<u64, StoreError> {
    let mut total = 0;
    for (table, time, cutoff, key) in [
        ("readings", "ts + lag", cutoff, "readings_purged_through"),
        ("events", "at", events_cutoff, "events_purged_through"),
    ] {
        let delete = format!(
            "DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} ORDER BY seq LIMIT ?) \
             AND {time} < ? RETURNING seq"
        );
        let record = "UPDATE meta SET value = max(value, ?) WHERE key = ?";
        loop {
            let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
            let seqs: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(delete.clone()))
                .bind(RETENTION_CHUNK_ROWS)
                .bind(cutoff)
                .fetch_all(&mut *tx)
                .await?;
            if let Some(max) = seqs.iter().max() {
                sqlx::query(record)
                    .bind(*max)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            total += seqs.len() as u64;
            if (seqs.len() as i64) < RETENTION_CHUNK_ROWS {
                break;
            }
            if total >= RETENTION_PER_CALL {
                // Readings wait meanwhile: housekeeping asks again at once for the rest.
                return Ok(total);
            }
        }
    }
    Ok(total)
}

/// Deletes a tier's rollups older than `cutoff` for the devices after `after`, in one short
/// transaction (see [`RollupSweep`]), on `conn` (the writer's).
async fn rollup_retention(
    conn: &mut SqliteConnection,
    tier: i64,
    cutoff: i64,
    after: &str,
) -> Result<RollupSweep, StoreError> {
    let devices: Vec<String> =
        sqlx::query_scalar("SELECT id FROM devices WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after)
            .bind(ROLLUP_SWEEP_DEVICES)
            .fetch_all(&mut *conn)
            .await?;
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let mut sweep = RollupSweep::default();
    let mut done = after.to_owned();
    for device in &devices {
        let budget = RETENTION_CHUNK_ROWS - sweep.deleted as i64;
        let n = sqlx::query(
            "DELETE FROM rollups WHERE (device, tier, bucket, field) IN \
             (SELECT device, tier, bucket, field FROM rollups \
             WHERE device = ? AND tier = ? AND bucket < ? AND (field <> '' OR seq_hi <= \
             (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'readings_purged_through')) \
             LIMIT ?)",
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

/// Rollup rows per multi-row upsert (14 parameters each).
const ROLLUPS_PER_UPSERT: usize = 200;

/// Merges a batch's rollup rows into `rollups`, inside the caller's transaction: counts and
/// sums add up, extremes widen, first and last go by device time.
pub(super) async fn upsert_rollups(
    conn: &mut SqliteConnection,
    rows: &[RollupRow],
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROLLUPS_PER_UPSERT) {
        let mut sql = String::from(
            "INSERT INTO rollups (device, tier, bucket, field, n, total, lo, hi, first_v, \
             first_ts, last_v, last_ts, seq_lo, seq_hi) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?,?,?,?,?,?,?,?,?,?,?,?,?,?)");
        }
        sql.push_str(
            " ON CONFLICT (device, tier, bucket, field) DO UPDATE SET \
             n = n + excluded.n, total = total + excluded.total, \
             lo = min(lo, excluded.lo), hi = max(hi, excluded.hi), \
             first_v = CASE WHEN excluded.first_ts < first_ts THEN excluded.first_v ELSE first_v END, \
             first_ts = min(first_ts, excluded.first_ts), \
             last_v = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last_v ELSE last_v END, \
             last_ts = max(last_ts, excluded.last_ts), \
             seq_lo = min(seq_lo, excluded.seq_lo), seq_hi = max(seq_hi, excluded.seq_hi)",
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for r in chunk {
            let s = &r.stats;
            q = q
                .bind(r.device.clone())
                .bind(r.tier)
                .bind(r.bucket)
                .bind(r.field.clone())
                .bind(s.count)
                .bind(s.sum)
                .bind(s.min)
                .bind(s.max)
                .bind(s.first)
                .bind(s.first_ts)
                .bind(s.last)
                .bind(s.last_ts)
                .bind(r.seqs.map(|(lo, _)| lo))
                .bind(r.seqs.map(|(_, hi)| hi));
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

fn upsert_sql(rows: usize) -> String {
    let mut sql =
        String::from("INSERT INTO devices (id, first_seen, last_seen, online, status_at) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?)");
    }
    sql.push_str(
        " ON CONFLICT(id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen), \
         status_at = CASE WHEN excluded.online != -1 AND excluded.online != online \
         THEN excluded.status_at ELSE status_at END, \
         online = CASE WHEN excluded.online = -1 THEN online ELSE excluded.online END",
    );
    sql
}

fn insert_sql(rows: usize) -> String {
    let mut sql = String::from("INSERT INTO readings (seq, src, ts, lag, payload, flags) VALUES ");
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?)");
    }
    sql
}
