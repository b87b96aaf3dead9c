//! The writer's health, as `/readyz`, `/metrics` and the systemd watchdog see it: whether
//! it can commit, since when it cannot and why, and how much is waiting meanwhile.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::domain;

/// Why the writer cannot commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The filesystem is full (`SQLITE_FULL`).
    DiskFull,
    /// The file or filesystem does not accept writes (`SQLITE_READONLY`, `EPERM`, `EROFS`).
    ReadOnly,
    /// Another process holds the database's write lock (`SQLITE_BUSY`).
    Locked,
    /// The file at `[storage] path` was deleted or replaced under the daemon.
    Replaced,
    /// The database server cannot be reached (PostgreSQL).
    Unreachable,
    /// Any other I/O or database error.
    Error,
}

impl FaultKind {
    /// The label in `/metrics` and the reason's first words in `/readyz`.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::DiskFull => "disk full",
            FaultKind::ReadOnly => "read-only",
            FaultKind::Locked => "locked by another process",
            FaultKind::Replaced => "database file deleted or replaced",
            FaultKind::Unreachable => "database server unreachable",
            FaultKind::Error => "error",
        }
    }

    /// Every kind, for the metrics.
    pub const ALL: [FaultKind; 6] = [
        FaultKind::DiskFull,
        FaultKind::ReadOnly,
        FaultKind::Locked,
        FaultKind::Replaced,
        FaultKind::Unreachable,
        FaultKind::Error,
    ];

    /// The `/metrics` label value.
    pub fn label(self) -> &'static str {
        match self {
            FaultKind::DiskFull => "disk_full",
            FaultKind::ReadOnly => "read_only",
            FaultKind::Locked => "locked",
            FaultKind::Replaced => "replaced",
            FaultKind::Unreachable => "unreachable",
            FaultKind::Error => "error",
        }
    }
}

/// A fault in force.
#[derive(Debug, Clone)]
pub struct Fault {
    /// What kind.
    pub kind: FaultKind,
    /// Unix ms of the first failure in this run of failures.
    pub since_ms: i64,
    /// The last error, as the database said it.
    pub message: String,
}

#[derive(Debug)]
struct State {
    fault: Option<Fault>,
    /// The WAL checkpoint's last error, while it keeps failing (not fatal: commits go on
    /// into the WAL).
    checkpoint: Option<Fault>,
    /// Readings and other items taken by the writer or queued for it, not yet committed.
    waiting: usize,
    /// Unix ms of the oldest of them.
    oldest_ms: Option<i64>,
    /// The last commit, or the last moment the writer had nothing to do.
    progress: Instant,
    /// Batches that failed to commit, in all.
    failures: u64,
    /// Since when the writer is inside one piece of work besides a batch (a command write,
    /// retention): one that hangs must stop the watchdog too.
    work_since: Option<Instant>,
}

/// Shared by the writer (which reports) and the HTTP side and watchdog (which read).
#[derive(Debug)]
pub struct Health(Mutex<State>);

impl Default for Health {
    fn default() -> Self {
        Health(Mutex::new(State {
            fault: None,
            checkpoint: None,
            waiting: 0,
            oldest_ms: None,
            progress: Instant::now(),
            failures: 0,
            work_since: None,
        }))
    }
}

/// What readiness reports about storage.
#[derive(Debug, Clone)]
pub struct Report {
    /// Whether the writer is committing (no fault, no stall).
    pub ok: bool,
    /// One line for people: `ok`, or what is wrong since when and what waits.
    pub text: String,
    /// The fault in force.
    pub fault: Option<Fault>,
    /// The checkpoint's error, while it keeps failing.
    pub checkpoint: Option<String>,
    /// Items not yet committed.
    pub waiting: usize,
    /// Age of the oldest of them.
    pub oldest_age: Duration,
    /// Failed batch commits, in all.
    pub failures: u64,
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer took work (or more arrived): `waiting` items, the oldest from `oldest_ms`.
    pub fn busy(&self, waiting: usize, oldest_ms: i64) {
        let mut s = self.state();
        if s.waiting == 0 {
            // Stalls are measured from when work arrived, not from the last commit long ago.
            s.progress = Instant::now();
        }
        s.waiting = waiting;
        s.oldest_ms = Some(s.oldest_ms.map_or(oldest_ms, |o| o.min(oldest_ms)));
    }

