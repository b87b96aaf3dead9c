//! Benchmarks of the telebridge daemon against a real Mosquitto broker.
//!
//! ```text
//! cargo bench --bench bench -- ingest [--seconds N] [--messages N]
//! ```
//!
//! `ingest` checks the ingest goal of PRODUCT.md: for QoS 0 and 1 and payloads of 100 B and
//! 1 KiB, it compares the rate at which a do-nothing subscriber receives a burst of messages
//! from Mosquitto with the rate at which the release daemon (`target/release/telebridge`)
//! commits the same burst to SQLite. Rows are counted in the database, never acknowledgements.
//!
//! - `--seconds N`: the cap on every wait (default 60), so the bench is always bounded.
//! - `--messages N`: messages per burst for every case (default 200,000 for QoS 0 and
//!   100,000 for QoS 1).
//!
//! Everything (broker, publisher, subscriber, daemon) runs on this machine, as the goal asks
//! ("on the same machine and load"), so the numbers depend on the number of cores.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use sqlx::Connection as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tempfile::TempDir;
use tokio::time::timeout;

/// The topic filter telebridge subscribes to by default, and the bench subscriber too.
const TELEMETRY_FILTER: &str = "devices/+/telemetry";
/// Devices the publisher rotates through.
const DEVICES: usize = 100;
/// QoS 1 messages the publisher may have unacknowledged (rumqttc's default is 100).
const PUBLISH_INFLIGHT: u16 = 1000;
/// Room in rumqttc's request channel, so the publishing task rarely waits on the event loop.
const REQUEST_CAPACITY: usize = 10_000;
/// Longest MQTT connect or subscribe handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the SQLite row count is polled while the daemon ingests.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// A run that makes no progress for this long has stopped (lost messages or a stall).
const IDLE_LIMIT: Duration = Duration::from_secs(10);
/// The Mosquitto binary.
const MOSQUITTO: &str = "/usr/sbin/mosquitto";

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.help {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
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
    match rt.block_on(ingest(&args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "usage: cargo bench --bench bench -- ingest [--seconds N] [--messages N]

  ingest         subscriber vs telebridge ingest rate, QoS 0/1 x 100 B/1 KiB payloads
  --seconds N    cap on every wait, in seconds (default 60)
  --messages N   messages per burst (default 200000 for QoS 0, 100000 for QoS 1)";

/// Command-line options.
#[derive(Debug)]
struct Args {
    help: bool,
    /// Cap on every wait.
    timeout: Duration,
    /// Messages per burst, overriding the per-QoS defaults.
    messages: Option<u64>,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut out = Args {
            help: false,
            timeout: Duration::from_secs(60),
            messages: None,
        };
        let number = |name: &str, value: Option<String>| -> anyhow::Result<u64> {
            let value = value.ok_or_else(|| anyhow!("{name} needs a value"))?;
            match value.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("{name} {value:?}: expected a positive whole number"),
            }
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // `cargo bench` appends --bench to the arguments of harness = false targets.
                "--bench" | "ingest" => {}
                "-h" | "--help" => out.help = true,
                "--seconds" => out.timeout = Duration::from_secs(number("--seconds", args.next())?),
                "--messages" => out.messages = Some(number("--messages", args.next())?),
                other => bail!("unknown argument {other:?} (the only benchmark is \"ingest\")"),
            }
        }
        Ok(out)
    }
}

/// One benchmark case.
#[derive(Debug, Clone, Copy)]
struct Case {
    qos: QoS,
    payload: usize,
    messages: u64,
}

impl Case {
    fn qos_number(&self) -> u8 {
        self.qos as u8
    }

    fn label(&self) -> String {
        let size = if self.payload % 1024 == 0 {
            format!("{} KiB", self.payload / 1024)
        } else {
            format!("{} B", self.payload)
        };
        format!("QoS {}, {size}", self.qos_number())
    }

    /// A short tag for client ids.
    fn tag(&self) -> String {
        format!("q{}-{}b", self.qos_number(), self.payload)
    }
}

