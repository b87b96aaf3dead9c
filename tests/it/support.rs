//! Test helpers: a Mosquitto of our own, the daemon as a child process, an MQTT publisher,
//! and readers of the daemon's storage. Everything started here is stopped on drop.
//!
//! The storage backend comes from `TELEBRIDGE_TEST_BACKEND`: `sqlite` (the default) gives
//! each daemon a SQLite file of its own; `postgres` gives each daemon a fresh database on the
//! run's PostgreSQL cluster (see `pg.rs`). Tests about SQLite itself return early on
//! PostgreSQL through `sqlite_only()`.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tempfile::TempDir;

use crate::pg::{self, PgDb};

/// The storage backend the daemons of this test run use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The variable that chooses the backend: `sqlite` (default) or `postgres`.
pub const BACKEND_ENV: &str = "TELEBRIDGE_TEST_BACKEND";

/// The backend from `TELEBRIDGE_TEST_BACKEND` (`sqlite` when unset).
pub fn backend() -> Backend {
    match std::env::var(BACKEND_ENV).as_deref().map(str::trim) {
        Err(_) | Ok("") | Ok("sqlite") => Backend::Sqlite,
        Ok("postgres") | Ok("postgresql") | Ok("pg") => Backend::Postgres,
        Ok(other) => panic!("{BACKEND_ENV}={other}: use sqlite or postgres"),
    }
}

/// The SQLite schema's migrations: `migrations/sqlite/` (beside `migrations/postgres/`), or
/// `migrations/` of a tree from before the PostgreSQL backend.
pub fn sqlite_migrations() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let sqlite = root.join("sqlite");
    if sqlite.is_dir() { sqlite } else { root }
}

/// For a test about SQLite itself (its file, locks, WAL, a filesystem under it): true, with
/// a visible line, when the run uses another backend, so the test returns at once.
pub fn sqlite_only() -> bool {
    if backend() == Backend::Sqlite {
        return false;
    }
    eprintln!("skipped: SQLite-specific ({BACKEND_ENV}=postgres)");
    true
}

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_telebridge");

/// Runs `telebridge check` on `config`: (exit code, stdout and stderr).
pub fn check(config: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config).expect("write");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// Runs `telebridge run` with `storage` as its `[storage]` section (no broker needed) and
/// waits for it to exit, as it must when storage cannot be opened: (exit code, stderr).
pub fn run_until_exit(storage: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nmode = \"external\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\n[storage]\n{storage}\n"
        ),
    )
    .expect("write config");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start telebridge");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("telebridge kept running with [storage] {storage}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A builder for the tests' HTTP clients. reqwest is built with rustls but no crypto provider
/// of its own (the daemon's is ring), so ring is installed as the process default first.
pub fn http_builder() -> reqwest::ClientBuilder {
    static CRYPTO: std::sync::Once = std::sync::Once::new();
    CRYPTO.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
}

/// A new HTTP client with the defaults.
pub fn http() -> reqwest::Client {
    http_builder().build().expect("HTTP client")
}

/// A free loopback port (the OS picks it; there is a small window before we use it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Polls `check` every 20 ms until it returns Some, or panics after `timeout` with `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// A Mosquitto broker of the test's own, on a free port, with limits raised so that it never
/// drops QoS 1 messages for a slow or offline persistent session.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    dir: TempDir,
}

impl Mosquitto {
    /// Starts it and waits until it accepts connections.
    pub async fn start() -> Mosquitto {
        Self::start_with("", "").await
    }

    /// Like `start`, with `head` before our anonymous listener and `tail` after it (more
    /// listeners, for example).
    pub async fn start_with(head: &str, tail: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = format!(
            "{head}\nlistener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n\
             max_queued_messages 10000000\nmax_queued_bytes 0\nset_tcp_nodelay true\n\
             persistence true\npersistence_location {}/\nautosave_interval 1\nlog_dest stderr\nlog_type error\n{tail}\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
        };
        m.spawn().await;
        m
    }

