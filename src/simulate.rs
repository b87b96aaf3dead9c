//! Simulated devices for the demo and for load: each publishes changing metrics at a steady
//! rate, reports presence (with a last will), and answers commands.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, NetworkOptions, Packet, QoS, Transport};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{MqttUrl, TopicsConfig};
use crate::domain::{self, DeviceId};
use crate::tls::{self, ClientFiles};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The broker.
    pub url: MqttUrl,
    /// How many devices.
    pub devices: usize,
    /// Readings per second per device.
    pub rate: f64,
    /// Device id prefix; devices are `{prefix}-01`, `{prefix}-02`, ...
    pub prefix: String,
    /// Topic templates.
    pub topics: TopicsConfig,
    /// CA and client certificate for an `mqtts://` broker.
    pub tls: ClientFiles,
}

/// A command as devices receive it.
#[derive(Debug, Deserialize)]
struct Command {
    id: String,
    name: String,
    #[serde(default)]
    params: serde_json::Value,
}

/// Starts every simulated device on `tracker`; they stop when `cancel` fires.
pub fn spawn(
    cfg: &SimConfig,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let transport = tls::mqtt_transport(&cfg.url, &cfg.tls)
        .map_err(|e| format!("TLS for the simulated devices: {e}"))?;
    let width = cfg.devices.to_string().len().max(2);
    for i in 1..=cfg.devices {
        let id = DeviceId::parse(&format!("{}-{:0width$}", cfg.prefix, i))
            .map_err(|e| format!("bad device prefix {:?}: {e}", cfg.prefix))?;
        tracker.spawn(run_device(
            cfg.clone(),
            transport.clone(),
            id,
            i,
            cancel.clone(),
        ));
    }
    Ok(())
}

async fn run_device(
    cfg: SimConfig,
    transport: Transport,
    id: DeviceId,
    index: usize,
    cancel: CancellationToken,
) {
    let status_topic = cfg.topics.status.topic_for(&id);
    let telemetry_topic = cfg.topics.telemetry.topic_for(&id);
    let command_topic = cfg.topics.command.topic_for(&id);
    let ack_topic = cfg.topics.ack.topic_for(&id);
    let mut opts = MqttOptions::new(
        format!("telebridge-sim-{id}"),
        cfg.url.host.clone(),
        cfg.url.port,
    );
    opts.set_transport(transport)
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_last_will(LastWill::new(
            &status_topic,
            "offline",
            QoS::AtLeastOnce,
            true,
        ));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let mut net = NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);

    let mut period = Duration::from_secs_f64(1.0 / cfg.rate.max(0.001));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    let phase = index as f64;
    let mut battery = 100.0 - (index % 30) as f64;
    let mut connected = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick(), if connected => {
                n += 1;
                let t = n as f64 * period.as_secs_f64();
                battery = (battery - 0.001).max(0.0);
                let payload = json!({
                    "ts": domain::now_ms(),
                    "temperature": round2(21.0 + 4.0 * (t / 60.0 + phase).sin() + jitter(0.3)),
                    "humidity": round2(45.0 + 10.0 * (t / 90.0 + phase).cos() + jitter(1.0)),
                    "battery": round2(battery),
                    "rssi": -60 - (index as i64 % 20) - (jitter(3.0).abs() as i64),
                    "count": n,
                });
                if client.try_publish(&telemetry_topic, QoS::AtLeastOnce, false, payload.to_string()).is_err() {
                    tracing::debug!(device = %id, "simulated reading dropped: client queue full");
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    let _ = client.try_subscribe(&command_topic, QoS::AtLeastOnce);
                    let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, "online");
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == command_topic => {
                    let reply = match serde_json::from_slice::<Command>(&p.payload) {
                        Ok(cmd) => answer(&cmd, &mut period),
                        Err(e) => {
                            tracing::debug!(device = %id, error = %e, "simulated device got a malformed command");
                            continue;
                        }
                    };
                    // The rate may have changed.
                    tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                    let _ = client.try_publish(&ack_topic, QoS::AtLeastOnce, false, reply.to_string());
                }
                Ok(_) => {}
                Err(_) => {
                    connected = false;
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
    }
    // A clean goodbye: mark offline ourselves, since a clean disconnect fires no last will.
    if connected {
        let _ = client.try_publish(&status_topic, QoS::AtLeastOnce, true, "offline");
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Ok(ev) = eventloop.poll().await {
                if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// The device's answer to a command.
fn answer(cmd: &Command, period: &mut Duration) -> serde_json::Value {
    match cmd.name.as_str() {
        "set_interval" => match cmd.params.get("seconds").and_then(|s| s.as_f64()) {
            Some(s) if (0.001..=3600.0).contains(&s) => {
                *period = Duration::from_secs_f64(s);
                json!({"id": cmd.id, "ok": true, "result": {"interval_seconds": s}})
            }
            _ => {
                json!({"id": cmd.id, "ok": false, "error": "params.seconds must be a number from 0.001 to 3600"})
            }
        },
        "ping" => json!({"id": cmd.id, "ok": true, "result": "pong"}),
        "reboot" => json!({"id": cmd.id, "ok": true, "result": {"rebooting": true}}),
        other => json!({"id": cmd.id, "ok": false, "error": format!("unknown command {other:?}")}),
    }
}

fn jitter(scale: f64) -> f64 {
    (rand::random::<f64>() - 0.5) * 2.0 * scale
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