/// What one case measured.
struct CaseResult {
    subscriber: SubscriberRun,
    daemon: anyhow::Result<DaemonRun>,
}

/// What the do-nothing subscriber saw of one burst.
struct SubscriberRun {
    /// Messages received, and the time from the first to the last.
    received: Burst,
    /// Seconds the publisher took to hand every message to the broker (QoS 1: acknowledged).
    publish_seconds: f64,
    /// CPU seconds the broker used during the burst.
    broker_cpu: f64,
}

/// Messages received (or rows committed) and the time they took.
#[derive(Debug, Clone, Copy)]
struct Burst {
    count: u64,
    seconds: f64,
}

impl Burst {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.count as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// What the daemon did with one burst.
struct DaemonRun {
    /// Rows committed, and the time from the first publish to the last row.
    committed: Burst,
    /// Seconds the publisher took to hand every message to the broker (QoS 1: acknowledged).
    publish_seconds: f64,
    /// CPU seconds the daemon and the broker used during the burst.
    daemon_cpu: f64,
    broker_cpu: f64,
    /// Write transactions and the time spent in them, from /metrics.
    batches: u64,
    commit_seconds: f64,
    /// Whether the daemon stopped cleanly on SIGTERM.
    clean_exit: bool,
}

async fn ingest(args: &Args) -> anyhow::Result<bool> {
    let daemon_bin = daemon_binary()?;
    let broker = Mosquitto::start()?;
    let clock_ticks = clock_ticks_per_second();

    let mut cases = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
        let default = if qos == QoS::AtMostOnce {
            200_000
        } else {
            100_000
        };
        for payload in [100, 1024] {
            cases.push(Case {
                qos,
                payload,
                messages: args.messages.unwrap_or(default),
            });
        }
    }

    print_conditions(args, &broker, &daemon_bin, &cases);

    let mut results = Vec::new();
    for case in &cases {
        eprintln!(
            "[{}] subscriber burst of {} messages",
            case.label(),
            case.messages
        );
        let subscriber = subscriber_burst(&broker, case, args.timeout, clock_ticks)
            .await
            .with_context(|| format!("{}: subscriber run", case.label()))?;
        eprintln!(
            "[{}] subscriber received {} in {:.2} s; telebridge burst",
            case.label(),
            subscriber.received.count,
            subscriber.received.seconds
        );
        let daemon = daemon_burst(&daemon_bin, &broker, case, args.timeout, clock_ticks)
            .await
            .with_context(|| format!("{}: telebridge run", case.label()));
        if let Err(e) = &daemon {
            eprintln!("[{}] telebridge run failed: {e:#}", case.label());
        }
        results.push((*case, CaseResult { subscriber, daemon }));
    }

    print_table(&results);
    Ok(results.iter().all(|(case, r)| {
        r.daemon
            .as_ref()
            .is_ok_and(|d| d.committed.count == case.messages)
    }))
}

/// The release daemon binary that `cargo bench` built alongside this bench.
fn daemon_binary() -> anyhow::Result<PathBuf> {
    let path = match option_env!("CARGO_BIN_EXE_telebridge") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/telebridge"),
    };
    if !path.is_file() {
        bail!(
            "the daemon binary {} is missing: run `cargo build --release` first",
            path.display()
        );
    }
    Ok(path)
}

fn print_conditions(args: &Args, broker: &Mosquitto, daemon: &Path, cases: &[Case]) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .map(|l| l["MemTotal:".len()..].trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("# telebridge ingest benchmark");
    println!("machine:    {cores} cores (nproc), CPU {cpu}, memory {mem}");
    println!(
        "broker:     {} on 127.0.0.1:{}",
        broker.version, broker.port
    );
    println!("            {}", broker.settings.replace('\n', "; "));
    println!("daemon:     {}", daemon.display());
    println!(
        "            [broker] mode=external, [mqtt] qos = the case's, [log] level=warn; every other key at its default (see config.toml)"
    );
    println!(
        "load:       one rumqttc publisher, topics devices/dev-{{0..{}}}/telemetry, JSON objects padded to the payload size, QoS 1 inflight {PUBLISH_INFLIGHT}",
        DEVICES - 1
    );
    println!(
        "            messages per burst: {}",
        cases
            .iter()
            .map(|c| format!("{} {}", c.label(), c.messages))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "measure:    subscriber msg/s = received / (last - first received); telebridge rows/s = \
         rows counted in SQLite / (last row committed - first publish)"
    );
    println!(
        "            every wait capped at {} s; stalled after {} s without progress",
        args.timeout.as_secs(),
        IDLE_LIMIT.min(args.timeout).as_secs()
    );
    println!("            everything runs on this machine; SQLite in a temp dir");
    println!();
}

