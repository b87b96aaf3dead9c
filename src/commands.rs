//! Operator commands: stored, published to the device with QoS 1 (or queued while it is
//! offline), and followed to their end (acked, failed, timeout, expired). Every change goes
//! to the WebSocket client that sent the command and to `/events` as `event: command`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::CommandsConfig;
use crate::domain::{self, DeviceId, TopicTemplate};
use crate::mqtt::MqttHandle;
use crate::observability::Metrics;
use crate::protocol::{CommandRequest, Refusal, ServerMessage};
use crate::store::{CommandChange, Inserted, NewCommand, Store};

/// How often timeouts, expiries and queued commands are checked.
const TICK: Duration = Duration::from_millis(100);

/// A message for the WebSocket client that owns command `id`.
#[derive(Debug, Clone)]
pub struct Update {
    /// Command id.
    pub id: String,
    /// What to send.
    pub message: ServerMessage,
}

/// The command service, shared by WebSocket and HTTP handlers.
pub struct Commands {
    store: Store,
    mqtt: MqttHandle,
    topic: TopicTemplate,
    cfg: CommandsConfig,
    metrics: Arc<Metrics>,
    updates: broadcast::Sender<Arc<Update>>,
    /// When each command in flight was published, for a precise round trip.
    sent: Mutex<HashMap<String, Instant>>,
}

impl Commands {
    /// A command service publishing on `topic`.
    pub fn new(
        store: Store,
        mqtt: MqttHandle,
        topic: TopicTemplate,
        cfg: CommandsConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Commands> {
        let (updates, _) = broadcast::channel(4096);
        Arc::new(Commands {
            store,
            mqtt,
            topic,
            cfg,
            metrics,
            updates,
            sent: Mutex::new(HashMap::new()),
        })
    }

    /// Updates for every command; each client keeps those of its own.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Update>> {
        self.updates.subscribe()
    }

    /// Stores and sends (or queues) a command; the answer is the `accepted` message.
    pub async fn submit(&self, req: CommandRequest) -> Result<ServerMessage, Refusal> {
        self.submit_as(uuid::Uuid::new_v4().to_string(), req).await
    }

    /// [`Commands::submit`] with the id the new command gets chosen by the caller, so that
    /// a WebSocket session knows it before the command is published and can keep its
    /// answer even when the answer comes back before this call returns. (A repeated
    /// idempotency key answers with the existing command's id instead.)
    pub async fn submit_as(
        &self,
        id: String,
        req: CommandRequest,
    ) -> Result<ServerMessage, Refusal> {
        let unavailable = |e: &dyn std::fmt::Display| Refusal {
            reference: req.reference.clone(),
            code: "unavailable",
            message: format!("cannot store the command: {e}"),
        };
        let device = DeviceId::parse(&req.device).map_err(|e| Refusal {
            reference: req.reference.clone(),
            code: "invalid_device",
            message: e.to_string(),
        })?;
        let now = domain::now_ms();
        // A device never seen is treated as reachable; only one known to be offline waits.
        let offline = matches!(self.store.device(device.as_str()).await, Ok(Some(d)) if !d.online);
        let params = Value::Object(req.params.clone()).to_string();
        let ttl = req.ttl_ms.unwrap_or(self.cfg.ttl.as_millis() as i64);
        let status = if offline { "queued" } else { "sent" };
        let inserted = self
            .store
            .insert_command(NewCommand {
                id: id.clone(),
                device: device.to_string(),
                name: req.name.clone(),
                params: params.clone(),
                status,
                key: req.key.clone(),
                created_at: now,
                expires_at: now + ttl,
                sent_at: (!offline).then_some(now),
            })
            .await
            .map_err(|e| unavailable(&e))?;
        if let Inserted::Existing { id, status } = inserted {
            return Ok(ServerMessage::Accepted {
                id,
                reference: req.reference,
                status,
                duplicate: true,
            });
        }
        self.metrics.commands_accepted.inc();
        if !offline {
            self.publish(&id, &device, &req.name, &params);
        }
        Ok(ServerMessage::Accepted {
            id,
            reference: req.reference,
            status: status.to_owned(),
            duplicate: false,
        })
    }

