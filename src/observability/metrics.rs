//! The daemon's own metrics, each registered once in a `prometheus-client` registry under
//! its exposition name; the parts of the daemon hold clones of the same handles.

use std::sync::atomic::AtomicI64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::histogram::{Histogram, buckets};
use crate::ingest::Reject;

/// Counters, gauges and histograms shared by every part of the daemon.
///
/// Counters are registered without their `_total`, which the OpenMetrics encoding adds.
#[derive(Debug)]
pub struct Metrics {
    /// MQTT messages received on our subscriptions.
    pub received: Counter,
    /// Readings committed to storage.
    pub stored: Counter,
    /// Presence changes committed.
    pub presence: Counter,
    rejected_too_large: Counter,
    rejected_bad_device: Counter,
    rejected_unknown_topic: Counter,
    rejected_bad_status: Counter,
    rejected_bad_ack: Counter,
    /// Write transactions committed.
    pub batches: Counter,
    /// How long each batch took to commit, retries included.
    pub commit_latency: Histogram,
    /// How long each successful write transaction took.
    pub commit_seconds: Histogram,
    /// Readings per committed batch that carried any.
    pub batch_size: Histogram,
    /// Write transactions that failed (and were retried).
    pub commit_failures: Counter,
    /// Times the writer restarted the WAL from its start to keep it bounded.
    pub wal_restarts: Counter,
    /// Items waiting for the writer.
    pub queue_depth: Gauge,
    /// 1 while connected to the broker.
    pub mqtt_connected: Gauge,
    /// Connections made to the broker after the first.
    pub mqtt_reconnects: Counter,
    /// Acks dropped because their connection was gone.
    pub stale_acks: Counter,
    /// Readings deleted by retention.
    pub retention_deleted: Counter,
    /// Readings not stored because they repeat a stored one (QoS 1 redelivery).
    pub repeated: Counter,
    /// Devices marked offline for silence.
    pub presence_timeouts: Counter,
    /// Open SSE streams.
    pub sse_clients: Gauge,
    /// SSE streams served in all.
    pub sse_connections: Counter,
    /// SSE streams closed because the client fell behind.
    pub sse_cut: Counter,
    /// From an event's commit to its frame handed to the socket, per live chunk written.
    pub sse_delivery_lag: Histogram,
    /// Acks for unknown or already finished commands.
    pub unknown_acks: Counter,
    /// Open WebSocket connections.
    pub ws_clients: Gauge,
    /// Commands accepted.
    pub commands_accepted: Counter,
    /// Commands the device acknowledged with ok: true.
    pub commands_acked: Counter,
    /// Commands the device answered with ok: false.
    pub commands_failed: Counter,
    /// Commands without an answer in time.
    pub commands_timeout: Counter,
    /// Queued commands whose ttl ran out.
    pub commands_expired: Counter,
    /// Queued commands an operator cancelled.
    pub commands_cancelled: Counter,
    /// Bad WebSocket or API command messages, all codes.
    pub command_errors: Counter,
    /// Round trips, publish to ack, of the commands this instance published.
    pub command_rtt: Histogram,
    /// History and series queries' time in storage.
    pub history_query: Histogram,
    /// Requests refused for a missing or bad token.
    pub auth_failures: Counter,
    /// Requests refused for lack of a role or device scope.
    pub forbidden: Counter,
    /// Connections refused by a limit.
    pub limit_refusals: Counter,
    alerts_fired: Counter,
    alerts_acknowledged: Counter,
    alerts_resolved: Counter,
    /// Times the alert engine's queue overflowed and it read the log back.
    pub alert_catch_ups: Counter,
    /// Webhook deliveries the receiver accepted (2xx).
    pub webhook_delivered: Counter,
    /// Webhook deliveries given up after every attempt, or refused for good (4xx).
    pub webhook_failed: Counter,
    /// Webhook attempts after the first.
    pub webhook_retries: Counter,
    /// Webhook deliveries dropped because the queue was full.
    pub webhook_dropped: Counter,
    /// Webhook deliveries waiting, all queues.
    pub webhook_queued: Gauge,
    /// The newest seq this instance's tail has published (PostgreSQL; encoded per scrape).
    pub tail_seen: AtomicI64,
    /// The newest seq any instance has committed, as last read (PostgreSQL; per scrape).
    pub tail_head: AtomicI64,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let r = &mut r;
        let [too_large, bad_device, unknown_topic, bad_status, bad_ack] = labelled(
            r,
            "telebridge_messages_rejected",
            "MQTT messages rejected, by reason",
            "reason",
            Reject::ALL.map(Reject::as_str),
        );
        let [acked, failed, timeout, expired, cancelled] = labelled(
            r,
            "telebridge_commands_finished",
            "Commands by final status",
            "status",
            ["acked", "failed", "timeout", "expired", "cancelled"],
        );
        let [fired, acknowledged, resolved] = labelled(
            r,
            "telebridge_alert_changes",
            "Alert changes this instance stored, by new state",
            "state",
            ["firing", "acknowledged", "resolved"],
        );
        Metrics {
            received: counter(r, "telebridge_messages_received", "MQTT messages received"),
            stored: counter(
                r,
                "telebridge_readings_stored",
                "Readings committed to storage",
            ),
            presence: counter(
                r,
                "telebridge_presence_changes",
                "Presence reports committed",
            ),
            rejected_too_large: too_large,
            rejected_bad_device: bad_device,
            rejected_unknown_topic: unknown_topic,
            rejected_bad_status: bad_status,
            rejected_bad_ack: bad_ack,
            batches: counter(
                r,
                "telebridge_store_batches",
                "Write transactions committed",
            ),
            commit_latency: histogram(
                r,
                "telebridge_store_batch_commit_seconds",
                "How long a batch of readings took to commit, retries included",
                buckets::COMMIT,
            ),
            commit_seconds: histogram(
                r,
                "telebridge_store_commit_seconds",
                "How long a write transaction took to commit (the attempt that succeeded)",
                buckets::COMMIT,
            ),
            batch_size: histogram(
                r,
                "telebridge_store_batch_size",
                "Readings per committed batch, of the batches that carried readings",
                buckets::BATCH,
            ),
            commit_failures: counter(
                r,
                "telebridge_store_commit_failures",
                "Write transactions that failed and were retried (disk full, read-only, locked, ...)",
            ),
            wal_restarts: counter(
                r,
                "telebridge_store_wal_restarts",
                "Times the writer restarted the WAL from its start, keeping it under 64 MiB",
            ),
            queue_depth: gauge(
                r,
                "telebridge_ingest_queue_depth",
                "Items waiting for the storage writer",
            ),
            mqtt_connected: gauge(
                r,
                "telebridge_mqtt_connected",
                "1 while connected to the broker",
            ),
            mqtt_reconnects: counter(
                r,
                "telebridge_mqtt_reconnects",
                "Reconnections to the broker",
            ),
            stale_acks: counter(
                r,
                "telebridge_mqtt_stale_acks",
                "Acks dropped because their connection had closed",
            ),
            retention_deleted: counter(
                r,
                "telebridge_retention_deleted",
                "Readings deleted by retention",
            ),
            repeated: counter(
                r,
                "telebridge_readings_repeated",
                "Readings acknowledged but not stored again: same device, ts and payload as a stored one (QoS 1 redelivery)",
            ),
            presence_timeouts: counter(
                r,
                "telebridge_presence_timeouts",
                "Devices marked offline after silence",
            ),
            sse_clients: gauge(r, "telebridge_sse_clients", "Open SSE streams"),
            sse_connections: counter(r, "telebridge_sse_connections", "SSE streams opened"),
            sse_cut: counter(
                r,
                "telebridge_sse_clients_cut",
                "SSE streams closed because the client fell behind the live buffer",
            ),
            sse_delivery_lag: histogram(
                r,
                "telebridge_sse_delivery_lag_seconds",
                "From commit (or, on PostgreSQL, this instance reading it from the log) to the live SSE frame written, one sample per chunk, for its oldest event",
                buckets::SSE_LAG,
            ),
            unknown_acks: counter(
                r,
                "telebridge_command_acks_unknown",
                "Acks for unknown or finished commands",
            ),
            ws_clients: gauge(r, "telebridge_ws_clients", "Open WebSocket connections"),
            commands_accepted: counter(r, "telebridge_commands_accepted", "Commands accepted"),
            commands_acked: acked,
            commands_failed: failed,
            commands_timeout: timeout,
            commands_expired: expired,
            commands_cancelled: cancelled,
            command_errors: counter(r, "telebridge_command_errors", "Refused command messages"),
            command_rtt: histogram(
                r,
                "telebridge_command_rtt_seconds",
                "Command round trip, publish to ack (acked or failed), of the commands this instance published",
                buckets::COMMAND_RTT,
            ),
            history_query: histogram(
                r,
                "telebridge_history_query_seconds",
                "Time in storage of a readings, status-history or series API query",
                buckets::QUERY,
            ),
            auth_failures: counter(
                r,
                "telebridge_auth_failures",
                "Requests refused for a missing or bad token",
            ),
            forbidden: counter(
                r,
                "telebridge_forbidden",
                "Requests refused for lack of a role or device scope",
            ),
            limit_refusals: counter(
                r,
                "telebridge_limit_refusals",
                "Connections refused by a configured limit",
            ),
            alerts_fired: fired,
            alerts_acknowledged: acknowledged,
            alerts_resolved: resolved,
            alert_catch_ups: counter(
                r,
                "telebridge_alert_catch_ups",
                "Times the alert engine fell behind and read the log back",
            ),
            webhook_delivered: counter(
                r,
                "telebridge_webhook_deliveries",
                "Webhook deliveries the receiver accepted",
            ),
            webhook_failed: counter(
                r,
                "telebridge_webhook_failures",
                "Webhook deliveries given up after every attempt, or refused (4xx)",
            ),
            webhook_retries: counter(
                r,
                "telebridge_webhook_retries",
                "Webhook attempts after the first",
            ),
            webhook_dropped: counter(
                r,
                "telebridge_webhook_dropped",
                "Webhook deliveries dropped because the queue was full",
            ),
            webhook_queued: gauge(
                r,
                "telebridge_webhook_queue_depth",
                "Webhook deliveries waiting",
            ),
            // Only PostgreSQL has a shared log to trail: encoded per scrape, by backend.
            tail_seen: AtomicI64::new(0),
            tail_head: AtomicI64::new(0),
            registry: std::mem::take(r),
        }
    }
}

