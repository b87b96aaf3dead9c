//! The one writer: it owns the write connection, commits readings in batches (and every
//! other write: presence, commands, retention), appends their events to the log in the same
//! transaction, and only then acknowledges the messages and publishes the events live.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::health::{self, FaultKind, Health};
use super::log::{self, EventRow};
use super::{Control, Inserted, NewCommand, StoreError, file_id};
use crate::config::StorageConfig;
use crate::domain::{self, DeviceId};
use crate::feed::{self, Event, Feed, Kind};
use crate::ingest::{AckSink, AckToken, Item, Reading};
use crate::observability::Metrics;

/// Rows per multi-row INSERT: one statement round trip per 250 rows instead of per row.
const ROWS_PER_INSERT: usize = 250;
/// Devices per multi-row upsert.
const DEVICES_PER_UPSERT: usize = 100;
/// Rows deleted per retention statement, so the writer is never held for long.
const RETENTION_CHUNK: i64 = 5_000;
/// Most rows one retention call deletes; a result this large means more may be due.
pub(super) const RETENTION_PER_CALL: u64 = 20_000;

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
            log::append(&mut tx, &events).await?;
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

/// Marks a queued command as published, with its `sent` event, on `conn` (the writer's);
/// false when it is no longer queued.
async fn mark_sent(
    conn: &mut SqliteConnection,
    id: &str,
    at: i64,
    seq: i64,
) -> Result<Logged<bool>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let device: Option<String> = sqlx::query_scalar(
        "UPDATE commands SET status = 'sent', sent_at = ? WHERE id = ? AND status = 'queued' RETURNING device",
    )
    .bind(at)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let events: Vec<EventRow> = device
        .iter()
        .map(|d| EventRow::command(seq, id, d, "sent", at, None))
        .collect();
    log::append(&mut tx, &events).await?;
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
    log::append(&mut tx, &events).await?;
    tx.commit().await?;
    Ok((done, events))
}

/// Room for writer work besides readings; senders wait when it is full.
pub(super) const CONTROL_QUEUE: usize = 256;
/// Most control work done between two batches, so that commands cannot starve readings.
const CONTROL_PER_BATCH: usize = 64;
/// How long a caller waits for the writer before it gets `WriterBusy`.
pub(super) const ASK_DEADLINE: Duration = Duration::from_secs(10);

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
    /// Work besides readings.
    pub(super) control_rx: mpsc::Receiver<Control>,
    /// What the writer reports about itself.
    pub(super) health: Arc<Health>,
    /// When the WAL's size was last looked at (or the next look, after a postponed one).
    pub(super) wal_checked: Instant,
    /// The connections' busy timeout, restored after the WAL restart.
    pub(super) busy_timeout: Duration,
}

/// How stale `devices.last_seen` may get for a device that stays online: rewriting the row
/// in every transaction costs a statement and a page per commit, and the presence timeout
/// it serves is at least a second.
const LAST_SEEN_EVERY_MS: i64 = 250;

/// Where committed work is announced.
pub struct Committed {
    /// The seq of the last committed event.
    pub last_seq: watch::Sender<i64>,
    /// The live feed; events are encoded only while someone listens.
    pub feed: Arc<Feed>,
    /// Command status changes from device acks, for the command service.
    pub commands: mpsc::Sender<CommandChange>,
}

/// A command's status changed (from the writer: a device's ack).
#[derive(Debug, Clone)]
pub struct CommandChange {
    /// Command id.
    pub id: String,
    /// Device id.
    pub device: String,
    /// New status: acked or failed (or unknown: no such sent command).
    pub status: &'static str,
    /// The device's result, JSON text.
    pub result: Option<String>,
    /// The device's error.
    pub error: Option<String>,
    /// When it happened, Unix ms.
    pub at: i64,
    /// When it was sent, Unix ms.
    pub sent_at: Option<i64>,
}

