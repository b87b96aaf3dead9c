//! Storage faults never wedge the daemon: a filesystem that fills, a file that turns
//! read-only, a lock held by another process, the database deleted under it, and faults at
//! start-up. Each is a real fault on a real file: a small tmpfs of the test's own (mounting
//! needs root, as our machines and CI run), `chattr +i`, a second SQLite connection.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;
use sqlx::Connection as _;
use tempfile::TempDir;

use crate::support::{Daemon, Mosquitto, Publisher, reading, wait_for};

const T: Duration = Duration::from_secs(60);

/// A tmpfs of the test's own, unmounted on drop.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    fn mount(size: &str, extra: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}{extra}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "these tests mount a small tmpfs of their own, which needs root (run them as root, as CI does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem, leaving about `leave` bytes free; returns the filler file.
    fn fill(&self, leave: u64) -> PathBuf {
        use std::io::Write as _;
        let path = self.path().join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open filler");
        let chunk = vec![0u8; 64 << 10];
        let mut written = f.metadata().expect("filler size").len();
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        f.set_len(written.saturating_sub(leave))
            .expect("shrink filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a daemon killed just before may still be closing its files.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `[storage]` for a database at `dir/telebridge.db` with quick retries.
fn storage_in(dir: &Path) -> String {
    format!(
        "[storage]\npath = \"{}\"\nretry_max = \"200ms\"\nbusy_timeout = \"200ms\"\n",
        dir.join("telebridge.db").display()
    )
}

/// `/readyz`: (status code, body).
async fn readyz(daemon: &Daemon) -> (u16, Value) {
    let r = daemon.get("/readyz").await;
    let status = r.status().as_u16();
    (status, r.json().await.expect("readyz JSON"))
}

/// Waits until `/readyz` answers 503 with a `storage` text starting with `reason`.
async fn wait_unready(daemon: &Daemon, reason: &str) -> Value {
    wait_for(
        T,
        &format!("/readyz 503 with storage \"{reason} ...\""),
        || async {
            let (status, body) = readyz(daemon).await;
            let text = body["storage"].as_str().unwrap_or_default();
            (status == 503 && text.starts_with(reason)).then_some(body)
        },
    )
    .await
}

async fn wait_ready(daemon: &Daemon) {
    wait_for(T, "/readyz 200 again", || async {
        (readyz(daemon).await.0 == 200).then_some(())
    })
    .await;
}

/// A second connection (another process, for the daemon) holding the write lock, as
/// `sqlite3 db 'BEGIN IMMEDIATE'` would.
async fn hold_write_lock(db: &Path) -> sqlx::SqliteConnection {
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .expect("second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("take the write lock");
    other
}

/// The command was refused with 503 and a message that names `reason`.
async fn assert_refused(r: reqwest::Response, reason: &str) {
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await.expect("error JSON");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(reason),
        "{body}"
    );
}

/// POSTs a command for `device`.
async fn post_command(daemon: &Daemon, device: &str, body: Value) -> reqwest::Response {
    daemon
        .client
        .post(daemon.url(&format!("/api/devices/{device}/commands")))
        .json(&body)
        .send()
        .await
        .expect("POST command")
}

/// Every reading number 0..n is stored (duplicates from redelivery allowed, none missing).
async fn assert_all_stored(daemon: &Daemon, n: i64) {
    let db = daemon.db().await;
    let numbers = wait_for(T, &format!("readings 0..{n} in SQLite"), || async {
        let numbers: BTreeSet<i64> = db.numbers().await.into_iter().collect();
        (numbers.len() as i64 >= n).then_some(numbers)
    })
    .await;
    let missing: Vec<i64> = (0..n).filter(|i| !numbers.contains(i)).take(10).collect();
    assert!(
        missing.is_empty(),
        "readings missing, for example {missing:?}"
    );
}

/// Publishes readings `from..from + count` over 5 devices, QoS 1.
async fn publish_readings(p: &Publisher, from: i64, count: i64) {
    for n in from..from + count {
        p.publish(
            &format!("devices/f{}/telemetry", n % 5),
            QoS::AtLeastOnce,
            false,
            reading(n),
        )
        .await;
    }
}

#[tokio::test]
async fn a_filesystem_that_fills_mid_burst_stops_the_acks_and_everything_is_stored_once_space_returns()
 {
    if crate::support::sqlite_only() {
        return;
    }
    // Arrange: room for the readings of every round and a WAL of a few MiB (each
    // commit writes the readings' pages and their rollups'), all but what the filler takes.
    let fs = Tmpfs::mount("32m", "");
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), &storage_in(fs.path())).await;
    let mut daemon = daemon;
    let publisher = Publisher::connect(&broker.url(), "fill-pub").await;
    let mut published = 0i64;
    let mut status_messages = 0u64;

    // Free space left before each burst: none (the fault before the first batch), then
    // amounts spread over 0-800 KiB at odd offsets, so that the fault lands at different
    // statements (BEGIN, a reading INSERT, a device upsert, COMMIT) of different batches.
    for round in 0..16u64 {
        let leave = if round == 0 {
            0
        } else {
            ((round * 53) << 10) % (800 << 10) + (round * 4_099) % 8_192
        };
        let filler = fs.fill(leave);

        // Act: readings with presence changes between them (batches that also update
        // devices), until readiness says the disk is full.
        let started = Instant::now();
        let before = published;
        let unready = loop {
            publish_readings(&publisher, published, 100).await;
            published += 100;
            let device = format!("devices/f{}/status", published % 5);
            let state = if published % 200 == 0 {
                "offline"
            } else {
                "online"
            };
            publisher
                .publish(&device, QoS::AtLeastOnce, false, state)
                .await;
            status_messages += 1;
            let (status, body) = readyz(&daemon).await;
            if status == 503
                && body["storage"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("disk full"))
            {
                break body;
            }
            assert!(
                started.elapsed() < T && published - before < 100_000,
                "round {round}: the disk never filled ({} published)",
                published - before
            );
        };

        eprintln!(
            "round {round}: {leave} bytes free, full after {} more readings ({published} in all): {unready}",
            published - before
        );
        // Assert: alive, unready with the reason and what waits, and saying so on /metrics.
        assert!(daemon.alive(), "round {round}: the daemon died");
        assert_eq!(unready["storage_writable"], false, "{unready}");
        let stuck = wait_for(T, "readings waiting to be reported", || async {
            let (_, body) = readyz(&daemon).await;
            (body["storage_waiting"].as_u64().unwrap_or(0) > 0).then_some(body)
        })
        .await;
        assert!(
            stuck["storage"]
                .as_str()
                .unwrap_or_default()
                .contains(" waiting"),
            "{stuck}"
        );
        if round == 1 {
            assert_eq!(
                daemon
                    .metric("telebridge_store_writer_state{state=\"disk_full\"}")
                    .await,
                1.0
            );
            assert!(daemon.metric("telebridge_store_pending").await > 0.0);
        }
        if round == 2 {
            // A command while the writer cannot commit is refused at once, with the reason.
            let r = post_command(&daemon, "f1", serde_json::json!({"name": "ping"})).await;
            assert_refused(r, "disk full").await;
        }

        // Act: space returns.
        std::fs::remove_file(&filler).expect("remove filler");

        // Assert: ready again by itself, and every reading the broker acknowledged to the
        // publisher is stored.
        wait_ready(&daemon).await;
        publisher
            .wait_acked(published as u64 + status_messages, T)
            .await;
        assert_all_stored(&daemon, published).await;
        assert_eq!(
            daemon
                .metric("telebridge_store_writer_state{state=\"ok\"}")
                .await,
            1.0
        );
    }

    // Assert: commands work again, and shutdown is clean.
    let r = post_command(&daemon, "f1", serde_json::json!({"name": "ping"})).await;
    let status = r.status().as_u16();
    assert_eq!(status, 202, "{}", r.text().await.unwrap_or_default());
    assert!(
        daemon
            .metric("telebridge_store_commit_failures_total")
            .await
            >= 5.0
    );
    let status = daemon.sigterm();
    assert!(status.success(), "{status:?}\n{}", daemon.log_text());
}

