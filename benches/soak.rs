//! Soak benchmark: the release daemon under a steady mixed load for minutes, watching its
//! memory, then checking that nothing was lost.
//!
//! ```text
//! cargo bench --bench soak [-- --minutes 3 --rate 5000 --clients 100 --every 60]
//! ```
//!
//! Everything runs on loopback on this machine: a private Mosquitto (queue and in-flight
//! limits lifted, as the other benches do), the release daemon (`target/release/telebridge`)
//! with a fresh database, and in this process:
//!
//! - a QoS 1 publisher sending `--rate` readings/s (10 ms ticks) of 100-byte JSON payloads
//!   `{"n":<publish number>,..}` to `devices/soak-{0..devices}/telemetry`, counting the
//!   broker's PUBACKs;
//! - `--clients` SSE clients on `GET /events` (raw TCP, one reusable buffer, reading every
//!   `--lazy-ms`), each counting its events and checking that event ids come one after
//!   the other (readings carry ids in older builds, every kind since the ordered event log);
//!   a client cut off as too slow (or whose stream ends) reconnects with
//!   `Last-Event-ID` and resumes from storage, as EventSource does;
//! - one WebSocket client sending one `ping` command per second to device `soak-0`, and a
//!   simulated device (MQTT) that answers each on `devices/soak-0/commands/ack` with
//!   `{"id":..,"ok":true,"result":null}`.
//!
//! Every `--every` seconds (default 60) it prints the daemon's resident memory (VmRSS,
//! RssAnon, RssFile, RssShmem, and from /proc/PID/smaps the part in glibc's malloc heaps,
//! which only C code uses here, i.e. SQLite, and in thread stacks; the rest of the anonymous
//! memory is jemalloc's Rust heap), with what flowed so far. At the end it drains, counts the
//! rows in SQLite (read-only) and the distinct publish numbers among them, and reports
//! missing = acknowledged by the broker - distinct stored, duplicates, command answers vs
//! commands sent, and SSE clients cut.
//!
//! Every loop is bounded in count and time; everything started is stopped by Drop guards
//! (children by their pid). The database grows by about 180 bytes per reading (5,000/s:
//! about 52 MB a minute), and at that rate the WAL of this build by about 1.6 GB a minute
//! (it is never restarted), all in a temporary directory deleted at the end; the load stops
//! early, with a note, when less than 5 GB is left free there.

mod common;

use common::{
    Daemon, HANDSHAKE_TIMEOUT, Machine, Mosquitto, Publisher, Ws, connect_ws, cpu_snapshot,
    daemon_binary, fake_device, find_byte, fmt_ms, leading_u64, load_average, metric, modified,
    number, open_file_limit, open_sse, path_value, percentile, proc_status_kb, publish_qos1,
    tokio_workers, ws_json,
};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use rumqttc::AsyncClient;
use sqlx::Connection as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::io::AsyncReadExt as _;
use tokio::sync::Semaphore;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: cargo bench --bench soak [-- OPTIONS]

  --minutes N         how long the load runs, 1 to 180 (default 3)
  --rate N            readings published per second, QoS 1 (default 5000)
  --clients N         SSE clients on GET /events (default 100)
  --devices N         devices the readings rotate through (default 100)
  --every N           seconds between memory lines (default 60; a line also ends the run)
  --sse-buffer N      the daemon's [http] sse_buffer (default 65536, the daemon's default)
  --lazy-ms N         each SSE client reads every N ms (default 10; 0: at once)
  --daemon-env K=V    set K=V in the daemon's environment (repeatable), such as
                      _RJEM_MALLOC_CONF=dirty_decay_ms:1000 or MALLOC_ARENA_MAX=2
  --daemon PATH       the telebridge binary to run (default: the release build)";

/// Size of each published payload, bytes.
const PAYLOAD_BYTES: usize = 100;
/// Publisher pacing tick.
const TICK: Duration = Duration::from_millis(10);
/// The device that gets (and answers) the commands; it also publishes telemetry, so it
/// stays online.
const COMMAND_DEVICE: &str = "soak-0";
/// Read buffer of one SSE client (the daemon writes chunks of up to 256 KiB).
const READ_BUF: usize = 64 * 1024;
/// SSE connections being set up at once.
const CONNECT_PARALLEL: usize = 64;
/// Reconnects one SSE client may make in all.
const MAX_RECONNECTS: u64 = 10_000;
/// Bounds on the drain at the end.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
const NO_PROGRESS_LIMIT: Duration = Duration::from_secs(10);
/// Longer than the daemon's `[commands] timeout` (30 s), which answers `timeout` itself.
const COMMAND_REPLY_LIMIT: Duration = Duration::from_secs(35);
/// How often the free space of the database's filesystem is checked, and the least there
/// must be for the load to go on.
const DISK_CHECK: Duration = Duration::from_secs(5);
const MIN_FREE_DISK: u64 = 5_000_000_000;
/// glibc's non-main malloc arenas are reserved in 64 MiB pieces (HEAP_MAX_SIZE on 64-bit).
const GLIBC_ARENA: u64 = 64 << 20;

fn main() -> ExitCode {
    match common::parse_args(USAGE, Args::parse, |a| a.help) {
        ControlFlow::Continue(args) => common::run_to_exit(run(&args)),
        ControlFlow::Break(code) => code,
    }
}

#[derive(Debug)]
struct Args {
    help: bool,
    minutes: u64,
    rate: u64,
    clients: usize,
    devices: u64,
    every: u64,
    sse_buffer: u64,
    lazy_ms: u64,
    daemon_env: Vec<(String, String)>,
    daemon: Option<PathBuf>,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut out = Args {
            help: false,
            minutes: 3,
            rate: 5000,
            clients: 100,
            devices: 100,
            every: 60,
            sse_buffer: 65_536,
            lazy_ms: 10,
            daemon_env: Vec::new(),
            daemon: None,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // `cargo bench` passes --bench to harness = false targets.
                "--bench" => {}
                "-h" | "--help" => out.help = true,
                "--minutes" => out.minutes = number("--minutes", args.next(), 1, 180)?,
                "--rate" => out.rate = number("--rate", args.next(), 1, 50_000)?,
                "--clients" => out.clients = number("--clients", args.next(), 0, 2000)? as usize,
                "--devices" => out.devices = number("--devices", args.next(), 1, 10_000)?,
                "--every" => out.every = number("--every", args.next(), 1, 3600)?,
                "--sse-buffer" => {
                    out.sse_buffer = number("--sse-buffer", args.next(), 16, 10_000_000)?;
                }
                "--lazy-ms" => out.lazy_ms = number("--lazy-ms", args.next(), 0, 1000)?,
                "--daemon-env" => {
                    let kv = args
                        .next()
                        .ok_or_else(|| anyhow!("--daemon-env needs KEY=VALUE"))?;
                    let (k, v) = kv
                        .split_once('=')
                        .filter(|(k, _)| !k.is_empty())
                        .ok_or_else(|| anyhow!("--daemon-env {kv:?}: expected KEY=VALUE"))?;
                    out.daemon_env.push((k.to_owned(), v.to_owned()));
                }
                "--daemon" => out.daemon = Some(path_value("--daemon", args.next())?),
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(out)
    }
}