fn print_table(results: &[(Case, CaseResult)]) {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<14} {:>8} {:>9} {:>12} {:>9} {:>14} {:>6} {:>9}",
        "case", "N", "sub recv", "sub msg/s", "tb rows", "tb rows/s", "ratio", "all rows"
    );
    for (case, r) in results {
        let sub = r.subscriber.received;
        match &r.daemon {
            Ok(d) => {
                let ratio = if sub.rate() > 0.0 {
                    format!("{:.2}", d.committed.rate() / sub.rate())
                } else {
                    "-".into()
                };
                let _ = writeln!(
                    out,
                    "{:<14} {:>8} {:>9} {:>12} {:>9} {:>14} {:>6} {:>9}",
                    case.label(),
                    case.messages,
                    sub.count,
                    thousands(sub.rate()),
                    d.committed.count,
                    thousands(d.committed.rate()),
                    ratio,
                    if d.committed.count == case.messages {
                        "yes"
                    } else {
                        "NO"
                    },
                );
            }
            Err(_) => {
                let _ = writeln!(
                    out,
                    "{:<14} {:>8} {:>9} {:>12} {:>9} {:>14} {:>6} {:>9}",
                    case.label(),
                    case.messages,
                    sub.count,
                    thousands(sub.rate()),
                    "-",
                    "FAILED",
                    "-",
                    "NO"
                );
            }
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "details of the subscriber runs:");
    for (case, r) in results {
        let s = &r.subscriber;
        let _ = writeln!(
            out,
            "  {:<14} first to last message {:.2} s, publishing took {:.2} s; CPU mosquitto {:.2} s",
            case.label(),
            s.received.seconds,
            s.publish_seconds,
            s.broker_cpu,
        );
    }
    let _ = writeln!(out, "details of the telebridge runs:");
    for (case, r) in results {
        match &r.daemon {
            Ok(d) => {
                let avg_batch = if d.batches > 0 {
                    d.committed.count as f64 / d.batches as f64
                } else {
                    0.0
                };
                let avg_commit_ms = if d.batches > 0 {
                    d.commit_seconds * 1000.0 / d.batches as f64
                } else {
                    0.0
                };
                let _ = writeln!(
                    out,
                    "  {:<14} last row after {:.2} s, publishing took {:.2} s; CPU telebridge {:.2} s, \
                     mosquitto {:.2} s; {} transactions (~{:.0} rows, {:.2} ms each, {:.2} s in all); \
                     SIGTERM exit {}",
                    case.label(),
                    d.committed.seconds,
                    d.publish_seconds,
                    d.daemon_cpu,
                    d.broker_cpu,
                    d.batches,
                    avg_batch,
                    avg_commit_ms,
                    d.commit_seconds,
                    if d.clean_exit { "clean" } else { "NOT clean" },
                );
            }
            Err(e) => {
                let _ = writeln!(out, "  {:<14} failed: {e:#}", case.label());
            }
        }
    }
    print!("{out}");
}

