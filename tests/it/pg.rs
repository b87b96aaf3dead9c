//! PostgreSQL for the tests: a fresh database per daemon (or per cluster test) on the run's
//! cluster. `scripts/test` starts one cluster for the whole run and names it in
//! `TELEBRIDGE_TEST_PG` (`postgres://postgres@127.0.0.1:PORT/postgres`); without it (a test
//! run by hand), the test process starts a private cluster of its own in a temporary
//! directory on a free port, which a watcher process stops and removes once the test process
//! has gone. The system's PostgreSQL (5432) and databases this code did not create are never
//! touched.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection as _, PgConnection};

/// The variable naming the run's cluster (an admin URL whose database is `postgres`).
pub const CLUSTER_ENV: &str = "TELEBRIDGE_TEST_PG";

/// A database of the test's own; dropped (best effort) when this is dropped.
pub struct PgDb {
    /// Its URL, for `[storage] url` and for connecting.
    pub url: String,
    /// Its name (`tb_<random>`).
    pub name: String,
    admin: String,
}

/// Creates a fresh, empty database `tb_<random>` on the run's cluster.
pub async fn database() -> PgDb {
    let admin = cluster_url();
    let name = format!("tb_{}", uuid::Uuid::new_v4().simple());
    let mut conn = connect(&admin).await;
    // CREATE DATABASE copies template1; another CREATE at the same moment can make it busy.
    let mut tries = 0;
    loop {
        match sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
        {
            Ok(_) => break,
            Err(e) if tries < 20 && e.to_string().contains("being accessed by other users") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("CREATE DATABASE {name} on {admin}: {e}"),
        }
    }
    let _ = conn.close().await;
    PgDb {
        url: with_database(&admin, &name),
        name,
        admin,
    }
}

impl PgDb {
    /// A new connection to the database.
    pub async fn connect(&self) -> PgConnection {
        connect(&self.url).await
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Drop is sync: a thread of its own with a small runtime. Best effort: the cluster is
        // removed at the end of the run anyway.
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let drop_it = async {
                    let mut c = PgConnection::connect(&admin).await.ok()?;
                    sqlx::query(AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut c)
                    .await
                    .ok()?;
                    c.close().await.ok()
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), drop_it).await;
            });
        })
        .join();
    }
}

async fn connect(url: &str) -> PgConnection {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match PgConnection::connect(url).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot connect to PostgreSQL at {url}: {e}"),
        }
    }
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let host_part = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

/// The admin URL of the run's cluster: `TELEBRIDGE_TEST_PG`, or a private cluster started
/// on first use.
pub fn cluster_url() -> String {
    if let Ok(url) = std::env::var(CLUSTER_ENV)
        && !url.trim().is_empty()
    {
        return url;
    }
    static PRIVATE: OnceLock<String> = OnceLock::new();
    PRIVATE.get_or_init(|| start_private_cluster().url).clone()
}

/// A cluster of a test's own, which it may stop and start again (a real server fault);
/// its watcher removes it once the test process is gone.
pub struct Cluster {
    /// The admin URL (database `postgres`).
    pub url: String,
    dir: PathBuf,
    port: u16,
}

impl Cluster {
    /// initdb and start a cluster for this test alone.
    pub fn start() -> Cluster {
        start_private_cluster()
    }

    /// Stops the server (fast shutdown: sessions are ended).
    pub fn stop(&self) {
        let mut stop = pg_command(&server_bin_dir().join("pg_ctl"));
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-w", "-m", "fast", "stop"]);
        run(stop, "pg_ctl stop").unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts it again on the same port.
    pub fn start_again(&self) {
        start_server(&self.dir, self.port).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// `pg_ctl start` for the cluster in `dir` on `port`.
fn start_server(dir: &Path, port: u16) -> Result<(), String> {
    let mut start = pg_command(&server_bin_dir().join("pg_ctl"));
    start
        .arg("-D")
        .arg(dir.join("data"))
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "30", "-o"])
        .arg(format!(
            "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{}' \
             -c max_connections=300 -c shared_buffers=128MB -c synchronous_commit=on",
            dir.display()
        ))
        .arg("start")
        // The server inherits nothing of ours (its output goes to the log).
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    run(start, "pg_ctl start").map_err(|e| {
        format!(
            "{e}\n{}",
            std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
        )
    })
}

/// The newest `/usr/lib/postgresql/*/bin` with an `initdb`.
pub fn server_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin: install them \
             (apt-get install postgresql) or run scripts/test"
        )
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A command for a PostgreSQL server binary, as the `postgres` user when we are root
/// (PostgreSQL refuses to run as root).
fn pg_command(bin: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// initdb into a temporary directory, start the server on a free loopback port (socket in
/// the directory), and leave a watcher that stops it and removes the directory when this
/// process is gone.
fn start_private_cluster() -> Cluster {
    let bin = server_bin_dir();
    let dir = tempfile::Builder::new()
        .prefix("telebridge-test-pg.")
        .tempdir()
        .expect("tempdir")
        .keep();
    if running_as_root() {
        run(
            {
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(&dir);
                c
            },
            "chown the cluster directory to postgres",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let data = dir.join("data");
    let mut initdb = pg_command(&bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
    run(initdb, "initdb").unwrap_or_else(|e| panic!("{e}"));

    // The watcher first, so the directory goes even if the start fails.
    let guard = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
        pid = std::process::id(),
        stop = if running_as_root() {
            format!(
                "runuser -u postgres -- '{}' stop -m immediate -D '{}'",
                bin.join("pg_ctl").display(),
                data.display()
            )
        } else {
            format!(
                "'{}' stop -m immediate -D '{}'",
                bin.join("pg_ctl").display(),
                data.display()
            )
        },
        dir = dir.display(),
    );
    // In a session of its own (setsid -f forks it off), so that a runner killing this
    // process's group on a timeout does not take the watcher with it.
    let forked = Command::new("setsid")
        .args(["-f", "sh", "-c", &guard])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("start the cluster's watcher (setsid -f sh)");
    assert!(forked.success(), "setsid -f sh: {forked}");

    let mut last_err = String::new();
    for _ in 0..5 {
        let port = crate::support::free_port();
        match start_server(&dir, port) {
            Ok(()) => {
                return Cluster {
                    url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                    dir,
                    port,
                };
            }
            Err(e) => last_err = e,
        }
    }
    panic!("cannot start a private PostgreSQL cluster: {last_err}");
}