impl Committed {
    /// Publishes committed events in log order, then moves the newest seq forward. Reading
    /// frames are encoded only while someone listens; the others were made for storage.
    fn publish(&self, batch: &[Item], order: &[Entry], events: &[EventRow], last_seq: i64) {
        if self.feed.has_subscribers() {
            let mut out = Vec::with_capacity(order.len());
            for entry in order {
                match *entry {
                    Entry::Reading(i, seq) => {
                        if let Some(Item::Reading(r, _)) = batch.get(i) {
                            out.push(reading_event(r, seq));
                        }
                    }
                    Entry::Event(i) => out.extend(events.get(i).map(EventRow::to_event)),
                }
            }
            if !out.is_empty() {
                self.feed.push(out);
            }
        }
        // After the feed, so a client that resumes from the newest seq finds it in the ring.
        self.last_seq.send_if_modified(|v| {
            let moved = last_seq > *v;
            *v = (*v).max(last_seq);
            moved
        });
    }

    /// Publishes events of work other than a batch (commands, presence timeouts).
    fn publish_events(&self, events: &[EventRow]) {
        if let Some(last) = events.last() {
            let order: Vec<Entry> = (0..events.len()).map(Entry::Event).collect();
            self.publish(&[], &order, events, last.seq);
        }
    }
}

/// A reading's feed event.
fn reading_event(r: &Reading, seq: i64) -> Event {
    Event {
        kind: Kind::Reading,
        device: r.device.shared(),
        seq,
        frame: feed::encode(&feed::ReadingRef {
            seq,
            device: r.device.as_str(),
            topic: &r.topic,
            ts: r.ts,
            received_at: r.received_at,
            payload: &r.payload,
            flags: r.flags,
        }),
    }
}

/// One event of a committed batch, in log order.
#[derive(Debug, Clone, Copy)]
enum Entry {
    /// The reading at this index of the batch, with its seq.
    Reading(usize, i64),
    /// This index of the batch's event rows.
    Event(usize),
}

/// A committed batch: counts for the metrics, the newest seq, and what to publish.
#[derive(Debug)]
struct Commit {
    readings: u64,
    presence: u64,
    last_seq: i64,
    plan: Plan,
}

/// What a committed batch holds, for publishing it.
#[derive(Debug, Default)]
struct Plan {
    order: Vec<Entry>,
    events: Vec<EventRow>,
}

/// Per-device changes gathered over one batch.
struct DeviceChange {
    first: i64,
    last: i64,
    online: Option<bool>,
    presence_at: Option<i64>,
    /// An `online` / `offline` message is in the batch.
    reported: bool,
}

/// One multi-row INSERT of `chunk`, each reading with its seq; the SQL text for each row
/// count is made once.
fn insert_readings<'q>(
    cache: &mut HashMap<usize, String>,
    chunk: &[(&Reading, i64)],
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let sql = cache
        .entry(chunk.len())
        .or_insert_with(|| insert_sql(chunk.len()))
        .clone();
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for (r, seq) in chunk {
        q = q
            .bind(*seq)
            .bind(r.device.shared())
            .bind(r.topic.clone())
            .bind(r.ts)
            .bind(r.received_at);
        // Checked to be UTF-8 JSON by ingest; stored as TEXT for SQLite's JSON functions.
        q = match std::str::from_utf8(&r.payload) {
            Ok(text) if r.flags & domain::flags::RAW == 0 => q.bind(text.to_owned()),
            _ => q.bind(r.payload.to_vec()),
        };
        q = q.bind(r.flags);
    }
    q
}

/// How long the writer keeps retrying a failing commit once shutdown began, before it
/// gives up and leaves the unacknowledged readings with the broker.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(3);
/// How long the writer waits before it tries again to restart a WAL that a reader kept busy.
const WAL_RETRY: Duration = Duration::from_secs(5);
/// How long closing a failed connection may take before it is left to close on its own.
const CLOSE_DEADLINE: Duration = Duration::from_secs(1);

/// The writer's settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most items per transaction.
    pub batch_size: usize,
    /// How long a batch may wait to fill.
    pub batch_delay: Duration,
    /// Longest wait between two attempts at a failing commit.
    pub retry_max: Duration,
}

impl From<&StorageConfig> for WriterConfig {
    fn from(c: &StorageConfig) -> Self {
        WriterConfig {
            batch_size: c.batch_size,
            batch_delay: c.batch_delay,
            retry_max: c.retry_max,
        }
    }
}

