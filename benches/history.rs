//! History benchmark (issue #14): reads of a large database through the daemon's HTTP API.
//!
//! ```text
//! cargo bench --bench history [-- --backend sqlite|postgres --readings N --devices D
//!     --samples S --dir PATH]
//! cargo bench --bench history -- --retention [--backend B --retention-readings N
//!     --retention-due N --rate R --idle-seconds S]
//! ```
//!
//! 1. The database: `--readings` (default 100,000,000) readings over `--devices` (default
//!    1,000), one reading a second per device, ending at the time the database is built (each
//!    device covers readings / devices seconds). Each payload is a 100-byte JSON object
//!    (`{"ts":..,"temperature":..,"humidity":..,"battery":..,"pad":"xx.."}`), its `ts` 3 ms
//!    before its receive time. The readings go straight into storage through the library
//!    (`Store::open` and `Writer::run`, in time order, large batches), not through MQTT, so
//!    the writer lays out whatever the schema keeps (rollups included) as the daemon would.
//!    The database stays in `--dir` (default `target/history-bench/`: `history-sqlite.db`,
//!    or a PostgreSQL cluster in `pg-data/`) with a marker (`history-<backend>.json`) that
//!    records what it holds; a later run with the same readings, devices and migrations
//!    reuses it and only measures (`--rebuild` builds it again).
//! 2. The measurement: the release daemon (`target/release/telebridge`) on that database,
//!    against a private Mosquitto, and `--samples` (default 200) sequential HTTP requests of
//!    each kind, after a few warm-up ones: a 100-row history page of a random device from a
//!    random time within its span, a 24-hour, a 7-day and a 30-day series (`step=auto`) ending at the
//!    data's end, and the device list. Latency is the request's send to the last byte of its
//!    body, on loopback. Then the database's size per reading: SQLite: the file and its WAL
//!    (with the split by table and index from `dbstat`); PostgreSQL: `pg_database_size` and
//!    each table's heap and indexes.
//!
//! 3. With `--retention`, instead of 1 and 2: whether a retention pass of millions of rows
//!    stalls ingest. A database of its own, `--retention-readings` (default 5,000,000) over
//!    `--devices`, laid out and built as in 1 but in `DIR/retention/` and anew on every run
//!    (retention eats it). The daemon on it (`[storage] retention_interval` of
//!    `--retention-interval`, default 60 s, whose first tick comes at start-up;
//!    `retention_1m = "365d"`, so no rollup is due), a publisher sending
//!    `--rate` (default 2,000) readings a second at QoS 1 round the same devices, each with
//!    its send time in its pad, and an SSE client timing each one's way back (publish ->
//!    SSE). Three windows, each the delta of `telebridge_store_batch_commit_seconds`: (a)
//!    idle, `--idle-seconds` (default 30) with retention 365d; (b) restarted with a
//!    retention (`"<N>s"`) whose cutoff at start-up is the receive time of reading number
//!    `--retention-due` (default 3,000,000), until `telebridge_retention_deleted_total`
//!    holds every reading due at the first tick (the pass: one tick's loop of 2,000-row
//!    calls; capped at `--pass-seconds`); (c) `--idle-seconds` more on that daemon (its
//!    later ticks delete what comes due meanwhile). Then the readings left are counted.
//!
//! Targets: every query's p99 below 50 ms; at most 150 bytes of database per 100-byte
//! reading; with `--retention`, the commit p99 during the pass within 2x of the idle p99
//! (from bucket bounds). Every loop is bounded (counts, and time caps on generation,
//! requests, publishing and waits); everything started is stopped by Drop guards (children
//! by their pid).

mod common;

use common::{
    Backend, Daemon, HANDSHAKE_TIMEOUT, Machine, Mosquitto, PgCluster, PgSnapshot, Publisher,
    cpu_seconds, daemon_binary, find_byte, find_subslice, fmt_ms, leading_u64, load_average,
    machine_busy_seconds, metric, modified, number, open_sse, path_value, percentile,
    pg_count_readings, publish_qos1, sqlite_count_readings, thousands,
};
use std::fmt::Write as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use serde_json::{Value, json};
use telebridge::config::StorageConfig;
use telebridge::domain::DeviceId;
use telebridge::feed::Feed;
use telebridge::ingest::{AckSink, AckToken, Item, Reading};
use telebridge::observability::Metrics;
use telebridge::store::{Committed, Store, WriterConfig};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: cargo bench --bench history [-- OPTIONS]

  --backend B       sqlite (default) or postgres: a PostgreSQL 15 cluster this bench starts
                    and stops itself, its data kept in DIR/pg-data
  --readings N      readings in the database (default 100000000)
  --devices D       devices they are spread over, one reading a second each (default 1000)
  --samples S       measured requests of each kind (default 200)
  --warmup N        warm-up requests of each kind, not measured (default 5)
  --dir PATH        where the database is kept between runs (default target/history-bench)
  --rebuild         build the database again even when DIR holds one with these readings
  --batch N         readings per transaction while building (default 50000)
  --build-seconds N cap on building the database (default 14400)
  --seed N          seed of the random devices and times (default 14)
  --daemon PATH     the telebridge binary to run (default: the release build)
  --cold            SQLite: drop the database file from the OS page cache before every
                    request (posix_fadvise DONTNEED), so each one reads from the disk

  --retention       instead of the queries: whether a retention pass stalls ingest, on a
                    database of its own in DIR/retention, built anew each run (below)
  --retention-readings N  readings in that database (default 5000000)
  --retention-due N       of them, how many the pass deletes (default 3000000)
  --rate R          readings a second published over MQTT QoS 1 meanwhile (default 2000)
  --idle-seconds S  length of the idle windows (default 30)
  --pass-seconds S  cap on waiting for the pass to catch up (default 900)
  --retention-interval S  [storage] retention_interval of those daemons, in seconds
                    (default 60, the daemon's own; the first tick comes at start-up)
  --retention-1m D  [storage] retention_1m of those daemons (default 365d; forever: no
                    rollup retention at all)";

/// Targets from issue #14.
const TARGET_P99_MS: f64 = 50.0;
const TARGET_BYTES_PER_READING: f64 = 150.0;
/// Size of each payload.
const PAYLOAD_BYTES: usize = 100;
/// Rows of a history page.
const PAGE_ROWS: u64 = 100;
/// How often building prints its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Building that commits nothing for this long has stalled.
const BUILD_STALL: Duration = Duration::from_secs(180);
/// Longest wait for one HTTP request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Cap on the measuring requests of one kind, warm-up included.
const KIND_CAP: Duration = Duration::from_secs(600);
/// Longest wait for SQLite's dbstat scan (it reads every page).
const DBSTAT_TIMEOUT: Duration = Duration::from_secs(300);
/// The database in the PostgreSQL cluster.
const PG_DATABASE: &str = "history";
/// Readings are received at most this long after their device time.
const DEVICE_LAG_MS: i64 = 3;

fn main() -> ExitCode {
    match common::parse_args(USAGE, Args::parse, |a| a.help) {
        ControlFlow::Continue(args) => common::run_to_exit(run(&args)),
        ControlFlow::Break(code) => code,
    }
}

#[derive(Debug, Clone)]
struct Args {
    help: bool,
    backend: Backend,
    readings: u64,
    devices: u64,
    samples: u64,
    warmup: u64,
    dir: PathBuf,
    rebuild: bool,
    batch: u64,
    build_seconds: u64,
    seed: u64,
    daemon: Option<PathBuf>,
    retention: bool,
    retention_readings: u64,
    retention_due: u64,
    rate: u64,
    idle_seconds: u64,
    pass_seconds: u64,
    retention_interval: u64,
    retention_1m: String,
    cold: bool,
}

impl Args {
    fn parse(mut args: impl Iterator<Item = String>) -> anyhow::Result<Args> {
        let mut out = Args {
            help: false,
            backend: Backend::Sqlite,
            readings: 100_000_000,
            devices: 1_000,
            samples: 200,
            warmup: 5,
            dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/history-bench"),
            rebuild: false,
            batch: 50_000,
            build_seconds: 14_400,
            seed: 14,
            daemon: None,
            retention: false,
            retention_readings: 5_000_000,
            retention_due: 3_000_000,
            rate: 2_000,
            idle_seconds: 30,
            pass_seconds: 900,
            retention_interval: 60,
            retention_1m: "365d".into(),
            cold: false,
        };
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // `cargo bench` passes --bench to harness = false targets.
                "--bench" => {}
                "-h" | "--help" => out.help = true,
                "--backend" => out.backend = Backend::parse(args.next())?,
                "--readings" => {
                    out.readings = number("--readings", args.next(), 1, 10_000_000_000)?;
                }
                "--devices" => out.devices = number("--devices", args.next(), 1, 99_999)?,
                "--samples" => out.samples = number("--samples", args.next(), 1, 1_000_000)?,
                "--warmup" => out.warmup = number("--warmup", args.next(), 0, 10_000)?,
                "--dir" => out.dir = path_value("--dir", args.next())?,
                "--rebuild" => out.rebuild = true,
                "--batch" => out.batch = number("--batch", args.next(), 1, 100_000)?,
                "--build-seconds" => {
                    out.build_seconds = number("--build-seconds", args.next(), 1, 7 * 86_400)?;
                }
                "--seed" => out.seed = number("--seed", args.next(), 0, u64::MAX)?,
                "--daemon" => out.daemon = Some(path_value("--daemon", args.next())?),
                "--retention" => out.retention = true,
                "--cold" => out.cold = true,
                "--retention-readings" => {
                    out.retention_readings =
                        number("--retention-readings", args.next(), 1, 1_000_000_000)?;
                }
                "--retention-due" => {
                    out.retention_due = number("--retention-due", args.next(), 1, 1_000_000_000)?;
                }
                "--rate" => out.rate = number("--rate", args.next(), 1, 100_000)?,
                "--idle-seconds" => {
                    out.idle_seconds = number("--idle-seconds", args.next(), 1, 3_600)?;
                }
                "--pass-seconds" => {
                    out.pass_seconds = number("--pass-seconds", args.next(), 1, 86_400)?;
                }
                "--retention-interval" => {
                    out.retention_interval =
                        number("--retention-interval", args.next(), 1, 86_400)?;
                }
                "--retention-1m" => {
                    out.retention_1m = args
                        .next()
                        .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric()))
                        .context("--retention-1m needs a duration such as 365d, or forever")?;
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        if out.cold && !matches!(out.backend, Backend::Sqlite) {
            bail!("--cold is for SQLite: PostgreSQL keeps its own cache in shared_buffers");
        }
        if out.readings < out.devices {
            bail!(
                "--readings {} is fewer than --devices {}: every device needs a reading",
                out.readings,
                out.devices
            );
        }
        if out.retention {
            if out.retention_readings < out.devices {
                bail!(
                    "--retention-readings {} is fewer than --devices {}",
                    out.retention_readings,
                    out.devices
                );
            }
            if out.retention_due >= out.retention_readings {
                bail!(
                    "--retention-due {} must be fewer than --retention-readings {}",
                    out.retention_due,
                    out.retention_readings
                );
            }
        }
        Ok(out)
    }

    /// Seconds each device covers (the last one may be partly filled).
    fn seconds(&self) -> u64 {
        self.readings.div_ceil(self.devices)
    }
}

