//! Logging setup and the daemon's counters, rendered in Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::config::{LogColor, LogConfig, LogFormat};
use crate::ingest::Reject;

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
        let r = metrics.received.load(Ordering::Relaxed);
        let s = metrics.stored.load(Ordering::Relaxed);
        let secs = every.as_secs_f64();
        tracing::info!(
            received_per_s = format!("{:.1}", (r - received) as f64 / secs),
            stored_per_s = format!("{:.1}", (s - stored) as f64 / secs),
            stored_total = s,
            rejected_total = metrics.rejected_total(),
            queue = metrics.queue_depth.load(Ordering::Relaxed),
            mqtt_connected = metrics.mqtt_connected.load(Ordering::Relaxed) == 1,
            sse_clients = metrics.sse_clients.load(Ordering::Relaxed),
            ws_clients = metrics.ws_clients.load(Ordering::Relaxed),
            commands = metrics.commands_accepted.load(Ordering::Relaxed),
            "summary"
        );
        (received, stored) = (r, s);
    }
}

/// Counters and gauges shared by every part of the daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    /// MQTT messages received on our subscriptions.
    pub received: AtomicU64,
    /// Readings committed to SQLite.
    pub stored: AtomicU64,
    /// Presence changes committed.
    pub presence: AtomicU64,
    rejected_too_large: AtomicU64,
    rejected_bad_device: AtomicU64,
    rejected_unknown_topic: AtomicU64,
    rejected_bad_status: AtomicU64,
    rejected_bad_ack: AtomicU64,
    /// Write transactions committed.
    pub batches: AtomicU64,
    /// How long each batch took to commit, retries included.
    pub commit_latency: Histogram,
    /// Sum of commit latencies, microseconds.
    pub commit_micros: AtomicU64,
    /// Write transactions that failed (and were retried).
    pub commit_failures: AtomicU64,
    /// Times the writer restarted the WAL from its start to keep it bounded.
    pub wal_restarts: AtomicU64,
    /// Items waiting for the writer.
    pub queue_depth: AtomicI64,
    /// 1 while connected to the broker.
    pub mqtt_connected: AtomicI64,
    /// Connections made to the broker after the first.
    pub mqtt_reconnects: AtomicU64,
    /// Acks dropped because their connection was gone.
    pub stale_acks: AtomicU64,
    /// Readings deleted by retention.
    pub retention_deleted: AtomicU64,
    /// Readings not stored because they repeat a stored one (QoS 1 redelivery).
    pub repeated: AtomicU64,
    /// Devices marked offline for silence.
    pub presence_timeouts: AtomicU64,
    /// Open SSE streams.
    pub sse_clients: AtomicI64,
    /// SSE streams closed because the client fell behind.
    pub sse_cut: AtomicU64,
    /// SSE streams served in all.
    pub sse_connections: AtomicU64,
    /// Acks for unknown or already finished commands.
    pub unknown_acks: AtomicU64,
    /// Open WebSocket connections.
    pub ws_clients: AtomicI64,
    /// Commands accepted.
    pub commands_accepted: AtomicU64,
    /// Commands by final status: acked, failed, timeout, expired.
    pub commands_acked: AtomicU64,
    /// Commands the device answered with ok: false.
    pub commands_failed: AtomicU64,
    /// Commands without an answer in time.
    pub commands_timeout: AtomicU64,
    /// Queued commands whose ttl ran out.
    pub commands_expired: AtomicU64,
    /// Queued commands an operator cancelled.
    pub commands_cancelled: AtomicU64,
    /// Bad WebSocket or API command messages, all codes.
    pub command_errors: AtomicU64,
    /// Sum of command round trips, microseconds.
    pub command_rtt_micros: AtomicU64,
    /// Requests refused for a missing or bad token.
    pub auth_failures: AtomicU64,
    /// Requests refused for lack of a role or device scope.
    pub forbidden: AtomicU64,
    /// Connections refused by a limit.
    pub limit_refusals: AtomicU64,
    /// Alerts this instance fired.
    pub alerts_fired: AtomicU64,
    /// Alerts this instance saw acknowledged.
    pub alerts_acknowledged: AtomicU64,
    /// Alerts this instance resolved.
    pub alerts_resolved: AtomicU64,
    /// Times the alert engine's queue overflowed and it read the log back.
    pub alert_catch_ups: AtomicU64,
    /// Webhook deliveries the receiver accepted (2xx).
    pub webhook_delivered: AtomicU64,
    /// Webhook deliveries given up after every attempt, or refused for good (4xx).
    pub webhook_failed: AtomicU64,
    /// Webhook attempts after the first.
    pub webhook_retries: AtomicU64,
    /// Webhook deliveries dropped because the queue was full.
    pub webhook_dropped: AtomicU64,
    /// Webhook deliveries waiting, all queues.
    pub webhook_queued: AtomicI64,
    /// The newest seq this instance's tail has published (PostgreSQL).
    pub tail_seen: AtomicI64,
    /// The newest seq any instance has committed, as last read (PostgreSQL).
    pub tail_head: AtomicI64,
}