async fn run(args: &Args) -> anyhow::Result<ExitCode> {
    if let Some(limit) = open_file_limit() {
        let need = args.clients as u64 + 200;
        if limit < need {
            bail!(
                "the open-file limit of this process is {limit}, and the bench needs about {need}; \
                 lower --clients or raise `ulimit -n`"
            );
        }
    }
    let bin = daemon_binary(args.daemon.as_deref())?;
    let broker = Mosquitto::start(None)?;
    let machine = Machine::read();
    let duration = Duration::from_secs(args.minutes * 60);
    let config = |db: &Path| {
        format!(
            "[broker]\nmode = \"external\"\n\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"telebridge-soak-{}\"\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\nmax_sse_clients = 20000\nmax_streams_per_ip = 20000\n\
             sse_buffer = {}\n\n\
             [storage]\npath = {:?}\n\n\
             [log]\nlevel = \"warn\"\n",
            broker.port,
            std::process::id(),
            args.sse_buffer,
            db.display().to_string()
        )
    };
    println!("# telebridge soak benchmark ({} minutes)", args.minutes);
    println!("machine:    {}", machine.describe());
    println!("daemon:     {} (built {})", bin.display(), modified(&bin));
    println!(
        "            [broker] mode=external, [http] sse_buffer={} max_sse_clients=20000 \
         max_streams_per_ip=20000, [log] level=warn, other keys default{}",
        args.sse_buffer,
        if args.daemon_env.is_empty() {
            String::new()
        } else {
            let env: Vec<String> = args
                .daemon_env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("; environment {}", env.join(" "))
        }
    );
    println!("{}", broker.describe());
    println!(
        "load:       {} readings/s QoS 1 ({PAYLOAD_BYTES}-byte JSON) over {} devices, 10 ms ticks; \
         {} SSE clients on GET /events (all types; read every {} ms; cut ones resume with \
         Last-Event-ID); 1 command/s over one WebSocket to {COMMAND_DEVICE}, answered by a \
         simulated MQTT device",
        args.rate, args.devices, args.clients, args.lazy_ms
    );
    println!(
        "bench:      tokio with {} worker threads; everything shares this machine's cores; load \
         average at start {}",
        tokio_workers(),
        load_average()
    );
    println!();

    let daemon = Daemon::start_with_config(&bin, &args.daemon_env, config).await?;
    let pids = [daemon.pid(), broker.pid(), std::process::id()];
    let stop = CancellationToken::new();
    // Cancels every task of ours however this function ends.
    let _stop_guard = stop.clone().drop_guard();

    let idle = Sample::take(&daemon, &Counters::default(), 0.0).await;

    // The device that answers commands.
    // Answers every command on its topic at once with `{"id":..,"ok":true,"result":null}`.
    let device = fake_device(
        broker.port,
        COMMAND_DEVICE,
        false,
        stop.child_token(),
        |id| serde_json::json!({"id": id, "ok": true, "result": null}).to_string(),
    )
    .await?;

    // SSE clients, all connected (and so subscribed to the feed) before the first publish.
    let stats: Arc<Vec<ClientStats>> =
        Arc::new((0..args.clients).map(|_| ClientStats::default()).collect());
    let ready = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(CONNECT_PARALLEL));
    let mut client_tasks = Vec::with_capacity(args.clients);
    for idx in 0..args.clients {
        client_tasks.push(tokio::spawn(sse_client(SseClient {
            addr: daemon.addr,
            idx,
            lazy: (args.lazy_ms > 0).then(|| Duration::from_millis(args.lazy_ms)),
            stats: stats.clone(),
            ready: ready.clone(),
            gate: gate.clone(),
            stop: stop.clone(),
        })));
    }
    let deadline = Instant::now() + Duration::from_secs(30 + args.clients as u64 / 20);
    while ready.load(Ordering::Acquire) < args.clients {
        if let Some(i) = client_tasks.iter().position(|t| t.is_finished()) {
            let why = match client_tasks.swap_remove(i).await {
                Ok(Some(e)) => e,
                Ok(None) => "ended early".into(),
                Err(e) => format!("client task: {e}"),
            };
            bail!(
                "an SSE client failed to connect ({} of {} ready): {why}",
                ready.load(Ordering::Acquire),
                args.clients
            );
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} SSE clients connected within the deadline",
                ready.load(Ordering::Acquire),
                args.clients
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The publisher and the command client run until `duration` is over.
    let publisher = Publisher::connect(broker.port, &format!("soak-pub-{}", std::process::id()))
        .await
        .context("connecting the publisher")?;
    let counters = Counters {
        sent: Arc::new(AtomicU64::new(0)),
        acked: publisher.acked.clone(),
        stats: stats.clone(),
        commands: Arc::new(CommandStats::default()),
    };
    // Stops the publisher and the command client early (disk space).
    let load_stop = stop.child_token();
    let start = Instant::now();
    let publish_task = tokio::spawn(publish(
        publisher.client.clone(),
        args.rate,
        args.devices,
        duration,
        counters.sent.clone(),
        load_stop.clone(),
    ));
    // The command device publishes telemetry too (soak-0), so it is online from the start.
    let ws = connect_ws(daemon.addr).await?;
    let command_task = tokio::spawn(command_client(
        ws,
        args.minutes * 60,
        counters.commands.clone(),
        load_stop.clone(),
    ));

    // Memory lines.
    println!(
        "## daemon memory and traffic, every {} s (t = seconds since the first publish; MB = MiB)",
        args.every
    );
    println!();
    print_sample_header();
    print_sample_row(&idle, None);
    let mut samples = vec![idle.clone()];
    let mut cpu_prev = (Instant::now(), cpu_snapshot(pids));
    let every = Duration::from_secs(args.every);
    let mut next_at = every;
    // The WAL can grow by gigabytes a minute: the load stops early, with a note, when the
    // database's filesystem gets short of space (checked every DISK_CHECK).
    let mut disk_note = None;
    let mut next_disk = DISK_CHECK;
    while next_at <= duration {
        let disk_only = next_disk < next_at;
        let wake = start + if disk_only { next_disk } else { next_at };
        tokio::time::sleep_until(wake.into()).await;
        if let Some(free) = free_disk_bytes(&daemon.db)
            && free < MIN_FREE_DISK
        {
            disk_note = Some(format!(
                "the load stopped at t = {:.0} s: only {:.1} GB free on the database's filesystem",
                start.elapsed().as_secs_f64(),
                free as f64 / 1e9
            ));
            load_stop.cancel();
        }
        if disk_only {
            next_disk += DISK_CHECK;
            if disk_note.is_none() {
                continue;
            }
        }
        let mut s = Sample::take(&daemon, &counters, start.elapsed().as_secs_f64()).await;
        let now = (Instant::now(), cpu_snapshot(pids));
        s.cpu = cpu_since(&cpu_prev, &now);
        cpu_prev = now;
        print_sample_row(&s, samples.last());
        samples.push(s);
        if daemon_gone(&daemon) || disk_note.is_some() {
            break;
        }
        next_disk = next_disk.max(next_at + DISK_CHECK);
        next_at += every;
    }

    // Drain: the publisher has sent everything (or gave up); wait for PUBACKs, stored rows
    // and every SSE client to have every stored reading, bounded.
    let publish_outcome = match timeout(Duration::from_secs(15), publish_task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(anyhow!("publisher task: {e}")),
        Err(_) => Err(anyhow!(
            "the publisher did not finish within 15 s of the end"
        )),
    };
    let publish_end = start.elapsed().as_secs_f64();
    let sent = counters.sent.load(Ordering::Relaxed);
    eprintln!("-- load over: {sent} readings published; draining");
    let drain_start = Instant::now();
    let mut last_progress = Instant::now();
    let mut last_mark = (u64::MAX, u64::MAX, u64::MAX);
    let mut stored = 0;
    let mut drained = false;
    while drain_start.elapsed() < DRAIN_LIMIT && last_progress.elapsed() < NO_PROGRESS_LIMIT {
        let acked = counters.acked.load(Ordering::Relaxed);
        if let Ok(Ok(text)) = timeout(Duration::from_secs(2), daemon.metrics()).await {
            stored = metric(&text, "telebridge_readings_stored_total").unwrap_or(0.0) as u64;
        }
        let lowest_client = stats
            .iter()
            .map(|s| s.readings.load(Ordering::Relaxed))
            .min()
            .unwrap_or(u64::MAX);
        if acked >= sent && stored >= acked && lowest_client >= stored {
            drained = true;
            break;
        }
        let mark = (acked, stored, stats_sum(&stats, |s| &s.readings));
        if mark != last_mark {
            last_mark = mark;
            last_progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let command_outcome =
        match timeout(COMMAND_REPLY_LIMIT + Duration::from_secs(5), command_task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(anyhow!("command task: {e}")),
            Err(_) => Err(anyhow!("the command client did not finish")),
        };
    let mut last = Sample::take(&daemon, &counters, start.elapsed().as_secs_f64()).await;
    let now = (Instant::now(), cpu_snapshot(pids));
    last.cpu = cpu_since(&cpu_prev, &now);
    last.label = Some("drained");
    print_sample_row(&last, samples.last());
    samples.push(last);
    println!();

    // Final counts: the daemon's metrics, then the rows (the daemon still runs; WAL readers
    // see every committed row).
    let metrics_text = daemon.metrics().await.unwrap_or_default();
    stop.cancel();
    let mut client_errors = Vec::new();
    for t in client_tasks {
        match timeout(Duration::from_secs(10), t).await {
            Ok(Ok(Some(e))) => client_errors.push(e),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => client_errors.push(format!("client task: {e}")),
            Err(_) => client_errors.push("client task did not stop in 10 s".into()),
        }
    }
    let answered = device.answered.load(Ordering::Relaxed);
    device.stop().await;
    publisher.stop().await;
    let acked = counters.acked.load(Ordering::Relaxed);
    eprintln!("-- counting rows in SQLite");
    let rows = count_rows(&daemon.db, sent).await;
    let (db_bytes, wal_bytes) = db_sizes(&daemon.db);
    let (shutdown_s, exit_status, log) = stop_daemon(&daemon);
    drop(daemon);
    drop(broker);

    // Report.
    println!("## totals");
    println!();
    let readings_ok = match &rows {
        Ok(r) => {
            let missing = acked as i64 - r.distinct as i64;
            println!(
                "readings:   published {sent}, acknowledged by the broker (PUBACKs) {acked}, rows in \
                 SQLite {}, distinct publish numbers stored {}, missing = acked - distinct stored = \
                 {missing}, stored twice {}, rows not from this run {}; telebridge_readings_stored_total {}",
                r.rows,
                r.distinct,
                r.rows - r.distinct - r.foreign,
                r.foreign,
                metric(&metrics_text, "telebridge_readings_stored_total").unwrap_or(-1.0)
            );
            if r.distinct < sent && r.first_absent.is_some() {
                println!(
                    "            not stored: {} publish number(s), the first {}",
                    sent - r.distinct,
                    r.first_absent.unwrap_or(0)
                );
            }
            missing <= 0
        }
        Err(e) => {
            println!("readings:   published {sent}, acknowledged {acked}; rows: {e:#}");
            false
        }
    };
    if let Err(e) = &publish_outcome {
        println!("publisher:  {e:#}");
    }
    if let Some(note) = &disk_note {
        println!("NOTE:       {note}");
    }
    let c = &counters.commands;
    let cmd_sent = c.sent.load(Ordering::Relaxed);
    let cmd_ok = c.acked_ok.load(Ordering::Relaxed);
    let mut rtts = c.rtt_us.lock().map(|v| v.clone()).unwrap_or_default();
    rtts.sort_unstable();
    let ms = |p: f64| percentile(&rtts, p).map(|us| f64::from(us) / 1000.0);
    println!(
        "commands:   sent {cmd_sent}, accepted {}, acks received {} (ok {cmd_ok}, not ok {}), \
         timeouts/expired {}, errors {}; device answered {answered}; round trip (WebSocket send -> \
         ack) p50 {} p99 {} max {} ms",
        c.accepted.load(Ordering::Relaxed),
        cmd_ok + c.acked_not_ok.load(Ordering::Relaxed),
        c.acked_not_ok.load(Ordering::Relaxed),
        c.timeouts.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed),
        fmt_ms(ms(0.50)),
        fmt_ms(ms(0.99)),
        fmt_ms(rtts.last().map(|&us| f64::from(us) / 1000.0)),
    );
    if let Ok(Some(p)) = &command_outcome {
        println!("            first problem: {p}");
    }
    if let Err(e) = &command_outcome {
        println!("            command client: {e:#}");
    }
    let cut_daemon = metric(&metrics_text, "telebridge_sse_clients_cut_total").unwrap_or(-1.0);
    let readings_expected = rows.as_ref().map_or(stored, |r| r.rows);
    let complete = stats
        .iter()
        .filter(|s| s.readings.load(Ordering::Relaxed) >= readings_expected)
        .count();
    println!(
        "SSE:        {} clients; cut as too slow: {} by the daemon's count \
         (telebridge_sse_clients_cut_total), {} seen by the clients; streams ended otherwise {}; \
         reconnects {}; reading events {} (expected {} x {} = {}), other events {}; ids skipped \
         {}, ids repeated {}; clients with every stored reading {complete} of {}; mean reading event \
         {:.0} bytes; client errors {}",
        args.clients,
        cut_daemon,
        stats_sum(&stats, |s| &s.cuts),
        stats_sum(&stats, |s| &s.ended),
        stats_sum(&stats, |s| &s.reconnects),
        stats_sum(&stats, |s| &s.readings),
        readings_expected,
        args.clients,
        readings_expected * args.clients as u64,
        stats_sum(&stats, |s| &s.other_events),
        stats_sum(&stats, |s| &s.skipped),
        stats_sum(&stats, |s| &s.repeated),
        args.clients,
        stats_sum(&stats, |s| &s.reading_bytes) as f64
            / stats_sum(&stats, |s| &s.readings).max(1) as f64,
        client_errors.len(),
    );
    if let Some(e) = client_errors.first() {
        println!("            first client error: {e}");
    }
    println!(
        "end:        publishing ended at t = {publish_end:.1} s; drain {} in {drain_s:.1} s; database \
         {:.1} MB + WAL {:.1} MB; SIGTERM -> exit in {} ({})",
        if drained { "complete" } else { "INCOMPLETE" },
        db_bytes as f64 / 1_048_576.0,
        wal_bytes as f64 / 1_048_576.0,
        shutdown_s.map_or("more than 15 s".into(), |s| format!("{s:.2} s")),
        exit_status,
    );
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    println!(
        "daemon log: {} warning/error line(s){}",
        warnings.len(),
        warnings
            .first()
            .map_or(String::new(), |l| format!("; the first: {}", l.trim()))
    );
    // jemalloc's stats_print output, if asked for with --daemon-env.
    if let Some(at) = log.find("___ Begin jemalloc statistics ___") {
        let stats_text = &log[at..];
        for line in stats_text
            .lines()
            .filter(|l| l.starts_with("Allocated:") || l.starts_with("Background threads:"))
        {
            println!("jemalloc:   {}", line.trim());
        }
    }
    println!();
    print_memory_analysis(&samples, args);
    let ok = readings_ok
        && cmd_ok == cmd_sent
        && command_outcome.is_ok()
        && publish_outcome.is_ok()
        && drained
        && client_errors.is_empty();
    println!();
    println!(
        "verdict: {}",
        if ok {
            "every acknowledged reading stored, every command answered, every SSE client complete"
        } else {
            "PROBLEMS above (missing readings, unanswered commands, an incomplete drain or client errors)"
        }
    );
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------------------------------
// Memory samples
// ---------------------------------------------------------------------------------------

/// What the bench counts while it runs.
#[derive(Clone)]
struct Counters {
    sent: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    stats: Arc<Vec<ClientStats>>,
    commands: Arc<CommandStats>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            sent: Arc::new(AtomicU64::new(0)),
            acked: Arc::new(AtomicU64::new(0)),
            stats: Arc::new(Vec::new()),
            commands: Arc::new(CommandStats::default()),
        }
    }
}

