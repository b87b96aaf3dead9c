//! Command round-trip benchmark: WebSocket → daemon → broker → device → broker → daemon →
//! WebSocket, on loopback.
//!
//! ```text
//! cargo bench --bench commands [-- --commands 10000 --concurrency 1]
//! ```
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
    AnsweringDevice, Daemon, HANDSHAKE_TIMEOUT, Machine, Mosquitto, Ws, connect_ws, cpu_snapshot,
    daemon_binary, fmt_ms, get_text, load_average, metric, modified, mqtt_connect, mqtt_options,
    number, path_value, percentile, ws_json,
};
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use rumqttc::{Event, LastWill, Packet, QoS};
use serde_json::Value;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: cargo bench --bench commands [-- OPTIONS]

  --commands N      measured commands (default 10000)
  --concurrency N   commands in flight at once on the one WebSocket (default 1: sequential)
  --warmup N        warm-up commands, not measured (default 200)
  --seconds N       cap on the whole measured run (default 300)
  --no-announce     the device does not publish its retained `online` first (the daemon
                    then knows it only from its answers)
  --daemon PATH     the telebridge binary to run (default: the release build)";

const DEVICE: &str = "bench-dev";
/// Longer than the daemon's `[commands] timeout` (30 s), which answers `timeout` itself.
const REPLY_TIMEOUT: Duration = Duration::from_secs(35);
/// Target from PRODUCT.md.
const TARGET_P99_MS: f64 = 10.0;

fn main() -> ExitCode {
    match common::parse_args(USAGE, Args::parse, |a| a.help) {
        ControlFlow::Continue(args) => common::run_to_exit(run(&args)),
        ControlFlow::Break(code) => code,
    }
}

#[derive(Debug)]
struct Args {
    help: bool,
    commands: u64,
    concurrency: u64,
    warmup: u64,
    seconds: u64,
    announce: bool,
    daemon: Option<PathBuf>,
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
                other => bail!("unknown argument {other:?}"),
            }
        }
        Ok(out)
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let bin = daemon_binary(args.daemon.as_deref())?;
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

    let daemon = Daemon::start(
        &bin,
        broker.port,
        &format!("commands-{}", std::process::id()),
    )
    .await?;
    let device = fake_device(broker.port, DEVICE, args.announce).await?;
    if args.announce {
        wait_online(&daemon, DEVICE).await?;
    }
    let mut ws = connect_ws(daemon.addr).await?;

    if args.warmup > 0 {
        eprintln!("-- warm-up: {} commands", args.warmup);
        let deadline = Instant::now() + Duration::from_secs(args.seconds);
        let w = drive(&mut ws, 0, args.warmup, args.concurrency, deadline).await?;
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
    let pids = [daemon.pid(), broker.pid(), std::process::id()];
    let cpu0 = cpu_snapshot(pids);
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut r = drive(
        &mut ws,
        args.warmup,
        args.commands,
        args.concurrency,
        deadline,
    )
    .await?;
    let wall = t0.elapsed().as_secs_f64().max(1e-6);
    let cpu1 = cpu_snapshot(pids);
    let cpu_pct = |i: usize| 100.0 * (cpu1[i] - cpu0[i]) / wall;
    let other_cpu = (cpu_pct(3) - cpu_pct(0) - cpu_pct(1) - cpu_pct(2)).max(0.0);
    let _ = ws.close(None).await;
    let metrics = daemon.metrics().await.unwrap_or_default();
    let answered = device.answered.load(Ordering::Relaxed);
    device.stop().await;

    r.latency_us.sort_unstable();
    r.accepted_us.sort_unstable();
    r.server_rtt_ms.sort_unstable_by(f64::total_cmp);
    let ms = |v: &[u32], p: f64| percentile(v, p).map(|us| us as f64 / 1000.0);
    let p99 = ms(&r.latency_us, 0.99);

    println!(
        "## round trip: {} commands, concurrency {}",
        args.commands, args.concurrency
    );
    println!();
    println!(
        "| commands | acked ok | errors | timeouts | queued | wall s | commands/s | p50 ms | p90 ms | p99 ms | max ms | send->accepted p50 / p99 ms | server rtt_ms p50 / p99 | daemon CPU % | broker CPU % | bench CPU % | other processes CPU % | p99 < 10 ms |"
    );
    println!("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|");
    println!(
        "| {} | {} | {} | {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} / {} | {} / {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
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
        cpu_pct(1),
        cpu_pct(2),
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
         \"other processes\" is the machine's busy time minus daemon, broker and bench.",
        machine.nproc
    );
    println!(
        "server rtt_ms: the daemon's own measure, from handing the command to its MQTT client to \
         the commit of the device's answer (the `ack` frame's rtt_ms)."
    );
    println!(
        "daemon counters: commands_accepted_total {}, finished acked {}, command_errors_total {}; \
         device answered {answered} commands in all (warm-up included)",
        metric(&metrics, "telebridge_commands_accepted_total").unwrap_or(-1.0),
        labelled(&metrics, "telebridge_commands_finished_total", "acked").unwrap_or(-1.0),
        metric(&metrics, "telebridge_command_errors_total").unwrap_or(-1.0),
    );
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
        "- commands: round trip p99 {} (target < {TARGET_P99_MS} ms on loopback), {} of {} acked => {}",
        fmt_ms(p99),
        r.ok,
        args.commands,
        if p99.is_some_and(|p| p < TARGET_P99_MS) && r.ok == args.commands {
            "MET"
        } else {
            "NOT MET"
        }
    );
    drop(daemon);
    drop(broker);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The WebSocket client
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Driven {
    /// Commands that got their final answer (ack, error, timeout or expiry).
    done: u64,
    ok: u64,
    errors: u64,
    timeouts: u64,
    /// `accepted` with a status other than `sent`.
    queued: u64,
    latency_us: Vec<u32>,
    accepted_us: Vec<u32>,
    server_rtt_ms: Vec<f64>,
    first_problem: Option<String>,
}