impl Metrics {
    fn rejected_counter(&self, reason: Reject) -> &AtomicU64 {
        match reason {
            Reject::TooLarge => &self.rejected_too_large,
            Reject::BadDevice => &self.rejected_bad_device,
            Reject::UnknownTopic => &self.rejected_unknown_topic,
            Reject::BadStatus => &self.rejected_bad_status,
            Reject::BadAck => &self.rejected_bad_ack,
        }
    }

    /// Counts an alert change this instance stored.
    pub fn alert_changed(&self, state: &str) {
        let c = match state {
            "firing" => &self.alerts_fired,
            "acknowledged" => &self.alerts_acknowledged,
            _ => &self.alerts_resolved,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one rejected message.
    pub fn rejected(&self, reason: Reject) {
        self.rejected_counter(reason)
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Rejected messages of all reasons.
    pub fn rejected_total(&self) -> u64 {
        Reject::ALL.iter().map(|r| self.rejected_count(*r)).sum()
    }

    /// Rejected messages of one reason.
    pub fn rejected_count(&self, reason: Reject) -> u64 {
        self.rejected_counter(reason).load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter(
            &mut out,
            "telebridge_messages_received_total",
            "MQTT messages received.",
            g(&self.received),
        );
        counter(
            &mut out,
            "telebridge_readings_stored_total",
            "Readings committed to SQLite.",
            g(&self.stored),
        );
        counter(
            &mut out,
            "telebridge_presence_changes_total",
            "Presence reports committed.",
            g(&self.presence),
        );
        let _ = writeln!(
            out,
            "# HELP telebridge_messages_rejected_total MQTT messages rejected, by reason."
        );
        let _ = writeln!(out, "# TYPE telebridge_messages_rejected_total counter");
        for r in Reject::ALL {
            let _ = writeln!(
                out,
                "telebridge_messages_rejected_total{{reason=\"{}\"}} {}",
                r.as_str(),
                self.rejected_count(r)
            );
        }
        counter(
            &mut out,
            "telebridge_store_batches_total",
            "Write transactions committed.",
            g(&self.batches),
        );
        self.commit_latency.render(
            &mut out,
            "telebridge_store_batch_commit_seconds",
            "How long a batch of readings took to commit, retries included.",
        );
        let _ = writeln!(
            out,
            "# HELP telebridge_store_commit_seconds_total Time spent in write transactions."
        );
        let _ = writeln!(out, "# TYPE telebridge_store_commit_seconds_total counter");
        let _ = writeln!(
            out,
            "telebridge_store_commit_seconds_total {}",
            g(&self.commit_micros) as f64 / 1e6
        );
        counter(
            &mut out,
            "telebridge_store_commit_failures_total",
            "Write transactions that failed and were retried (disk full, read-only, locked, ...).",
            g(&self.commit_failures),
        );
        counter(
            &mut out,
            "telebridge_store_wal_restarts_total",
            "Times the writer restarted the WAL from its start, keeping it under 64 MiB.",
            g(&self.wal_restarts),
        );
        gauge(
            &mut out,
            "telebridge_ingest_queue_depth",
            "Items waiting for the SQLite writer.",
            self.queue_depth.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "telebridge_mqtt_connected",
            "1 while connected to the broker.",
            self.mqtt_connected.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "telebridge_mqtt_reconnects_total",
            "Reconnections to the broker.",
            g(&self.mqtt_reconnects),
        );
        counter(
            &mut out,
            "telebridge_mqtt_stale_acks_total",
            "Acks dropped because their connection had closed.",
            g(&self.stale_acks),
        );
        counter(
            &mut out,
            "telebridge_retention_deleted_total",
            "Readings deleted by retention.",
            g(&self.retention_deleted),
        );
        counter(
            &mut out,
            "telebridge_readings_repeated_total",
            "Readings acknowledged but not stored again: same device, ts and payload as a stored one (QoS 1 redelivery).",
            g(&self.repeated),
        );
        counter(
            &mut out,
            "telebridge_presence_timeouts_total",
            "Devices marked offline after silence.",
            g(&self.presence_timeouts),
        );
        gauge(
            &mut out,
            "telebridge_sse_clients",
            "Open SSE streams.",
            self.sse_clients.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "telebridge_sse_connections_total",
            "SSE streams opened.",
            g(&self.sse_connections),
        );
        counter(
            &mut out,
            "telebridge_sse_clients_cut_total",
            "SSE streams closed because the client fell behind the live buffer.",
            g(&self.sse_cut),
        );
        counter(
            &mut out,
            "telebridge_command_acks_unknown_total",
            "Acks for unknown or finished commands.",
            g(&self.unknown_acks),
        );
        gauge(
            &mut out,
            "telebridge_ws_clients",
            "Open WebSocket connections.",
            self.ws_clients.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "telebridge_commands_accepted_total",
            "Commands accepted.",
            g(&self.commands_accepted),
        );
        let _ = writeln!(
            out,
            "# HELP telebridge_commands_finished_total Commands by final status."
        );
        let _ = writeln!(out, "# TYPE telebridge_commands_finished_total counter");
        for (status, c) in [
            ("acked", &self.commands_acked),
            ("failed", &self.commands_failed),
            ("timeout", &self.commands_timeout),
            ("expired", &self.commands_expired),
            ("cancelled", &self.commands_cancelled),
        ] {
            let _ = writeln!(
                out,
                "telebridge_commands_finished_total{{status=\"{status}\"}} {}",
                g(c)
            );
        }
        counter(
            &mut out,
            "telebridge_command_errors_total",
            "Refused command messages.",
            g(&self.command_errors),
        );
        counter(
            &mut out,
            "telebridge_auth_failures_total",
            "Requests refused for a missing or bad token.",
            g(&self.auth_failures),
        );
        counter(
            &mut out,
            "telebridge_forbidden_total",
            "Requests refused for lack of a role or device scope.",
            g(&self.forbidden),
        );
        counter(
            &mut out,
            "telebridge_limit_refusals_total",
            "Connections refused by a configured limit.",
            g(&self.limit_refusals),
        );
        let _ = writeln!(
            out,
            "# HELP telebridge_alert_changes_total Alert changes this instance stored, by new state.\n# TYPE telebridge_alert_changes_total counter"
        );
        for (state, c) in [
            ("firing", &self.alerts_fired),
            ("acknowledged", &self.alerts_acknowledged),
            ("resolved", &self.alerts_resolved),
        ] {
            let _ = writeln!(
                out,
                "telebridge_alert_changes_total{{state=\"{state}\"}} {}",
                g(c)
            );
        }
        counter(
            &mut out,
            "telebridge_alert_catch_ups_total",
            "Times the alert engine fell behind and read the log back.",
            g(&self.alert_catch_ups),
        );
        counter(
            &mut out,
            "telebridge_webhook_deliveries_total",
            "Webhook deliveries the receiver accepted.",
            g(&self.webhook_delivered),
        );
        counter(
            &mut out,
            "telebridge_webhook_failures_total",
            "Webhook deliveries given up after every attempt, or refused (4xx).",
            g(&self.webhook_failed),
        );
        counter(
            &mut out,
            "telebridge_webhook_retries_total",
            "Webhook attempts after the first.",
            g(&self.webhook_retries),
        );
        counter(
            &mut out,
            "telebridge_webhook_dropped_total",
            "Webhook deliveries dropped because the queue was full.",
            g(&self.webhook_dropped),
        );
        gauge(
            &mut out,
            "telebridge_webhook_queue_depth",
            "Webhook deliveries waiting.",
            self.webhook_queued.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP telebridge_command_rtt_seconds_total Sum of command round trips (divide by acked+failed)."
        );
        let _ = writeln!(out, "# TYPE telebridge_command_rtt_seconds_total counter");
        let _ = writeln!(
            out,
            "telebridge_command_rtt_seconds_total {}",
            g(&self.command_rtt_micros) as f64 / 1e6
        );
        out
    }
}

/// Appends what storage counts: devices by presence, open alerts by severity.
pub fn render_gauges(out: &mut String, g: &crate::store::Gauges) {
    gauge(
        out,
        "telebridge_devices_known",
        "Devices ever seen.",
        g.devices,
    );
    let _ = writeln!(
        out,
        "# HELP telebridge_devices Devices by presence.\n# TYPE telebridge_devices gauge\ntelebridge_devices{{presence=\"online\"}} {}\ntelebridge_devices{{presence=\"stale\"}} {}\ntelebridge_devices{{presence=\"offline\"}} {}",
        g.online - g.stale,
        g.stale,
        g.devices - g.online
    );
    let _ = writeln!(
        out,
        "# HELP telebridge_alerts_open Open (firing or acknowledged) alerts by severity.\n# TYPE telebridge_alerts_open gauge"
    );
    for severity in ["info", "warning", "critical"] {
        let n = g
            .open_alerts
            .iter()
            .find(|(s, _)| s == severity)
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "telebridge_alerts_open{{severity=\"{severity}\"}} {n}");
    }
}

/// Appends the storage writer's state: one `telebridge_store_writer_state` sample per state
/// (1 for the current one) and the age of the oldest uncommitted item.
pub fn render_storage(out: &mut String, r: &crate::store::health::Report) {
    use crate::store::health::FaultKind;
    let _ = writeln!(
        out,
        "# HELP telebridge_store_writer_state The SQLite writer's state: ok, or the fault that stops its commits.\n# TYPE telebridge_store_writer_state gauge"
    );
    let current = r.fault.as_ref().map(|f| f.kind);
    let _ = writeln!(
        out,
        "telebridge_store_writer_state{{state=\"ok\"}} {}",
        i64::from(current.is_none())
    );
    for k in FaultKind::ALL {
        let _ = writeln!(
            out,
            "telebridge_store_writer_state{{state=\"{}\"}} {}",
            k.label(),
            i64::from(current == Some(k))
        );
    }
    let _ = writeln!(
        out,
        "# HELP telebridge_store_oldest_pending_seconds Age of the oldest reading not yet committed (0 when none waits).\n# TYPE telebridge_store_oldest_pending_seconds gauge\ntelebridge_store_oldest_pending_seconds {:.3}",
        r.oldest_age.as_secs_f64()
    );
    gauge(
        out,
        "telebridge_store_pending",
        "Items taken by the writer or queued for it, not yet committed.",
        r.waiting as i64,
    );
    gauge(
        out,
        "telebridge_store_checkpoint_failing",
        "1 while the WAL checkpoint keeps failing.",
        i64::from(r.checkpoint.is_some()),
    );
}

/// Which instance this is and, on PostgreSQL, how far its tail trails the shared log.
pub fn render_instance(out: &mut String, instance: &str, backend: &str, m: &Metrics) {
    let _ = writeln!(
        out,
        "# HELP telebridge_instance_info This instance: its name (the MQTT client id) and storage backend.\n# TYPE telebridge_instance_info gauge\ntelebridge_instance_info{{instance=\"{}\",backend=\"{backend}\"}} 1",
        instance.replace(['"', '\\', '\n'], "_")
    );
    if backend != "postgres" {
        return;
    }
    let seen = m.tail_seen.load(Ordering::Relaxed);
    let head = m.tail_head.load(Ordering::Relaxed).max(seen);
    gauge(
        out,
        "telebridge_tail_seen_seq",
        "The newest event id this instance has read from the shared log and serves live.",
        seen,
    );
    gauge(
        out,
        "telebridge_tail_head_seq",
        "The newest event id committed by any instance, as last read.",
        head,
    );
    gauge(
        out,
        "telebridge_tail_lag_events",
        "Events committed that this instance has not read yet.",
        head - seen,
    );
}

/// Upper bounds of [`Histogram`]'s buckets, in seconds: fine enough below 10 ms to tell a
/// commit's p99 from twice it.
const BUCKETS: [f64; 20] = [
    0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A Prometheus histogram of durations, lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    /// Past the last bound.
    over: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        match BUCKETS.iter().position(|b| secs <= *b) {
            Some(i) => self.counts[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            total += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {total}");
        }
        total += self.over.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: i64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(400));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.003\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 60.0034\n"), "{out}");
    }
}