// ---------------------------------------------------------------------------------------
// Where the database is, and what it holds
// ---------------------------------------------------------------------------------------

/// What the marker next to a finished database records.
#[derive(Debug, Clone)]
struct Built {
    readings: u64,
    devices: u64,
    /// The receive time of the newest reading (Unix ms): the data's "now".
    end_ms: i64,
    /// A fingerprint of the backend's migrations the database was built with.
    schema: String,
    /// Wall time of the build and its committed readings per second.
    build_seconds: f64,
    batch: u64,
    /// When it was built (Unix ms) and by which commit.
    built_at_ms: i64,
    commit: String,
}

impl Built {
    fn to_json(&self) -> Value {
        json!({
            "readings": self.readings,
            "devices": self.devices,
            "end_ms": self.end_ms,
            "schema": self.schema,
            "build_seconds": self.build_seconds,
            "batch": self.batch,
            "built_at_ms": self.built_at_ms,
            "commit": self.commit,
            "payload_bytes": PAYLOAD_BYTES,
        })
    }

    fn from_json(v: &Value) -> Option<Built> {
        Some(Built {
            readings: v.get("readings")?.as_u64()?,
            devices: v.get("devices")?.as_u64()?,
            end_ms: v.get("end_ms")?.as_i64()?,
            schema: v.get("schema")?.as_str()?.to_owned(),
            build_seconds: v.get("build_seconds")?.as_f64()?,
            batch: v.get("batch")?.as_u64()?,
            built_at_ms: v.get("built_at_ms")?.as_i64()?,
            commit: v.get("commit")?.as_str()?.to_owned(),
        })
        .filter(|_| v.get("payload_bytes").and_then(Value::as_u64) == Some(PAYLOAD_BYTES as u64))
    }

    fn rows_per_second(&self) -> f64 {
        self.readings as f64 / self.build_seconds.max(1e-9)
    }
}

/// The files of one backend's database in `--dir`.
struct Place {
    /// `--dir`, absolute.
    dir: PathBuf,
    backend: Backend,
}

impl Place {
    fn name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    fn marker(&self) -> PathBuf {
        self.dir.join(format!("history-{}.json", self.name()))
    }

    fn sqlite_db(&self) -> PathBuf {
        self.dir.join("history-sqlite.db")
    }

    fn pg_data(&self) -> PathBuf {
        self.dir.join("pg-data")
    }

    /// On PostgreSQL, the bench's own cluster on `pg_data()` (initdb'd when new), with the
    /// bench database created when `create`; nothing on SQLite.
    async fn start_pg(&self, create: bool) -> anyhow::Result<Option<PgCluster>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        eprintln!(
            "starting a PostgreSQL cluster of our own on {} (initdb if new, pg_ctl start)",
            self.pg_data().display()
        );
        let data = self.pg_data();
        let pg = tokio::task::spawn_blocking(move || PgCluster::start_kept(&data))
            .await
            .context("the PostgreSQL start-up panicked")??;
        if create {
            pg.create_database(PG_DATABASE).await?;
        }
        Ok(Some(pg))
    }

    fn read_marker(&self) -> Option<Built> {
        let text = std::fs::read_to_string(self.marker()).ok()?;
        Built::from_json(&serde_json::from_str(&text).ok()?)
    }

    /// Removes the database and its marker (the marker first: a half-removed database is
    /// never taken for a finished one).
    fn wipe(&self) -> anyhow::Result<()> {
        let marker = self.marker();
        if marker.exists() {
            std::fs::remove_file(&marker)
                .with_context(|| format!("removing {}", marker.display()))?;
        }
        match self.backend {
            Backend::Sqlite => {
                for suffix in ["", "-wal", "-shm"] {
                    let p = PathBuf::from(format!("{}{suffix}", self.sqlite_db().display()));
                    if p.exists() {
                        std::fs::remove_file(&p)
                            .with_context(|| format!("removing {}", p.display()))?;
                    }
                }
            }
            Backend::Postgres => {
                let data = self.pg_data();
                if data.exists() {
                    std::fs::remove_dir_all(&data)
                        .with_context(|| format!("removing {}", data.display()))?;
                }
            }
        }
        Ok(())
    }
}

/// A fingerprint of the backend's migrations (names and contents, FNV-1a), so that a
/// database built with another schema is built again rather than measured.
fn schema_fingerprint(backend: Backend) -> anyhow::Result<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(match backend {
        Backend::Sqlite => "migrations/sqlite",
        Backend::Postgres => "migrations/postgres",
    });
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut names = Vec::new();
    for f in &files {
        let name = f
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let body = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        for b in name.as_bytes().iter().chain(&body) {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        names.push(name);
    }
    Ok(format!("{} ({hash:016x})", names.join(" ")))
}

/// The commit HEAD points at, for the marker.
fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "?".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------
// The readings
// ---------------------------------------------------------------------------------------

/// Where every reading falls: reading `i` is device `i % devices` at second `i / devices`,
/// received `phase(device)` ms into that second, so the readings arrive in time order.
#[derive(Debug, Clone, Copy)]
struct Layout {
    devices: u64,
    readings: u64,
    /// The start of second 0 (Unix ms).
    base_ms: i64,
    /// The receive time of the last reading.
    end_ms: i64,
}

impl Layout {
    /// The `--readings` over `--devices`, ending at `end_ms`.
    fn ending_at(args: &Args, end_ms: i64) -> Layout {
        Layout::new(args.readings, args.devices, end_ms)
    }

    /// `readings` over `devices` ending at `end_ms` (the receive time of the last device in
    /// the last second).
    fn new(readings: u64, devices: u64, end_ms: i64) -> Layout {
        let seconds = readings.div_ceil(devices) as i64;
        let last_in_last_second = (readings - 1) % devices;
        let phase = Layout::phase_of(last_in_last_second, devices);
        Layout {
            devices,
            readings,
            base_ms: end_ms - (seconds - 1) * 1000 - phase,
            end_ms,
        }
    }

    fn phase_of(device: u64, devices: u64) -> i64 {
        (device * 1000 / devices) as i64
    }

    fn device_name(d: u64) -> String {
        format!("dev-{d:05}")
    }

    /// Receive time of device `d`'s reading in second `t`.
    fn received_at(&self, d: u64, t: u64) -> i64 {
        self.base_ms + t as i64 * 1000 + Layout::phase_of(d, self.devices)
    }

    /// The first and last receive time of device `d`.
    fn span(&self, d: u64) -> (i64, i64) {
        let seconds = self.readings.div_ceil(self.devices);
        let has_last = (seconds - 1) * self.devices + d < self.readings;
        let last_t = if has_last { seconds - 1 } else { seconds - 2 };
        (self.received_at(d, 0), self.received_at(d, last_t))
    }

    /// How many readings were received before `cutoff` (Unix ms): what retention with that
    /// cutoff deletes.
    fn received_before(&self, cutoff: i64) -> u64 {
        let seconds = self.readings.div_ceil(self.devices);
        (0..self.devices)
            .map(|d| {
                let held = if (seconds - 1) * self.devices + d < self.readings {
                    seconds
                } else {
                    seconds - 1
                };
                let first = self.received_at(d, 0);
                if cutoff <= first {
                    0
                } else {
                    ((cutoff - first) as u64).div_ceil(1000).min(held)
                }
            })
            .sum()
    }
}

