//! Storage behind one interface: [`Store`] for reads and the work that must go through
//! storage, [`Writer`] for the batches of readings, and the types both speak. Two backends
//! implement it: `sqlite` (one file, the default) and `postgres` (shared by several
//! instances). SQL lives only in those two. `writer` is the batch loop they share,
//! [`health`] what the writer reports about itself, [`log`] the event rows besides readings.

pub mod alert;
mod dedupe;
pub mod health;
mod housekeeping;
pub mod log;
mod postgres;
pub mod rollup;
mod rows;
mod sqlite;
mod writer;

pub use housekeeping::run_housekeeping;
pub use writer::{CommandChange, Committed, WriterConfig};

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{StorageBackend, StorageConfig};
use crate::feed::{self, Kind, Kinds};
use crate::ingest::{AckSink, Item};
use crate::observability::Metrics;
use alert::{AlertChange, AlertOutcome, AlertRow, AlertState};
use health::Health;
use log::EventRow;

/// Storage failures.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open SQLite database {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// The file at `[storage] path` is not an SQLite database, or is damaged.
    #[error(
        "{path} is not a usable SQLite database ({source}): move it away, or point [storage] path at another file"
    )]
    NotDatabase {
        /// The file.
        path: String,
        /// What SQLite said.
        source: sqlx::Error,
    },
    /// The database has a schema migration this build does not know: a newer telebridge
    /// wrote it.
    #[error(
        "the database {path} was written by a newer telebridge (it has schema migration {version}, which this build does not know): run that version, or point [storage] at another database"
    )]
    Newer {
        /// The file.
        path: String,
        /// The unknown migration.
        version: i64,
    },
    /// A migration failed.
    #[error("cannot migrate the database schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database file was deleted or replaced while the daemon had it open.
    #[error(
        "the database file {path} was {what} while telebridge had it open; nothing more is committed or acknowledged until it is back or telebridge restarts"
    )]
    Replaced {
        /// The file.
        path: String,
        /// `deleted` or `replaced by another file`.
        what: &'static str,
    },
    /// PostgreSQL could not be reached or refused us.
    #[error("cannot connect to PostgreSQL at {url}")]
    Connect {
        /// `[storage] url`, without its password.
        url: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Query(#[from] sqlx::Error),
    /// The writer task is gone (shutting down).
    #[error("the storage writer has stopped")]
    WriterGone,
    /// The writer did not get to the work in time (a commit keeps failing: disk full?).
    #[error("the storage writer is busy; it did not answer within {0:?}")]
    WriterBusy(Duration),
    /// The writer is stuck retrying a batch that cannot be committed.
    #[error("storage cannot commit: {0}")]
    Failing(String),
}

/// Storage as the rest of the daemon sees it, whichever backend holds the data.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
    /// Whether the writer commits, and what waits for it.
    health: Arc<Health>,
    /// The newest seq committed when storage was opened.
    opened_at: i64,
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// Calls the same method on whichever backend this is.
macro_rules! dispatch {
    ($self:ident, $b:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($b) => $call,
            Backend::Postgres($b) => $call,
        }
    };
}

/// The writer of readings, for [`Writer::run`].
pub struct Writer(WriterKind);

enum WriterKind {
    Sqlite(sqlite::Writer),
    Postgres(postgres::Writer),
}

impl Writer {
    /// Runs the writer until `items` is closed and drained: every item received is
    /// committed and then acknowledged, so a shutdown loses nothing. When storage keeps
    /// failing after `shutdown`, it gives up: the error says why, and what was not committed
    /// was not acknowledged either, so the broker keeps it.
    pub async fn run(
        self,
        cfg: WriterConfig,
        items: mpsc::Receiver<Item>,
        acks: Box<dyn AckSink>,
        metrics: Arc<Metrics>,
        committed: Committed,
        shutdown: CancellationToken,
    ) -> Result<(), StoreError> {
        match self.0 {
            WriterKind::Sqlite(w) => {
                writer::run(w, cfg, items, acks, metrics, &committed, shutdown).await
            }
            WriterKind::Postgres(w) => w.run(cfg, items, acks, metrics, committed, shutdown).await,
        }
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the database `[storage]` names; returns the
    /// read side and the writer.
    pub async fn open(cfg: &StorageConfig) -> Result<(Store, Writer), StoreError> {
        let health = Arc::new(Health::default());
        let (backend, writer, opened_at) = match cfg.backend() {
            StorageBackend::Sqlite(path) => {
                let (s, w) = sqlite::SqliteStore::open(cfg, path, health.clone()).await?;
                let head = w.head();
                (Backend::Sqlite(s), WriterKind::Sqlite(w), head)
            }
            StorageBackend::Postgres(url) => {
                let (s, w) = postgres::PgStore::open(cfg, url, health.clone()).await?;
                let head = w.head();
                (Backend::Postgres(s), WriterKind::Postgres(w), head)
            }
        };
        let store = Store {
            backend,
            health,
            opened_at,
        };
        Ok((store, Writer(writer)))
    }

    /// The newest seq committed when storage was opened: where the live feed starts, so a
    /// client that connects before the first commit is not taken for one at the start.
    pub fn opened_at(&self) -> i64 {
        self.opened_at
    }

    /// What the writer reports about itself.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Every device.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        dispatch!(self, b => b.devices().await)
    }