/// The daemon's memory (kB) and the traffic so far, at one moment.
#[derive(Clone, Default)]
struct Sample {
    at: f64,
    label: Option<&'static str>,
    rss: u64,
    anon: u64,
    file: u64,
    shmem: u64,
    hwm: u64,
    map: MapBreakdown,
    threads: u64,
    published: u64,
    acked: u64,
    stored: u64,
    queue: u64,
    sse_readings: u64,
    cut: u64,
    cmd_sent: u64,
    cmd_acked: u64,
    db_bytes: u64,
    wal_bytes: u64,
    /// CPU % of one core since the previous line: daemon, broker, bench.
    cpu: [f64; 3],
}

impl Sample {
    async fn take(daemon: &Daemon, c: &Counters, at: f64) -> Sample {
        let pid = daemon.pid();
        let kb = |key: &str| proc_status_kb(pid, key).unwrap_or(0);
        let text = timeout(Duration::from_secs(2), daemon.metrics())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let m = |name: &str| metric(&text, name).unwrap_or(0.0) as u64;
        let (db_bytes, wal_bytes) = db_sizes(&daemon.db);
        Sample {
            at,
            label: None,
            rss: kb("VmRSS:"),
            anon: kb("RssAnon:"),
            file: kb("RssFile:"),
            shmem: kb("RssShmem:"),
            hwm: kb("VmHWM:"),
            map: MapBreakdown::read(pid),
            threads: std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("Threads:"))
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0),
            published: c.sent.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            stored: m("telebridge_readings_stored_total"),
            queue: m("telebridge_ingest_queue_depth"),
            sse_readings: stats_sum(&c.stats, |s| &s.readings),
            cut: m("telebridge_sse_clients_cut_total"),
            cmd_sent: c.commands.sent.load(Ordering::Relaxed),
            cmd_acked: c.commands.acked_ok.load(Ordering::Relaxed)
                + c.commands.acked_not_ok.load(Ordering::Relaxed),
            db_bytes,
            wal_bytes,
            cpu: [0.0; 3],
        }
    }
}

