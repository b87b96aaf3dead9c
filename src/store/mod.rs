//! SQLite storage: the schema (`migrations/`), the single writer task that commits readings
//! in batches and then acknowledges them, retention, presence timeouts, and every query.
//! SQL lives only here. [`health`] is what the writer reports about itself.

pub mod health;
mod housekeeping;
pub mod log;
mod writer;

pub use housekeeping::run_housekeeping;
pub use writer::{CommandChange, Committed, Writer, WriterConfig};

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::config::StorageConfig;
use crate::domain;
use crate::feed::{self, Kind, Kinds};
use health::Health;
use log::EventRow;
use writer::{ASK_DEADLINE, CONTROL_QUEUE};

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
        "the database {path} was written by a newer telebridge (it has schema migration {version}, which this build does not know): run that version, or point [storage] path at another file"
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

/// Read access to the database, shared by the HTTP side.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
    /// Work for the writer that needs its connection (a second writing connection would
    /// wait on SQLite's lock, sleeping in steps of up to tens of milliseconds).
    control: mpsc::Sender<Control>,
    /// Whether the writer commits, and what waits for it.
    health: Arc<Health>,
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
}

impl Page {
    /// Binds device, after, from, to and limit, in that order.
    fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
        q.bind(self.device.as_str())
            .bind(self.after)
            .bind(self.from.unwrap_or(i64::MIN))
            .bind(self.to.unwrap_or(i64::MAX))
            .bind(self.limit)
    }
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

fn options(path: &Path, busy_timeout: Duration) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // In WAL mode NORMAL survives a process crash (kill -9); only an OS crash or power
        // loss can roll back the last commits.
        .synchronous(SqliteSynchronous::Normal)
        // Only another process (someone inspecting the file) can hold the lock: waiting a
        // little rides out a short look, and a long one becomes a reported fault.
        .busy_timeout(busy_timeout)
        .foreign_keys(false)
        // Multi-row INSERTs inside a transaction keep a statement journal; in memory it
        // does not spill to a temp file on every batch.
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-32768")
        // After the WAL restarts from its start, the file is cut back to this size.
        .pragma("journal_size_limit", WAL_LIMIT_BYTES.to_string())
        // Checkpoints (with their fsyncs) run from the housekeeping task on a read
        // connection, never inside the writer's commit.
        .pragma("wal_autocheckpoint", "0")
}

/// The WAL size past which the writer restarts it from its start: under sustained load the
/// passive checkpoints never catch up with the newest commit, so SQLite would never reset it
/// by itself and it would grow until the disk is full.
pub(crate) const WAL_LIMIT_BYTES: u64 = 64 << 20;

/// The file's identity (device, inode), to notice it being deleted or replaced.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A database that is gone may have left its `-wal` and `-shm` files behind (after a
/// kill -9): SQLite would replay that old WAL into the new, empty file. They are moved aside.
fn set_aside_orphans(path: &Path) {
    if path.exists() {
        return;
    }
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let side = PathBuf::from(side);
        if side.exists() {
            let mut aside = side.as_os_str().to_owned();
            aside.push(format!(".orphaned-{}", domain::now_ms()));
            match std::fs::rename(&side, &aside) {
                Ok(()) => {
                    tracing::warn!(file = %side.display(), moved_to = %PathBuf::from(&aside).display(), "the database file is missing but its WAL side file is not; moved it aside")
                }
                Err(e) => {
                    tracing::warn!(file = %side.display(), error = %e, "cannot move an orphaned WAL side file aside")
                }
            }
        }
    }
}