    async fn spawn(&mut self) {
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto: install it (apt-get install mosquitto) or run scripts/test");
        self.child = Some(child);
        let port = self.port;
        wait_for(
            Duration::from_secs(10),
            "mosquitto to listen",
            || async move { accepts(port).then_some(()) },
        )
        .await;
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops it gracefully (it saves its sessions) and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same state.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mosquitto_bin() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status();
}

/// The daemon, run as its own process from a config written for the test.
pub struct Daemon {
    child: Option<Child>,
    /// Where its HTTP server listens.
    pub http: SocketAddr,
    dir: TempDir,
    /// The config file.
    pub config: PathBuf,
    /// The SQLite file (unused when the daemon stores in PostgreSQL).
    pub db: PathBuf,
    /// `[storage] url` when the daemon stores in PostgreSQL.
    pub pg_url: Option<String>,
    /// The database made for this daemon (dropped with it), if any.
    pg: Option<PgDb>,
    log: PathBuf,
    /// `http` or `https`, as the daemon printed it.
    pub scheme: String,
    /// The client that reaches it (one that trusts the test CA, for HTTPS).
    pub client: reqwest::Client,
    /// Whether `spawn` waits for `/readyz` (it also needs the broker connected).
    wait_ready: bool,
    /// Environment variables the process gets besides ours.
    pub env: Vec<(String, String)>,
}

impl Daemon {
    /// Writes a config for `broker_url` plus `extra` TOML sections and starts the daemon.
    /// `extra` may hold whole sections; `[mqtt]`, `[storage]` and `[http]` keys given here
    /// are added to ours.
    pub async fn start(broker_url: &str, extra: &str) -> Daemon {
        Self::start_with(broker_url, extra, http(), true).await
    }

    /// Like `start`, reaching the daemon with `client`; with `wait_ready` false it returns
    /// as soon as the daemon prints its address, connected to the broker or not.
    pub async fn start_with(
        broker_url: &str,
        extra: &str,
        client: reqwest::Client,
        wait_ready: bool,
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("telebridge.db");
        let config = dir.path().join("config.toml");
        let client_id = format!("tb-test-{}", free_port());
        let mut sections = Sections::default();
        sections.add("broker", "mode = \"external\"");
        sections.add(
            "mqtt",
            &format!("url = \"{broker_url}\"\nclient_id = \"{client_id}\""),
        );
        sections.add("http", "listen = \"127.0.0.1:0\"");
        sections.add("log", "level = \"info,telebridge=debug\"");
        sections.merge(extra);
        // A test may put the database elsewhere (a SQLite file on a filesystem of its own, or
        // a PostgreSQL database shared by several daemons); otherwise the backend decides.
        let unquote = |v: String| v.trim().trim_matches('"').to_owned();
        let mut pg = None;
        let pg_url = match (
            sections.get("storage", "url").map(unquote),
            sections.get("storage", "path").map(unquote),
        ) {
            (Some(url), _) => Some(url),
            (None, Some(_)) => None,
            (None, None) => match backend() {
                Backend::Sqlite => {
                    sections.add("storage", &format!("path = \"{}\"", db.display()));
                    None
                }
                Backend::Postgres => {
                    let made = pg::database().await;
                    let url = made.url.clone();
                    sections.add("storage", &format!("url = \"{url}\""));
                    pg = Some(made);
                    Some(url)
                }
            },
        };
        let db = sections
            .get("storage", "path")
            .map(|p| PathBuf::from(unquote(p)))
            .unwrap_or(db);
        std::fs::write(&config, sections.render()).expect("write config");
        let log = dir.path().join("daemon.log");
        let mut d = Daemon {
            child: None,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            config,
            db,
            pg_url,
            pg,
            log,
            scheme: "http".into(),
            client,
            wait_ready,
            env: Vec::new(),
        };
        d.spawn().await;
        d
    }