/// Anonymous resident memory by who allocated it, from /proc/PID/smaps (kB).
#[derive(Clone, Copy, Default)]
struct MapBreakdown {
    /// glibc malloc: the brk heap and the 64 MiB thread arenas. Rust allocates through
    /// jemalloc, so this is C code: SQLite (its page caches, statements, WAL index copy).
    c_heap: u64,
    /// Thread stacks (an anonymous mapping above a small PROT_NONE guard, or `[stack]`).
    stacks: u64,
    /// Every other anonymous page: jemalloc's Rust heap (arenas, dirty pages not yet
    /// returned), glibc's large mmap'd blocks and written static data.
    other: u64,
    /// Anonymous pages in all, by smaps.
    anon: u64,
    /// Resident pages of the mapped WAL index (`*-shm`, shared with SQLite's other
    /// connections; RssFile on a disk filesystem, RssShmem on tmpfs).
    wal_index: u64,
}

impl MapBreakdown {
    fn read(pid: u32) -> MapBreakdown {
        struct Region {
            start: u64,
            end: u64,
            perms: String,
            path: String,
            anon: u64,
            rss: u64,
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
            return MapBreakdown::default();
        };
        let mut regions: Vec<Region> = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if let Some((a, b)) = first.split_once('-')
                && !first.ends_with(':')
                && let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                let perms = words.next().unwrap_or("").to_owned();
                // offset, device, inode, then the path (which may hold spaces).
                let path = words.skip(3).collect::<Vec<_>>().join(" ");
                regions.push(Region {
                    start,
                    end,
                    perms,
                    path,
                    anon: 0,
                    rss: 0,
                });
            } else if first == "Anonymous:"
                && let Some(r) = regions.last_mut()
            {
                r.anon = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            } else if first == "Rss:"
                && let Some(r) = regions.last_mut()
            {
                r.rss = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
        let mut out = MapBreakdown::default();
        for (i, r) in regions.iter().enumerate() {
            out.anon += r.anon;
            if r.path.ends_with("-shm") {
                out.wal_index += r.rss;
            }
            if r.anon == 0 {
                continue;
            }
            let next = regions.get(i + 1).filter(|n| n.start == r.end);
            let prev = i
                .checked_sub(1)
                .and_then(|p| regions.get(p))
                .filter(|p| p.end == r.start);
            let anonymous = r.path.is_empty();
            let glibc_arena = anonymous
                && r.start % GLIBC_ARENA == 0
                && (r.end - r.start == GLIBC_ARENA
                    || next.is_some_and(|n| {
                        n.perms.starts_with("---")
                            && n.path.is_empty()
                            && n.end - r.start == GLIBC_ARENA
                    }));
            let guarded = prev.is_some_and(|p| {
                p.perms.starts_with("---") && p.path.is_empty() && p.end - p.start <= 64 << 10
            });
            if r.path == "[heap]" || glibc_arena {
                out.c_heap += r.anon;
            } else if r.path == "[stack]" || (anonymous && guarded) {
                out.stacks += r.anon;
            } else {
                out.other += r.anon;
            }
        }
        out
    }
}

