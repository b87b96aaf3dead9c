//! Command round-trip benchmark: WebSocket → daemon → broker → device → broker → daemon →
//! WebSocket, on loopback.
//!
//! ```text
//! cargo bench --bench commands [-- --commands 10000 --concurrency 1]
//! cargo bench --bench commands -- --backend postgres --instances 2 [--commands N ...]
//! ```
//!
//! With `--backend postgres` the daemons store in a fresh database on a PostgreSQL cluster
//! the bench starts itself (`common::PgCluster`), all in shared group `tb`. With
//! `--instances N` (N >= 2) the WebSocket is on instance A, which stores and publishes the
//! commands, and A's `[topics] ack` is `nobody/{device}/commands/ack`, which nobody
//! publishes to: only the other instances subscribe to the real ack topic, so every ack is
//! stored by one of them and reaches A's WebSocket through the shared log (B's commit,
//! NOTIFY, A's tail). That is the cross-instance round trip.
//!
//! It starts a private Mosquitto and the release daemon (`target/release/telebridge`), a fake
//! device (a rumqttc client with TCP_NODELAY on `devices/bench-dev/commands` that answers
//! every command at once on `devices/bench-dev/commands/ack` with `{"id":..,"ok":true}`) and
//! one WebSocket client (TCP_NODELAY) that sends `{"type":"command","device":"bench-dev",
//! "name":"ping","ref":N}` and times each command from the send to the `ack` with the same
//! id (the `accepted` reply maps the id to the ref). 200 warm-up commands, then
//! `--commands` measured ones, `--concurrency` in flight (1: strictly sequential). Every wait
//! is bounded; everything started is stopped by Drop guards (children by their pid).

mod common;

use common::{
    Backend, Daemon, Machine, Mosquitto, PgCluster, PgSnapshot, Placement, ack_ok, connect_ws,
    cpu_seconds, cpu_seconds_of, daemon_binary, drive, fake_device, fmt_ms, load_average,
    machine_busy_seconds, metric, modified, number, path_value, percentile, percentile_f,
    stop_and_discard, wait_online,
};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

const USAGE: &str = "usage: cargo bench --bench commands [-- OPTIONS]

  --commands N      measured commands (default 10000)
  --concurrency N   commands in flight at once on the one WebSocket (default 1: sequential)
  --warmup N        warm-up commands, not measured (default 200)
  --seconds N       cap on the whole measured run (default 300)
  --no-announce     the device does not publish its retained `online` first (the daemon
                    then knows it only from its answers)
  --daemon PATH     the telebridge binary to run (default: the release build)
  --backend B       sqlite (default) or postgres: a fresh database on a PostgreSQL 15 cluster
                    this bench starts and stops itself
  --instances N     daemons on that database in one shared group (postgres; default 1): the
                    WebSocket on instance A, whose ack topic nobody uses; the acks are stored
                    by the others and reach A's socket through the shared log
  --compare-backends  the same commands on SQLite x1, PostgreSQL x1 and PostgreSQL x N
                    (--instances, default 2; acks stored by another instance than A), back to
                    back on one broker and cluster, then the latencies side by side";

const DEVICE: &str = "bench-dev";
/// Target from PRODUCT.md.
const TARGET_P99_MS: f64 = 10.0;

fn main() -> ExitCode {
    match common::parse_args(USAGE, Args::parse, |a| a.help) {
        ControlFlow::Continue(args) => common::run_to_exit(run(&args)),
        ControlFlow::Break(code) => code,
    }
}

