//! The writer loop both backends share: it takes readings in batches, commits each batch in
//! one transaction (the backend's [`Backend::commit`]), retries a failing commit rather than
//! dropping it, and only then acknowledges the messages. Seqs are planned here, in batch
//! order, the same way for every backend.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::health::{FaultKind, Health};
use super::log::EventRow;
use super::{Control, LogEntry, StoreError};
use crate::alerts::Observed;
use crate::config::StorageConfig;
use crate::domain::{self, DeviceId};
use crate::feed::{self, Event, Feed, Kind};
use crate::ingest::{AckSink, AckToken, CommandAck, Item, Reading};
use crate::observability::Metrics;

/// How long a caller waits for the writer before it gets `WriterBusy`.
pub(super) const ASK_DEADLINE: Duration = Duration::from_secs(10);
/// How long the writer keeps retrying a failing commit once shutdown began, before it
/// gives up and leaves the unacknowledged readings with the broker.
const SHUTDOWN_RETRY: Duration = Duration::from_secs(3);
/// How stale `devices.last_seen` may get for a device that stays online: rewriting the row
/// in every transaction costs a statement and a page per commit, and the presence timeout
/// it serves is at least a second.
const LAST_SEEN_EVERY_MS: i64 = 250;

/// Where committed work is announced.
pub struct Committed {
    /// The seq of the last committed event.
    pub last_seq: watch::Sender<i64>,
    /// The live feed; events are encoded only while someone listens.
    pub feed: Arc<Feed>,
    /// Command lifecycle changes from the log, for the command service.
    pub commands: mpsc::Sender<CommandChange>,
    /// Committed readings and presence changes, for the alert rules.
    pub alerts: Arc<crate::alerts::Input>,
}

/// A command's status changed, as the event log says (an ack, a timeout, an expiry),
/// whichever instance stored it.
#[derive(Debug, Clone)]
pub struct CommandChange {
    /// Command id.
    pub id: String,
    /// acked, failed, timeout or expired (sent and queued are not passed on).
    pub status: String,
    /// The device's result.
    pub result: Option<Value>,
    /// The device's error.
    pub error: Option<String>,
    /// Sent to answered, as the storing instance measured it, in ms.
    pub rtt_ms: Option<f64>,
}

impl CommandChange {
    /// The change a command event of the log announces, if it is an ending.
    fn from_event(e: &EventRow) -> Option<CommandChange> {
        if e.kind != Kind::Command {
            return None;
        }
        let v: Value = serde_json::from_str(&e.data).ok()?;
        let status = v.get("status")?.as_str()?;
        if !matches!(
            status,
            "acked" | "failed" | "timeout" | "expired" | "cancelled"
        ) {
            return None;
        }
        Some(CommandChange {
            id: v.get("id")?.as_str()?.to_owned(),
            status: status.to_owned(),
            result: v.get("result").filter(|r| !r.is_null()).cloned(),
            error: v.get("error").and_then(Value::as_str).map(str::to_owned),
            rtt_ms: v.get("rtt_ms").and_then(Value::as_f64),
        })
    }
}

impl Committed {
    /// Publishes committed events in log order, then moves the newest seq forward. Reading
    /// frames are encoded only while someone listens; the others were made for storage.
    pub(super) fn publish(
        &self,
        batch: &[Item],
        order: &[Entry],
        events: &[EventRow],
        last_seq: i64,
    ) {
        if self.feed.has_subscribers() {
            let now = Instant::now();
            let mut out = Vec::with_capacity(order.len());
            for entry in order {
                match *entry {
                    Entry::Reading(i, seq) => {
                        if let Some(Item::Reading(r, _)) = batch.get(i) {
                            out.push(reading_event(r, seq, now));
                        }
                    }
                    Entry::Event(i) => out.extend(events.get(i).map(|e| e.to_event(now))),
                }
            }
            if !out.is_empty() {
                self.feed.push(out);
            }
        }
        for e in events {
            self.command_change(e);
        }
        if self.alerts.wanted() {
            let mut observed = Vec::with_capacity(order.len());
            for entry in order {
                match *entry {
                    Entry::Reading(i, seq) => {
                        if let Some(Item::Reading(r, _)) = batch.get(i)
                            && r.flags & domain::flags::RAW == 0
                        {
                            observed.push(Observed::Reading {
                                seq,
                                device: r.device.shared(),
                                at: r.received_at,
                                payload: r.payload.clone(),
                            });
                        }
                    }
                    Entry::Event(i) => {
                        observed.extend(events.get(i).and_then(Observed::presence));
                    }
                }
            }
            self.alerts.send(observed);
        }
        self.moved(last_seq);
    }

