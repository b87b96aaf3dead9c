//! The SQLite backend: one file in WAL mode, its schema in `migrations/sqlite/`, the single
//! writer ([`writer`]) that every write goes through, and every query. SQL for SQLite lives
//! only here.

mod writer;

pub(crate) use writer::CONTROL_QUEUE;
pub use writer::Writer;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::{mpsc, oneshot};

use crate::config::StorageConfig;
use crate::domain;
use crate::feed::{Kind, Kinds};
use crate::store::alert::{ALERT_COLUMNS, AlertChange, AlertOutcome, AlertRow, AlertState};
use crate::store::dedupe::{self, Recent};
use crate::store::health::Health;
use crate::store::log::EventRow;
use crate::store::rollup::{self, RollupRow};
use crate::store::writer::ASK_DEADLINE;
use crate::store::{
    CommandRow, Control, DeviceRow, Gauges, Inserted, LogEntry, NewCommand, Page, RollupSweep,
    StoreError, StoredReading,
};

/// Read access to the SQLite file, and the writer's work queue.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Work for the writer that needs its connection (a second writing connection would
    /// wait on SQLite's lock, sleeping in steps of up to tens of milliseconds).
    control: mpsc::Sender<Control>,
    /// Whether the writer commits, and what waits for it.
    health: Arc<Health>,
}

crate::store::rows::decoders!(sqlx::sqlite::SqliteRow);

/// Rows per multi-row INSERT into `events`.
const EVENTS_PER_INSERT: usize = 100;

/// Appends `rows` to the log on `conn`, inside the caller's transaction.
pub(crate) async fn append(
    conn: &mut SqliteConnection,
    rows: &[EventRow],
) -> Result<(), StoreError> {
    for chunk in rows.chunks(EVENTS_PER_INSERT) {
        let mut sql = String::from("INSERT INTO events (seq, kind, device, at, data) VALUES ");
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 {
                "(?,?,?,?,?)"
            } else {
                ",(?,?,?,?,?)"
            });
        }
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(r.seq)
                .bind(r.kind.as_str())
                .bind(r.device.clone())
                .bind(r.at)
                .bind(r.data.clone());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A reading's columns, from `READINGS` (each names its source: device and topic).
const READING_COLUMNS: &str = "r.seq AS seq, s.device AS device, s.topic AS topic, r.ts AS ts, \
     r.ts + r.lag AS received_at, CAST(r.payload AS BLOB) AS payload, r.flags AS flags";
/// Readings with their source.
const READINGS: &str = "readings r JOIN sources s ON s.id = r.src";
/// Rows a reader's worker thread may run ahead of the task taking them. sqlx's default
/// (50) hands a long result over in rounds of 50, each a thread wake-up on both sides:
/// a 24-hour series (thousands of rollup rows) spent most of its time switching.
const READER_ROW_BUFFER: usize = 4096;
/// Parallel reads a history page's rows are split into (the readers' pool has four).
const READ_CHUNKS: usize = 4;
/// Fewest rows in one of them: a short page is one query.
const READ_CHUNK_MIN: usize = 16;

/// The newest stored readings, so that one redelivered after a restart is known.
async fn load_recent(conn: &mut SqliteConnection) -> Result<Recent, StoreError> {
    let rows: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT s.device, r.ts, CAST(r.payload AS BLOB) FROM {READINGS} ORDER BY r.seq DESC LIMIT ?"
    )))
    .bind(dedupe::RECENT as i64)
    .fetch_all(&mut *conn)
    .await?;
    let mut recent = Recent::default();
    // One allocation per device, not per reading.
    let mut ids: HashMap<String, Arc<str>> = HashMap::new();
    for (device, ts, payload) in rows.into_iter().rev() {
        let device = ids
            .entry(device)
            .or_insert_with_key(|d| Arc::from(d.as_str()))
            .clone();
        recent.insert(dedupe::id_of(device, ts, &payload));
    }
    Ok(recent)
}

/// Readings rolled up per transaction by the backfill.
const BACKFILL_CHUNK: i64 = 20_000;