/// A small, fast, seeded generator (SplitMix64): the same devices and times on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The 100-byte payload of device `d`'s reading at device time `ts`, second `t`: values that
/// drift smoothly with a little noise, padded with `x` to exactly [`PAYLOAD_BYTES`].
fn payload(buf: &mut String, rng: &mut Rng, d: u64, t: u64, ts: i64) -> Bytes {
    let hours = t as f64 / 3600.0;
    let phase = d as f64 * 0.37;
    let temperature = 21.0
        + 4.0 * (hours * std::f64::consts::TAU / 24.0 + phase).sin()
        + (rng.unit() - 0.5) * 0.2;
    let humidity = 45.0
        + 10.0 * (hours * std::f64::consts::TAU / 24.0 + phase).cos()
        + (rng.unit() - 0.5) * 0.5;
    let battery = 100.0 - (t % 360_000) as f64 / 4000.0 - (d % 7) as f64;
    padded_reading(buf, ts, [temperature, humidity, battery], "")
}

/// `{"ts", "temperature", "humidity", "battery", "pad"}` of PAYLOAD_BYTES, the pad starting
/// with `pad_start`.
fn padded_reading(buf: &mut String, ts: i64, [t, h, b]: [f64; 3], pad_start: &str) -> Bytes {
    buf.clear();
    let _ = write!(
        buf,
        "{{\"ts\":{ts},\"temperature\":{t:.2},\"humidity\":{h:.1},\"battery\":{b:.1},\"pad\":\"{pad_start}"
    );
    // The closing `"}`.
    let pad = PAYLOAD_BYTES.saturating_sub(buf.len() + 2);
    buf.extend(std::iter::repeat_n('x', pad));
    buf.push_str("\"}");
    Bytes::copy_from_slice(buf.as_bytes())
}

/// Acknowledges nothing: the readings come from no broker.
struct NoAcks;

impl AckSink for NoAcks {
    fn ack(&mut self, tokens: &mut Vec<AckToken>) {
        tokens.clear();
    }
}

