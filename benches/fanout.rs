//! Fan-out benchmark: delivery latency from an MQTT publish to its receipt on SSE clients,
//! and the memory of many idle SSE connections.
//!
//! ```text
//! cargo bench --bench fanout [-- --clients 1,100,1000 --rate 1000 --seconds 10 --idle 10000]
//! cargo bench --bench fanout -- --backend postgres --instances 2 [--sse-on other|storing] ...
//! ```
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
//! and time, and everything started is stopped by Drop guards (children by their pid).
//!
//! For every client count the publisher sends `--rate` readings/s (10 ms ticks) for a
//! 1 s warm-up plus `--seconds`; each reading carries its publish time `"t":<unix ns>`.
//! Every client counts every `event: reading` (raw TCP, one reusable buffer, a word-at-a-time
//! newline scan; chunk-size lines are skipped as they never start with `event:`). Latency
//! (publish → receipt of the `data:` line) is taken on every event of up to 10 "sample"
//! clients, spread over the connection order, which read as soon as data arrives, for
//! readings published inside the measured window only. The other clients read every
//! `--lazy-ms` (default 10 ms): the daemon does the same work for them (its writes land in
//! their socket buffers), but the load client, which shares the two cores with the daemon,
//! does a tenth of the reads. With `--lazy-ms 0` they read at once and sample every 10th
//! event.
//!
//! Reported per case: events expected vs received, p50/p99/max (and p90/p99.9), CPU of the
//! daemon, the broker, this process and everything else on the machine over the measured
//! window, rows in SQLite vs readings published, the largest ingest lag seen at 250 ms
//! polls of /metrics, write transactions per second and their mean time, and how many
//! events the daemon puts in one write.
//!
//! The idle test opens `--idle` SSE connections that receive nothing (`type=status`) and
//! reports the daemon's resident memory before and after.

mod common;

use common::{
    Backend, Daemon, HANDSHAKE_TIMEOUT, Machine, Mosquitto, PgCluster, PgSnapshot, PgStats,
    Placement, Publisher, cpu_seconds, cpu_seconds_of, daemon_binary, find_byte, fmt_ms, get_text,
    leading_u64, load_average, machine_busy_seconds, metric, modified, number, open_file_limit,
    open_sse, path_value, percentile, proc_status_kb, publish_qos1, stop_and_discard,
    tokio_workers,
};
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

  --clients LIST   SSE client counts, one case each (default 1,100,1000; none: only idle)
  --rate N         readings published per second (default 1000)
  --seconds N      measured seconds per case, after a 1 s warm-up (default 10)
  --warmup N       warm-up seconds (default 1)
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

