//! What the benchmarks share: a private Mosquitto and the release daemon, each started on
//! free loopback ports and stopped by a Drop guard (children by their pid).

#![allow(dead_code, reason = "each benchmark uses a different part")]

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