/// Builds the database: every reading through the library's writer, in time order.
async fn build(args: &Args, storage: &StorageConfig, layout: Layout) -> anyhow::Result<f64> {
    let mut storage = storage.clone();
    storage.batch_size = args.batch as usize;
    storage.batch_delay = Duration::ZERO;
    let (store, writer) = Store::open(&storage)
        .await
        .with_context(|| format!("opening storage at {}", storage.describe()))?;
    let metrics = Arc::new(Metrics::default());
    let (last_seq, _last_seq_rx) = watch::channel(store.opened_at());
    let (changes, _changes_rx) = mpsc::channel(4096);
    let committed = Committed {
        last_seq,
        feed: Feed::new(1024),
        commands: changes,
        alerts: telebridge::alerts::Input::new(false).0,
    };
    let (items_tx, items_rx) = mpsc::channel::<Item>(args.batch as usize * 2);
    let shutdown = CancellationToken::new();
    let writer_task = tokio::spawn(writer.run(
        WriterConfig::from(&storage),
        items_rx,
        Box::new(NoAcks),
        metrics.clone(),
        committed,
        shutdown.clone(),
    ));
    // The producer: an OS thread of its own, blocking on the bounded queue.
    let stop = Arc::new(AtomicBool::new(false));
    // Dropped when the producer ends, however it ends.
    let (produced_tx, mut produced_rx) = tokio::sync::oneshot::channel::<()>();
    let producer = {
        let stop = stop.clone();
        let seed = args.seed;
        std::thread::Builder::new()
            .name("history-producer".into())
            .spawn(move || -> anyhow::Result<()> {
                let _produced = produced_tx;
                let devices: Vec<(DeviceId, Arc<str>)> = (0..layout.devices)
                    .map(|d| {
                        let name = Layout::device_name(d);
                        let topic: Arc<str> = Arc::from(format!("devices/{name}/telemetry"));
                        DeviceId::parse(&name).map(|id| (id, topic))
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|e| anyhow!("device id: {e}"))?;
                let mut rng = Rng(seed ^ 0x5eed);
                let mut buf = String::with_capacity(PAYLOAD_BYTES + 16);
                for i in 0..layout.readings {
                    if i % 4096 == 0 && stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (d, t) = (i % layout.devices, i / layout.devices);
                    let (id, topic) = &devices[d as usize];
                    let received_at = layout.received_at(d, t);
                    let ts = received_at - DEVICE_LAG_MS;
                    let reading = Reading {
                        device: id.clone(),
                        topic: topic.clone(),
                        ts,
                        received_at,
                        payload: payload(&mut buf, &mut rng, d, t, ts),
                        flags: 0,
                    };
                    if items_tx
                        .blocking_send(Item::Reading(reading, None))
                        .is_err()
                    {
                        bail!("the writer stopped taking readings after {i}");
                    }
                }
                Ok(())
            })
            .context("starting the producer thread")?
    };
    let _stop_on_exit = StopOnDrop(stop.clone());

    let started = Instant::now();
    let cap = Duration::from_secs(args.build_seconds);
    let mut ticker = tokio::time::interval(PROGRESS_EVERY);
    ticker.tick().await;
    let (mut last_n, mut last_at, mut moved_at) = (0u64, started, started);
    let mut writer_task = writer_task;
    let mut producing = true;
    let writer_result = loop {
        tokio::select! {
            r = &mut writer_task => break r,
            // Every reading is queued: the writer drains the queue and returns, and
            // PostgreSQL's log tail, which runs until shutdown, stops with it.
            _ = &mut produced_rx, if producing => {
                producing = false;
                shutdown.cancel();
            }
            _ = ticker.tick() => {
                let n = metrics.stored.get();
                let now = Instant::now();
                let recent = (n - last_n) as f64 / now.duration_since(last_at).as_secs_f64();
                let average = n as f64 / started.elapsed().as_secs_f64();
                let left = layout.readings.saturating_sub(n) as f64 / average.max(1.0);
                eprintln!(
                    "  building: {} / {} readings ({:.1} %), {} rows/s now, {} on average, about {} left",
                    thousands(n as f64),
                    thousands(layout.readings as f64),
                    100.0 * n as f64 / layout.readings as f64,
                    thousands(recent),
                    thousands(average),
                    duration_text(left)
                );
                if n > last_n {
                    moved_at = now;
                }
                (last_n, last_at) = (n, now);
                if now.duration_since(moved_at) > BUILD_STALL {
                    stop.store(true, Ordering::Relaxed);
                    shutdown.cancel();
                    bail!(
                        "building stalled: nothing committed for {BUILD_STALL:?} at {n} readings"
                    );
                }
                if started.elapsed() > cap {
                    stop.store(true, Ordering::Relaxed);
                    shutdown.cancel();
                    bail!(
                        "building took longer than --build-seconds {} (at {n} readings); \
                         the database is not kept",
                        args.build_seconds
                    );
                }
            }
        }
    };
    let took = started.elapsed().as_secs_f64();
    let produced = producer
        .join()
        .map_err(|_| anyhow!("the producer thread panicked"))?;
    writer_result
        .context("the writer task panicked")?
        .context("the writer failed")?;
    produced?;
    let stored = metrics.stored.get();
    if stored != layout.readings {
        bail!(
            "the writer committed {stored} readings of {}",
            layout.readings
        );
    }
    store
        .checkpoint()
        .await
        .context("checkpointing the database")?;
    drop(store);
    Ok(took)
}

/// Tells the producer to stop when building ends early (an error, Ctrl-C).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// The `[storage]` section: the database, and readings kept a year (as long as the 1-minute
/// rollups by default), so that a database reused weeks later is not cut by retention.
fn storage_section(place: &Place, pg: Option<&PgCluster>) -> String {
    format!(
        "[storage]\n{}\nretention = \"365d\"\n",
        storage_location(place, pg)
    )
}

/// The `[storage]` line that says where the database is.
fn storage_location(place: &Place, pg: Option<&PgCluster>) -> String {
    let toml_str = |s: &str| toml::Value::String(s.to_owned()).to_string();
    match pg {
        Some(pg) => format!("url = {}", toml_str(&pg.database_url(PG_DATABASE))),
        None => format!(
            "path = {}",
            toml_str(&place.sqlite_db().display().to_string())
        ),
    }
}

/// The storage config `section` gives, as the daemon reads it.
fn storage_config(section: &str) -> anyhow::Result<StorageConfig> {
    telebridge::Config::parse(section)
        .map(|c| c.storage)
        .map_err(|problems| {
            anyhow!(
                "the bench's [storage] section does not parse: {}",
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })
}

async fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let bin = daemon_binary(args.daemon.as_deref())?;
    if args.retention {
        return run_retention(args, &bin).await;
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let place = Place {
        dir: args
            .dir
            .canonicalize()
            .with_context(|| format!("resolving {}", args.dir.display()))?,
        backend: args.backend,
    };
    let schema = schema_fingerprint(args.backend)?;
    let previous = place.read_marker();
    let reuse = previous.as_ref().filter(|b| {
        !args.rebuild
            && b.readings == args.readings
            && b.devices == args.devices
            && b.schema == schema
            && match args.backend {
                Backend::Sqlite => place.sqlite_db().is_file(),
                Backend::Postgres => place.pg_data().join("PG_VERSION").is_file(),
            }
    });
    let why_build = match (&previous, reuse) {
        (_, Some(_)) => None,
        (None, None) => Some("no finished database of this backend in --dir".to_owned()),
        (Some(_), None) if args.rebuild => Some("--rebuild".to_owned()),
        (Some(b), None) if b.schema != schema => Some(format!(
            "the migrations changed since it was built (then: {}; now: {schema})",
            b.schema
        )),
        (Some(b), None) => Some(format!(
            "it holds {} readings over {} devices",
            thousands(b.readings as f64),
            b.devices
        )),
    };
    let reuse = reuse.cloned();
    if why_build.is_some() {
        place.wipe()?;
    }

    // Declared before the broker and the daemon, so it is stopped last.
    let pg = place.start_pg(reuse.is_none()).await?;
    let section = storage_section(&place, pg.as_ref());
    let storage = storage_config(&section)?;

    let built_now = reuse.is_none();
    let built = match (reuse, why_build) {
        (Some(b), _) => b,
        (None, why) => {
            let end_ms = now_ms() / 1000 * 1000;
            let layout = Layout::ending_at(args, end_ms);
            eprintln!(
                "building the database ({}): {} readings over {} devices, batches of {}",
                why.unwrap_or_default(),
                thousands(args.readings as f64),
                args.devices,
                thousands(args.batch as f64)
            );
            let took = build(args, &storage, layout).await?;
            let b = Built {
                readings: args.readings,
                devices: args.devices,
                end_ms,
                schema: schema.clone(),
                build_seconds: took,
                batch: args.batch,
                built_at_ms: now_ms(),
                commit: git_commit(),
            };
            std::fs::write(place.marker(), b.to_json().to_string())
                .with_context(|| format!("writing {}", place.marker().display()))?;
            eprintln!(
                "built in {} ({} rows/s)",
                duration_text(took),
                thousands(b.rows_per_second())
            );
            b
        }
    };
    let layout = Layout::ending_at(args, built.end_ms);

    let broker = Mosquitto::start(None)?;
    let machine = Machine::read();
    println!(
        "# telebridge history benchmark (issue #14): history pages and series of a large database"
    );
    println!("machine:    {}", machine.describe());
    println!("daemon:     {} (built {})", bin.display(), modified(&bin));
    println!(
        "            [broker] mode=external, [storage] retention=365d, [log] level=warn, other keys default"
    );
    println!("{}", broker.describe());
    if let Some(pg) = &pg {
        println!("{}", pg.describe());
    }
    println!(
        "storage:    {} in {}{}",
        args.backend.name(),
        match args.backend {
            Backend::Sqlite => place.sqlite_db().display().to_string(),
            Backend::Postgres => format!("{} (database {PG_DATABASE})", place.pg_data().display()),
        },
        if built_now {
            " (built by this run)"
        } else {
            " (reused: built earlier with these readings and migrations)"
        }
    );
    println!(
        "            built {} by {} through Store::open + Writer::run, batches of {}: {} readings in {} = {} rows/s",
        telebridge::domain::format_ms(built.built_at_ms),
        built.commit,
        thousands(built.batch as f64),
        thousands(built.readings as f64),
        duration_text(built.build_seconds),
        thousands(built.rows_per_second())
    );
    println!("            migrations {}", built.schema);
    println!(
        "data:       {} readings over {} devices, one a second per device ({} each), {} to {} (the data's \"now\"); {}-byte JSON payloads, ts {DEVICE_LAG_MS} ms before receipt",
        thousands(args.readings as f64),
        thousands(args.devices as f64),
        duration_text(args.seconds() as f64),
        telebridge::domain::format_ms(layout.base_ms),
        telebridge::domain::format_ms(layout.end_ms),
        PAYLOAD_BYTES
    );
    println!(
        "client:     reqwest on loopback, one request at a time; {} warm-up + {} measured requests per query; latency = send -> last byte of the body; random devices and times (seed {})",
        args.warmup, args.samples, args.seed
    );
    if args.cold {
        println!(
            "cache:      cold: the database file is dropped from the OS page cache before every request"
        );
    }
    println!(
        "targets:    every query p99 < {TARGET_P99_MS:.0} ms; <= {TARGET_BYTES_PER_READING:.0} B of database per {PAYLOAD_BYTES}-byte reading"
    );
    println!(
        "everything shares this machine's {} cores; load average at start {}",
        machine.nproc,
        load_average()
    );
    println!();

    eprintln!("starting the daemon on the database");
    let daemon_config = |_: &Path| {
        format!(
            "[broker]\nmode = \"external\"\n\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"telebridge-bench-history\"\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\n\
             {section}\n\
             [log]\nlevel = \"warn\"\n",
            broker.port
        )
    };
    let daemon = Daemon::start_with_config(&bin, &[], daemon_config).await?;
    let cpu_before = (
        Instant::now(),
        machine_busy_seconds(),
        cpu_seconds(daemon.pid()),
        cpu_seconds(std::process::id()),
        pg.as_ref().map_or(0.0, PgCluster::cpu_seconds),
    );
    let pg_url = pg.as_ref().map(|pg| pg.database_url(PG_DATABASE));
    let cold = args.cold.then(|| place.sqlite_db());
    let result = measure(
        args,
        &daemon,
        layout,
        pg.as_ref(),
        pg_url.as_deref(),
        cold.as_deref(),
    )
    .await;
    let busy = (
        cpu_before.0.elapsed().as_secs_f64(),
        machine_busy_seconds() - cpu_before.1,
        cpu_seconds(daemon.pid()) - cpu_before.2,
        cpu_seconds(std::process::id()) - cpu_before.3,
        pg.as_ref().map_or(0.0, PgCluster::cpu_seconds) - cpu_before.4,
    );
    let sizes = match &pg {
        Some(pg) => pg_sizes(&pg.database_url(PG_DATABASE)).await,
        None => sqlite_sizes(&place.sqlite_db()).await,
    };
    let problems = daemon.log_problems();
    drop(daemon);
    let queries = result?;

    println!(
        "| query | samples | p50 ms | p99 ms | max ms | what came back | p99 < {TARGET_P99_MS:.0} ms |"
    );
    println!("|---|--:|--:|--:|--:|---|:-:|");
    let mut met = true;
    for q in &queries {
        match &q.missing {
            Some(why) => {
                met = false;
                println!(
                    "| {} | 0 | - | - | - | not available: {why} | NO |",
                    q.label
                );
            }
            None => {
                let ok = q.failures == 0 && q.p(0.99).is_some_and(|p| p < TARGET_P99_MS);
                met &= ok;
                println!(
                    "| {} | {} | {} | **{}** | {} | {}{} | {} |",
                    q.label,
                    q.micros.len(),
                    fmt_ms(q.p(0.50)),
                    fmt_ms(q.p(0.99)),
                    fmt_ms(q.max()),
                    q.detail(),
                    if q.failures > 0 {
                        format!("; {} failed, the first: {}", q.failures, q.first_error)
                    } else {
                        String::new()
                    },
                    if ok { "yes" } else { "NO" }
                );
            }
        }
    }
    println!();
    for q in queries.iter().filter(|q| !q.pg_top.is_empty()) {
        println!(
            "postgres statements over \"{}\" (pg_stat_statements, by execution time):",
            q.label
        );
        for line in &q.pg_top {
            println!("  {line}");
        }
    }
    match sizes {
        Ok(s) => {
            let per = s.total as f64 / args.readings as f64;
            met &= per <= TARGET_BYTES_PER_READING;
            println!(
                "database:   {} = {} for {} readings: **{per:.1} B per reading** (target <= {TARGET_BYTES_PER_READING:.0} B per {PAYLOAD_BYTES}-byte reading): {}",
                s.what,
                megabytes(s.total),
                thousands(args.readings as f64),
                if per <= TARGET_BYTES_PER_READING {
                    "yes"
                } else {
                    "NO"
                }
            );
            for (name, bytes) in &s.split {
                println!(
                    "            {name}: {} ({:.1} B per reading)",
                    megabytes(*bytes),
                    *bytes as f64 / args.readings as f64
                );
            }
            if let Some(note) = &s.note {
                println!("            {note}");
            }
        }
        Err(e) => {
            met = false;
            println!("database:   size not measured: {e:#}");
        }
    }
    if !problems.is_empty() {
        println!(
            "daemon log: {} warning/error line(s); the first: {}",
            problems.len(),
            problems
                .iter()
                .take(3)
                .map(|l| format!("{l:.300}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    println!(
        "cpu:        over the {:.1} s of requests: daemon {:.1} CPU s, {}this bench {:.1}, everything else on the machine {:.1} ({:.0} % of one core); load average at the end {}",
        busy.0,
        busy.2,
        if pg.is_some() {
            format!("postgres {:.1}, ", busy.4)
        } else {
            String::new()
        },
        busy.3,
        (busy.1 - busy.2 - busy.3 - busy.4).max(0.0),
        100.0 * (busy.1 - busy.2 - busy.3 - busy.4).max(0.0) / busy.0.max(1e-9),
        load_average()
    );
    println!(
        "targets:    {}",
        if met { "all met" } else { "NOT all met" }
    );
    drop(broker);
    drop(pg);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------------------

/// One kind of request and what its samples gave.
struct Query {
    label: String,
    /// Latencies of the successful measured requests, sorted (µs).
    micros: Vec<u32>,
    failures: u64,
    first_error: String,
    /// Why the endpoint could not be measured at all (404: not there yet).
    missing: Option<String>,
    /// Rows or points per response, and body bytes.
    items: Vec<u64>,
    bytes: Vec<u64>,
    /// `resolution` values of series responses, with their counts.
    resolutions: Vec<(String, u64)>,
    /// What the list holds: "rows", "points" or "devices".
    noun: &'static str,
    /// PostgreSQL's statements by execution time over these requests (pg_stat_statements).
    pg_top: Vec<String>,
}

impl Query {
    fn p(&self, q: f64) -> Option<f64> {
        percentile(&self.micros, q).map(|us| f64::from(us) / 1000.0)
    }

    fn max(&self) -> Option<f64> {
        self.micros.last().map(|us| f64::from(*us) / 1000.0)
    }

    fn detail(&self) -> String {
        let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
        let (lo, hi) = (
            self.items.iter().min().copied().unwrap_or(0),
            self.items.iter().max().copied().unwrap_or(0),
        );
        let mut out = if lo == hi {
            format!("{lo} {}", self.noun)
        } else {
            format!("{lo}-{hi} {} (mean {:.1})", self.noun, mean(&self.items))
        };
        let _ = write!(out, ", {} B", thousands(mean(&self.bytes)));
        if !self.resolutions.is_empty() {
            let r: Vec<String> = self
                .resolutions
                .iter()
                .map(|(r, n)| format!("{r} x{n}"))
                .collect();
            let _ = write!(out, ", {}", r.join(", "));
        }
        out
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Page,
    Series { hours: i64 },
    Devices,
}

async fn measure(
    args: &Args,
    daemon: &Daemon,
    layout: Layout,
    pg: Option<&PgCluster>,
    pg_url: Option<&str>,
    cold: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Query>> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()?;
    let kinds = [
        (
            Kind::Page,
            format!("history page: readings?from=<random>&limit={PAGE_ROWS}"),
        ),
        (
            Kind::Series { hours: 24 },
            "24 h series: series?from=now-24h&to=now&step=auto".to_owned(),
        ),
        (
            Kind::Series { hours: 7 * 24 },
            "7 d series: series?from=now-7d&to=now&step=auto".to_owned(),
        ),
        (
            Kind::Series { hours: 30 * 24 },
            "30 d series: series?from=now-30d&to=now&step=auto".to_owned(),
        ),
        (Kind::Devices, "GET /api/devices".to_owned()),
    ];
    let mut out = Vec::new();
    let mut rng = Rng(args.seed);
    for (kind, label) in kinds {
        eprintln!("measuring {label}");
        let before = PgSnapshot::take(pg, pg_url).await?;
        let target = Target {
            daemon,
            layout,
            cold,
        };
        let mut q = sample(args, &http, &target, &mut rng, kind, label).await;
        (_, q.pg_top) = PgSnapshot::since(before, pg, pg_url, 3).await?;
        out.push(q);
    }
    Ok(out)
}

/// The path of one request of `kind`, at a random device and time.
fn request_path(kind: Kind, layout: Layout, rng: &mut Rng) -> String {
    let d = rng.below(layout.devices);
    let dev = Layout::device_name(d);
    match kind {
        Kind::Page => {
            let (first, last) = layout.span(d);
            // A full page: at least PAGE_ROWS seconds before the device's last reading.
            let latest = (last - PAGE_ROWS as i64 * 1000).max(first);
            let from = first + rng.below((latest - first) as u64 + 1) as i64;
            format!("/api/devices/{dev}/readings?from={from}&limit={PAGE_ROWS}")
        }
        Kind::Series { hours } => format!(
            "/api/devices/{dev}/series?from={}&to={}&step=auto",
            layout.end_ms - hours * 3_600_000,
            layout.end_ms
        ),
        Kind::Devices => "/api/devices".to_owned(),
    }
}

/// Drops a file's pages from the OS page cache (clean pages only: the daemon does not
/// write while the queries run), so the next reads of it come from the disk.
fn evict(path: &std::path::Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
    }
}

/// What the requests go to.
struct Target<'a> {
    daemon: &'a Daemon,
    layout: Layout,
    /// The database file to drop from the page cache before each request (`--cold`).
    cold: Option<&'a std::path::Path>,
}

async fn sample(
    args: &Args,
    http: &reqwest::Client,
    target: &Target<'_>,
    rng: &mut Rng,
    kind: Kind,
    label: String,
) -> Query {
    let Target {
        daemon,
        layout,
        cold,
    } = *target;
    let mut q = Query {
        label,
        micros: Vec::with_capacity(args.samples as usize),
        failures: 0,
        first_error: String::new(),
        missing: None,
        items: Vec::new(),
        bytes: Vec::new(),
        resolutions: Vec::new(),
        pg_top: Vec::new(),
        noun: match kind {
            Kind::Page => "rows",
            Kind::Series { .. } => "points",
            Kind::Devices => "devices",
        },
    };
    let started = Instant::now();
    for i in 0..args.warmup + args.samples {
        if started.elapsed() > KIND_CAP {
            q.failures += 1;
            if q.first_error.is_empty() {
                q.first_error = format!("stopped at the {KIND_CAP:?} cap after {i} requests");
            }
            break;
        }
        let path = request_path(kind, layout, rng);
        let url = format!("http://{}{path}", daemon.addr);
        if let Some(db) = cold {
            evict(db);
        }
        let t0 = Instant::now();
        let got = match http.get(&url).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                resp.bytes().await.map(|b| (status, b))
            }
            Err(e) => Err(e),
        };
        let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        let (status, body) = match got {
            Ok(x) => x,
            Err(e) => {
                q.failures += 1;
                if q.first_error.is_empty() {
                    q.first_error = format!("GET {path}: {e}");
                }
                continue;
            }
        };
        if status == 404 && matches!(kind, Kind::Series { .. }) {
            q.missing = Some(format!(
                "404 {}",
                String::from_utf8_lossy(&body)
                    .chars()
                    .take(160)
                    .collect::<String>()
            ));
            break;
        }
        let parsed = serde_json::from_slice::<Value>(&body);
        let list = parsed.as_ref().ok().and_then(|v| match kind {
            Kind::Page => v.get("readings")?.as_array().map(Vec::len),
            Kind::Series { .. } => v.get("points")?.as_array().map(Vec::len),
            Kind::Devices => v.get("devices")?.as_array().map(Vec::len),
        });
        let (200, Some(n)) = (status, list) else {
            q.failures += 1;
            if q.first_error.is_empty() {
                q.first_error = format!(
                    "GET {path}: {status} {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(160)
                        .collect::<String>()
                );
            }
            continue;
        };
        if i < args.warmup {
            continue;
        }
        q.micros.push(us);
        q.items.push(n as u64);
        q.bytes.push(body.len() as u64);
        if let Some(v) = parsed
            .as_ref()
            .ok()
            .filter(|v| v.get("resolution").is_some())
        {
            let text = |k: &str| match v.get(k) {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => "?".into(),
            };
            let r = format!("step {} from {}", text("step"), text("resolution"));
            match q.resolutions.iter_mut().find(|(x, _)| *x == r) {
                Some((_, c)) => *c += 1,
                None => q.resolutions.push((r, 1)),
            }
        }
    }
    q.micros.sort_unstable();
    q
}

// ---------------------------------------------------------------------------------------
// Database size
// ---------------------------------------------------------------------------------------

struct Sizes {
    /// What `total` counts.
    what: String,
    total: u64,
    /// By table or index, largest first.
    split: Vec<(String, u64)>,
    note: Option<String>,
}

/// The SQLite file and its WAL; by table and index from dbstat (read-only, bounded).
async fn sqlite_sizes(db: &Path) -> anyhow::Result<Sizes> {
    use sqlx::Connection as _;
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let main = len(db);
    let wal = len(Path::new(&format!("{}-wal", db.display())));
    let mut sizes = Sizes {
        what: format!("file {} + WAL {}", megabytes(main), megabytes(wal)),
        total: main + wal,
        split: Vec::new(),
        note: None,
    };
    let split = async {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .read_only(true);
        let mut conn = sqlx::sqlite::SqliteConnection::connect_with(&opts)
            .await
            .with_context(|| format!("opening {} read-only", db.display()))?;
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")
                .fetch_all(&mut conn)
                .await
                .context("reading dbstat")?;
        let _ = conn.close().await;
        anyhow::Ok(rows)
    };
    match tokio::time::timeout(DBSTAT_TIMEOUT, split).await {
        Ok(Ok(rows)) => {
            let pages: u64 = rows.iter().map(|(_, b)| *b as u64).sum();
            sizes.split = rows
                .into_iter()
                .filter(|(_, b)| *b as u64 * 200 >= pages)
                .map(|(n, b)| (format!("{n} (dbstat)"), b as u64))
                .collect();
            sizes.note = Some(format!(
                "(dbstat counts the pages of the main file: {}; tables and indexes under 0.5 % not listed)",
                megabytes(pages)
            ));
        }
        Ok(Err(e)) => sizes.note = Some(format!("no split by table: {e:#}")),
        Err(_) => {
            sizes.note = Some(format!(
                "no split by table: dbstat did not finish within {DBSTAT_TIMEOUT:?}"
            ));
        }
    }
    Ok(sizes)
}

/// pg_database_size, and each table's heap (with TOAST) and indexes.
async fn pg_sizes(url: &str) -> anyhow::Result<Sizes> {
    use sqlx::Connection as _;
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let (total,): (i64,) = sqlx::query_as("SELECT pg_database_size(current_database())")
        .fetch_one(&mut conn)
        .await
        .context("reading pg_database_size")?;
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT c.relname::text, pg_table_size(c.oid), pg_indexes_size(c.oid) \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') \
         ORDER BY pg_table_size(c.oid) + pg_indexes_size(c.oid) DESC",
    )
    .fetch_all(&mut conn)
    .await
    .context("reading the table sizes")?;
    let _ = conn.close().await;
    let total = total as u64;
    let mut split = Vec::new();
    for (name, table, indexes) in rows {
        if (table + indexes) as u64 * 200 >= total {
            split.push((format!("{name} table"), table as u64));
            split.push((format!("{name} indexes"), indexes as u64));
        }
    }
    Ok(Sizes {
        what: "pg_database_size".into(),
        total,
        split,
        note: Some(
            "(heap with TOAST and free space map; WAL is outside the database; tables under 0.5 % not listed)"
                .into(),
        ),
    })
}

// ---------------------------------------------------------------------------------------
// The retention phase (--retention)
// ---------------------------------------------------------------------------------------

/// The retention phase's database: this subdirectory of `--dir`, built anew on every run.
const RETENTION_SUBDIR: &str = "retention";
/// The daemon's histogram of batch commit latency.
const COMMIT_HISTOGRAM: &str = "telebridge_store_batch_commit_seconds";
/// Target from the issue: the commit latency p99 during a retention pass of millions of
/// rows within this factor of the idle p99.
const TARGET_PASS_RATIO: f64 = 2.0;
/// How often a window polls the daemon's metrics.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Longest wait, after a window, for its readings to come back over SSE.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The daemon's first retention tick (whose cutoff the whole pass works to) comes at most
/// this long before it answers /readyz.
const FIRST_TICK_SLACK_MS: i64 = 1_000;
/// What a published payload's pad starts with, its send time (Unix µs) after it.
const SENT_MARK: &[u8] = b"\"pad\":\"s";

/// The daemon's commit latency histogram at one moment, or the difference of two.
#[derive(Debug, Clone, Default)]
struct Buckets {
    /// (upper bound in seconds, +Inf last; cumulative count).
    cumulative: Vec<(f64, u64)>,
    sum: f64,
    count: u64,
}

impl Buckets {
    fn parse(text: &str) -> anyhow::Result<Buckets> {
        let prefix = format!("{COMMIT_HISTOGRAM}_bucket{{le=\"");
        let mut cumulative = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(prefix.as_str()) else {
                continue;
            };
            let (le, value) = rest
                .split_once("\"} ")
                .with_context(|| format!("unexpected /metrics line {line:?}"))?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()
                    .with_context(|| format!("the bucket bound of {line:?}"))?
            };
            let count = value
                .trim()
                .parse()
                .with_context(|| format!("the bucket count of {line:?}"))?;
            cumulative.push((bound, count));
        }
        if cumulative.is_empty() {
            bail!("GET /metrics has no {COMMIT_HISTOGRAM}: a daemon older than the histogram?");
        }
        let sum = metric(text, &format!("{COMMIT_HISTOGRAM}_sum"))
            .with_context(|| format!("GET /metrics has no {COMMIT_HISTOGRAM}_sum"))?;
        let count = metric(text, &format!("{COMMIT_HISTOGRAM}_count"))
            .with_context(|| format!("GET /metrics has no {COMMIT_HISTOGRAM}_count"))?;
        Ok(Buckets {
            cumulative,
            sum,
            count: count as u64,
        })
    }

    /// The commits since `before` (the same daemon).
    fn since(&self, before: &Buckets) -> Buckets {
        Buckets {
            cumulative: self
                .cumulative
                .iter()
                .map(|&(bound, n)| {
                    let was = before
                        .cumulative
                        .iter()
                        .find(|(b, _)| *b == bound)
                        .map_or(0, |(_, n)| *n);
                    (bound, n.saturating_sub(was))
                })
                .collect(),
            sum: (self.sum - before.sum).max(0.0),
            count: self.count.saturating_sub(before.count),
        }
    }

    /// The upper bound (s) of the bucket that holds the `q` quantile (nearest rank), infinite
    /// past the last bound; None without commits.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        self.cumulative
            .iter()
            .find(|(_, n)| *n >= rank)
            .map(|(bound, _)| *bound)
    }

    fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The non-empty buckets, each as its count (not cumulative): `<= 1 ms: 120, ...`.
    fn spread(&self) -> String {
        let mut prev = 0;
        let mut parts = Vec::new();
        for &(bound, n) in &self.cumulative {
            if n > prev {
                parts.push(format!("{} {}", bound_text(bound), n - prev));
            }
            prev = n;
        }
        if parts.is_empty() {
            "no commits".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A bucket's upper bound: `<= 1.5 ms`, or `> 10 s` past the last finite one.
fn bound_text(bound: f64) -> String {
    if bound.is_infinite() {
        return "> 10 s".into();
    }
    let ms = bound * 1000.0;
    if ms >= 1000.0 {
        format!("<= {} s", trim_zeros(bound))
    } else {
        format!("<= {} ms", trim_zeros(ms))
    }
}

/// `1.50` as `1.5`, `2.00` as `2`.
fn trim_zeros(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// What the daemon's metrics say at one moment.
struct Scrape {
    commits: Buckets,
    /// Readings retention deleted since the daemon started.
    deleted: u64,
    stored: u64,
}

async fn scrape(daemon: &Daemon) -> anyhow::Result<Scrape> {
    let text = daemon.metrics().await.context("GET /metrics")?;
    let count = |name: &str| metric(&text, name).map_or(0, |v| v as u64);
    Ok(Scrape {
        commits: Buckets::parse(&text)?,
        deleted: count("telebridge_retention_deleted_total"),
        stored: count("telebridge_readings_stored_total"),
    })
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The 100-byte payload of a live reading of device `d` at device time `ts`: the fields of
/// the database's readings, the pad starting with `s` and the send time (Unix µs).
fn live_payload(buf: &mut String, d: u64, ts: i64, sent_us: u64) -> Bytes {
    let hours = ts as f64 / 3_600_000.0;
    let phase = d as f64 * 0.37;
    let temperature = 21.0 + 4.0 * (hours * std::f64::consts::TAU / 24.0 + phase).sin();
    let humidity = 45.0 + 10.0 * (hours * std::f64::consts::TAU / 24.0 + phase).cos();
    let battery = 90.0 - (d % 7) as f64;
    padded_reading(
        buf,
        ts,
        [temperature, humidity, battery],
        &format!("s{sent_us}"),
    )
}

/// Publishes `rate` readings a second (10 ms ticks) at QoS 1, device after device over
/// `devices` (the database's), until `stop` or `cap` of them; how many it published.
async fn publish_steady(
    client: rumqttc::AsyncClient,
    devices: u64,
    rate: u64,
    cap: u64,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let topics: Vec<String> = (0..devices)
        .map(|d| format!("devices/{}/telemetry", Layout::device_name(d)))
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A publisher that fell behind catches up at no more than 4 ticks' worth a tick.
    let per_tick = (rate / 100).max(1) * 4;
    let started = Instant::now();
    let mut buf = String::with_capacity(PAYLOAD_BYTES + 16);
    let mut sent = 0u64;
    while sent < cap {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(cap);
        let mut n = 0;
        while sent < due && n < per_tick {
            let d = sent % devices;
            let sent_us = unix_micros();
            let payload = live_payload(&mut buf, d, (sent_us / 1000) as i64, sent_us);
            publish_qos1(&client, &topics[d as usize], &payload).await?;
            sent += 1;
            n += 1;
        }
    }
    Ok(sent)
}

/// The published readings seen on the daemon's SSE feed: publish -> SSE latency (µs).
#[derive(Default)]
struct Arrivals {
    latencies: std::sync::Mutex<Vec<u32>>,
    seen: AtomicU64,
}

impl Arrivals {
    fn restart(&self) {
        self.lock().clear();
        self.seen.store(0, Ordering::Relaxed);
    }

    fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.latencies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Reads `GET /events?type=reading` until `stop` or the daemon closes it: every `data:` line
/// whose pad holds a send time adds its latency. The daemon writes whole events per chunk,
/// so chunk-size lines fall between them.
async fn read_sse(
    addr: std::net::SocketAddr,
    arrivals: Arc<Arrivals>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; 256 * 1024];
    let (mut stream, mut filled) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        open_sse(addr, "/events?type=reading", "", &mut buf),
    )
    .await
    .context("no SSE response head")??;
    loop {
        let mut start = 0;
        while let Some(i) = find_byte(&buf[start..filled], b'\n') {
            let line = &buf[start..start + i];
            if line.starts_with(b"data: ")
                && let Some(at) = find_subslice(line, SENT_MARK)
                && let Some(sent) = leading_u64(&line[at + SENT_MARK.len()..])
            {
                let us = unix_micros().saturating_sub(sent).min(u64::from(u32::MAX)) as u32;
                arrivals.lock().push(us);
                arrivals.seen.fetch_add(1, Ordering::Relaxed);
            }
            start += i + 1;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            // A line longer than the buffer: not one of ours.
            filled = 0;
        }
        let n = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = stream.read(&mut buf[filled..]) => r.context("reading the SSE stream")?,
        };
        if n == 0 {
            return Ok(());
        }
        filled += n;
    }
}

/// CPU seconds so far: the machine, the daemon, this bench and PostgreSQL.
#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    machine: f64,
    daemon: f64,
    bench: f64,
    pg: f64,
}

impl Cpu {
    fn now(daemon: &Daemon, pg: Option<&PgCluster>) -> Cpu {
        Cpu {
            at: Instant::now(),
            machine: machine_busy_seconds(),
            daemon: cpu_seconds(daemon.pid()),
            bench: cpu_seconds(std::process::id()),
            pg: pg.map_or(0.0, PgCluster::cpu_seconds),
        }
    }

    /// What was used since `before`, as cores (CPU seconds per second).
    fn since(&self, before: &Cpu, pg: bool) -> String {
        let wall = self.at.duration_since(before.at).as_secs_f64().max(1e-9);
        let daemon = self.daemon - before.daemon;
        let bench = self.bench - before.bench;
        let pgs = self.pg - before.pg;
        let other = (self.machine - before.machine - daemon - bench - pgs).max(0.0);
        let mut out = format!("daemon {:.2}", daemon / wall);
        if pg {
            let _ = write!(out, ", postgres {:.2}", pgs / wall);
        }
        let _ = write!(
            out,
            ", bench {:.2}, other {:.2} cores",
            bench / wall,
            other / wall
        );
        out
    }
}

/// How a window ends.
#[derive(Clone, Copy)]
enum Until {
    /// After this long.
    Elapsed(Duration),
    /// Once the daemon's retention counter reaches `due`, or after `cap`.
    CaughtUp { due: u64, cap: Duration },
}

/// One measured window.
struct Window {
    label: String,
    /// From the publisher's start to the window's end.
    seconds: f64,
    /// The daemon's commits from the window's start until its readings were all back.
    commits: Buckets,
    published: u64,
    stored: u64,
    /// Publish -> SSE latencies (µs) of the window's readings, sorted.
    trip: Vec<u32>,
    /// Readings retention deleted in the window, and since the daemon started.
    deleted: u64,
    deleted_total: u64,
    /// When retention caught up (since the window's start); None at the cap or for
    /// `Until::Elapsed`.
    caught_up: Option<Duration>,
    started: Instant,
    cpu: String,
    load: String,
}

struct Phase<'a> {
    args: &'a Args,
    broker_port: u16,
    pg: Option<&'a PgCluster>,
}

