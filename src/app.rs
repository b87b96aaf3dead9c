//! Wiring: builds every part from a config, runs them on one task tracker, and shuts them
//! down in order (stop intake, flush and ack, close) when the token fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alerts::{self, Webhooks};
use crate::auth::Auth;
use crate::broker::{self, BrokerChoice};
use crate::commands::Commands;
use crate::config::{Config, RuleConfig};
use crate::feed::Feed;
use crate::ingest::Ingest;
use crate::limits::Limits;
use crate::mqtt::{MqttHandle, MqttLink};
use crate::observability::Metrics;
use crate::simulate::{self, SimConfig};
use crate::store::{self, Committed, Store};
use crate::{service, tls, web};

/// How long shutdown may take before we stop waiting.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Options of `telebridge run` beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Also start simulated devices.
    pub demo: bool,
}

/// Shared state the HTTP side reads.
#[derive(Clone)]
pub struct Shared {
    /// Read access to storage.
    pub store: Store,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The MQTT link.
    pub mqtt: MqttHandle,
    /// Seq of the last committed reading.
    pub last_seq: watch::Receiver<i64>,
    /// The live feed.
    pub feed: Arc<Feed>,
    /// SSE heartbeat interval.
    pub heartbeat: Duration,
    /// Fires on shutdown so that every stream ends with a final event.
    pub streams_stop: CancellationToken,
    /// The command service.
    pub commands: Arc<Commands>,
    /// Origins allowed besides the page's own.
    pub allowed_origins: Arc<Vec<String>>,
    /// Commands per second per WebSocket connection.
    pub command_rate: u32,
    /// Tokens and sessions.
    pub auth: Auth,
    /// Connection limits.
    pub limits: Arc<Limits>,
    /// This instance's name: its MQTT client id, fixed per instance.
    pub instance: Arc<str>,
    /// Tier retention and units, for the series API.
    pub series: Arc<crate::series::Settings>,
    /// The runtime of the command path: WebSocket sessions run there.
    pub control: tokio::runtime::Handle,
    /// Where alert changes made over the API (acknowledgements) are delivered.
    pub webhooks: Arc<Webhooks>,
    /// How a device publishes, for the dashboard's first run: broker, topic and an example.
    pub publish_hint: Arc<serde_json::Value>,
    /// `[commands.templates]` as `GET /api/commands/templates` answers.
    pub command_templates: Arc<serde_json::Value>,
}

/// The console's command templates, by name.
fn command_templates(config: &Config) -> serde_json::Value {
    let templates: Vec<_> = config
        .commands
        .templates
        .iter()
        .map(|(name, params)| serde_json::json!({"name": name, "params": params}))
        .collect();
    serde_json::json!({ "templates": templates })
}

/// The broker and telemetry topic a new device publishes to, and a `mosquitto_pub` line.
fn publish_hint(config: &Config) -> serde_json::Value {
    let url = &config.mqtt.url;
    let template = config.topics.telemetry.as_str();
    let topic = template.replace("{device}", "my-sensor");
    let tls = if url.tls { " --cafile ca.pem" } else { "" };
    let example = format!(
        "mosquitto_pub -h {} -p {}{tls} -q 1 -t {topic} -m '{{\"temperature\": 21.5}}'",
        url.host, url.port
    );
    serde_json::json!({
        "host": url.host,
        "port": url.port,
        "tls": url.tls,
        "topic": template,
        "example": example,
        "payload": {"temperature": 21.5},
    })
}

/// A built, not yet running, daemon.
pub struct App {
    config: Config,
    options: RunOptions,
    shared: Shared,
    broker: BrokerChoice,
    link: MqttLink,
    writer: store::Writer,
    committed: Committed,
    command_changes: mpsc::Receiver<crate::store::CommandChange>,
    http: web::Server,
    control: SideRuntime,
    alerts: AlertParts,
}

/// The alert engine's inputs, until it runs.
struct AlertParts {
    input: Arc<alerts::Input>,
    observed: mpsc::Receiver<Vec<alerts::Observed>>,
    webhook_runners: Vec<alerts::webhook::Runner>,
    rules: watch::Sender<Arc<Vec<RuleConfig>>>,
    rules_rx: watch::Receiver<Arc<Vec<RuleConfig>>>,
}

/// Hands new alert rules to a running daemon (SIGHUP).
#[derive(Clone)]
pub struct RulesHandle(watch::Sender<Arc<Vec<RuleConfig>>>);