    /// Publishes events of work other than a batch (commands, presence timeouts).
    pub(super) fn publish_events(&self, events: &[EventRow]) {
        if let Some(last) = events.last() {
            let order: Vec<Entry> = (0..events.len()).map(Entry::Event).collect();
            self.publish(&[], &order, events, last.seq);
        }
    }

    /// Publishes entries read back from the shared log (PostgreSQL's tail), in log order.
    pub(super) fn publish_entries(&self, entries: &[LogEntry]) {
        let Some(last) = entries.last() else { return };
        if self.feed.has_subscribers() {
            let now = Instant::now();
            let out: Vec<Event> = entries.iter().map(|e| e.to_event(now)).collect();
            self.feed.push(out);
        }
        for e in entries {
            if let LogEntry::Event(e) = e {
                self.command_change(e);
            }
        }
        if self.alerts.wanted() {
            self.alerts
                .send(entries.iter().filter_map(Observed::of_entry).collect());
        }
        self.moved(last.seq());
    }

    fn command_change(&self, e: &EventRow) {
        if let Some(change) = CommandChange::from_event(e)
            && let Err(err) = self.commands.try_send(change)
        {
            // The status is stored; only the live notification is lost.
            tracing::warn!(error = %err, "command notification queue full");
        }
    }

    /// After the feed, so a client that resumes from the newest seq finds it in the ring.
    fn moved(&self, last_seq: i64) {
        self.last_seq.send_if_modified(|v| {
            let moved = last_seq > *v;
            *v = (*v).max(last_seq);
            moved
        });
    }
}

/// A reading's feed event.
fn reading_event(r: &Reading, seq: i64, committed: Instant) -> Event {
    Event {
        committed,
        kind: Kind::Reading,
        device: r.device.shared(),
        seq,
        frame: feed::encode(&feed::ReadingRef {
            seq,
            device: r.device.as_str(),
            topic: &r.topic,
            ts: r.ts,
            received_at: r.received_at,
            payload: &r.payload,
            flags: r.flags,
        }),
    }
}

/// One event of a committed batch, in log order.
#[derive(Debug, Clone, Copy)]
pub(super) enum Entry {
    /// The reading at this index of the batch, with its seq.
    Reading(usize, i64),
    /// This index of the batch's event rows (`usize::MAX`: an ack not yet matched).
    Event(usize),
}

/// A committed batch: counts for the metrics, the newest seq, and what to publish.
#[derive(Debug, Default)]
pub(super) struct Commit {
    pub readings: u64,
    pub presence: u64,
    /// Readings not stored because they repeat a stored one.
    pub repeated: u64,
    pub last_seq: i64,
    pub plan: Plan,
    /// Answers that matched no sent command: (id, device).
    pub unknown_acks: Vec<(String, String)>,
}

/// What a committed batch holds, for publishing it.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub order: Vec<Entry>,
    pub events: Vec<EventRow>,
}

/// Per-device changes gathered over one batch.
#[derive(Debug)]
pub(super) struct DeviceChange {
    pub first: i64,
    pub last: i64,
    pub online: Option<bool>,
    pub presence_at: Option<i64>,
    /// An `online` / `offline` message is in the batch.
    pub reported: bool,
}

/// A batch laid out in log order before it is written: every row with its seq.
pub(super) struct Planned<'a> {
    /// Device rows to write (those whose row changes).
    pub devices: Vec<(&'a DeviceId, DeviceChange)>,
    /// Presence as it is once the batch commits.
    pub online: HashMap<&'a DeviceId, bool>,
    pub readings: Vec<(&'a Reading, i64)>,
    /// Answers, each with the seq of its event and its slot in `plan.order`.
    pub acks: Vec<(&'a CommandAck, i64, usize)>,
    pub plan: Plan,
    pub presence: u64,
    /// Readings that repeat a stored one.
    pub repeated: u64,
    /// The seq after the batch's last.
    pub next_seq: i64,
}

impl Planned<'_> {
    /// Whether the batch writes nothing at all.
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty() && self.devices.is_empty() && self.acks.is_empty()
    }

    /// Records what an answer did: its event when it matched a sent command (sent at
    /// `sent_at`), else it is an unknown ack.
    pub fn answered(
        &mut self,
        ack: &CommandAck,
        seq: i64,
        slot: usize,
        sent_at: Option<Option<i64>>,
        unknown: &mut Vec<(String, String)>,
    ) {
        let Some(sent) = sent_at else {
            unknown.push((ack.id.clone(), ack.device.to_string()));
            return;
        };
        let status = ack_status(ack);
        let result = ack
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str::<Value>(r).ok());
        let rtt_ms = sent.map(|s| ack.at - s);
        self.plan.order[slot] = Entry::Event(self.plan.events.len());
        self.plan.events.push(EventRow::command(
            seq,
            &ack.id,
            ack.device.as_str(),
            status,
            ack.at,
            Some(serde_json::json!({"ok": ack.ok, "result": result, "error": ack.error, "rtt_ms": rtt_ms})),
        ));
    }

    /// Drops the slots of unknown acks, which hold no event.
    pub fn finish(&mut self) {
        self.plan
            .order
            .retain(|e| !matches!(e, Entry::Event(i) if *i == usize::MAX));
    }
}

