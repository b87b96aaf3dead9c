//! What the benchmarks share: a private Mosquitto and the release daemon, each started on
//! free loopback ports and stopped by a Drop guard (children by their pid); argument
//! parsing, the runtime entry point, MQTT clients (a publisher, a device that answers
//! commands), WebSocket and SSE clients, CPU accounting and the machine's description.

#![allow(dead_code, reason = "each benchmark uses a different part")]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio, Termination};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Packet, QoS};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{WebSocketStream, client_async};
use tokio_util::sync::CancellationToken;

/// Debian's Mosquitto.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// How long the daemon may take to print its address and answer /readyz.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest handshake: MQTT connect or subscribe, WebSocket upgrade, SSE response head.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// QoS 1 messages a bench MQTT client may have unacknowledged (rumqttc's default is 100).
pub const MQTT_INFLIGHT: u16 = 1000;
/// Room in rumqttc's request channel, so a publishing task rarely waits on the event loop.
pub const MQTT_REQUEST_CAPACITY: usize = 10_000;

// ---------------------------------------------------------------------------------------
// Command line and runtime
// ---------------------------------------------------------------------------------------

/// Parses a benchmark's arguments with `parse`. Break: leave with this exit code (an error
/// printed with the usage: 2; `--help`, the usage printed: success). Continue: run.
pub fn parse_args<A>(
    usage: &str,
    parse: impl FnOnce(std::iter::Skip<std::env::Args>) -> anyhow::Result<A>,
    wants_help: impl FnOnce(&A) -> bool,
) -> ControlFlow<ExitCode, A> {
    match parse(std::env::args().skip(1)) {
        Ok(a) if wants_help(&a) => {
            println!("{usage}");
            ControlFlow::Break(ExitCode::SUCCESS)
        }
        Ok(a) => ControlFlow::Continue(a),
        Err(e) => {
            eprintln!("error: {e:#}\n\n{usage}");
            ControlFlow::Break(ExitCode::from(2))
        }
    }
}

/// The value of option `name`: a whole number from `min` to `max`.
pub fn number(name: &str, value: Option<String>, min: u64, max: u64) -> anyhow::Result<u64> {
    let value = value.ok_or_else(|| anyhow!("{name} needs a value"))?;
    match value.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => bail!("{name} {value:?}: expected a whole number from {min} to {max}"),
    }
}

/// The value of option `name`: a path.
pub fn path_value(name: &str, value: Option<String>) -> anyhow::Result<PathBuf> {
    value
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{name} needs a path"))
}

// ---------------------------------------------------------------------------------------
// Processes: Mosquitto and the daemon, each behind a Drop guard
// ---------------------------------------------------------------------------------------

/// A Mosquitto child process on a free loopback port, killed on drop (also on panic).
pub struct Mosquitto {
    /// The mosquitto process.
    pub child: Child,
    /// Its loopback listener.
    pub port: u16,
    /// The first line of `mosquitto -h`.
    pub version: String,
    /// The configuration lines beyond the listener and logging, for the report.
    pub settings: String,
    /// Holds the config and log files.
    pub dir: TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto and waits until it accepts connections. Its queue and in-flight
    /// limits are lifted; `max_queued_bytes`, if given, is written too (0: no limit).
    pub fn start(max_queued_bytes: Option<u64>) -> anyhow::Result<Mosquitto> {
        if !Path::new(MOSQUITTO).is_file() {
            bail!("{MOSQUITTO} is missing: install it with `apt-get install mosquitto`");
        }
        let version = Command::new(MOSQUITTO)
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "mosquitto".into());
        let port = free_port()?;
        let dir = tempfile::tempdir().context("creating a temp dir for Mosquitto")?;
        // Mosquitto silently drops QoS 1 messages beyond its queue limits; the benchmark
        // broker lifts them (0 means no limit) so that every message can arrive.
        let queued_bytes = max_queued_bytes
            .map(|n| format!("max_queued_bytes {n}\n"))
            .unwrap_or_default();
        let settings = format!(
            "allow_anonymous true\n\
             max_inflight_messages 0\n\
             max_queued_messages 10000000\n\
             {queued_bytes}\
             set_tcp_nodelay true\n\
             persistence false"
        );
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{settings}\nlog_dest stderr\nlog_type error\nlog_type warning\n"
            ),
        )
        .with_context(|| format!("writing {}", conf.display()))?;
        let log_path = dir.path().join("mosquitto.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("starting {MOSQUITTO}"))?;
        let mut broker = Mosquitto {
            child,
            port,
            version,
            settings,
            dir,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = broker.child.try_wait().context("checking on Mosquitto")? {
                bail!(
                    "Mosquitto exited at start-up ({status}): {}",
                    broker.log().trim()
                );
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(broker);
            }
            if Instant::now() > deadline {
                bail!(
                    "Mosquitto does not listen on {addr} after 10 s: {}",
                    broker.log().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Two report lines: the version and address, then the settings.
    pub fn describe(&self) -> String {
        format!(
            "broker:     {} on 127.0.0.1:{}\n            {}",
            self.version,
            self.port,
            self.settings.replace('\n', "; ")
        )
    }

    /// What Mosquitto logged (errors and warnings).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        // SIGKILL to our own child, by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The release daemon on a free loopback port with raised HTTP limits, stopped on drop.
pub struct Daemon {
    /// The telebridge process.
    pub child: Child,
    /// Its HTTP listener.
    pub addr: SocketAddr,
    /// Its SQLite database (unused on PostgreSQL).
    pub db: PathBuf,
    /// Its PostgreSQL database, when it has one instead of `db`.
    pub pg_url: Option<String>,
    /// Its `[mqtt] client_id` (empty when the config came from the caller).
    pub client_id: String,
    /// Holds the config, the database and the log.
    pub dir: TempDir,
    /// A client for its HTTP API.
    pub http: reqwest::Client,
}

impl Daemon {
    /// Starts the daemon against the broker on `mqtt_port` and waits for GET /readyz.
    pub async fn start(bin: &Path, mqtt_port: u16, tag: &str) -> anyhow::Result<Daemon> {
        Daemon::start_placed(bin, mqtt_port, tag, &Placement::default()).await
    }

    /// Starts the daemon like `start`, with its storage, shared group and topics as
    /// `placement` says (SQLite in its temp dir by default); waits for GET /readyz.
    pub async fn start_placed(
        bin: &Path,
        mqtt_port: u16,
        tag: &str,
        placement: &Placement,
    ) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir().context("creating a temp dir for the daemon")?;
        let db = dir.path().join("bench.db");
        let config = dir.path().join("telebridge.toml");
        let client_id = format!("telebridge-bench-{tag}");
        std::fs::write(
            &config,
            format!(
                "[broker]\nmode = \"external\"\n\n\
                 [mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\nclient_id = \"{client_id}\"\n{}\n\
                 [http]\nlisten = \"127.0.0.1:0\"\nmax_sse_clients = 20000\nmax_streams_per_ip = 20000\nsse_buffer = 262144\n\n\
                 {}\n\
                 [commands]\nrate_limit = 100000\n\n\
                 [log]\nlevel = \"warn\"\n",
                placement.mqtt_lines(),
                placement.storage_and_topics(&db),
            ),
        )?;
        let mut daemon = Daemon::spawn(bin, &[], dir, db, &config).await?;
        daemon.client_id = client_id;
        daemon.pg_url = placement.postgres_url.clone();
        Ok(daemon)
    }

    /// Starts the daemon like `start`, but with the config that `config` returns (given the
    /// database path to use; it must listen on `127.0.0.1:0` for the address line) and with
    /// `env` added to its environment (such as `_RJEM_MALLOC_CONF`); waits for GET /readyz.
    pub async fn start_with_config(
        bin: &Path,
        env: &[(String, String)],
        config: impl FnOnce(&Path) -> String,
    ) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir().context("creating a temp dir for the daemon")?;
        let db = dir.path().join("bench.db");
        let config_path = dir.path().join("telebridge.toml");
        std::fs::write(&config_path, config(&db))
            .with_context(|| format!("writing {}", config_path.display()))?;
        Daemon::spawn(bin, env, dir, db, &config_path).await
    }

    /// Runs `bin run --config config` with `env` added to its environment, its stderr in
    /// `dir`/daemon.log, and waits for its address line and GET /readyz.
    async fn spawn(
        bin: &Path,
        env: &[(String, String)],
        dir: TempDir,
        db: PathBuf,
        config: &Path,
    ) -> anyhow::Result<Daemon> {
        let stderr = std::fs::File::create(dir.path().join("daemon.log"))?;
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take();
        // reqwest has rustls without a provider of its own; ours is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        let mut daemon = Daemon {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            db,
            pg_url: None,
            client_id: String::new(),
            dir,
            http,
        };
        // A thread reads stdout for the address line, then drains it until the daemon exits.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.strip_prefix("telebridge dashboard: http://") {
                        let _ = tx.send(rest.trim_end_matches('/').to_owned());
                    }
                }
            });
        }
        let addr = match timeout(DAEMON_START_TIMEOUT, rx.recv()).await {
            Ok(Some(a)) => a,
            Ok(None) => bail!("the daemon exited at start-up: {}", daemon.log_tail()),
            Err(_) => bail!(
                "the daemon printed no address within {DAEMON_START_TIMEOUT:?}: {}",
                daemon.log_tail()
            ),
        };
        daemon.addr = addr
            .parse()
            .with_context(|| format!("the daemon printed address {addr:?}"))?;
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        loop {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("the daemon exited ({status}): {}", daemon.log_tail());
            }
            let ready = daemon
                .http
                .get(format!("http://{}/readyz", daemon.addr))
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 200);
            if ready {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                bail!(
                    "GET /readyz is not 200 after {DAEMON_START_TIMEOUT:?}: {}",
                    daemon.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// GET /metrics as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        get_text(&self.http, self.addr, "/metrics").await
    }

    /// The last 20 lines of the daemon's stderr.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.path().join("daemon.log"), 20)
    }

    /// The lines of its stderr that are warnings or errors (it logs at `warn`).
    pub fn log_problems(&self) -> Vec<String> {
        log_problems(&self.dir.path().join("daemon.log"))
    }

    /// Readings in its database (SQLite or PostgreSQL).
    pub async fn count_readings(&self) -> anyhow::Result<u64> {
        match &self.pg_url {
            Some(url) => pg_count_readings(url).await,
            None => sqlite_count_readings(&self.db).await,
        }
    }
}

