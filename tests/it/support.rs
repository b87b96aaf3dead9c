//! Test helpers: a Mosquitto of our own, the daemon as a child process, an MQTT publisher,
//! and readers of the daemon's SQLite file. Everything started here is stopped on drop.

#![allow(dead_code, reason = "each test file uses a different part")]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tempfile::TempDir;

/// The daemon binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_telebridge");

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
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\n\
             max_queued_messages 10000000\nmax_queued_bytes 0\nset_tcp_nodelay true\n\
             persistence true\npersistence_location {}/\nautosave_interval 1\nlog_dest stderr\nlog_type error\n",
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
    /// The SQLite file.
    pub db: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Writes a config for `broker_url` plus `extra` TOML sections and starts the daemon.
    /// `extra` may hold whole sections; `[mqtt]`, `[storage]` and `[http]` keys given here
    /// are added to ours.
    pub async fn start(broker_url: &str, extra: &str) -> Daemon {
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
        sections.add("storage", &format!("path = \"{}\"", db.display()));
        sections.add("log", "level = \"info,telebridge=debug\"");
        sections.merge(extra);
        std::fs::write(&config, sections.render()).expect("write config");
        let log = dir.path().join("daemon.log");
        let mut d = Daemon {
            child: None,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            config,
            db,
            log,
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
                if let Some(rest) = line.strip_prefix("telebridge dashboard: http://") {
                    let _ = tx.send(rest.trim_end_matches('/').parse::<SocketAddr>().ok());
                }
            }
        });
        let addr = tokio::task::spawn_blocking(move || {
            rx.recv_timeout(Duration::from_secs(20)).ok().flatten()
        })
        .await
        .expect("join");
        self.child = Some(child);
        let Some(addr) = addr else {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            panic!("telebridge did not start; its log:\n{}", self.log_text());
        };
        self.http = addr;
        let url = format!("http://{addr}/readyz");
        wait_for(Duration::from_secs(20), "telebridge to be ready", || {
            let url = url.clone();
            async move {
                let r = reqwest::get(&url).await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
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

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon is running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// GET a path on the daemon.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("http://{}{}", self.http, path))
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

    /// A read-only view of the daemon's database.
    pub async fn db(&self) -> Db {
        Db::open(&self.db).await
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

/// A read-only view of a daemon's SQLite file.
pub struct Db(SqlitePool);

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
        Db(pool)
    }

    /// Number of readings.
    pub async fn count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM readings")
            .fetch_one(&self.0)
            .await
            .expect("count")
    }

    /// Every reading in seq order.
    pub async fn rows(&self) -> Vec<Row> {
        use sqlx::Row as _;
        sqlx::query("SELECT seq, device, topic, ts, received_at, CAST(payload AS BLOB) AS payload, flags FROM readings ORDER BY seq")
            .fetch_all(&self.0)
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
    }

    /// The `n` field of every JSON reading, for loss and duplicate checks.
    pub async fn numbers(&self) -> Vec<i64> {
        sqlx::query_scalar(
            "SELECT json_extract(payload, '$.n') FROM readings WHERE flags = 0 ORDER BY seq",
        )
        .fetch_all(&self.0)
        .await
        .expect("numbers")
    }

    /// (online, last_seen) of a device, if it is known.
    pub async fn device(&self, id: &str) -> Option<(bool, i64)> {
        sqlx::query_as::<_, (bool, i64)>("SELECT online, last_seen FROM devices WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.0)
            .await
            .expect("device")
    }

    /// Waits until there are at least `n` readings.
    pub async fn wait_count(&self, n: i64, timeout: Duration) -> i64 {
        wait_for(timeout, &format!("{n} readings in SQLite"), || async move {
            let c = self.count().await;
            (c >= n).then_some(c)
        })
        .await
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