    /// Publishes with QoS 1; rumqttc keeps it for the next connection if the broker is away.
    fn publish(&self, id: &str, device: &DeviceId, name: &str, params_json: &str) {
        let params: Value = serde_json::from_str(params_json).unwrap_or_else(|_| json!({}));
        let payload = json!({"id": id, "name": name, "params": params}).to_string();
        if let Ok(mut sent) = self.sent.lock() {
            sent.insert(id.to_owned(), Instant::now());
        }
        if let Err(e) = self.mqtt.client().try_publish(
            self.topic.topic_for(device),
            QoS::AtLeastOnce,
            false,
            payload,
        ) {
            tracing::error!(id, error = %e, "could not queue a command for the broker; it will time out");
        }
    }

    fn notify(&self, id: String, message: ServerMessage) {
        // No receiver means no WebSocket client is open: the status is stored anyway.
        let _ = self.updates.send(Arc::new(Update { id, message }));
    }

    /// Passes command endings from the log on and runs timeouts, expiries and the
    /// dispatch of queued commands until cancelled.
    pub async fn run(
        self: Arc<Self>,
        mut changes: mpsc::Receiver<CommandChange>,
        cancel: CancellationToken,
    ) {
        // Two loops side by side: endings are passed on while housekeeping waits for
        // storage (a timeout pass that ends thousands at once fills the queue meanwhile).
        let answers = async {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    change = changes.recv() => match change {
                        Some(c) => self.answered(c),
                        None => return,
                    },
                }
            }
        };
        let ticks = async {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = self.housekeeping().await {
                            tracing::warn!(error = %e, "command housekeeping failed; will retry");
                        }
                    }
                }
            }
        };
        tokio::join!(answers, ticks);
    }

    /// Passes a command's ending, as the log carries it from whichever instance stored
    /// it, to the WebSocket client that sent it. Acks and their round trip are counted by
    /// the instance that published the command.
    fn answered(&self, c: CommandChange) {
        let started = self.sent.lock().ok().and_then(|mut s| s.remove(&c.id));
        let message = match c.status.as_str() {
            "acked" | "failed" => {
                let ok = c.status == "acked";
                let rtt_ms = match started {
                    Some(t) => t.elapsed().as_secs_f64() * 1000.0,
                    None => c.rtt_ms.unwrap_or(0.0),
                };
                if started.is_some() {
                    let counter = if ok {
                        &self.metrics.commands_acked
                    } else {
                        &self.metrics.commands_failed
                    };
                    counter.inc();
                    self.metrics.command_rtt.observe(rtt_ms / 1000.0);
                }
                ServerMessage::Ack {
                    id: c.id.clone(),
                    ok,
                    result: if ok { c.result } else { None },
                    error: c.error,
                    rtt_ms: (rtt_ms * 1000.0).round() / 1000.0,
                }
            }
            "timeout" => ServerMessage::Timeout { id: c.id.clone() },
            "expired" => ServerMessage::Expired { id: c.id.clone() },
            "cancelled" => ServerMessage::Cancelled { id: c.id.clone() },
            _ => return,
        };
        self.notify(c.id, message);
    }

    async fn housekeeping(&self) -> Result<(), crate::store::StoreError> {
        if !self.store.has_open_commands().await? {
            return Ok(());
        }
        let now = domain::now_ms();
        // The clients hear of these from the log (see `answered`), on every instance.
        let timed_out = self
            .store
            .timeout_due(now - self.cfg.timeout.as_millis() as i64, now)
            .await?;
        self.metrics.commands_timeout.inc_by(timed_out.len() as u64);
        let expired = self.store.expire_due(now).await?;
        self.metrics.commands_expired.inc_by(expired.len() as u64);
        for c in self.store.queued_for_online(now).await? {
            // Only the caller that moves it out of `queued` publishes it.
            if self.store.mark_sent(&c.id, domain::now_ms()).await? {
                let Ok(device) = DeviceId::parse(&c.device) else {
                    continue;
                };
                self.publish(&c.id, &device, &c.name, &c.params);
            }
        }
        Ok(())
    }
}
