//! The telebridge command line: wiring only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use telebridge::app::RunOptions;
use telebridge::config::{Config, ConfigError, MqttUrl, TopicsConfig};
use telebridge::observability;
use telebridge::simulate::{self, SimConfig};
use telebridge::tls::ClientFiles;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

// jemalloc keeps its metadata out of the blocks it hands out, so the untouched part of each
// connection's 8 KiB I/O buffers never becomes resident (glibc's inline chunk headers touch
// it): 10,000 idle SSE connections take 11.4 KB each instead of 14.1 KB (mimalloc: 21.9 KB).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// IoT telemetry bridge: MQTT in, SQLite history, SSE feeds and WebSocket commands out.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Config file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
        /// Also start simulated devices that publish telemetry and answer commands.
        #[arg(long)]
        demo: bool,
    },
    /// Write the commented example config (every key with its default) to PATH.
    Init {
        /// Where to write it; an existing file is never overwritten.
        #[arg(default_value = "config.toml")]
        path: PathBuf,
    },
    /// Validate a config file: exit 0, or print every problem and exit 2.
    Check {
        /// Config file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
    },
    /// Make a new access token and print the [[auth.tokens]] entry to paste into the config.
    Token {
        /// Who holds it.
        #[arg(long)]
        name: String,
        /// viewer (feeds and history) or operator (also commands).
        #[arg(long, default_value = "viewer", value_parser = ["viewer", "operator"])]
        role: String,
        /// Device id globs it may see, comma-separated.
        #[arg(long, default_value = "*")]
        devices: String,
    },
    /// Print the man page (roff) to stdout.
    Man,
    /// Print shell completions to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Run simulated devices against any MQTT broker.
    Simulate {
        /// Broker URL.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        url: MqttUrl,
        /// Number of devices.
        #[arg(long, default_value_t = 5)]
        devices: usize,
        /// Readings per second per device.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Device id prefix.
        #[arg(long, default_value = "sim")]
        prefix: String,
        /// With mqtts://: CA certificates (PEM) that sign the broker's; default the system's.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// With mqtts://: client certificate (PEM) for brokers that require one.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// With mqtts://: the client certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
}

/// The man page, generated from the command line's own definition.
fn print_man() -> ExitCode {
    let page = clap_mangen::Man::new(Cli::command());
    match page.render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the man page: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit code for an invalid or unreadable config.
const EXIT_CONFIG: u8 = 2;
/// Exit code when storage cannot be opened at start-up, or fails at shutdown.
const EXIT_STORAGE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: OK", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_failed(&e),
        },
        Command::Init { path } => init(&path),
        Command::Man => print_man(),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "telebridge",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Run { config, demo } => {
            // The demo runs anywhere: without a config file it takes the example's values.
            let built_in = demo && !config.exists() && config == Path::new(DEFAULT_CONFIG);
            let loaded = if built_in {
                Config::parse(telebridge::config::EXAMPLE).map_err(|problems| {
                    ConfigError::Invalid {
                        path: "(built-in example)".into(),
                        problems,
                    }
                })
            } else {
                Config::load(&config)
            };
            let cfg = match loaded {
                Ok(c) => c,
                Err(e) => return config_failed(&e),
            };
            if built_in {
                eprintln!(
                    "no {} here: the demo runs on the built-in example config (`telebridge init` writes it out)",
                    config.display()
                );
            }
            observability::init_logging(&cfg.log);
            runtime(|| run(cfg, config, RunOptions { demo }))
        }
        Command::Token {
            name,
            role,
            devices,
        } => {
            let (token, hash) = telebridge::auth::new_token();
            let globs: Vec<String> = devices
                .split(',')
                .map(|d| format!("{:?}", d.trim()))
                .collect();
            println!(
                "# Token for {name:?} (shown once; telebridge keeps only its hash):\n# {token}\n"
            );
            println!(
                "[[auth.tokens]]\nname = {name:?}\nrole = {role:?}\nhash = \"{hash}\"\ndevices = [{}]",
                globs.join(", ")
            );
            ExitCode::SUCCESS
        }
        Command::Simulate {
            url,
            devices,
            rate,
            prefix,
            tls_ca,
            tls_cert,
            tls_key,
        } => {
            observability::init_logging(&Default::default());
            if !(rate > 0.0 && rate <= 100_000.0) || devices == 0 {
                eprintln!("error: --devices must be at least 1 and --rate between 0 and 100000");
                return ExitCode::from(EXIT_CONFIG);
            }
            if !url.tls && (tls_ca.is_some() || tls_cert.is_some()) {
                eprintln!("error: --tls-ca, --tls-cert and --tls-key need an mqtts:// --url");
                return ExitCode::from(EXIT_CONFIG);
            }
            let sim = SimConfig {
                url,
                devices,
                rate,
                prefix,
                topics: TopicsConfig::default(),
                tls: ClientFiles {
                    ca: tls_ca,
                    cert: tls_cert,
                    key: tls_key,
                },
            };
            runtime(|| simulate_only(sim))
        }
    }
}