    /// Starts the process and waits until `/readyz` says ready.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start telebridge");
        let stdout = child.stdout.take().expect("stdout");
        // The daemon prints its HTTP address on stdout; a thread reads it (and keeps
        // draining, so the child never blocks on a full pipe).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("telebridge dashboard: ")
                    && let Some((scheme, rest)) = url.split_once("://")
                {
                    let addr = rest.trim_end_matches('/').parse::<SocketAddr>().ok();
                    let _ = tx.send(addr.map(|a| (scheme.to_owned(), a)));
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || {
            rx.recv_timeout(Duration::from_secs(20)).ok().flatten()
        })
        .await
        .expect("join");
        self.child = Some(child);
        let Some((scheme, addr)) = addr else {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            panic!("telebridge did not start; its log:\n{}", self.log_text());
        };
        self.http = addr;
        self.scheme = scheme;
        if !self.wait_ready {
            return;
        }
        let url = self.url("/readyz");
        let client = self.client.clone();
        wait_for(Duration::from_secs(20), "telebridge to be ready", || {
            let (url, client) = (url.clone(), client.clone());
            async move {
                let r = client.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
    }

    /// The full URL of `path` on the daemon.
    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.http, path)
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (at most 15 s) for the exit.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon is running");
        signal(&child, "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "telebridge did not exit within 15 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (it has not exited or crashed).
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// GET a path on the daemon.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("HTTP request")
    }

    /// The value of one Prometheus sample line, such as `telebridge_readings_stored_total`.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self
            .get("/metrics")
            .await
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {sample} in /metrics:\n{text}"))
    }

    /// Resident memory of the daemon process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .expect("VmRSS")
    }

    /// A read-only view of the daemon's database.
    pub async fn db(&self) -> Db {
        match &self.pg_url {
            Some(url) => Db::postgres(url).await,
            None => Db::open(&self.db).await,
        }
    }

    /// Runs one writing statement on the daemon's storage (stop the daemon first): the
    /// SQLite text with `?` placeholders or the PostgreSQL one with `$1`, binding `arg`.
    async fn write(&self, sqlite: &'static str, postgres: &'static str, arg: i64) -> u64 {
        match &self.pg_url {
            Some(url) => {
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .connect(url)
                    .await
                    .expect("connect");
                let n = sqlx::query(postgres).bind(arg).execute(&pool).await;
                pool.close().await;
                n.expect("write").rows_affected()
            }
            None => {
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(SqliteConnectOptions::new().filename(&self.db))
                    .await
                    .expect("open db");
                let n = sqlx::query(sqlite).bind(arg).execute(&pool).await;
                pool.close().await;
                n.expect("write").rows_affected()
            }
        }
    }

    /// Moves presence and command events up to `seq` two days into the past.
    pub async fn age_events_through(&self, seq: i64) -> u64 {
        self.write(
            "UPDATE events SET at = at - 2 * 86400000 WHERE seq <= ?",
            "UPDATE events SET at = at - 2 * 86400000 WHERE seq <= $1",
            seq,
        )
        .await
    }

    /// Moves every reading two days into the past (as received).
    pub async fn age_all_readings(&self) -> u64 {
        self.write(
            "UPDATE readings SET lag = lag - 2 * 86400000 WHERE seq > ?",
            "UPDATE readings SET received_at = received_at - 2 * 86400000 WHERE seq > $1",
            0,
        )
        .await
    }

