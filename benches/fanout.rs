//! Fan-out benchmark: delivery latency from an MQTT publish to its receipt on SSE clients
//! (unfiltered, and filtered to one device each), command round trips while the fan-out
//! runs, and the memory of many idle SSE connections.
//!
//! ```text
//! cargo bench --bench fanout [-- --clients 1,100,1000 --rate 1000 --seconds 10 --idle 10000]
//! cargo bench --bench fanout -- --clients 1000 --rate 5000 --idle 0      # broadcast, 5 M events/s
//! cargo bench --bench fanout -- --filtered 10000 --devices 1000 --rate 5000   # filtered
//! cargo bench --bench fanout -- --mixed 1000 --rate 1000 [--commands 200]     # mixed
//! cargo bench --bench fanout -- --mixed 1000 --rate 5000                       # mixed, 5 M/s
//! cargo bench --bench fanout -- --backend postgres --instances 2 [--sse-on other|storing] ...
//! ```
//!
//! The cases:
//! - **Broadcast** (`--clients LIST`, one case per count): every client on
//!   `/events?type=reading` gets every reading; the publisher rotates over dev-0..dev-9.
//!   Issue 15's broadcast case is `--clients 1000 --rate 5000` (5 M events/s delivered).
//! - **Filtered** (`--filtered [CLIENTS]`, default 10,000, with `--devices D`, default
//!   1,000): client i is on `/events?type=reading&device=dev-{i * D / CLIENTS}` (the clients
//!   spread evenly over the devices, in blocks), and the publisher sends `--rate` readings/s
//!   in all, round-robin over dev-0..dev-{D-1}. Every client must receive exactly its
//!   device's readings: its count against what was published to its device, and every
//!   reading's `"device"` checked against its own (a byte compare on the `data:` line, no
//!   JSON parse). Latency on 100 sample clients (on 100 different devices when D allows).
//!   Issue 15's target: 10,000 clients over 1,000 devices at 5,000 readings/s, p99 < 20 ms
//!   with the daemon under 40 % of one core.
//! - **Mixed** (`--mixed [CLIENTS]`, default 1,000): broadcast clients at `--rate`, plus a
//!   WebSocket client on the daemon that stores (A) sending `ping` commands one at a time to
//!   a simulated device (a rumqttc client on `devices/bench-dev/commands` that answers each
//!   at once on `devices/bench-dev/commands/ack`); RTT = send of the command frame ->
//!   receipt of its `ack` on the WebSocket. `--commands` (default 200) of them idle (the SSE
//!   clients connected, nothing published yet; after 20 warm-up commands), then as many
//!   under load, each phase's sends paced evenly over `--seconds` (under load: the measured
//!   window). Targets: p99 < 5 ms at 1,000 clients x 1,000 readings/s, < 10 ms at
//!   1,000 x 5,000.
//! - **Idle** (`--idle N`): N SSE connections that receive nothing (`type=status`); the
//!   daemon's resident memory before and after.
//!
//! With none of `--filtered` and `--mixed`, the broadcast cases (default 1,100,1000) and the
//! idle test (default 10,000) run; with either, only the cases named on the command line run
//! (add `--clients` or `--idle` to have those too).
//!
//! With `--backend postgres` the daemons store in a fresh database per case on a PostgreSQL
//! cluster the bench starts itself (`common::PgCluster`). With `--instances N` (N >= 2),
//! instance A is the only one that ingests (shared group `tb`, the default topics), and the
//! other N-1 run on the same database in the same group but with `[topics]` telemetry,
//! status and ack on `nobody/{device}/...`, which nobody publishes to: they store nothing
//! and serve only what their tail reads from the shared log. The SSE clients connect to
//! those (round-robin), so the latency measured is publish -> commit by A -> NOTIFY ->
//! B's tail -> B's SSE clients: the cross-instance path (`--sse-on storing` puts them on A
//! instead, for comparison).
//!
//! Everything runs on loopback on this machine: a private Mosquitto, the release daemon
//! (`target/release/telebridge`, a fresh one with a fresh database for every case), a QoS 1
//! publisher and the SSE load client (this process). Every load loop is bounded in count
//! and time, and everything started is stopped by Drop guards (children by their pid). The
//! soft open-file limit is raised to the hard one when the connections need it (the bench
//! fails and says so when even the hard limit is too low).
//!
//! For every case the publisher sends `--rate` readings/s (10 ms ticks) through a warm-up,
//! then `--seconds` measured; each reading carries its publish time `"t":<unix ns>`. The
//! warm-up lasts `--warmup` (1 s) and at least until every client has had a reading for 1 s
//! (at most 30 s): a fresh client replays from storage before it streams live, and with
//! 10,000 of them that can take seconds; the time is reported. Before the first publish the
//! bench waits until the serving daemons are quiet (under 10 % of a core over 0.5 s, at most
//! 30 s), so that the replay queries every fresh stream makes after its response head are
//! done (queued behind the first publishes, on the code of 2026-12-02 06:55 they held the
//! last-connected of 10,000 filtered clients up to 10 s, and with a 60 s warm-up left
//! 1,960 of them closed by the daemon with no event).
//! Every client counts every `event: reading` (raw TCP, one reusable buffer, a word-at-a-time
//! newline scan; chunk-size lines are skipped as they never start with `event:`). Latency
//! (publish → receipt of the `data:` line) is taken on every event of up to 10 "sample"
//! clients (100 in the filtered case), spread over the connection order, which read as soon
//! as data arrives, for readings published inside the measured window only. The other
//! clients read every `--lazy-ms` (default 10 ms): the daemon does the same work for them
//! (its writes land in their socket buffers), but the load client, which shares the two
//! cores with the daemon, does a tenth of the reads. With `--lazy-ms 0` they read at once
//! and sample every 10th event.
//!
//! Reported per case: events expected vs received, and how many clients got exactly their
//! count, p50/p99/max (and p90/p99.9), CPU of the daemon, the broker, this process and
//! everything else on the machine over the measured window, rows in SQLite vs readings
//! published, the largest ingest lag seen at 250 ms polls of /metrics, write transactions
//! per second and their mean time, and how many events the daemon puts in one write; for
//! the mixed case also the command RTT p50/p90/p99/max idle and under load, each beside
//! the daemon's CPU over that phase.

mod common;

use common::{
    AnsweringDevice, Backend, Daemon, Driven, HANDSHAKE_TIMEOUT, Machine, Mosquitto, PgCluster,
    PgSnapshot, PgStats, Placement, Publisher, Ws, ack_ok, connect_ws, cpu_seconds, cpu_seconds_of,
    daemon_binary, drive, ensure_open_files, fake_device, find_byte, find_subslice, fmt_ms,
    get_text, leading_u64, load_average, machine_busy_seconds, metric, modified, number, open_sse,
    path_value, percentile, percentile_f, proc_status_kb, publish_qos1, stop_and_discard,
    tokio_workers, wait_online,
};
use std::iter::Peekable;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use futures_util::StreamExt as _;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: cargo bench --bench fanout [-- OPTIONS]

  --clients LIST   broadcast cases: SSE client counts on /events?type=reading, one case each
                   (default 1,100,1000; none: no broadcast case)
  --filtered [N]   the filtered case: N clients (default 10000), each on
                   /events?type=reading&device=dev-K, spread evenly over --devices
  --devices D      devices of the filtered case; the readings go round-robin over them
                   (default 1000)
  --mixed [N]      the mixed case: N broadcast clients (default 1000) streaming --rate while
                   --commands commands are timed, one at a time, idle and under load
  --commands N     commands timed in each phase of the mixed case (default 200)
                   (with --filtered or --mixed, only the cases named run: add --clients and
                   --idle for the others)
  --rate N         readings published per second in all (default 1000)
  --seconds N      measured seconds per case, after the warm-up (default 10)
  --warmup N       least warm-up seconds (default 1); the warm-up also lasts until every
                   client has had a reading for 1 s (at most 30 s)
  --idle N         idle SSE connections for the memory test; 0 skips it (default 10000)
  --lazy-ms N      clients other than the 10 sample clients read every N ms, which keeps
                   the load client cheap; 0: every client reads at once and samples every
                   10th event (default 10)
  --daemon PATH    the telebridge binary to run (default: the release build)
  --backend B      sqlite (default) or postgres: a fresh database per case on a PostgreSQL 15
                   cluster this bench starts and stops itself
  --instances N    daemons on that database (postgres; default 1): instance A ingests, the
                   others subscribe to topics nobody publishes to and serve the SSE clients
                   from the shared log
  --sse-on WHERE   other (default): SSE clients on the instances that did not store; storing:
                   on instance A
  --compare-backends  every --clients case on SQLite x1, PostgreSQL x1 and PostgreSQL x N
                   (--instances, default 2; SSE clients on the instances that did not store),
                   back to back on one broker and cluster, then the latencies side by side";

/// Devices the publisher rotates through in the broadcast and mixed cases
/// (`devices/dev-{i % 10}/telemetry`).
const DEVICES: u64 = 10;
/// Defaults of the filtered case (issue 15's target) and of the mixed case.
const FILTERED_CLIENTS: usize = 10_000;
const FILTERED_DEVICES: u64 = 1000;
const MIXED_CLIENTS: usize = 1000;
const MIXED_COMMANDS: u64 = 200;
/// Most SSE clients of one case: the machines' open-file limit is 20,000 per process, and
/// the daemon and this bench each hold one socket per client, plus a few files.
const MAX_CLIENTS: u64 = 19_500;
/// Size of each published payload, bytes.
const PAYLOAD_BYTES: usize = 100;
/// Publisher pacing tick.
const TICK: Duration = Duration::from_millis(10);
/// Clients whose every event is sampled for latency; the others sample every 10th.
const SAMPLE_CLIENTS: usize = 10;
const SAMPLE_EVERY_OTHERS: u64 = 10;
/// Sample clients of the filtered case: each gets only its device's share, so more of them.
const FILTERED_SAMPLE_CLIENTS: usize = 100;
/// The mixed case's simulated device, and the commands sent before the idle ones are timed.
const COMMAND_DEVICE: &str = "bench-dev";
const COMMAND_WARMUP: u64 = 20;
/// Longest the warm-up commands may take, and how long the last command of a phase may take
/// to be answered after its window.
const COMMAND_PHASE_LIMIT: Duration = Duration::from_secs(60);
const COMMAND_GRACE: Duration = Duration::from_secs(5);
/// Read buffer of one SSE client (the daemon writes chunks of up to 256 KiB).
const READ_BUF: usize = 64 * 1024;
/// A filtered client gets one device's share (a few events per read): a smaller buffer.
const FILTERED_READ_BUF: usize = 16 * 1024;
/// The SSE clients' request headers beyond Host and Accept.
const SSE_HEADERS: &str = "User-Agent: telebridge-fanout-bench\r\n";
/// Connections being set up at once (the daemon's listen backlog is 1024).
const CONNECT_PARALLEL: usize = 128;
/// The warm-up lasts until every client has had a reading for this long (a fresh client may
/// replay from storage before it streams live), and at most WARMUP_LIMIT.
const STREAMING_SETTLE: Duration = Duration::from_secs(1);
const WARMUP_LIMIT: Duration = Duration::from_secs(30);
/// Before the first publish, the serving daemons settle: under SETTLE_CPU % of one core
/// over SETTLE_POLL, waiting at most SETTLE_LIMIT.
const SETTLE_CPU: f64 = 10.0;
const SETTLE_POLL: Duration = Duration::from_millis(500);
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// Bounds on every wait.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
const NO_PROGRESS_LIMIT: Duration = Duration::from_secs(5);
/// Targets from PRODUCT.md and issue 15.
const TARGET_P99_MS: f64 = 50.0;
const TARGET_FILTERED_P99_MS: f64 = 20.0;
const TARGET_FILTERED_CPU: f64 = 40.0;
/// Command RTT p99 under load: at 1,000 clients x 1,000 readings/s, and at 5,000/s.
const TARGET_MIXED_P99_MS: f64 = 5.0;
const TARGET_MIXED_5M_P99_MS: f64 = 10.0;
const TARGET_IDLE_MB: f64 = 150.0;
/// Ingest counts as "kept up" when every reading is stored and no more than this share of
/// a second's readings was ever waiting (published, not yet committed) at a 250 ms poll.
const LAG_SECONDS_ALLOWED: f64 = 0.5;