/// Sends `count` commands with refs from `first_ref`, keeping `concurrency` in flight, and
/// times each from its send to its `ack`. Stops at `deadline` with what it has.
async fn drive(
    ws: &mut Ws,
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
        send_command(ws, first_ref + next, &mut sent).await?;
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
                send_command(ws, first_ref + next, &mut sent).await?;
                next += 1;
            }
        }
    }
    Ok(out)
}

async fn send_command(
    ws: &mut Ws,
    reference: u64,
    sent: &mut HashMap<u64, Instant>,
) -> anyhow::Result<()> {
    let text =
        format!(r#"{{"type":"command","device":"{DEVICE}","name":"ping","ref":{reference}}}"#);
    sent.insert(reference, Instant::now());
    timeout(HANDSHAKE_TIMEOUT, ws.send(Message::text(text)))
        .await
        .context("sending a command timed out")?
        .context("sending a command")?;
    Ok(())
}

/// Waits until the daemon lists the device as online (its retained `online` was committed).
async fn wait_online(daemon: &Daemon, device: &str) -> anyhow::Result<()> {
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

// ---------------------------------------------------------------------------------------
// The fake device
// ---------------------------------------------------------------------------------------

/// Connects the fake device (last will `offline` on its status topic), subscribes, announces
/// `online` if asked, and answers every command with `{"id":..,"ok":true}`.
async fn fake_device(port: u16, device: &str, announce: bool) -> anyhow::Result<AnsweringDevice> {
    let commands = format!("devices/{device}/commands");
    let status = format!("devices/{device}/status");
    let mut opts = mqtt_options(&format!("{device}-{}", std::process::id()), port);
    opts.set_last_will(LastWill::new(&status, "offline", QoS::AtLeastOnce, true));
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
    Ok(AnsweringDevice::spawn(
        client,
        eventloop,
        device,
        CancellationToken::new(),
        |id| serde_json::json!({"id": id, "ok": true}).to_string(),
    ))
}

// ---------------------------------------------------------------------------------------
// Report helpers
// ---------------------------------------------------------------------------------------

fn percentile_f(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The value of a Prometheus sample with one `status` label.
fn labelled(text: &str, name: &str, status: &str) -> Option<f64> {
    let prefix = format!("{name}{{status=\"{status}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------