/// The config file `run` and `check` read when `--config` is not given.
const DEFAULT_CONFIG: &str = "config.toml";

/// `telebridge init [PATH]`: writes the example config, never over an existing file.
fn init(path: &Path) -> ExitCode {
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut f| {
            use std::io::Write as _;
            f.write_all(telebridge::config::EXAMPLE.as_bytes())
        });
    match written {
        Ok(()) => {
            println!(
                "wrote {}: every key with its default and a comment; edit it, then `telebridge check --config {0}`",
                path.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            eprintln!(
                "error: {} exists; not overwriting it (move it away, or name another path)",
                path.display()
            );
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("error: cannot write {}: {e}", path.display());
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn config_failed(e: &ConfigError) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(lower_priority)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let storage = e
                .chain()
                .any(|c| c.downcast_ref::<telebridge::store::StoreError>().is_some());
            if storage {
                ExitCode::from(EXIT_STORAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// How much nicer than the ingest and command threads the main runtime's workers are.
const WORKER_NICE: i32 = 5;

/// Lowers the CPU priority of the calling thread (a main-runtime worker: SSE fan-out, the
/// HTTP API, housekeeping). When the cores are full, a commit or a command round trip on
/// the ingest and command threads then waits less behind writes to browsers. On Linux a
/// nice value is per thread; raising it needs no privilege.
fn lower_priority() {
    if let Err(e) = rustix::process::nice(WORKER_NICE) {
        tracing::debug!(error = %e, "cannot lower the worker thread's priority");
    }
}

async fn run(cfg: Config, path: PathBuf, options: RunOptions) -> anyhow::Result<()> {
    let signals = Signals::register()?;
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let app = telebridge::App::build(cfg, options).await?;
    println!("telebridge dashboard: {}", app.dashboard_url());
    let shutdown = CancellationToken::new();
    tokio::spawn(signals.cancel_on_first(shutdown.clone()));
    tokio::spawn(reload_rules_on_hup(hup, path, app.rules_handle()));
    app.run(shutdown).await
}

/// On SIGHUP, reads the config file again and hands its alert rules, and only those, to the
/// running daemon; a file with problems changes nothing and says why.
async fn reload_rules_on_hup(
    mut hup: tokio::signal::unix::Signal,
    path: PathBuf,
    rules: telebridge::app::RulesHandle,
) {
    while hup.recv().await.is_some() {
        match Config::load(&path) {
            Ok(cfg) => {
                tracing::info!(path = %path.display(), rules = cfg.alerts.rules.len(), "SIGHUP: alert rules reloaded; the rest of the config is as it was started");
                rules.reload(cfg.alerts.rules);
            }
            Err(e) => {
                tracing::error!("SIGHUP: keeping the current alert rules: {e}");
            }
        }
    }
}

async fn simulate_only(sim: SimConfig) -> anyhow::Result<()> {
    let signals = Signals::register()?;
    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    simulate::spawn(&sim, &tracker, &cancel).map_err(anyhow::Error::msg)?;
    tracker.close();
    println!(
        "simulating {} devices at {}/s each against {}",
        sim.devices, sim.rate, sim.url
    );
    signals.cancel_on_first(cancel.clone()).await;
    tracker.wait().await;
    Ok(())
}

/// SIGTERM and SIGINT, registered at once: a signal that arrives before anything waits for
/// it is kept, not left to its default action (killing the process mid-write).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    /// Fires `token` on the first of them.
    async fn cancel_on_first(mut self, token: CancellationToken) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
        token.cancel();
    }
}