    /// A commit went through; `waiting` items remain (0: idle).
    pub fn committed(&self, waiting: usize) {
        let mut s = self.state();
        if let Some(f) = s.fault.take() {
            tracing::info!(fault = f.kind.as_str(), since = %domain::format_ms(f.since_ms), "storage recovered; committing again");
        }
        s.progress = Instant::now();
        s.waiting = waiting;
        // The next batch reports its own oldest item.
        s.oldest_ms = None;
    }

    /// The writer starts work besides a batch.
    pub fn begin_work(&self) {
        self.state().work_since = Some(Instant::now());
    }

    /// That work is over (done or failed).
    pub fn end_work(&self) {
        let mut s = self.state();
        s.work_since = None;
        s.progress = Instant::now();
    }

    /// Whether readings have waited longer than `age`, or a fault is in force (a backlog).
    pub fn backlog(&self, age: Duration) -> bool {
        let s = self.state();
        s.fault.is_some()
            || s.oldest_ms
                .is_some_and(|o| domain::now_ms() - o > age.as_millis() as i64)
    }

    /// The writer has nothing to do.
    pub fn idle(&self) {
        let mut s = self.state();
        s.progress = Instant::now();
        s.waiting = 0;
        s.oldest_ms = None;
    }

    /// A commit failed with `kind`; returns the fault in force (its `since` is kept across
    /// repeated failures of the same run).
    pub fn failed(&self, kind: FaultKind, message: String) -> Fault {
        let mut s = self.state();
        s.failures += 1;
        let since_ms = match &s.fault {
            // The first failure of a run dates it; a later one of another kind keeps it too.
            Some(f) => f.since_ms,
            None => domain::now_ms(),
        };
        let fault = Fault {
            kind,
            since_ms,
            message,
        };
        s.fault = Some(fault.clone());
        fault
    }

    /// The checkpoint failed (`Some`) or succeeded (`None`).
    pub fn checkpoint(&self, error: Option<String>) {
        let mut s = self.state();
        s.checkpoint = match (error, s.checkpoint.take()) {
            (None, _) => None,
            (Some(message), Some(f)) => Some(Fault { message, ..f }),
            (Some(message), None) => Some(Fault {
                kind: FaultKind::Error,
                since_ms: domain::now_ms(),
                message,
            }),
        };
    }

    /// Whether a fault is in force.
    pub fn faulty(&self) -> bool {
        self.state().fault.is_some()
    }

    /// The fault in force, if any.
    pub fn fault(&self) -> Option<Fault> {
        self.state().fault.clone()
    }

    /// The fault in force while work waits behind it (the writer is retrying a batch).
    pub fn stuck(&self) -> Option<Fault> {
        let s = self.state();
        s.fault.clone().filter(|_| s.waiting > 0)
    }

    /// Whether the writer is making progress: it has nothing to do, or it committed within
    /// `stall`. The systemd watchdog is fed only while this holds.
    pub fn progressing(&self, stall: Duration) -> bool {
        let s = self.state();
        s.fault
            .as_ref()
            .is_none_or(|f| f.kind != FaultKind::Replaced)
            && (s.waiting == 0 || s.progress.elapsed() < stall)
            && s.work_since.is_none_or(|w| w.elapsed() < stall)
    }

    /// The state for `/readyz`: not ok while a fault is in force, or while work waits and
    /// nothing was committed for `stall`.
    pub fn report(&self, stall: Duration) -> Report {
        let s = self.state();
        let oldest_age = s
            .oldest_ms
            .map(|o| Duration::from_millis((domain::now_ms() - o).max(0) as u64))
            .unwrap_or_default();
        let stalled = (s.waiting > 0 && s.progress.elapsed() >= stall)
            || s.work_since.is_some_and(|w| w.elapsed() >= stall);
        let ok = s.fault.is_none() && !stalled;
        let text = match &s.fault {
            Some(f) => format!(
                "{} since {}, {} waiting: {}",
                f.kind.as_str(),
                domain::format_ms(f.since_ms),
                s.waiting,
                f.message
            ),
            None if stalled => format!(
                "no commit for {:.1}s, {} waiting",
                s.progress.elapsed().as_secs_f64(),
                s.waiting
            ),
            None => "ok".into(),
        };
        Report {
            ok,
            text,
            fault: s.fault.clone(),
            checkpoint: s.checkpoint.as_ref().map(|f| {
                format!(
                    "failing since {}: {}",
                    domain::format_ms(f.since_ms),
                    f.message
                )
            }),
            waiting: s.waiting,
            oldest_age,
            failures: s.failures,
        }
    }
}