/// 1234567.8 as "1,234,568".
fn thousands(v: f64) -> String {
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

// ---------------------------------------------------------------------------------------
// Mosquitto
// ---------------------------------------------------------------------------------------

/// A Mosquitto child process on a free loopback port, killed on drop (also on panic).
struct Mosquitto {
    child: Child,
    port: u16,
    version: String,
    settings: String,
    /// Holds the config and log files.
    dir: TempDir,
}

impl Mosquitto {
    fn start() -> anyhow::Result<Mosquitto> {
        if !Path::new(MOSQUITTO).is_file() {
            bail!("{MOSQUITTO} is missing: install mosquitto (apt-get install mosquitto)");
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
        // Asks the kernel for a free port; there is a small window in which another process
        // could take it before Mosquitto binds it, which start-up would then report.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free loopback port")?
            .port();
        let dir = tempfile::tempdir().context("creating a temp dir for Mosquitto")?;
        // Mosquitto silently drops QoS 1 messages beyond its queue limits; the benchmark
        // broker lifts them (0 means no limit) so that every message can arrive.
        let settings = "allow_anonymous true\n\
                        max_inflight_messages 0\n\
                        max_queued_messages 10000000\n\
                        max_queued_bytes 0\n\
                        set_tcp_nodelay true\n\
                        persistence false"
            .to_owned();
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
        broker.wait_ready()?;
        Ok(broker)
    }

    /// Waits until the broker accepts TCP connections.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().context("checking on Mosquitto")? {
                bail!(
                    "Mosquitto exited at start-up ({status}): {}",
                    self.log().trim()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "Mosquitto does not accept connections on {addr} after 10 s: {}",
                    self.log().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
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

// ---------------------------------------------------------------------------------------
// MQTT clients
// ---------------------------------------------------------------------------------------

/// Connects a rumqttc client with TCP_NODELAY and waits for the ConnAck.
async fn connect(
    client_id: &str,
    port: u16,
    clean_session: bool,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_clean_session(clean_session)
        .set_inflight(PUBLISH_INFLIGHT)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    match timeout(HANDSHAKE_TIMEOUT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => Ok((client, eventloop)),
        Ok(Ok(other)) => bail!("{client_id}: expected a ConnAck, got {other:?}"),
        Ok(Err(e)) => bail!("{client_id}: cannot connect to 127.0.0.1:{port}: {e}"),
        Err(_) => bail!("{client_id}: no ConnAck within {HANDSHAKE_TIMEOUT:?}"),
    }
}

/// Telemetry topics, one per simulated device.
fn topics() -> Vec<String> {
    (0..DEVICES)
        .map(|i| format!("devices/dev-{i}/telemetry"))
        .collect()
}

/// A JSON reading `{"ts":..,"seq":..,"temp":..,"pad":"xx.."}` of exactly `size` bytes (or
/// its unpadded length, if that is longer).
fn payload(seq: u64, size: usize) -> Vec<u8> {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut out = format!(r#"{{"ts":{ts},"seq":{seq},"temp":21.5,"pad":""#).into_bytes();
    let tail = b"\"}";
    let pad = size.saturating_sub(out.len() + tail.len());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(tail);
    out
}

/// Timings of one publisher burst.
struct Published {
    /// When the first message was handed to rumqttc.
    started: Instant,
    /// Seconds until every message was written (QoS 0) or acknowledged (QoS 1).
    seconds: f64,
}

/// Publishes `case.messages` messages as fast as the broker takes them, then disconnects.
/// For QoS 1 it returns once every message is acknowledged by the broker.
async fn publish_burst(
    port: u16,
    case: Case,
    client_id: String,
    limit: Duration,
) -> anyhow::Result<Published> {
    let (client, mut eventloop) = connect(&client_id, port, true).await?;
    let n = case.messages;
    let qos = case.qos;
    // The event loop must be polled for anything to be sent. It counts messages written
    // (QoS 0) or acknowledged by the broker (QoS 1) and reports the count on `done`.
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(0u64);
    let poller = tokio::spawn(async move {
        let mut done = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => {
                    done += 1;
                    done_tx.send_replace(done);
                }
                Ok(Event::Outgoing(Outgoing::Publish(_))) if qos == QoS::AtMostOnce => {
                    done += 1;
                    done_tx.send_replace(done);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("  {client_id}: connection failed after {done} messages: {e}");
                    return;
                }
            }
        }
    });
    let topics = topics();
    let started = Instant::now();
    let send_all = async {
        for seq in 0..n {
            let topic = topics[(seq % DEVICES as u64) as usize].clone();
            client
                .publish(topic, qos, false, payload(seq, case.payload))
                .await
                .context("queueing a publish")?;
        }
        // rumqttc sends a Disconnect without waiting for outstanding acks: wait for them.
        done_rx
            .wait_for(|&d| d >= n)
            .await
            .map_err(|_| anyhow!("the publisher connection failed"))?;
        anyhow::Ok(())
    };
    let sent = timeout(limit, send_all).await;
    let seconds = started.elapsed().as_secs_f64();
    let done = *done_rx.borrow();
    let _ = client.try_disconnect();
    let _ = timeout(Duration::from_secs(5), poller).await;
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.context(format!("after {done} of {n} messages"))),
        Err(_) => bail!("only {done} of {n} messages sent/acknowledged within {limit:?}"),
    }
    Ok(Published { started, seconds })
}

/// A do-nothing subscriber receives one burst; returns how many arrived and the time from
/// the first to the last.
async fn subscriber_burst(
    broker: &Mosquitto,
    case: &Case,
    limit: Duration,
    clock_ticks: f64,
) -> anyhow::Result<SubscriberRun> {
    let port = broker.port;
    let (client, mut eventloop) = connect(&format!("bench-sub-{}", case.tag()), port, true).await?;
    client
        .subscribe(TELEMETRY_FILTER, case.qos)
        .await
        .context("queueing the subscription")?;
    // Only once the broker confirmed the subscription may the publisher start.
    let subscribed = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(anyhow!("subscriber connection failed: {e}")),
            }
        }
    };
    timeout(HANDSHAKE_TIMEOUT, subscribed)
        .await
        .map_err(|_| anyhow!("no SubAck within {HANDSHAKE_TIMEOUT:?}"))??;

    let broker_cpu_0 = cpu_seconds(broker.pid(), clock_ticks);
    let publisher = tokio::spawn(publish_burst(
        port,
        *case,
        format!("bench-pub-sub-{}", case.tag()),
        limit,
    ));

    let n = case.messages;
    let deadline = tokio::time::Instant::now() + limit;
    let idle = IDLE_LIMIT.min(limit);
    let mut count = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    while count < n {
        // Before the first message only the overall deadline applies (connect time).
        let wait_until = if first.is_some() {
            deadline.min(tokio::time::Instant::now() + idle)
        } else {
            deadline
        };
        match tokio::time::timeout_at(wait_until, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                last = Instant::now();
                first.get_or_insert(last);
                count += 1;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("subscriber connection failed after {count} messages: {e}"),
            Err(_) => {
                eprintln!("  subscriber: stopped waiting with {count} of {n} messages");
                break;
            }
        }
    }
    let _ = client.try_disconnect();
    // Flush the disconnect (and any last PubAcks); errors no longer matter.
    let _ = timeout(Duration::from_secs(2), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    let broker_cpu = cpu_seconds(broker.pid(), clock_ticks) - broker_cpu_0;
    let published = publisher
        .await
        .context("the publisher task panicked")?
        .context("publisher")?;
    let seconds = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(SubscriberRun {
        received: Burst { count, seconds },
        publish_seconds: published.seconds,
        broker_cpu,
    })
}