fn main() -> ExitCode {
    match common::parse_args(USAGE, Args::parse, |a| a.help) {
        ControlFlow::Continue(args) => common::run_to_exit(run(&args)),
        ControlFlow::Break(code) => code,
    }
}

#[derive(Debug, Clone)]
struct Args {
    help: bool,
    clients: Vec<usize>,
    rate: u64,
    seconds: u64,
    warmup: u64,
    idle: usize,
    lazy_ms: u64,
    daemon: Option<PathBuf>,
    backend: Backend,
    instances: usize,
    /// SSE clients on the storing instance A rather than on the others.
    sse_on_storing: bool,
    /// SQLite x1, PostgreSQL x1 and PostgreSQL x N (SSE on the others) back to back.
    compare: bool,
    /// The filtered case's client count (None: no filtered case).
    filtered: Option<usize>,
    /// The devices of the filtered case.
    devices: u64,
    /// The mixed case's client count (None: no mixed case).
    mixed: Option<usize>,
    /// Commands timed in each phase of the mixed case.
    commands: u64,
}

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut args = args.peekable();
        let (mut clients_given, mut idle_given) = (false, false);
        let mut out = Args {
            help: false,
            clients: vec![1, 100, 1000],
            rate: 1000,
            seconds: 10,
            warmup: 1,
            idle: 10_000,
            lazy_ms: 10,
            daemon: None,
            backend: Backend::Sqlite,
            instances: 1,
            sse_on_storing: false,
            compare: false,
            filtered: None,
            devices: FILTERED_DEVICES,
            mixed: None,
            commands: MIXED_COMMANDS,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // `cargo bench` passes --bench to harness = false targets.
                "--bench" => {}
                "-h" | "--help" => out.help = true,
                "--clients" => {
                    clients_given = true;
                    let list = args
                        .next()
                        .ok_or_else(|| anyhow!("--clients needs a list"))?;
                    out.clients = list
                        .split(',')
                        .filter(|c| *c != "none")
                        .map(|c| number("--clients", Some(c.to_owned()), 1, MAX_CLIENTS))
                        .map(|n| n.map(|n| n as usize))
                        .collect::<anyhow::Result<_>>()?;
                }
                "--rate" => out.rate = number("--rate", args.next(), 1, 100_000)?,
                "--seconds" => out.seconds = number("--seconds", args.next(), 1, 600)?,
                "--warmup" => out.warmup = number("--warmup", args.next(), 0, 60)?,
                "--idle" => {
                    idle_given = true;
                    out.idle = number("--idle", args.next(), 0, MAX_CLIENTS)? as usize;
                }
                "--filtered" => {
                    out.filtered = Some(optional_count(&mut args, "--filtered", FILTERED_CLIENTS)?)
                }
                "--devices" => out.devices = number("--devices", args.next(), 1, 100_000)?,
                "--mixed" => out.mixed = Some(optional_count(&mut args, "--mixed", MIXED_CLIENTS)?),
                "--commands" => out.commands = number("--commands", args.next(), 1, 10_000)?,
                "--daemon" => out.daemon = Some(path_value("--daemon", args.next())?),
                "--lazy-ms" => out.lazy_ms = number("--lazy-ms", args.next(), 0, 1000)?,
                "--backend" => out.backend = Backend::parse(args.next())?,
                "--instances" => {
                    out.instances = number("--instances", args.next(), 1, 16)? as usize
                }
                "--sse-on" => {
                    out.sse_on_storing = match args.next().as_deref() {
                        Some("storing") => true,
                        Some("other" | "others") => false,
                        other => bail!("--sse-on {other:?}: expected other or storing"),
                    }
                }
                "--compare-backends" => out.compare = true,
                other => bail!("unknown argument {other:?}"),
            }
        }
        if out.instances > 1 && out.backend != Backend::Postgres && !out.compare {
            bail!("--instances above 1 needs --backend postgres (instances share one database)");
        }
        // Named cases only: the defaults of the others would make a long run longer.
        if out.filtered.is_some() || out.mixed.is_some() {
            if !clients_given {
                out.clients.clear();
            }
            if !idle_given {
                out.idle = 0;
            }
        }
        Ok(out)
    }

    /// The cases to run on one setup, in order: broadcast, filtered, mixed.
    fn shapes(&self) -> Vec<Shape> {
        let mut out: Vec<Shape> = self
            .clients
            .iter()
            .map(|&clients| Shape {
                kind: Kind::Broadcast,
                clients,
                devices: DEVICES,
            })
            .collect();
        out.extend(self.filtered.map(|clients| Shape {
            kind: Kind::Filtered,
            clients,
            devices: self.devices,
        }));
        out.extend(self.mixed.map(|clients| Shape {
            kind: Kind::Mixed,
            clients,
            devices: DEVICES,
        }));
        out
    }
}

/// The value after option `name` if there is one (not another option), else `default`: a
/// client count.
fn optional_count(
    args: &mut Peekable<impl Iterator<Item = String>>,
    name: &str,
    default: usize,
) -> anyhow::Result<usize> {
    match args.next_if(|a| !a.starts_with('-')) {
        Some(v) => Ok(number(name, Some(v), 1, MAX_CLIENTS)? as usize),
        None => Ok(default),
    }
}

/// What a case's SSE clients watch, and whether commands run beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Every client on `/events?type=reading`.
    Broadcast,
    /// Client i on `/events?type=reading&device=dev-{i * devices / clients}`.
    Filtered,
    /// Broadcast, plus commands timed over a WebSocket, idle and under load.
    Mixed,
}

/// One case: its kind, SSE clients and the devices the publisher rotates through
/// (reading i goes to dev-{i % devices}).
#[derive(Debug, Clone, Copy)]
struct Shape {
    kind: Kind,
    clients: usize,
    devices: u64,
}

impl Shape {
    /// The device client `idx` watches (filtered), or None for every device. The clients
    /// are spread evenly, in blocks of consecutive indices.
    fn device_of(&self, idx: usize) -> Option<u64> {
        (self.kind == Kind::Filtered)
            .then(|| (idx as u64 * self.devices / self.clients.max(1) as u64) % self.devices)
    }

    /// The readings client `idx` should receive when `published` went out round-robin.
    fn expected(&self, idx: usize, published: u64) -> u64 {
        match self.device_of(idx) {
            None => published,
            Some(d) => published / self.devices + u64::from(d < published % self.devices),
        }
    }

    /// Clients that read at once and time every event.
    fn sample_clients(&self) -> usize {
        match self.kind {
            Kind::Filtered => FILTERED_SAMPLE_CLIENTS,
            _ => SAMPLE_CLIENTS,
        }
        .min(self.clients)
    }

    /// The p99 target of the stream.
    fn target_p99_ms(&self) -> f64 {
        match self.kind {
            Kind::Filtered => TARGET_FILTERED_P99_MS,
            _ => TARGET_P99_MS,
        }
    }

    /// `1000 SSE client(s)`, `10000 filtered client(s) over 1000 devices`, ...
    fn describe(&self) -> String {
        match self.kind {
            Kind::Broadcast => format!("{} SSE client(s)", self.clients),
            Kind::Filtered => format!(
                "{} filtered client(s) over {} devices",
                self.clients, self.devices
            ),
            Kind::Mixed => format!("mixed: {} SSE client(s) and commands", self.clients),
        }
    }