    /// Moves the readings whose `n` is below `n` two days into the past (as received).
    pub async fn age_readings_below(&self, n: i64) -> u64 {
        self.write(
            "UPDATE readings SET lag = lag - 2 * 86400000 WHERE json_extract(payload, '$.n') < ?",
            "UPDATE readings SET received_at = received_at - 2 * 86400000 \
             WHERE (convert_from(payload, 'UTF8')::jsonb->>'n')::bigint < $1",
            n,
        )
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// TOML sections assembled from the test's defaults and its own additions.
#[derive(Default)]
struct Sections(Vec<(String, Vec<String>)>);

impl Sections {
    fn add(&mut self, section: &str, lines: &str) {
        let idx = match self.0.iter().position(|(s, _)| s == section) {
            Some(i) => i,
            None => {
                self.0.push((section.to_owned(), Vec::new()));
                self.0.len() - 1
            }
        };
        for line in lines.lines().filter(|l| !l.trim().is_empty()) {
            let key = line.split('=').next().unwrap_or("").trim().to_owned();
            let body = &mut self.0[idx].1;
            // A later value for the same key replaces ours.
            body.retain(|l| l.split('=').next().unwrap_or("").trim() != key);
            body.push(line.to_owned());
        }
    }

    fn get(&self, section: &str, key: &str) -> Option<String> {
        let (_, lines) = self.0.iter().find(|(s, _)| s == section)?;
        lines.iter().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    }

    fn merge(&mut self, extra: &str) {
        let mut section = String::new();
        for line in extra.lines() {
            let t = line.trim();
            if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
                section = name.to_owned();
            } else if !t.is_empty() {
                self.add(&section, t);
            }
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        for (name, lines) in &self.0 {
            out.push_str(&format!("[{name}]\n"));
            for l in lines {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// A read-only view of a daemon's storage: its SQLite file, or its PostgreSQL database.
pub enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One stored reading, as the tests look at it.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub seq: i64,
    pub device: String,
    pub topic: String,
    pub ts: i64,
    pub received_at: i64,
    pub payload: Vec<u8>,
    pub flags: i64,
}

impl Db {
    async fn open(path: &Path) -> Db {
        let opts = SqliteConnectOptions::new().filename(path).read_only(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .expect("open the daemon's database");
        Db::Sqlite(pool)
    }

    /// A read-only view of the PostgreSQL database at `url` (one that daemons share, say).
    pub async fn postgres(url: &str) -> Db {
        let opts: PgConnectOptions = url.parse().expect("PostgreSQL URL");
        let opts = opts.options([("default_transaction_read_only", "on")]);
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(20))
            .connect_with(opts)
            .await
            .unwrap_or_else(|e| panic!("connect to the daemon's database {url}: {e}"));
        Db::Postgres(pool)
    }

    /// Number of readings.
    pub async fn count(&self) -> i64 {
        const SQL: &str = "SELECT count(*) FROM readings";
        match self {
            Db::Sqlite(p) => sqlx::query_scalar(SQL).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_scalar(SQL).fetch_one(p).await,
        }
        .expect("count")
    }

    /// Every reading in seq order.
    pub async fn rows(&self) -> Vec<Row> {
        use sqlx::Row as _;
        macro_rules! rows {
            ($pool:expr, $sql:expr) => {
                sqlx::query($sql)
                    .fetch_all($pool)
                    .await
                    .expect("rows")
                    .into_iter()
                    .map(|r| Row {
                        seq: r.get("seq"),
                        device: r.get("device"),
                        topic: r.get("topic"),
                        ts: r.get("ts"),
                        received_at: r.get("received_at"),
                        payload: r.get("payload"),
                        flags: r.get("flags"),
                    })
                    .collect()
            };
        }
        match self {
            Db::Sqlite(p) => rows!(
                p,
                "SELECT r.seq AS seq, s.device AS device, s.topic AS topic, r.ts AS ts, r.ts + r.lag AS received_at, \
                 CAST(r.payload AS BLOB) AS payload, r.flags AS flags FROM readings r JOIN sources s ON s.id = r.src ORDER BY r.seq"
            ),
            Db::Postgres(p) => rows!(
                p,
                "SELECT seq, device, topic, ts, received_at, payload, flags FROM readings ORDER BY seq"
            ),
        }
    }

    /// The `n` field of every JSON reading, for loss and duplicate checks.
    pub async fn numbers(&self) -> Vec<i64> {
        match self {
            Db::Sqlite(p) => sqlx::query_scalar(
                "SELECT json_extract(payload, '$.n') FROM readings WHERE flags = 0 ORDER BY seq",
            )
            .fetch_all(p)
            .await,
            Db::Postgres(p) => {
                sqlx::query_scalar(
                    "SELECT (convert_from(payload, 'UTF8')::jsonb->>'n')::bigint FROM readings \
                 WHERE flags = 0 ORDER BY seq",
                )
                .fetch_all(p)
                .await
            }
        }
        .expect("numbers")
    }

    /// (online, last_seen) of a device, if it is known.
    pub async fn device(&self, id: &str) -> Option<(bool, i64)> {
        match self {
            Db::Sqlite(p) => {
                sqlx::query_as::<_, (bool, i64)>(
                    "SELECT online, last_seen FROM devices WHERE id = ?",
                )
                .bind(id)
                .fetch_optional(p)
                .await
            }
            Db::Postgres(p) => {
                sqlx::query_as::<_, (bool, i64)>(
                    "SELECT online, last_seen FROM devices WHERE id = $1",
                )
                .bind(id)
                .fetch_optional(p)
                .await
            }
        }
        .expect("device")
    }

    /// Closes the connections (before a test stops the server under them).
    pub async fn close(self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }

    /// Number of presence and command events.
    pub async fn events(&self) -> i64 {
        const SQL: &str = "SELECT count(*) FROM events";
        match self {
            Db::Sqlite(p) => sqlx::query_scalar(SQL).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_scalar(SQL).fetch_one(p).await,
        }
        .expect("count events")
    }

    /// Waits until there are at least `n` readings.
    pub async fn wait_count(&self, n: i64, timeout: Duration) -> i64 {
        wait_for(
            timeout,
            &format!("{n} readings in storage"),
            || async move {
                let c = self.count().await;
                (c >= n).then_some(c)
            },
        )
        .await
    }

    /// The PostgreSQL pool (panics on SQLite), for queries of a test's own.
    pub fn pg(&self) -> &PgPool {
        match self {
            Db::Postgres(p) => p,
            Db::Sqlite(_) => panic!("this view is of a SQLite file"),
        }
    }
}

/// An MQTT client that publishes for a test and counts what the broker acknowledged.
pub struct Publisher {
    client: AsyncClient,
    acked: tokio::sync::watch::Receiver<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects to `url` (mqtt://host:port).
    pub async fn connect(url: &str, id: &str) -> Publisher {
        let rest = url.trim_start_matches("mqtt://");
        let (host, port) = rest.rsplit_once(':').expect("host:port");
        let mut opts = MqttOptions::new(id, host, port.parse::<u16>().expect("port"));
        opts.set_keep_alive(Duration::from_secs(30))
            .set_inflight(200)
            .set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, acked) = tokio::sync::watch::channel(0u64);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut n = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_)))
                    | Ok(Event::Outgoing(Outgoing::Publish(0))) => {
                        n += 1;
                        let _ = tx.send(n);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("publisher connects within 10 s")
            .expect("publisher task");
        Publisher {
            client,
            acked,
            task,
        }
    }

    /// Publishes one message.
    pub async fn publish(&self, topic: &str, qos: QoS, retain: bool, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, retain, payload)
            .await
            .expect("publish");
    }

    /// Messages acknowledged by the broker (QoS 1) or written out (QoS 0) so far.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// Waits until `n` messages were acknowledged.
    pub async fn wait_acked(&self, n: u64, timeout: Duration) {
        let mut rx = self.acked.clone();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n))
            .await
            .unwrap_or_else(|_| panic!("broker acknowledged only {} of {n} messages", self.acked()))
            .expect("publisher task alive");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A telemetry payload carrying a sequence number `n` and a device time.
pub fn reading(n: i64) -> String {
    format!(
        r#"{{"n":{n},"ts":{},"temperature":21.5}}"#,
        1_700_000_000_000i64 + n
    )
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    /// The data as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }

    /// The reading's `n` field.
    pub fn n(&self) -> i64 {
        self.json()["payload"]["n"]
            .as_i64()
            .unwrap_or_else(|| panic!("no payload.n in {}", self.data))
    }
}

/// A real streaming HTTP client for `/events`, parsing the SSE wire format.
pub struct SseClient {
    response: reqwest::Response,
    buf: String,
    /// Comment lines seen (heartbeats and notices).
    pub comments: Vec<String>,
    /// Whether the server ended the stream.
    pub ended: bool,
    /// The last `id:` seen, in an event or an `id:`-only frame: what EventSource would send
    /// as `Last-Event-ID` on reconnect.
    pub last_id: Option<String>,
}

impl SseClient {
    /// Opens `path` on the daemon, optionally with a `Last-Event-ID` header, and waits for the
    /// stream to start (the `retry:` line), so that the client is subscribed on return.
    pub async fn connect(addr: SocketAddr, path: &str, last_event_id: Option<&str>) -> SseClient {
        SseClient::connect_via(&http(), addr, path, last_event_id).await
    }

    /// Like `connect`, on a client of the caller's (building one per connection is slow).
    pub async fn connect_via(
        http: &reqwest::Client,
        addr: SocketAddr,
        path: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        let mut req = http.get(format!("http://{addr}{path}"));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let response = req.send().await.expect("GET /events");
        assert_eq!(response.status(), 200, "GET {path}");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        let mut c = SseClient {
            response,
            buf: String::new(),
            comments: Vec::new(),
            ended: false,
            last_id: None,
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            while !c.buf.contains("retry: ") {
                c.fill().await;
                assert!(!c.ended, "stream ended before it started");
            }
        })
        .await
        .expect("the stream starts with retry:");
        c
    }

    async fn fill(&mut self) {
        match self.response.chunk().await {
            Ok(Some(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
            _ => self.ended = true,
        }
    }

    /// The next event (comments and `retry:` are recorded, not returned); None when the
    /// stream ends or `timeout` passes.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        tokio::time::timeout(timeout, async {
            loop {
                while let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let mut ev = SseEvent {
                        id: None,
                        event: "message".into(),
                        data: String::new(),
                    };
                    let mut has_data = false;
                    for line in block.lines() {
                        if let Some(c) = line.strip_prefix(':') {
                            self.comments.push(c.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("id: ") {
                            ev.id = Some(v.to_owned());
                            self.last_id = Some(v.to_owned());
                        } else if let Some(v) = line.strip_prefix("event: ") {
                            ev.event = v.to_owned();
                        } else if let Some(v) = line.strip_prefix("data: ") {
                            if has_data {
                                ev.data.push('\n');
                            }
                            ev.data.push_str(v);
                            has_data = true;
                        }
                    }
                    if has_data {
                        return Some(ev);
                    }
                }
                if self.ended {
                    return None;
                }
                self.fill().await;
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// The `n` of the next `count` readings, in order (see `take`).
    pub async fn reading_numbers(&mut self, count: usize, timeout: Duration) -> Vec<i64> {
        self.take("reading", count, timeout)
            .await
            .iter()
            .map(SseEvent::n)
            .collect()
    }

    /// The next `count` events of kind `event`, skipping others; panics if they do not come.
    pub async fn take(&mut self, event: &str, count: usize, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(e) if e.event == event => out.push(e),
                Some(_) => {}
                None => panic!(
                    "got {} of {count} {event} events (ended: {})",
                    out.len(),
                    self.ended
                ),
            }
        }
        out
    }
}

/// Reads `count` `reading` events from `path` the way a browser's EventSource does: when the
/// server closes the stream, reconnect with the last id seen.
/// `client` must already be connected (subscribed) to `path`.
pub async fn collect_resuming(
    mut client: SseClient,
    addr: SocketAddr,
    path: &str,
    count: usize,
    timeout: Duration,
) -> (Vec<SseEvent>, u32) {
    let deadline = Instant::now() + timeout;
    let mut out: Vec<SseEvent> = Vec::new();
    let mut reconnects = 0;
    while out.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "got {} of {count} readings", out.len());
        match client.next(left).await {
            Some(e) if e.event == "reading" => out.push(e),
            Some(_) => {}
            None if client.ended => {
                reconnects += 1;
                let last = out.last().and_then(|e| e.id.clone());
                client = SseClient::connect(addr, path, last.as_deref()).await;
            }
            None => panic!("got {} of {count} readings", out.len()),
        }
    }
    (out, reconnects)
}

/// A device played by an MQTT client: it receives commands and answers them when told.
pub struct FakeDevice {
    client: AsyncClient,
    commands: tokio::sync::mpsc::Receiver<serde_json::Value>,
    task: tokio::task::JoinHandle<()>,
    pub id: String,
}

impl FakeDevice {
    /// Connects and subscribes to `filter` (normally `devices/{id}/commands`), returning once
    /// the subscription is acknowledged.
    pub async fn connect(url: &str, id: &str, filter: &str) -> FakeDevice {
        let rest = url.trim_start_matches("mqtt://");
        let (host, port) = rest.rsplit_once(':').expect("host:port");
        let mut opts = MqttOptions::new(
            format!("fake-{id}-{}", free_port()),
            host,
            port.parse::<u16>().expect("port"),
        );
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let (tx, commands) = tokio::sync::mpsc::channel(1000);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let sub = client.clone();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let mut v: serde_json::Value =
                            serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                        if let serde_json::Value::Object(o) = &mut v {
                            o.insert("_topic".into(), p.topic.clone().into());
                        }
                        let _ = tx.send(v).await;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("device subscribes within 10 s")
            .expect("device task");
        FakeDevice {
            client,
            commands,
            task,
            id: id.to_owned(),
        }
    }

