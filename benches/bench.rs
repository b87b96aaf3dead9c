//! Benchmarks of the telebridge daemon against a real Mosquitto broker.
//!
//! ```text
//! cargo bench --bench bench -- ingest [--seconds N] [--messages N] [--no-peer]
//!     [--backend sqlite|postgres] [--instances N]
//! cargo bench --bench bench -- ingest --compare-backends [--messages N] [--payload N]
//!     [--instances N] [--alert-rules N]
//! ```
//!
//! `ingest` checks the ingest goal of PRODUCT.md: for QoS 0 and 1 and payloads of 100 B and
//! 1 KiB, it compares the rate at which a do-nothing subscriber receives a burst of messages
//! from Mosquitto with the rate at which the release daemon (`target/release/telebridge`)
//! commits the same burst to SQLite. Rows are counted in the database, never acknowledgements.
//!
//! The same burst then goes to a peer, Node-RED with `node-red-node-sqlite`, running the flow
//! in `benches/nodered/flows.json` (MQTT in -> JSON -> function -> SQLite insert, and the same
//! MQTT in -> WebSocket out), and its rows are counted the same way. Its Node.js modules are
//! pinned by `benches/nodered/package-lock.json` and installed on first use with
//! `npm ci --prefix benches/nodered` (sqlite3 is compiled from source, which takes minutes).
//!
//! - `--seconds N`: the cap on every wait (default 60), so the bench is always bounded.
//! - `--messages N`: messages per burst for every case (default 200,000 for QoS 0 and
//!   100,000 for QoS 1).
//! - `--no-peer`: skip Node-RED.
//! - `--backend postgres`: the daemon stores in a fresh database on a PostgreSQL cluster the
//!   bench starts itself (`common::PgCluster`: PostgreSQL 15 as the `postgres` user, a temp
//!   dir, a free port on 127.0.0.1, commits durable); `--instances N` runs N daemons on that
//!   database in one shared group (`[mqtt] shared_group = "tb"`, each with its own client
//!   id) on the one Mosquitto, which deals the burst out among them. Rows are counted in the
//!   database, never acknowledgements.
//! - `--compare-backends`: QoS 1 only (`--payload` bytes, default 100), back to back on the
//!   same broker: the do-nothing subscriber, SQLite x1, PostgreSQL x1 and PostgreSQL x N
//!   (`--instances`, default 3); prints committed rows/s side by side with their ratios, the
//!   CPU of the daemons, PostgreSQL (postmaster and every backend) and Mosquitto, and
//!   PostgreSQL's commits and WAL flushes (pg_stat_wal).
//!
//! Everything (broker, publisher, subscriber, daemon, Node-RED) runs on this machine, as the
//! goal asks ("on the same machine and load"), so the numbers depend on the number of cores.

mod common;

use common::{
    Backend, HANDSHAKE_TIMEOUT, MQTT_INFLIGHT, Machine, Mosquitto, PG_STATS_SETTLE, PgCluster,
    PgSnapshot, PgStats, Placement, cpu_seconds, cpu_seconds_of, daemon_binary, free_port,
    load_average, log_problems, log_tail, machine_busy_seconds, machine_irq_seconds, metric,
    mqtt_connect, mqtt_options, number, path_value, proc_status_kb, thousands,
};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};
use sqlx::Connection as _;
use sqlx::postgres::PgConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tempfile::TempDir;
use tokio::time::timeout;

/// The topic filter telebridge subscribes to by default, and the bench subscriber too.
const TELEMETRY_FILTER: &str = "devices/+/telemetry";
/// Devices the publisher rotates through.
const DEVICES: usize = 100;
/// Devices of the load with `--alert-rules`.
const ALERT_DEVICES: usize = 1000;
/// How often the SQLite row count is polled while the daemon ingests.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// A run that makes no progress for this long has stopped (lost messages or a stall).
const IDLE_LIMIT: Duration = Duration::from_secs(10);
/// The Node-RED peer: package.json, package-lock.json, flows.json and its node_modules.
const NODERED_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/nodered");
/// Longest `npm ci` of the Node-RED modules (it compiles SQLite and node-sqlite3).
const NPM_CI_LIMIT: Duration = Duration::from_secs(30 * 60);
/// The path of the WebSocket out node's listener in flows.json.
const NODERED_WS_PATH: &str = "/ws/telemetry";
/// Bounds of --seconds (a day) and --messages.
const MAX_SECONDS: u64 = 86_400;
const MAX_MESSAGES: u64 = 1_000_000_000;
/// Most daemons in one shared group.
const MAX_INSTANCES: u64 = 16;
/// Target from the PostgreSQL brief: one instance commits at least this many readings/s at
/// QoS 1.
const TARGET_PG1_ROWS_PER_S: f64 = 30_000.0;

fn main() -> ExitCode {
    match common::parse_args(USAGE, Args::parse, |a| a.help) {
        ControlFlow::Continue(args) => common::run_to_exit(ingest(&args)),
        ControlFlow::Break(code) => code,
    }
}

const USAGE: &str = "usage: cargo bench --bench bench -- ingest [--seconds N] [--messages N] [--no-peer]
           [--backend sqlite|postgres] [--instances N]
       cargo bench --bench bench -- ingest --compare-backends [--messages N] [--payload N]
           [--instances N] [--alert-rules N]

  ingest              subscriber vs telebridge vs Node-RED ingest rate, QoS 0/1 x 100 B/1 KiB payloads
  --seconds N         cap on every wait, in seconds (default 60)
  --messages N        messages per burst (default 200000 for QoS 0, 100000 for QoS 1)
  --no-peer           skip the Node-RED peer (benches/nodered; its modules are installed on
                      first use with `npm ci --prefix benches/nodered`)
  --backend B         sqlite (default) or postgres: a fresh database per case on a PostgreSQL 15
                      cluster this bench starts and stops itself
  --instances N       daemons on that one database in one shared group (default 1; more needs
                      --backend postgres)
  --compare-backends  QoS 1 only: subscriber, SQLite x1, PostgreSQL x1 and PostgreSQL x N
                      (--instances, default 3) back to back, rows/s side by side with ratios;
                      no Node-RED
  --payload N         payload bytes for --compare-backends (default 100)
  --alert-rules N     with --compare-backends: SQLite x1 and PostgreSQL x1, each without and
                      with N alert rules on every device, the load over 1000 devices
  --daemon PATH       the telebridge binary to run (default: the release build)";

/// Command-line options.
#[derive(Debug)]
struct Args {
    help: bool,
    /// Cap on every wait.
    timeout: Duration,
    /// Messages per burst, overriding the per-QoS defaults.
    messages: Option<u64>,
    /// Skip the Node-RED peer.
    no_peer: bool,
    /// Where the daemon stores.
    backend: Backend,
    /// Daemons in one shared group (PostgreSQL only above 1).
    instances: Option<u64>,
    /// SQLite x1 vs PostgreSQL x1 vs PostgreSQL x N at QoS 1.
    compare: bool,
    /// Payload size for --compare-backends.
    payload: usize,
    /// The telebridge binary to run instead of the release build.
    daemon: Option<PathBuf>,
    /// Alert rules for --compare-backends (0: none).
    alert_rules: usize,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut out = Args {
            help: false,
            timeout: Duration::from_secs(60),
            messages: None,
            no_peer: false,
            backend: Backend::Sqlite,
            instances: None,
            compare: false,
            payload: 100,
            daemon: None,
            alert_rules: 0,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // `cargo bench` appends --bench to the arguments of harness = false targets.
                "--bench" | "ingest" => {}
                "-h" | "--help" => out.help = true,
                "--seconds" => {
                    let n = number("--seconds", args.next(), 1, MAX_SECONDS)?;
                    out.timeout = Duration::from_secs(n);
                }
                "--messages" => {
                    out.messages = Some(number("--messages", args.next(), 1, MAX_MESSAGES)?);
                }
                "--no-peer" => out.no_peer = true,
                "--backend" => out.backend = Backend::parse(args.next())?,
                "--instances" => {
                    out.instances = Some(number("--instances", args.next(), 1, MAX_INSTANCES)?);
                }
                "--compare-backends" => out.compare = true,
                "--alert-rules" => {
                    out.alert_rules = number("--alert-rules", args.next(), 1, 10_000)? as usize;
                }
                "--daemon" => out.daemon = Some(path_value("--daemon", args.next())?),
                "--payload" => {
                    out.payload = number("--payload", args.next(), 40, 65_536)? as usize;
                }
                other => bail!("unknown argument {other:?} (the only benchmark is \"ingest\")"),
            }
        }
        if !out.compare && out.instances.unwrap_or(1) > 1 && out.backend != Backend::Postgres {
            bail!(
                "--instances above 1 needs --backend postgres (instances in a shared group must share storage)"
            );
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
    /// Devices the load spreads over (one topic each).
    devices: usize,
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
    /// The Node-RED run; None with --no-peer.
    peer: Option<anyhow::Result<PeerRun>>,
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

/// Where telebridge stores in a run, and how many instances share the ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Setup {
    backend: Backend,
    instances: usize,
    /// Alert rules in the daemons' config (`--alert-rules`).
    rules: usize,
}

