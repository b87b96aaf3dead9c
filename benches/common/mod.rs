//! What the benchmarks share: a private Mosquitto and the release daemon, each started on
//! free loopback ports and stopped by a Drop guard (children by their pid); argument
//! parsing, the runtime entry point, MQTT clients (a publisher, a device that answers
//! commands), WebSocket and SSE clients, CPU accounting and the machine's description.

#![allow(dead_code, reason = "each benchmark uses a different part")]

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio, Termination};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
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
    /// Its SQLite database.
    pub db: PathBuf,
    /// Holds the config, the database and the log.
    pub dir: TempDir,
    /// A client for its HTTP API.
    pub http: reqwest::Client,
}

impl Daemon {
    /// Starts the daemon against the broker on `mqtt_port` and waits for GET /readyz.
    pub async fn start(bin: &Path, mqtt_port: u16, tag: &str) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir().context("creating a temp dir for the daemon")?;
        let db = dir.path().join("bench.db");
        let config = dir.path().join("telebridge.toml");
        std::fs::write(
            &config,
            format!(
                "[broker]\nmode = \"external\"\n\n\
                 [mqtt]\nurl = \"mqtt://127.0.0.1:{mqtt_port}\"\nclient_id = \"telebridge-bench-{tag}\"\n\n\
                 [http]\nlisten = \"127.0.0.1:0\"\nmax_sse_clients = 20000\nmax_streams_per_ip = 20000\nsse_buffer = 262144\n\n\
                 [storage]\npath = {:?}\n\n\
                 [commands]\nrate_limit = 100000\n\n\
                 [log]\nlevel = \"warn\"\n",
                db.display().to_string()
            ),
        )?;
        Daemon::spawn(bin, &[], dir, db, &config).await
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

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// User plus system CPU seconds of a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces; utime and stime are fields 14 and 15, the 12th and
    // 13th after the closing parenthesis.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / clock_ticks_per_second()
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

/// This process's limit on open files.
pub fn open_file_limit() -> Option<u64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
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