#[tokio::test]
async fn a_command_write_into_a_full_disk_fails_and_readiness_recovers_by_itself() {
    if crate::support::sqlite_only() {
        return;
    }
    // Arrange: a full filesystem before anything was written.
    let fs = Tmpfs::mount("8m", "");
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), &storage_in(fs.path())).await;
    let filler = fs.fill(0);

    // Act: only commands write. The first few may still fit in room SQLite already has
    // (the WAL is reused after a checkpoint); they go on until one needs a new page.
    let mut refused = None;
    for _ in 0..2_000 {
        let r = post_command(
            &daemon,
            "c1",
            serde_json::json!({"name": "ping", "params": {"pad": "x".repeat(2000)}}),
        )
        .await;
        if r.status().as_u16() != 202 {
            refused = Some(r);
            break;
        }
    }

    // Assert: refused with the reason, and readiness says so.
    let r = refused.expect("a command write into a full disk was refused");
    assert_refused(r, "full").await;
    wait_unready(&daemon, "disk full").await;

    // Act: space returns; no other write comes.
    std::fs::remove_file(&filler).expect("remove filler");

    // Assert: ready again without any other traffic, and commands are stored.
    wait_ready(&daemon).await;
    let r = post_command(&daemon, "c1", serde_json::json!({"name": "ping"})).await;
    assert_eq!(r.status().as_u16(), 202);
}