impl Setup {
    /// `SQLite x1`, `PostgreSQL x3`, `SQLite x1 + 100 rules`.
    fn label(&self) -> String {
        let rules = if self.rules > 0 {
            format!(" + {} rules", self.rules)
        } else {
            String::new()
        };
        format!("{} x{}{rules}", self.backend.name(), self.instances)
    }

    /// A short tag for client ids and database names.
    fn tag(&self) -> String {
        let b = match self.backend {
            Backend::Sqlite => "sq",
            Backend::Postgres => "pg",
        };
        format!("{b}{}r{}", self.instances, self.rules)
    }
}

/// `n` alert rules on every device of the load, none of which fires: 90% comparisons on the
/// payload's fields (the costly kind: each reading's JSON is parsed and compared), the rest
/// `offline` and `no reading for 1h`, so every kind is tracked per device.
fn alert_rules(n: usize) -> String {
    if n == 0 {
        return String::new();
    }
    let mut out = String::from("[alerts]\nrules = [\n");
    for i in 0..n {
        let when = match i % 10 {
            8 => "offline".to_owned(),
            9 => "no reading".to_owned(),
            k if k % 2 == 0 => format!("temp > {}", 1000 + i),
            _ => format!("seq < -{}", 1 + i),
        };
        let hold = if i % 10 == 9 { "1h" } else { "0s" };
        out.push_str(&format!(
            "  {{ name = \"bench-{i}\", devices = [\"dev-*\"], when = \"{when}\", for = \"{hold}\" }},\n"
        ));
    }
    out.push_str("]\n");
    out
}

/// What the daemon (or the daemons of one shared group) did with one burst.
struct DaemonRun {
    setup: Setup,
    /// Rows committed, and the time from the first publish to the last row.
    committed: Burst,
    /// Seconds the publisher took to hand every message to the broker (QoS 1: acknowledged).
    publish_seconds: f64,
    /// CPU seconds during the burst (first publish to last row) of the daemons together,
    /// the broker, PostgreSQL (server and backends), this process (publisher and row
    /// polls), and everything else on the machine.
    daemon_cpu: f64,
    broker_cpu: f64,
    pg_cpu: Option<f64>,
    bench_cpu: f64,
    other_cpu: f64,
    /// The machine's interrupt and softirq time (with tick accounting, as here, it is also
    /// in the times of the processes it interrupted: mostly the loopback network).
    irq_cpu: f64,
    /// Write transactions and the time spent in them during the burst, from /metrics,
    /// summed over the instances.
    batches: u64,
    commit_seconds: f64,
    /// Readings each instance committed in the burst (its telebridge_readings_stored_total).
    per_instance: Vec<u64>,
    /// Each instance's telebridge_tail_lag_events a moment after the burst (PostgreSQL).
    tail_lag: Vec<Option<f64>>,
    /// PostgreSQL's commits and WAL flushes during the burst.
    pg_stats: Option<PgStats>,
    /// The statements that took PostgreSQL the most time during the burst.
    pg_top: Vec<String>,
    /// Whether every daemon stopped cleanly on SIGTERM.
    clean_exit: bool,
    /// Warnings and errors the daemons logged, prefixed with the instance.
    log_problems: Vec<String>,
}

/// How a wait for committed rows ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// Every row of the burst is there.
    All,
    /// No new row for IDLE_LIMIT: messages were lost or the consumer stalled.
    Stalled,
    /// Still committing when the --seconds cap was reached.
    TimeLimit,
}

/// What Node-RED did with one burst.
struct PeerRun {
    /// Rows committed, and the time from the first publish to the last row.
    committed: Burst,
    finish: Finish,
    /// Seconds the publisher took to hand every message to the broker (QoS 1: acknowledged).
    publish_seconds: f64,
    /// CPU seconds Node-RED (node) and the broker used during the burst.
    peer_cpu: f64,
    broker_cpu: f64,
    /// Node-RED's peak resident memory (VmHWM) in KiB.
    peak_rss_kib: u64,
    /// Warnings and errors Node-RED logged during the case.
    log_problems: Vec<String>,
}