/// Classifies a PostgreSQL error by its SQLSTATE, or a connection failure.
pub fn classify_postgres(e: &sqlx::Error) -> FaultKind {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("53100") => FaultKind::DiskFull,
            Some("25006") => FaultKind::ReadOnly,
            Some("55P03" | "40P01" | "57014") => FaultKind::Locked,
            Some(c) if c.starts_with("08") || c.starts_with("57P") => FaultKind::Unreachable,
            _ => FaultKind::Error,
        },
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => {
            FaultKind::Unreachable
        }
        _ => FaultKind::Error,
    }
}

/// Classifies a database error by its SQLite result code.
pub fn classify(e: &sqlx::Error) -> FaultKind {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(0);
            // Extended codes carry the primary code in their low byte.
            match code & 0xff {
                13 => FaultKind::DiskFull,
                8 => FaultKind::ReadOnly,
                5 | 6 => FaultKind::Locked,
                10 if db.message().contains("disk is full") => FaultKind::DiskFull,
                _ => FaultKind::Error,
            }
        }
        sqlx::Error::Io(io) => match io.raw_os_error() {
            Some(28) => FaultKind::DiskFull,          // ENOSPC
            Some(1 | 13 | 30) => FaultKind::ReadOnly, // EPERM, EACCES, EROFS
            _ => FaultKind::Error,
        },
        _ => FaultKind::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_writer_feeds_the_watchdog() {
        let h = Health::default();
        h.idle();
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.progressing(Duration::from_millis(10)));
        assert!(h.report(Duration::from_millis(10)).ok);
    }

    #[test]
    fn a_writer_with_work_and_no_commit_stops_feeding_the_watchdog() {
        let h = Health::default();
        h.busy(100, domain::now_ms());
        assert!(h.progressing(Duration::from_millis(200)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!h.progressing(Duration::from_millis(10)));
        let r = h.report(Duration::from_millis(10));
        assert!(!r.ok);
        assert!(r.text.starts_with("no commit for"), "{}", r.text);
        h.committed(0);
        assert!(h.progressing(Duration::from_millis(10)));
    }

    #[test]
    fn a_fault_is_reported_with_its_first_time_until_a_commit_clears_it() {
        let h = Health::default();
        h.busy(5, domain::now_ms());
        let first = h.failed(FaultKind::DiskFull, "database or disk is full".into());
        std::thread::sleep(Duration::from_millis(5));
        let again = h.failed(FaultKind::DiskFull, "database or disk is full".into());
        assert_eq!(first.since_ms, again.since_ms);
        let r = h.report(Duration::from_secs(60));
        assert!(!r.ok);
        assert!(r.text.starts_with("disk full since "), "{}", r.text);
        assert!(r.text.contains("5 waiting"), "{}", r.text);
        assert_eq!(r.failures, 2);
        h.committed(0);
        let r = h.report(Duration::from_secs(60));
        assert!(r.ok && r.fault.is_none(), "{r:?}");
    }

    #[test]
    fn work_that_hangs_outside_a_batch_stops_feeding_the_watchdog() {
        let h = Health::default();
        h.idle();
        h.begin_work();
        std::thread::sleep(Duration::from_millis(30));
        assert!(!h.progressing(Duration::from_millis(10)));
        assert!(!h.report(Duration::from_millis(10)).ok);
        h.end_work();
        assert!(h.progressing(Duration::from_millis(10)));
    }

    #[test]
    fn a_replaced_file_starves_the_watchdog_at_once() {
        let h = Health::default();
        h.idle();
        h.failed(FaultKind::Replaced, "gone".into());
        assert!(!h.progressing(Duration::from_secs(60)));
    }
}