impl RulesHandle {
    /// Replaces the rules; the engine takes them at once, and nothing else changes.
    pub fn reload(&self, rules: Vec<RuleConfig>) {
        self.0.send_replace(Arc::new(rules));
    }
}

impl App {
    /// Starts the broker if needed, opens storage and binds the HTTP listener.
    pub async fn build(config: Config, options: RunOptions) -> anyhow::Result<App> {
        let broker = broker::start(&config.broker)?;
        let (store, writer) = Store::open(&config.storage)
            .await
            .with_context(|| format!("opening storage at {}", config.storage.describe()))?;
        let metrics = Arc::new(Metrics::default());
        let link = MqttLink::new(&config.mqtt, &config.topics, metrics.clone())
            .context("setting up TLS for [mqtt]")?;
        let (last_seq_tx, last_seq) = watch::channel(store.opened_at());
        let feed = Feed::new(config.http.sse_buffer);
        let commands = Commands::new(
            store.clone(),
            link.handle(),
            config.topics.command.clone(),
            config.commands.clone(),
            metrics.clone(),
        );
        let (changes_tx, changes_rx) = mpsc::channel(4096);
        let (webhooks, webhook_runners) = Webhooks::new(&config.alerts, metrics.clone())
            .context("setting up the alert webhooks")?;
        let webhooks = Arc::new(webhooks);
        let (input, observed) =
            alerts::Input::new(!config.alerts.rules.is_empty() || config.presence.stale_after > 0);
        let (rules, rules_rx) = watch::channel(Arc::new(config.alerts.rules.clone()));
        let control = SideRuntime::start("commands").context("starting the command thread")?;
        let session_key = store
            .session_key()
            .await
            .context("reading the session key")?;
        let shared = Shared {
            auth: Auth::new(config.auth.tokens.clone(), session_key),
            limits: Limits::new(
                config.http.max_sse_clients,
                config.http.max_ws_clients,
                config.http.max_streams_per_ip,
            ),
            commands,
            allowed_origins: Arc::new(config.http.allowed_origins.clone()),
            command_rate: config.commands.rate_limit,
            store,
            metrics,
            mqtt: link.handle(),
            last_seq,
            feed: feed.clone(),
            heartbeat: config.http.heartbeat,
            streams_stop: CancellationToken::new(),
            instance: Arc::from(config.mqtt.client_id.as_str()),
            series: Arc::new(crate::series::Settings::of(&config)),
            control: control.handle().clone(),
            webhooks,
            publish_hint: Arc::new(publish_hint(&config)),
            command_templates: Arc::new(command_templates(&config)),
        };
        let https = match (&config.http.tls_cert, &config.http.tls_key) {
            (Some(cert), Some(key)) => {
                Some(tls::server_config(cert, key).context("loading the HTTPS certificate")?)
            }
            _ => None,
        };
        let http = web::Server::bind(config.http.listen, https, shared.clone())
            .await
            .with_context(|| format!("listening for HTTP on {}", config.http.listen))?;
        Ok(App {
            config,
            options,
            shared,
            broker,
            link,
            writer,
            committed: Committed {
                last_seq: last_seq_tx,
                feed,
                commands: changes_tx,
                alerts: input.clone(),
            },
            command_changes: changes_rx,
            http,
            control,
            alerts: AlertParts {
                input,
                observed,
                webhook_runners,
                rules,
                rules_rx,
            },
        })
    }