/// The oldest time among a batch's items (readings carry theirs; the rest count from now).
fn oldest_ms(batch: &[Item]) -> i64 {
    batch
        .iter()
        .filter_map(|i| match i {
            Item::Reading(r, _) => Some(r.received_at),
            _ => None,
        })
        .min()
        .unwrap_or_else(domain::now_ms)
}

impl Writer {
    /// Runs the writer until `items` is closed and drained: every item received is committed
    /// and then acknowledged, so a shutdown loses nothing. When storage keeps failing after
    /// `shutdown`, it gives up: the error says why, and what was not committed was not
    /// acknowledged either, so the broker keeps it.
    pub async fn run(
        mut self,
        cfg: WriterConfig,
        mut items: mpsc::Receiver<Item>,
        mut acks: Box<dyn AckSink>,
        metrics: Arc<Metrics>,
        committed: Committed,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        let _ = committed.last_seq.send(self.next_seq - 1);
        let mut batch: Vec<Item> = Vec::with_capacity(cfg.batch_size);
        let mut pending_acks: Vec<AckToken> = Vec::new();
        let mut retry = tokio::time::interval(Duration::from_millis(5));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe = tokio::time::interval(cfg.retry_max);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outcome = Ok(());
        loop {
            tokio::select! {
                biased;
                n = items.recv_many(&mut batch, cfg.batch_size) => {
                    if n == 0 {
                        break;
                    }
                    if !cfg.batch_delay.is_zero() && batch.len() < cfg.batch_size {
                        let deadline = tokio::time::Instant::now() + cfg.batch_delay;
                        while batch.len() < cfg.batch_size {
                            let room = cfg.batch_size - batch.len();
                            match tokio::time::timeout_at(deadline, items.recv_many(&mut batch, room)).await {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                    }
                    metrics.queue_depth.store(items.len() as i64, Ordering::Relaxed);
                    self.health.busy(batch.len() + items.len(), oldest_ms(&batch));
                    if let Err(e) = self
                        .commit_with_retry(&mut batch, &mut pending_acks, &metrics, &committed, &items, &cfg, &shutdown)
                        .await
                    {
                        outcome = Err(e);
                        break;
                    }
                    acks.ack(&mut pending_acks);
                    self.bound_wal(&metrics).await;
                    // Readings come first, but never starve the rest (command inserts,
                    // retention, presence) under a sustained flood.
                    for _ in 0..CONTROL_PER_BATCH {
                        let Ok(ctl) = self.control_rx.try_recv() else { break };
                        self.control(ctl, &metrics, &committed).await;
                    }
                }
                Some(ctl) = self.control_rx.recv() => self.control(ctl, &metrics, &committed).await,
                _ = retry.tick(), if !pending_acks.is_empty() => acks.ack(&mut pending_acks),
                // A fault left by work that failed while no readings come: a small write
                // finds out when storage works again, so readiness turns back by itself.
                _ = probe.tick(), if self.health.faulty() => {
                    let _ = self.on_conn(async |c| probe_write(c).await).await;
                }
            }
        }
        // Shutting down: whatever was committed must reach the broker as acks.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !pending_acks.is_empty() && Instant::now() < deadline {
            acks.ack(&mut pending_acks);
            if !pending_acks.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if let Some(conn) = self.conn.take()
            && let Err(e) = conn.close().await
        {
            tracing::warn!(error = %e, "closing the writer connection failed");
        }
        outcome
    }

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
                metrics.wal_restarts.fetch_add(1, Ordering::Relaxed);
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

    /// Records a failed write in the health report (and the log, on its first occurrence).
    fn report_failure(&self, e: &StoreError, items: usize) {
        let kind = match e {
            StoreError::Replaced { .. } => FaultKind::Replaced,
            StoreError::Query(q) | StoreError::Open { source: q, .. } => health::classify(q),
            _ => FaultKind::Error,
        };
        // SQLite reports a refused write as a plain I/O error: ask the file itself.
        let kind = match kind {
            FaultKind::Error => match std::fs::OpenOptions::new().write(true).open(&self.path) {
                Err(io) if matches!(io.raw_os_error(), Some(1 | 13 | 30)) => FaultKind::ReadOnly,
                _ => kind,
            },
            k => k,
        };
        let first = self.health.fault().is_none_or(|f| f.kind != kind);
        self.health.failed(kind, e.to_string());
        if first {
            tracing::error!(error = %e, fault = kind.as_str(), items, "storage write failed: not acknowledging anything until it works again");
        }
    }

    /// Commits a batch, retrying on failure (disk full, locked, read-only) rather than
    /// dropping it; the backoff doubles up to `retry_max`. Unacknowledged messages stay
    /// with the broker meanwhile, so nothing is lost. Gives up only during shutdown.
    #[allow(
        clippy::too_many_arguments,
        reason = "the writer's loop state, passed down once"
    )]
    async fn commit_with_retry(
        &mut self,
        batch: &mut Vec<Item>,
        acks: &mut Vec<AckToken>,
        metrics: &Metrics,
        committed: &Committed,
        queue: &mpsc::Receiver<Item>,
        cfg: &WriterConfig,
        shutdown: &CancellationToken,
    ) -> Result<(), StoreError> {
        let mut delay = Duration::from_millis(50).min(cfg.retry_max);
        let mut self_changes = Vec::new();
        let mut give_up_at: Option<tokio::time::Instant> = None;
        let mut attempts = 0u64;
        loop {
            let started = Instant::now();
            let result = match self.take_conn().await {
                Ok(mut conn) => {
                    let r = self.commit(&mut conn, batch, &mut self_changes).await;
                    self.put_back(conn, r.is_ok()).await;
                    r
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(Commit {
                    readings,
                    presence,
                    last_seq,
                    plan,
                }) => {
                    if attempts > 0 {
                        tracing::info!(attempts, "the batch committed after failing");
                    }
                    committed.publish(batch, &plan.order, &plan.events, last_seq);
                    for change in self_changes.drain(..) {
                        if change.status == "unknown" {
                            metrics.unknown_acks.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(id = %change.id, device = %change.device, "ack for an unknown or already finished command");
                        } else if let Err(e) = committed.commands.try_send(change) {
                            // The status is stored; only the live notification is lost.
                            tracing::warn!(error = %e, "command notification queue full");
                        }
                    }
                    metrics.stored.fetch_add(readings, Ordering::Relaxed);
                    metrics.presence.fetch_add(presence, Ordering::Relaxed);
                    metrics.batches.fetch_add(1, Ordering::Relaxed);
                    metrics
                        .commit_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    self.health.committed(queue.len());
                    acks.extend(batch.drain(..).filter_map(|item| match item {
                        Item::Reading(_, ack) | Item::Skip(ack) | Item::Presence { ack, .. } => ack,
                        Item::CommandAck(a) => a.ack,
                    }));
                    return Ok(());
                }
                Err(e) => {
                    attempts += 1;
                    metrics.commit_failures.fetch_add(1, Ordering::Relaxed);
                    self.health
                        .busy(batch.len() + queue.len(), oldest_ms(batch));
                    self.report_failure(&e, batch.len());
                    // Repeated failures are logged every 5 s or so, not at every attempt.
                    if attempts % 20 == 0 {
                        tracing::warn!(error = %e, attempts, retry_in = ?delay, items = batch.len(), "commit still failing; retrying");
                    }
                    if shutdown.is_cancelled() {
                        let at = *give_up_at
                            .get_or_insert_with(|| tokio::time::Instant::now() + SHUTDOWN_RETRY);
                        if tokio::time::Instant::now() >= at {
                            tracing::error!(error = %e, items = batch.len() + queue.len(), "shutting down while storage fails: giving up; what was not committed was not acknowledged and stays with the broker");
                            return Err(e);
                        }
                    }
                    // Never past the moment to give up, so the last tries fit shutdown's
                    // deadline whatever retry_max is.
                    let wake = give_up_at.map_or(tokio::time::Instant::now() + delay, |at| {
                        at.min(tokio::time::Instant::now() + delay)
                    });
                    tokio::select! {
                        _ = tokio::time::sleep_until(wake) => {}
                        // Shutdown shortens the wait.
                        _ = shutdown.cancelled(), if give_up_at.is_none() => {}
                    }
                    delay = (delay * 2).min(cfg.retry_max);
                }
            }
        }
    }

    /// One transaction for the whole batch, its events appended to the log in it. Seqs
    /// are given in the batch's order: a device that comes back online by sending gets its
    /// `status` event just before that reading, an answered command its `command` event.
    async fn commit(
        &mut self,
        conn: &mut SqliteConnection,
        batch: &[Item],
        changes: &mut Vec<CommandChange>,
    ) -> Result<Commit, StoreError> {
        changes.clear();
        let mut devices: HashMap<&DeviceId, DeviceChange> = HashMap::new();
        // Presence as it will be once this batch commits (self.online changes only then).
        let mut online: HashMap<&DeviceId, bool> = HashMap::new();
        let mut command_acks = Vec::new();
        let mut readings: Vec<(&Reading, i64)> = Vec::with_capacity(batch.len());
        let mut plan = Plan::default();
        let mut presence = 0u64;
        let mut seq = self.next_seq;
        for (i, item) in batch.iter().enumerate() {
            let (device, at) = match item {
                Item::Reading(r, _) => (&r.device, r.received_at),
                Item::Presence { device, at, .. } => (device, *at),
                Item::CommandAck(ack) => (&ack.device, ack.at),
                Item::Skip(_) => continue,
            };
            let c = devices.entry(device).or_insert(DeviceChange {
                first: at,
                last: at,
                online: None,
                presence_at: None,
                reported: false,
            });
            c.last = c.last.max(at);
            let was_online = online
                .get(device)
                .copied()
                .or_else(|| self.online.get(device.as_str()).copied())
                == Some(true);
            let now_online = match item {
                Item::Presence { online, .. } => {
                    presence += 1;
                    c.presence_at = Some(at);
                    c.reported = true;
                    *online
                }
                // A device that sends telemetry or answers is evidently online.
                _ => {
                    if c.online != Some(true) {
                        c.presence_at = Some(at);
                    }
                    true
                }
            };
            c.online = Some(now_online);
            online.insert(device, now_online);
            // A report is an event even when it repeats; otherwise only a change is.
            if matches!(item, Item::Presence { .. }) || (now_online && !was_online) {
                plan.order.push(Entry::Event(plan.events.len()));
                plan.events
                    .push(EventRow::status(seq, device.as_str(), now_online, at));
                seq += 1;
            }
            match item {
                Item::Reading(r, _) => {
                    plan.order.push(Entry::Reading(i, seq));
                    readings.push((r, seq));
                    seq += 1;
                }
                Item::CommandAck(ack) => {
                    // Its event's seq is kept even if the ack turns out to be for an unknown
                    // command (then that seq is simply never used).
                    command_acks.push((ack, seq, plan.order.len()));
                    plan.order.push(Entry::Event(usize::MAX));
                    seq += 1;
                }
                _ => {}
            }
        }
        // A device already online that only sent readings or answers changes nothing but
        // last_seen, which is written at most every LAST_SEEN_EVERY_MS.
        devices.retain(|d, c| {
            c.reported
                || self.online.get(d.as_str()) != Some(&true)
                || self
                    .seen_written
                    .get(d.as_str())
                    .is_none_or(|&w| c.last - w >= LAST_SEEN_EVERY_MS)
        });
        if readings.is_empty() && devices.is_empty() && command_acks.is_empty() {
            return Ok(Commit {
                readings: 0,
                presence: 0,
                last_seq: self.next_seq - 1,
                plan,
            });
        }
        if readings.len() <= ROWS_PER_INSERT
            && devices.is_empty()
            && command_acks.is_empty()
            && plan.events.is_empty()
        {
            // One statement is atomic on its own: no BEGIN and COMMIT, which would be two
            // more round trips to the SQLite thread (the common case under load, now that
            // last_seen is not rewritten every time).
            // Never into a file that was deleted or replaced: nothing is committed (or
            // acknowledged) and the batch stays ours.
            self.check_file()?;
            insert_readings(&mut self.insert_sql, &readings)
                .execute(&mut *conn)
                .await?;
            self.next_seq = seq;
            return Ok(Commit {
                readings: readings.len() as u64,
                presence,
                last_seq: seq - 1,
                plan,
            });
        }
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in readings.chunks(ROWS_PER_INSERT) {
            insert_readings(&mut self.insert_sql, chunk)
                .execute(&mut *tx)
                .await?;
        }
        // One statement per 100 devices; -1 marks "presence unchanged" (never used now that
        // every item sets presence, but kept for a device row without one).
        let devices: Vec<(&&DeviceId, &DeviceChange)> = devices.iter().collect();
        for chunk in devices.chunks(DEVICES_PER_UPSERT) {
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
        if devices.iter().any(|(_, c)| c.online.is_none()) {
            sqlx::query("UPDATE devices SET online = 0 WHERE online = -1")
                .execute(&mut *tx)
                .await?;
        }
        for (ack, ack_seq, slot) in command_acks {
            let status = if ack.ok { "acked" } else { "failed" };
            // Only a sent command can be answered; anything else is an unknown or late ack.
            let sent_at: Option<Option<i64>> = sqlx::query_scalar(
                "UPDATE commands SET status = ?, finished_at = ?, result = ?, error = ? \
                 WHERE id = ? AND device = ? AND status = 'sent' RETURNING sent_at",
            )
            .bind(status)
            .bind(ack.at)
            .bind(ack.result.as_deref())
            .bind(ack.error.as_deref())
            .bind(&ack.id)
            .bind(ack.device.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(sent) = sent_at {
                let result = ack
                    .result
                    .as_deref()
                    .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok());
                let rtt_ms = sent.map(|s| ack.at - s);
                plan.order[slot] = Entry::Event(plan.events.len());
                plan.events.push(EventRow::command(
                    ack_seq,
                    &ack.id,
                    ack.device.as_str(),
                    status,
                    ack.at,
                    Some(serde_json::json!({"ok": ack.ok, "result": result, "error": ack.error, "rtt_ms": rtt_ms})),
                ));
            }
            changes.push(CommandChange {
                id: ack.id.clone(),
                device: ack.device.to_string(),
                status: if sent_at.is_some() { status } else { "unknown" },
                result: ack.result.clone(),
                error: ack.error.clone(),
                at: ack.at,
                sent_at: sent_at.flatten(),
            });
        }
        log::append(&mut tx, &plan.events).await?;
        // Last thing before COMMIT: a file deleted or replaced meanwhile gets nothing.
        self.check_file()?;
        tx.commit().await?;
        self.next_seq = seq;
        for (device, c) in devices {
            self.seen_written.insert(device.shared(), c.last);
        }
        for (device, now) in online {
            self.online.insert(device.shared(), now);
        }
        // Slots of unknown acks hold no event.
        plan.order
            .retain(|e| !matches!(e, Entry::Event(i) if *i == usize::MAX));
        Ok(Commit {
            readings: readings.len() as u64,
            presence,
            last_seq: seq - 1,
            plan,
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
            Err(e) => self.report_failure(e, 0),
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

    async fn control(&mut self, ctl: Control, metrics: &Metrics, committed: &Committed) {
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
            Control::MarkSent { id, at, reply } => {
                let r = self
                    .logged(committed, async |c, seq| mark_sent(c, &id, at, seq).await)
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
                if let Ok(n) = &result {
                    metrics.retention_deleted.fetch_add(*n, Ordering::Relaxed);
                }
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
                    metrics
                        .presence_timeouts
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    for id in ids {
                        self.online.insert(Arc::from(id.as_str()), false);
                    }
                }
                let _ = reply.send(result);
            }
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
    log::append(&mut tx, &events).await?;
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
        ("readings", "received_at", cutoff, "readings_purged_through"),
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
                .bind(RETENTION_CHUNK)
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
            if (seqs.len() as i64) < RETENTION_CHUNK {
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
    let mut sql = String::from(
        "INSERT INTO readings (seq, device, topic, ts, received_at, payload, flags) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push(',');
        }
        sql.push_str("(?,?,?,?,?,?,?)");
    }
    sql
}