    /// The next command received, or None after `timeout`.
    pub async fn next_command(&mut self, timeout: Duration) -> Option<serde_json::Value> {
        tokio::time::timeout(timeout, self.commands.recv())
            .await
            .ok()
            .flatten()
    }

    /// Publishes an answer on `devices/{id}/commands/ack`.
    pub async fn answer(&self, body: serde_json::Value) {
        self.client
            .publish(
                format!("devices/{}/commands/ack", self.id),
                QoS::AtLeastOnce,
                false,
                body.to_string(),
            )
            .await
            .expect("publish ack");
    }

    /// Publishes presence.
    pub async fn presence(&self, status: &str) {
        self.client
            .publish(
                format!("devices/{}/status", self.id),
                QoS::AtLeastOnce,
                true,
                status,
            )
            .await
            .expect("publish status");
    }
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A WebSocket client of `/ws`.
pub struct Ws {
    stream: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Ws {
    /// Connects to the daemon's `/ws`.
    pub async fn connect(addr: SocketAddr) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("connect /ws");
        Ws { stream }
    }

    /// Sends a text frame.
    pub async fn send(&mut self, text: impl Into<String>) {
        use futures_util::SinkExt;
        self.stream
            .send(tokio_tungstenite::tungstenite::Message::Text(
                text.into().into(),
            ))
            .await
            .expect("send");
    }