fn print_sample_header() {
    println!(
        "| t s | VmRSS MB | RssAnon MB | RssFile MB | RssShmem MB | C heap (SQLite) MB | Rust heap + other anon MB | stacks MB | WAL index (-shm) MB | threads | ΔRSS MB | published | PUBACKs | stored | ingest queue | SSE reading events | SSE cut | commands acked/sent | DB + WAL MB | CPU % daemon / broker / bench |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
}

fn print_sample_row(s: &Sample, prev: Option<&Sample>) {
    let mb = |kb: u64| kb as f64 / 1024.0;
    let delta = prev.map_or("-".into(), |p| {
        format!("{:+.1}", (s.rss as f64 - p.rss as f64) / 1024.0)
    });
    let t = match s.label {
        Some(l) => format!("{:.0} ({l})", s.at),
        None if s.at == 0.0 => "0 (idle)".into(),
        None => format!("{:.0}", s.at),
    };
    println!(
        "| {t} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {delta} | {} | {} | {} | {} | {} | {} | {}/{} | {:.1} + {:.1} | {} / {} / {} |",
        mb(s.rss),
        mb(s.anon),
        mb(s.file),
        mb(s.shmem),
        mb(s.map.c_heap),
        mb(s.map.other),
        mb(s.map.stacks),
        mb(s.map.wal_index),
        s.threads,
        s.published,
        s.acked,
        s.stored,
        s.queue,
        s.sse_readings,
        s.cut,
        s.cmd_acked,
        s.cmd_sent,
        s.db_bytes as f64 / 1_048_576.0,
        s.wal_bytes as f64 / 1_048_576.0,
        pct(s.cpu[0]),
        pct(s.cpu[1]),
        pct(s.cpu[2]),
    );
}

/// A CPU percentage, `-` for none.
fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}")
    } else {
        "-".into()
    }
}

/// Least-squares slope (per minute) of `f` over the samples.
fn slope_per_minute(samples: &[&Sample], f: impl Fn(&Sample) -> f64) -> Option<f64> {
    if samples.len() < 2 {
        return None;
    }
    let n = samples.len() as f64;
    let mx = samples.iter().map(|s| s.at).sum::<f64>() / n;
    let my = samples.iter().map(|s| f(s)).sum::<f64>() / n;
    let sxx: f64 = samples.iter().map(|s| (s.at - mx).powi(2)).sum();
    let sxy: f64 = samples.iter().map(|s| (s.at - mx) * (f(s) - my)).sum();
    (sxx > 0.0).then(|| 60.0 * sxy / sxx)
}

fn print_memory_analysis(samples: &[Sample], args: &Args) {
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!("## memory");
    println!();
    let Some(idle) = samples.first() else { return };
    let loaded: Vec<&Sample> = samples
        .iter()
        .skip(1)
        .filter(|s| s.label.is_none())
        .collect();
    let Some(peak) = loaded.iter().max_by_key(|s| s.rss) else {
        println!("no sample under load");
        return;
    };
    let end = loaded.last().copied().unwrap_or(peak);
    println!(
        "idle {:.1} MB; under load: first line {:.1} MB, highest {:.1} MB (t = {:.0} s), last {:.1} MB; \
         VmHWM (peak resident) {:.1} MB",
        mb(idle.rss),
        mb(loaded[0].rss),
        mb(peak.rss),
        peak.at,
        mb(end.rss),
        mb(end.hwm),
    );
    // The growth rate over the second half of the run, where warm-up (the SSE ring and the
    // SQLite caches filling) is over.
    let half = end.at / 2.0;
    let tail: Vec<&Sample> = loaded.iter().copied().filter(|s| s.at >= half).collect();
    let kbf = |f: fn(&Sample) -> u64| move |s: &Sample| f(s) as f64 / 1024.0;
    match slope_per_minute(&tail, kbf(|s| s.rss)) {
        Some(rss) => {
            println!(
                "growth over the second half (t >= {half:.0} s, {} lines, least squares): VmRSS {rss:+.2} MB/min; \
                 C heap (SQLite) {:+.2}; Rust heap + other anon {:+.2}; RssFile {:+.2} (of which the \
                 WAL index {:+.2}); RssShmem {:+.2} MB/min",
                tail.len(),
                slope_per_minute(&tail, kbf(|s| s.map.c_heap)).unwrap_or(0.0),
                slope_per_minute(&tail, kbf(|s| s.map.other)).unwrap_or(0.0),
                slope_per_minute(&tail, kbf(|s| s.file)).unwrap_or(0.0),
                slope_per_minute(&tail, kbf(|s| s.map.wal_index)).unwrap_or(0.0),
                slope_per_minute(&tail, kbf(|s| s.shmem)).unwrap_or(0.0),
            );
            let wal = slope_per_minute(&tail, |s| s.wal_bytes as f64 / 1_048_576.0).unwrap_or(0.0);
            let db = slope_per_minute(&tail, |s| s.db_bytes as f64 / 1_048_576.0).unwrap_or(0.0);
            println!(
                "            on disk: database {db:+.1} MB/min, WAL {wal:+.1} MB/min ({:.1} MB at the last line); \
                 a WAL that grows for the whole run is never restarted, and its index (the -shm \
                 file, mapped: RssFile) grows with it",
                end.wal_bytes as f64 / 1_048_576.0
            );
            let readings_per_min = args.rate as f64 * 60.0;
            println!(
                "            that is {:.1} bytes of resident memory per reading stored ({:.0} readings/min)",
                rss * 1_048_576.0 / readings_per_min,
                readings_per_min
            );
        }
        None => println!(
            "growth: too few lines in the second half to fit a slope; run longer or with --every 10"
        ),
    }
    println!(
        "where it is at the last line under load: C heap (SQLite) {:.1} MB, Rust heap + other anon {:.1} MB, \
         stacks {:.1} MB ({} threads), file-backed {:.1} MB (the binary, libraries and the mapped \
         WAL index, {:.1} MB), shmem {:.1} MB",
        mb(end.map.c_heap),
        mb(end.map.other),
        mb(end.map.stacks),
        end.threads,
        mb(end.file),
        mb(end.map.wal_index),
        mb(end.shmem),
    );
}

