//! SQLite storage: the schema (`migrations/`), the single writer task that commits readings
//! in batches and then acknowledges them, retention, presence timeouts, and every query.
//! SQL lives only here. [`health`] is what the writer reports about itself.

pub mod health;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection, Row};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::StorageConfig;
use crate::domain::{self, DeviceId};
use crate::feed::{self, Event, Feed, Kind};
use crate::ingest::{AckSink, AckToken, Item, Reading};
use crate::observability::Metrics;
use health::{FaultKind, Health};

/// Rows per multi-row INSERT: one statement round trip per 250 rows instead of per row.
const ROWS_PER_INSERT: usize = 250;
/// Devices per multi-row upsert.
const DEVICES_PER_UPSERT: usize = 100;
/// How often committed WAL frames are checkpointed into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// Rows deleted per retention statement, so the writer is never held for long.
const RETENTION_CHUNK: i64 = 5_000;

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
        // Checkpoints (with their fsyncs) run from the housekeeping task on a read
        // connection, never inside the writer's commit.
        .pragma("wal_autocheckpoint", "0")
}

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
        let next_seq: i64 = sqlx::query_scalar(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'readings'), 0), \
             coalesce((SELECT max(seq) FROM readings), 0)) + 1",
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
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts.clone())
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

    /// Readings after `after` in seq order, of the given devices (all when `None`).
    pub async fn replay(
        &self,
        after: i64,
        devices: Option<&[String]>,
        limit: i64,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let mut sql = String::from(
            "SELECT seq, device, topic, ts, received_at, CAST(payload AS BLOB) AS payload, flags \
             FROM readings WHERE seq > ?",
        );
        push_device_filter(&mut sql, devices);
        sql.push_str(" ORDER BY seq LIMIT ?");
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(after);
        for d in devices.unwrap_or_default() {
            q = q.bind(d.as_str());
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(reading_from_row).collect()
    }

    /// The latest reading of each device (of the given devices, or all), oldest first.
    pub async fn latest(
        &self,
        devices: Option<&[String]>,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let mut sql = String::from(
            "SELECT seq, device, topic, ts, received_at, CAST(payload AS BLOB) AS payload, flags \
             FROM readings WHERE seq IN (SELECT max(seq) FROM readings GROUP BY device)",
        );
        push_device_filter(&mut sql, devices);
        sql.push_str(" ORDER BY seq");
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for d in devices.unwrap_or_default() {
            q = q.bind(d.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(reading_from_row).collect()
    }

    /// The oldest seq still stored, if any.
    pub async fn oldest_seq(&self) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar("SELECT min(seq) FROM readings")
            .fetch_one(&self.pool)
            .await?)
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
    pub async fn history(
        &self,
        device: &str,
        after: i64,
        from: Option<i64>,
        to: Option<i64>,
        limit: i64,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, device, topic, ts, received_at, CAST(payload AS BLOB) AS payload, flags \
             FROM readings WHERE device = ? AND seq > ? AND ts >= ? AND ts <= ? ORDER BY seq LIMIT ?",
        )
        .bind(device)
        .bind(after)
        .bind(from.unwrap_or(i64::MIN))
        .bind(to.unwrap_or(i64::MAX))
        .bind(limit)
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

/// Runs a command insert on `conn` (the writer's).
async fn insert_command(
    conn: &mut SqliteConnection,
    c: &NewCommand,
) -> Result<Inserted, StoreError> {
    {
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
        .execute(&mut *conn)
        .await;
        match result {
            Ok(_) => Ok(Inserted::New),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() && c.key.is_some() => {
                let (id, status): (String, String) = sqlx::query_as(
                    "SELECT id, status FROM commands WHERE device = ? AND idem_key = ?",
                )
                .bind(&c.device)
                .bind(c.key.as_deref())
                .fetch_one(&mut *conn)
                .await?;
                Ok(Inserted::Existing { id, status })
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Marks a queued command as published on `conn` (the writer's).
async fn mark_sent(conn: &mut SqliteConnection, id: &str, at: i64) -> Result<bool, StoreError> {
    let n = sqlx::query(
        "UPDATE commands SET status = 'sent', sent_at = ? WHERE id = ? AND status = 'queued'",
    )
    .bind(at)
    .bind(id)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Expires queued commands whose ttl ran out, on `conn` (the writer's).
async fn expire_due(
    conn: &mut SqliteConnection,
    now: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "UPDATE commands SET status = 'expired', finished_at = ? \
         WHERE status = 'queued' AND expires_at <= ? RETURNING id, device",
    )
    .bind(now)
    .bind(now)
    .fetch_all(conn)
    .await?)
}

/// Times out sent commands unanswered since `cutoff`, on `conn` (the writer's).
async fn timeout_due(
    conn: &mut SqliteConnection,
    cutoff: i64,
    now: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "UPDATE commands SET status = 'timeout', finished_at = ? \
         WHERE status = 'sent' AND sent_at <= ? RETURNING id, device",
    )
    .bind(now)
    .bind(cutoff)
    .fetch_all(conn)
    .await?)
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
    /// Delete readings received before `cutoff` (Unix ms); replies with the count.
    Retention {
        /// Cutoff, Unix ms.
        cutoff: i64,
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

/// Room for writer work besides readings; senders wait when it is full.
const CONTROL_QUEUE: usize = 256;
/// Most control work done between two batches, so that commands cannot starve readings.
const CONTROL_PER_BATCH: usize = 64;
/// How long a caller waits for the writer before it gets `WriterBusy`.
const ASK_DEADLINE: Duration = Duration::from_secs(10);

/// The one connection that writes.
pub struct Writer {
    /// The database file, and its identity when opened.
    path: PathBuf,
    file_id: Option<(u64, u64)>,
    opts: SqliteConnectOptions,
    /// `None` after a failure: a failed statement may leave a transaction open (a failed
    /// COMMIT does, on SQLITE_FULL), so the connection is closed, which rolls it back, and
    /// a fresh one is opened for the retry.
    conn: Option<SqliteConnection>,
    next_seq: i64,
    insert_sql: HashMap<usize, String>,
    upsert_sql: HashMap<usize, String>,
    /// Presence as stored, so that a device that comes back by sending telemetry gets a
    /// `status` event too.
    online: HashMap<Arc<str>, bool>,
    /// `last_seen` as last written, per device.
    seen_written: HashMap<Arc<str>, i64>,
    /// Work besides readings.
    control_rx: mpsc::Receiver<Control>,
    /// What the writer reports about itself.
    health: Arc<Health>,
}

/// How stale `devices.last_seen` may get for a device that stays online: rewriting the row
/// in every transaction costs a statement and a page per commit, and the presence timeout
/// it serves is at least a second.
const LAST_SEEN_EVERY_MS: i64 = 250;

/// Where committed work is announced.
pub struct Committed {
    /// The seq of the last committed reading.
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
    /// Publishes a committed batch in order: readings numbered from `first_seq`, presence
    /// reports, and an `online` status for a device whose telemetry brings it back.
    /// `online` (presence as stored) is kept up to date even when nobody listens.
    fn publish(&self, batch: &[Item], first_seq: i64, online: &mut HashMap<Arc<str>, bool>) {
        let listening = self.feed.has_subscribers();
        let mut events = Vec::new();
        let mut seq = first_seq;
        for item in batch {
            match item {
                Item::Reading(r, _) => {
                    seq += 1;
                    let back = online.insert(r.device.shared(), true) != Some(true);
                    if !listening {
                        continue;
                    }
                    if back {
                        events.push(status_event(r.device.as_str(), true, r.received_at));
                    }
                    events.push(Event {
                        kind: Kind::Reading,
                        device: r.device.shared(),
                        seq: Some(seq - 1),
                        frame: feed::encode(&feed::ReadingRef {
                            seq: seq - 1,
                            device: r.device.as_str(),
                            topic: &r.topic,
                            ts: r.ts,
                            received_at: r.received_at,
                            payload: &r.payload,
                            flags: r.flags,
                        }),
                    });
                }
                Item::Presence {
                    device,
                    online: now,
                    at,
                    ..
                } => {
                    online.insert(device.shared(), *now);
                    if listening {
                        events.push(status_event(device.as_str(), *now, *at));
                    }
                }
                Item::Skip(_) | Item::CommandAck(_) => {}
            }
        }
        if !events.is_empty() {
            self.feed.push(events);
        }
    }
}

/// A `status` event for the feed.
pub fn status_event(device: &str, online: bool, at: i64) -> Event {
    Event {
        kind: Kind::Status,
        device: Arc::from(device),
        seq: None,
        frame: feed::encode_plain(
            "status",
            &feed::StatusData {
                device,
                online,
                at: domain::format_ms(at),
            },
        ),
    }
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

/// One multi-row INSERT of `chunk`, numbered from `seq` (advanced past it); the SQL
/// text for each row count is made once.
fn insert_readings<'q>(
    cache: &mut HashMap<usize, String>,
    chunk: &[&Reading],
    seq: &mut i64,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    let sql = cache
        .entry(chunk.len())
        .or_insert_with(|| insert_sql(chunk.len()))
        .clone();
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for r in chunk {
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
        *seq += 1;
    }
    q
}

/// How long the writer keeps retrying a failing commit once shutdown began, before it
/// gives up and leaves the unacknowledged readings with the broker.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(3);
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
                _ = probe.tick(), if self.health.fault().is_some() => {
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
                    // A commit into a file that was deleted or replaced meanwhile counts
                    // as failed: it is not acknowledged, and the batch stays ours.
                    let r = r.and_then(|v| self.check_file().map(|()| v));
                    self.put_back(conn, r.is_ok()).await;
                    r
                }
                Err(e) => Err(e),
            };
            match result {
                Ok((readings, presence, last_seq)) => {
                    if attempts > 0 {
                        tracing::info!(attempts, "the batch committed after failing");
                    }
                    // The seq first, so a client resuming from a seq it saw live never finds
                    // it above the newest one.
                    if readings > 0 {
                        let _ = committed.last_seq.send(last_seq);
                    }
                    committed.publish(batch, last_seq - readings as i64 + 1, &mut self.online);
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
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // Shutdown shortens the wait, so the last tries fit its deadline.
                        _ = shutdown.cancelled(), if give_up_at.is_none() => {}
                    }
                    delay = (delay * 2).min(cfg.retry_max);
                }
            }
        }
    }

    /// One transaction for the whole batch. Returns (readings, presence changes, last seq).
    async fn commit(
        &mut self,
        conn: &mut SqliteConnection,
        batch: &[Item],
        changes: &mut Vec<CommandChange>,
    ) -> Result<(u64, u64, i64), StoreError> {
        changes.clear();
        let mut devices: HashMap<&DeviceId, DeviceChange> = HashMap::new();
        let mut command_acks = Vec::new();
        let mut readings: Vec<&Reading> = Vec::with_capacity(batch.len());
        let mut presence = 0u64;
        for item in batch {
            match item {
                Item::Reading(r, _) => {
                    readings.push(r);
                    let c = devices.entry(&r.device).or_insert(DeviceChange {
                        first: r.received_at,
                        last: r.received_at,
                        online: None,
                        presence_at: None,
                        reported: false,
                    });
                    c.last = c.last.max(r.received_at);
                    // A device that sends telemetry is evidently online.
                    if c.online != Some(true) {
                        c.presence_at = Some(r.received_at);
                    }
                    c.online = Some(true);
                }
                Item::Presence {
                    device, online, at, ..
                } => {
                    presence += 1;
                    let c = devices.entry(device).or_insert(DeviceChange {
                        first: *at,
                        last: *at,
                        online: None,
                        presence_at: None,
                        reported: false,
                    });
                    c.last = c.last.max(*at);
                    c.online = Some(*online);
                    c.presence_at = Some(*at);
                    c.reported = true;
                }
                Item::CommandAck(ack) => {
                    let c = devices.entry(&ack.device).or_insert(DeviceChange {
                        first: ack.at,
                        last: ack.at,
                        online: None,
                        presence_at: None,
                        reported: false,
                    });
                    c.last = c.last.max(ack.at);
                    // A device that answers is evidently online.
                    if c.online != Some(true) {
                        c.presence_at = Some(ack.at);
                    }
                    c.online = Some(true);
                    command_acks.push(ack);
                }
                Item::Skip(_) => {}
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
            return Ok((0, 0, self.next_seq - 1));
        }
        let mut seq = self.next_seq;
        if readings.len() <= ROWS_PER_INSERT && devices.is_empty() && command_acks.is_empty() {
            // One statement is atomic on its own: no BEGIN and COMMIT, which would be two
            // more round trips to the SQLite thread (the common case under load, now that
            // last_seen is not rewritten every time).
            insert_readings(&mut self.insert_sql, &readings, &mut seq)
                .execute(&mut *conn)
                .await?;
            self.next_seq = seq;
            return Ok((readings.len() as u64, presence, seq - 1));
        }
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        for chunk in readings.chunks(ROWS_PER_INSERT) {
            insert_readings(&mut self.insert_sql, chunk, &mut seq)
                .execute(&mut *tx)
                .await?;
        }
        // One statement per 100 devices; -1 marks "presence unchanged" (a command ack only).
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
        for ack in command_acks {
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
        tx.commit().await?;
        self.next_seq = seq;
        for (device, c) in devices {
            self.seen_written.insert(device.shared(), c.last);
        }
        Ok((readings.len() as u64, presence, seq - 1))
    }

    /// Runs `work` on the writer's connection: one that fails is closed (rolling back
    /// what it left open) and reported, and the next work opens a fresh one.
    async fn on_conn<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = match self.take_conn().await {
            Ok(mut conn) => {
                let r = work(&mut conn).await;
                self.put_back(conn, r.is_ok()).await;
                r
            }
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) if self.health.fault().is_some() => self.health.committed(0),
            Ok(_) => {}
            Err(e) => self.report_failure(e, 0),
        }
        result
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
                    .on_conn(async |c| insert_command(c, &command).await)
                    .await;
                let _ = reply.send(r);
            }
            Control::MarkSent { id, at, reply } => {
                let r = self.on_conn(async |c| mark_sent(c, &id, at).await).await;
                let _ = reply.send(r);
            }
            Control::ExpireDue { now, reply } => {
                let r = self.on_conn(async |c| expire_due(c, now).await).await;
                let _ = reply.send(r);
            }
            Control::TimeoutDue { cutoff, now, reply } => {
                let r = self
                    .on_conn(async |c| timeout_due(c, cutoff, now).await)
                    .await;
                let _ = reply.send(r);
            }
            Control::Retention { cutoff, reply } => {
                let result = self.on_conn(async |c| retention(c, cutoff).await).await;
                if let Ok(n) = &result {
                    metrics.retention_deleted.fetch_add(*n, Ordering::Relaxed);
                }
                let _ = reply.send(result);
            }
            Control::PresenceSweep { cutoff, reply } => {
                let result = self
                    .on_conn(async |c| presence_sweep(c, cutoff).await)
                    .await;
                if let Ok(ids) = &result {
                    metrics
                        .presence_timeouts
                        .fetch_add(ids.len() as u64, Ordering::Relaxed);
                    let now = domain::now_ms();
                    for id in ids {
                        self.online.insert(Arc::from(id.as_str()), false);
                    }
                    committed.feed.push(
                        ids.iter()
                            .map(|id: &String| status_event(id, false, now))
                            .collect::<Vec<_>>(),
                    );
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

/// Marks devices silent since before `cutoff` offline, on `conn` (the writer's).
async fn presence_sweep(
    conn: &mut SqliteConnection,
    cutoff: i64,
) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "UPDATE devices SET online = 0, status_at = ? WHERE online = 1 AND last_seen < ? RETURNING id",
    )
    .bind(domain::now_ms())
    .bind(cutoff)
    .fetch_all(conn)
    .await?)
}

/// Deletes old readings oldest-first in small chunks, walking the rowid order, on `conn`
/// (the writer's).
async fn retention(conn: &mut SqliteConnection, cutoff: i64) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM readings WHERE seq IN \
             (SELECT seq FROM readings ORDER BY seq LIMIT ?) AND received_at < ?",
        )
        .bind(RETENTION_CHUNK)
        .bind(cutoff)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        total += n;
        if n < RETENTION_CHUNK as u64 {
            return Ok(total);
        }
    }
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