/// Removes a persistent session from the broker: a clean-session connect with the same
/// client id discards it. Otherwise the broker would keep queueing QoS 1 messages for a
/// stopped daemon during the following cases.
async fn discard_session(port: u16, client_id: &str) -> anyhow::Result<()> {
    let (client, mut eventloop) = connect(client_id, port, true).await?;
    client.try_disconnect().context("queueing the disconnect")?;
    let _ = timeout(Duration::from_secs(2), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

/// A running telebridge child process, killed on drop unless it was stopped.
struct Daemon {
    child: Child,
    http: SocketAddr,
    db: PathBuf,
    /// Holds the config and the database.
    _dir: TempDir,
}

impl Daemon {
    fn start(
        bin: &Path,
        broker_port: u16,
        client_id: &str,
        qos: u8,
        limit: Duration,
    ) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir().context("creating a temp dir for telebridge")?;
        let db = dir.path().join("bench.db");
        let db_toml = toml::Value::String(db.display().to_string()).to_string();
        let config = format!(
            "[broker]\nmode = \"external\"\n\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\nclient_id = \"{client_id}\"\nqos = {qos}\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\n\
             [storage]\npath = {db_toml}\n\n\
             [log]\nlevel = \"warn\"\n"
        );
        let config_path = dir.path().join("telebridge.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Warnings and errors of the daemon show up in the bench output.
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .context("no stdout pipe to the daemon")?;
        // The daemon prints "telebridge dashboard: http://ADDR/" once its listener is bound.
        // The thread then keeps draining stdout so the daemon never blocks on a full pipe.
        let (addr_tx, addr_rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("telebridge dashboard: http://")
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(rest.trim_end_matches('/').to_owned());
                }
            }
        });
        let mut daemon = Daemon {
            child,
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            db,
            _dir: dir,
        };
        let addr = match addr_rx.recv_timeout(limit) {
            Ok(a) => a,
            Err(_) => {
                let status = daemon.child.try_wait().ok().flatten();
                bail!(
                    "telebridge did not print its dashboard address within {limit:?} (exit status: {status:?})"
                );
            }
        };
        daemon.http = addr
            .parse()
            .with_context(|| format!("telebridge printed an unreadable address {addr:?}"))?;
        daemon.wait_ready(limit)?;
        Ok(daemon)
    }

    /// Waits until GET /readyz answers 200 (broker connected, storage writable).
    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().context("checking on telebridge")? {
                bail!("telebridge exited before it was ready ({status})");
            }
            let last = match http_get(self.http, "/readyz") {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => format!("{code} {}", body.trim()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("GET /readyz did not answer 200 within {limit:?}; last answer: {last}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit; true if it exited with success in time.
    fn stop(&mut self, limit: Duration) -> anyhow::Result<bool> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .context("running kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM {} failed ({status})", self.pid());
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for telebridge")? {
                if !status.success() {
                    eprintln!("  telebridge exited with {status} after SIGTERM");
                }
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                eprintln!("  telebridge did not exit within {limit:?} of SIGTERM; killing it");
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.0 GET: returns the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let bad = || std::io::Error::other(format!("unreadable HTTP response: {response:.200}"));
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((code, body))
}

/// The value of one un-labelled Prometheus sample.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// User plus system CPU seconds of a process so far.
fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; utime and stime are fields 14 and 15,
    // the 12th and 13th after the closing parenthesis.
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
    (tick(11) + tick(12)) / ticks
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Read-only queries on the daemon's database.
struct RowCounter {
    conn: SqliteConnection,
}

impl RowCounter {
    async fn open(db: &Path) -> anyhow::Result<RowCounter> {
        let opts = SqliteConnectOptions::new().filename(db).read_only(true);
        let conn = SqliteConnection::connect_with(&opts)
            .await
            .with_context(|| format!("opening {} read-only", db.display()))?;
        Ok(RowCounter { conn })
    }

    /// The authoritative count. It scans an index, so it is not polled at a high rate.
    async fn count(&mut self) -> anyhow::Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM readings")
            .fetch_one(&mut self.conn)
            .await
            .context("counting readings")?;
        Ok(n as u64)
    }

    /// The highest seq: a cheap progress probe (one b-tree descent) for frequent polling.
    async fn max_seq(&mut self) -> anyhow::Result<i64> {
        sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM readings")
            .fetch_one(&mut self.conn)
            .await
            .context("reading max(seq)")
    }
}

/// Runs telebridge, publishes one burst, and measures the rate at which rows are committed.
async fn daemon_burst(
    bin: &Path,
    broker: &Mosquitto,
    case: &Case,
    limit: Duration,
    clock_ticks: f64,
) -> anyhow::Result<DaemonRun> {
    let client_id = format!("telebridge-bench-{}-{}", case.tag(), std::process::id());
    let run = match Daemon::start(bin, broker.port, &client_id, case.qos_number(), limit) {
        Ok(mut daemon) => {
            let result = measure_daemon(&daemon, broker, case, limit, clock_ticks).await;
            let clean_exit = daemon.stop(Duration::from_secs(20));
            result.and_then(|mut run| {
                run.clean_exit = clean_exit?;
                Ok(run)
            })
        }
        Err(e) => Err(e),
    };
    // The daemon may have connected (persistent session) even if the run failed.
    discard_session(broker.port, &client_id)
        .await
        .context("discarding the daemon's broker session")?;
    run
}

async fn measure_daemon(
    daemon: &Daemon,
    broker: &Mosquitto,
    case: &Case,
    limit: Duration,
    clock_ticks: f64,
) -> anyhow::Result<DaemonRun> {
    let mut rows = RowCounter::open(&daemon.db).await?;
    // /readyz only says the connection is up; the subscription may still be on its way, and
    // QoS 0 messages published before it would be lost. A probe reading proves that
    // messages flow end to end; the burst is then counted on top of it.
    let (probe, mut probe_loop) =
        connect(&format!("bench-probe-{}", case.tag()), broker.port, true).await?;
    let probe_poller = tokio::spawn(async move { while probe_loop.poll().await.is_ok() {} });
    let probe_deadline = Instant::now() + limit.min(Duration::from_secs(15));
    while rows.count().await? == 0 {
        if Instant::now() > probe_deadline {
            probe_poller.abort();
            bail!("a probe reading never reached SQLite: is telebridge subscribed?");
        }
        probe
            .publish(
                "devices/bench-probe/telemetry",
                case.qos,
                false,
                payload(0, 50),
            )
            .await
            .context("publishing a probe")?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = probe.try_disconnect();
    let _ = timeout(Duration::from_secs(2), probe_poller).await;
    // Let late probes land before the baseline is taken.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_count = rows.count().await?;
    let base_seq = rows.max_seq().await?;

    let n = case.messages;
    let cpu_daemon_0 = cpu_seconds(daemon.pid(), clock_ticks);
    let cpu_broker_0 = cpu_seconds(broker.pid(), clock_ticks);
    let publisher = tokio::spawn(publish_burst(
        broker.port,
        *case,
        format!("bench-pub-tb-{}", case.tag()),
        limit,
    ));

    // Poll the cheap max(seq) until it covers the burst; seqs are assigned consecutively by
    // the single writer, so this is the moment the last row was committed. The count(*)
    // afterwards is what decides whether every row is there.
    let start = Instant::now();
    let target = base_seq + n as i64;
    let mut seen = base_seq;
    let mut progress_at = Instant::now();
    let mut done_at = None;
    while Instant::now() < start + limit {
        let seq = rows.max_seq().await?;
        let now = Instant::now();
        if seq > seen {
            seen = seq;
            progress_at = now;
        }
        if seq >= target {
            done_at = Some(now);
            break;
        }
        if now.duration_since(progress_at) > IDLE_LIMIT.min(limit) {
            eprintln!(
                "  telebridge: no new rows for {:?}, stopped waiting",
                IDLE_LIMIT.min(limit)
            );
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    let last_row_at = done_at.unwrap_or(progress_at);
    let published = publisher
        .await
        .context("the publisher task panicked")?
        .context("publisher")?;
    let cpu_daemon = cpu_seconds(daemon.pid(), clock_ticks) - cpu_daemon_0;
    let cpu_broker = cpu_seconds(broker.pid(), clock_ticks) - cpu_broker_0;
    let committed = rows.count().await?.saturating_sub(base_count);
    let seconds = last_row_at
        .saturating_duration_since(published.started)
        .as_secs_f64();

    let metrics = http_get(daemon.http, "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    Ok(DaemonRun {
        committed: Burst {
            count: committed,
            seconds,
        },
        publish_seconds: published.seconds,
        daemon_cpu: cpu_daemon,
        broker_cpu: cpu_broker,
        batches: metric(&metrics, "telebridge_store_batches_total").unwrap_or(0.0) as u64,
        commit_seconds: metric(&metrics, "telebridge_store_commit_seconds_total").unwrap_or(0.0),
        clean_exit: false,
    })
}