impl Phase<'_> {
    /// Publishes `--rate` readings a second until `until`, then waits for them on SSE.
    async fn window(
        &self,
        label: &str,
        daemon: &Daemon,
        arrivals: &Arrivals,
        until: Until,
        client_id: &str,
    ) -> anyhow::Result<Window> {
        eprintln!("window: {label}");
        arrivals.restart();
        let before = scrape(daemon).await?;
        let cpu0 = Cpu::now(daemon, self.pg);
        let longest = match until {
            Until::Elapsed(d) => d,
            Until::CaughtUp { cap, .. } => cap,
        };
        let cap = self.args.rate * (longest.as_secs() + 10);
        let publisher = Publisher::connect(self.broker_port, client_id).await?;
        let stop = CancellationToken::new();
        let started = Instant::now();
        let mut task = tokio::spawn(publish_steady(
            publisher.client.clone(),
            self.args.devices,
            self.args.rate,
            cap,
            stop.clone(),
        ));
        let mut caught_up = None;
        let mut last_progress = started;
        let end = loop {
            tokio::select! {
                r = &mut task => {
                    publisher.stop().await;
                    let r = r.context("the publisher task panicked")?;
                    bail!("the publisher stopped early: {:?}", r.map(|n| format!("{n} published")));
                }
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
            match until {
                Until::Elapsed(d) => {
                    if started.elapsed() >= d {
                        break scrape(daemon).await?;
                    }
                }
                Until::CaughtUp { due, cap } => {
                    let s = scrape(daemon).await?;
                    if s.deleted >= due {
                        caught_up = Some(started.elapsed());
                        break s;
                    }
                    if started.elapsed() >= cap {
                        break s;
                    }
                    if last_progress.elapsed() >= Duration::from_secs(5) {
                        eprintln!(
                            "  retention deleted {} of {} due so far",
                            thousands(s.deleted as f64),
                            thousands(due as f64)
                        );
                        last_progress = Instant::now();
                    }
                }
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let cpu1 = Cpu::now(daemon, self.pg);
        let load = load_average();
        stop.cancel();
        let published = task
            .await
            .context("the publisher task panicked")?
            .context("publishing")?;
        publisher.stop().await;
        let drain_until = Instant::now() + DRAIN_TIMEOUT;
        while arrivals.seen.load(Ordering::Relaxed) < published && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = scrape(daemon).await?;
        let mut trip = arrivals.take();
        trip.sort_unstable();
        Ok(Window {
            label: label.to_owned(),
            seconds,
            commits: after.commits.since(&before.commits),
            published,
            stored: after.stored.saturating_sub(before.stored),
            trip,
            deleted: end.deleted - before.deleted,
            deleted_total: end.deleted,
            caught_up,
            started,
            cpu: cpu1.since(&cpu0, self.pg.is_some()),
            load,
        })
    }
}

/// `VACUUM ANALYZE` of the whole database, as a database that has been running would be.
async fn pg_vacuum(url: &str) -> anyhow::Result<f64> {
    use sqlx::Connection as _;
    let started = Instant::now();
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    sqlx::raw_sql("VACUUM ANALYZE")
        .execute(&mut conn)
        .await
        .context("VACUUM ANALYZE")?;
    let _ = conn.close().await;
    Ok(started.elapsed().as_secs_f64())
}

/// The retention phase: a database of `--retention-readings` built anew in
/// DIR/retention, the daemon on it under a steady QoS 1 load, idle (retention 365d), then
/// restarted with a retention that makes `--retention-due` of its readings due.
async fn run_retention(args: &Args, bin: &Path) -> anyhow::Result<ExitCode> {
    let dir = args.dir.join(RETENTION_SUBDIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let place = Place {
        dir: dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?,
        backend: args.backend,
    };
    // Retention eats it: always built anew.
    place.wipe()?;
    let pg = place.start_pg(true).await?;
    let location = storage_location(&place, pg.as_ref());
    let section = |retention: &str| {
        format!(
            "[storage]\n{location}\nretention = \"{retention}\"\nretention_1m = \"{}\"\n\
             retention_interval = \"{}s\"\n",
            args.retention_1m, args.retention_interval
        )
    };
    let storage = storage_config(&section("365d"))?;
    let end_ms = now_ms() / 1000 * 1000;
    let layout = Layout::new(args.retention_readings, args.devices, end_ms);
    eprintln!(
        "building the retention database: {} readings over {} devices, batches of {}",
        thousands(layout.readings as f64),
        args.devices,
        thousands(args.batch as f64)
    );
    let build_seconds = build(args, &storage, layout).await?;
    eprintln!(
        "built in {} ({} rows/s)",
        duration_text(build_seconds),
        thousands(layout.readings as f64 / build_seconds.max(1e-9))
    );
    let vacuum = match &pg {
        Some(pg) => Some(pg_vacuum(&pg.database_url(PG_DATABASE)).await?),
        None => None,
    };

    let broker = Mosquitto::start(None)?;
    let machine = Machine::read();
    let seconds_each = layout.readings.div_ceil(layout.devices);
    println!(
        "# telebridge history benchmark (issue #14), retention phase: commit latency while a retention pass deletes millions of rows"
    );
    println!("machine:    {}", machine.describe());
    println!("daemon:     {} (built {})", bin.display(), modified(bin));
    println!(
        "            [broker] mode=external, [storage] retention_1m={} retention_interval={}s, [log] level=warn, other keys default",
        args.retention_1m, args.retention_interval
    );
    println!("{}", broker.describe());
    if let Some(pg) = &pg {
        println!("{}", pg.describe());
    }
    println!(
        "storage:    {} in {}, built by this run through Store::open + Writer::run, batches of {}: {} readings in {} = {} rows/s{}",
        args.backend.name(),
        match args.backend {
            Backend::Sqlite => place.sqlite_db().display().to_string(),
            Backend::Postgres => format!("{} (database {PG_DATABASE})", place.pg_data().display()),
        },
        thousands(args.batch as f64),
        thousands(layout.readings as f64),
        duration_text(build_seconds),
        thousands(layout.readings as f64 / build_seconds.max(1e-9)),
        vacuum.map_or(String::new(), |s| format!(
            "; then VACUUM ANALYZE ({})",
            duration_text(s)
        ))
    );
    println!(
        "data:       {} readings over {} devices, one a second per device ({} each), {} to {}; {PAYLOAD_BYTES}-byte JSON payloads",
        thousands(layout.readings as f64),
        thousands(layout.devices as f64),
        duration_text(seconds_each as f64),
        telebridge::domain::format_ms(layout.base_ms),
        telebridge::domain::format_ms(layout.end_ms),
    );
    println!(
        "load:       one rumqttc publisher, {} readings/s at QoS 1 (10 ms ticks) round the same {} devices, {PAYLOAD_BYTES}-byte payloads with their send time in the pad; one SSE client on /events?type=reading (publish -> SSE: broker, daemon, queue, commit, feed)",
        thousands(args.rate as f64),
        thousands(args.devices as f64)
    );
    println!(
        "commits:    the delta of {COMMIT_HISTOGRAM} over each window (from its start until its readings are all back on SSE); p50/p99 are the upper bounds of the buckets that hold them"
    );
    println!("target:     commit p99 during the pass <= {TARGET_PASS_RATIO:.0} x the idle p99");
    println!(
        "everything shares this machine's {} cores; load average at start {}",
        machine.nproc,
        load_average()
    );
    println!();

    let phase = Phase {
        args,
        broker_port: broker.port,
        pg: pg.as_ref(),
    };
    let start = |retention: String| {
        let section = section(&retention);
        let port = broker.port;
        move |_: &Path| {
            format!(
                "[broker]\nmode = \"external\"\n\n\
                 [mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"telebridge-bench-history\"\n\n\
                 [http]\nlisten = \"127.0.0.1:0\"\n\n\
                 {section}\n\
                 [log]\nlevel = \"warn\"\n"
            )
        }
    };
    let idle_for = Duration::from_secs(args.idle_seconds);
    let mut problems = Vec::new();

    // (a) Idle: nothing due.
    eprintln!("starting the daemon with retention 365d");
    let daemon = Daemon::start_with_config(bin, &[], start("365d".into())).await?;
    let arrivals = Arc::new(Arrivals::default());
    let sse_stop = CancellationToken::new();
    let sse = tokio::spawn(read_sse(daemon.addr, arrivals.clone(), sse_stop.clone()));
    let idle = phase
        .window(
            "idle: retention 365d, nothing due",
            &daemon,
            &arrivals,
            Until::Elapsed(idle_for),
            "history-retention-idle",
        )
        .await;
    problems.extend(daemon.log_problems());
    sse_stop.cancel();
    drop(daemon);
    let _ = sse.await;
    let idle = idle?;

    // (b) Restarted with a retention that makes `--retention-due` readings due: the cutoff
    // at the first tick, right after start-up, is the receive time of reading number
    // `--retention-due` (in time order).
    let k = args.retention_due / args.devices;
    let r = args.retention_due % args.devices;
    let cutoff = layout.base_ms + k as i64 * 1000 + Layout::phase_of(r, args.devices);
    // About a second of start-up.
    let retention_s = ((now_ms() + 1000 - cutoff).max(0) as u64).div_ceil(1000) as i64;
    if retention_s < 60 {
        bail!(
            "a retention of {retention_s} s would make {} readings due, but it must be at least 1m: ask fewer due, or more readings",
            args.retention_due
        );
    }
    let retention_ms = retention_s * 1000;
    eprintln!("starting the daemon with retention {retention_s}s");
    let daemon = Daemon::start_with_config(bin, &[], start(format!("{retention_s}s"))).await?;
    let ready = Instant::now();
    let ready_ms = now_ms();
    // The first tick's cutoff, which the whole pass works to: from a second before the
    // daemon was ready (the pass is over when that many are deleted) to when it was.
    let due_at_start = layout.received_before(ready_ms - retention_ms);
    let due_least = layout.received_before(ready_ms - retention_ms - FIRST_TICK_SLACK_MS);
    let arrivals = Arc::new(Arrivals::default());
    let sse_stop = CancellationToken::new();
    let sse = tokio::spawn(read_sse(daemon.addr, arrivals.clone(), sse_stop.clone()));
    let pass = phase
        .window(
            &format!("retention pass: retention {retention_s}s"),
            &daemon,
            &arrivals,
            Until::CaughtUp {
                due: due_least,
                cap: Duration::from_secs(args.pass_seconds),
            },
            "history-retention-pass",
        )
        .await;
    let after = match &pass {
        Ok(_) => Some(
            phase
                .window(
                    "after the pass, same daemon",
                    &daemon,
                    &arrivals,
                    Until::Elapsed(idle_for),
                    "history-retention-after",
                )
                .await,
        ),
        Err(_) => None,
    };
    // Retention's count just before the stop, against the readings left after it.
    let last = scrape(&daemon).await;
    problems.extend(daemon.log_problems());
    sse_stop.cancel();
    drop(daemon);
    let _ = sse.await;
    let pass = pass?;
    let after = after.transpose()?;
    let left = match &pg {
        Some(pg) => pg_count_readings(&pg.database_url(PG_DATABASE)).await,
        None => sqlite_count_readings(&place.sqlite_db()).await,
    };

    let windows: Vec<&Window> = [Some(&idle), Some(&pass), after.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    let ms = |s: Option<f64>| match s {
        Some(s) if s.is_infinite() => "> 10 s".to_owned(),
        Some(s) => trim_zeros(s * 1000.0),
        None => "-".to_owned(),
    };
    let trip = |w: &Window, q: f64| fmt_ms(percentile(&w.trip, q).map(|us| f64::from(us) / 1000.0));
    println!(
        "| window | s | published | stored | commits | commit p50 ms (bucket <=) | commit p99 ms (bucket <=) | commit mean ms | publish -> SSE p50 / p99 / max ms | retention deleted |"
    );
    println!("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for w in &windows {
        println!(
            "| {} | {:.1} | {} | {} | {} | {} | **{}** | {} | {} / {} / {}{} | {} |",
            w.label,
            w.seconds,
            thousands(w.published as f64),
            thousands(w.stored as f64),
            thousands(w.commits.count as f64),
            ms(w.commits.quantile(0.50)),
            ms(w.commits.quantile(0.99)),
            w.commits
                .mean()
                .map_or("-".into(), |m| format!("{:.2}", m * 1000.0)),
            trip(w, 0.50),
            trip(w, 0.99),
            fmt_ms(w.trip.last().map(|us| f64::from(*us) / 1000.0)),
            if (w.trip.len() as u64) < w.published {
                format!(
                    " ({} of the published not back within {DRAIN_TIMEOUT:?})",
                    w.published - w.trip.len() as u64
                )
            } else {
                String::new()
            },
            thousands(w.deleted as f64)
        );
    }
    println!();
    for w in &windows {
        println!("commits, {}: {}", w.label, w.commits.spread());
    }
    for w in &windows {
        println!(
            "cpu, {}: {}; load average at its end {}",
            w.label, w.cpu, w.load
        );
    }
    let pass_seconds = pass
        .caught_up
        .map(|c| (pass.started + c).duration_since(ready).as_secs_f64());
    match pass_seconds {
        Some(s) => println!(
            "pass:       retention {retention_s}s: {} readings due at start-up (of {}); {} deleted in {} from the daemon's readiness to catching up ({} rows/s), {} of them before the publisher started; deletes in chunks (RETENTION_CHUNK_ROWS in src/store/mod.rs), batches committed between them",
            thousands(due_at_start as f64),
            thousands(layout.readings as f64),
            thousands(pass.deleted_total as f64),
            duration_text(s),
            thousands(pass.deleted_total as f64 / s.max(1e-9)),
            thousands((pass.deleted_total - pass.deleted) as f64)
        ),
        None => println!(
            "pass:       retention {retention_s}s: {} readings due at start-up; NOT caught up within --pass-seconds {}: {} deleted",
            thousands(due_at_start as f64),
            args.pass_seconds,
            thousands(pass.deleted_total as f64)
        ),
    }
    if let Some(a) = &after {
        println!(
            "after:      {} more deleted in {:.1} s by later ticks (every {} s; the data holds {} readings a second)",
            thousands(a.deleted as f64),
            a.seconds,
            args.retention_interval,
            thousands(layout.devices as f64)
        );
    }
    let published: u64 = windows.iter().map(|w| w.published).sum();
    match (left, last) {
        (Ok(n), Ok(last)) => {
            let deleted = last.deleted;
            let off = (layout.readings + published) as i64 - deleted as i64 - n as i64;
            // A tick between the last scrape and the stop deletes what has come due since
            // the one before.
            let tick = (args.retention_interval + 1) * layout.devices;
            println!(
                "readings:   {} left after the stop; {} built - {} deleted (retention's count just before the stop) + {} published = {}: {}",
                thousands(n as f64),
                thousands(layout.readings as f64),
                thousands(deleted as f64),
                thousands(published as f64),
                thousands((layout.readings + published - deleted) as f64),
                if off == 0 {
                    "equal".to_owned()
                } else if (0..=tick as i64).contains(&off) {
                    format!(
                        "{off} fewer, at most a tick's worth ({}): retention ran once more before the stop",
                        thousands(tick as f64)
                    )
                } else {
                    format!("NO: off by {off}")
                }
            );
        }
        (Err(e), _) | (_, Err(e)) => println!("readings:   not counted: {e:#}"),
    }
    if !problems.is_empty() {
        println!(
            "daemon log: {} warning/error line(s); the first: {}",
            problems.len(),
            problems
                .iter()
                .take(3)
                .map(|l| format!("{l:.300}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let ratio = match (idle.commits.quantile(0.99), pass.commits.quantile(0.99)) {
        (Some(i), Some(p)) if i.is_finite() && p.is_finite() => Some(p / i),
        _ => None,
    };
    let met = pass_seconds.is_some() && ratio.is_some_and(|r| r <= TARGET_PASS_RATIO);
    println!(
        "target:     commit p99 during the pass {} ms vs idle {} ms (bucket bounds): {} x, target <= {TARGET_PASS_RATIO:.0} x: {}",
        ms(pass.commits.quantile(0.99)),
        ms(idle.commits.quantile(0.99)),
        ratio.map_or("-".into(), |r| format!("{r:.2}")),
        if met { "yes" } else { "NO" }
    );
    drop(broker);
    drop(pg);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------------------

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Seconds as `1 h 02 min`, `3 min 05 s` or `12.3 s`.
fn duration_text(secs: f64) -> String {
    let s = secs.max(0.0);
    if s >= 3600.0 {
        format!(
            "{} h {:02} min",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    } else if s >= 60.0 {
        format!("{} min {:02} s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!("{s:.1} s")
    }
}