    /// Sends a JSON value.
    pub async fn send_json(&mut self, v: serde_json::Value) {
        self.send(v.to_string()).await;
    }

    /// The next JSON text message (pings are answered by the library), or None.
    pub async fn recv(&mut self, timeout: Duration) -> Option<serde_json::Value> {
        use futures_util::StreamExt;
        tokio::time::timeout(timeout, async {
            while let Some(Ok(msg)) = self.stream.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
                    return Some(serde_json::from_str(t.as_str()).expect("server sends JSON"));
                }
                if msg.is_close() {
                    return None;
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }

    /// The next message, which must have `"type": ty`.
    pub async fn expect(&mut self, ty: &str, timeout: Duration) -> serde_json::Value {
        let m = self
            .recv(timeout)
            .await
            .unwrap_or_else(|| panic!("no {ty} message"));
        assert_eq!(m["type"], ty, "{m}");
        m
    }
}

impl SseClient {
    /// Like `connect`, with `Authorization: Bearer`.
    pub async fn connect_with_token(addr: SocketAddr, path: &str, token: &str) -> SseClient {
        let response = http()
            .get(format!("http://{addr}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET /events");
        assert_eq!(response.status(), 200, "GET {path}");
        let mut c = SseClient {
            response,
            buf: String::new(),
            comments: Vec::new(),
            ended: false,
            last_id: None,
        };
        while !c.buf.contains("retry: ") {
            c.fill().await;
            assert!(!c.ended, "stream ended before it started");
        }
        c
    }
}

impl Ws {
    /// Waits for the server's close frame and returns its code.
    pub async fn close_frame(&mut self, timeout: Duration) -> Option<u16> {
        use futures_util::StreamExt;
        tokio::time::timeout(timeout, async {
            while let Some(Ok(msg)) = self.stream.next().await {
                if let tokio_tungstenite::tungstenite::Message::Close(frame) = msg {
                    return frame.map(|f| u16::from(f.code));
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
    }
}

/// Reads a stalled raw SSE client's socket to its end (the daemon cut it off) and returns
/// the text, after checking it ends with the "too slow" notice, and its last `id:`.
pub fn read_cut_stream(mut slow: std::net::TcpStream) -> (String, String) {
    use std::io::Read as _;
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut text = Vec::new();
    let _ = slow.read_to_end(&mut text);
    let text = String::from_utf8_lossy(&text).into_owned();
    assert!(text.contains("too slow"), "the stream ends with a notice");
    let last_id = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("it got some events first")
        .to_owned();
    (text, last_id)
}

/// Resumes `path` with `Last-Event-ID: last_id` and checks that readings `from..to` (by
/// their `n`) come next, in order.
pub async fn assert_resumes(
    addr: SocketAddr,
    path: &str,
    last_id: &str,
    from: i64,
    to: i64,
    timeout: Duration,
) {
    let mut resumed = SseClient::connect(addr, path, Some(last_id)).await;
    let rest = resumed.take("reading", (to - from) as usize, timeout).await;
    assert_eq!(
        rest.iter().map(SseEvent::n).collect::<Vec<_>>(),
        (from..to).collect::<Vec<_>>(),
        "resumed after {last_id}"
    );
}