    /// The address the HTTP server listens on.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// The dashboard's URL: `http://` or `https://` and the bound address.
    pub fn dashboard_url(&self) -> String {
        let scheme = if self.http.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}/", self.http.local_addr())
    }

    /// Where new alert rules go, for a reload on SIGHUP.
    pub fn rules_handle(&self) -> RulesHandle {
        RulesHandle(self.alerts.rules.clone())
    }

    /// Whether the embedded broker was started.
    pub fn broker(&self) -> BrokerChoice {
        self.broker
    }

    /// Runs until `shutdown` fires, then stops intake, commits and acknowledges everything
    /// pending, and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let App {
            config,
            options,
            shared,
            link,
            writer,
            committed,
            command_changes,
            http,
            control,
            alerts: alert_parts,
            ..
        } = self;
        let http_addr = http.local_addr();
        let tracker = TaskTracker::new();
        // MQTT intake and the SQLite writer get a runtime and OS thread of their own, so
        // that a thousand busy SSE streams on the main runtime never delay a commit.
        let ingest_rt = SideRuntime::start("ingest").context("starting the ingest thread")?;
        let writer_done = CancellationToken::new();
        let writer_failed = Arc::new(std::sync::Mutex::new(None::<store::StoreError>));

        let (items_tx, items_rx) = mpsc::channel(config.storage.queue);
        let acker = Box::new(link.acker());
        {
            let metrics = shared.metrics.clone();
            let storage = store::WriterConfig::from(&config.storage);
            let done = writer_done.clone();
            let failed = writer_failed.clone();
            let stop = shutdown.child_token();
            tracker.spawn_on(
                async move {
                    if let Err(e) = writer
                        .run(storage, items_rx, acker, metrics, committed, stop)
                        .await
                    {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    }
                    done.cancel();
                },
                ingest_rt.handle(),
            );
        }
        let ingest = Arc::new(Ingest::new(
            config.topics.clone(),
            config.mqtt.max_payload,
            shared.metrics.clone(),
        ));
        tracker.spawn_on(
            link.run(
                ingest,
                items_tx,
                shutdown.child_token(),
                writer_done.clone(),
            ),
            ingest_rt.handle(),
        );
        tracker.spawn(store::run_housekeeping(
            shared.store.clone(),
            config.storage.clone(),
            config.presence.timeout,
            shared.metrics.clone(),
            shutdown.child_token(),
        ));
        tracker.spawn_on(
            shared
                .commands
                .clone()
                .run(command_changes, shutdown.child_token()),
            control.handle(),
        );
        for runner in alert_parts.webhook_runners {
            tracker.spawn(runner.run(shutdown.child_token()));
        }
        {
            let engine = alerts::Engine::new(
                shared.store.clone(),
                shared.metrics.clone(),
                shared.webhooks.clone(),
                alert_parts.input,
                &config.alerts.rules,
                &config.presence,
            );
            // Held by the task, so that the rules channel stays open without a RulesHandle.
            let rules = alert_parts.rules;
            let stop = shutdown.child_token();
            tracker.spawn(async move {
                let _rules = rules;
                engine
                    .run(alert_parts.observed, alert_parts.rules_rx, stop)
                    .await;
            });
        }
        tracker.spawn(http.run(shutdown.child_token()));
        if !config.log.summary.is_zero() {
            tracker.spawn(crate::observability::summarize(
                shared.metrics.clone(),
                config.log.summary,
                shutdown.child_token(),
            ));
        }
        if options.demo {
            let sim = SimConfig {
                url: config.mqtt.url.clone(),
                devices: 5,
                rate: 1.0,
                prefix: "demo".into(),
                topics: config.topics.clone(),
                tls: config.mqtt.tls_files(),
            };
            simulate::spawn(&sim, &tracker, &shutdown.child_token()).map_err(anyhow::Error::msg)?;
            tracing::info!(devices = sim.devices, "demo: simulated devices started");
        }
        tracker.spawn(service::watchdog(
            shared.store.clone(),
            shutdown.child_token(),
        ));
        tracker.close();
        service::ready();
        tracing::info!(
            http = %http_addr,
            mqtt = %config.mqtt.url,
            storage = %config.storage.describe(),
            "telebridge running"
        );

        shutdown.cancelled().await;
        service::stopping();
        shared.streams_stop.cancel();
        tracing::info!(
            "shutting down: stopping intake, committing and acknowledging pending readings"
        );
        let waited = tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait()).await;
        ingest_rt.stop();
        control.stop();
        let failed = writer_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(e) = failed {
            return Err(anyhow::Error::new(e).context(
                "stopped while storage was failing: what was not committed was not acknowledged, and the broker keeps it",
            ));
        }
        if waited.is_err() {
            anyhow::bail!(
                "shutdown took longer than {SHUTDOWN_DEADLINE:?}; some tasks were abandoned"
            );
        }
        tracing::info!(stored = shared.metrics.stored.get(), "stopped cleanly");
        Ok(())
    }
}

/// A current-thread runtime on an OS thread of its own: intake and the writer on one, the
/// command path (WebSocket sessions and the command service) on another, so that work on the
/// main runtime (thousands of SSE streams) never queues in front of them.
struct SideRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SideRuntime {
    fn start(name: &str) -> std::io::Result<SideRuntime> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Runs the spawned tasks until told to stop (after they have finished).
                let _ = rt.block_on(stopped);
                // A DNS lookup of a reconnect in progress must not hold up the exit.
                rt.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(SideRuntime {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Stops the runtime; its tasks must have finished (the tracker waited for them).
    fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SideRuntime {
    /// An early error return must not leave the thread running on its own.
    fn drop(&mut self) {
        self.stop_now();
    }
}