#[tokio::test]
async fn a_write_lock_held_by_another_process_for_longer_than_the_busy_timeout_loses_nothing() {
    if crate::support::sqlite_only() {
        return;
    }
    // Arrange
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(&broker.url(), &storage_in(dir.path())).await;
    let publisher = Publisher::connect(&broker.url(), "lock-pub").await;
    publish_readings(&publisher, 0, 200).await;
    assert_all_stored(&daemon, 200).await;

    // Act: someone inspecting the file holds its write lock, as `sqlite3 db 'BEGIN
    // IMMEDIATE'` would, for many busy timeouts while readings keep coming.
    let mut other = hold_write_lock(&daemon.db).await;
    publish_readings(&publisher, 200, 1_000).await;
    let unready = wait_unready(&daemon, "locked").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = readyz(&daemon).await;

    // Assert: unready throughout, and nothing committed meanwhile.
    assert_eq!(status, 503, "{unready}");
    assert_eq!(daemon.db().await.count().await, 200);

    // Act: the lock is released.
    sqlx::query("ROLLBACK")
        .execute(&mut other)
        .await
        .expect("release");
    drop(other);

    // Assert
    wait_ready(&daemon).await;
    publisher.wait_acked(1_200, T).await;
    assert_all_stored(&daemon, 1_200).await;
}

/// `chattr` on the daemon's files (the kernel refuses to remount a filesystem read-only
/// while files on it are open for writing; an immutable file fails writes the same way).
fn chattr(flag: &str, db: &Path) {
    for suffix in ["", "-wal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let ok = Command::new("chattr")
            .arg(flag)
            .arg(&p)
            .status()
            .expect("run chattr")
            .success();
        assert!(ok, "chattr {flag} {}", PathBuf::from(p).display());
    }
}

#[tokio::test]
async fn files_that_turn_read_only_make_the_daemon_unready_and_it_recovers_when_they_are_writable()
{
    if crate::support::sqlite_only() {
        return;
    }
    // Arrange: on the ext4 of /var/tmp (chattr needs a filesystem with inode flags).
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    let daemon = Daemon::start(&broker.url(), &storage_in(dir.path())).await;
    let publisher = Publisher::connect(&broker.url(), "ro-pub").await;
    publish_readings(&publisher, 0, 100).await;
    assert_all_stored(&daemon, 100).await;

    // Act
    chattr("+i", &daemon.db);
    publish_readings(&publisher, 100, 500).await;
    let unready = wait_for(T, "/readyz 503 while read-only", || async {
        let (status, body) = readyz(&daemon).await;
        (status == 503 && body["storage_writable"] == false).then_some(body)
    })
    .await;
    chattr("-i", &daemon.db);

    // Assert
    assert!(
        unready["storage"]
            .as_str()
            .unwrap_or_default()
            .starts_with("read-only since"),
        "{unready}"
    );
    wait_ready(&daemon).await;
    publisher.wait_acked(600, T).await;
    assert_all_stored(&daemon, 600).await;
}

#[tokio::test]
async fn a_database_deleted_under_the_daemon_is_never_acked_into_and_sigterm_exits_non_zero() {
    if crate::support::sqlite_only() {
        return;
    }
    // Arrange
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start(&broker.url(), &storage_in(dir.path())).await;
    let publisher = Publisher::connect(&broker.url(), "del-pub").await;
    publish_readings(&publisher, 0, 100).await;
    assert_all_stored(&daemon, 100).await;

    // Act: the file is deleted; more readings come.
    std::fs::remove_file(&daemon.db).expect("delete the database");
    publish_readings(&publisher, 100, 300).await;
    publisher.wait_acked(400, T).await;
    let unready = wait_unready(&daemon, "database file deleted or replaced").await;
    let status = daemon.sigterm();

    // Assert: loud, unready, a non-zero exit within the deadline with the reason.
    assert!(!status.success(), "exit {status:?}");
    assert_eq!(status.code(), Some(3), "{}", daemon.log_text());
    let log = daemon.log_text();
    assert!(
        log.contains("was deleted while telebridge had it open"),
        "{log}"
    );
    assert!(
        unready["storage_waiting"].as_u64().unwrap_or(0) > 0,
        "{unready}"
    );

    // Assert: nothing after the deletion was acknowledged to the broker, which delivers it
    // again to the restarted daemon (on a fresh file).
    daemon.spawn().await;
    let db = daemon.db().await;
    let numbers = wait_for(T, "the redelivered readings", || async {
        let n: BTreeSet<i64> = db.numbers().await.into_iter().collect();
        (n.len() >= 300).then_some(n)
    })
    .await;
    let missing: Vec<i64> = (100..400).filter(|n| !numbers.contains(n)).collect();
    assert!(missing.is_empty(), "not redelivered: {missing:?}");
}

