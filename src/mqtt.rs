//! The MQTT client connection: one task polls rumqttc's event loop and forwards every
//! message to ingest; acks flow back from the writer only after the commit.
//!
//! Acks are tied to the connection a message arrived on. After a reconnect, a late ack
//! could carry a packet id that now names a different, uncommitted message, so acks
//! from an older connection are dropped (the broker redelivers those messages).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngExt as _;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{MqttConfig, TopicsConfig};
use crate::ingest::{AckSink, AckToken, Ingest, Item};
use crate::observability::Metrics;
use crate::tls::{self, TlsError};

/// Largest MQTT packet we accept. Refusing a big packet would close the connection and the
/// broker would redeliver it forever (a poison message); instead it is read, rejected by
/// ingest against `max_payload`, and acknowledged.
const MAX_INCOMING_PACKET: usize = 268_435_455;
/// Room for requests (acks, publishes) queued to the event loop.
const REQUEST_CAPACITY: usize = 10_000;
/// Longest wait for the broker to take a batch of acks before the connection is dropped.
const ACK_WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// Which connection is current; shared by the poll task and the acker.
#[derive(Debug, Default)]
struct Connection {
    generation: u64,
    connected: bool,
}

/// Acks for committed messages on their way to the poll task, which writes them straight
/// to the connection, a whole batch per flush.
///
/// rumqttc serves one request per turn of its event loop and picks the request queue or the
/// socket at random, while one socket turn reads up to ten messages; under heavy inbound
/// traffic acks sent through its request queue fall ever further behind (rumqtt#1025).
/// So only the first ack of a batch goes through that queue, as a wake-up that keeps the
/// order: when the event loop reports it sent, the poll task writes the rest behind it.
#[derive(Debug, Default)]
struct AckQueue {
    /// Acks that follow the one in rumqttc's request queue, in receive order.
    tokens: Vec<AckToken>,
    /// The packet id of the wake-up ack in rumqttc's request queue, if one is there.
    waking: Option<u16>,
}

/// The client side of the MQTT link: publish commands, acknowledge messages.
#[derive(Clone)]
pub struct MqttHandle {
    client: AsyncClient,
    conn: Arc<Mutex<Connection>>,
    acks: Arc<Mutex<AckQueue>>,
    metrics: Arc<Metrics>,
}

impl MqttHandle {
    /// Whether the broker connection is up.
    pub fn connected(&self) -> bool {
        self.conn.lock().map(|c| c.connected).unwrap_or(false)
    }