    /// The log after `after` in seq order: readings and the other kinds in `kinds`, of the
    /// given devices (all when `None`), at most `limit` entries.
    pub async fn replay(
        &self,
        after: i64,
        devices: Option<&[String]>,
        kinds: Kinds,
        limit: i64,
    ) -> Result<Vec<LogEntry>, StoreError> {
        dispatch!(self, b => b.replay(after, devices, kinds, limit).await)
    }

    /// Presence changes of one device after `after` (seq), with time within [from, to],
    /// in log order.
    pub async fn status_history(&self, page: &Page) -> Result<Vec<EventRow>, StoreError> {
        dispatch!(self, b => b.status_history(page).await)
    }

    /// How far retention has removed the log: (readings, other events). A resume point
    /// below one of them has lost events of that part.
    pub async fn purged_through(&self) -> Result<(i64, i64), StoreError> {
        dispatch!(self, b => b.purged_through().await)
    }

    /// The latest reading of each device (of the given devices, or all) up to seq `through`
    /// (all when `None`), oldest first.
    pub async fn latest(
        &self,
        devices: Option<&[String]>,
        through: Option<i64>,
    ) -> Result<Vec<StoredReading>, StoreError> {
        dispatch!(self, b => b.latest(devices, through).await)
    }

    /// Marks an online device stale (or, with `stale` false, fresh again), with its
    /// `status` event; false when it already was (or, to mark stale, is not online).
    pub async fn mark_stale(&self, device: &str, stale: bool, at: i64) -> Result<bool, StoreError> {
        dispatch!(self, b => b.mark_stale(device, stale, at).await)
    }