impl Metrics {
    fn rejected_counter(&self, reason: Reject) -> &Counter {
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
        c.inc();
    }

    /// Counts one rejected message.
    pub fn rejected(&self, reason: Reject) {
        self.rejected_counter(reason).inc();
    }

    /// Rejected messages of all reasons.
    pub fn rejected_total(&self) -> u64 {
        Reject::ALL.iter().map(|r| self.rejected_count(*r)).sum()
    }

    /// Rejected messages of one reason.
    pub fn rejected_count(&self, reason: Reject) -> u64 {
        self.rejected_counter(reason).get()
    }

    /// The registry of every metric above, for the scrape to encode.
    pub(super) fn registry(&self) -> &Registry {
        &self.registry
    }
}

fn counter(r: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    r.register(name, help, c.clone());
    c
}

fn gauge(r: &mut Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::default();
    r.register(name, help, g.clone());
    g
}

fn histogram(r: &mut Registry, name: &str, help: &str, bounds: &'static [f64]) -> Histogram {
    let h = Histogram::new(bounds);
    r.register(name, help, h.clone());
    h
}

/// Label set of one label, such as `reason="too_large"`.
type OneLabel = [(&'static str, &'static str); 1];

/// One counter family with a sample per value of `key`, every one shown from the start
/// (at 0); the counters returned share the family's.
fn labelled<const N: usize>(
    r: &mut Registry,
    name: &str,
    help: &str,
    key: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    let family = Family::<OneLabel, Counter>::default();
    let counters = values.map(|v| family.get_or_create(&[(key, v)]).clone());
    r.register(name, help, family);
    counters
}