    /// The rumqttc client, for publishing.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

/// Hands acks for committed messages to the poll task without ever waiting on it.
pub struct Acker(MqttHandle);

impl AckSink for Acker {
    fn ack(&mut self, tokens: &mut Vec<AckToken>) {
        // Held while enqueueing so that a reconnect cannot slip between the generation
        // check and the enqueue; the poll task takes it to bump the generation.
        let Ok(conn) = self.0.conn.lock() else {
            tokens.clear();
            return;
        };
        let before = tokens.len();
        tokens.retain(|t| t.generation == conn.generation && conn.connected);
        let stale = (before - tokens.len()) as u64;
        self.0.metrics.stale_acks.inc_by(stale);
        let Some(first) = tokens.first() else {
            return;
        };
        let mut queue = self.0.acks.lock().unwrap_or_else(|p| p.into_inner());
        if queue.waking.is_none() {
            let qos = if first.qos == 2 {
                QoS::ExactlyOnce
            } else {
                QoS::AtLeastOnce
            };
            let mut stub = rumqttc::Publish::new(String::new(), qos, Vec::new());
            stub.pkid = first.pkid;
            if self.0.client.try_ack(&stub).is_err() {
                // rumqttc's request queue is full: the writer retries shortly.
                return;
            }
            queue.waking = Some(first.pkid);
            tokens.remove(0);
        }
        queue.tokens.append(tokens);
    }
}

/// A configured, not yet connected, MQTT link.
pub struct MqttLink {
    handle: MqttHandle,
    eventloop: EventLoop,
    subscriptions: Vec<(String, QoS)>,
    reconnect_min: Duration,
    reconnect_max: Duration,
    /// Acks being written; swapped with the queue's, so neither allocates per batch.
    writing: Vec<AckToken>,
}

/// QoS from its number.
pub fn qos(n: u8) -> QoS {
    match n {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl MqttLink {
    /// Builds the client: persistent session, manual acks, TCP_NODELAY, TLS for `mqtts://`.
    pub fn new(
        cfg: &MqttConfig,
        topics: &TopicsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TlsError> {
        let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.url.host.clone(), cfg.url.port);
        opts.set_transport(tls::mqtt_transport(&cfg.url, &cfg.tls_files())?)
            .set_keep_alive(cfg.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_INCOMING_PACKET, 1024 * 1024);
        if let Some(user) = &cfg.username {
            let pass = cfg
                .password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default();
            opts.set_credentials(user.clone(), pass);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        let shared = |filter: String| match &cfg.shared_group {
            Some(g) => format!("$share/{g}/{filter}"),
            None => filter,
        };
        let q = qos(cfg.qos);
        // With a group, each message reaches one instance, which stores it; the others learn
        // of it from the shared log (an ack reaches the WebSocket on the instance that sent
        // the command that way). Brokers send no retained messages to shared subscriptions:
        // presence a device retained before the cluster first ran is learnt at its next report
        // or reading.
        let subscriptions = vec![
            (shared(topics.telemetry.filter()), q),
            (shared(topics.status.filter()), q),
            (shared(topics.ack.filter()), QoS::AtLeastOnce),
        ];
        Ok(Self {
            handle: MqttHandle {
                client,
                conn: Arc::new(Mutex::new(Connection::default())),
                acks: Arc::new(Mutex::new(AckQueue::default())),
                metrics,
            },
            eventloop,
            subscriptions,
            reconnect_min: cfg.reconnect_min,
            reconnect_max: cfg.reconnect_max,
            writing: Vec::new(),
        })
    }

    /// A handle for publishing and status.
    pub fn handle(&self) -> MqttHandle {
        self.handle.clone()
    }

    /// The ack sink for the store writer.
    pub fn acker(&self) -> Acker {
        Acker(self.handle.clone())
    }

    /// Polls the connection until shutdown. On `cancel` it stops forwarding (closing the
    /// writer's queue), keeps the connection up until `writer_done` so the final acks go
    /// out, then disconnects.
    pub async fn run(
        mut self,
        ingest: Arc<Ingest>,
        items: mpsc::Sender<Item>,
        cancel: CancellationToken,
        writer_done: CancellationToken,
    ) {
        let metrics = self.handle.metrics.clone();
        let mut items = Some(items);
        let mut backoff = self.reconnect_min;
        let mut generation = 0u64;
        let mut ever_connected = false;
        let mut failures = 0u64;
        let mut disconnect_deadline: Option<tokio::time::Instant> = None;
        loop {
            if let Some(deadline) = disconnect_deadline
                && tokio::time::Instant::now() >= deadline
            {
                break;
            }
            let event = tokio::select! {
                biased;
                _ = cancel.cancelled(), if items.is_some() => {
                    // Closing the queue lets the writer drain, commit and ack what it has.
                    items = None;
                    continue;
                }
                _ = writer_done.cancelled(), if items.is_none() && disconnect_deadline.is_none() => {
                    if !self.handle.connected() {
                        break;
                    }
                    // Unless a wake-up ack is pending: its report comes before our
                    // DISCONNECT and writes the rest behind it, in order.
                    self.write_acks(None).await;
                    // Queued behind the final acks, so they reach the broker first.
                    let _ = self.handle.client.try_disconnect();
                    disconnect_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(2));
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(100)), if disconnect_deadline.is_some() => continue,
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(tx) = &items else {
                        // Shutting down: not acknowledged, so the broker delivers it again.
                        continue;
                    };
                    let ack = match p.qos {
                        QoS::AtMostOnce => None,
                        q => Some(AckToken {
                            pkid: p.pkid,
                            qos: q as u8,
                            generation,
                        }),
                    };
                    let item = ingest.classify(&p.topic, p.payload, ack);
                    metrics
                        .queue_depth
                        .set((tx.max_capacity() - tx.capacity()) as i64);
                    // Waiting here when the writer is behind is the back-pressure: the broker
                    // holds the rest instead of our memory.
                    if tx.send(item).await.is_err() {
                        items = None;
                    }
                }
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    generation = self.begin_connection();
                    if ever_connected {
                        metrics.mqtt_reconnects.inc();
                    }
                    tracing::info!(
                        session_present = ack.session_present,
                        generation,
                        "connected to the MQTT broker"
                    );
                    ever_connected = true;
                    failures = 0;
                    backoff = self.reconnect_min;
                    // Never awaited inside the poll loop: the request queue is drained by
                    // this very loop.
                    if let Err(e) = self.handle.client.try_subscribe_many(
                        self.subscriptions
                            .iter()
                            .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q)),
                    ) {
                        tracing::error!(error = %e, "could not queue the subscriptions");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                    {
                        tracing::error!(filters = ?self.subscriptions, "the broker refused a subscription");
                    } else {
                        tracing::debug!(filters = ?self.subscriptions, "subscribed");
                    }
                }
                // The wake-up ack went out: the acks queued behind it follow.
                Ok(Event::Outgoing(Outgoing::PubAck(pkid) | Outgoing::PubRec(pkid))) => {
                    self.write_acks(Some(pkid)).await;
                }
                // After our DISCONNECT, keep reading (and dropping) until the broker closes
                // the connection: closing a socket with unread data in it sends a reset, and a
                // reset makes the broker discard the acks it has not read yet.
                Ok(_) => {}
                Err(e) => {
                    self.end_connection();
                    if disconnect_deadline.is_some()
                        || (items.is_none() && writer_done.is_cancelled())
                    {
                        break;
                    }
                    failures += 1;
                    // The first failure and then every tenth, so a long outage stays readable.
                    if failures == 1 || failures % 10 == 0 {
                        tracing::warn!(error = %e, failures, retry_in = ?backoff, "MQTT connection failed; reconnecting");
                    }
                    let jitter = rand::rng().random_range(0.5..1.0);
                    let delay = backoff.mul_f64(jitter);
                    backoff = (backoff * 2).min(self.reconnect_max);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled(), if items.is_some() => { items = None; }
                        _ = writer_done.cancelled(), if items.is_none() => break,
                    }
                }
            }
        }
        self.end_connection();
        tracing::debug!("MQTT link stopped");
    }

    fn begin_connection(&mut self) -> u64 {
        let mut conn = self.handle.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.generation += 1;
        conn.connected = true;
        self.handle.metrics.mqtt_connected.set(1);
        conn.generation
    }

    /// Writes every queued ack to the connection and flushes once: after the wake-up ack
    /// `sent` went out, or (with `None`) when no wake-up ack is pending.
    async fn write_acks(&mut self, sent: Option<u16>) {
        let mut tokens = std::mem::take(&mut self.writing);
        if self.take_acks(sent, &mut tokens) && !tokens.is_empty() {
            self.send_acks(&tokens).await;
        }
        tokens.clear();
        self.writing = tokens;
    }

    /// Swaps the queued acks into `into` (empty), unless another wake-up ack is still due
    /// (one from an older connection was reported, or ours is still to come: the queued
    /// ones must follow it).
    fn take_acks(&self, sent: Option<u16>, into: &mut Vec<AckToken>) -> bool {
        let mut queue = self.handle.acks.lock().unwrap_or_else(|p| p.into_inner());
        if queue.waking != sent {
            return false;
        }
        queue.waking = None;
        std::mem::swap(into, &mut queue.tokens);
        true
    }

    /// Writes `tokens` as PUBACK / PUBREC packets and flushes; a broker that takes none for
    /// `ACK_WRITE_DEADLINE` is dropped.
    async fn send_acks(&mut self, tokens: &[AckToken]) {
        let Some(network) = self.eventloop.network.as_mut() else {
            // Disconnected: the broker delivers these again.
            let n = tokens.len() as u64;
            self.handle.metrics.stale_acks.inc_by(n);
            return;
        };
        let written = tokio::time::timeout(ACK_WRITE_DEADLINE, async {
            for t in tokens {
                // rumqttc's state keeps nothing for an outgoing PUBACK or PUBREC; it only
                // reports them, so writing them directly leaves it consistent.
                let packet = if t.qos == 2 {
                    Packet::PubRec(rumqttc::PubRec::new(t.pkid))
                } else {
                    Packet::PubAck(rumqttc::PubAck::new(t.pkid))
                };
                network.write(packet).await?;
            }
            network.flush().await
        })
        .await;
        let failure = match written {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no progress within {ACK_WRITE_DEADLINE:?}"),
        };
        // A broker that takes no more is as good as gone: reconnect. It delivers the
        // unacknowledged messages again.
        tracing::warn!(error = %failure, "writing acks to the broker failed; reconnecting");
        self.end_connection();
    }

    fn end_connection(&mut self) {
        let mut conn = self.handle.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.generation += 1;
        conn.connected = false;
        // Acks for the old connection are void: its messages come again.
        {
            let mut queue = self.handle.acks.lock().unwrap_or_else(|p| p.into_inner());
            let n = queue.tokens.len() as u64;
            self.handle.metrics.stale_acks.inc_by(n);
            queue.tokens.clear();
            queue.waking = None;
        }
        // Drops any ack that slipped into the request queue for the old connection
        // (rumqttc itself drops only PUBACKs; a PUBREC would reach the next connection).
        self.eventloop.clean();
        self.eventloop
            .pending
            .retain(|r| !matches!(r, rumqttc::Request::PubRec(_)));
        self.handle.metrics.mqtt_connected.set(0);
    }
}