/// CPU % of one core between two snapshots, per daemon, broker and bench; NaN (printed as
/// `-`) over less than a second.
fn cpu_since(a: &(Instant, [f64; 4]), b: &(Instant, [f64; 4])) -> [f64; 3] {
    let wall = b.0.duration_since(a.0).as_secs_f64();
    if wall < 1.0 {
        return [f64::NAN; 3];
    }
    [0, 1, 2].map(|i| 100.0 * (b.1[i] - a.1[i]) / wall)
}

/// Free bytes (for unprivileged users) on the filesystem that holds `path`, from `df -Pk`.
fn free_disk_bytes(path: &Path) -> Option<u64> {
    let dir = path.parent()?;
    let out = Command::new("df").arg("-Pk").arg(dir).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let kb: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Sizes of the database file and its WAL.
fn db_sizes(db: &Path) -> (u64, u64) {
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    (size(db), size(Path::new(&wal)))
}

// ---------------------------------------------------------------------------------------
// Counting what was stored
// ---------------------------------------------------------------------------------------

struct Rows {
    rows: u64,
    distinct: u64,
    /// Rows whose payload carries no publish number of this run.
    foreign: u64,
    first_absent: Option<u64>,
}

/// Reads the publish number of every stored reading (read-only, while the daemon runs).
async fn count_rows(db: &Path, sent: u64) -> anyhow::Result<Rows> {
    let opts = SqliteConnectOptions::new().filename(db).read_only(true);
    let mut conn = SqliteConnection::connect_with(&opts)
        .await
        .with_context(|| format!("opening {} read-only", db.display()))?;
    let mut seen = vec![0u64; (sent as usize).div_ceil(64)];
    let (mut rows, mut distinct, mut foreign) = (0u64, 0u64, 0u64);
    {
        // The payload starts with `{"n":<publish number>,`.
        let mut stream = sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT CAST(substr(payload, 1, 32) AS BLOB) FROM readings",
        )
        .fetch(&mut conn);
        let deadline = Instant::now() + Duration::from_secs(600);
        while let Some(head) = timeout(Duration::from_secs(30), stream.next())
            .await
            .context("reading rows: no row for 30 s")?
        {
            let head = head?;
            rows += 1;
            match publish_number(&head).filter(|&n| n < sent) {
                Some(n) => {
                    let (w, b) = ((n / 64) as usize, n % 64);
                    if seen[w] & (1 << b) == 0 {
                        seen[w] |= 1 << b;
                        distinct += 1;
                    }
                }
                None => foreign += 1,
            }
            if rows % 1_000_000 == 0 && Instant::now() > deadline {
                bail!("reading rows took more than 600 s ({rows} so far)");
            }
        }
    }
    let _ = conn.close().await;
    let first_absent = (0..sent).find(|&n| seen[(n / 64) as usize] & (1 << (n % 64)) == 0);
    Ok(Rows {
        rows,
        distinct,
        foreign,
        first_absent,
    })
}

fn publish_number(head: &[u8]) -> Option<u64> {
    leading_u64(head.strip_prefix(b"{\"n\":")?)
}

// ---------------------------------------------------------------------------------------
// Stopping the daemon: SIGTERM by pid, its log read before the guard deletes it
// ---------------------------------------------------------------------------------------