/// Rolls up the readings stored before rollups existed (migration 0004 says up to which
/// seq), in chunks that each record their progress, so an interrupted start resumes.
async fn backfill_rollups(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    let meta = |key: &'static str| {
        sqlx::query_scalar::<_, i64>("SELECT CAST(value AS INTEGER) FROM meta WHERE key = ?")
            .bind(key)
    };
    let to = meta("rollups_backfill_to")
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(0);
    let mut done = meta("rollups_backfill_done")
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(0);
    if done >= to {
        return Ok(());
    }
    tracing::info!(
        through_seq = to,
        "rolling up the readings stored before rollups existed"
    );
    while done < to {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {READING_COLUMNS} FROM {READINGS} WHERE r.seq > ? AND r.seq <= ? ORDER BY r.seq LIMIT ?"
        )))
        .bind(done)
        .bind(to)
        .bind(BACKFILL_CHUNK)
        .fetch_all(&mut *tx)
        .await?;
        let readings: Vec<StoredReading> = rows
            .iter()
            .map(reading_from_row)
            .collect::<Result<_, _>>()?;
        done = readings.last().map_or(to, |r| r.seq);
        writer::upsert_rollups(&mut tx, &rollup::of_stored(&readings)).await?;
        sqlx::query("UPDATE meta SET value = ? WHERE key = 'rollups_backfill_done'")
            .bind(done)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    tracing::info!("rollups of the earlier readings done");
    Ok(())
}

/// Binds a page's device, after, from, to and limit, in that order.
fn bind_page<'q>(
    page: &'q Page,
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    q.bind(page.device.as_str())
        .bind(page.after)
        .bind(page.from.unwrap_or(i64::MIN))
        .bind(page.to.unwrap_or(i64::MAX))
        .bind(page.limit)
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
        // When the WAL restarts from its start, the file is cut back to this size: a burst
        // that grew it does not keep its disk space, and a disk that fills while the WAL
        // is reused still fills after at most this many bytes of commits.
        .pragma("journal_size_limit", WAL_KEEP_BYTES.to_string())
        // Checkpoints (with their fsyncs) run from the housekeeping task on a read
        // connection, never inside the writer's commit.
        .pragma("wal_autocheckpoint", "0")
}