/// The status an answer gives its command.
pub(super) fn ack_status(ack: &CommandAck) -> &'static str {
    if ack.ok { "acked" } else { "failed" }
}

/// Lays a batch out in log order from `next_seq`: a device that comes back online by
/// sending gets its `status` event just before that reading, an answered command its
/// `command` event. `was_online` is presence as stored before the batch; `seen_written` is
/// `last_seen` as last written, to skip rewriting it for a device that stays online.
pub(super) fn plan<'a>(
    batch: &'a [Item],
    repeats: &[bool],
    next_seq: i64,
    was_online: impl Fn(&str) -> Option<bool>,
    seen_written: &HashMap<Arc<str>, i64>,
) -> Planned<'a> {
    let mut devices: HashMap<&DeviceId, DeviceChange> = HashMap::new();
    let mut online: HashMap<&DeviceId, bool> = HashMap::new();
    let mut acks = Vec::new();
    let mut readings: Vec<(&Reading, i64)> = Vec::with_capacity(batch.len());
    let mut plan = Plan::default();
    let mut presence = 0u64;
    let mut seq = next_seq;
    let mut repeated = 0u64;
    for (i, item) in batch.iter().enumerate() {
        if repeats.get(i) == Some(&true) {
            // Already stored: acknowledged with the batch, and nothing else.
            repeated += 1;
            continue;
        }
        let (device, at) = match item {
            Item::Reading(r, _) => (&r.device, r.received_at),
            Item::Presence { device, at, .. } => (device, *at),
            Item::CommandAck(ack) => (&ack.device, ack.at),
            Item::Skip(_) => continue,
        };
        let c = devices.entry(device).or_insert(DeviceChange {
            first: at,
            last: at,
            online: None,
            presence_at: None,
            reported: false,
        });
        c.last = c.last.max(at);
        let before = online
            .get(device)
            .copied()
            .or_else(|| was_online(device.as_str()))
            == Some(true);
        let now_online = match item {
            Item::Presence { online, .. } => {
                presence += 1;
                c.presence_at = Some(at);
                c.reported = true;
                *online
            }
            // A device that sends telemetry or answers is evidently online.
            _ => {
                if c.online != Some(true) {
                    c.presence_at = Some(at);
                }
                true
            }
        };
        c.online = Some(now_online);
        online.insert(device, now_online);
        // A report is an event even when it repeats; otherwise only a change is.
        if matches!(item, Item::Presence { .. }) || (now_online && !before) {
            plan.order.push(Entry::Event(plan.events.len()));
            plan.events
                .push(EventRow::status(seq, device.as_str(), now_online, at));
            seq += 1;
        }
        match item {
            Item::Reading(r, _) => {
                plan.order.push(Entry::Reading(i, seq));
                readings.push((r, seq));
                seq += 1;
            }
            Item::CommandAck(ack) => {
                // Its event's seq is kept even if the ack turns out to be for an unknown
                // command (then that seq is simply never used).
                acks.push((ack, seq, plan.order.len()));
                plan.order.push(Entry::Event(usize::MAX));
                seq += 1;
            }
            _ => {}
        }
    }
    // A device already online that only sent readings or answers changes nothing but
    // last_seen, which is written at most every LAST_SEEN_EVERY_MS.
    let devices: Vec<(&DeviceId, DeviceChange)> = devices
        .into_iter()
        .filter(|(d, c)| {
            c.reported
                || was_online(d.as_str()) != Some(true)
                || seen_written
                    .get(d.as_str())
                    .is_none_or(|&w| c.last - w >= LAST_SEEN_EVERY_MS)
        })
        .collect();
    Planned {
        devices,
        online,
        readings,
        acks,
        plan,
        presence,
        repeated,
        next_seq: seq,
    }
}