/// Devices the publisher rotates through (`devices/dev-{i % 10}/telemetry`).
const DEVICES: u64 = 10;
/// Size of each published payload, bytes.
const PAYLOAD_BYTES: usize = 100;
/// Publisher pacing tick.
const TICK: Duration = Duration::from_millis(10);
/// Clients whose every event is sampled for latency; the others sample every 10th.
const SAMPLE_CLIENTS: usize = 10;
const SAMPLE_EVERY_OTHERS: u64 = 10;
/// Read buffer of one SSE client (the daemon writes chunks of up to 256 KiB).
const READ_BUF: usize = 64 * 1024;
/// The SSE clients' request headers beyond Host and Accept.
const SSE_HEADERS: &str = "User-Agent: telebridge-fanout-bench\r\n";
/// Connections being set up at once (the daemon's listen backlog is 1024).
const CONNECT_PARALLEL: usize = 128;
/// Bounds on every wait.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
const NO_PROGRESS_LIMIT: Duration = Duration::from_secs(5);
/// Targets from PRODUCT.md.
const TARGET_P99_MS: f64 = 50.0;
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
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
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
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // `cargo bench` passes --bench to harness = false targets.
                "--bench" => {}
                "-h" | "--help" => out.help = true,
                "--clients" => {
                    let list = args
                        .next()
                        .ok_or_else(|| anyhow!("--clients needs a list"))?;
                    out.clients = list
                        .split(',')
                        .filter(|c| *c != "none")
                        .map(|c| number("--clients", Some(c.to_owned()), 1, 15_000))
                        .map(|n| n.map(|n| n as usize))
                        .collect::<anyhow::Result<_>>()?;
                }
                "--rate" => out.rate = number("--rate", args.next(), 1, 100_000)?,
                "--seconds" => out.seconds = number("--seconds", args.next(), 1, 600)?,
                "--warmup" => out.warmup = number("--warmup", args.next(), 0, 60)?,
                "--idle" => out.idle = number("--idle", args.next(), 0, 15_000)? as usize,
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
        Ok(out)
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let need = args
        .clients
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(args.idle) as u64
        + 200;
    if let Some(limit) = open_file_limit() {
        if limit < need {
            bail!(
                "the open-file limit of this process is {limit}, and the bench needs about {need}; \
                 lower --clients/--idle or raise `ulimit -n`"
            );
        }
    }
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
         to devices/dev-{{0..{}}}/telemetry, paced in {} ms ticks; warm-up {} s, measured {} s",
        args.rate,
        DEVICES - 1,
        TICK.as_millis(),
        args.warmup,
        args.seconds
    );
    println!(
        "clients:    raw HTTP/1.1 `GET /events?type=reading` with TCP_NODELAY, all in this process \
         (tokio, {} worker threads), each counting every event; latency (publish time -> receipt \
         of the data line) on every event of {SAMPLE_CLIENTS} sample clients spread over the \
         connection order, which read at once; {}",
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
    println!();

    let mut all = Vec::new();
    for setup in &setups {
        let mut results = Vec::new();
        for &n in &setup.clients {
            eprintln!("-- case: {n} SSE client(s) on {}", setup_label(setup));
            match fanout_case(&bin, &broker, pg.as_ref(), setup, n).await {
                Ok(r) => results.push(r),
                Err(e) => {
                    eprintln!("case with {n} clients failed: {e:#}");
                    results.push(CaseResult::failed(n, format!("{e:#}")));
                }
            }
        }
        if !results.is_empty() {
            print_fanout_table(setup, &results);
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
    let big = results
        .iter()
        .filter(|r| r.error.is_none())
        .max_by_key(|r| r.clients);
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
        for r in results.iter().filter(|r| r.error.is_none()) {
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
            match results.iter().find(|r| r.clients == n) {
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
    error: Option<String>,
}

impl CaseResult {
    fn failed(clients: usize, error: String) -> CaseResult {
        CaseResult {
            clients,
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
    n: usize,
) -> anyhow::Result<CaseResult> {
    // Distinct per setup, so a compare run's cases never share a client id or database.
    let tag = format!(
        "fanout-{n}-{}{}-{}",
        match args.backend {
            Backend::Sqlite => "sq",
            Backend::Postgres => "pg",
        },
        args.instances,
        std::process::id()
    );
    let pg = pg.filter(|_| args.backend == Backend::Postgres);
    let daemons = start_instances(bin, broker, pg, args, &tag).await?;
    let result = measure_case(&daemons, broker, pg, args, n, &tag).await;
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
    n: usize,
    tag: &str,
) -> anyhow::Result<CaseResult> {
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
    let sample_stride = (n / SAMPLE_CLIENTS).max(1);
    let mut tasks = Vec::with_capacity(n);
    for idx in 0..n {
        let sample_client = idx % sample_stride == 0 && idx / sample_stride < SAMPLE_CLIENTS;
        let (sample_every, lazy) = if sample_client {
            (1, None)
        } else if args.lazy_ms > 0 {
            (0, Some(Duration::from_millis(args.lazy_ms)))
        } else {
            (SAMPLE_EVERY_OTHERS, None)
        };
        tasks.push(tokio::spawn(sse_client(SseClient {
            addr: serving[idx % serving.len()].addr,
            server: idx % serving.len(),
            idx,
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

    let warmup = Duration::from_secs(args.warmup);
    let total = warmup + Duration::from_secs(args.seconds);
    let total_target = args.rate * (args.warmup + args.seconds);
    let start = Instant::now();
    let start_ns = now_ns();
    window
        .start
        .store(start_ns + warmup.as_nanos() as u64, Ordering::Release);
    window
        .end
        .store(start_ns + total.as_nanos() as u64, Ordering::Release);
    let mut cpu_start = if warmup.is_zero() {
        Some((Instant::now(), Cpu::now(daemons, broker, pg)))
    } else {
        None
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n_sent = 0u64;
    let mut payload = Vec::with_capacity(PAYLOAD_BYTES + 32);
    let topics: Vec<String> = (0..DEVICES)
        .map(|i| format!("devices/dev-{i}/telemetry"))
        .collect();
    while n_sent < total_target {
        tick.tick().await;
        let elapsed = start.elapsed();
        if cpu_start.is_none() && elapsed >= warmup {
            cpu_start = Some((Instant::now(), Cpu::now(daemons, broker, pg)));
        }
        if elapsed > total + Duration::from_secs(5) {
            eprintln!(
                "   the publisher fell behind by more than 5 s; stopping at {n_sent} of {total_target}"
            );
            break;
        }
        // Everything due up to the end of this tick.
        let due = ((args.rate as u128 * (elapsed + TICK).as_micros()) / 1_000_000) as u64;
        let due = due.min(total_target);
        while n_sent < due {
            let device = (n_sent % DEVICES) as usize;
            make_payload(&mut payload, n_sent, device);
            publish_qos1(&publisher.client, &topics[device], &payload).await?;
            n_sent += 1;
        }
        sent.store(n_sent, Ordering::Relaxed);
    }
    let publish_end = Instant::now();
    let cpu_end = Cpu::now(daemons, broker, pg);
    let (cpu_t0, cpu_start) = cpu_start.unwrap_or((start, Cpu::default()));
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
    loop {
        let received: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        let all =
            received >= n_sent * n as u64 && publisher.acked.load(Ordering::Relaxed) >= n_sent;
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
    let window_start = start + warmup;
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

    stop.cancel();
    let mut latencies: Vec<u32> = Vec::new();
    let mut by_server: Vec<Vec<u32>> = vec![Vec::new(); serving.len()];
    let mut received = 0;
    let (mut sample_events, mut sample_reads) = (0u64, 0u64);
    let mut client_errors = 0;
    let mut first_error = None;
    for t in tasks {
        match timeout(Duration::from_secs(10), t).await {
            Ok(Ok(outcome)) => {
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
        clients: n,
        published: n_sent,
        expected: n_sent * n as u64,
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
                / SAMPLE_CLIENTS.min(n) as f64
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
        error: None,
    };
    eprintln!(
        "   received {}/{} events, p99 {}, daemon CPU {:.0}%",
        result.received,
        result.expected,
        fmt_ms(result.p99_ms),
        result.daemon_cpu
    );
    Ok(result)
}

/// What the /metrics poller saw.
#[derive(Default)]
struct Seen {
    /// The most readings ever published but not yet stored.
    max_lag: u64,
    /// The deepest ingest queue.
    max_queue: u64,
    /// `telebridge_store_batches_total` and `telebridge_store_commit_seconds_total` at each
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
            metric(&text, "telebridge_store_commit_seconds_total"),
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
// The SSE load client: raw TCP, one reusable buffer, a byte scan per line
// ---------------------------------------------------------------------------------------

struct SseClient {
    addr: SocketAddr,
    /// Which of the serving instances `addr` is.
    server: usize,
    idx: usize,
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
    server: usize,
    sample_client: bool,
    events: u64,
    reads: u64,
    latencies: Vec<u32>,
    error: Option<String>,
}

/// What the line scanner carries from one read to the next.
struct Scan {
    events: u64,
    reads: u64,
    sample_every: u64,
    /// The next `data:` line belongs to a sampled reading.
    want_data: bool,
    latencies: Vec<u32>,
}

async fn sse_client(c: SseClient) -> ClientOutcome {
    let mut buf = vec![0u8; READ_BUF];
    let mut scan = Scan {
        events: 0,
        reads: 0,
        sample_every: c.sample_every,
        want_data: false,
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
        server: c.server,
        sample_client: c.sample_every == 1,
        events: scan.events,
        reads: scan.reads,
        latencies: scan.latencies,
        error,
    }
}

async fn sse_session(c: &SseClient, buf: &mut [u8], scan: &mut Scan) -> anyhow::Result<()> {
    let permit = c.gate.acquire().await.context("connect gate closed")?;
    let (mut stream, mut filled) = timeout(
        HANDSHAKE_TIMEOUT,
        open_sse(c.addr, "/events?type=reading", SSE_HEADERS, buf),
    )
    .await
    .context("no response to GET /events within 10 s")??;
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
/// line. Chunked-encoding size lines and blank lines are ignored (they never start with
/// `event:`).
fn scan_lines(buf: &mut [u8], filled: &mut usize, scan: &mut Scan, window: &Window) {
    let mut start = 0;
    let mut now: Option<u64> = None;
    while let Some(i) = find_byte(&buf[start..*filled], b'\n') {
        let line = &buf[start..start + i];
        if line.starts_with(b"event: reading") {
            scan.events += 1;
            scan.want_data = scan.sample_every != 0 && scan.events % scan.sample_every == 0;
        } else if scan.want_data && line.starts_with(b"data: ") {
            scan.want_data = false;
            if let Some(t) = publish_time(line) {
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

fn print_fanout_table(args: &Args, results: &[CaseResult]) {
    println!(
        "## fan-out on {}{}: {} readings/s for {} s measured (after {} s warm-up)",
        setup_label(args),
        if args.instances > 1 && !args.sse_on_storing {
            ", SSE on the instances that did not store"
        } else {
            ""
        },
        args.rate,
        args.seconds,
        args.warmup
    );
    println!();
    println!(
        "| clients | readings published | events expected | events received | latency samples | p50 ms | p99 ms | max ms | daemon CPU % | other instances CPU % | postgres CPU % | broker CPU % | bench CPU % | other processes CPU % | rows in {} | max ingest lag | max tail lag (serving) | ingest kept up | drain after last publish | p99 < 50 ms |",
        args.backend.name()
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|--:|:-:|");
    for r in results {
        if let Some(e) = &r.error {
            println!("| {} | failed: {e} |", r.clients);
            continue;
        }
        println!(
            "| {} | {} | {} | {} ({:.2}%) | {} | {} | {} | {} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} (queue ≤ {}) | {} | {} | {} | {} |",
            r.clients,
            r.published,
            r.expected,
            r.received,
            if r.expected > 0 {
                100.0 * r.received as f64 / r.expected as f64
            } else {
                0.0
            },
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
            if r.p99_ms.is_some_and(|p| p < TARGET_P99_MS) && r.received == r.expected {
                "yes"
            } else {
                "NO"
            },
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
        "| clients | p90 ms | p99.9 ms | write transactions/s (= feed pushes) | mean commit ms | pushes x clients (wake-ups at most) | writes/s to one sample client | events per write | streams cut | client errors |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in results.iter().filter(|r| r.error.is_none()) {
        let opt = |v: Option<f64>, digits: usize| v.map_or("?".into(), |v| format!("{v:.digits$}"));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.clients,
            fmt_ms(r.p90_ms),
            fmt_ms(r.p999_ms),
            opt(r.commits_per_s, 0),
            opt(r.commit_ms, 2),
            opt(r.commits_per_s.map(|c| c * r.clients as f64), 0),
            opt(r.sample_reads_per_s, 0),
            opt(r.events_per_read, 1),
            r.cut,
            r.client_errors
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
    }
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
