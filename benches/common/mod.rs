//! What the benchmarks share: a private Mosquitto and the release daemon, each started on
//! free loopback ports and stopped by a Drop guard (children by their pid).

#![allow(dead_code, reason = "each benchmark uses a different part")]

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use tempfile::TempDir;
use tokio::time::timeout;

/// Debian's Mosquitto.
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// How long the daemon may take to print its address and answer /readyz.
pub const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Processes: Mosquitto and the daemon, each behind a Drop guard
// ---------------------------------------------------------------------------------------

pub struct Mosquitto {
    pub child: Child,
    pub port: u16,
    pub version: String,
    pub settings: String,
    pub dir: TempDir,
}

impl Mosquitto {
    pub fn start() -> anyhow::Result<Mosquitto> {
        if !Path::new(MOSQUITTO).exists() {
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
        let settings = "allow_anonymous true\n\
                        max_inflight_messages 0\n\
                        max_queued_messages 10000000\n\
                        set_tcp_nodelay true\n\
                        persistence false"
            .to_owned();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n{settings}\nlog_dest stderr\nlog_type error\nlog_type warning\n"
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("mosquitto.log"))?;
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
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
            if let Some(status) = broker.child.try_wait()? {
                bail!("Mosquitto exited at start-up ({status}): {}", broker.log());
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(broker);
            }
            if Instant::now() > deadline {
                bail!(
                    "Mosquitto does not listen on {addr} after 10 s: {}",
                    broker.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

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

pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub db: PathBuf,
    pub dir: TempDir,
    pub http: reqwest::Client,
}

impl Daemon {
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
        let stderr = std::fs::File::create(dir.path().join("daemon.log"))?;
        let mut child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn metrics(&self) -> anyhow::Result<String> {
        get_text(&self.http, self.addr, "/metrics").await
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
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
    (at(0) + at(1) + at(2) + at(5) + at(6) + at(7)) / 100.0
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// User plus system CPU seconds of a process so far (clock ticks of 1/100 s).
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
    (tick(11) + tick(12)) / 100.0
}

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

pub fn tokio_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The release daemon: the one `cargo bench` just built, else target/release/telebridge,
/// built with `cargo build --release` when missing.
pub fn daemon_binary() -> anyhow::Result<PathBuf> {
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
    pub nproc: String,
    pub cpu: String,
    pub mem: String,
    pub kernel: String,
}

impl Machine {
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
        let cpu = match mhz {
            Some(m) => format!("{cpu} @ {m} MHz"),
            None => cpu,
        };
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
            mem,
            kernel,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "nproc {}, CPU {}, memory {}, Linux {}, open-file limit {}",
            self.nproc,
            self.cpu,
            self.mem,
            self.kernel,
            open_file_limit().map_or("?".into(), |n| n.to_string())
        )
    }
}

/// Runs a benchmark on a multi-threaded runtime; on Ctrl-C its future is dropped, and with it
/// every guard (daemon, broker). Errors are printed; the exit code says how it went.
pub fn run_to_exit(
    bench: impl std::future::Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    use std::process::ExitCode;
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