#[tokio::test]
async fn a_wedged_writer_stops_feeding_the_watchdog_and_a_progressing_one_feeds_it() {
    if crate::support::sqlite_only() {
        return;
    }
    use tokio::net::UnixDatagram;
    // Arrange: the daemon speaks sd_notify to our socket, with a 2 s watchdog.
    let broker = Mosquitto::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = Daemon::start(&broker.url(), &storage_in(dir.path())).await;
    daemon.sigterm();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    daemon
        .env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    daemon.env.push(("WATCHDOG_USEC".into(), "2000000".into()));
    daemon.spawn().await;
    let publisher = Publisher::connect(&broker.url(), "wd-pub").await;
    // WATCHDOG=1 messages received within `d`.
    async fn feeds(sock: &UnixDatagram, d: Duration) -> usize {
        let mut buf = [0u8; 512];
        let mut n = 0;
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Ok(len)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            n += String::from_utf8_lossy(&buf[..len])
                .lines()
                .filter(|l| *l == "WATCHDOG=1")
                .count();
        }
        n
    }
    publish_readings(&publisher, 0, 100).await;
    let healthy = feeds(&sock, Duration::from_secs(2)).await;

    // Act: the writer wedges on a lock with work waiting.
    let mut other = hold_write_lock(&daemon.db).await;
    publish_readings(&publisher, 100, 100).await;
    // Half the interval without a commit stops the feeding; a quarter more for the tick.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let _ = feeds(&sock, Duration::from_millis(10)).await; // drain what came before
    let wedged = feeds(&sock, Duration::from_secs(3)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut other)
        .await
        .expect("release");
    drop(other);
    let recovered = feeds(&sock, Duration::from_secs(3)).await;

    // Assert
    assert!(healthy >= 3, "fed {healthy} times in 2 s while healthy");
    assert_eq!(wedged, 0, "fed while the writer was wedged");
    assert!(recovered >= 2, "fed {recovered} times after recovery");
    assert!(
        daemon
            .log_text()
            .contains("no longer feeding the systemd watchdog"),
        "{}",
        daemon.log_text()
    );
    assert_all_stored(&daemon, 200).await;
}

/// A database at `path` with this build's schema, as the daemon makes it.
async fn migrated(path: &Path) -> sqlx::SqliteConnection {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true);
    let mut c = sqlx::SqliteConnection::connect_with(&opts)
        .await
        .expect("create");
    sqlx::migrate::Migrator::new(crate::support::sqlite_migrations())
        .await
        .expect("this build's migrations")
        .run(&mut c)
        .await
        .expect("migrate");
    c
}

/// Runs `telebridge run` on a config whose storage is at `db`: (exit code, stderr).
fn run_once(db: &Path) -> (i32, String) {
    crate::support::run_until_exit(&format!("path = \"{}\"", db.display()))
}

#[tokio::test]
async fn start_up_storage_faults_give_a_clear_error_and_exit_code_3() {
    if crate::support::sqlite_only() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");

    // Not an SQLite file.
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, "these are not the bytes of a database\n".repeat(200)).expect("write");
    let (code, err) = run_once(&junk);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is not a usable SQLite database"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // A database from a newer telebridge: a migration this build does not know.
    let newer = dir.path().join("newer.db");
    {
        let mut c = migrated(&newer).await;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from the future', 1, x'00', 0)",
        )
        .execute(&mut c)
        .await
        .expect("add a future migration");
        c.close().await.expect("close");
    }
    let (code, err) = run_once(&newer);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("written by a newer telebridge") && err.contains("9999"),
        "{err}"
    );

    // A corrupt file: a real database whose first page was overwritten after the header.
    let corrupt = dir.path().join("corrupt.db");
    migrated(&corrupt).await.close().await.expect("close");
    {
        use std::io::{Seek as _, SeekFrom, Write as _};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&corrupt)
            .expect("open");
        f.seek(SeekFrom::Start(100)).expect("seek");
        f.write_all(&[0xA5; 3000]).expect("scribble");
    }
    let (code, err) = run_once(&corrupt);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is not a usable SQLite database"), "{err}");

    // A directory that cannot be written: a read-only filesystem.
    let ro = Tmpfs::mount("1m", ",ro");
    let (code, err) = run_once(&ro.path().join("telebridge.db"));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot open SQLite database"), "{err}");
}