/// Whether an error means the file is not (or no longer) an SQLite database.
fn not_a_database(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
            matches!(code & 0xff, 11 | 26) // SQLITE_CORRUPT, SQLITE_NOTADB
        }
        _ => false,
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the database; returns the read side and the
    /// one writer connection.
    pub async fn open(cfg: &StorageConfig) -> Result<(Store, Writer), StoreError> {
        let path_str = cfg.path.display().to_string();
        let open_error = |source| StoreError::Open {
            path: path_str.clone(),
            source,
        };
        if let Some(dir) = cfg.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_error(sqlx::Error::Io(e)))?;
        }
        if cfg.path.is_dir() {
            return Err(open_error(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "it is a directory",
            ))));
        }
        set_aside_orphans(&cfg.path);
        let opts = options(&cfg.path, cfg.busy_timeout);
        let classify = |source: sqlx::Error| {
            if not_a_database(&source) {
                StoreError::NotDatabase {
                    path: path_str.clone(),
                    source,
                }
            } else {
                open_error(source)
            }
        };
        let mut conn = SqliteConnection::connect_with(&opts)
            .await
            .map_err(classify)?;
        match sqlx::migrate!("./migrations").run(&mut conn).await {
            Ok(()) => {}
            Err(sqlx::migrate::MigrateError::VersionMissing(version)) => {
                return Err(StoreError::Newer {
                    path: path_str,
                    version,
                });
            }
            Err(sqlx::migrate::MigrateError::Execute(e)) => return Err(classify(e)),
            Err(e) => return Err(e.into()),
        }
        // Readings and events share one counter: the next seq is past both tables, and past
        // what AUTOINCREMENT remembers of rows retention deleted.
        let next_seq: i64 = sqlx::query_scalar(
            "SELECT max(coalesce((SELECT max(seq) FROM sqlite_sequence WHERE name IN ('readings', 'events')), 0), \
             coalesce((SELECT max(seq) FROM readings), 0), \
             coalesce((SELECT max(seq) FROM events), 0)) + 1",
        )
        .fetch_one(&mut conn)
        .await?;
        let online: HashMap<Arc<str>, bool> =
            sqlx::query_as::<_, (String, bool)>("SELECT id, online FROM devices")
                .fetch_all(&mut conn)
                .await?
                .into_iter()
                .map(|(id, online)| (Arc::from(id), online))
                .collect();
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        // Readers get a smaller page cache than the writer's 32 MiB: four of them resuming
        // clients at once would otherwise hold 128 MiB.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone().pragma("cache_size", "-8192"))
            .await
            .map_err(open_error)?;
        let health = Arc::new(Health::default());
        Ok((
            Store {
                pool,
                control,
                health: health.clone(),
            },
            Writer {
                file_id: file_id(&cfg.path),
                path: cfg.path.clone(),
                opts,
                conn: Some(conn),
                next_seq,
                insert_sql: HashMap::new(),
                upsert_sql: HashMap::new(),
                online,
                seen_written: HashMap::new(),
                control_rx,
                health,
                wal_checked: std::time::Instant::now(),
                busy_timeout: cfg.busy_timeout,
            },
        ))
    }

    /// What the writer reports about itself.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Every device.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let rows = sqlx::query("SELECT id, first_seen, last_seen, online FROM devices ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(device_from_row).collect()
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
        let others: Vec<Kind> = [Kind::Status, Kind::Command]
            .into_iter()
            .filter(|k| kinds.has(*k))
            .collect();
        let mut arms = Vec::new();
        if kinds.has(Kind::Reading) {
            let mut sql = String::from(
                "SELECT seq, 'reading' AS kind, device, topic, ts, received_at, \
                 CAST(payload AS BLOB) AS payload, flags FROM readings WHERE seq > ?",
            );
            push_device_filter(&mut sql, devices);
            sql.push_str(" ORDER BY seq LIMIT ?");
            arms.push((sql, false));
        }
        if !others.is_empty() {
            let mut sql = String::from(
                "SELECT seq, kind, device, '' AS topic, at AS ts, at AS received_at, \
                 CAST(data AS BLOB) AS payload, 0 AS flags FROM events WHERE seq > ?",
            );
            push_device_filter(&mut sql, devices);
            sql.push_str(" AND kind IN (");
            for (i, _) in others.iter().enumerate() {
                sql.push_str(if i == 0 { "?" } else { ",?" });
            }
            sql.push_str(") ORDER BY seq LIMIT ?");
            arms.push((sql, true));
        }
        if arms.is_empty() {
            return Ok(Vec::new());
        }
        // Each arm is bounded and ordered on its own; the outer query merges them.
        let sql = arms
            .iter()
            .map(|(a, _)| format!("SELECT * FROM ({a})"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
            + " ORDER BY seq LIMIT ?";
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for (_, is_events) in &arms {
            q = q.bind(after);
            for d in devices.unwrap_or_default() {
                q = q.bind(d.as_str());
            }
            if *is_events {
                for k in &others {
                    q = q.bind(k.as_str());
                }
            }
            q = q.bind(limit);
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// Presence changes of one device after `after` (seq), with time within [from, to],
    /// in log order.
    pub async fn status_history(&self, page: &Page) -> Result<Vec<EventRow>, StoreError> {
        let rows = page
            .bind(sqlx::query(
                "SELECT seq, kind, device, at AS ts, at AS received_at, CAST(data AS BLOB) AS payload \
                 FROM events WHERE device = ? AND kind = 'status' AND seq > ? AND at >= ? AND at <= ? \
                 ORDER BY seq LIMIT ?",
            ))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// How far retention has removed the log: (readings, other events). A resume point
    /// below one of them has lost events of that part.
    pub async fn purged_through(&self) -> Result<(i64, i64), StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT key, CAST(value AS INTEGER) FROM meta \
             WHERE key IN ('readings_purged_through', 'events_purged_through')",
        )
        .fetch_all(&self.pool)
        .await?;
        let get = |k: &str| rows.iter().find(|(key, _)| key == k).map_or(0, |(_, v)| *v);
        Ok((get("readings_purged_through"), get("events_purged_through")))
    }

    /// The latest reading of each device (of the given devices, or all) up to seq `through`
    /// (all when `None`), oldest first.
    pub async fn latest(
        &self,
        devices: Option<&[String]>,
        through: Option<i64>,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let mut sql = String::from(
            "SELECT seq, device, topic, ts, received_at, CAST(payload AS BLOB) AS payload, flags \
             FROM readings WHERE seq IN (SELECT max(seq) FROM readings WHERE seq <= ? GROUP BY device)",
        );
        push_device_filter(&mut sql, devices);
        sql.push_str(" ORDER BY seq");
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(through.unwrap_or(i64::MAX));
        for d in devices.unwrap_or_default() {
            q = q.bind(d.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(reading_from_row).collect()
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>, StoreError> {
        let row = sqlx::query("SELECT id, first_seen, last_seen, online FROM devices WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// History of one device: seq after `after`, device time within [from, to], oldest first.
    pub async fn history(&self, page: &Page) -> Result<Vec<StoredReading>, StoreError> {
        let rows = page
            .bind(sqlx::query(
                "SELECT seq, device, topic, ts, received_at, CAST(payload AS BLOB) AS payload, flags \
                 FROM readings WHERE device = ? AND seq > ? AND ts >= ? AND ts <= ? ORDER BY seq LIMIT ?",
            ))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(reading_from_row).collect()
    }

    /// Hands work to the writer and waits for its answer.
    async fn ask<T>(
        &self,
        work: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Control,
    ) -> Result<T, StoreError> {
        // While the writer retries a batch it cannot commit, work queued behind it would
        // only wait out the deadline: say why at once.
        if let Some(f) = self.health.stuck() {
            return Err(StoreError::Failing(format!(
                "{} since {}",
                f.kind.as_str(),
                domain::format_ms(f.since_ms)
            )));
        }
        let (reply, rx) = oneshot::channel();
        let answer = async {
            self.control
                .send(work(reply))
                .await
                .map_err(|_| StoreError::WriterGone)?;
            rx.await.map_err(|_| StoreError::WriterGone)?
        };
        tokio::time::timeout(ASK_DEADLINE, answer)
            .await
            .map_err(|_| StoreError::WriterBusy(ASK_DEADLINE))?
    }

    /// Stores a new command (through the writer), or returns the existing one for a repeated
    /// idempotency key.
    pub async fn insert_command(&self, command: NewCommand) -> Result<Inserted, StoreError> {
        self.ask(|reply| Control::InsertCommand { command, reply })
            .await
    }

    /// Marks a queued command as published; false when it is no longer queued.
    pub async fn mark_sent(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.ask(|reply| Control::MarkSent { id, at, reply }).await
    }

    /// Queued commands whose ttl ran out become `expired`; returns (id, device).
    pub async fn expire_due(&self, now: i64) -> Result<Vec<(String, String)>, StoreError> {
        self.ask(|reply| Control::ExpireDue { now, reply }).await
    }

    /// Sent commands without an answer since before `cutoff` become `timeout`.
    pub async fn timeout_due(
        &self,
        cutoff: i64,
        now: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.ask(|reply| Control::TimeoutDue { cutoff, now, reply })
            .await
    }

    /// The writer's work queue, for housekeeping.
    pub fn control(&self) -> mpsc::Sender<Control> {
        self.control.clone()
    }
}

impl Store {
    /// Queued commands of devices that are online now, oldest first.
    pub async fn queued_for_online(&self, now: i64) -> Result<Vec<CommandRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.* FROM commands c JOIN devices d ON d.id = c.device \
             WHERE c.status = 'queued' AND d.online = 1 AND c.expires_at > ? ORDER BY c.created_at LIMIT 1000",
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
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        let rows = match device {
            Some(d) => {
                sqlx::query("SELECT * FROM commands WHERE device = ? ORDER BY created_at DESC, rowid DESC LIMIT ?")
                    .bind(d)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM commands ORDER BY created_at DESC, rowid DESC LIMIT ?")
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
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

    /// The key that signs session cookies: made once, kept in the database.
    pub async fn session_key(&self) -> Result<Vec<u8>, StoreError> {
        let fresh: [u8; 32] = rand::random();
        sqlx::query("INSERT OR IGNORE INTO meta (key, value) VALUES ('session_key', ?)")
            .bind(fresh.to_vec())
            .execute(&self.pool)
            .await?;
        Ok(
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'session_key'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Copies committed WAL frames into the database without blocking the writer.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        // A checkpoint that cannot write (disk full) answers with busy = 1 or an error.
        let result = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::from);
        match &result {
            Ok(_) => self.health.checkpoint(None),
            Err(e) => self.health.checkpoint(Some(e.to_string())),
        }
        result.map(|_| ())
    }

    /// Whether the database answers reads.
    pub async fn readable(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
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

fn command_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<CommandRow, StoreError> {
    Ok(CommandRow {
        id: r.try_get("id")?,
        device: r.try_get("device")?,
        name: r.try_get("name")?,
        params: r.try_get("params")?,
        status: r.try_get("status")?,
        key: r.try_get("idem_key")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        sent_at: r.try_get("sent_at")?,
        finished_at: r.try_get("finished_at")?,
        result: r.try_get("result")?,
        error: r.try_get("error")?,
    })
}

/// Appends `AND device IN (?, ...)` for a device filter.
fn push_device_filter(sql: &mut String, devices: Option<&[String]>) {
    if let Some(devices) = devices {
        sql.push_str(" AND device IN (");
        for i in 0..devices.len() {
            sql.push_str(if i == 0 { "?" } else { ",?" });
        }
        sql.push(')');
    }
}

fn device_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<DeviceRow, StoreError> {
    Ok(DeviceRow {
        id: r.try_get("id")?,
        first_seen: r.try_get("first_seen")?,
        last_seen: r.try_get("last_seen")?,
        online: r.try_get::<i64, _>("online")? != 0,
    })
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

    /// Its SSE frame, the same bytes the live feed carried.
    pub fn frame(&self) -> bytes::Bytes {
        match self {
            LogEntry::Reading(r) => feed::encode_reading(r),
            LogEntry::Event(e) => feed::encode_event(e.seq, e.kind, &e.data),
        }
    }
}

fn entry_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<LogEntry, StoreError> {
    let kind: String = r.try_get("kind")?;
    if kind == "reading" {
        reading_from_row(r).map(LogEntry::Reading)
    } else {
        event_from_row(r).map(LogEntry::Event)
    }
}

fn event_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<EventRow, StoreError> {
    let kind: String = r.try_get("kind")?;
    let payload: Vec<u8> = r.try_get("payload")?;
    Ok(EventRow {
        seq: r.try_get("seq")?,
        kind: Kind::parse(&kind).unwrap_or(Kind::Status),
        device: Arc::from(r.try_get::<String, _>("device")?),
        at: r.try_get("ts")?,
        data: String::from_utf8(payload)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    })
}

fn reading_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<StoredReading, StoreError> {
    Ok(StoredReading {
        seq: r.try_get("seq")?,
        device: r.try_get("device")?,
        topic: r.try_get("topic")?,
        ts: r.try_get("ts")?,
        received_at: r.try_get("received_at")?,
        payload: r.try_get("payload")?,
        flags: r.try_get("flags")?,
    })
}

/// Work for the writer besides readings.
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
            Control::PresenceSweep { reply, .. } => reply.is_closed(),
            Control::InsertCommand { reply, .. } => reply.is_closed(),
            Control::MarkSent { reply, .. } => reply.is_closed(),
            Control::ExpireDue { reply, .. } | Control::TimeoutDue { reply, .. } => {
                reply.is_closed()
            }
        }
    }
}