    /// Gauges for `/metrics`: devices known, devices online, and open alerts per severity.
    pub async fn gauges(&self) -> Result<Gauges, StoreError> {
        dispatch!(self, b => b.gauges().await)
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>, StoreError> {
        dispatch!(self, b => b.device(id).await)
    }

    /// History of one device: seq after `after`, device time within [from, to], oldest first.
    pub async fn history(&self, page: &Page) -> Result<Vec<StoredReading>, StoreError> {
        dispatch!(self, b => b.history(page).await)
    }

    /// Stored rollup rows of one device and tier (bucket width, ms) with bucket start in
    /// [from, to), of the given fields (every numeric field when `None`), merged in storage
    /// into buckets of `step` (a multiple of the tier) counted from `from`, by bucket.
    pub async fn rollups(
        &self,
        device: &str,
        tier: i64,
        step: i64,
        from: i64,
        to: i64,
        fields: Option<&[String]>,
    ) -> Result<Vec<rollup::RollupRow>, StoreError> {
        dispatch!(self, b => b.rollups(device, tier, step, from, to, fields).await)
    }

    /// Stores a new command and its first event, or returns the existing one for a
    /// repeated idempotency key.
    pub async fn insert_command(&self, command: NewCommand) -> Result<Inserted, StoreError> {
        dispatch!(self, b => b.insert_command(command).await)
    }

    /// Marks a queued command as published; false when it is no longer queued (another
    /// caller, on this instance or another, moved it first).
    pub async fn mark_sent(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        dispatch!(self, b => b.mark_sent(id, at).await)
    }

    /// Cancels a queued command (`cancelled`, with its event); false when it is no longer
    /// queued (sent, or finished, or cancelled by another caller first).
    pub async fn cancel_command(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        dispatch!(self, b => b.cancel_command(id, at).await)
    }

    /// One command.
    pub async fn command(&self, id: &str) -> Result<Option<CommandRow>, StoreError> {
        dispatch!(self, b => b.command(id).await)
    }

    /// Queued commands whose ttl ran out become `expired`; returns (id, device) of those
    /// this call moved.
    pub async fn expire_due(&self, now: i64) -> Result<Vec<(String, String)>, StoreError> {
        dispatch!(self, b => b.expire_due(now).await)
    }

    /// Sent commands without an answer since before `cutoff` become `timeout`; returns
    /// (id, device) of those this call moved.
    pub async fn timeout_due(
        &self,
        cutoff: i64,
        now: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        dispatch!(self, b => b.timeout_due(cutoff, now).await)
    }

    /// Deletes readings received before `cutoff` and events before `events_cutoff`, at most
    /// [`RETENTION_PER_CALL`] rows a call; the count.
    pub async fn retention(&self, cutoff: i64, events_cutoff: i64) -> Result<u64, StoreError> {
        dispatch!(self, b => b.retention(cutoff, events_cutoff).await)
    }

    /// Deletes rollups of the tier `tier` (bucket width, ms) whose bucket starts before
    /// `cutoff`, for the devices after `after` (by id), in one short transaction: at most
    /// [`ROLLUP_SWEEP_DEVICES`] devices and [`RETENTION_CHUNK_ROWS`] rows. Call again from
    /// the answer's `next` until it is `None`. A bucket's all-readings row stays while any
    /// of its readings is still stored: time ranges of raw history find their readings
    /// through it.
    pub async fn rollup_retention(
        &self,
        tier: i64,
        cutoff: i64,
        after: &str,
    ) -> Result<RollupSweep, StoreError> {
        dispatch!(self, b => b.rollup_retention(tier, cutoff, after).await)
    }

    /// Marks devices silent since before `cutoff` offline; the ids this call moved.
    pub async fn presence_sweep(&self, cutoff: i64) -> Result<Vec<String>, StoreError> {
        dispatch!(self, b => b.presence_sweep(cutoff).await)
    }

    /// Queued commands of devices that are online now, oldest first.
    pub async fn queued_for_online(&self, now: i64) -> Result<Vec<CommandRow>, StoreError> {
        dispatch!(self, b => b.queued_for_online(now).await)
    }

    /// The command log, newest first: of one device or all, in the given statuses (all
    /// when empty).
    pub async fn commands(
        &self,
        device: Option<&str>,
        statuses: &[String],
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        dispatch!(self, b => b.commands(device, statuses, limit).await)
    }

    /// Fires, acknowledges or resolves an alert, with its `alert` event, in one transaction.
    pub async fn change_alert(&self, change: AlertChange) -> Result<AlertOutcome, StoreError> {
        dispatch!(self, b => b.change_alert(change).await)
    }

    /// Alerts in the given states (all when empty), of one device or all, newest first.
    pub async fn alerts(
        &self,
        states: &[AlertState],
        device: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AlertRow>, StoreError> {
        dispatch!(self, b => b.alerts(states, device, limit).await)
    }

    /// One alert.
    pub async fn alert(&self, id: i64) -> Result<Option<AlertRow>, StoreError> {
        dispatch!(self, b => b.alert(id).await)
    }

    /// Whether any command is queued or waiting for its answer.
    pub async fn has_open_commands(&self) -> Result<bool, StoreError> {
        dispatch!(self, b => b.has_open_commands().await)
    }

    /// The key that signs session cookies: made once, kept in the database (so every
    /// instance on one database signs with the same key).
    pub async fn session_key(&self) -> Result<Vec<u8>, StoreError> {
        dispatch!(self, b => b.session_key().await)
    }

    /// SQLite: copies committed WAL frames into the database without blocking the writer.
    /// PostgreSQL checkpoints by itself.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(b) => b.checkpoint().await,
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Whether the database answers reads.
    pub async fn readable(&self) -> bool {
        dispatch!(self, b => b.readable().await)
    }

    /// The newest seq committed by any instance, for the tail lag (PostgreSQL); `None` on
    /// SQLite, where this process is the only writer.
    pub async fn head_seq(&self) -> Result<Option<i64>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(b) => b.head().await.map(Some),
        }
    }
}

/// Most rows one retention call deletes; a result this large means more may be due. One
/// chunk a call, so that batches of readings commit between chunks: a pass over millions
/// of rows never holds the writer (or PostgreSQL's append lock) for longer than one. The
/// oldest rows belong to every device, so a chunk touches a page of the device index per
/// row: 250 rows cost about what one batch commit does (2,000 made commit p99 10x idle).
pub const RETENTION_PER_CALL: u64 = RETENTION_CHUNK_ROWS as u64;
/// Rows one retention statement deletes.
pub(crate) const RETENTION_CHUNK_ROWS: i64 = 250;
/// Devices one rollup retention call sweeps (one statement each, one transaction).
pub(crate) const ROLLUP_SWEEP_DEVICES: i64 = 100;