    /// The first part of the case's tag (client ids and database names).
    fn tag(&self) -> &'static str {
        match self.kind {
            Kind::Broadcast => "fanout",
            Kind::Filtered => "filtered",
            Kind::Mixed => "mixed",
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    // One socket per SSE client, and room for the broker, HTTP and MQTT clients. The
    // daemon, started after this, inherits the limit.
    let need = args
        .shapes()
        .iter()
        .map(|s| s.clients)
        .max()
        .unwrap_or(0)
        .max(args.idle) as u64
        + 200;
    ensure_open_files(need).context("--clients/--filtered/--mixed/--idle")?;
    let bin = daemon_binary(args.daemon.as_deref())?;
    let setups: Vec<Args> = if args.compare {
        let with = |backend, instances| Args {
            backend,
            instances,
            sse_on_storing: false,
            compare: false,
            ..args.clone()
        };
        vec![
            with(Backend::Sqlite, 1),
            with(Backend::Postgres, 1),
            with(Backend::Postgres, args.instances.max(2)),
        ]
    } else {
        vec![args.clone()]
    };
    // Declared before the broker and the daemons, so it is stopped last.
    let any_pg = setups.iter().any(|s| s.backend == Backend::Postgres);
    let pg = match any_pg {
        true => {
            eprintln!("starting a PostgreSQL cluster of our own (initdb, pg_ctl start)");
            Some(
                tokio::task::spawn_blocking(PgCluster::start)
                    .await
                    .context("the PostgreSQL start-up panicked")??,
            )
        }
        false => None,
    };
    let broker = Mosquitto::start(None)?;
    let machine = Machine::read();
    println!("# telebridge fan-out benchmark (MQTT publish -> SSE receipt)");
    println!("machine:    {}", machine.describe());
    println!(
        "daemon:     {} (built {}), a fresh process and database per case",
        bin.display(),
        modified(&bin)
    );
    println!(
        "            [broker] mode=external, [http] max_sse_clients=20000 max_streams_per_ip=20000 \
         sse_buffer=262144, [commands] rate_limit=100000, [log] level=warn, other keys default"
    );
    println!("{}", broker.describe());
    if let Some(pg) = &pg {
        println!("{}", pg.describe());
    }
    for s in &setups {
        println!("storage:    {}", describe_instances(s));
    }
    println!(
        "load:       {} readings/s, QoS 1, {PAYLOAD_BYTES}-byte JSON payloads with \"t\":<unix ns>, \
         round-robin to devices/dev-{{0..{}}}/telemetry{}, paced in {} ms ticks; warm-up at least {} s \
         and until every client has had a reading for {} s (at most {} s), then measured {} s",
        args.rate,
        DEVICES - 1,
        match args.filtered {
            Some(_) => format!(" (filtered case: dev-{{0..{}}})", args.devices - 1),
            None => String::new(),
        },
        TICK.as_millis(),
        args.warmup,
        STREAMING_SETTLE.as_secs(),
        WARMUP_LIMIT.as_secs(),
        args.seconds
    );
    println!(
        "clients:    raw HTTP/1.1 `GET /events?type=reading` with TCP_NODELAY, all in this process \
         (tokio, {} worker threads), each counting every event; latency (publish time -> receipt \
         of the data line) on every event of {SAMPLE_CLIENTS} sample clients spread over the \
         connection order ({FILTERED_SAMPLE_CLIENTS} in the filtered case, whose clients add \
         `&device=dev-K` and check every reading's device), which read at once; {}",
        tokio_workers(),
        if args.lazy_ms > 0 {
            format!(
                "the others read every {} ms (their data waits in the socket buffer; the daemon's \
                 work is the same) and take no latency samples",
                args.lazy_ms
            )
        } else {
            format!("the others read at once too and sample every {SAMPLE_EVERY_OTHERS}th event")
        }
    );
    println!(
        "everything (broker, daemon, publisher, clients) shares this machine's cores; load average \
         at start {} (other processes on the machine are shown in their own CPU column)",
        load_average()
    );
    if args.mixed.is_some() {
        println!(
            "commands:   (mixed case) one WebSocket (tokio-tungstenite, TCP_NODELAY) on instance A; \
             `ping` to {COMMAND_DEVICE}, a rumqttc device (TCP_NODELAY, announced online) that \
             answers each at once on devices/{COMMAND_DEVICE}/commands/ack; one in flight; \
             {COMMAND_WARMUP} warm-up, then {} idle (clients connected, nothing published yet) \
             and {} under load, each phase's sends paced evenly over {} s (under load: the \
             measured window)",
            args.commands, args.commands, args.seconds
        );
    }

    let mut all = Vec::new();
    for setup in &setups {
        let mut results = Vec::new();
        for shape in setup.shapes() {
            eprintln!("-- case: {} on {}", shape.describe(), setup_label(setup));
            match fanout_case(&bin, &broker, pg.as_ref(), setup, shape).await {
                Ok(r) => results.push(r),
                Err(e) => {
                    eprintln!("case ({}) failed: {e:#}", shape.describe());
                    results.push(CaseResult::failed(shape, format!("{e:#}")));
                }
            }
        }
        for kind in [Kind::Broadcast, Kind::Filtered, Kind::Mixed] {
            let of_kind: Vec<&CaseResult> =
                results.iter().filter(|r| r.shape.kind == kind).collect();
            if !of_kind.is_empty() {
                print_fanout_table(setup, kind, &of_kind);
            }
        }
        all.push((setup, results));
    }
    if args.compare {
        print_side_by_side(args, &all);
    }

    let idle = if args.idle > 0 {
        eprintln!(
            "-- idle test (SQLite, one daemon): {} SSE connections",
            args.idle
        );
        Some(idle_case(&bin, &broker, args.idle).await)
    } else {
        None
    };
    if let Some(idle) = &idle {
        print_idle_table(args.idle, idle);
    }

    println!();
    println!("## targets (PRODUCT.md)");
    for (setup, results) in &all {
        print_targets(setup, results);
    }
    match &idle {
        Some(Ok(i)) => println!(
            "- idle: {} connections, daemon resident {:.1} MB in all (target < {TARGET_IDLE_MB} MB) => {}",
            i.opened,
            i.rss_after_kb as f64 / 1024.0,
            if i.opened == args.idle && (i.rss_after_kb as f64 / 1024.0) < TARGET_IDLE_MB {
                "MET"
            } else {
                "NOT MET"
            }
        ),
        Some(Err(e)) => println!("- idle: failed: {e:#}"),
        None => println!("- idle: skipped (--idle 0)"),
    }
    drop(broker);
    drop(pg);
    Ok(())
}

/// The fan-out target lines of one setup's cases.
fn print_targets(args: &Args, results: &[CaseResult]) {
    let broadcast = || {
        results
            .iter()
            .filter(|r| r.error.is_none() && r.shape.kind == Kind::Broadcast)
    };
    let big = broadcast().max_by_key(|r| r.clients);
    match big {
        Some(r) if args.backend == Backend::Sqlite => {
            let complete = r.received == r.expected;
            let p99_ok = r.p99_ms.is_some_and(|p| p < TARGET_P99_MS);
            println!(
                "- fan-out ({}), {} clients x {} readings/s: p99 {} (target < {TARGET_P99_MS} ms): {}; \
                 every client got every reading: {}; ingest kept up: {} => {}",
                setup_label(args),
                r.clients,
                args.rate,
                fmt_ms(r.p99_ms),
                if p99_ok { "met" } else { "MISSED" },
                yes_no(complete),
                yes_no(r.ingest_kept_up),
                if p99_ok && complete && r.ingest_kept_up && r.clients >= 1000 && args.rate >= 1000
                {
                    "MET"
                } else if r.clients < 1000 || args.rate < 1000 {
                    "not measured at the target load (1,000 clients x 1,000/s)"
                } else {
                    "NOT MET"
                }
            );
        }
        Some(_) => {}
        None if args.clients.is_empty() => println!("- fan-out: skipped (--clients none)"),
        None => println!("- fan-out ({}): no case completed", setup_label(args)),
    }
    if args.backend == Backend::Postgres {
        for r in broadcast() {
            let p99_ok = r.p99_ms.is_some_and(|p| p < TARGET_P99_MS);
            let complete = r.received == r.expected;
            println!(
                "- {} ({}), {} client(s) x {} readings/s: p99 {} (target < {TARGET_P99_MS} ms at 1,000 readings/s); \
                 every client got every reading: {}; ingest kept up: {} => {}",
                if args.instances > 1 && !args.sse_on_storing {
                    "cross-instance fan-out"
                } else {
                    "fan-out"
                },
                setup_label(args),
                r.clients,
                args.rate,
                fmt_ms(r.p99_ms),
                yes_no(complete),
                yes_no(r.ingest_kept_up),
                if args.rate < 1000 {
                    "not measured at 1,000 readings/s"
                } else if p99_ok && complete && r.ingest_kept_up {
                    "MET"
                } else {
                    "NOT MET"
                }
            );
        }
    }
    for r in results.iter().filter(|r| r.shape.kind == Kind::Filtered) {
        if let Some(e) = &r.error {
            println!("- filtered ({}): failed: {e}", setup_label(args));
            continue;
        }
        let p99_ok = r.p99_ms.is_some_and(|p| p < TARGET_FILTERED_P99_MS);
        let cpu_ok = r.daemon_cpu < TARGET_FILTERED_CPU;
        let exact = r.exact_clients == r.clients && r.foreign == 0;
        let at_target = r.clients >= FILTERED_CLIENTS
            && r.shape.devices >= FILTERED_DEVICES
            && args.rate >= 5000;
        println!(
            "- filtered ({}), {} clients over {} devices, {} readings/s: p99 {} (target < \
             {TARGET_FILTERED_P99_MS} ms): {}; daemon CPU {:.0} % of one core (target < \
             {TARGET_FILTERED_CPU} %): {}; every client got exactly its device's readings: {} \
             ({} of {} exact, {} of another device); ingest kept up: {} => {}",
            setup_label(args),
            r.clients,
            r.shape.devices,
            args.rate,
            fmt_ms(r.p99_ms),
            if p99_ok { "met" } else { "MISSED" },
            r.daemon_cpu,
            if cpu_ok { "met" } else { "MISSED" },
            yes_no(exact),
            r.exact_clients,
            r.clients,
            r.foreign,
            yes_no(r.ingest_kept_up),
            if !at_target {
                "not measured at the target load (10,000 clients over 1,000 devices, 5,000/s)"
            } else if p99_ok && cpu_ok && exact && r.ingest_kept_up {
                "MET"
            } else {
                "NOT MET"
            }
        );
    }
    for r in results.iter().filter(|r| r.shape.kind == Kind::Mixed) {
        let c = match (&r.error, &r.commands) {
            (Some(e), _) => {
                println!("- mixed ({}): failed: {e}", setup_label(args));
                continue;
            }
            (None, None) => continue,
            (None, Some(c)) => c,
        };
        let target = if args.rate >= 5000 {
            TARGET_MIXED_5M_P99_MS
        } else {
            TARGET_MIXED_P99_MS
        };
        let p99 = c.load.p99_ms();
        let p99_ok = p99.is_some_and(|p| p < target);
        let all_acked = c.load.seen.ok == c.wanted && c.idle.seen.ok == c.wanted;
        println!(
            "- mixed ({}), {} clients x {} readings/s: command RTT p99 under load {} (target < \
             {target} ms): {}; idle p99 {}; {} of {} commands under load acked; stream p99 {}, \
             every reading delivered: {} => {}",
            setup_label(args),
            r.clients,
            args.rate,
            fmt_ms(p99),
            if p99_ok { "met" } else { "MISSED" },
            fmt_ms(c.idle.p99_ms()),
            c.load.seen.ok,
            c.wanted,
            fmt_ms(r.p99_ms),
            yes_no(r.received == r.expected),
            if r.clients < 1000 || args.rate < 1000 {
                "not measured at the target load (1,000 clients x 1,000 or 5,000/s)"
            } else if p99_ok && all_acked {
                "MET"
            } else {
                "NOT MET"
            }
        );
    }
}

/// `--compare-backends`: p50 / p99 of every client count on every setup, in one table.
fn print_side_by_side(args: &Args, all: &[(&Args, Vec<CaseResult>)]) {
    println!();
    println!(
        "## side by side: publish -> SSE receipt, {} readings/s, p50 / p99 / max ms (all delivered?)",
        args.rate
    );
    println!();
    let mut head = String::from("| clients |");
    let mut rule = String::from("|--:|");
    for (setup, _) in all {
        head.push_str(&format!(
            " {}{} |",
            setup_label(setup),
            if setup.instances > 1 && !setup.sse_on_storing {
                ", SSE on B (cross-instance)"
            } else {
                ""
            }
        ));
        rule.push_str("--:|");
    }
    println!("{head}");
    println!("{rule}");
    for &n in &args.clients {
        let mut line = format!("| {n} |");
        for (_, results) in all {
            match results
                .iter()
                .find(|r| r.clients == n && r.shape.kind == Kind::Broadcast)
            {
                Some(r) if r.error.is_none() => line.push_str(&format!(
                    " {} / **{}** / {} ({}) |",
                    fmt_ms(r.p50_ms),
                    fmt_ms(r.p99_ms),
                    fmt_ms(r.max_ms),
                    if r.received == r.expected {
                        "yes"
                    } else {
                        "NO"
                    }
                )),
                Some(_) => line.push_str(" failed |"),
                None => line.push_str(" - |"),
            }
        }
        println!("{line}");
    }
}

/// `SQLite x1`, `PostgreSQL x2`.
fn setup_label(args: &Args) -> String {
    format!("{} x{}", args.backend.name(), args.instances)
}

/// The report line on where the daemons store and which ones serve the SSE clients.
fn describe_instances(args: &Args) -> String {
    match (args.backend, args.instances) {
        (Backend::Sqlite, _) => {
            "SQLite, one daemon per case ([storage] path in its temp dir)".into()
        }
        (Backend::Postgres, 1) => format!(
            "PostgreSQL x1: one daemon per case on a fresh database, [mqtt] shared_group = \"{}\"",
            common::SHARED_GROUP
        ),
        (Backend::Postgres, n) => format!(
            "PostgreSQL x{n} on one fresh database per case, all in [mqtt] shared_group = \"{g}\": \
             instance A stores (default topics, the group's only member on them); {} with [topics] \
             telemetry/status/ack = nobody/{{device}}/... (nobody publishes there: they store \
             nothing and serve what their tail reads from the shared log); SSE clients on {}",
            if n == 2 {
                "instance B".to_owned()
            } else {
                format!("{} instances B..", n - 1)
            },
            if args.sse_on_storing {
                "instance A (--sse-on storing)".to_owned()
            } else if n == 2 {
                "instance B only".to_owned()
            } else {
                "those, round-robin".to_owned()
            },
            g = common::SHARED_GROUP
        ),
    }
}

/// Starts the case's daemons: one on SQLite, or `args.instances` on a fresh PostgreSQL
/// database (instance A ingests; the others on topics nobody publishes to). A first.
async fn start_instances(
    bin: &Path,
    broker: &Mosquitto,
    pg: Option<&PgCluster>,
    args: &Args,
    tag: &str,
) -> anyhow::Result<Vec<Daemon>> {
    let Some(pg) = pg.filter(|_| args.backend == Backend::Postgres) else {
        return Ok(vec![Daemon::start(bin, broker.port, tag).await?]);
    };
    let url = pg
        .create_database(&format!("tb_{}", tag.replace('-', "_")))
        .await?;
    let mut daemons = Vec::new();
    for i in 0..args.instances {
        let placement = if i == 0 {
            Placement::postgres(&url)
        } else {
            Placement::postgres(&url).with_unused(&["telemetry", "status", "ack"])
        };
        let name = format!("{tag}-{}", (b'a' + i as u8) as char);
        match Daemon::start_placed(bin, broker.port, &name, &placement).await {
            Ok(d) => daemons.push(d),
            Err(e) => {
                stop_and_discard(daemons, broker.port).await;
                return Err(e.context(format!("starting instance {name}")));
            }
        }
    }
    Ok(daemons)
}

// ---------------------------------------------------------------------------------------
// The fan-out case
// ---------------------------------------------------------------------------------------

struct CaseResult {
    shape: Shape,
    clients: usize,
    published: u64,
    expected: u64,
    received: u64,
    samples: usize,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    daemon_cpu: f64,
    /// The instances other than A together (PostgreSQL with --instances > 1).
    others_cpu: Option<f64>,
    /// PostgreSQL: the postmaster and all its processes.
    pg_cpu: Option<f64>,
    broker_cpu: f64,
    bench_cpu: f64,
    /// Everything else on the machine (other users' builds and tests).
    other_cpu: f64,
    rows: Option<u64>,
    max_lag: u64,
    max_queue: u64,
    ingest_kept_up: bool,
    drain_ms: Option<f64>,
    cut: u64,
    /// Write transactions per second in the measured window (each one is a feed push).
    commits_per_s: Option<f64>,
    /// Mean time of one write transaction.
    commit_ms: Option<f64>,
    p90_ms: Option<f64>,
    p999_ms: Option<f64>,
    /// Reads per second of one sample client, and events per read.
    sample_reads_per_s: Option<f64>,
    events_per_read: Option<f64>,
    client_errors: usize,
    first_error: Option<String>,
    /// Most events a serving instance's tail was behind the shared log (its
    /// telebridge_tail_lag_events at the 250 ms polls); None on SQLite.
    max_tail_lag: Option<f64>,
    /// p50/p99 of each serving instance, by its letter.
    per_instance: Vec<(char, Option<f64>, Option<f64>, usize)>,
    /// Readings the serving instances stored (they should store none).
    others_stored: u64,
    /// PostgreSQL's commits and WAL flushes over the case.
    pg_stats: Option<PgStats>,
    /// The statements that took PostgreSQL the most time over the case.
    pg_top: Vec<String>,
    /// Warnings and errors in the daemons' logs, prefixed with the instance.
    log_problems: Vec<String>,
    /// Clients that received exactly the readings of their device(s), and those that got
    /// fewer or more.
    exact_clients: usize,
    short_clients: usize,
    over_clients: usize,
    /// Readings of another device than the one a filtered client asked for.
    foreign: u64,
    /// The first client whose count or devices were wrong.
    first_mismatch: Option<String>,
    /// The mixed case's command round trips.
    commands: Option<CommandResult>,
    /// Seconds from the first publish to the measured window, and until every client had
    /// had a reading (None: not within WARMUP_LIMIT).
    warmup_s: f64,
    streaming_after_s: Option<f64>,
    /// Seconds the serving daemons took to go quiet after the last connect.
    settle_s: f64,
    error: Option<String>,
}

/// The mixed case's commands: idle (clients connected, nothing published) and under load.
struct CommandResult {
    /// Commands wanted in each phase (`--commands`).
    wanted: u64,
    idle: CommandPhase,
    load: CommandPhase,
}

/// One phase of commands, one in flight.
struct CommandPhase {
    /// What the WebSocket client saw, its latencies sorted.
    seen: Driven,
    /// The daemon's (instance A's) CPU over the phase, % of one core.
    daemon_cpu: f64,
    wall_s: f64,
}

impl CommandPhase {
    fn new(mut seen: Driven, daemon_cpu: f64, wall_s: f64) -> CommandPhase {
        seen.latency_us.sort_unstable();
        seen.server_rtt_ms.sort_unstable_by(f64::total_cmp);
        CommandPhase {
            seen,
            daemon_cpu,
            wall_s,
        }
    }

