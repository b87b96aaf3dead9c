//! Logging setup, the periodic summary line, and the daemon's metrics: counters, gauges and
//! histograms in a `prometheus-client` registry ([`Metrics`]), encoded for `GET /metrics`
//! together with what storage counts at that scrape ([`Scrape`]).

mod histogram;
mod metrics;
mod scrape;

pub use histogram::{Histogram, buckets};
pub use metrics::Metrics;
pub use scrape::{Format, Scrape};

use crate::config::{LogColor, LogConfig, LogFormat};

/// Installs the global tracing subscriber; `RUST_LOG` overrides the configured level.
pub fn init_logging(cfg: &LogConfig) {
    // rumqttd logs every ordinary client disconnect, some at ERROR; keep it quiet unless
    // the filter names it.
    let level = if cfg.level.contains("rumqttd") {
        cfg.level.clone()
    } else {
        format!("{},rumqttd=off", cfg.level)
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only on a terminal (not in a file or the journal), unless told.
    let ansi = match cfg.color {
        LogColor::Always => true,
        LogColor::Never => false,
        LogColor::Auto => std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    // A second init (tests run several apps in one process) is harmless.
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Logs a one-line summary of rates at info level every `every`, until cancelled.
pub async fn summarize(
    metrics: std::sync::Arc<Metrics>,
    every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    let (mut received, mut stored) = (0u64, 0u64);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = metrics.received.get();
        let s = metrics.stored.get();
        let secs = every.as_secs_f64();
        tracing::info!(
            received_per_s = format!("{:.1}", (r - received) as f64 / secs),
            stored_per_s = format!("{:.1}", (s - stored) as f64 / secs),
            stored_total = s,
            rejected_total = metrics.rejected_total(),
            queue = metrics.queue_depth.get(),
            mqtt_connected = metrics.mqtt_connected.get() == 1,
            sse_clients = metrics.sse_clients.get(),
            ws_clients = metrics.ws_clients.get(),
            commands = metrics.commands_accepted.get(),
            "summary"
        );
        (received, stored) = (r, s);
    }
}