/// What one rollup retention call did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RollupSweep {
    /// Rows deleted.
    pub deleted: u64,
    /// Where the next call starts (the last device done), `None` when every device is.
    pub next: Option<String>,
}

/// One page of a device's history: seq after `after`, time within [from, to], at most
/// `limit` rows, oldest first.
#[derive(Debug, Clone)]
pub struct Page {
    /// Device id.
    pub device: String,
    /// The last seq the caller has.
    pub after: i64,
    /// Earliest time, Unix ms.
    pub from: Option<i64>,
    /// Latest time, Unix ms.
    pub to: Option<i64>,
    /// Most rows.
    pub limit: i64,
    /// Only seqs below this (readings; paging newest first).
    pub before: Option<i64>,
    /// Newest first (readings).
    pub newest_first: bool,
}

/// What `/metrics` reads from storage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Devices ever seen.
    pub devices: i64,
    /// Of them, online (stale ones included).
    pub online: i64,
    /// Of them, online but stale.
    pub stale: i64,
    /// Open (firing or acknowledged) alerts by severity.
    pub open_alerts: Vec<(String, i64)>,
}

/// A device row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRow {
    /// Device id.
    pub id: String,
    /// First message (Unix ms).
    pub first_seen: i64,
    /// Last message (Unix ms).
    pub last_seen: i64,
    /// Presence.
    pub online: bool,
    /// Online, but it has missed several of its usual intervals.
    pub stale: bool,
}

impl DeviceRow {
    /// `online`, `stale` or `offline`.
    pub fn presence(&self) -> &'static str {
        match (self.online, self.stale) {
            (false, _) => "offline",
            (true, true) => "stale",
            (true, false) => "online",
        }
    }
}

/// A stored reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredReading {
    /// Row id and SSE event id.
    pub seq: i64,
    /// Device id.
    pub device: String,
    /// Topic it arrived on.
    pub topic: String,
    /// Device time (Unix ms).
    pub ts: i64,
    /// Receive time (Unix ms).
    pub received_at: i64,
    /// Payload as sent.
    pub payload: Vec<u8>,
    /// `domain::flags` bits.
    pub flags: i64,
}

/// A command to store.
#[derive(Debug)]
pub struct NewCommand {
    /// uuid.
    pub id: String,
    /// Device id.
    pub device: String,
    /// Command name.
    pub name: String,
    /// Parameters, JSON text.
    pub params: String,
    /// `queued` (device known offline) or `sent` (published right after the insert).
    pub status: &'static str,
    /// Idempotency key.
    pub key: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms after which a queued command expires.
    pub expires_at: i64,
    /// Unix ms, for `sent`.
    pub sent_at: Option<i64>,
}

/// How a queued command leaves the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dequeue {
    /// Published.
    Sent,
    /// Cancelled by an operator.
    Cancelled,
}

impl Dequeue {
    /// The command's new status.
    pub fn status(self) -> &'static str {
        match self {
            Dequeue::Sent => "sent",
            Dequeue::Cancelled => "cancelled",
        }
    }

    /// The time column it sets.
    pub(crate) fn column(self) -> &'static str {
        match self {
            Dequeue::Sent => "sent_at",
            Dequeue::Cancelled => "finished_at",
        }
    }
}

/// What inserting a command did.
#[derive(Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A new row.
    New,
    /// The key was used before: that command.
    Existing {
        /// Its id.
        id: String,
        /// Its status.
        status: String,
    },
}

/// A stored command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRow {
    /// uuid.
    pub id: String,
    /// Device id.
    pub device: String,
    /// Name.
    pub name: String,
    /// Parameters, JSON text.
    pub params: String,
    /// queued, sent, acked, failed, timeout or expired.
    pub status: String,
    /// Idempotency key.
    pub key: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub expires_at: i64,
    /// Unix ms.
    pub sent_at: Option<i64>,
    /// Unix ms.
    pub finished_at: Option<i64>,
    /// The device's result, JSON text.
    pub result: Option<String>,
    /// The device's error.
    pub error: Option<String>,
}

/// An entry of the log, as replay reads it.
#[derive(Debug, Clone)]
pub enum LogEntry {
    /// A reading.
    Reading(StoredReading),
    /// A presence or command change.
    Event(EventRow),
}