    /// Percentile `p` of the round trips, ms.
    fn ms(&self, p: f64) -> Option<f64> {
        percentile(&self.seen.latency_us, p).map(|us| us as f64 / 1000.0)
    }

    fn p99_ms(&self) -> Option<f64> {
        self.ms(0.99)
    }
}

impl CaseResult {
    fn failed(shape: Shape, error: String) -> CaseResult {
        CaseResult {
            shape,
            clients: shape.clients,
            published: 0,
            expected: 0,
            received: 0,
            samples: 0,
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            daemon_cpu: 0.0,
            others_cpu: None,
            pg_cpu: None,
            broker_cpu: 0.0,
            bench_cpu: 0.0,
            other_cpu: 0.0,
            rows: None,
            max_lag: 0,
            max_queue: 0,
            ingest_kept_up: false,
            drain_ms: None,
            cut: 0,
            commits_per_s: None,
            commit_ms: None,
            p90_ms: None,
            p999_ms: None,
            sample_reads_per_s: None,
            events_per_read: None,
            client_errors: 0,
            first_error: None,
            max_tail_lag: None,
            per_instance: Vec::new(),
            others_stored: 0,
            pg_stats: None,
            pg_top: Vec::new(),
            log_problems: Vec::new(),
            exact_clients: 0,
            short_clients: 0,
            over_clients: 0,
            foreign: 0,
            first_mismatch: None,
            commands: None,
            warmup_s: 0.0,
            streaming_after_s: None,
            settle_s: 0.0,
            error: Some(error),
        }
    }
}

/// The measured window, in unix nanoseconds of publish time.
struct Window {
    start: AtomicU64,
    end: AtomicU64,
}

/// CPU seconds so far of instance A, the other instances, the broker, PostgreSQL, this
/// process, and the machine's busy time (all cores).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    storing: f64,
    others: f64,
    broker: f64,
    pg: f64,
    bench: f64,
    busy: f64,
}

impl Cpu {
    fn now(daemons: &[Daemon], broker: &Mosquitto, pg: Option<&PgCluster>) -> Cpu {
        let others: Vec<u32> = daemons.iter().skip(1).map(Daemon::pid).collect();
        Cpu {
            storing: cpu_seconds(daemons[0].pid()),
            others: cpu_seconds_of(&others),
            broker: cpu_seconds(broker.pid()),
            pg: pg.map_or(0.0, PgCluster::cpu_seconds),
            bench: cpu_seconds(std::process::id()),
            busy: machine_busy_seconds(),
        }
    }
}

async fn fanout_case(
    bin: &Path,
    broker: &Mosquitto,
    pg: Option<&PgCluster>,
    args: &Args,
    shape: Shape,
) -> anyhow::Result<CaseResult> {
    // Distinct per setup, so a compare run's cases never share a client id or database.
    let tag = format!(
        "{}-{}-{}{}-{}",
        shape.tag(),
        shape.clients,
        match args.backend {
            Backend::Sqlite => "sq",
            Backend::Postgres => "pg",
        },
        args.instances,
        std::process::id()
    );
    let pg = pg.filter(|_| args.backend == Backend::Postgres);
    let daemons = start_instances(bin, broker, pg, args, &tag).await?;
    let result = measure_case(&daemons, broker, pg, args, shape, &tag).await;
    let mut problems = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let letter = (b'A' + i as u8) as char;
        problems.extend(
            d.log_problems()
                .into_iter()
                .map(|l| format!("[instance {letter}] {l}")),
        );
    }
    stop_and_discard(daemons, broker.port).await;
    let mut result = result?;
    for line in problems.iter().take(5) {
        eprintln!("   daemon log: {line:.300}");
    }
    result.log_problems = problems;
    Ok(result)
}