/// Runs every case and prints the table; fails unless telebridge stored every row and the
/// peer could be measured.
async fn ingest(args: &Args) -> anyhow::Result<ExitCode> {
    if args.compare {
        return compare_backends(args).await;
    }
    let daemon_bin = daemon_binary(args.daemon.as_deref())?;
    let setup = Setup {
        backend: args.backend,
        instances: args.instances.unwrap_or(1) as usize,
        rules: 0,
    };
    // Declared before everything that connects to it, so it is stopped last.
    let pg = match setup.backend {
        Backend::Postgres => Some(start_pg().await?),
        Backend::Sqlite => None,
    };
    // Installing the peer (minutes on first use) happens before any measurement. It blocks,
    // so on a thread of its own: Ctrl-C can still end the bench meanwhile.
    let peer = if args.no_peer {
        None
    } else {
        Some(
            tokio::task::spawn_blocking(NodeRedSetup::prepare)
                .await
                .context("the Node-RED setup panicked")?
                .context("preparing the Node-RED peer (benches/nodered); --no-peer skips it")?,
        )
    };
    // Writes max_queued_bytes 0 (no limit, Mosquitto's default) too, so that this bench's
    // settings line states it.
    let broker = Mosquitto::start(Some(0))?;

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
                devices: DEVICES,
            });
        }
    }

    print_conditions(
        args,
        &broker,
        &daemon_bin,
        peer.as_ref(),
        &cases,
        setup,
        pg.as_ref(),
    );

    let mut results = Vec::new();
    for case in &cases {
        eprintln!(
            "[{}] subscriber burst of {} messages",
            case.label(),
            case.messages
        );
        let subscriber = subscriber_burst(&broker, case, args.timeout)
            .await
            .with_context(|| format!("{}: subscriber run", case.label()))?;
        eprintln!(
            "[{}] subscriber received {} in {:.2} s; telebridge burst",
            case.label(),
            subscriber.received.count,
            subscriber.received.seconds
        );
        let daemon = daemon_burst(&daemon_bin, &broker, pg.as_ref(), setup, case, args.timeout)
            .await
            .with_context(|| format!("{}: telebridge run", case.label()));
        if let Err(e) = &daemon {
            eprintln!("[{}] telebridge run failed: {e:#}", case.label());
        }
        let peer = match &peer {
            Some(setup) => {
                eprintln!("[{}] Node-RED burst", case.label());
                let run = peer_burst(setup, &broker, case, args.timeout)
                    .await
                    .with_context(|| format!("{}: Node-RED run", case.label()));
                match &run {
                    Ok(p) => eprintln!(
                        "[{}] Node-RED committed {} rows in {:.2} s{}",
                        case.label(),
                        p.committed.count,
                        p.committed.seconds,
                        match p.finish {
                            Finish::All => "",
                            Finish::Stalled => " (stalled)",
                            Finish::TimeLimit => " (time limit)",
                        }
                    ),
                    Err(e) => eprintln!("[{}] Node-RED run failed: {e:#}", case.label()),
                }
                Some(run)
            }
            None => None,
        };
        results.push((
            *case,
            CaseResult {
                subscriber,
                daemon,
                peer,
            },
        ));
    }

    print_table(&results);
    // A peer that could not be measured is a failure of the bench; a peer that measured but
    // did not store every row is a result, shown in the table.
    let all_ok = results.iter().all(|(case, r)| {
        r.daemon
            .as_ref()
            .is_ok_and(|d| d.committed.count == case.messages)
            && r.peer.as_ref().is_none_or(|p| p.is_ok())
    });
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `--compare-backends`: one QoS 1 burst each to the do-nothing subscriber, SQLite x1,
/// PostgreSQL x1 and PostgreSQL x N, on one broker and one PostgreSQL cluster; prints the
/// committed rows/s side by side with their ratios.
async fn compare_backends(args: &Args) -> anyhow::Result<ExitCode> {
    let daemon_bin = daemon_binary(args.daemon.as_deref())?;
    // Declared first, so it is stopped last.
    let pg = start_pg().await?;
    let broker = Mosquitto::start(Some(0))?;
    let group = args.instances.unwrap_or(3) as usize;
    let case = Case {
        qos: QoS::AtLeastOnce,
        payload: args.payload,
        messages: args.messages.unwrap_or(100_000),
        devices: if args.alert_rules > 0 {
            ALERT_DEVICES
        } else {
            DEVICES
        },
    };
    let setups: Vec<Setup> = if args.alert_rules > 0 {
        // The rules' cost, side by side: the same backend without and with them.
        vec![
            Setup {
                backend: Backend::Sqlite,
                instances: 1,
                rules: 0,
            },
            Setup {
                backend: Backend::Sqlite,
                instances: 1,
                rules: args.alert_rules,
            },
            Setup {
                backend: Backend::Postgres,
                instances: 1,
                rules: 0,
            },
            Setup {
                backend: Backend::Postgres,
                instances: 1,
                rules: args.alert_rules,
            },
        ]
    } else {
        vec![
            Setup {
                backend: Backend::Sqlite,
                instances: 1,
                rules: 0,
            },
            Setup {
                backend: Backend::Postgres,
                instances: 1,
                rules: 0,
            },
            Setup {
                backend: Backend::Postgres,
                instances: group,
                rules: 0,
            },
        ]
    };
    print_conditions(
        args,
        &broker,
        &daemon_bin,
        None,
        &[case],
        setups[setups.len() - 1],
        Some(&pg),
    );
    println!(
        "compare:    {} back to back on this broker and cluster: the do-nothing subscriber, then {}",
        case.label(),
        setups
            .iter()
            .map(Setup::label)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();

    eprintln!(
        "[{}] subscriber burst of {} messages",
        case.label(),
        case.messages
    );
    let subscriber = subscriber_burst(&broker, &case, args.timeout)
        .await
        .context("subscriber run")?;
    let mut runs = Vec::new();
    for setup in setups.iter().copied() {
        eprintln!("[{} on {}] telebridge burst", case.label(), setup.label());
        let run = daemon_burst(&daemon_bin, &broker, Some(&pg), setup, &case, args.timeout)
            .await
            .with_context(|| format!("{} on {}", case.label(), setup.label()));
        match &run {
            Ok(d) => eprintln!(
                "[{} on {}] committed {} rows in {:.2} s: {} rows/s",
                case.label(),
                setup.label(),
                d.committed.count,
                d.committed.seconds,
                thousands(d.committed.rate())
            ),
            Err(e) => eprintln!("[{} on {}] failed: {e:#}", case.label(), setup.label()),
        }
        runs.push((setup, run));
    }
    print_comparison(&case, &subscriber, &runs);
    let pg_problems = pg.log_problems();
    if !pg_problems.is_empty() {
        println!(
            "PostgreSQL logged {} warning/error line(s); the first: {}",
            pg_problems.len(),
            pg_problems
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let all_ok = runs
        .iter()
        .all(|(_, r)| r.as_ref().is_ok_and(|d| d.committed.count == case.messages));
    drop(broker);
    drop(pg);
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_comparison(case: &Case, sub: &SubscriberRun, runs: &[(Setup, anyhow::Result<DaemonRun>)]) {
    let mut out = String::new();
    let rate_of = |want: Setup| {
        runs.iter()
            .find(|(s, _)| *s == want)
            .and_then(|(_, r)| r.as_ref().ok())
            .map(|d| d.committed.rate())
    };
    let sqlite1 = rate_of(Setup {
        backend: Backend::Sqlite,
        instances: 1,
        rules: 0,
    });
    let pg1 = rate_of(Setup {
        backend: Backend::Postgres,
        instances: 1,
        rules: 0,
    });
    let ratio = |a: f64, b: Option<f64>| match b {
        Some(b) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let _ = writeln!(
        out,
        "## {}: committed rows/s, {} messages per run (rows counted in the database)",
        case.label(),
        case.messages
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| run | rows | all stored | first publish -> last row s | rows/s | / subscriber | / SQLite x1 | / PostgreSQL x1 | telebridge CPU s | postgres CPU s | mosquitto CPU s | bench CPU s | other CPU s | transactions | rows/txn | ms/txn |"
    );
    let _ = writeln!(
        out,
        "|---|--:|:-:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    );
    let _ = writeln!(
        out,
        "| do-nothing subscriber | {} received | {} | {:.2} | {} msg/s | 1.00 | {} | {} | - | - | {:.2} | - | - | - | - | - |",
        sub.received.count,
        if sub.received.count == case.messages {
            "yes"
        } else {
            "NO"
        },
        sub.received.seconds,
        thousands(sub.received.rate()),
        ratio(sub.received.rate(), sqlite1),
        ratio(sub.received.rate(), pg1),
        sub.broker_cpu,
    );
    for (setup, run) in runs {
        match run {
            Ok(d) => {
                let rate = d.committed.rate();
                let per_txn = |v: f64| {
                    if d.batches > 0 {
                        v / d.batches as f64
                    } else {
                        0.0
                    }
                };
                let _ = writeln!(
                    out,
                    "| telebridge, {} | {} | {} | {:.2} | **{}** | {} | {} | {} | {:.2} | {} | {:.2} | {:.2} | {:.2} | {} | {:.0} | {:.2} |",
                    setup.label(),
                    d.committed.count,
                    if d.committed.count == case.messages {
                        "yes"
                    } else {
                        "NO"
                    },
                    d.committed.seconds,
                    thousands(rate),
                    ratio(rate, Some(sub.received.rate())),
                    ratio(rate, sqlite1),
                    ratio(rate, pg1),
                    d.daemon_cpu,
                    d.pg_cpu.map_or("-".into(), |c| format!("{c:.2}")),
                    d.broker_cpu,
                    d.bench_cpu,
                    d.other_cpu,
                    d.batches,
                    per_txn(d.committed.count as f64),
                    per_txn(d.commit_seconds * 1000.0),
                );
            }
            Err(e) => {
                let _ = writeln!(out, "| telebridge, {} | failed: {e:#} |", setup.label());
            }
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "CPU seconds are over each run's burst (first publish to last row committed, the subscriber's: \
         first to last message); postgres = the postmaster and all its processes (backends, WAL \
         writer, checkpointer); other = the machine's busy time minus the columns before it. \
         ms/txn is telebridge's own time per write transaction (from BEGIN to COMMIT's answer)."
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "details:");
    for (setup, run) in runs {
        if let Ok(d) = run {
            write_daemon_details(&mut out, &setup.label(), d);
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "## target");
    match pg1 {
        Some(r) => {
            let _ = writeln!(
                out,
                "- PostgreSQL x1 at QoS 1: {} rows/s committed (target >= {}): {}",
                thousands(r),
                thousands(TARGET_PG1_ROWS_PER_S),
                if r >= TARGET_PG1_ROWS_PER_S {
                    "MET"
                } else {
                    "NOT MET"
                }
            );
        }
        None => {
            let _ = writeln!(out, "- PostgreSQL x1: no result");
        }
    }
    print!("{out}");
}

#[allow(
    clippy::too_many_arguments,
    reason = "one report of everything a run used"
)]
fn print_conditions(
    args: &Args,
    broker: &Mosquitto,
    daemon: &Path,
    peer: Option<&NodeRedSetup>,
    cases: &[Case],
    setup: Setup,
    pg: Option<&PgCluster>,
) {
    let machine = Machine::read();
    println!("# telebridge ingest benchmark");
    println!(
        "machine:    {} cores (nproc), CPU {}, memory {}; load average at start {}",
        machine.nproc,
        machine.cpu,
        machine.mem,
        load_average()
    );
    println!("{}", broker.describe());
    if let Some(pg) = pg {
        println!("{}", pg.describe());
    }
    println!("daemon:     {}", daemon.display());
    println!(
        "            [broker] mode=external, [mqtt] qos = the case's, [log] level=warn; every other key at its default (see config.toml)"
    );
    println!("            storage: {}", describe_setup(setup));
    match peer {
        Some(p) => {
            println!(
                "peer:       Node-RED {} on Node.js {}, node-red-node-sqlite {} (sqlite3 {}, SQLite {})",
                p.node_red, p.node, p.sqlite_node, p.sqlite3, p.sqlite
            );
            println!(
                "            benches/nodered/flows.json: mqtt in (devices/+/telemetry, qos = the case's) -> json -> \
                 function (device from the topic, ts, received_at) -> sqlite prepared INSERT, one row per \
                 message; the same mqtt in -> websocket out {NODERED_WS_PATH} (no client connected)"
            );
            println!(
                "            its database: telebridge's readings schema (seq AUTOINCREMENT, index on device), \
                 WAL, synchronous=NORMAL; editor off, log level warn"
            );
            if let Some(t) = p.installed_in {
                println!(
                    "            its modules were installed by this run: npm ci took {:.0} s",
                    t.as_secs_f64()
                );
            }
        }
        None if args.compare => println!("peer:       none (--compare-backends)"),
        None => println!("peer:       none (--no-peer)"),
    }
    println!(
        "load:       one rumqttc publisher, topics devices/dev-{{0..{}}}/telemetry, JSON objects padded to the payload size, QoS 1 inflight {MQTT_INFLIGHT}",
        cases.first().map_or(DEVICES, |c| c.devices) - 1
    );
    if args.alert_rules > 0 {
        println!(
            "alerts:     {} rules on every device (dev-*), none firing: 90% comparisons on payload fields, 5% offline, 5% no reading for 1h",
            args.alert_rules
        );
    }
    println!(
        "            messages per burst: {}",
        cases
            .iter()
            .map(|c| format!("{} {}", c.label(), c.messages))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "measure:    subscriber msg/s = received / (last - first received); telebridge and Node-RED \
         rows/s = rows counted in the database (telebridge: SQLite or PostgreSQL; Node-RED: SQLite) / \
         (last row committed - first publish)"
    );
    println!(
        "            every wait capped at {} s; stalled after {} s without progress",
        args.timeout.as_secs(),
        IDLE_LIMIT.min(args.timeout).as_secs()
    );
    println!(
        "            everything runs on this machine; SQLite in a temp dir, PostgreSQL in the bench's own cluster"
    );
    println!();
}

fn print_table(results: &[(Case, CaseResult)]) {
    let with_peer = results.iter().any(|(_, r)| r.peer.is_some());
    let mut out = String::new();
    if let Some(Ok(d)) = results.first().map(|(_, r)| &r.daemon) {
        let _ = writeln!(out, "telebridge (tb): {}", d.setup.label());
    }
    let _ = write!(
        out,
        "{:<14} {:>8} {:>9} {:>12} {:>9} {:>14} {:>6} {:>9}",
        "case", "N", "sub recv", "sub msg/s", "tb rows", "tb rows/s", "ratio", "all rows"
    );
    if with_peer {
        let _ = write!(
            out,
            " {:>9} {:>14} {:>12} {:>7}",
            "NR rows", "NR rows/s", "NR all rows", "tb/NR"
        );
    }
    let _ = writeln!(out);
    for (case, r) in results {
        let sub = r.subscriber.received;
        let _ = write!(
            out,
            "{:<14} {:>8} {:>9} {:>12}",
            case.label(),
            case.messages,
            sub.count,
            thousands(sub.rate()),
        );
        match &r.daemon {
            Ok(d) => {
                let ratio = if sub.rate() > 0.0 {
                    format!("{:.2}", d.committed.rate() / sub.rate())
                } else {
                    "-".into()
                };
                let _ = write!(
                    out,
                    " {:>9} {:>14} {:>6} {:>9}",
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
                let _ = write!(out, " {:>9} {:>14} {:>6} {:>9}", "-", "FAILED", "-", "NO");
            }
        }
        match &r.peer {
            Some(Ok(p)) => {
                let tb_rate = r.daemon.as_ref().map_or(0.0, |d| d.committed.rate());
                let times = if tb_rate > 0.0 && p.committed.rate() > 0.0 {
                    format!("{:.1}", tb_rate / p.committed.rate())
                } else {
                    "-".into()
                };
                let all = match p.finish {
                    _ if p.committed.count == case.messages => "yes",
                    Finish::All => "yes",
                    Finish::Stalled => "NO: stall",
                    Finish::TimeLimit => "NO: time",
                };
                let _ = write!(
                    out,
                    " {:>9} {:>14} {:>12} {:>7}",
                    p.committed.count,
                    thousands(p.committed.rate()),
                    all,
                    times
                );
            }
            Some(Err(_)) => {
                let _ = write!(out, " {:>9} {:>14} {:>12} {:>7}", "-", "FAILED", "NO", "-");
            }
            None => {}
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
    if with_peer {
        let _ = writeln!(
            out,
            "tb/NR: telebridge rows/s divided by Node-RED rows/s, same burst, broker and machine. \
             \"NO: stall\": Node-RED committed no row for {} s; \"NO: time\": still committing at \
             the --seconds cap. Its rows/s then counts the rows it committed up to its last one.",
            IDLE_LIMIT.as_secs()
        );
        let _ = writeln!(out);
    }
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
            Ok(d) => write_daemon_details(&mut out, &case.label(), d),
            Err(e) => {
                let _ = writeln!(out, "  {:<14} failed: {e:#}", case.label());
            }
        }
    }
    if with_peer {
        let _ = writeln!(out, "details of the Node-RED runs:");
        for (case, r) in results {
            match &r.peer {
                Some(Ok(p)) => {
                    let _ = writeln!(
                        out,
                        "  {:<14} last row after {:.2} s{}, publishing took {:.2} s; CPU node-red {:.2} s, \
                         mosquitto {:.2} s; peak RSS {} MiB; {} warnings/errors logged",
                        case.label(),
                        p.committed.seconds,
                        match p.finish {
                            Finish::All => "",
                            Finish::Stalled => " (then stalled)",
                            Finish::TimeLimit => " (cut at the time limit)",
                        },
                        p.publish_seconds,
                        p.peer_cpu,
                        p.broker_cpu,
                        p.peak_rss_kib / 1024,
                        p.log_problems.len(),
                    );
                    for line in p.log_problems.iter().take(3) {
                        let _ = writeln!(out, "      {line:.200}");
                    }
                }
                Some(Err(e)) => {
                    let _ = writeln!(out, "  {:<14} failed: {e:#}", case.label());
                }
                None => {}
            }
        }
    }
    print!("{out}");
}

/// The details lines of one telebridge run: timings, CPU, transactions, and on PostgreSQL
/// the split over the instances, their tails, the server's commits and WAL flushes.
fn write_daemon_details(out: &mut String, label: &str, d: &DaemonRun) {
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
    let pg_cpu = d
        .pg_cpu
        .map_or(String::new(), |c| format!(", postgres {c:.2} s"));
    let _ = writeln!(
        out,
        "  {label:<14} last row after {:.2} s, publishing took {:.2} s; CPU telebridge {:.2} s{}{pg_cpu}, \
         mosquitto {:.2} s, bench {:.2} s, other processes {:.2} s (interrupts and softirqs, inside those \
         times: {:.2} s); \
         {} transactions (~{:.0} rows, \
         {:.2} ms each, {:.2} s in all); SIGTERM exit {}",
        d.committed.seconds,
        d.publish_seconds,
        d.daemon_cpu,
        if d.setup.instances > 1 {
            format!(" ({} instances together)", d.setup.instances)
        } else {
            String::new()
        },
        d.broker_cpu,
        d.bench_cpu,
        d.other_cpu,
        d.irq_cpu,
        d.batches,
        avg_batch,
        avg_commit_ms,
        d.commit_seconds,
        if d.clean_exit { "clean" } else { "NOT clean" },
    );
    if d.setup.instances > 1 {
        let _ = writeln!(
            out,
            "  {:<14} readings committed by each instance: {}",
            "",
            d.per_instance
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    if d.setup.backend == Backend::Postgres {
        let _ = writeln!(
            out,
            "  {:<14} telebridge_tail_lag_events {:.1} s after the burst: {}",
            "",
            PG_STATS_SETTLE.as_secs_f64(),
            d.tail_lag
                .iter()
                .map(|l| l.map_or("?".into(), |l| format!("{l:.0}")))
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    if let Some(st) = &d.pg_stats {
        let _ = writeln!(out, "  {:<14} postgres: {}", "", st.describe());
    }
    if let Some((head, rest)) = d.pg_top.split_first() {
        let _ = writeln!(
            out,
            "  {:<14} postgres statements (pg_stat_statements, by execution time): {head}",
            ""
        );
        for line in rest {
            let _ = writeln!(out, "  {:<14}   {line}", "");
        }
    }
    if !d.log_problems.is_empty() {
        let _ = writeln!(
            out,
            "  {:<14} {} warning/error line(s) in the daemon logs; the first:",
            "",
            d.log_problems.len()
        );
        for line in d.log_problems.iter().take(5) {
            let _ = writeln!(out, "  {:<14}   {line:.300}", "");
        }
    }
}

/// What `setup` means for the daemons' config.
fn describe_setup(setup: Setup) -> String {
    match setup.backend {
        Backend::Sqlite => {
            "[storage] path = a SQLite file in a temp dir (WAL, synchronous=NORMAL)".to_owned()
        }
        Backend::Postgres => format!(
            "[storage] url = a fresh database per case on the cluster above; {} instance(s) with \
             [mqtt] shared_group = \"{}\" (subscriptions $share/{}/...) and client ids \
             telebridge-bench-<case>-<i>, started one after the other",
            setup.instances,
            common::SHARED_GROUP,
            common::SHARED_GROUP
        ),
    }
}

/// Starts the bench's own PostgreSQL cluster (on a blocking thread: initdb and pg_ctl
/// take seconds, and Ctrl-C can still end the bench meanwhile).
async fn start_pg() -> anyhow::Result<PgCluster> {
    eprintln!("starting a PostgreSQL cluster of our own (initdb, pg_ctl start)");
    tokio::task::spawn_blocking(PgCluster::start)
        .await
        .context("the PostgreSQL start-up panicked")?
}

// ---------------------------------------------------------------------------------------
// MQTT clients
// ---------------------------------------------------------------------------------------

/// Connects a clean-session client that takes packets up to 1 MiB.
async fn connect(client_id: &str, port: u16) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut opts = mqtt_options(client_id, port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    mqtt_connect(opts, client_id).await
}

/// Telemetry topics, one per simulated device.
fn topics(devices: usize) -> Vec<String> {
    (0..devices)
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
    let (client, mut eventloop) = connect(&client_id, port).await?;
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
    let topics = topics(case.devices);
    let started = Instant::now();
    let send_all = async {
        for seq in 0..n {
            let topic = topics[(seq % case.devices as u64) as usize].clone();
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
) -> anyhow::Result<SubscriberRun> {
    let port = broker.port;
    let (client, mut eventloop) = connect(&format!("bench-sub-{}", case.tag()), port).await?;
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

    let broker_cpu_0 = cpu_seconds(broker.pid());
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
    let broker_cpu = cpu_seconds(broker.pid()) - broker_cpu_0;
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
    let (client, mut eventloop) = connect(client_id, port).await?;
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
    /// Its stderr (it logs at warn).
    log: PathBuf,
    /// Holds the config, the database and the log.
    _dir: TempDir,
}

impl Daemon {
    fn start(
        bin: &Path,
        broker_port: u16,
        client_id: &str,
        placement: &Placement,
        limit: Duration,
    ) -> anyhow::Result<Daemon> {
        let dir = tempfile::tempdir().context("creating a temp dir for telebridge")?;
        let db = dir.path().join("bench.db");
        let config = format!(
            "[broker]\nmode = \"external\"\n\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\nclient_id = \"{client_id}\"\n{}\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\n\
             {}\n\
             [log]\nlevel = \"warn\"\n",
            placement.mqtt_lines(),
            placement.storage_and_topics(&db),
        );
        let config_path = dir.path().join("telebridge.toml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = dir.path().join("daemon.log");
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Warnings and errors of the daemon are reported with the run.
            .stderr(stderr)
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
            log,
            _dir: dir,
        };
        let addr = match addr_rx.recv_timeout(limit) {
            Ok(a) => a,
            Err(_) => {
                let status = daemon.child.try_wait().ok().flatten();
                bail!(
                    "telebridge did not print its dashboard address within {limit:?} (exit status: {status:?}); its log ends:\n{}",
                    log_tail(&daemon.log, 10)
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
                bail!(
                    "telebridge exited before it was ready ({status}); its log ends:\n{}",
                    log_tail(&self.log, 10)
                );
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

    /// GET /metrics, empty if it fails.
    fn metrics(&self) -> String {
        http_get(self.http, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; true if it exited with success in time.
    fn stop(&mut self, limit: Duration) -> anyhow::Result<bool> {
        if let Some(status) = self.child.try_wait().context("checking on telebridge")? {
            eprintln!("  telebridge had already exited ({status})");
            return Ok(false);
        }
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

/// Read-only queries on a database the bench counts rows in.
enum RowCounter {
    /// An SQLite file; `events` says whether it has telebridge's events table (Node-RED's
    /// database has none).
    Sqlite {
        conn: SqliteConnection,
        events: bool,
    },
    /// telebridge's PostgreSQL database.
    Pg(PgConnection),
}

impl RowCounter {
    async fn open(db: &Path, events: bool) -> anyhow::Result<RowCounter> {
        let opts = SqliteConnectOptions::new().filename(db).read_only(true);
        let conn = SqliteConnection::connect_with(&opts)
            .await
            .with_context(|| format!("opening {} read-only", db.display()))?;
        Ok(RowCounter::Sqlite { conn, events })
    }

    async fn open_pg(url: &str) -> anyhow::Result<RowCounter> {
        let conn = PgConnection::connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(RowCounter::Pg(conn))
    }

    /// The authoritative count. It scans an index, so it is not polled at a high rate.
    async fn count(&mut self) -> anyhow::Result<u64> {
        const Q: &str = "SELECT count(*) FROM readings";
        let n: Result<i64, _> = match self {
            RowCounter::Sqlite { conn, .. } => sqlx::query_scalar(Q).fetch_one(conn).await,
            RowCounter::Pg(conn) => sqlx::query_scalar(Q).fetch_one(conn).await,
        };
        Ok(n.context("counting readings")? as u64)
    }

    /// The highest seq: a cheap progress probe (one b-tree descent) for frequent polling.
    async fn max_seq(&mut self) -> anyhow::Result<i64> {
        const Q: &str = "SELECT coalesce(max(seq), 0) FROM readings";
        match self {
            RowCounter::Sqlite { conn, .. } => sqlx::query_scalar(Q).fetch_one(conn).await,
            RowCounter::Pg(conn) => sqlx::query_scalar(Q).fetch_one(conn).await,
        }
        .context("reading max(seq)")
    }

    /// Events (presence, commands) with a seq in (`after`, `upto`]: they share the readings'
    /// counter, so the readings committed after `after` are `max_seq - after` minus these.
    async fn events_between(&mut self, after: i64, upto: i64) -> anyhow::Result<i64> {
        match self {
            RowCounter::Sqlite { events: false, .. } => Ok(0),
            RowCounter::Sqlite { conn, .. } => {
                sqlx::query_scalar("SELECT count(*) FROM events WHERE seq > ? AND seq <= ?")
                    .bind(after)
                    .bind(upto)
                    .fetch_one(conn)
                    .await
            }
            RowCounter::Pg(conn) => {
                sqlx::query_scalar("SELECT count(*) FROM events WHERE seq > $1 AND seq <= $2")
                    .bind(after)
                    .bind(upto)
                    .fetch_one(conn)
                    .await
            }
        }
        .context("counting events")
    }
}

/// Publishes probe readings until one is stored, and one by each of `daemons` (their
/// /metrics): proves that messages flow end to end to every member of a shared group (a
/// QoS 0 message published before the subscription is in place would be lost). Returns the
/// row count and max(seq) once late probes have landed; the burst is counted on top of them.
async fn probe_until_stored(
    rows: &mut RowCounter,
    port: u16,
    case: &Case,
    limit: Duration,
    who: &str,
    daemons: &[&Daemon],
) -> anyhow::Result<(u64, i64)> {
    let (probe, mut probe_loop) = connect(&format!("bench-probe-{}", case.tag()), port).await?;
    let probe_poller = tokio::spawn(async move { while probe_loop.poll().await.is_ok() {} });
    let probe_deadline = Instant::now() + limit.min(Duration::from_secs(15));
    let every_instance_stored = || {
        daemons.iter().all(|d| {
            metric(&d.metrics(), "telebridge_readings_stored_total").is_some_and(|n| n >= 1.0)
        })
    };
    while rows.count().await? == 0 || !every_instance_stored() {
        if Instant::now() > probe_deadline {
            probe_poller.abort();
            bail!(
                "a probe reading never reached {}: is {who} subscribed?",
                if daemons.len() > 1 {
                    "every instance"
                } else {
                    "the database"
                }
            );
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
    Ok((rows.count().await?, rows.max_seq().await?))
}

/// Polls the cheap max(seq) until the readings committed after `base_seq` reach `n`: seqs
/// are given in commit order from one counter (SQLite's single writer; PostgreSQL's append
/// lock across instances), shared with the presence events that new devices bring, so
/// that count is max(seq) - base_seq minus the events in between; that moment is when the
/// last row was committed. Gives up after IDLE_LIMIT without a new row, or at `limit`.
/// Returns when the last new row was seen and why the wait ended; the caller's count(*)
/// decides whether every row is there.
async fn wait_for_rows(
    rows: &mut RowCounter,
    base_seq: i64,
    n: u64,
    limit: Duration,
    who: &str,
) -> anyhow::Result<(Instant, Finish)> {
    let start = Instant::now();
    let idle = IDLE_LIMIT.min(limit);
    let mut seen = rows.max_seq().await?;
    let mut progress_at = Instant::now();
    loop {
        let seq = rows.max_seq().await?;
        let now = Instant::now();
        if seq > seen {
            seen = seq;
            progress_at = now;
        }
        if seq - base_seq >= n as i64 {
            let events = rows.events_between(base_seq, seq).await?;
            if seq - base_seq - events >= n as i64 {
                return Ok((now, Finish::All));
            }
        }
        if now.duration_since(progress_at) > idle {
            eprintln!("  {who}: no new rows for {idle:?}, stopped waiting");
            return Ok((progress_at, Finish::Stalled));
        }
        if now >= start + limit {
            eprintln!("  {who}: still committing at the {limit:?} cap, stopped waiting");
            return Ok((progress_at, Finish::TimeLimit));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Runs telebridge (`setup.instances` daemons in one shared group on PostgreSQL), publishes
/// one burst, and measures the rate at which rows are committed.
async fn daemon_burst(
    bin: &Path,
    broker: &Mosquitto,
    pg: Option<&PgCluster>,
    setup: Setup,
    case: &Case,
    limit: Duration,
) -> anyhow::Result<DaemonRun> {
    let run_tag = format!("{}-{}-{}", case.tag(), setup.tag(), std::process::id());
    // The cluster's CPU is the run's only when the run stores there.
    let pg = pg.filter(|_| setup.backend == Backend::Postgres);
    let placement = match (setup.backend, pg) {
        (Backend::Sqlite, _) if setup.instances > 1 => {
            bail!(
                "{} instances on SQLite: a shared group needs PostgreSQL",
                setup.instances
            )
        }
        (Backend::Sqlite, _) => Placement {
            qos: Some(case.qos_number()),
            extra: alert_rules(setup.rules),
            ..Placement::default()
        },
        (Backend::Postgres, Some(pg)) => {
            let url = pg
                .create_database(&format!("tb_{}", run_tag.replace('-', "_")))
                .await?;
            Placement {
                qos: Some(case.qos_number()),
                extra: alert_rules(setup.rules),
                ..Placement::postgres(&url)
            }
        }
        (Backend::Postgres, None) => bail!("--backend postgres without a cluster"),
    };
    let client_ids: Vec<String> = (0..setup.instances)
        .map(|i| format!("telebridge-bench-{run_tag}-{i}"))
        .collect();
    let mut daemons = Vec::new();
    let mut started = Ok(());
    for id in &client_ids {
        // One after the other: the first applies the migrations.
        match Daemon::start(bin, broker.port, id, &placement, limit) {
            Ok(d) => daemons.push(d),
            Err(e) => {
                started = Err(e.context(format!("starting instance {id}")));
                break;
            }
        }
    }
    let run = match started {
        Ok(()) => {
            let result = measure_daemon(&daemons, broker, pg, &placement, setup, case, limit).await;
            let mut clean_exit = Ok(true);
            for d in &mut daemons {
                match d.stop(Duration::from_secs(20)) {
                    Ok(clean) => {
                        clean_exit = clean_exit.map(|c| c && clean);
                    }
                    Err(e) => clean_exit = Err(e),
                }
            }
            result.and_then(|mut run| {
                run.clean_exit = clean_exit?;
                Ok(run)
            })
        }
        Err(e) => Err(e),
    };
    let mut problems = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        problems.extend(
            log_problems(&d.log)
                .into_iter()
                .map(|l| format!("[instance {i}] {l}")),
        );
    }
    for line in problems.iter().take(5) {
        eprintln!("  daemon log: {line:.300}");
    }
    drop(daemons);
    // The daemons may have connected (persistent sessions) even if the run failed.
    for id in &client_ids {
        discard_session(broker.port, id)
            .await
            .with_context(|| format!("discarding the broker session of {id}"))?;
    }
    run.map(|mut r| {
        r.log_problems = problems;
        r
    })
}

/// The sum over `daemons` of one /metrics sample.
fn metric_sum(texts: &[String], name: &str) -> f64 {
    texts.iter().filter_map(|t| metric(t, name)).sum()
}

async fn measure_daemon(
    daemons: &[Daemon],
    broker: &Mosquitto,
    pg: Option<&PgCluster>,
    placement: &Placement,
    setup: Setup,
    case: &Case,
    limit: Duration,
) -> anyhow::Result<DaemonRun> {
    let mut rows = match &placement.postgres_url {
        Some(url) => RowCounter::open_pg(url).await?,
        None => RowCounter::open(&daemons[0].db, true).await?,
    };
    // /readyz only says the connection is up; the subscription may still be on its way.
    let all: Vec<&Daemon> = daemons.iter().collect();
    let (base_count, base_seq) =
        probe_until_stored(&mut rows, broker.port, case, limit, "telebridge", &all).await?;
    let metrics_0: Vec<String> = daemons.iter().map(Daemon::metrics).collect();
    let pg_0 = PgSnapshot::take(pg, placement.postgres_url.as_deref()).await?;

    let n = case.messages;
    let pids: Vec<u32> = daemons.iter().map(Daemon::pid).collect();
    let cpu_daemon_0 = cpu_seconds_of(&pids);
    let cpu_broker_0 = cpu_seconds(broker.pid());
    let cpu_pg_0 = pg.map(PgCluster::cpu_seconds);
    let cpu_bench_0 = cpu_seconds(std::process::id());
    let busy_0 = machine_busy_seconds();
    let irq_0 = machine_irq_seconds();
    let publisher = tokio::spawn(publish_burst(
        broker.port,
        *case,
        format!("bench-pub-tb-{}-{}", case.tag(), setup.tag()),
        limit,
    ));
    let (last_row_at, _) = wait_for_rows(&mut rows, base_seq, n, limit, "telebridge").await?;
    let cpu_daemon = cpu_seconds_of(&pids) - cpu_daemon_0;
    let cpu_broker = cpu_seconds(broker.pid()) - cpu_broker_0;
    let cpu_pg = pg
        .map(PgCluster::cpu_seconds)
        .zip(cpu_pg_0)
        .map(|(b, a)| b - a);
    let cpu_bench = cpu_seconds(std::process::id()) - cpu_bench_0;
    let busy = machine_busy_seconds() - busy_0;
    let irq = machine_irq_seconds() - irq_0;
    let published = publisher
        .await
        .context("the publisher task panicked")?
        .context("publisher")?;
    let committed = rows.count().await?.saturating_sub(base_count);
    let seconds = last_row_at
        .saturating_duration_since(published.started)
        .as_secs_f64();
    let (pg_stats, pg_top) =
        PgSnapshot::since(pg_0, pg, placement.postgres_url.as_deref(), 8).await?;
    let metrics_1: Vec<String> = daemons.iter().map(Daemon::metrics).collect();
    let delta = |name: &str| metric_sum(&metrics_1, name) - metric_sum(&metrics_0, name);
    let per_instance = metrics_0
        .iter()
        .zip(&metrics_1)
        .map(|(a, b)| {
            let m = |t: &str| metric(t, "telebridge_readings_stored_total").unwrap_or(0.0);
            (m(b) - m(a)).max(0.0) as u64
        })
        .collect();
    let tail_lag = metrics_1
        .iter()
        .map(|t| metric(t, "telebridge_tail_lag_events"))
        .collect();
    let other = busy - cpu_daemon - cpu_broker - cpu_pg.unwrap_or(0.0) - cpu_bench;
    Ok(DaemonRun {
        setup,
        committed: Burst {
            count: committed,
            seconds,
        },
        publish_seconds: published.seconds,
        daemon_cpu: cpu_daemon,
        broker_cpu: cpu_broker,
        pg_cpu: cpu_pg,
        bench_cpu: cpu_bench,
        other_cpu: other.max(0.0),
        irq_cpu: irq,
        batches: delta("telebridge_store_batches_total").max(0.0) as u64,
        commit_seconds: delta("telebridge_store_commit_seconds_sum").max(0.0),
        per_instance,
        tail_lag,
        pg_stats,
        pg_top,
        clean_exit: false,
        log_problems: Vec::new(),
    })
}

// ---------------------------------------------------------------------------------------
// The Node-RED peer
// ---------------------------------------------------------------------------------------

/// The Node-RED installation in benches/nodered and the versions it runs.
struct NodeRedSetup {
    dir: PathBuf,
    node: String,
    node_red: String,
    sqlite_node: String,
    sqlite3: String,
    sqlite: String,
    /// How long `npm ci` took, if this run installed the modules.
    installed_in: Option<Duration>,
}

impl NodeRedSetup {
    /// Checks that Node.js runs and the pinned modules load; installs them with `npm ci` if
    /// they are missing or do not load.
    fn prepare() -> anyhow::Result<NodeRedSetup> {
        let dir = PathBuf::from(NODERED_DIR);
        for file in ["package.json", "package-lock.json", "flows.json"] {
            if !dir.join(file).is_file() {
                bail!("{} is missing", dir.join(file).display());
            }
        }
        let node = Command::new("node")
            .arg("--version")
            .output()
            .context("running `node --version`: is Node.js (>= 18.5) installed?")?;
        if !node.status.success() {
            bail!("`node --version` failed ({})", node.status);
        }
        let node = String::from_utf8_lossy(&node.stdout).trim().to_owned();

        let mut installed_in = None;
        if let Err(why) = Self::versions(&dir) {
            eprintln!(
                "Node-RED peer: its modules are not usable in {}/node_modules ({why:#}).\n\
                 Installing the versions pinned in benches/nodered/package-lock.json with \
                 `npm ci --prefix benches/nodered`; this compiles SQLite for node-sqlite3 and \
                 takes minutes (up to {} min allowed). `--no-peer` skips Node-RED.",
                dir.display(),
                NPM_CI_LIMIT.as_secs() / 60
            );
            let started = Instant::now();
            let mut npm = Command::new("npm");
            npm.arg("ci")
                .arg("--prefix")
                .arg(&dir)
                .args(["--no-audit", "--no-fund"])
                .current_dir(&dir)
                .stdin(Stdio::null())
                // npm's output goes to stderr, beside the bench's progress lines.
                .stdout(std::io::stderr())
                .stderr(std::io::stderr());
            let status = run_bounded(&mut npm, NPM_CI_LIMIT).context("npm ci")?;
            if !status.success() {
                bail!(
                    "`npm ci --prefix {}` failed ({status}); see its output above",
                    dir.display()
                );
            }
            let took = started.elapsed();
            eprintln!("Node-RED peer: npm ci took {:.0} s", took.as_secs_f64());
            installed_in = Some(took);
        }
        let v = Self::versions(&dir).context("the modules npm ci installed do not load")?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_owned();
        Ok(NodeRedSetup {
            node_red: field("nodeRed"),
            sqlite_node: field("sqliteNode"),
            sqlite3: field("sqlite3"),
            sqlite: field("sqlite"),
            dir,
            node,
            installed_in,
        })
    }

    /// Loads sqlite3 (the compiled addon) and reads the module versions, in a child node.
    fn versions(dir: &Path) -> anyhow::Result<serde_json::Value> {
        if !dir.join("node_modules/node-red/red.js").is_file() {
            bail!("node_modules/node-red/red.js is missing");
        }
        let script = "const s = require('sqlite3'); console.log(JSON.stringify({ \
                      nodeRed: require('node-red/package.json').version, \
                      sqliteNode: require('node-red-node-sqlite/package.json').version, \
                      sqlite3: require('sqlite3/package.json').version, sqlite: s.VERSION }))";
        let out_path = tempfile::NamedTempFile::new().context("creating a temp file")?;
        let mut cmd = Command::new("node");
        cmd.arg("-e")
            .arg(script)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out_path.reopen().context("reopening the temp file")?)
            .stderr(out_path.reopen().context("reopening the temp file")?);
        let status = run_bounded(&mut cmd, Duration::from_secs(60))?;
        let out = std::fs::read_to_string(out_path.path()).unwrap_or_default();
        if !status.success() {
            bail!(
                "loading sqlite3 and node-red failed ({status}): {}",
                out.lines().take(3).collect::<Vec<_>>().join(" / ")
            );
        }
        serde_json::from_str(out.trim()).with_context(|| format!("unreadable versions {out:?}"))
    }
}

/// Runs a command in a process group of its own; past `limit`, kills that group (the
/// command and whatever it started) by its id.
fn run_bounded(cmd: &mut Command, limit: Duration) -> anyhow::Result<ExitStatus> {
    let mut child = cmd
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            bail!(
                "{:?} did not finish within {limit:?}; killed it",
                cmd.get_program()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running Node-RED (one node process) with its own userDir, settings and database in a
/// temp dir; stopped by its pid on drop.
struct NodeRed {
    child: Child,
    port: u16,
    db: PathBuf,
    log: PathBuf,
    /// Holds the userDir, the database and the log.
    _dir: TempDir,
}

impl NodeRed {
    fn start(setup: &NodeRedSetup, broker_port: u16, qos: u8) -> anyhow::Result<NodeRed> {
        let dir = tempfile::tempdir().context("creating a temp dir for Node-RED")?;
        let user_dir = dir.path().join("userdir");
        std::fs::create_dir(&user_dir).context("creating the Node-RED userDir")?;
        // A copy, so that Node-RED never writes next to the flow in the repository.
        let flows = user_dir.join("flows.json");
        std::fs::copy(setup.dir.join("flows.json"), &flows).context("copying flows.json")?;
        let db = dir.path().join("nodered.db");
        let log = dir.path().join("node-red.log");
        let port = free_port()?;
        let js = |p: &Path| serde_json::Value::String(p.display().to_string()).to_string();
        // Headless: no editor, no palette manager, no update check, nothing fetched.
        let settings = format!(
            "module.exports = {{\n\
             \x20   uiHost: \"127.0.0.1\",\n\
             \x20   uiPort: {port},\n\
             \x20   flowFile: {flows},\n\
             \x20   credentialSecret: false,\n\
             \x20   disableEditor: true,\n\
             \x20   diagnostics: {{ enabled: false, ui: false }},\n\
             \x20   runtimeState: {{ enabled: false, ui: false }},\n\
             \x20   telemetry: {{ enabled: false, updateNotification: false }},\n\
             \x20   externalModules: {{ autoInstall: false, palette: {{ allowInstall: false, allowUpdate: false, allowUpload: false }}, modules: {{ allowInstall: false }} }},\n\
             \x20   functionExternalModules: false,\n\
             \x20   mqttReconnectTime: 1000,\n\
             \x20   logging: {{ console: {{ level: \"warn\", metrics: false, audit: false }} }},\n\
             }};\n",
            flows = js(&flows),
        );
        let settings_path = user_dir.join("settings.js");
        std::fs::write(&settings_path, settings).context("writing Node-RED's settings.js")?;
        let log_file = std::fs::File::create(&log).context("creating the Node-RED log")?;
        let log_err = log_file
            .try_clone()
            .context("duplicating the log file handle")?;
        let child = Command::new("node")
            .arg(setup.dir.join("node_modules/node-red/red.js"))
            .arg("--userDir")
            .arg(&user_dir)
            .arg("--settings")
            .arg(&settings_path)
            .env("NR_BENCH_MQTT_PORT", broker_port.to_string())
            .env("NR_BENCH_QOS", qos.to_string())
            .env("NR_BENCH_DB", &db)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .context("starting node node_modules/node-red/red.js")?;
        Ok(NodeRed {
            child,
            port,
            db,
            log,
            _dir: dir,
        })
    }

    /// Waits until the HTTP port answers, the flow created the readings table and the
    /// WebSocket listener accepts a handshake. The MQTT subscription is proven afterwards by
    /// probe readings.
    async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<RowCounter> {
        let deadline = Instant::now() + limit;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut last = String::from("nothing tried yet");
        let rows = loop {
            if let Some(status) = self.child.try_wait().context("checking on Node-RED")? {
                bail!(
                    "Node-RED exited before it was ready ({status}); its log ends:\n{}",
                    log_tail(&self.log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "Node-RED was not ready within {limit:?} (last: {last}); its log ends:\n{}",
                    log_tail(&self.log, 20)
                );
            }
            if let Err(e) = http_get(addr, "/") {
                last = format!("HTTP on {addr}: {e}");
            } else if !self.db.is_file() {
                last = format!("{} not created yet", self.db.display());
            } else {
                match RowCounter::open(&self.db, false).await {
                    Ok(mut rows) => match rows.count().await {
                        Ok(_) => break rows,
                        Err(e) => last = format!("{e:#}"),
                    },
                    Err(e) => last = format!("{e:#}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let url = format!("ws://127.0.0.1:{}{NODERED_WS_PATH}", self.port);
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        match timeout(left, tokio_tungstenite::connect_async(url.as_str())).await {
            Ok(Ok((mut ws, _))) => {
                let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
            }
            Ok(Err(e)) => bail!("the websocket out listener {url} refused a handshake: {e}"),
            Err(_) => bail!("no WebSocket handshake from {url} within {left:?}"),
        }
        Ok(rows)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        proc_status_kb(self.pid(), "VmHWM:").unwrap_or(0)
    }

    /// Warning and error lines of the log (the settings log only those).
    fn log_problems(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            // Known and harmless with the generated settings: the flow has no credentials,
            // and projects are an editor feature.
            .filter(|l| {
                !l.contains("Using unencrypted credentials") && !l.contains("Projects disabled")
            })
            .map(str::to_owned)
            .collect()
    }

    /// SIGTERM (Node-RED closes its flows and the database), then SIGKILL after `limit`.
    fn stop(&mut self, limit: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("  Node-RED did not exit within {limit:?} of SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeRed {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs Node-RED with flows.json, publishes one burst, and measures the rate at which rows
/// are committed to its SQLite database.
async fn peer_burst(
    setup: &NodeRedSetup,
    broker: &Mosquitto,
    case: &Case,
    limit: Duration,
) -> anyhow::Result<PeerRun> {
    let mut nr = NodeRed::start(setup, broker.port, case.qos_number())?;
    let run = measure_peer(&mut nr, broker, case, limit).await;
    nr.stop(Duration::from_secs(10));
    let mut run = run?;
    run.log_problems = nr.log_problems();
    for line in run.log_problems.iter().take(5) {
        eprintln!("  Node-RED log: {line:.300}");
    }
    Ok(run)
}

async fn measure_peer(
    nr: &mut NodeRed,
    broker: &Mosquitto,
    case: &Case,
    limit: Duration,
) -> anyhow::Result<PeerRun> {
    let started = Instant::now();
    let mut rows = nr.wait_ready(limit).await?;
    let (base_count, base_seq) =
        probe_until_stored(&mut rows, broker.port, case, limit, "Node-RED", &[]).await?;
    eprintln!(
        "  Node-RED ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let n = case.messages;
    let cpu_peer_0 = cpu_seconds(nr.pid());
    let cpu_broker_0 = cpu_seconds(broker.pid());
    let publisher = tokio::spawn(publish_burst(
        broker.port,
        *case,
        format!("bench-pub-nr-{}", case.tag()),
        limit,
    ));
    let (last_row_at, finish) = wait_for_rows(&mut rows, base_seq, n, limit, "Node-RED").await?;
    let published = publisher
        .await
        .context("the publisher task panicked")?
        .context("publisher")?;
    let peer_cpu = cpu_seconds(nr.pid()) - cpu_peer_0;
    let broker_cpu = cpu_seconds(broker.pid()) - cpu_broker_0;
    let peak_rss_kib = nr.peak_rss_kib();
    let committed = rows.count().await?.saturating_sub(base_count);
    let seconds = last_row_at
        .saturating_duration_since(published.started)
        .as_secs_f64();
    Ok(PeerRun {
        committed: Burst {
            count: committed,
            seconds,
        },
        finish,
        publish_seconds: published.seconds,
        peer_cpu,
        broker_cpu,
        peak_rss_kib,
        log_problems: Vec::new(),
    })
}