/// Sends retention and presence work to the writer on a timer until cancelled.
pub async fn run_housekeeping(
    store: Store,
    retention: Duration,
    retention_every: Duration,
    presence_timeout: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let control = store.control();
    let mut retention_tick = tokio::time::interval(retention_every);
    let sweep_every =
        (presence_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut sweep_tick = tokio::time::interval(sweep_every);
    let mut checkpoint_tick = tokio::time::interval(CHECKPOINT_EVERY);
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checkpoint_failing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                if let Err(e) = store.checkpoint().await {
                    tracing::warn!(error = %e, "final checkpoint failed");
                }
                return;
            }
            _ = checkpoint_tick.tick() => {
                // Logged when it starts failing and when it works again, not twice a second.
                match store.checkpoint().await {
                    Err(e) if !checkpoint_failing => {
                        checkpoint_failing = true;
                        tracing::warn!(error = %e, "WAL checkpoint failed; commits go on into the WAL, retrying");
                    }
                    Ok(()) if checkpoint_failing => {
                        checkpoint_failing = false;
                        tracing::info!("WAL checkpoint works again");
                    }
                    _ => {}
                }
            }
            _ = retention_tick.tick() => {
                let cutoff = domain::now_ms() - retention.as_millis() as i64;
                let (reply, rx) = oneshot::channel();
                if control.send(Control::Retention { cutoff, reply }).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(Ok(n)) if n > 0 => tracing::info!(deleted = n, "retention removed old readings"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "retention failed; will retry"),
                    _ => {}
                }
            }
            _ = sweep_tick.tick() => {
                let cutoff = domain::now_ms() - presence_timeout.as_millis() as i64;
                let (reply, rx) = oneshot::channel();
                if control.send(Control::PresenceSweep { cutoff, reply }).await.is_err() {
                    return;
                }
                match rx.await {
                    Ok(Ok(ids)) if !ids.is_empty() => tracing::info!(devices = ?ids, "marked offline after silence"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "presence sweep failed; will retry"),
                    _ => {}
                }
            }
        }
    }
}
