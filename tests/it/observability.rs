//! `GET /metrics` after real traffic: the exposition passes Prometheus' own checker, the
//! histograms counted the traffic, and the names dashboards and alerts use are still there.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use rumqttc::QoS;
use serde_json::json;

use crate::support::{Daemon, FakeDevice, Mosquitto, Publisher, SseClient, Ws, reading};

const T: Duration = Duration::from_secs(20);
/// promtool: `$TELEBRIDGE_PROMTOOL`, else the copy scripts/test unpacks from Debian's
/// `prometheus` package into `target/tools/`, else one on the PATH.
fn promtool() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("TELEBRIDGE_PROMTOOL") {
        return p.into();
    }
    let unpacked = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/promtool");
    if unpacked.exists() {
        return unpacked;
    }
    "promtool".into()
}

/// The histograms, each of which the traffic below must have counted.
const HISTOGRAMS: [&str; 6] = [
    "telebridge_store_commit_seconds",
    "telebridge_store_batch_commit_seconds",
    "telebridge_store_batch_size",
    "telebridge_command_rtt_seconds",
    "telebridge_sse_delivery_lag_seconds",
    "telebridge_history_query_seconds",
];

/// Samples that were there before the move to prometheus-client, as dashboards name them.
const KEPT: [&str; 20] = [
    "telebridge_messages_received_total",
    "telebridge_readings_stored_total",
    "telebridge_messages_rejected_total{reason=\"too_large\"}",
    "telebridge_store_batches_total",
    "telebridge_store_commit_failures_total",
    "telebridge_ingest_queue_depth",
    "telebridge_mqtt_connected",
    "telebridge_sse_clients",
    "telebridge_sse_connections_total",
    "telebridge_ws_clients",
    "telebridge_commands_accepted_total",
    "telebridge_commands_finished_total{status=\"acked\"}",
    "telebridge_alert_changes_total{state=\"firing\"}",
    "telebridge_webhook_queue_depth",
    "telebridge_store_writer_state{state=\"ok\"}",
    "telebridge_store_oldest_pending_seconds",
    "telebridge_store_pending",
    "telebridge_devices_known",
    "telebridge_devices{presence=\"online\"}",
    "telebridge_alerts_open{severity=\"critical\"}",
];

#[tokio::test]
async fn metrics_after_readings_and_a_command_pass_promtool_and_their_histograms_counted_them() {
    // Arrange
    let broker = Mosquitto::start().await;
    let daemon = Daemon::start(&broker.url(), "").await;
    let publisher = Publisher::connect(&broker.url(), "metrics-pub").await;
    let mut device = FakeDevice::connect(&broker.url(), "dev-1", "devices/dev-1/commands").await;
    let mut events = SseClient::connect(daemon.http, "/events?type=reading", None).await;
    let mut ws = Ws::connect(daemon.http).await;

    // Act: readings seen live, a command answered, a history page read.
    for n in 1..=5 {
        publisher
            .publish(
                "devices/dev-1/telemetry",
                QoS::AtLeastOnce,
                false,
                reading(n),
            )
            .await;
    }
    for _ in 1..=5 {
        events.next(T).await.expect("a reading on the live feed");
    }
    ws.send_json(json!({"type": "command", "device": "dev-1", "name": "ping", "ref": "m-1"}))
        .await;
    ws.expect("accepted", T).await;
    let cmd = device
        .next_command(T)
        .await
        .expect("the device gets the command");
    device.answer(json!({"id": cmd["id"], "ok": true})).await;
    ws.expect("ack", T).await;
    let history = daemon.get("/api/devices/dev-1/readings").await;
    assert_eq!(history.status(), 200);
    let text = daemon.get("/metrics").await;
    let text_type = content_type(&text);
    let text = text.text().await.expect("metrics body");
    let om = daemon
        .client
        .get(daemon.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .expect("GET /metrics");
    let om_type = content_type(&om);
    let om = om.text().await.expect("metrics body");

    // Assert
    promtool_check(&text);
    assert_eq!(text_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(
        om_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        om.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF:\n{om}"
    );
    for name in HISTOGRAMS {
        for exposition in [&text, &om] {
            assert_histogram(exposition, name);
        }
    }
    assert_eq!(sample(&text, "telebridge_command_rtt_seconds_count"), 1.0);
    assert_eq!(sample(&text, "telebridge_readings_stored_total"), 5.0);
    for name in KEPT {
        sample(&text, name);
        sample(&om, name);
    }
    for name in dashboard_metrics() {
        assert!(
            text.lines().any(|l| l.starts_with(&name)),
            "the Grafana dashboard queries {name}, which /metrics lacks"
        );
    }
}

/// The metric names the Grafana dashboard's queries use (`contrib/grafana`), from valid JSON.
fn dashboard_metrics() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/grafana/telebridge.json"
    );
    let text = std::fs::read_to_string(path).expect("read the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut names: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .flat_map(|expr| {
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("telebridge_"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 10, "the dashboard's metrics: {names:?}");
    names
}

fn content_type(r: &reqwest::Response) -> String {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// `promtool check metrics`: the exposition parses, and its lint finds nothing.
fn promtool_check(exposition: &str) {
    let promtool = promtool();
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "run {} (scripts/test unpacks it from Debian's prometheus): {e}",
                promtool.display()
            )
        });
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}\n{exposition}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the sample named exactly `name` (labels included).
fn sample(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name}:\n{exposition}"))
}

/// A histogram with observations: buckets cumulative in ascending `le`, ending at `+Inf`
/// with the count.
fn assert_histogram(exposition: &str, name: &str) {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (le, value) = rest.split_once("\"} ").expect("le=\"...\"} value");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le")
            };
            (le, value.trim().parse().expect("bucket count"))
        })
        .collect();
    let count = sample(exposition, &format!("{name}_count"));
    assert!(count > 0.0, "{name} counted nothing:\n{exposition}");
    assert!(buckets.len() > 2, "{name} has buckets: {buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "{name}'s buckets ascend and are cumulative: {buckets:?}"
    );
    assert_eq!(buckets.last(), Some(&(f64::INFINITY, count)), "{name}");
    assert!(
        sample(exposition, &format!("{name}_sum")) > 0.0,
        "{name}_sum"
    );
}