async fn measure_case(
    daemons: &[Daemon],
    broker: &Mosquitto,
    pg: Option<&PgCluster>,
    args: &Args,
    shape: Shape,
    tag: &str,
) -> anyhow::Result<CaseResult> {
    let n = shape.clients;
    let daemon = &daemons[0];
    // The instances the SSE clients connect to.
    let serving: Vec<&Daemon> = if daemons.len() > 1 && !args.sse_on_storing {
        daemons[1..].iter().collect()
    } else {
        vec![daemon]
    };
    let serving_index: Vec<usize> = if daemons.len() > 1 && !args.sse_on_storing {
        (1..daemons.len()).collect()
    } else {
        vec![0]
    };
    let stop = CancellationToken::new();
    // Cancels the client tasks however this function ends.
    let _stop_guard = stop.clone().drop_guard();
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let window = Arc::new(Window {
        start: AtomicU64::new(u64::MAX),
        end: AtomicU64::new(0),
    });
    let ready = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let samples = shape.sample_clients();
    let sample_stride = (n / samples.max(1)).max(1);
    let mut tasks = Vec::with_capacity(n);
    for idx in 0..n {
        let sample_client = idx % sample_stride == 0 && idx / sample_stride < samples;
        let device = shape.device_of(idx);
        let (sample_every, lazy) = if sample_client {
            (1, None)
        } else if args.lazy_ms > 0 {
            (0, Some(Duration::from_millis(args.lazy_ms)))
        } else {
            (SAMPLE_EVERY_OTHERS, None)
        };
        let read_buf = match shape.kind {
            Kind::Filtered => FILTERED_READ_BUF,
            _ => READ_BUF,
        };
        tasks.push(tokio::spawn(sse_client(SseClient {
            read_buf,
            addr: serving[idx % serving.len()].addr,
            server: idx % serving.len(),
            idx,
            path: match device {
                Some(d) => format!("/events?type=reading&device=dev-{d}"),
                None => "/events?type=reading".to_owned(),
            },
            own_device: device.map(|d| format!("dev-{d}").into_bytes()),
            sample_every,
            lazy,
            window: window.clone(),
            counters: counters.clone(),
            ready: ready.clone(),
            gate: gate.clone(),
            stop: stop.clone(),
        })));
    }
    // Every client connected (and so subscribed to the feed) before the first publish.
    let deadline = Instant::now() + Duration::from_secs(30 + n as u64 / 50);
    while ready.load(Ordering::Acquire) < n {
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            let failed = tasks.iter().filter(|t| t.is_finished()).count();
            let why = match tasks.swap_remove(i).await {
                Ok(outcome) => outcome.error.unwrap_or_else(|| "ended early".into()),
                Err(e) => format!("client task: {e}"),
            };
            bail!(
                "{failed} of {n} SSE clients failed to connect (only {} ready); first: {why}",
                ready.load(Ordering::Acquire)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} SSE clients connected within the deadline",
                ready.load(Ordering::Acquire)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sse_clients = 0.0;
    for d in &serving {
        sse_clients += metric(&d.metrics().await?, "telebridge_sse_clients").unwrap_or(-1.0);
    }
    eprintln!("   {n} clients connected (telebridge_sse_clients = {sse_clients})");
    // Each fresh stream runs a replay query after its response head; let them finish.
    let settle_s = settle(&serving).await;
    eprintln!("   the serving daemons went quiet {settle_s:.1} s after the last connect");
    // The mixed case: commands on the idle daemon (clients connected, nothing published).
    let commander = match shape.kind {
        Kind::Mixed => {
            Some(commands_idle(daemon, broker, args.commands, args.seconds, &stop).await?)
        }
        _ => None,
    };
    let pg_0 = PgSnapshot::take(pg, daemon.pg_url.as_deref()).await?;

    let publisher = Publisher::connect(broker.port, &format!("pub-{tag}")).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let monitor_stop = CancellationToken::new();
    let _monitor_guard = monitor_stop.clone().drop_guard();
    let monitor = tokio::spawn(ingest_monitor(
        daemon.http.clone(),
        daemon.addr,
        if daemon.pg_url.is_some() {
            serving.iter().map(|d| d.addr).collect()
        } else {
            Vec::new()
        },
        sent.clone(),
        monitor_stop.clone(),
    ));

    // The measured window begins once the warm-up is over and every client has had a
    // reading for STREAMING_SETTLE (a fresh client may replay from storage for a while
    // before it streams live), or at WARMUP_LIMIT whatever the clients do.
    let warmup = Duration::from_secs(args.warmup);
    let measured = Duration::from_secs(args.seconds);
    let start = Instant::now();
    let mut streaming_at: Option<Instant> = None;
    // When the window began, and the readings to have sent by its end.
    let mut measuring: Option<(Instant, u64)> = None;
    let mut cpu_start = None;
    let mut pending_commands = commander;
    let mut commander = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n_sent = 0u64;
    let mut payload = Vec::with_capacity(PAYLOAD_BYTES + 32);
    let topics: Vec<String> = (0..shape.devices)
        .map(|i| format!("devices/dev-{i}/telemetry"))
        .collect();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let elapsed = now.duration_since(start);
        if streaming_at.is_none() && counters.iter().all(|c| c.load(Ordering::Relaxed) > 0) {
            streaming_at = Some(now);
        }
        if measuring.is_none() {
            let settled = streaming_at.is_some_and(|t| now.duration_since(t) >= STREAMING_SETTLE);
            if (elapsed >= warmup && settled) || elapsed >= WARMUP_LIMIT {
                if !settled {
                    eprintln!(
                        "   not every client had a reading after {} s of warm-up; measuring anyway",
                        WARMUP_LIMIT.as_secs()
                    );
                }
                let begin_ns = now_ns();
                window
                    .end
                    .store(begin_ns + measured.as_nanos() as u64, Ordering::Release);
                window.start.store(begin_ns, Ordering::Release);
                cpu_start = Some((now, Cpu::now(daemons, broker, pg)));
                let target =
                    (args.rate as u128 * (elapsed + measured).as_micros() / 1_000_000) as u64;
                measuring = Some((now, target));
                // Under load: the same number of commands, paced over the measured window.
                commander = pending_commands.take().map(|(device, ws, idle)| {
                    let task = tokio::spawn(commands_under_load(
                        ws,
                        daemon.pid(),
                        COMMAND_WARMUP + args.commands,
                        args.commands,
                        (now, now + measured),
                        stop.clone(),
                    ));
                    (device, task, idle)
                });
            }
        }
        let target = measuring.map_or(u64::MAX, |(_, t)| t);
        if n_sent >= target {
            break;
        }
        if let Some((begin, _)) = measuring
            && now > begin + measured + Duration::from_secs(5)
        {
            eprintln!(
                "   the publisher fell behind by more than 5 s; stopping at {n_sent} of {target}"
            );
            break;
        }
        // Everything due up to the end of this tick.
        let due = ((args.rate as u128 * (elapsed + TICK).as_micros()) / 1_000_000) as u64;
        let due = due.min(target);
        while n_sent < due {
            let device = (n_sent % shape.devices) as usize;
            make_payload(&mut payload, n_sent, device);
            publish_qos1(&publisher.client, &topics[device], &payload).await?;
            n_sent += 1;
        }
        sent.store(n_sent, Ordering::Relaxed);
    }
    let publish_end = Instant::now();
    let cpu_end = Cpu::now(daemons, broker, pg);
    let (cpu_t0, cpu_start) = cpu_start.unwrap_or((start, Cpu::default()));
    let window_start = cpu_t0;
    let warmup_s = cpu_t0.duration_since(start).as_secs_f64();
    let streaming_after_s = streaming_at.map(|t| t.duration_since(start).as_secs_f64());
    let cpu_wall = publish_end.duration_since(cpu_t0).as_secs_f64().max(1e-6);
    let pct = |f: fn(&Cpu) -> f64| 100.0 * (f(&cpu_end) - f(&cpu_start)) / cpu_wall;
    eprintln!(
        "   published {n_sent} readings in {:.2} s; waiting for delivery",
        start.elapsed().as_secs_f64()
    );

    // Drain: broker acks, stored rows, every client's count; bounded, and cut short when
    // nothing moves for NO_PROGRESS_LIMIT.
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    let mut last_progress = Instant::now();
    let mut last_total = u64::MAX;
    let mut drain_ms = None;
    let expected: Vec<u64> = (0..n).map(|idx| shape.expected(idx, n_sent)).collect();
    loop {
        let received: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let all = publisher.acked.load(Ordering::Relaxed) >= n_sent
            && counters
                .iter()
                .zip(&expected)
                .all(|(c, &e)| c.load(Ordering::Relaxed) >= e);
        if all {
            drain_ms = Some(publish_end.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        if received != last_total {
            last_total = received;
            last_progress = Instant::now();
        }
        if Instant::now() > drain_deadline || last_progress.elapsed() > NO_PROGRESS_LIMIT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Stored rows settle too (they precede delivery, so this is normally immediate).
    let stored_deadline = Instant::now() + Duration::from_secs(10);
    let mut stored = 0;
    while Instant::now() < stored_deadline {
        stored = metric(&daemon.metrics().await?, "telebridge_readings_stored_total").unwrap_or(0.0)
            as u64;
        if stored >= n_sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    monitor_stop.cancel();
    let seen = monitor.await.unwrap_or_default();
    let (max_lag, max_queue) = (seen.max_lag, seen.max_queue);
    // Commits per second over the measured window, from the polls inside it.
    let inside: Vec<&(Instant, f64, f64)> = seen
        .batches
        .iter()
        .filter(|(at, _, _)| *at >= window_start && *at <= publish_end)
        .collect();
    let (commits_per_s, commit_ms) = match (inside.first(), inside.last()) {
        (Some(a), Some(b)) if b.0 > a.0 && b.1 > a.1 => (
            Some((b.1 - a.1) / b.0.duration_since(a.0).as_secs_f64()),
            Some(1000.0 * (b.2 - a.2) / (b.1 - a.1)),
        ),
        _ => (None, None),
    };
    let mut cut = 0;
    for d in &serving {
        cut +=
            metric(&d.metrics().await?, "telebridge_sse_clients_cut_total").unwrap_or(0.0) as u64;
    }
    let mut others_stored = 0;
    for d in &daemons[1..] {
        others_stored +=
            metric(&d.metrics().await?, "telebridge_readings_stored_total").unwrap_or(0.0) as u64;
    }
    let rows = daemon.count_readings().await.ok();
    let (pg_stats, pg_top) = PgSnapshot::since(pg_0, pg, daemon.pg_url.as_deref(), 6).await?;
    // The commands under load end with the window (and a grace for the last answer).
    let commands = match commander {
        Some((device, task, idle)) => {
            let load = timeout(COMMAND_GRACE + Duration::from_secs(5), task)
                .await
                .context("the commands under load did not end")?
                .context("the command task panicked")??;
            device.stop().await;
            Some(CommandResult {
                wanted: args.commands,
                idle,
                load,
            })
        }
        None => None,
    };

    stop.cancel();
    let mut latencies: Vec<u32> = Vec::new();
    let mut by_server: Vec<Vec<u32>> = vec![Vec::new(); serving.len()];
    let mut received = 0;
    let (mut sample_events, mut sample_reads) = (0u64, 0u64);
    let mut client_errors = 0;
    let mut first_error = None;
    let (mut exact_clients, mut short_clients, mut over_clients) = (0, 0, 0);
    let mut foreign = 0;
    let mut first_mismatch = None;
    for t in tasks {
        match timeout(Duration::from_secs(10), t).await {
            Ok(Ok(outcome)) => {
                let want = expected[outcome.idx];
                match outcome.events.cmp(&want) {
                    std::cmp::Ordering::Equal => exact_clients += 1,
                    std::cmp::Ordering::Less => short_clients += 1,
                    std::cmp::Ordering::Greater => over_clients += 1,
                }
                foreign += outcome.foreign;
                if outcome.events != want || outcome.foreign > 0 {
                    first_mismatch.get_or_insert_with(|| {
                        format!(
                            "client {}{}: {} of {want} readings, {} of another device",
                            outcome.idx,
                            shape
                                .device_of(outcome.idx)
                                .map_or(String::new(), |d| format!(" (dev-{d})")),
                            outcome.events,
                            outcome.foreign
                        )
                    });
                }
                received += outcome.events;
                if outcome.sample_client {
                    sample_events += outcome.events;
                    sample_reads += outcome.reads;
                }
                latencies.extend_from_slice(&outcome.latencies);
                by_server[outcome.server].extend_from_slice(&outcome.latencies);
                if let Some(e) = outcome.error {
                    client_errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            Ok(Err(e)) => {
                client_errors += 1;
                first_error.get_or_insert(format!("client task: {e}"));
            }
            Err(_) => {
                client_errors += 1;
                first_error.get_or_insert("client task did not stop in 10 s".into());
            }
        }
    }
    publisher.stop().await;
    latencies.sort_unstable();
    let ms = |p: f64| percentile(&latencies, p).map(|us| us as f64 / 1000.0);
    let per_instance = by_server
        .iter_mut()
        .zip(&serving_index)
        .map(|(l, &i)| {
            l.sort_unstable();
            let ms = |p: f64| percentile(l, p).map(|us| us as f64 / 1000.0);
            ((b'A' + i as u8) as char, ms(0.50), ms(0.99), l.len())
        })
        .collect();
    let ingest_kept_up = rows.unwrap_or(stored) == n_sent
        && stored == n_sent
        && (max_lag as f64) <= args.rate as f64 * LAG_SECONDS_ALLOWED;
    let result = CaseResult {
        shape,
        clients: n,
        published: n_sent,
        expected: expected.iter().sum(),
        received,
        samples: latencies.len(),
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        max_ms: latencies.last().map(|&us| us as f64 / 1000.0),
        daemon_cpu: pct(|c| c.storing),
        others_cpu: (daemons.len() > 1).then(|| pct(|c| c.others)),
        pg_cpu: pg.map(|_| pct(|c| c.pg)),
        broker_cpu: pct(|c| c.broker),
        bench_cpu: pct(|c| c.bench),
        other_cpu: (pct(|c| c.busy)
            - pct(|c| c.storing)
            - pct(|c| c.others)
            - pct(|c| c.pg)
            - pct(|c| c.broker)
            - pct(|c| c.bench))
        .max(0.0),
        rows,
        max_lag,
        max_queue,
        ingest_kept_up,
        drain_ms,
        cut,
        commits_per_s,
        commit_ms,
        p90_ms: ms(0.90),
        p999_ms: ms(0.999),
        sample_reads_per_s: (sample_reads > 0).then(|| {
            sample_reads as f64
                / samples as f64
                / publish_end.duration_since(start).as_secs_f64().max(1e-6)
        }),
        events_per_read: (sample_reads > 0).then(|| sample_events as f64 / sample_reads as f64),
        client_errors,
        first_error,
        max_tail_lag: seen.max_tail_lag,
        per_instance,
        others_stored,
        pg_stats,
        pg_top,
        log_problems: Vec::new(),
        exact_clients,
        short_clients,
        over_clients,
        foreign,
        first_mismatch,
        commands,
        warmup_s,
        streaming_after_s,
        settle_s,
        error: None,
    };
    eprintln!(
        "   warm-up {warmup_s:.1} s (every client had a reading after {})",
        streaming_after_s.map_or("-".into(), |t| format!("{t:.1} s"))
    );
    eprintln!(
        "   received {}/{} events ({} of {n} clients exact, {} of another device), p99 {}, daemon CPU {:.0}%",
        result.received,
        result.expected,
        result.exact_clients,
        result.foreign,
        fmt_ms(result.p99_ms),
        result.daemon_cpu
    );
    if let Some(c) = &result.commands {
        eprintln!(
            "   commands: idle p99 {} ({} acked), under load p99 {} ({} acked)",
            fmt_ms(c.idle.p99_ms()),
            c.idle.seen.ok,
            fmt_ms(c.load.p99_ms()),
            c.load.seen.ok
        );
    }
    Ok(result)
}

/// Waits until the daemons use less than SETTLE_CPU of a core over SETTLE_POLL (at most
/// SETTLE_LIMIT); returns the seconds it took.
async fn settle(daemons: &[&Daemon]) -> f64 {
    let pids: Vec<u32> = daemons.iter().map(|d| d.pid()).collect();
    let started = Instant::now();
    let mut before = cpu_seconds_of(&pids);
    while started.elapsed() < SETTLE_LIMIT {
        tokio::time::sleep(SETTLE_POLL).await;
        let now = cpu_seconds_of(&pids);
        if 100.0 * (now - before) / SETTLE_POLL.as_secs_f64() < SETTLE_CPU {
            break;
        }
        before = now;
    }
    started.elapsed().as_secs_f64()
}

/// What the /metrics poller saw.
#[derive(Default)]
struct Seen {
    /// The most readings ever published but not yet stored.
    max_lag: u64,
    /// The deepest ingest queue.
    max_queue: u64,
    /// `telebridge_store_batches_total` and `telebridge_store_commit_seconds_sum` at each
    /// poll.
    batches: Vec<(Instant, f64, f64)>,
    /// The most `telebridge_tail_lag_events` of the tail instances polled.
    max_tail_lag: Option<f64>,
}

/// Polls /metrics every 250 ms until stopped.
async fn ingest_monitor(
    http: reqwest::Client,
    addr: SocketAddr,
    tails: Vec<SocketAddr>,
    sent: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Seen {
    let mut seen = Seen::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return seen,
            _ = tick.tick() => {}
        }
        // Read the count first: the lag is then never under-estimated.
        let published = sent.load(Ordering::Relaxed);
        let Ok(Ok(text)) = timeout(Duration::from_secs(2), get_text(&http, addr, "/metrics")).await
        else {
            continue;
        };
        let stored = metric(&text, "telebridge_readings_stored_total").unwrap_or(0.0) as u64;
        let queue = metric(&text, "telebridge_ingest_queue_depth").unwrap_or(0.0) as u64;
        seen.max_lag = seen.max_lag.max(published.saturating_sub(stored));
        seen.max_queue = seen.max_queue.max(queue);
        if let (Some(b), Some(c)) = (
            metric(&text, "telebridge_store_batches_total"),
            metric(&text, "telebridge_store_commit_seconds_sum"),
        ) {
            seen.batches.push((Instant::now(), b, c));
        }
        for &t in &tails {
            let Ok(Ok(text)) =
                timeout(Duration::from_secs(2), get_text(&http, t, "/metrics")).await
            else {
                continue;
            };
            if let Some(lag) = metric(&text, "telebridge_tail_lag_events") {
                seen.max_tail_lag = Some(seen.max_tail_lag.map_or(lag, |m: f64| m.max(lag)));
            }
        }
    }
}

fn make_payload(out: &mut Vec<u8>, seq: u64, device: usize) {
    use std::io::Write as _;
    out.clear();
    let _ = write!(
        out,
        r#"{{"t":{},"seq":{seq},"device":"dev-{device}","temp":21.5,"hum":40.25,"pad":""#,
        now_ns()
    );
    let pad = PAYLOAD_BYTES.saturating_sub(out.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

// ---------------------------------------------------------------------------------------
// The mixed case's commands: one WebSocket, one command in flight
// ---------------------------------------------------------------------------------------

/// Starts the simulated device (stopped with `stop` at the latest), waits until the daemon
/// lists it online, opens the WebSocket on instance A, sends COMMAND_WARMUP commands, then
/// times `count` on the idle daemon, paced like those under load over `seconds`.
async fn commands_idle(
    daemon: &Daemon,
    broker: &Mosquitto,
    count: u64,
    seconds: u64,
    stop: &CancellationToken,
) -> anyhow::Result<(AnsweringDevice, Ws, CommandPhase)> {
    let device = fake_device(
        broker.port,
        COMMAND_DEVICE,
        true,
        stop.child_token(),
        ack_ok,
    )
    .await?;
    wait_online(daemon, COMMAND_DEVICE).await?;
    let mut ws = connect_ws(daemon.addr)
        .await
        .context("opening the command WebSocket")?;
    let deadline = Instant::now() + COMMAND_PHASE_LIMIT;
    let warm = drive(&mut ws, COMMAND_DEVICE, 0, COMMAND_WARMUP, 1, deadline)
        .await
        .context("warm-up commands")?;
    if warm.done < COMMAND_WARMUP {
        bail!(
            "warm-up: only {} of {COMMAND_WARMUP} commands finished: {}",
            warm.done,
            warm.first_problem.as_deref().unwrap_or("-")
        );
    }
    let from = Instant::now();
    let window = (from, from + Duration::from_secs(seconds));
    let idle = paced_commands(&mut ws, daemon.pid(), COMMAND_WARMUP, count, window, stop)
        .await
        .context("idle commands")?;
    eprintln!(
        "   idle commands: {} of {count} acked, p99 {}",
        idle.seen.ok,
        fmt_ms(idle.p99_ms())
    );
    Ok((device, ws, idle))
}

/// The commands under load (paced over the measured `window`), then the WebSocket closed.
async fn commands_under_load(
    mut ws: Ws,
    pid: u32,
    first_ref: u64,
    count: u64,
    window: (Instant, Instant),
    stop: CancellationToken,
) -> anyhow::Result<CommandPhase> {
    let phase = paced_commands(&mut ws, pid, first_ref, count, window, &stop).await;
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    phase.context("commands under load")
}

/// Sends `count` commands (refs from `first_ref`), one at a time, the sends paced evenly over
/// `window` (from, to); none is sent after `to`, and the last may take COMMAND_GRACE more to
/// be answered. CPU is that of the daemon `pid` over the phase. Ends early on `stop`.
async fn paced_commands(
    ws: &mut Ws,
    pid: u32,
    first_ref: u64,
    count: u64,
    (from, to): (Instant, Instant),
    stop: &CancellationToken,
) -> anyhow::Result<CommandPhase> {
    let gap = to.saturating_duration_since(from) / count.max(1) as u32;
    tokio::select! {
        _ = stop.cancelled() => bail!("stopped before the commands began"),
        _ = tokio::time::sleep_until(from.into()) => {}
    }
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let mut seen = Driven::default();
    let paced = async {
        for i in 0..count {
            tokio::time::sleep_until((from + gap * i as u32).into()).await;
            if Instant::now() >= to {
                break;
            }
            let one = drive(ws, COMMAND_DEVICE, first_ref + i, 1, 1, to + COMMAND_GRACE).await?;
            let done = one.done;
            seen.absorb(one);
            if done == 0 {
                // No answer by the deadline: the window is over.
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        _ = stop.cancelled() => bail!("stopped before the commands ended"),
        r = paced => r?,
    }
    let wall = t0.elapsed().as_secs_f64().max(1e-6);
    let cpu = 100.0 * (cpu_seconds(pid) - cpu0) / wall;
    Ok(CommandPhase::new(seen, cpu, wall))
}

// ---------------------------------------------------------------------------------------
// The SSE load client: raw TCP, one reusable buffer, a byte scan per line
// ---------------------------------------------------------------------------------------

struct SseClient {
    addr: SocketAddr,
    /// Which of the serving instances `addr` is.
    server: usize,
    idx: usize,
    /// `/events?...` to GET.
    path: String,
    /// The device a filtered client asked for: every reading's `"device"` is checked.
    own_device: Option<Vec<u8>>,
    /// Its read buffer's size.
    read_buf: usize,
    /// Latency of every Nth event (0: none).
    sample_every: u64,
    /// Read only this often.
    lazy: Option<Duration>,
    window: Arc<Window>,
    counters: Arc<Vec<AtomicU64>>,
    ready: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    stop: CancellationToken,
}

struct ClientOutcome {
    idx: usize,
    server: usize,
    sample_client: bool,
    events: u64,
    /// Readings of another device than `own_device`.
    foreign: u64,
    reads: u64,
    latencies: Vec<u32>,
    error: Option<String>,
}

/// What the line scanner carries from one read to the next.
struct Scan {
    events: u64,
    reads: u64,
    sample_every: u64,
    /// The device whose readings alone the client should get (filtered clients).
    own_device: Option<Vec<u8>>,
    foreign: u64,
    /// The next `data:` line belongs to a reading to look into (sampled, or checked for its
    /// device), and whether it is sampled.
    want_data: bool,
    sampled: bool,
    latencies: Vec<u32>,
}

async fn sse_client(c: SseClient) -> ClientOutcome {
    let mut buf = vec![0u8; c.read_buf];
    let mut scan = Scan {
        events: 0,
        reads: 0,
        sample_every: c.sample_every,
        own_device: c.own_device.clone(),
        foreign: 0,
        want_data: false,
        sampled: false,
        latencies: Vec::with_capacity(match c.sample_every {
            0 => 0,
            1 => 16_384,
            _ => 2_048,
        }),
    };
    let error = match sse_session(&c, &mut buf, &mut scan).await {
        Ok(()) => None,
        Err(e) => Some(format!("client {}: {e:#}", c.idx)),
    };
    ClientOutcome {
        idx: c.idx,
        server: c.server,
        sample_client: c.sample_every == 1,
        events: scan.events,
        foreign: scan.foreign,
        reads: scan.reads,
        latencies: scan.latencies,
        error,
    }
}

async fn sse_session(c: &SseClient, buf: &mut [u8], scan: &mut Scan) -> anyhow::Result<()> {
    let permit = c.gate.acquire().await.context("connect gate closed")?;
    let (mut stream, mut filled) = timeout(
        HANDSHAKE_TIMEOUT,
        open_sse(c.addr, &c.path, SSE_HEADERS, buf),
    )
    .await
    .with_context(|| format!("no response to GET {} within 10 s", c.path))??;
    drop(permit);
    c.ready.fetch_add(1, Ordering::AcqRel);
    scan_lines(buf, &mut filled, scan, &c.window);
    loop {
        let n = tokio::select! {
            biased;
            _ = c.stop.cancelled() => return Ok(()),
            r = stream.read(&mut buf[filled..]) => r.context("reading the stream")?,
        };
        if n == 0 {
            bail!("the daemon closed the stream after {} events", scan.events);
        }
        filled += n;
        scan.reads += 1;
        scan_lines(buf, &mut filled, scan, &c.window);
        c.counters[c.idx].store(scan.events, Ordering::Relaxed);
        if let Some(pause) = c.lazy {
            tokio::select! {
                _ = c.stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Consumes every complete line in `buf[..filled]` and moves the partial last line to the
/// front. Counts `event: reading` lines; for sampled readings, reads `"t":` in the `data:`
/// line, and for a filtered client compares every reading's `"device"` with its own (bytes,
/// no JSON parse). Chunked-encoding size lines, blank lines and `id:`-only frames are
/// ignored (they never start with `event:`).
fn scan_lines(buf: &mut [u8], filled: &mut usize, scan: &mut Scan, window: &Window) {
    let mut start = 0;
    let mut now: Option<u64> = None;
    while let Some(i) = find_byte(&buf[start..*filled], b'\n') {
        let line = &buf[start..start + i];
        if line.starts_with(b"event: reading") {
            scan.events += 1;
            scan.sampled = scan.sample_every != 0 && scan.events % scan.sample_every == 0;
            scan.want_data = scan.sampled || scan.own_device.is_some();
        } else if scan.want_data && line.starts_with(b"data: ") {
            scan.want_data = false;
            if let Some(own) = &scan.own_device
                && reading_device(line) != Some(own.as_slice())
            {
                scan.foreign += 1;
            }
            if scan.sampled
                && let Some(t) = publish_time(line)
            {
                let from = window.start.load(Ordering::Relaxed);
                let to = window.end.load(Ordering::Relaxed);
                if t >= from && t < to {
                    let now = *now.get_or_insert_with(now_ns);
                    let us = now.saturating_sub(t) / 1000;
                    scan.latencies.push(us.min(u32::MAX as u64) as u32);
                }
            }
        }
        start += i + 1;
    }
    buf.copy_within(start..*filled, 0);
    *filled -= start;
    if *filled == buf.len() {
        // A line longer than the buffer: not an event of ours; drop it.
        *filled = 0;
    }
}

/// The `"device"` of a reading's `data:` line: the first `"device":"..."` on it, the
/// envelope's (the payload's, should it come first, names the same device: the publisher
/// writes it so).
fn reading_device(line: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"device\":\"";
    let at = find_subslice(line, KEY)? + KEY.len();
    let rest = &line[at..];
    Some(&rest[..find_byte(rest, b'"')?])
}

/// The `"t"` of the reading's payload: the payload is the second JSON object on the line
/// (`data: {"seq":..,"device":..,..,"payload":{"t":..`; nothing before it holds a `{`).
fn publish_time(line: &[u8]) -> Option<u64> {
    let first = find_byte(line, b'{')?;
    let rest = &line[first + 1..];
    let second = find_byte(rest, b'{')?;
    leading_u64(rest[second..].strip_prefix(b"{\"t\":")?)
}

// ---------------------------------------------------------------------------------------
// The idle test
// ---------------------------------------------------------------------------------------

struct IdleResult {
    opened: usize,
    failures: usize,
    first_failure: Option<String>,
    sse_clients: f64,
    rss_before_kb: u64,
    rss_after_kb: u64,
    hwm_kb: u64,
    open_seconds: f64,
    released: bool,
}

async fn idle_case(bin: &Path, broker: &Mosquitto, n: usize) -> anyhow::Result<IdleResult> {
    let tag = format!("idle-{}", std::process::id());
    let daemon = Daemon::start(bin, broker.port, &tag).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before_kb = proc_status_kb(daemon.pid(), "VmRSS:").unwrap_or(0);
    let addr = daemon.addr;
    let started = Instant::now();
    let results: Vec<anyhow::Result<TcpStream>> = futures_util::stream::iter(0..n)
        .map(|_| async move {
            let mut buf = [0u8; 2048];
            let (stream, _) = timeout(
                HANDSHAKE_TIMEOUT,
                open_sse(addr, "/events?type=status", SSE_HEADERS, &mut buf),
            )
            .await
            .context("no response within 10 s")??;
            Ok(stream)
        })
        .buffer_unordered(CONNECT_PARALLEL)
        .collect()
        .await;
    let open_seconds = started.elapsed().as_secs_f64();
    let mut streams = Vec::with_capacity(n);
    let mut failures = 0;
    let mut first_failure = None;
    for r in results {
        match r {
            Ok(s) => streams.push(s),
            Err(e) => {
                failures += 1;
                first_failure.get_or_insert(format!("{e:#}"));
            }
        }
    }
    eprintln!(
        "   opened {} connections in {open_seconds:.1} s ({failures} failed)",
        streams.len()
    );
    // The daemon counts every stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sse_clients = -1.0;
    while Instant::now() < deadline {
        sse_clients = metric(&daemon.metrics().await?, "telebridge_sse_clients").unwrap_or(-1.0);
        if sse_clients >= streams.len() as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let allocator and runtime settle before reading the resident size.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kb = proc_status_kb(daemon.pid(), "VmRSS:").unwrap_or(0);
    let hwm_kb = proc_status_kb(daemon.pid(), "VmHWM:").unwrap_or(0);
    let opened = streams.len();
    drop(streams);
    // The daemon notices the closed sockets and releases their slots.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut released = false;
    while Instant::now() < deadline {
        if metric(&daemon.metrics().await?, "telebridge_sse_clients") == Some(0.0) {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(daemon);
    Ok(IdleResult {
        opened,
        failures,
        first_failure,
        sse_clients,
        rss_before_kb,
        rss_after_kb,
        hwm_kb,
        open_seconds,
        released,
    })
}

// ---------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------

fn print_fanout_table(args: &Args, kind: Kind, results: &[&CaseResult]) {
    println!();
    let sse_on = if args.instances > 1 && !args.sse_on_storing {
        ", SSE on the instances that did not store"
    } else {
        ""
    };
    let timing = format!(
        "{} readings/s for {} s measured (after the warm-up: at least {} s, until every client streams)",
        args.rate, args.seconds, args.warmup
    );
    match kind {
        Kind::Broadcast => println!("## fan-out on {}{sse_on}: {timing}", setup_label(args)),
        Kind::Filtered => println!(
            "## filtered fan-out on {}{sse_on}: each client on `/events?type=reading&device=dev-K`, \
             the clients spread evenly over {} devices; {timing}, round-robin over the devices \
             ({:.1} readings/s each)",
            setup_label(args),
            args.devices,
            args.rate as f64 / args.devices as f64
        ),
        Kind::Mixed => println!(
            "## mixed on {}{sse_on}: unfiltered clients streaming {timing}, with command round \
             trips beside them (below)",
            setup_label(args)
        ),
    }
    println!();
    let target = match kind {
        Kind::Filtered => {
            format!("p99 < {TARGET_FILTERED_P99_MS} ms, CPU < {TARGET_FILTERED_CPU} %")
        }
        _ => format!("p99 < {TARGET_P99_MS} ms"),
    };
    println!(
        "| clients | readings published | events expected | events received | clients exact | latency samples | p50 ms | p99 ms | max ms | daemon CPU % | other instances CPU % | postgres CPU % | broker CPU % | bench CPU % | other processes CPU % | rows in {} | max ingest lag | max tail lag (serving) | ingest kept up | drain after last publish | {target} |",
        args.backend.name()
    );
    println!(
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|:-:|"
    );
    for &r in results {
        if let Some(e) = &r.error {
            println!("| {} | failed: {e} |", r.clients);
            continue;
        }
        let met = r.p99_ms.is_some_and(|p| p < r.shape.target_p99_ms())
            && r.received == r.expected
            && r.exact_clients == r.clients
            && r.foreign == 0
            && (kind != Kind::Filtered || r.daemon_cpu < TARGET_FILTERED_CPU);
        println!(
            "| {} | {} | {} | {} ({:.2}%) | {} of {} | {} | {} | {} | {} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} (queue ≤ {}) | {} | {} | {} | {} |",
            r.clients,
            r.published,
            r.expected,
            r.received,
            if r.expected > 0 {
                100.0 * r.received as f64 / r.expected as f64
            } else {
                0.0
            },
            r.exact_clients,
            r.clients,
            r.samples,
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms),
            fmt_ms(r.max_ms),
            r.daemon_cpu,
            r.others_cpu.map_or("-".into(), |c| format!("{c:.0}")),
            r.pg_cpu.map_or("-".into(), |c| format!("{c:.0}")),
            r.broker_cpu,
            r.bench_cpu,
            r.other_cpu,
            r.rows.map_or("?".into(), |n| n.to_string()),
            r.max_lag,
            r.max_queue,
            r.max_tail_lag
                .map_or("-".into(), |l| format!("{l:.0} events")),
            yes_no(r.ingest_kept_up),
            r.drain_ms
                .map_or("incomplete".into(), |ms| format!("{ms:.0} ms")),
            yes_no(met),
        );
    }
    println!();
    println!(
        "CPU % is of one core over the measured window (100% = one core busy; the machine has {}); \
         \"daemon\" is the storing instance (A); \"other instances\" the rest together; postgres = \
         the postmaster and all its processes; \"other processes\" is the machine's busy time minus \
         all of those and the bench.",
        Machine::read().nproc
    );
    if args.backend == Backend::Postgres {
        println!(
            "max tail lag: the most telebridge_tail_lag_events (committed by anyone, not yet read by this \
             instance) seen on a serving instance at the 250 ms polls."
        );
    }
    println!(
        "max ingest lag: most readings published but not yet stored, polled every 250 ms; \"kept up\" = \
         rows == published and lag <= {LAG_SECONDS_ALLOWED} s of readings."
    );
    println!();
    println!("more percentiles, and where the work goes (daemon side):");
    println!();
    println!(
        "| clients | p90 ms | p99.9 ms | write transactions/s (= feed pushes) | mean commit ms | pushes x clients (wake-ups at most) | writes/s to one sample client | events per write | streams cut | client errors | quiet after connect s | warm-up s (every client had a reading after) |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in results.iter().filter(|r| r.error.is_none()) {
        let opt = |v: Option<f64>, digits: usize| v.map_or("?".into(), |v| format!("{v:.digits$}"));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.1} ({}) |",
            r.clients,
            fmt_ms(r.p90_ms),
            fmt_ms(r.p999_ms),
            opt(r.commits_per_s, 0),
            opt(r.commit_ms, 2),
            opt(r.commits_per_s.map(|c| c * r.clients as f64), 0),
            opt(r.sample_reads_per_s, 0),
            opt(r.events_per_read, 1),
            r.cut,
            r.client_errors,
            r.settle_s,
            r.warmup_s,
            r.streaming_after_s
                .map_or("not all".into(), |t| format!("{t:.1} s"))
        );
    }
    println!(
        "(writes to a sample client are counted as its reads, which it does at once; the kernel may \
         merge writes, so this is a lower bound on the daemon's writes)"
    );
    if args.backend == Backend::Postgres {
        println!();
        println!("per serving instance, and PostgreSQL over the case:");
        for r in results.iter().filter(|r| r.error.is_none()) {
            println!(
                "- {} client(s): {}; readings stored by the non-ingesting instances: {}{}",
                r.clients,
                r.per_instance
                    .iter()
                    .map(|(l, p50, p99, n)| format!(
                        "instance {l}: p50 {} / p99 {} ms ({n} samples)",
                        fmt_ms(*p50),
                        fmt_ms(*p99)
                    ))
                    .collect::<Vec<_>>()
                    .join("; "),
                r.others_stored,
                r.pg_stats
                    .as_ref()
                    .map_or(String::new(), |s| format!("; postgres: {}", s.describe()))
            );
            if let Some((head, rest)) = r.pg_top.split_first() {
                println!("  postgres statements (pg_stat_statements, by execution time): {head}");
                for line in rest {
                    println!("    {line}");
                }
            }
        }
    }
    for r in results {
        if !r.log_problems.is_empty() {
            println!(
                "note: {} clients: {} warning/error line(s) in the daemon logs; first: {}",
                r.clients,
                r.log_problems.len(),
                r.log_problems
                    .iter()
                    .take(3)
                    .map(|l| format!("{l:.300}"))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        if r.received < r.expected && r.error.is_none() {
            println!(
                "note: {} clients: {:.2}% of the events were not delivered within {} s after the last \
                 publish; the latency percentiles above are of delivered events only",
                r.clients,
                100.0 * (r.expected - r.received) as f64 / r.expected as f64,
                DRAIN_LIMIT.as_secs()
            );
        }
        if r.client_errors > 0 || r.cut > 0 {
            println!(
                "note: {} clients: {} client error(s), {} stream(s) cut by the daemon for lagging; first: {}",
                r.clients,
                r.client_errors,
                r.cut,
                r.first_error.as_deref().unwrap_or("-")
            );
        }
        if let Some(m) = &r.first_mismatch {
            println!(
                "note: {} clients: {} got fewer readings than published to their device(s), {} more, \
                 {} readings of another device in all; first: {m}",
                r.clients, r.short_clients, r.over_clients, r.foreign
            );
        }
    }
    if kind == Kind::Mixed {
        print_commands_table(results);
    }
}

/// The mixed case's command round trips, idle and under load, each beside the daemon's CPU.
fn print_commands_table(results: &[&CaseResult]) {
    println!();
    println!(
        "command round trip (WebSocket send -> `ack` on the WebSocket, one in flight), idle = the \
         clients connected and nothing published, under load = paced over the measured window:"
    );
    println!();
    println!(
        "| clients | phase | acked / commands | p50 ms | p90 ms | p99 ms | max ms | send->accepted p99 ms | server rtt_ms p99 | daemon CPU % | wall s |"
    );
    println!("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let mut problems = Vec::new();
    for r in results {
        let Some(c) = &r.commands else { continue };
        for (phase, p) in [("idle", &c.idle), ("under load", &c.load)] {
            let mut accepted = p.seen.accepted_us.clone();
            accepted.sort_unstable();
            println!(
                "| {} | {phase} | {} / {} | {} | {} | **{}** | {} | {} | {} | {:.0} | {:.1} |",
                r.clients,
                p.seen.ok,
                c.wanted,
                fmt_ms(p.ms(0.50)),
                fmt_ms(p.ms(0.90)),
                fmt_ms(p.p99_ms()),
                fmt_ms(p.ms(1.0)),
                fmt_ms(percentile(&accepted, 0.99).map(|us| us as f64 / 1000.0)),
                fmt_ms(percentile_f(&p.seen.server_rtt_ms, 0.99)),
                p.daemon_cpu,
                p.wall_s
            );
            if let Some(problem) = &p.seen.first_problem {
                problems.push(format!("{} clients, {phase}: {problem:.300}", r.clients));
            }
        }
    }
    println!();
    for p in &problems {
        println!("note: first command problem, {p}");
    }
    println!(
        "server rtt_ms: the daemon's own measure, from handing the command to its MQTT client to \
         the commit of the device's answer. Daemon CPU % of one core over the phase."
    );
}

fn print_idle_table(n: usize, idle: &anyhow::Result<IdleResult>) {
    println!();
    println!("## idle: {n} SSE connections (`GET /events?type=status`, nothing flows)");
    println!();
    let i = match idle {
        Ok(i) => i,
        Err(e) => {
            println!("failed: {e:#}");
            return;
        }
    };
    println!(
        "| connections opened | telebridge_sse_clients | daemon RSS before | daemon RSS after | delta | per connection | peak (VmHWM) | < 150 MB in all |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|:-:|");
    let mb = |kb: u64| kb as f64 / 1024.0;
    let delta = i.rss_after_kb.saturating_sub(i.rss_before_kb);
    println!(
        "| {} ({} failed, {:.1} s) | {} | {:.1} MB | {:.1} MB | {:.1} MB | {:.1} KB | {:.1} MB | {} |",
        i.opened,
        i.failures,
        i.open_seconds,
        i.sse_clients,
        mb(i.rss_before_kb),
        mb(i.rss_after_kb),
        mb(delta),
        if i.opened > 0 {
            delta as f64 / i.opened as f64
        } else {
            0.0
        },
        mb(i.hwm_kb),
        yes_no(i.opened == n && mb(i.rss_after_kb) < TARGET_IDLE_MB),
    );
    if let Some(f) = &i.first_failure {
        println!("first failure: {f}");
    }
    if !i.released {
        println!("note: telebridge_sse_clients did not return to 0 within 20 s of closing them");
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