impl LogEntry {
    /// Its seq.
    pub fn seq(&self) -> i64 {
        match self {
            LogEntry::Reading(r) => r.seq,
            LogEntry::Event(e) => e.seq,
        }
    }

    /// The device it concerns.
    pub fn device(&self) -> &str {
        match self {
            LogEntry::Reading(r) => &r.device,
            LogEntry::Event(e) => &e.device,
        }
    }

    /// Its live feed event, committed (as far as this instance knows) at `committed`.
    pub fn to_event(&self, committed: std::time::Instant) -> feed::Event {
        match self {
            LogEntry::Reading(r) => feed::Event {
                kind: Kind::Reading,
                device: Arc::from(r.device.as_str()),
                seq: r.seq,
                frame: feed::encode_reading(r),
                committed,
            },
            LogEntry::Event(e) => e.to_event(committed),
        }
    }

    /// Its SSE frame, the same bytes the live feed carried.
    pub fn frame(&self) -> bytes::Bytes {
        match self {
            LogEntry::Reading(r) => feed::encode_reading(r),
            LogEntry::Event(e) => feed::encode_event(e.seq, e.kind, &e.data),
        }
    }
}

/// Work for the SQLite writer besides readings (PostgreSQL does it on the pool).
#[derive(Debug)]
pub enum Control {
    /// Delete readings received before `cutoff` and log events before `events_cutoff`
    /// (Unix ms); replies with the count.
    Retention {
        /// Cutoff for readings, Unix ms.
        cutoff: i64,
        /// Cutoff for presence and command events, Unix ms.
        events_cutoff: i64,
        /// Rows deleted.
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Delete rollups of a tier older than a cutoff, for some devices; replies with what
    /// it did.
    RollupRetention {
        /// Bucket width, ms.
        tier: i64,
        /// Bucket starts before this go, Unix ms.
        cutoff: i64,
        /// Devices after this id.
        after: String,
        /// Rows deleted, and where to go on.
        reply: oneshot::Sender<Result<RollupSweep, StoreError>>,
    },
    /// Mark devices silent since before `cutoff` offline; replies with their ids.
    PresenceSweep {
        /// Cutoff, Unix ms.
        cutoff: i64,
        /// Devices marked offline.
        reply: oneshot::Sender<Result<Vec<String>, StoreError>>,
    },
    /// Store a new command.
    InsertCommand {
        /// The command.
        command: NewCommand,
        /// What the insert did.
        reply: oneshot::Sender<Result<Inserted, StoreError>>,
    },
    /// Fire, acknowledge or resolve an alert.
    Alert {
        /// The change.
        change: AlertChange,
        /// What it did.
        reply: oneshot::Sender<Result<AlertOutcome, StoreError>>,
    },
    /// Mark a device stale or fresh.
    Stale {
        /// Device id.
        device: String,
        /// Stale or fresh again.
        stale: bool,
        /// Unix ms.
        at: i64,
        /// Whether it moved.
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Cancel a queued command.
    Cancel {
        /// Command id.
        id: String,
        /// Unix ms.
        at: i64,
        /// Whether it was still queued.
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Mark a queued command sent.
    MarkSent {
        /// Command id.
        id: String,
        /// Unix ms.
        at: i64,
        /// Whether it was still queued.
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// Expire queued commands whose ttl ran out.
    ExpireDue {
        /// Unix ms.
        now: i64,
        /// (id, device) of each.
        reply: oneshot::Sender<Result<Vec<(String, String)>, StoreError>>,
    },
    /// Time out sent commands unanswered since `cutoff`.
    TimeoutDue {
        /// Unix ms.
        cutoff: i64,
        /// Unix ms.
        now: i64,
        /// (id, device) of each.
        reply: oneshot::Sender<Result<Vec<(String, String)>, StoreError>>,
    },
}

impl Control {
    /// Whether nobody waits for the answer any more.
    fn abandoned(&self) -> bool {
        match self {
            Control::Retention { reply, .. } => reply.is_closed(),
            Control::RollupRetention { reply, .. } => reply.is_closed(),
            Control::PresenceSweep { reply, .. } => reply.is_closed(),
            Control::InsertCommand { reply, .. } => reply.is_closed(),
            Control::MarkSent { reply, .. }
            | Control::Cancel { reply, .. }
            | Control::Stale { reply, .. } => reply.is_closed(),
            Control::Alert { reply, .. } => reply.is_closed(),
            Control::ExpireDue { reply, .. } | Control::TimeoutDue { reply, .. } => {
                reply.is_closed()
            }
        }
    }
}