/// The WAL size past which the writer restarts it from its start: under sustained load the
/// passive checkpoints never catch up with the newest commit, so SQLite would never reset it
/// by itself and it would grow until the disk is full.
pub(crate) const WAL_LIMIT_BYTES: u64 = 64 << 20;
/// The WAL size kept when it restarts from its start.
const WAL_KEEP_BYTES: u64 = 4 << 20;

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

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database; returns the read side and the
    /// one writer connection.
    pub async fn open(
        cfg: &StorageConfig,
        path: &Path,
        health: Arc<Health>,
    ) -> Result<(SqliteStore, Writer), StoreError> {
        let path_str = path.display().to_string();
        let open_error = |source| StoreError::Open {
            path: path_str.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_error(sqlx::Error::Io(e)))?;
        }
        if path.is_dir() {
            return Err(open_error(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "it is a directory",
            ))));
        }
        set_aside_orphans(path);
        let opts = options(path, cfg.busy_timeout);
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
        match sqlx::migrate!("./migrations/sqlite").run(&mut conn).await {
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
        backfill_rollups(&mut conn).await?;
        let recent = load_recent(&mut conn).await?;
        let sources: HashMap<writer::SourceKey, i64> =
            sqlx::query_as::<_, (i64, String, String)>("SELECT id, device, topic FROM sources")
                .fetch_all(&mut conn)
                .await?
                .into_iter()
                .map(|(id, device, topic)| ((Arc::from(device), Arc::from(topic)), id))
                .collect();
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        // Readers get a smaller page cache than the writer's 32 MiB: four of them resuming
        // clients at once would otherwise hold 128 MiB.
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(
                opts.clone()
                    .pragma("cache_size", "-8192")
                    .row_buffer_size(READER_ROW_BUFFER),
            )
            .await
            .map_err(open_error)?;
        Ok((
            SqliteStore {
                pool,
                control,
                health: health.clone(),
            },
            Writer {
                file_id: file_id(path),
                path: path.to_path_buf(),
                opts,
                conn: Some(conn),
                next_seq,
                insert_sql: HashMap::new(),
                upsert_sql: HashMap::new(),
                online,
                seen_written: HashMap::new(),
                recent,
                sources,
                control_rx,
                health,
                wal_checked: std::time::Instant::now(),
                busy_timeout: cfg.busy_timeout,
            },
        ))
    }

    /// Every device.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StoreError> {
        let rows =
            sqlx::query("SELECT id, first_seen, last_seen, online, stale FROM devices ORDER BY id")
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
        let others: Vec<Kind> = Kind::EVENTS.into_iter().filter(|k| kinds.has(*k)).collect();
        let mut arms = Vec::new();
        if kinds.has(Kind::Reading) {
            let mut sql = format!(
                // The events arm's column order: UNION ALL goes by position.
                "SELECT r.seq AS seq, 'reading' AS kind, s.device AS device, s.topic AS topic, \
                 r.ts AS ts, r.ts + r.lag AS received_at, CAST(r.payload AS BLOB) AS payload, \
                 r.flags AS flags FROM {READINGS} WHERE r.seq > ?"
            );
            if devices.is_some() {
                sql.push_str(" AND r.src IN (SELECT id FROM sources WHERE 1 = 1");
                push_device_filter(&mut sql, devices);
                sql.push(')');
            }
            sql.push_str(" ORDER BY r.seq LIMIT ?");
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
        let rows = bind_page(page, sqlx::query(
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
        // One index seek per source (readings_src is ordered by source, then seq), never
        // a scan of every reading; a device with several topics keeps its newest.
        let mut sql = format!(
            "SELECT {READING_COLUMNS} FROM {READINGS} WHERE r.seq IN (SELECT (SELECT max(x.seq) \
             FROM readings x WHERE x.src = sources.id AND x.seq <= ?) FROM sources WHERE 1 = 1"
        );
        push_device_filter(&mut sql, devices);
        sql.push_str(") ORDER BY r.seq");
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(through.unwrap_or(i64::MAX));
        for d in devices.unwrap_or_default() {
            q = q.bind(d.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        let all: Vec<StoredReading> = rows
            .iter()
            .map(reading_from_row)
            .collect::<Result<_, _>>()?;
        // Oldest first, so the last seq seen per device is its newest.
        let newest: HashMap<String, i64> = all.iter().map(|r| (r.device.clone(), r.seq)).collect();
        Ok(all
            .into_iter()
            .filter(|r| newest.get(&r.device) == Some(&r.seq))
            .collect())
    }

    /// One device.
    pub async fn device(&self, id: &str) -> Result<Option<DeviceRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, first_seen, last_seen, online, stale FROM devices WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(device_from_row).transpose()
    }

    /// History of one device: seq after `after`, device time within [from, to], oldest first.
    /// A time range is found through the 1-minute rollups' seq ranges, then readings_src.
    pub async fn history(&self, page: &Page) -> Result<Vec<StoredReading>, StoreError> {
        let sources: Vec<i64> = sqlx::query_scalar("SELECT id FROM sources WHERE device = ?")
            .bind(page.device.as_str())
            .fetch_all(&self.pool)
            .await?;
        if sources.is_empty() {
            return Ok(Vec::new());
        }
        // A time range is a seq range of the device index: the bounds come from the
        // all-readings rows of the buckets that cover it (an end left open stays open).
        let (lo, hi) = if page.from.is_some() || page.to.is_some() {
            match self.seq_bounds(&page.device, page.from, page.to).await? {
                Some(b) => b,
                None => return Ok(Vec::new()),
            }
        } else {
            (0, i64::MAX)
        };
        // The covering buckets' seq range, as the open bounds the loop moves.
        let mut after = page.after;
        if page.from.is_some() {
            after = after.max(lo.saturating_sub(1));
        }
        let mut before = page.before.unwrap_or(i64::MAX);
        if page.to.is_some() {
            before = before.min(hi.saturating_add(1));
        }
        let (from, to) = (page.from.unwrap_or(i64::MIN), page.to.unwrap_or(i64::MAX));
        // One source (the usual case) is an equality, so the index gives seq order; the
        // seqs come from readings_src alone, which holds (src, seq).
        let marks = vec!["?"; sources.len()].join(",");
        let seqs_sql = format!(
            "SELECT seq FROM readings WHERE src IN ({marks}) AND seq > ? AND seq < ? \
             ORDER BY seq{} LIMIT ?",
            if page.newest_first { " DESC" } else { "" },
        );
        let mut out = Vec::new();
        // A row outside [from, to] (an edge bucket, or a late reading) is dropped and the
        // next seqs are read, until the page is full or the range is done.
        while (out.len() as i64) < page.limit {
            let want = page.limit - out.len() as i64;
            let mut q = sqlx::query_scalar(AssertSqlSafe(seqs_sql.clone()));
            for src in &sources {
                q = q.bind(*src);
            }
            let seqs: Vec<i64> = q
                .bind(after)
                .bind(before)
                .bind(want)
                .fetch_all(&self.pool)
                .await?;
            let (Some(&last), full) = (seqs.last(), seqs.len() as i64 == want) else {
                break;
            };
            if page.newest_first {
                before = last;
            } else {
                after = last;
            }
            out.extend(self.readings_at(&seqs, from, to, page.newest_first).await?);
            if !full {
                break;
            }
        }
        Ok(out)
    }

    /// The readings with these seqs and device time within [from, to], in seq order (or
    /// reversed). A device's readings lie between other devices' all over the file, so
    /// each is a random read: they are fetched in parallel chunks, one per connection,
    /// and a cold cache costs a few disk reads' time instead of one per row.
    async fn readings_at(
        &self,
        seqs: &[i64],
        from: i64,
        to: i64,
        newest_first: bool,
    ) -> Result<Vec<StoredReading>, StoreError> {
        let chunk = seqs.len().div_ceil(READ_CHUNKS).max(READ_CHUNK_MIN);
        let parts = seqs.chunks(chunk).map(|part| async move {
            let marks = vec!["?"; part.len()].join(",");
            let sql = format!(
                "SELECT {READING_COLUMNS} FROM {READINGS} WHERE r.seq IN ({marks}) \
                 AND r.ts >= ? AND r.ts <= ?"
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for seq in part {
                q = q.bind(*seq);
            }
            q.bind(from).bind(to).fetch_all(&self.pool).await
        });
        let mut out = Vec::with_capacity(seqs.len());
        for rows in futures_util::future::try_join_all(parts).await? {
            for row in &rows {
                out.push(reading_from_row(row)?);
            }
        }
        if newest_first {
            out.sort_unstable_by_key(|r| std::cmp::Reverse(r.seq));
        } else {
            out.sort_unstable_by_key(|r| r.seq);
        }
        Ok(out)
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
        let parts = rollup::covering(from, to);
        let arm = "SELECT seq_lo, seq_hi FROM rollups WHERE device = ? AND tier = ? \
                   AND bucket >= ? AND bucket <= ? AND field = ''";
        let sql = format!(
            "SELECT min(seq_lo), max(seq_hi) FROM ({})",
            vec![arm; parts.len()].join(" UNION ALL ")
        );
        let mut q = sqlx::query_as::<_, (Option<i64>, Option<i64>)>(AssertSqlSafe(sql));
        for (tier, lo, hi) in parts {
            q = q.bind(device).bind(tier).bind(lo).bind(hi);
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
        // Numbered like the rest (sqlx counts plain `?` apart from `?N`): ?6 onwards.
        let filter = match fields {
            None => " AND field != ''".to_owned(),
            Some(f) => {
                let marks: Vec<String> = (6..6 + f.len()).map(|i| format!("?{i}")).collect();
                format!(" AND field IN ({})", marks.join(","))
            }
        };
        // A coarser step is merged here, so that a week of minutes (60,000 rows of six
        // fields) crosses into Rust as its 4,000 sums. Buckets split device time, so a
        // step's earliest reading is in its first bucket and its latest in its last. The
        // sums are made once (MATERIALIZED) and drive the join (CROSS JOIN keeps the
        // order): pushed into the join, the grouping would run again for every row.
        let sql = if step > tier {
            format!(
                "WITH g AS MATERIALIZED (SELECT ?3 + (bucket - ?3) / ?5 * ?5 AS start, field, sum(n) AS n, \
                 sum(total) AS total, min(lo) AS lo, max(hi) AS hi, min(bucket) AS b0, \
                 max(bucket) AS b1 FROM rollups \
                 WHERE device = ?1 AND tier = ?2 AND bucket >= ?3 AND bucket < ?4{filter} \
                 GROUP BY start, field) \
                 SELECT ?1 AS device, ?2 AS tier, g.start AS bucket, g.field AS field, g.n AS n, \
                 g.total AS total, g.lo AS lo, g.hi AS hi, f.first_v AS first_v, \
                 f.first_ts AS first_ts, l.last_v AS last_v, l.last_ts AS last_ts, \
                 NULL AS seq_lo, NULL AS seq_hi FROM g \
                 CROSS JOIN rollups f ON f.device = ?1 AND f.tier = ?2 AND f.bucket = g.b0 AND f.field = g.field \
                 CROSS JOIN rollups l ON l.device = ?1 AND l.tier = ?2 AND l.bucket = g.b1 AND l.field = g.field \
                 ORDER BY g.start, g.field"
            )
        } else {
            // The step is bound either way (the field list starts at ?6); here it only
            // has to be used.
            format!(
                "SELECT device, tier, bucket, field, n, total, lo, hi, first_v, first_ts, last_v, \
                 last_ts, seq_lo, seq_hi FROM rollups \
                 WHERE device = ?1 AND tier = ?2 AND bucket >= ?3 AND bucket < ?4 AND ?5 > 0{filter} \
                 ORDER BY bucket, field"
            )
        };
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(device)
            .bind(tier)
            .bind(from)
            .bind(to)
            .bind(step);
        for f in fields.unwrap_or_default() {
            q = q.bind(f.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(rollup_from_row).collect()
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

    /// Marks a device stale or fresh (through the writer); false when nothing moved.
    pub async fn mark_stale(&self, device: &str, stale: bool, at: i64) -> Result<bool, StoreError> {
        let device = device.to_owned();
        self.ask(|reply| Control::Stale {
            device,
            stale,
            at,
            reply,
        })
        .await
    }

    /// Cancels a queued command (through the writer); false when it is no longer queued.
    pub async fn cancel_command(&self, id: &str, at: i64) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.ask(|reply| Control::Cancel { id, at, reply }).await
    }

    /// One command.
    pub async fn command(&self, id: &str) -> Result<Option<CommandRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM commands WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(command_from_row).transpose()
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

    /// Deletes what retention removes (at most `RETENTION_PER_CALL` rows); the count.
    pub async fn retention(&self, cutoff: i64, events_cutoff: i64) -> Result<u64, StoreError> {
        self.ask(|reply| Control::Retention {
            cutoff,
            events_cutoff,
            reply,
        })
        .await
    }

    /// Deletes rollups of a tier older than `cutoff` (see [`crate::store::Store::rollup_retention`]).
    pub async fn rollup_retention(
        &self,
        tier: i64,
        cutoff: i64,
        after: &str,
    ) -> Result<RollupSweep, StoreError> {
        self.ask(|reply| Control::RollupRetention {
            tier,
            cutoff,
            after: after.to_owned(),
            reply,
        })
        .await
    }

    /// Marks devices silent since before `cutoff` offline; their ids.
    pub async fn presence_sweep(&self, cutoff: i64) -> Result<Vec<String>, StoreError> {
        self.ask(|reply| Control::PresenceSweep { cutoff, reply })
            .await
    }
}

impl SqliteStore {
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

    /// The command log, newest first: of one device or all, in the given statuses.
    pub async fn commands(
        &self,
        device: Option<&str>,
        statuses: &[String],
        limit: i64,
    ) -> Result<Vec<CommandRow>, StoreError> {
        let mut sql = String::from("SELECT * FROM commands WHERE 1 = 1");
        if device.is_some() {
            sql.push_str(" AND device = ?");
        }
        if !statuses.is_empty() {
            sql.push_str(" AND status IN (");
            sql.push_str(&vec!["?"; statuses.len()].join(","));
            sql.push(')');
        }
        sql.push_str(" ORDER BY created_at DESC, rowid DESC LIMIT ?");
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(d) = device {
            q = q.bind(d);
        }
        for st in statuses {
            q = q.bind(st.as_str());
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(command_from_row).collect()
    }

    /// Fires, acknowledges or resolves an alert (through the writer).
    pub async fn change_alert(&self, change: AlertChange) -> Result<AlertOutcome, StoreError> {
        self.ask(|reply| Control::Alert { change, reply }).await
    }

    /// Alerts in the given states (all when empty), of one device or all, newest first.
    pub async fn alerts(
        &self,
        states: &[AlertState],
        device: Option<&str>,
        limit: i64,
    ) -> Result<Vec<AlertRow>, StoreError> {
        let mut sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1 = 1");
        if device.is_some() {
            sql.push_str(" AND device = ?");
        }
        if !states.is_empty() {
            sql.push_str(" AND state IN (");
            sql.push_str(&vec!["?"; states.len()].join(","));
            sql.push(')');
        }
        sql.push_str(" ORDER BY id DESC LIMIT ?");
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(d) = device {
            q = q.bind(d);
        }
        for st in states {
            q = q.bind(st.as_str());
        }
        let rows = q.bind(limit).fetch_all(&self.pool).await?;
        rows.iter().map(alert_from_row).collect()
    }

    /// Devices known and online, and open alerts per severity.
    pub async fn gauges(&self) -> Result<Gauges, StoreError> {
        let (devices, online, stale): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(online), 0), coalesce(sum(online AND stale), 0) FROM devices",
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
        let sql = format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE id = ?");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(alert_from_row).transpose()
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

/// Appends `AND device IN (?, ...)` for a device filter.
fn push_device_filter(sql: &mut String, devices: Option<&[String]>) {
    push_in(sql, "device", devices);
}

/// Appends `AND {column} IN (?, ...)` for a device filter.
fn push_in(sql: &mut String, column: &str, devices: Option<&[String]>) {
    if let Some(devices) = devices {
        sql.push_str(" AND ");
        sql.push_str(column);
        sql.push_str(" IN (");
        for i in 0..devices.len() {
            sql.push_str(if i == 0 { "?" } else { ",?" });
        }
        sql.push(')');
    }
}