#[derive(Debug, Clone)]
struct Args {
    help: bool,
    commands: u64,
    concurrency: u64,
    warmup: u64,
    seconds: u64,
    announce: bool,
    daemon: Option<PathBuf>,
    backend: Backend,
    instances: usize,
    /// SQLite x1, PostgreSQL x1 and PostgreSQL x N (ack on another instance) back to back.
    compare: bool,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut out = Args {
            help: false,
            commands: 10_000,
            concurrency: 1,
            warmup: 200,
            seconds: 300,
            announce: true,
            daemon: None,
            backend: Backend::Sqlite,
            instances: 1,
            compare: false,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // `cargo bench` passes --bench to harness = false targets.
                "--bench" => {}
                "-h" | "--help" => out.help = true,
                "--commands" => out.commands = number("--commands", args.next(), 1, 10_000_000)?,
                "--concurrency" => {
                    out.concurrency = number("--concurrency", args.next(), 1, 1000)?;
                }
                "--warmup" => out.warmup = number("--warmup", args.next(), 0, 1_000_000)?,
                "--seconds" => out.seconds = number("--seconds", args.next(), 1, 3600)?,
                "--daemon" => out.daemon = Some(path_value("--daemon", args.next())?),
                "--no-announce" => out.announce = false,
                "--backend" => out.backend = Backend::parse(args.next())?,
                "--instances" => {
                    out.instances = number("--instances", args.next(), 1, 16)? as usize
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

/// Starts the daemons: one on SQLite, or `args.instances` on a fresh PostgreSQL database in
/// one shared group; with more than one, A's ack topic is one nobody publishes to.
async fn start_instances(
    bin: &std::path::Path,
    broker: &Mosquitto,
    pg: Option<&PgCluster>,
    args: &Args,
) -> anyhow::Result<Vec<Daemon>> {
    // Distinct per setup, so a compare run's setups never share a client id or database.
    let tag = format!(
        "commands-{}{}-{}",
        match args.backend {
            Backend::Sqlite => "sq",
            Backend::Postgres => "pg",
        },
        args.instances,
        std::process::id()
    );
    let Some(pg) = pg.filter(|_| args.backend == Backend::Postgres) else {
        return Ok(vec![Daemon::start(bin, broker.port, &tag).await?]);
    };
    let url = pg
        .create_database(&format!("tb_{}", tag.replace('-', "_")))
        .await?;
    let mut daemons = Vec::new();
    for i in 0..args.instances {
        let placement = if i == 0 && args.instances > 1 {
            Placement::postgres(&url).with_unused(&["ack"])
        } else {
            Placement::postgres(&url)
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

/// CPU seconds so far of instance A, the others, the broker, PostgreSQL, this process and
/// the machine's busy time.
fn cpu_now(daemons: &[Daemon], broker: &Mosquitto, pg: Option<&PgCluster>) -> [f64; 6] {
    let others: Vec<u32> = daemons.iter().skip(1).map(Daemon::pid).collect();
    [
        cpu_seconds(daemons[0].pid()),
        cpu_seconds_of(&others),
        cpu_seconds(broker.pid()),
        pg.map_or(0.0, PgCluster::cpu_seconds),
        cpu_seconds(std::process::id()),
        machine_busy_seconds(),
    ]
}

/// The report line on where the daemons of `args` store and where the acks land.
fn describe_storage(args: &Args) -> String {
    match (args.backend, args.instances) {
        (Backend::Sqlite, _) => {
            "SQLite ([storage] path in the daemon's temp dir), one daemon".to_owned()
        }
        (Backend::Postgres, 1) => format!(
            "PostgreSQL x1 (a fresh database), [mqtt] shared_group = \"{}\"",
            common::SHARED_GROUP
        ),
        (Backend::Postgres, n) => format!(
            "PostgreSQL x{n} on one fresh database, all in [mqtt] shared_group = \"{}\": the \
                 WebSocket on instance A, which stores and publishes each command; A's [topics] ack = \
                 nobody/{{device}}/commands/ack (nobody publishes there), so the device's acks are \
                 stored by {} and reach A's socket through the shared log",
            common::SHARED_GROUP,
            if n == 2 {
                "instance B"
            } else {
                "instances B.. (the group deals them out)"
            }
        ),
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let bin = daemon_binary(args.daemon.as_deref())?;
    let setups: Vec<Args> = if args.compare {
        let with = |backend, instances| Args {
            backend,
            instances,
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
    let pg = match setups.iter().any(|s| s.backend == Backend::Postgres) {
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
    println!("# telebridge command round-trip benchmark (WebSocket -> device -> WebSocket)");
    println!("machine:    {}", machine.describe());
    println!("daemon:     {} (built {})", bin.display(), modified(&bin));
    println!(
        "            [broker] mode=external, [commands] rate_limit=100000, [http] max_sse_clients=20000 \
         max_streams_per_ip=20000 sse_buffer=262144, [log] level=warn, other keys default"
    );
    println!("{}", broker.describe());
    if let Some(pg) = &pg {
        println!("{}", pg.describe());
    }
    for setup in &setups {
        println!("storage:    {}", describe_storage(setup));
    }
    println!(
        "device:     rumqttc, TCP_NODELAY, subscribed to devices/{DEVICE}/commands (QoS 1), answers \
         each at once on devices/{DEVICE}/commands/ack (QoS 1) with {{\"id\":..,\"ok\":true}}; {}",
        if args.announce {
            "announced `online` (retained) first"
        } else {
            "never announced online (--no-announce)"
        }
    );
    println!(
        "client:     one WebSocket (tokio-tungstenite, TCP_NODELAY); {} warm-up + {} measured \
         commands, {} in flight; latency = send of the command frame -> receipt of its `ack`",
        args.warmup, args.commands, args.concurrency
    );
    println!(
        "everything shares this machine's cores; load average at start {}",
        load_average()
    );
    println!();

    let mut summaries = Vec::new();
    for setup in &setups {
        eprintln!("== {} x{}", setup.backend.name(), setup.instances);
        let result = match start_instances(&bin, &broker, pg.as_ref(), setup).await {
            Ok(daemons) => {
                let result = measure(setup, &daemons, &broker, pg.as_ref(), &machine).await;
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
                if !problems.is_empty() {
                    println!(
                        "daemon logs: {} warning/error line(s); the first: {}",
                        problems.len(),
                        problems
                            .iter()
                            .take(3)
                            .map(|l| format!("{l:.300}"))
                            .collect::<Vec<_>>()
                            .join(" | ")
                    );
                }
                result
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            eprintln!(
                "{} x{} failed: {e:#}",
                setup.backend.name(),
                setup.instances
            );
        }
        summaries.push((setup, result));
    }
    if args.compare {
        print_side_by_side(&summaries);
    }
    drop(broker);
    drop(pg);
    // The first failure, if any, is the bench's outcome.
    for (_, r) in summaries {
        r?;
    }
    Ok(())
}

/// What one setup measured, for the side-by-side table.
struct Summary {
    commands: u64,
    ok: u64,
    p50: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    accepted_p99: Option<f64>,
    server_p99: Option<f64>,
    cpu: [f64; 6],
}

fn print_side_by_side(summaries: &[(&Args, anyhow::Result<Summary>)]) {
    println!();
    println!("## side by side: command round trip (send -> ack on the WebSocket)");
    println!();
    println!(
        "| setup | acked / commands | p50 ms | p99 ms | max ms | send->accepted p99 ms | server rtt_ms p99 | daemon (A) CPU % | other instances CPU % | postgres CPU % | broker CPU % | p99 < 10 ms |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|");
    for (setup, r) in summaries {
        let label = format!(
            "{} x{}{}",
            setup.backend.name(),
            setup.instances,
            if setup.instances > 1 {
                ", ack stored by B (cross-instance)"
            } else {
                ""
            }
        );
        match r {
            Ok(s) => println!(
                "| {label} | {} / {} | {} | **{}** | {} | {} | {} | {:.0} | {} | {} | {:.0} | {} |",
                s.ok,
                s.commands,
                fmt_ms(s.p50),
                fmt_ms(s.p99),
                fmt_ms(s.max),
                fmt_ms(s.accepted_p99),
                fmt_ms(s.server_p99),
                s.cpu[0],
                if setup.instances > 1 {
                    format!("{:.0}", s.cpu[1])
                } else {
                    "-".into()
                },
                if setup.backend == Backend::Postgres {
                    format!("{:.0}", s.cpu[3])
                } else {
                    "-".into()
                },
                s.cpu[2],
                if s.p99.is_some_and(|p| p < TARGET_P99_MS) && s.ok == s.commands {
                    "yes"
                } else {
                    "NO"
                }
            ),
            Err(e) => println!("| {label} | failed: {e:#} |"),
        }
    }
}

async fn measure(
    args: &Args,
    daemons: &[Daemon],
    broker: &Mosquitto,
    pg: Option<&PgCluster>,
    machine: &Machine,
) -> anyhow::Result<Summary> {
    let daemon = &daemons[0];
    let pg = pg.filter(|_| args.backend == Backend::Postgres);
    let device = fake_device(
        broker.port,
        DEVICE,
        args.announce,
        tokio_util::sync::CancellationToken::new(),
        ack_ok,
    )
    .await?;
    if args.announce {
        wait_online(daemon, DEVICE).await?;
    }
    let mut ws = connect_ws(daemon.addr).await?;

    if args.warmup > 0 {
        eprintln!("-- warm-up: {} commands", args.warmup);
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let w = drive(&mut ws, DEVICE, 0, args.warmup, args.concurrency, deadline).await?;
        if w.done < args.warmup {
            bail!(
                "warm-up: only {} of {} commands finished: {}",
                w.done,
                args.warmup,
                w.first_problem.as_deref().unwrap_or("-")
            );
        }
    }
    eprintln!("-- measuring: {} commands", args.commands);
    let pg_0 = PgSnapshot::take(pg, daemon.pg_url.as_deref()).await?;
    let cpu0 = cpu_now(daemons, broker, pg);
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut r = drive(
        &mut ws,
        DEVICE,
        args.warmup,
        args.commands,
        args.concurrency,
        deadline,
    )
    .await?;
    let wall = t0.elapsed().as_secs_f64().max(1e-6);
    let cpu1 = cpu_now(daemons, broker, pg);
    let cpu_pct = |i: usize| 100.0 * (cpu1[i] - cpu0[i]) / wall;
    let other_cpu = (cpu_pct(5) - (0..5).map(cpu_pct).sum::<f64>()).max(0.0);
    let _ = ws.close(None).await;
    let metrics = daemon.metrics().await.unwrap_or_default();
    let mut others_metrics = Vec::new();
    for d in &daemons[1..] {
        others_metrics.push(d.metrics().await.unwrap_or_default());
    }
    let (pg_stats, pg_top) = PgSnapshot::since(pg_0, pg, daemon.pg_url.as_deref(), 8).await?;
    let answered = device.answered.load(Ordering::Relaxed);
    device.stop().await;

    r.latency_us.sort_unstable();
    r.accepted_us.sort_unstable();
    r.server_rtt_ms.sort_unstable_by(f64::total_cmp);
    let ms = |v: &[u32], p: f64| percentile(v, p).map(|us| us as f64 / 1000.0);
    let p99 = ms(&r.latency_us, 0.99);

    let cross = daemons.len() > 1;
    println!(
        "## round trip on {} x{}{}: {} commands, concurrency {}",
        args.backend.name(),
        daemons.len(),
        if cross {
            ", ack stored by another instance than the WebSocket's"
        } else {
            ""
        },
        args.commands,
        args.concurrency
    );
    println!();
    println!(
        "| commands | acked ok | errors | timeouts | queued | wall s | commands/s | p50 ms | p90 ms | p99 ms | max ms | send->accepted p50 / p99 ms | server rtt_ms p50 / p99 | daemon (A) CPU % | other instances CPU % | postgres CPU % | broker CPU % | bench CPU % | other processes CPU % | p99 < 10 ms |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|");
    println!(
        "| {} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} / {} | {} / {} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {} |",
        args.commands,
        r.ok,
        r.errors,
        r.timeouts,
        r.queued,
        wall,
        r.done as f64 / wall,
        fmt_ms(ms(&r.latency_us, 0.50)),
        fmt_ms(ms(&r.latency_us, 0.90)),
        fmt_ms(p99),
        fmt_ms(r.latency_us.last().map(|&us| us as f64 / 1000.0)),
        fmt_ms(ms(&r.accepted_us, 0.50)),
        fmt_ms(ms(&r.accepted_us, 0.99)),
        fmt_ms(percentile_f(&r.server_rtt_ms, 0.50)),
        fmt_ms(percentile_f(&r.server_rtt_ms, 0.99)),
        cpu_pct(0),
        if cross {
            format!("{:.0}", cpu_pct(1))
        } else {
            "-".into()
        },
        if pg.is_some() {
            format!("{:.0}", cpu_pct(3))
        } else {
            "-".into()
        },
        cpu_pct(2),
        cpu_pct(4),
        other_cpu,
        if p99.is_some_and(|p| p < TARGET_P99_MS) && r.ok == args.commands {
            "yes"
        } else {
            "NO"
        },
    );
    println!();
    println!(
        "CPU % is of one core over the measured run (100% = one core busy; the machine has {}); \
         postgres = the postmaster and all its processes; \"other processes\" is the machine's busy \
         time minus all the columns before it.",
        machine.nproc
    );
    println!(
        "server rtt_ms: the daemon's own measure, from handing the command to its MQTT client to \
         the commit of the device's answer (the `ack` frame's rtt_ms)."
    );
    println!(
        "daemon counters{}: commands_accepted_total {}, finished acked {}, command_errors_total {}, \
         command_acks_unknown_total {}; device answered {answered} commands in all (warm-up included)",
        if cross { " of instance A" } else { "" },
        metric(&metrics, "telebridge_commands_accepted_total").unwrap_or(-1.0),
        labelled(&metrics, "telebridge_commands_finished_total", "acked").unwrap_or(-1.0),
        metric(&metrics, "telebridge_command_errors_total").unwrap_or(-1.0),
        metric(&metrics, "telebridge_command_acks_unknown_total").unwrap_or(-1.0),
    );
    for (i, m) in others_metrics.iter().enumerate() {
        println!(
            "instance {}: acks it received over MQTT (messages_received_total) {}, finished acked {}, \
             command_acks_unknown_total {}, tail lag {} events",
            (b'B' + i as u8) as char,
            metric(m, "telebridge_messages_received_total").unwrap_or(-1.0),
            labelled(m, "telebridge_commands_finished_total", "acked").unwrap_or(-1.0),
            metric(m, "telebridge_command_acks_unknown_total").unwrap_or(-1.0),
            metric(m, "telebridge_tail_lag_events").unwrap_or(-1.0),
        );
    }
    if let Some(st) = &pg_stats {
        println!("postgres over the measured run: {}", st.describe());
    }
    if let Some((head, rest)) = pg_top.split_first() {
        println!("postgres statements (pg_stat_statements, by execution time): {head}");
        for line in rest {
            println!("  {line}");
        }
    }
    if let Some(p) = &r.first_problem {
        println!("first problem: {p}");
    }
    if r.done < args.commands {
        println!(
            "note: only {} of {} commands finished within --seconds {}",
            r.done, args.commands, args.seconds
        );
    }
    println!();
    println!("## target (PRODUCT.md)");
    println!(
        "- commands{}: round trip p99 {} (target < {TARGET_P99_MS} ms on loopback), {} of {} acked => {}",
        if cross {
            ", ack landing on another instance"
        } else {
            ""
        },
        fmt_ms(p99),
        r.ok,
        args.commands,
        if p99.is_some_and(|p| p < TARGET_P99_MS) && r.ok == args.commands {
            "MET"
        } else {
            "NOT MET"
        }
    );
    println!();
    Ok(Summary {
        commands: args.commands,
        ok: r.ok,
        p50: ms(&r.latency_us, 0.50),
        p99,
        max: r.latency_us.last().map(|&us| us as f64 / 1000.0),
        accepted_p99: ms(&r.accepted_us, 0.99),
        server_p99: percentile_f(&r.server_rtt_ms, 0.99),
        cpu: std::array::from_fn(cpu_pct),
    })
}

// ---------------------------------------------------------------------------------------
// Report helpers
// ---------------------------------------------------------------------------------------

/// The value of a Prometheus sample with one `status` label.
fn labelled(text: &str, name: &str, status: &str) -> Option<f64> {
    let prefix = format!("{name}{{status=\"{status}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------