/// The writer's settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most items per transaction.
    pub batch_size: usize,
    /// How long a batch may wait to fill.
    pub batch_delay: Duration,
    /// Longest wait between two attempts at a failing commit.
    pub retry_max: Duration,
}

impl From<&StorageConfig> for WriterConfig {
    fn from(c: &StorageConfig) -> Self {
        WriterConfig {
            batch_size: c.batch_size,
            batch_delay: c.batch_delay,
            retry_max: c.retry_max,
        }
    }
}

/// The oldest time among a batch's items (readings carry theirs; the rest count from now).
fn oldest_ms(batch: &[Item]) -> i64 {
    batch
        .iter()
        .filter_map(|i| match i {
            Item::Reading(r, _) => Some(r.received_at),
            _ => None,
        })
        .min()
        .unwrap_or_else(domain::now_ms)
}

/// What a storage backend gives the writer loop.
pub(super) trait Backend {
    /// Commits one batch in one transaction, its events appended to the log in it.
    async fn commit(&mut self, batch: &[Item]) -> Result<Commit, StoreError>;
    /// Announces a committed batch (SQLite: to the feed at once; PostgreSQL: to the tail).
    fn publish(&self, committed: &Committed, batch: &[Item], commit: &Commit);
    /// Why a write failed, for the health report.
    fn fault_kind(&self, e: &StoreError) -> FaultKind;
    /// What the writer reports about itself.
    fn health(&self) -> &Arc<Health>;
    /// The newest seq at start, when this backend announces it (SQLite).
    fn start_seq(&self) -> Option<i64>;
    /// Work besides batches that waits for the writer (SQLite's control queue).
    fn controls(&mut self) -> Option<&mut mpsc::Receiver<Control>>;
    /// Does one piece of that work.
    async fn control(&mut self, ctl: Control, committed: &Committed);
    /// Runs after each committed batch (SQLite bounds its WAL and does queued work).
    async fn after_batch(&mut self, metrics: &Metrics, committed: &Committed);
    /// A small write while faulty, so that readiness turns back by itself.
    async fn probe(&mut self);
    /// Closes the connection at the end.
    async fn close(&mut self);
}

/// Waits for the next piece of control work, forever when there is no queue.
async fn next_control(rx: Option<&mut mpsc::Receiver<Control>>) -> Option<Control> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Runs the writer until `items` is closed and drained: every item received is committed
/// and then acknowledged, so a shutdown loses nothing. When storage keeps failing after
/// `shutdown`, it gives up: the error says why, and what was not committed was not
/// acknowledged either, so the broker keeps it.
pub(super) async fn run<B: Backend>(
    mut backend: B,
    cfg: WriterConfig,
    mut items: mpsc::Receiver<Item>,
    mut acks: Box<dyn AckSink>,
    metrics: Arc<Metrics>,
    committed: &Committed,
    shutdown: CancellationToken,
) -> Result<(), StoreError> {
    if let Some(seq) = backend.start_seq() {
        let _ = committed.last_seq.send(seq);
    }
    let mut batch: Vec<Item> = Vec::with_capacity(cfg.batch_size);
    let mut pending_acks: Vec<AckToken> = Vec::new();
    let mut retry = tokio::time::interval(Duration::from_millis(5));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(cfg.retry_max);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outcome = Ok(());
    loop {
        tokio::select! {
            biased;
            n = items.recv_many(&mut batch, cfg.batch_size) => {
                if n == 0 {
                    break;
                }
                if !cfg.batch_delay.is_zero() && batch.len() < cfg.batch_size {
                    let deadline = tokio::time::Instant::now() + cfg.batch_delay;
                    while batch.len() < cfg.batch_size {
                        let room = cfg.batch_size - batch.len();
                        match tokio::time::timeout_at(deadline, items.recv_many(&mut batch, room)).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                }
                metrics.queue_depth.set(items.len() as i64);
                backend.health().busy(batch.len() + items.len(), oldest_ms(&batch));
                let step = Step { metrics: &metrics, committed, queue: &items, cfg: &cfg, shutdown: &shutdown };
                if let Err(e) = commit_with_retry(&mut backend, &mut batch, &mut pending_acks, &step).await {
                    outcome = Err(e);
                    break;
                }
                acks.ack(&mut pending_acks);
                backend.after_batch(&metrics, committed).await;
            }
            Some(ctl) = next_control(backend.controls()) => backend.control(ctl, committed).await,
            _ = retry.tick(), if !pending_acks.is_empty() => acks.ack(&mut pending_acks),
            // A fault left by work that failed while no readings come: a small write
            // finds out when storage works again, so readiness turns back by itself.
            _ = probe.tick(), if backend.health().faulty() => backend.probe().await,
        }
    }
    // Shutting down: whatever was committed must reach the broker as acks.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !pending_acks.is_empty() && Instant::now() < deadline {
        acks.ack(&mut pending_acks);
        if !pending_acks.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    backend.close().await;
    outcome
}

/// The loop's state that one commit needs.
struct Step<'a> {
    metrics: &'a Metrics,
    committed: &'a Committed,
    queue: &'a mpsc::Receiver<Item>,
    cfg: &'a WriterConfig,
    shutdown: &'a CancellationToken,
}