/// Sends SIGTERM to the daemon (our child, by pid) and waits up to 15 s for it to exit,
/// without reaping it (the Drop guard does, so its pid cannot be reused before the guard's
/// own signal). Returns how long it took, its exit status (from /proc of the zombie) and
/// its log.
fn stop_daemon(daemon: &Daemon) -> (Option<f64>, String, String) {
    let pid = daemon.pid();
    let t0 = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let mut took = None;
    let mut status = "still running".to_owned();
    while t0.elapsed() < Duration::from_secs(15) {
        if let Some((state, code)) = proc_state(pid) {
            if state == 'Z' || state == 'X' {
                took = Some(t0.elapsed().as_secs_f64());
                status = match code {
                    Some(c) if c & 0x7f == 0 => format!("exit code {}", (c >> 8) & 0xff),
                    Some(c) => format!("killed by signal {}", c & 0x7f),
                    None => "exited".into(),
                };
                break;
            }
        } else {
            took = Some(t0.elapsed().as_secs_f64());
            status = "exited".into();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let log = std::fs::read_to_string(daemon.dir.path().join("daemon.log")).unwrap_or_default();
    (took, status, log)
}

fn daemon_gone(daemon: &Daemon) -> bool {
    proc_state(daemon.pid()).is_none_or(|(s, _)| s == 'Z' || s == 'X')
}

/// A process's state letter and, for a zombie, its wait status (field 52 of /proc/PID/stat).
fn proc_state(pid: u32) -> Option<(char, Option<i64>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 is fields[0]; field 52 is fields[49].
    let code = fields.get(49).and_then(|f| f.parse().ok());
    Some((state, code))
}

// ---------------------------------------------------------------------------------------
// The publisher
// ---------------------------------------------------------------------------------------

/// Publishes `rate` readings/s for `duration` (at most rate x duration readings); gives up
/// when it falls more than 5 s behind.
async fn publish(
    client: AsyncClient,
    rate: u64,
    devices: u64,
    duration: Duration,
    sent: Arc<AtomicU64>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let total = rate * duration.as_secs();
    let topics: Vec<String> = (0..devices)
        .map(|i| format!("devices/soak-{i}/telemetry"))
        .collect();
    let mut payload = Vec::with_capacity(PAYLOAD_BYTES + 32);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut n = 0u64;
    while n < total {
        tokio::select! {
            _ = stop.cancelled() => bail!("stopped at {n} of {total}"),
            _ = tick.tick() => {}
        }
        let elapsed = start.elapsed();
        if elapsed > duration + Duration::from_secs(5) {
            bail!("the publisher fell more than 5 s behind; stopped at {n} of {total}");
        }
        let due = ((u128::from(rate) * (elapsed + TICK).as_micros()) / 1_000_000) as u64;
        while n < due.min(total) {
            let device = (n % devices) as usize;
            make_payload(&mut payload, n, device);
            publish_qos1(&client, &topics[device], &payload).await?;
            n += 1;
        }
        sent.store(n, Ordering::Relaxed);
    }
    Ok(())
}

fn make_payload(out: &mut Vec<u8>, n: u64, device: usize) {
    use std::io::Write as _;
    out.clear();
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let _ = write!(
        out,
        r#"{{"n":{n},"t":{ms},"device":"soak-{device}","temp":21.5,"hum":40.25,"pad":""#
    );
    let pad = PAYLOAD_BYTES.saturating_sub(out.len() + 2);
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
}

// ---------------------------------------------------------------------------------------
// The command client (WebSocket) and the device that answers (MQTT)
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct CommandStats {
    sent: AtomicU64,
    accepted: AtomicU64,
    acked_ok: AtomicU64,
    acked_not_ok: AtomicU64,
    timeouts: AtomicU64,
    errors: AtomicU64,
    /// Round trip of each answered command, µs.
    rtt_us: std::sync::Mutex<Vec<u32>>,
}

/// Sends `count` commands, one a second, and reads the answers until each has its final
/// one (or COMMAND_REPLY_LIMIT after the last send). Returns the first problem seen.
async fn command_client(
    mut ws: Ws,
    count: u64,
    st: Arc<CommandStats>,
    stop: CancellationToken,
) -> anyhow::Result<Option<String>> {
    use std::collections::HashMap;
    let mut first_problem: Option<String> = None;
    // ref -> send time; id -> ref.
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut ids: HashMap<String, u64> = HashMap::new();
    let mut next = 0u64;
    let mut done = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_send = Instant::now();
    while done < count {
        if next >= count && last_send.elapsed() > COMMAND_REPLY_LIMIT {
            first_problem.get_or_insert_with(|| {
                format!("{} command(s) without a final answer", count - done)
            });
            break;
        }
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick(), if next < count => {
                let text = format!(
                    r#"{{"type":"command","device":"{COMMAND_DEVICE}","name":"ping","ref":{next}}}"#
                );
                sent.insert(next, Instant::now());
                timeout(HANDSHAKE_TIMEOUT, ws.send(Message::text(text)))
                    .await
                    .context("sending a command timed out")?
                    .context("sending a command")?;
                st.sent.fetch_add(1, Ordering::Relaxed);
                next += 1;
                last_send = Instant::now();
                continue;
            }
            f = timeout(Duration::from_secs(1), ws.next()) => match f {
                Err(_) => continue,
                Ok(None) => bail!("the daemon closed the WebSocket"),
                Ok(Some(Err(e))) => bail!("WebSocket: {e}"),
                Ok(Some(Ok(f))) => f,
            },
        };
        let received = Instant::now();
        let Some((text, v)) = ws_json(&frame)? else {
            continue;
        };
        match v["type"].as_str() {
            Some("accepted") => {
                st.accepted.fetch_add(1, Ordering::Relaxed);
                if v["status"].as_str() != Some("sent") {
                    first_problem.get_or_insert_with(|| format!("accepted but not sent: {text}"));
                }
                if let (Some(r), Some(id)) = (v["ref"].as_u64(), v["id"].as_str()) {
                    ids.insert(id.to_owned(), r);
                }
            }
            Some("ack") => {
                let r = v["id"].as_str().and_then(|id| ids.remove(id));
                let Some(at) = r.and_then(|r| sent.remove(&r)) else {
                    first_problem.get_or_insert_with(|| format!("ack for an unknown id: {text}"));
                    continue;
                };
                let us = received
                    .duration_since(at)
                    .as_micros()
                    .min(u128::from(u32::MAX));
                if let Ok(mut v) = st.rtt_us.lock() {
                    v.push(us as u32);
                }
                if v["ok"].as_bool() == Some(true) {
                    st.acked_ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    st.acked_not_ok.fetch_add(1, Ordering::Relaxed);
                    first_problem.get_or_insert_with(|| format!("device answered not ok: {text}"));
                }
                done += 1;
            }
            Some("timeout") | Some("expired") => {
                st.timeouts.fetch_add(1, Ordering::Relaxed);
                first_problem.get_or_insert_with(|| text.to_owned());
                if let Some(r) = v["id"].as_str().and_then(|id| ids.remove(id)) {
                    sent.remove(&r);
                }
                done += 1;
            }
            Some("error") => {
                st.errors.fetch_add(1, Ordering::Relaxed);
                first_problem.get_or_insert_with(|| text.to_owned());
                if let Some(r) = v["ref"].as_u64() {
                    sent.remove(&r);
                }
                done += 1;
            }
            _ => {
                first_problem.get_or_insert_with(|| format!("unexpected frame: {text}"));
            }
        }
    }
    let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
    Ok(first_problem)
}

// ---------------------------------------------------------------------------------------
// The SSE clients: raw TCP, one reusable buffer, a byte scan per line
// ---------------------------------------------------------------------------------------

/// One client's counts, updated after every read.
#[derive(Default)]
struct ClientStats {
    /// Reading events, each id counted once.
    readings: AtomicU64,
    reading_bytes: AtomicU64,
    other_events: AtomicU64,
    /// The id of the last event received (the resume point).
    last_id: AtomicU64,
    /// Ids jumped over (an event id more than one above the last).
    skipped: AtomicU64,
    /// Event ids not above the last (duplicates; not counted as events).
    repeated: AtomicU64,
    /// `: too slow` notices.
    cuts: AtomicU64,
    /// Streams that ended without one (other than at shutdown).
    ended: AtomicU64,
    reconnects: AtomicU64,
}

fn stats_sum(stats: &[ClientStats], f: impl Fn(&ClientStats) -> &AtomicU64) -> u64 {
    stats.iter().map(|s| f(s).load(Ordering::Relaxed)).sum()
}

struct SseClient {
    addr: SocketAddr,
    idx: usize,
    lazy: Option<Duration>,
    stats: Arc<Vec<ClientStats>>,
    ready: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    stop: CancellationToken,
}

/// What the line scanner carries from one read to the next.
#[derive(Default)]
struct Scan {
    readings: u64,
    reading_bytes: u64,
    other_events: u64,
    last_id: u64,
    skipped: u64,
    repeated: u64,
    cuts: u64,
    /// The `id:` of the event being read, until its `event:` line.
    pending_id: Option<u64>,
    /// Bytes of the event being read so far.
    event_bytes: u64,
    /// The event being read is a reading.
    in_reading: bool,
}

/// How a stream ended.
enum End {
    Stopped,
    Cut,
    Ended,
    Shutdown,
}

/// Returns the first error, if any.
async fn sse_client(c: SseClient) -> Option<String> {
    let mut buf = vec![0u8; READ_BUF];
    let mut scan = Scan::default();
    let mut first_error = None;
    let mut reconnects = 0u64;
    let mut first = true;
    loop {
        let outcome = sse_session(&c, &mut buf, &mut scan, first).await;
        first = false;
        let s = &c.stats[c.idx];
        publish_scan(s, &scan);
        match outcome {
            Ok(End::Stopped) | Ok(End::Shutdown) => break,
            Ok(End::Cut) => {}
            Ok(End::Ended) => {
                s.ended.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                first_error.get_or_insert(format!("client {}: {e:#}", c.idx));
                tokio::select! {
                    _ = c.stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
        if c.stop.is_cancelled() {
            break;
        }
        reconnects += 1;
        s.reconnects.store(reconnects, Ordering::Relaxed);
        if reconnects >= MAX_RECONNECTS {
            first_error.get_or_insert(format!("client {}: {MAX_RECONNECTS} reconnects", c.idx));
            break;
        }
    }
    first_error
}

fn publish_scan(s: &ClientStats, scan: &Scan) {
    s.readings.store(scan.readings, Ordering::Relaxed);
    s.reading_bytes.store(scan.reading_bytes, Ordering::Relaxed);
    s.other_events.store(scan.other_events, Ordering::Relaxed);
    s.last_id.store(scan.last_id, Ordering::Relaxed);
    s.skipped.store(scan.skipped, Ordering::Relaxed);
    s.repeated.store(scan.repeated, Ordering::Relaxed);
    s.cuts.store(scan.cuts, Ordering::Relaxed);
}

async fn sse_session(
    c: &SseClient,
    buf: &mut [u8],
    scan: &mut Scan,
    first: bool,
) -> anyhow::Result<End> {
    let permit = c.gate.acquire().await.context("connect gate closed")?;
    let resume = (scan.last_id > 0).then_some(scan.last_id);
    let last = resume.map_or(String::new(), |id| format!("Last-Event-ID: {id}\r\n"));
    let headers = format!("{last}User-Agent: telebridge-soak-bench\r\n");
    let opened = tokio::select! {
        _ = c.stop.cancelled() => return Ok(End::Stopped),
        r = timeout(HANDSHAKE_TIMEOUT, open_sse(c.addr, "/events", &headers, buf)) => r,
    };
    let (mut stream, mut filled) = opened.context("no response to GET /events within 10 s")??;
    drop(permit);
    if first {
        c.ready.fetch_add(1, Ordering::AcqRel);
    }
    scan.pending_id = None;
    scan.event_bytes = 0;
    scan.in_reading = false;
    if let Some(end) = scan_lines(buf, &mut filled, scan) {
        return Ok(end);
    }
    loop {
        let n = tokio::select! {
            biased;
            _ = c.stop.cancelled() => return Ok(End::Stopped),
            r = stream.read(&mut buf[filled..]) => r.context("reading the stream")?,
        };
        if n == 0 {
            return Ok(End::Ended);
        }
        filled += n;
        if let Some(end) = scan_lines(buf, &mut filled, scan) {
            return Ok(end);
        }
        publish_scan(&c.stats[c.idx], scan);
        if let Some(pause) = c.lazy {
            tokio::select! {
                _ = c.stop.cancelled() => return Ok(End::Stopped),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
}

/// Consumes every complete line in `buf[..filled]` and moves the partial last line to the
/// front. The daemon writes whole events per chunk, so chunk-size lines fall between events
/// (and never start like an SSE field); `0` is the last chunk: the stream is over.
fn scan_lines(buf: &mut [u8], filled: &mut usize, scan: &mut Scan) -> Option<End> {
    let mut start = 0;
    let mut end = None;
    while let Some(i) = find_byte(&buf[start..*filled], b'\n') {
        let line = &buf[start..start + i];
        scan.event_bytes += i as u64 + 1;
        if let Some(id) = line.strip_prefix(b"id: ") {
            scan.pending_id = leading_u64(id);
        } else if let Some(kind) = line.strip_prefix(b"event: ") {
            // An id, on any kind of event (readings only, or every kind, depending on the
            // build), must be one above the last: all kinds are watched.
            let mut repeat = false;
            if let Some(id) = scan.pending_id.take() {
                if id <= scan.last_id {
                    scan.repeated += 1;
                    repeat = true;
                } else {
                    scan.skipped += id - scan.last_id - 1;
                    scan.last_id = id;
                }
            }
            if kind == b"reading" {
                if !repeat {
                    scan.readings += 1;
                }
                scan.in_reading = true;
            } else if kind == b"shutdown" {
                end = Some(End::Shutdown);
            } else if !repeat {
                scan.other_events += 1;
            }
        } else if line.is_empty() {
            // The blank line that ends an event: its size, from its first line on.
            if scan.in_reading {
                scan.reading_bytes += scan.event_bytes;
            }
            scan.in_reading = false;
            scan.event_bytes = 0;
        } else if line.starts_with(b": too slow") {
            scan.cuts += 1;
            end.get_or_insert(End::Cut);
        } else if line == b"0\r" {
            end.get_or_insert(End::Ended);
        } else if line.ends_with(b"\r") {
            // A chunk-size line or a chunk's closing CRLF: not part of an event.
            scan.event_bytes = 0;
        }
        start += i + 1;
        if end.is_some() {
            break;
        }
    }
    buf.copy_within(start..*filled, 0);
    *filled -= start;
    if *filled == buf.len() {
        // A line longer than the buffer: not an event of ours; drop it.
        *filled = 0;
    }
    end
}