/// The lines of a daemon log that hold a WARN or ERROR (ANSI colours stripped).
pub fn log_problems(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
        .collect()
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `SELECT count(*) FROM readings` on an SQLite file, read-only.
pub async fn sqlite_count_readings(db: &Path) -> anyhow::Result<u64> {
    use sqlx::Connection as _;
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true);
    let mut conn = sqlx::sqlite::SqliteConnection::connect_with(&opts)
        .await
        .with_context(|| format!("opening {} read-only", db.display()))?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
        .fetch_one(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(n as u64)
}

/// `SELECT count(*) FROM readings` on a PostgreSQL database.
pub async fn pg_count_readings(url: &str) -> anyhow::Result<u64> {
    use sqlx::Connection as _;
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
        .fetch_one(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(n as u64)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM by pid (a clean shutdown), SIGKILL if it is still there after 10 s.
        let pid = self.child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("the daemon (pid {pid}) ignored SIGTERM for 10 s; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file (empty if it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// MQTT clients
// ---------------------------------------------------------------------------------------

/// Options of a bench MQTT client on the loopback broker: keep-alive 30 s, clean session,
/// MQTT_INFLIGHT QoS 1 messages in flight.
pub fn mqtt_options(client_id: &str, port: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_inflight(MQTT_INFLIGHT);
    opts
}

/// Connects a rumqttc client with TCP_NODELAY and waits for the ConnAck; `who` names it in
/// errors.
pub async fn mqtt_connect(
    opts: MqttOptions,
    who: &str,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (host, port) = opts.broker_address();
    let (client, mut eventloop) = AsyncClient::new(opts, MQTT_REQUEST_CAPACITY);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    match timeout(HANDSHAKE_TIMEOUT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok((client, eventloop)),
        Ok(Ok(other)) => bail!("{who}: expected a ConnAck, got {other:?}"),
        Ok(Err(e)) => bail!("{who}: cannot connect to {host}:{port}: {e}"),
        Err(_) => bail!("{who}: no ConnAck within {HANDSHAKE_TIMEOUT:?}"),
    }
}

/// The next event of a client's event loop, or None once `stop` is cancelled. A connection
/// error is polled again after 100 ms (rumqttc reconnects); the first one is reported as
/// "{who} connection error", unless `expected` says a stop is under way, and sets `warned`.
pub async fn next_event(
    eventloop: &mut EventLoop,
    stop: &CancellationToken,
    who: &str,
    warned: &mut bool,
    expected: impl Fn() -> bool,
) -> Option<Event> {
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return None,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(ev) => return Some(ev),
            Err(e) => {
                if !*warned && !expected() {
                    *warned = true;
                    eprintln!("{who} connection error: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A publisher on the loopback broker whose event loop runs in a task that counts PUBACKs.
pub struct Publisher {
    /// Its client, for publishing.
    pub client: AsyncClient,
    /// PUBACKs received so far.
    pub acked: Arc<AtomicU64>,
    stop: CancellationToken,
    /// Set before the disconnect, so its connection error is expected.
    stopping: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects client `id` (`mqtt_connect`) and starts its event loop task.
    pub async fn connect(port: u16, id: &str) -> anyhow::Result<Publisher> {
        let (client, mut eventloop) = mqtt_connect(mqtt_options(id, port), "publisher").await?;
        let acked = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let stopping = Arc::new(AtomicBool::new(false));
        let task = {
            let acked = acked.clone();
            let stop = stop.clone();
            let stopping = stopping.clone();
            let mut warned = false;
            tokio::spawn(async move {
                let expected = || stopping.load(Ordering::Relaxed);
                while let Some(ev) =
                    next_event(&mut eventloop, &stop, "publisher", &mut warned, expected).await
                {
                    if let Event::Incoming(Packet::PubAck(_)) = ev {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Publisher {
            client,
            acked,
            stop,
            stopping,
            task,
        })
    }

    /// Disconnects, then stops the event loop task (waiting for it up to 2 s).
    pub async fn stop(self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.stop.cancel();
        let _ = timeout(Duration::from_secs(2), self.task).await;
    }
}

/// Publishes `payload` on `topic` at QoS 1, giving up when rumqttc's request queue does not
/// take it within 5 s.
pub async fn publish_qos1(client: &AsyncClient, topic: &str, payload: &[u8]) -> anyhow::Result<()> {
    timeout(
        Duration::from_secs(5),
        client.publish(topic, QoS::AtLeastOnce, false, payload.to_vec()),
    )
    .await
    .context("the publisher's queue did not move for 5 s")?
    .context("publishing")
}

/// A simulated device, already connected and subscribed to `devices/{device}/commands`,
/// whose event loop runs in a task that answers every command there at once on
/// `devices/{device}/commands/ack` with `ack(id)`.
pub struct AnsweringDevice {
    /// Acks queued so far.
    pub answered: Arc<AtomicU64>,
    stop: CancellationToken,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl AnsweringDevice {
    /// Starts the answering task; it ends when `stop` is cancelled.
    pub fn spawn(
        client: AsyncClient,
        mut eventloop: EventLoop,
        device: &str,
        stop: CancellationToken,
        ack: impl Fn(&str) -> String + Send + 'static,
    ) -> AnsweringDevice {
        let commands = format!("devices/{device}/commands");
        let acks = format!("devices/{device}/commands/ack");
        let answered = Arc::new(AtomicU64::new(0));
        let task = {
            let answered = answered.clone();
            let stop = stop.clone();
            let client = client.clone();
            tokio::spawn(async move {
                // One warning in all: about the connection or about a full request queue.
                let mut warned = false;
                let expected = || stop.is_cancelled();
                while let Some(ev) =
                    next_event(&mut eventloop, &stop, "device", &mut warned, expected).await
                {
                    let Event::Incoming(Packet::Publish(p)) = ev else {
                        continue;
                    };
                    if p.topic != commands {
                        continue;
                    }
                    let id = serde_json::from_slice::<Value>(&p.payload)
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_owned));
                    let Some(id) = id else { continue };
                    // From the poll loop itself: never wait on the request channel.
                    if client
                        .try_publish(&acks, QoS::AtLeastOnce, false, ack(&id))
                        .is_ok()
                    {
                        answered.fetch_add(1, Ordering::Relaxed);
                    } else if !warned {
                        warned = true;
                        eprintln!("device: could not queue an ack");
                    }
                }
            })
        };
        AnsweringDevice {
            answered,
            stop,
            client,
            task,
        }
    }

    /// Cancels its stop token and waits for the task up to 2 s.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = timeout(Duration::from_secs(2), self.task).await;
        drop(self.client);
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket and SSE clients
// ---------------------------------------------------------------------------------------

/// A WebSocket connection to the daemon.
pub type Ws = WebSocketStream<TcpStream>;

/// Opens the daemon's `/ws` (TCP_NODELAY), each step bounded by HANDSHAKE_TIMEOUT.
pub async fn connect_ws(addr: SocketAddr) -> anyhow::Result<Ws> {
    let stream = timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .context("connecting to the daemon timed out")?
        .context("connecting to the daemon")?;
    stream.set_nodelay(true)?;
    let (ws, resp) = timeout(
        HANDSHAKE_TIMEOUT,
        client_async(format!("ws://{addr}/ws"), stream),
    )
    .await
    .context("WebSocket handshake timed out")?
    .context("WebSocket handshake")?;
    if resp.status().as_u16() != 101 {
        bail!("GET /ws answered {}", resp.status());
    }
    Ok(ws)
}

/// A frame from the daemon's WebSocket as its text and JSON; None for a frame that is
/// neither text nor a close (a ping, say). A close frame or text that is not JSON is an error.
pub fn ws_json(frame: &Message) -> anyhow::Result<Option<(&str, Value)>> {
    let text = match frame {
        Message::Text(t) => t.as_str(),
        Message::Close(c) => bail!("the daemon closed the WebSocket: {c:?}"),
        _ => return Ok(None),
    };
    let v: Value = serde_json::from_str(text)
        .with_context(|| format!("the daemon sent a frame that is not JSON: {text:?}"))?;
    Ok(Some((text, v)))
}

/// Connects, sends `GET path` with `headers` (whole lines, each ending in `\r\n`, such as
/// `User-Agent`) after `Accept: text/event-stream`, reads the response head and checks for
/// 200. Returns the stream and the number of body bytes already in `buf`.
pub async fn open_sse(
    addr: SocketAddr,
    path: &str,
    headers: &str,
    buf: &mut [u8],
) -> anyhow::Result<(TcpStream, usize)> {
    let mut stream = TcpStream::connect(addr).await.context("connecting")?;
    stream.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{headers}\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut filled = 0;
    loop {
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            bail!(
                "connection closed during the response head: {:?}",
                String::from_utf8_lossy(&buf[..filled])
            );
        }
        filled += n;
        if let Some(end) = find_subslice(&buf[..filled], b"\r\n\r\n") {
            let status_line = buf[..end].split(|&b| b == b'\r').next().unwrap_or(b"");
            if !status_line.starts_with(b"HTTP/1.1 200") {
                bail!(
                    "GET {path}: {}",
                    String::from_utf8_lossy(&buf[..filled]).trim()
                );
            }
            let body_start = end + 4;
            buf.copy_within(body_start..filled, 0);
            return Ok((stream, filled - body_start));
        }
        if filled == buf.len() {
            bail!("response head larger than {} bytes", buf.len());
        }
    }
}

/// The number that the ASCII digits at the start of `digits` spell; None if there are none
/// or it overflows a u64.
pub fn leading_u64(digits: &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    let mut any = false;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// Position of the first `needle` byte: eight bytes at a time (SWAR), then the tail.
pub fn find_byte(hay: &[u8], needle: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pattern = LO * u64::from(needle);
    let mut i = 0;
    while i + 8 <= hay.len() {
        let mut word = [0u8; 8];
        word.copy_from_slice(&hay[i..i + 8]);
        let x = u64::from_le_bytes(word) ^ pattern;
        // The lowest set bit marks the first zero byte of x (borrows only run upwards).
        let zero = x.wrapping_sub(LO) & !x & HI;
        if zero != 0 {
            return Some(i + (zero.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    hay[i..].iter().position(|&b| b == needle).map(|p| i + p)
}

/// Position of the first occurrence of `needle` (not empty).
pub fn find_subslice(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(p) = find_byte(&hay[from..], needle[0]) {
        let at = from + p;
        if hay[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

// ---------------------------------------------------------------------------------------
// Commands: a WebSocket client that times them, and a device that answers them
// ---------------------------------------------------------------------------------------

/// Longer than the daemon's `[commands] timeout` (30 s), which answers `timeout` itself.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(35);

/// What [`drive`] saw of the commands it sent.
#[derive(Default)]
pub struct Driven {
    /// Commands that got their final answer (ack, error, timeout or expiry).
    pub done: u64,
    pub ok: u64,
    pub errors: u64,
    pub timeouts: u64,
    /// `accepted` with a status other than `sent`.
    pub queued: u64,
    /// Send of the command frame -> receipt of its `ack`, microseconds.
    pub latency_us: Vec<u32>,
    /// Send -> receipt of its `accepted`, microseconds.
    pub accepted_us: Vec<u32>,
    /// The daemon's own `rtt_ms` of each ack.
    pub server_rtt_ms: Vec<f64>,
    pub first_problem: Option<String>,
}

impl Driven {
    /// Adds what `other` saw (the first problem stays the earliest).
    pub fn absorb(&mut self, other: Driven) {
        self.done += other.done;
        self.ok += other.ok;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.queued += other.queued;
        self.latency_us.extend(other.latency_us);
        self.accepted_us.extend(other.accepted_us);
        self.server_rtt_ms.extend(other.server_rtt_ms);
        if self.first_problem.is_none() {
            self.first_problem = other.first_problem;
        }
    }
}

/// Sends `count` `ping` commands to `device` with refs from `first_ref`, keeping
/// `concurrency` in flight, and times each from its send to its `ack`. Stops at `deadline`
/// with what it has.
pub async fn drive(
    ws: &mut Ws,
    device: &str,
    first_ref: u64,
    count: u64,
    concurrency: u64,
    deadline: Instant,
) -> anyhow::Result<Driven> {
    let mut out = Driven {
        latency_us: Vec::with_capacity(count as usize),
        accepted_us: Vec::with_capacity(count as usize),
        server_rtt_ms: Vec::with_capacity(count as usize),
        ..Driven::default()
    };
    // ref -> send time; id -> ref.
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut ids: HashMap<String, u64> = HashMap::new();
    let mut next = 0u64;
    while next < count && next < concurrency {
        send_command(ws, device, first_ref + next, &mut sent).await?;
        next += 1;
    }
    while out.done < count {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let frame = match timeout(left.min(REPLY_TIMEOUT), ws.next()).await {
            Err(_) if left <= REPLY_TIMEOUT => break,
            Err(_) => bail!(
                "no WebSocket message for {REPLY_TIMEOUT:?} with {} command(s) in flight",
                sent.len()
            ),
            Ok(None) => bail!("the daemon closed the WebSocket"),
            Ok(Some(Err(e))) => bail!("WebSocket: {e}"),
            Ok(Some(Ok(f))) => f,
        };
        let received = Instant::now();
        let Some((text, v)) = ws_json(&frame)? else {
            continue;
        };
        let finished = match v["type"].as_str() {
            Some("accepted") => {
                let reference = v["ref"].as_u64();
                let id = v["id"].as_str().unwrap_or_default().to_owned();
                if let Some(at) = reference.and_then(|r| sent.get(&r)) {
                    out.accepted_us.push(
                        received
                            .duration_since(*at)
                            .as_micros()
                            .min(u32::MAX as u128) as u32,
                    );
                }
                if v["status"].as_str() != Some("sent") {
                    out.queued += 1;
                    out.first_problem
                        .get_or_insert_with(|| format!("accepted but not sent: {text}"));
                }
                if let Some(r) = reference {
                    ids.insert(id, r);
                }
                None
            }
            Some("ack") => {
                let id = v["id"].as_str().unwrap_or_default();
                let Some(r) = ids.remove(id) else {
                    out.first_problem
                        .get_or_insert_with(|| format!("ack for an unknown id: {text}"));
                    continue;
                };
                if let Some(at) = sent.remove(&r) {
                    out.latency_us.push(
                        received
                            .duration_since(at)
                            .as_micros()
                            .min(u32::MAX as u128) as u32,
                    );
                }
                if let Some(rtt) = v["rtt_ms"].as_f64() {
                    out.server_rtt_ms.push(rtt);
                }
                if v["ok"].as_bool() == Some(true) {
                    out.ok += 1;
                } else {
                    out.errors += 1;
                    out.first_problem
                        .get_or_insert_with(|| format!("device answered not ok: {text}"));
                }
                Some(r)
            }
            Some("timeout") | Some("expired") => {
                out.timeouts += 1;
                out.first_problem.get_or_insert_with(|| text.to_owned());
                let id = v["id"].as_str().unwrap_or_default();
                let r = ids.remove(id);
                if let Some(r) = r {
                    sent.remove(&r);
                }
                Some(r.unwrap_or(u64::MAX))
            }
            Some("error") => {
                out.errors += 1;
                out.first_problem.get_or_insert_with(|| text.to_owned());
                let r = v["ref"].as_u64();
                if let Some(r) = r {
                    sent.remove(&r);
                }
                Some(r.unwrap_or(u64::MAX))
            }
            _ => {
                out.first_problem
                    .get_or_insert_with(|| format!("unexpected frame: {text}"));
                None
            }
        };
        if finished.is_some() {
            out.done += 1;
            if next < count {
                send_command(ws, device, first_ref + next, &mut sent).await?;
                next += 1;
            }
        }
    }
    Ok(out)
}

async fn send_command(
    ws: &mut Ws,
    device: &str,
    reference: u64,
    sent: &mut HashMap<u64, Instant>,
) -> anyhow::Result<()> {
    let text =
        format!(r#"{{"type":"command","device":"{device}","name":"ping","ref":{reference}}}"#);
    sent.insert(reference, Instant::now());
    timeout(HANDSHAKE_TIMEOUT, ws.send(Message::text(text)))
        .await
        .context("sending a command timed out")?
        .context("sending a command")?;
    Ok(())
}

/// Waits until the daemon lists the device as online (its retained `online` was committed).
pub async fn wait_online(daemon: &Daemon, device: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = get_text(&daemon.http, daemon.addr, "/api/devices").await {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let online = v["devices"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["id"] == device && d["online"].as_bool() == Some(true))
            });
            if online {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the daemon does not list {device} as online after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects a simulated device, subscribes to its command topic, and, if `announce`, sets
/// its last will (`offline`, retained, on its status topic) and announces `online`
/// (retained) there; then answers every command at once with `ack(id)` until `stop` is
/// cancelled (or [`AnsweringDevice::stop`]).
pub async fn fake_device(
    port: u16,
    device: &str,
    announce: bool,
    stop: CancellationToken,
    ack: impl Fn(&str) -> String + Send + 'static,
) -> anyhow::Result<AnsweringDevice> {
    let commands = format!("devices/{device}/commands");
    let status = format!("devices/{device}/status");
    let mut opts = mqtt_options(&format!("{device}-{}", std::process::id()), port);
    if announce {
        opts.set_last_will(LastWill::new(&status, "offline", QoS::AtLeastOnce, true));
    }
    let (client, mut eventloop) = mqtt_connect(opts, "device").await?;
    client
        .subscribe(&commands, QoS::AtLeastOnce)
        .await
        .context("device: subscribing")?;
    if announce {
        client
            .publish(&status, QoS::AtLeastOnce, true, "online")
            .await
            .context("device: announcing online")?;
    }
    // Until the SubAck and the PubAck of `online`.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let (mut subscribed, mut announced) = (false, !announce);
    while !(subscribed && announced) {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed = true,
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => announced = true,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("device: {e}"),
            Err(_) => bail!("device: no SubAck/PubAck within {HANDSHAKE_TIMEOUT:?}"),
        }
    }
    Ok(AnsweringDevice::spawn(client, eventloop, device, stop, ack))
}

/// The answer of a device that carried a command out: `{"id":..,"ok":true}`.
pub fn ack_ok(id: &str) -> String {
    serde_json::json!({"id": id, "ok": true}).to_string()
}

/// Nearest-rank percentile of sorted values (floats).
pub fn percentile_f(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------------------
// Measuring and reporting
// ---------------------------------------------------------------------------------------

/// A free loopback port.
pub fn free_port() -> anyhow::Result<u16> {
    // There is a small window in which another process could take it; start-up reports it.
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free loopback port")?
        .port())
}

/// GET a path on the daemon as text.
pub async fn get_text(
    http: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<String> {
    let resp = http
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .with_context(|| format!("GET {path}"))?;
    Ok(resp.text().await?)
}

/// The value of one un-labelled Prometheus sample.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Milliseconds for a table: two decimals below 10, one above, `-` for none.
pub fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(ms) if ms < 10.0 => format!("{ms:.2}"),
        Some(ms) => format!("{ms:.1}"),
        None => "-".into(),
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// CPU seconds so far of the daemon, the broker and this process, and the busy seconds of
/// the whole machine (all cores; the difference is what other processes used).
pub fn cpu_snapshot(pids: [u32; 3]) -> [f64; 4] {
    let [a, b, c] = pids.map(cpu_seconds);
    [a, b, c, machine_busy_seconds()]
}

/// Busy CPU seconds of all cores together since boot, from the `cpu` line of /proc/stat.
pub fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
    (at(0) + at(1) + at(2) + at(5) + at(6) + at(7)) / clock_ticks_per_second()
}

/// Seconds all cores spent serving interrupts and softirqs since boot (the irq and softirq
/// fields of /proc/stat's `cpu` line), such as much of the loopback network's path. With
/// tick-based CPU accounting and no CONFIG_IRQ_TIME_ACCOUNTING, that time is also in the
/// system time of whichever process it interrupted.
pub fn machine_irq_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    (v.get(5).copied().unwrap_or(0.0) + v.get(6).copied().unwrap_or(0.0)) / clock_ticks_per_second()
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// User plus system CPU seconds of a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime: fields 14 and 15.
    stat_seconds(pid, &[14, 15])
}

/// The sum of the given clock-tick fields (numbered as in proc(5)) of `/proc/PID/stat`, in
/// seconds; 0 for a process that is gone.
fn stat_seconds(pid: u32, fields: &[usize]) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2, in parentheses) may hold spaces: count after it.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let after: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .iter()
        .filter_map(|f| after.get(f.checked_sub(3)?)?.parse::<f64>().ok())
        .sum();
    ticks / clock_ticks_per_second()
}

/// The clock ticks per second of /proc's CPU times (USER_HZ), from `getconf CLK_TCK` once;
/// 100 if that fails. `run_to_exit` asks first, so getconf never runs in a measured window.
pub fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `kB` line of /proc/PID/status, such as `VmRSS:`.
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This process's limit on open files (the soft one, which applies).
pub fn open_file_limit() -> Option<u64> {
    open_file_limits().map(|(soft, _)| soft)
}

/// This process's soft and hard limits on open files, from /proc/self/limits.
pub fn open_file_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line.split_whitespace().skip(3);
    let mut value = || -> Option<u64> {
        match fields.next()? {
            "unlimited" => Some(u64::MAX),
            v => v.parse().ok(),
        }
    };
    Some((value()?, value()?))
}

/// Makes sure this process may open `need` files: raises the soft limit to the hard one
/// when it is lower (with `prlimit --pid` on our own pid, which is setrlimit from outside;
/// the children started afterwards, such as the daemon, inherit it), and fails with what to
/// do when even the hard limit is too low. Returns the limit now in force.
pub fn ensure_open_files(need: u64) -> anyhow::Result<u64> {
    let (soft, hard) =
        open_file_limits().context("reading the open-file limit from /proc/self/limits")?;
    if soft >= need {
        return Ok(soft);
    }
    if hard < need {
        bail!(
            "the bench needs about {need} open files, and this process's hard limit is {hard} \
             (soft {soft}): raise it (`ulimit -Hn {need}` as root, or LimitNOFILE / \
             /etc/security/limits.conf) or ask for fewer connections"
        );
    }
    let pid = std::process::id().to_string();
    let out = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .stdin(Stdio::null())
        .output()
        .context("running prlimit (util-linux) to raise the open-file limit")?;
    let (now, _) = open_file_limits().context("reading the open-file limit again")?;
    if !out.status.success() || now < need {
        bail!(
            "the bench needs about {need} open files; the soft limit is {now} and raising it to \
             the hard limit {hard} failed ({}: {}); run `ulimit -n {hard}` first",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprintln!("raised this process's open-file limit from {soft} to {now} (its hard limit)");
    Ok(now)
}

/// Worker threads of a default multi-threaded tokio runtime.
pub fn tokio_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The daemon to run: `chosen` (`--daemon PATH`) if given, else the release build, the one
/// `cargo bench` just built or target/release/telebridge, built with `cargo build --release`
/// when missing.
pub fn daemon_binary(chosen: Option<&Path>) -> anyhow::Result<PathBuf> {
    match chosen {
        Some(p) if p.exists() => return Ok(p.to_owned()),
        Some(p) => bail!("--daemon {}: no such file", p.display()),
        None => {}
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_telebridge") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let p = root.join("target/release/telebridge");
    if !p.exists() {
        eprintln!(
            "NOTE: {} is missing; building it now with `cargo build --release`",
            p.display()
        );
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", "telebridge"])
            .current_dir(&root)
            .status()
            .context("running cargo build --release")?;
        if !status.success() || !p.exists() {
            bail!("`cargo build --release` failed ({status}); build the daemon first");
        }
    }
    Ok(p)
}

/// How long ago a file was modified, in minutes.
pub fn modified(p: &Path) -> String {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or("?".into(), |d| {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |n| n.as_secs())
                .saturating_sub(d.as_secs());
            format!("{} min ago", secs / 60)
        })
}

/// The machine a benchmark ran on.
pub struct Machine {
    /// What `nproc` prints.
    pub nproc: String,
    /// The CPU's model name.
    pub cpu: String,
    /// Its clock, if /proc/cpuinfo tells.
    pub mhz: Option<String>,
    /// MemTotal, such as `24684092 kB`.
    pub mem: String,
    /// The kernel release.
    pub kernel: String,
}

impl Machine {
    /// Reads nproc, /proc/cpuinfo, /proc/meminfo and the kernel release.
    pub fn read() -> Machine {
        let nproc = Command::new("nproc")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| tokio_workers().to_string());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("unknown".into(), |(_, v)| v.trim().to_owned());
        let mhz = cpuinfo
            .lines()
            .find(|l| l.starts_with("cpu MHz"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .map(|l| l["MemTotal:".len()..].trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            nproc,
            cpu,
            mhz,
            mem,
            kernel,
        }
    }

    /// One line: cores, CPU and clock, memory, kernel and the open-file limit.
    pub fn describe(&self) -> String {
        let cpu = match &self.mhz {
            Some(m) => format!("{} @ {m} MHz", self.cpu),
            None => self.cpu.clone(),
        };
        format!(
            "nproc {}, CPU {cpu}, memory {}, Linux {}, open-file limit {}",
            self.nproc,
            self.mem,
            self.kernel,
            open_file_limit().map_or("?".into(), |n| n.to_string())
        )
    }
}

/// Runs a benchmark on a multi-threaded runtime; on Ctrl-C its future is dropped, and with it
/// every guard (daemon, broker). Errors are printed; the exit code says how it went (an Ok
/// value, such as an ExitCode, may say it too).
pub fn run_to_exit<T: Termination>(
    bench: impl std::future::Future<Output = anyhow::Result<T>>,
) -> ExitCode {
    // Before any measurement, so that its getconf does not run inside one.
    clock_ticks_per_second();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        tokio::select! {
            r = bench => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(t) => t.report(),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------
// Storage backends: where a bench daemon stores, and a private PostgreSQL cluster
// ---------------------------------------------------------------------------------------

/// The storage backend a bench runs the daemon on (`--backend sqlite|postgres`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `[storage] path`: a file in the daemon's temp dir.
    Sqlite,
    /// `[storage] url`: a fresh database on the bench's own PostgreSQL cluster.
    Postgres,
}

impl Backend {
    /// The value of `--backend`.
    pub fn parse(value: Option<String>) -> anyhow::Result<Backend> {
        match value.as_deref() {
            Some("sqlite") => Ok(Backend::Sqlite),
            Some("postgres" | "postgresql" | "pg") => Ok(Backend::Postgres),
            Some(other) => bail!("--backend {other:?}: expected sqlite or postgres"),
            None => bail!("--backend needs a value: sqlite or postgres"),
        }
    }

    /// `SQLite` or `PostgreSQL`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// The shared-subscription group the bench's PostgreSQL instances join.
pub const SHARED_GROUP: &str = "tb";

/// `[topics]` that nobody publishes to: an instance with them stores nothing of its own
/// and serves only what the shared log brings (`key`: telemetry, status or ack).
pub fn unused_topic(key: &str) -> (String, String) {
    let template = match key {
        "telemetry" => "nobody/{device}/telemetry",
        "status" => "nobody/{device}/status",
        "ack" => "nobody/{device}/commands/ack",
        other => panic!("no unused topic for {other}"),
    };
    (key.to_owned(), template.to_owned())
}

/// How a bench daemon stores and subscribes; the default is SQLite in its temp dir, no
/// shared group, the default topics.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// `[storage] url`; None: `[storage] path` in the daemon's temp dir.
    pub postgres_url: Option<String>,
    /// `[mqtt] shared_group`.
    pub shared_group: Option<String>,
    /// `[topics]` entries (key, template) that replace the defaults.
    pub topics: Vec<(String, String)>,
    /// `[mqtt] qos`, when not the default (1).
    pub qos: Option<u8>,
    /// More TOML sections, as written (such as `[alerts]`).
    pub extra: String,
}

impl Placement {
    /// On PostgreSQL database `url`, in the bench's shared group.
    pub fn postgres(url: &str) -> Placement {
        Placement {
            postgres_url: Some(url.to_owned()),
            shared_group: Some(SHARED_GROUP.to_owned()),
            ..Placement::default()
        }
    }

    /// The same, with `keys` (telemetry, status, ack) on topics nobody publishes to.
    pub fn with_unused(mut self, keys: &[&str]) -> Placement {
        self.topics.extend(keys.iter().map(|k| unused_topic(k)));
        self
    }

    /// Lines for the `[mqtt]` section beyond url and client_id.
    pub fn mqtt_lines(&self) -> String {
        let mut out = String::new();
        if let Some(g) = &self.shared_group {
            out.push_str(&format!("shared_group = \"{g}\"\n"));
        }
        if let Some(q) = self.qos {
            out.push_str(&format!("qos = {q}\n"));
        }
        out
    }

    /// The `[storage]` section (SQLite at `db`, or the URL) and, if any, `[topics]`.
    pub fn storage_and_topics(&self, db: &Path) -> String {
        let toml_str = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let mut out = match &self.postgres_url {
            Some(url) => format!("[storage]\nurl = {}\n", toml_str(url)),
            None => format!(
                "[storage]\npath = {}\n",
                toml_str(&db.display().to_string())
            ),
        };
        if !self.topics.is_empty() {
            out.push_str("\n[topics]\n");
            for (k, v) in &self.topics {
                out.push_str(&format!("{k} = {}\n", toml_str(v)));
            }
        }
        if !self.extra.is_empty() {
            out.push('\n');
            out.push_str(&self.extra);
        }
        out
    }

    /// One line for a report: backend, group and the topics changed.
    pub fn describe(&self) -> String {
        let mut parts = vec![match &self.postgres_url {
            Some(_) => "PostgreSQL".to_owned(),
            None => "SQLite".to_owned(),
        }];
        if let Some(g) = &self.shared_group {
            parts.push(format!("shared_group {g}"));
        }
        for (k, v) in &self.topics {
            parts.push(format!("{k} = {v}"));
        }
        parts.join(", ")
    }
}

/// The server settings of the bench cluster beyond address and socket: commits stay
/// durable (synchronous_commit and fsync on), as telebridge acknowledges after commit.
pub const PG_SETTINGS: &[(&str, &str)] = &[
    ("shared_buffers", "256MB"),
    ("max_wal_size", "2GB"),
    ("synchronous_commit", "on"),
    ("fsync", "on"),
    ("max_connections", "200"),
    ("track_wal_io_timing", "on"),
    // Per-statement times for the report (a few per cent of overhead).
    ("shared_preload_libraries", "pg_stat_statements"),
];

/// PostgreSQL 15's server binaries (off the PATH).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A PostgreSQL cluster of the bench's own: initdb into a temp dir owned by `postgres`,
/// the server on a free port on 127.0.0.1 with its socket in that dir, run as `postgres`
/// when we are root (PostgreSQL refuses to run as root). Stopped with `pg_ctl stop -m fast`
/// on drop (its postmaster killed by pid if that fails), and the dir removed.
pub struct PgCluster {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// What `postgres --version` prints.
    pub version: String,
    /// The postmaster's process id.
    pub pid: u32,
    data: PathBuf,
    /// Holds the data directory, the socket and the server log.
    dir: TempDir,
}

impl PgCluster {
    /// initdb, start, and wait until it accepts connections (at most about a minute).
    pub fn start() -> anyhow::Result<PgCluster> {
        Self::launch(None)
    }

    /// Starts a cluster on `kept` (a data directory that outlives the run, initdb'd when it
    /// holds no cluster yet), or on a fresh one in the temp dir; the socket and the server
    /// log are in the temp dir either way.
    fn launch(kept: Option<&Path>) -> anyhow::Result<PgCluster> {
        let bin = PathBuf::from(PG_BIN);
        if !bin.join("initdb").is_file() {
            bail!(
                "{}/initdb is missing: install PostgreSQL 15's server (apt-get install postgresql-15)",
                bin.display()
            );
        }
        let version = Command::new(bin.join("postgres"))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "postgres".into());
        let dir = tempfile::Builder::new()
            .prefix("telebridge-bench-pg.")
            .tempdir()
            .context("creating a temp dir for PostgreSQL")?;
        let give_to_postgres = |p: &Path| -> anyhow::Result<()> {
            if !running_as_root() {
                return Ok(());
            }
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(p)
                .status()
                .context("running chown")?;
            if !status.success() {
                bail!("chown postgres:postgres {} failed ({status})", p.display());
            }
            Ok(())
        };
        give_to_postgres(dir.path())?;
        let data = kept.map_or_else(|| dir.path().join("data"), Path::to_owned);
        if !data.join("PG_VERSION").is_file() {
            if kept.is_some() {
                let parent = data
                    .parent()
                    .context("the PostgreSQL data directory has no parent")?;
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
                give_to_postgres(parent)?;
            }
            let mut initdb = pg_command(&bin.join("initdb"));
            initdb.arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            run_quiet(initdb, "initdb")?;
        }
        let log = dir.path().join("server.log");
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let mut opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories='{}'",
                dir.path().display()
            );
            for (k, v) in PG_SETTINGS {
                opts.push_str(&format!(" -c {k}={v}"));
            }
            let mut start = pg_command(&bin.join("pg_ctl"));
            // A kept cluster may first replay a large WAL.
            start
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "120", "-o", &opts, "start"]);
            match run_quiet(start, "pg_ctl start") {
                Ok(()) => {
                    let pid = std::fs::read_to_string(data.join("postmaster.pid"))
                        .ok()
                        .and_then(|s| s.lines().next()?.trim().parse().ok())
                        .context("reading the postmaster's pid from postmaster.pid")?;
                    let cluster = PgCluster {
                        port,
                        version,
                        pid,
                        data,
                        dir,
                    };
                    // The view, in the admin database; it sees every database's statements.
                    let mut psql = pg_command(&bin.join("psql"));
                    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
                        .arg(cluster.admin_url())
                        .args(["-c", "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"]);
                    run_quiet(psql, "psql -c 'CREATE EXTENSION pg_stat_statements'")?;
                    return Ok(cluster);
                }
                Err(e) => last_error = format!("{e:#}\n{}", log_tail(&log, 10)),
            }
        }
        bail!(
            "cannot start PostgreSQL on {}: {last_error}",
            data.display()
        )
    }

    /// The admin URL (database `postgres`).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Creates a fresh database `name` (letters, digits and `_`) and returns its URL.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        use sqlx::Connection as _;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("database name {name:?}: letters, digits and _ only");
        }
        let mut conn = sqlx::postgres::PgConnection::connect(&self.admin_url())
            .await
            .context("connecting to the bench cluster")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("CREATE DATABASE {name}"))?;
        let _ = conn.close().await;
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{name}",
            self.port
        ))
    }

    /// Two report lines: version and address, then the settings.
    pub fn describe(&self) -> String {
        format!(
            "postgres:   {} on 127.0.0.1:{} (its own cluster in {}, initdb --no-sync, run as user postgres)\n            {}",
            self.version,
            self.port,
            self.dir.path().display(),
            PG_SETTINGS
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        )
    }

    /// CPU seconds so far of the whole server: the postmaster, its live children (backends,
    /// WAL writer, checkpointer, ...) and the children it has reaped.
    pub fn cpu_seconds(&self) -> f64 {
        process_tree_cpu_seconds(self.pid)
    }

    /// pg_stat_statements' counters for database `url` now (see [`PgStatements`]).
    pub async fn statements(&self, url: &str) -> anyhow::Result<PgStatements> {
        use sqlx::Connection as _;
        let db = url.rsplit('/').next().unwrap_or_default().to_owned();
        let mut conn = sqlx::postgres::PgConnection::connect(&self.admin_url())
            .await
            .context("connecting to the bench cluster")?;
        let rows: Vec<(Option<i64>, String, i64, f64, i64)> = sqlx::query_as(
            "SELECT s.queryid, s.query, s.calls, s.total_exec_time, s.rows \
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
             WHERE d.datname = $1",
        )
        .bind(&db)
        .fetch_all(&mut conn)
        .await
        .context("reading pg_stat_statements")?;
        let _ = conn.close().await;
        let mut by_id = std::collections::HashMap::new();
        for (id, query, calls, ms, rows) in rows {
            let e = by_id
                .entry(id.unwrap_or(0))
                .or_insert_with(|| (query, 0.0, 0.0, 0.0));
            e.1 += calls as f64;
            e.2 += ms;
            e.3 += rows as f64;
        }
        Ok(PgStatements(by_id))
    }

    /// The server's lines that are warnings, errors or worse.
    pub fn log_problems(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                ["WARNING:", "ERROR:", "FATAL:", "PANIC:"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = pg_command(&PathBuf::from(PG_BIN).join("pg_ctl"));
        stop.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", "fast", "stop"]);
        if let Err(e) = run_quiet(stop, "pg_ctl stop -m fast") {
            eprintln!(
                "{e:#}; killing the postmaster (pid {}) and its children",
                self.pid
            );
            // Our own server: its children first, then the postmaster, by their pids.
            for child in children_of(self.pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &child.to_string()])
                    .status();
            }
            let _ = Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
            std::thread::sleep(Duration::from_millis(200));
        }
        // The TempDir removes the directory.
    }
}

/// pg_stat_statements of one database: query id -> (text, calls, total execution ms, rows).
/// Execution time is the server's time in the statement. COMMIT (sent by sqlx as a simple
/// query) does not appear: its WAL flush is in [`PgStats`].
#[derive(Debug, Clone, Default)]
pub struct PgStatements(std::collections::HashMap<i64, (String, f64, f64, f64)>);

impl PgStatements {
    /// The `n` statements that took the most execution time since `before`, one line each:
    /// calls, total and mean ms, rows, and the statement's start.
    pub fn top_since(&self, before: &PgStatements, n: usize) -> Vec<String> {
        let mut d: Vec<(&str, f64, f64, f64)> = self
            .0
            .iter()
            .map(|(id, (q, calls, ms, rows))| {
                let (c0, m0, r0) = before
                    .0
                    .get(id)
                    .map_or((0.0, 0.0, 0.0), |b| (b.1, b.2, b.3));
                (q.as_str(), calls - c0, ms - m0, rows - r0)
            })
            .filter(|x| x.1 > 0.0)
            .collect();
        d.sort_by(|a, b| b.2.total_cmp(&a.2));
        let total: f64 = d.iter().map(|x| x.2).sum();
        let mut out = vec![format!(
            "{:.0} statements, {:.0} ms of execution in all",
            d.iter().map(|x| x.1).sum::<f64>(),
            total
        )];
        out.extend(d.iter().take(n).map(|(q, calls, ms, rows)| {
            let q: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
            format!(
                "{calls:>7.0} x {:>8.3} ms = {ms:>8.1} ms ({:>4.1} %), {rows:>8.0} rows: {q:.110}",
                ms / calls,
                if total > 0.0 { 100.0 * ms / total } else { 0.0 }
            )
        }));
        out
    }
}

/// How long PostgreSQL backends take to report their statistics after going idle.
pub const PG_STATS_SETTLE: Duration = Duration::from_millis(1500);

/// PostgreSQL's counters at the start of a measured run, to report what the run cost.
pub struct PgSnapshot {
    stats: PgStats,
    statements: Option<PgStatements>,
}

impl PgSnapshot {
    /// The counters now of the database at `url` (none on SQLite, `url` being `None`).
    pub async fn take(pg: Option<&PgCluster>, url: Option<&str>) -> anyhow::Result<Option<Self>> {
        let Some(url) = url else { return Ok(None) };
        let statements = match pg {
            Some(pg) => Some(pg.statements(url).await?),
            None => None,
        };
        Ok(Some(PgSnapshot {
            stats: PgStats::read(url).await?,
            statements,
        }))
    }

    /// What the run cost since the snapshot, once the backends have reported: the stats and
    /// the `top` statements by execution time.
    pub async fn since(
        before: Option<Self>,
        pg: Option<&PgCluster>,
        url: Option<&str>,
        top: usize,
    ) -> anyhow::Result<(Option<PgStats>, Vec<String>)> {
        let (Some(before), Some(url)) = (before, url) else {
            return Ok((None, Vec::new()));
        };
        tokio::time::sleep(PG_STATS_SETTLE).await;
        let stats = PgStats::read(url).await?.since(&before.stats);
        let statements = match (pg, &before.statements) {
            (Some(pg), Some(b)) => pg.statements(url).await?.top_since(b, top),
            _ => Vec::new(),
        };
        Ok((Some(stats), statements))
    }
}

/// A monitor of one database's commit and WAL statistics (pg_stat_wal is cluster-wide).
#[derive(Debug, Clone, Copy, Default)]
pub struct PgStats {
    /// Transactions committed in the database.
    pub commits: f64,
    /// WAL flushes to disk (fsync/fdatasync) and the milliseconds they took.
    pub wal_syncs: f64,
    pub wal_sync_ms: f64,
    /// WAL writes and their milliseconds, and WAL bytes.
    pub wal_writes: f64,
    pub wal_write_ms: f64,
    pub wal_bytes: f64,
}

impl PgStats {
    /// The statistics as the server has them now (backends report theirs within about a
    /// second of going idle, so read the end of a run after a pause).
    pub async fn read(url: &str) -> anyhow::Result<PgStats> {
        use sqlx::Connection as _;
        let mut conn = sqlx::postgres::PgConnection::connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let (commits,): (i64,) = sqlx::query_as(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .context("reading pg_stat_database")?;
        let (wal_syncs, wal_sync_ms, wal_writes, wal_write_ms, wal_bytes): (
            i64,
            f64,
            i64,
            f64,
            f64,
        ) = sqlx::query_as(
            "SELECT wal_sync, wal_sync_time, wal_write, wal_write_time, wal_bytes::float8 \
                 FROM pg_stat_wal",
        )
        .fetch_one(&mut conn)
        .await
        .context("reading pg_stat_wal")?;
        let _ = conn.close().await;
        Ok(PgStats {
            commits: commits as f64,
            wal_syncs: wal_syncs as f64,
            wal_sync_ms,
            wal_writes: wal_writes as f64,
            wal_write_ms,
            wal_bytes,
        })
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &PgStats) -> PgStats {
        PgStats {
            commits: self.commits - before.commits,
            wal_syncs: self.wal_syncs - before.wal_syncs,
            wal_sync_ms: self.wal_sync_ms - before.wal_sync_ms,
            wal_writes: self.wal_writes - before.wal_writes,
            wal_write_ms: self.wal_write_ms - before.wal_write_ms,
            wal_bytes: self.wal_bytes - before.wal_bytes,
        }
    }

    /// One line: commits, WAL flushes and their mean time, WAL volume.
    pub fn describe(&self) -> String {
        format!(
            "{:.0} transactions in the database (reads included); {:.0} WAL flushes (fsync), {:.2} ms each, {:.2} s in all; {:.0} WAL writes, {:.1} MB of WAL",
            self.commits,
            self.wal_syncs,
            if self.wal_syncs > 0.0 {
                self.wal_sync_ms / self.wal_syncs
            } else {
                0.0
            },
            self.wal_sync_ms / 1000.0,
            self.wal_writes,
            self.wal_bytes / 1e6
        )
    }
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A command for a PostgreSQL server binary, as the `postgres` user when we are root.
fn pg_command(bin: &Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// Runs `cmd` to its end with its output captured; an error carries that output.
fn run_quiet(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The pids of the live processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// CPU seconds of `pid` with the children it has reaped (cutime, cstime) and those of
/// its live children.
pub fn process_tree_cpu_seconds(pid: u32) -> f64 {
    // utime, stime, cutime, cstime: fields 14 to 17.
    stat_seconds(pid, &[14, 15, 16, 17])
        + children_of(pid).into_iter().map(cpu_seconds).sum::<f64>()
}

/// CPU seconds of several processes together.
pub fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter().copied().map(cpu_seconds).sum()
}

/// Removes a persistent session from the broker: a clean-session connect with the same
/// client id discards it. Otherwise the broker keeps queueing QoS 1 messages for a stopped
/// daemon, and, in a shared group, keeps dealing it its share of the next run's messages.
pub async fn discard_session(port: u16, client_id: &str) -> anyhow::Result<()> {
    let (client, mut eventloop) =
        mqtt_connect(mqtt_options(client_id, port), "session discard").await?;
    client.try_disconnect().context("queueing the disconnect")?;
    let _ = timeout(Duration::from_secs(2), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

/// Stops every daemon (SIGTERM by pid, as their Drop does), then discards their broker
/// sessions.
pub async fn stop_and_discard(daemons: Vec<Daemon>, mqtt_port: u16) {
    let ids: Vec<String> = daemons
        .iter()
        .map(|d| d.client_id.clone())
        .filter(|id| !id.is_empty())
        .collect();
    drop(daemons);
    for id in ids {
        if let Err(e) = discard_session(mqtt_port, &id).await {
            eprintln!("discarding the broker session of {id}: {e:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// A PostgreSQL cluster whose data outlives the run (history's database, built once)
// ---------------------------------------------------------------------------------------

impl PgCluster {
    /// Like [`PgCluster::start`], but the data directory is `data`, kept after the run:
    /// initdb'd there when it holds no cluster yet (its parent made and, when we are root,
    /// given to `postgres`), reused as it is otherwise. The socket and the server log are in
    /// a temp dir of this run; drop stops the server the same way and leaves `data` alone.
    pub fn start_kept(data: &Path) -> anyhow::Result<PgCluster> {
        Self::launch(Some(data))
    }

    /// The URL of database `name` on this cluster (which may or may not exist).
    pub fn database_url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

/// 1234567.8 as "1,234,568".
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