/// Records a failed write in the health report (and the log, on its first occurrence).
pub(super) fn report_failure(health: &Health, kind: FaultKind, e: &StoreError, items: usize) {
    let first = health.fault().is_none_or(|f| f.kind != kind);
    health.failed(kind, e.to_string());
    if first {
        tracing::error!(error = %e, fault = kind.as_str(), items, "storage write failed: not acknowledging anything until it works again");
    }
}

/// Commits a batch, retrying on failure (disk full, locked, read-only, server away) rather
/// than dropping it; the backoff doubles up to `retry_max`. Unacknowledged messages stay
/// with the broker meanwhile, so nothing is lost. Gives up only during shutdown.
async fn commit_with_retry<B: Backend>(
    backend: &mut B,
    batch: &mut Vec<Item>,
    acks: &mut Vec<AckToken>,
    step: &Step<'_>,
) -> Result<(), StoreError> {
    let Step {
        metrics,
        committed,
        queue,
        cfg,
        shutdown,
    } = *step;
    let mut delay = Duration::from_millis(50).min(cfg.retry_max);
    let mut give_up_at: Option<tokio::time::Instant> = None;
    let mut attempts = 0u64;
    let first_try = Instant::now();
    loop {
        let started = Instant::now();
        let result = backend.commit(batch).await;
        // The transaction's own time, before publishing to the feed and the alerts.
        let took = started.elapsed();
        match result {
            Ok(commit) => {
                if attempts > 0 {
                    tracing::info!(attempts, "the batch committed after failing");
                }
                backend.publish(committed, batch, &commit);
                for (id, device) in &commit.unknown_acks {
                    metrics.unknown_acks.inc();
                    tracing::warn!(%id, %device, "ack for an unknown or already finished command");
                }
                metrics.stored.inc_by(commit.readings);
                metrics.repeated.inc_by(commit.repeated);
                metrics.presence.inc_by(commit.presence);
                metrics.batches.inc();
                metrics.commit_seconds.observe_duration(took);
                metrics.commit_latency.observe_duration(first_try.elapsed());
                // Repeats are written (and looked up) in the transaction too.
                let readings = commit.readings + commit.repeated;
                if readings > 0 {
                    metrics.batch_size.observe(readings as f64);
                }
                backend.health().committed(queue.len());
                acks.extend(batch.drain(..).filter_map(|item| match item {
                    Item::Reading(_, ack) | Item::Skip(ack) | Item::Presence { ack, .. } => ack,
                    Item::CommandAck(a) => a.ack,
                }));
                return Ok(());
            }
            Err(e) => {
                attempts += 1;
                metrics.commit_failures.inc();
                let health = backend.health();
                health.busy(batch.len() + queue.len(), oldest_ms(batch));
                report_failure(health, backend.fault_kind(&e), &e, batch.len());
                // Repeated failures are logged every 5 s or so, not at every attempt.
                if attempts % 20 == 0 {
                    tracing::warn!(error = %e, attempts, retry_in = ?delay, items = batch.len(), "commit still failing; retrying");
                }
                if shutdown.is_cancelled() {
                    let at = *give_up_at
                        .get_or_insert_with(|| tokio::time::Instant::now() + SHUTDOWN_RETRY);
                    if tokio::time::Instant::now() >= at {
                        tracing::error!(error = %e, items = batch.len() + queue.len(), "shutting down while storage fails: giving up; what was not committed was not acknowledged and stays with the broker");
                        return Err(e);
                    }
                }
                // Never past the moment to give up, so the last tries fit shutdown's
                // deadline whatever retry_max is.
                let wake = give_up_at.map_or(tokio::time::Instant::now() + delay, |at| {
                    at.min(tokio::time::Instant::now() + delay)
                });
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    // Shutdown shortens the wait.
                    _ = shutdown.cancelled(), if give_up_at.is_none() => {}
                }
                delay = (delay * 2).min(cfg.retry_max);
            }
        }
    }
}
