//! Alerts: rules evaluated on committed readings and presence changes, the alerts they fire
//! and resolve (stored, each change an `alert` event of the log), and webhooks.
//!
//! The writer (SQLite) or the log's tail (PostgreSQL) hands every committed reading and
//! presence change to [`Input`], a bounded queue; the [`Engine`] keeps, per rule and device,
//! only what the rule needs (since when the condition holds, when the device last sent), so a
//! reading costs a hash lookup and, for a rule on a payload field, one JSON parse: never a
//! query. When the queue overflows, the engine reads what it missed back from the log.
//! Several instances on one PostgreSQL database all evaluate every event; the database's
//! one-open-alert-per-rule-and-device index decides which of them fires (or resolves), and
//! only that one calls the webhooks.

pub mod rule;
pub mod webhook;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::glob_match;
use crate::config::{PresenceConfig, RuleConfig, Severity};
use crate::domain;
use crate::feed::{Kind, Kinds};
use crate::observability::Metrics;
use crate::presence::Cadence;
use crate::store::alert::{AlertChange, AlertOutcome, AlertState, NewAlert};
use crate::store::log::EventRow;
use crate::store::{LogEntry, Store};
use rule::Condition;
pub use webhook::Webhooks;

/// Batches of observations the queue holds before the engine reads back from the log.
const INPUT_BATCHES: usize = 1024;
/// How often timed conditions (`for`, `no reading`, `missing`) are checked.
const TICK: Duration = Duration::from_secs(1);
/// Log entries read per query when catching up.
const REPLAY_PAGE: i64 = 5_000;

/// What the engine is told of a committed event.
#[derive(Debug, Clone)]
pub enum Observed {
    /// A reading (JSON objects only: a raw payload has no fields).
    Reading {
        /// Its seq.
        seq: i64,
        /// The device.
        device: Arc<str>,
        /// Receive time, Unix ms.
        at: i64,
        /// The JSON object as sent.
        payload: Bytes,
    },
    /// A presence change.
    Presence {
        /// Its seq.
        seq: i64,
        /// The device.
        device: Arc<str>,
        /// Online or offline now.
        online: bool,
        /// Stale (or fresh again), when the change says.
        stale: Option<bool>,
        /// When, Unix ms.
        at: i64,
    },
}

impl Observed {
    fn seq(&self) -> i64 {
        match self {
            Observed::Reading { seq, .. } | Observed::Presence { seq, .. } => *seq,
        }
    }

    /// A presence event of the log as an observation.
    pub fn presence(e: &EventRow) -> Option<Observed> {
        #[derive(serde::Deserialize)]
        struct Data {
            online: bool,
            stale: Option<bool>,
        }
        if e.kind != Kind::Status {
            return None;
        }
        let d: Data = serde_json::from_str(&e.data).ok()?;
        Some(Observed::Presence {
            seq: e.seq,
            device: e.device.clone(),
            online: d.online,
            stale: d.stale,
            at: e.at,
        })
    }

    /// A replayed log entry as an observation.
    pub fn of_entry(e: &LogEntry) -> Option<Observed> {
        match e {
            LogEntry::Reading(r) if r.flags & domain::flags::RAW == 0 => Some(Observed::Reading {
                seq: r.seq,
                device: Arc::from(r.device.as_str()),
                at: r.received_at,
                payload: Bytes::from(r.payload.clone()),
            }),
            LogEntry::Reading(_) => None,
            LogEntry::Event(e) => Observed::presence(e),
        }
    }
}

/// Where committed events reach the engine: a bounded queue that never blocks the writer.
pub struct Input {
    tx: mpsc::Sender<Vec<Observed>>,
    /// A batch was dropped: the engine reads back from the log before the next one.
    lagged: AtomicBool,
    /// Whether any rule is configured (nothing is sent while none is).
    wanted: AtomicBool,
}

impl Input {
    /// A queue and its receiving end, for [`Engine::run`].
    pub fn new(wanted: bool) -> (Arc<Input>, mpsc::Receiver<Vec<Observed>>) {
        let (tx, rx) = mpsc::channel(INPUT_BATCHES);
        let input = Input {
            tx,
            lagged: AtomicBool::new(false),
            wanted: AtomicBool::new(wanted),
        };
        (Arc::new(input), rx)
    }

    /// Whether the engine wants events (some rule is configured).
    pub fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Relaxed)
    }

    /// Hands over one committed batch's observations; when the queue is full they are
    /// dropped and the engine catches up from the log instead.
    pub fn send(&self, batch: Vec<Observed>) {
        if batch.is_empty() {
            return;
        }
        if self.tx.try_send(batch).is_err() {
            self.lagged.store(true, Ordering::Release);
        }
    }
}

/// A rule, compiled.
#[derive(Debug, Clone)]
struct Rule {
    name: String,
    devices: Vec<String>,
    when: Condition,
    clear: Option<Condition>,
    hold_ms: i64,
    hold: Duration,
    severity: Severity,
}

impl Rule {
    fn compile(c: &RuleConfig) -> Option<Rule> {
        Some(Rule {
            name: c.name.clone(),
            devices: c.devices.clone(),
            when: Condition::parse(&c.when).ok()?,
            clear: c.clear.as_deref().map(Condition::parse).transpose().ok()?,
            hold_ms: i64::try_from(c.hold.as_millis()).unwrap_or(i64::MAX),
            hold: c.hold,
            severity: c.severity,
        })
    }

    fn applies_to(&self, device: &str) -> bool {
        self.devices.iter().any(|g| glob_match(g, device))
    }

    fn threshold(&self) -> Option<f64> {
        match &self.when {
            Condition::Compare { value, .. } => Some(*value),
            _ => None,
        }
    }

    /// What happened, in words, for the alert.
    fn message(&self, value: Option<f64>) -> String {
        let held = if self.hold.is_zero() {
            String::new()
        } else {
            format!(" for {}", humantime::format_duration(self.hold))
        };
        match value {
            Some(v) if matches!(self.when, Condition::Compare { .. }) => {
                format!("{} (value {v}){held}", self.when)
            }
            _ => format!("{}{held}", self.when),
        }
    }
}

/// What the engine keeps of one rule on one device.
#[derive(Debug, Default, Clone)]
struct Track {
    /// A comparison or `offline`: since when the condition holds. `no reading` and
    /// `missing`: when the reading or field was last seen.
    since: Option<i64>,
    /// Whether the rule has an open alert for the device.
    open: bool,
    /// The last value of the rule's field.
    value: Option<f64>,
}

/// The rules that apply to one device, and what each knows of it.
#[derive(Debug, Default)]
struct DeviceState {
    /// Indices into the engine's rules.
    rules: Vec<usize>,
    /// `tracks[j]` belongs to `rules[j]`.
    tracks: Vec<Track>,
}

impl DeviceState {
    fn track(&mut self, rule: usize) -> Option<&mut Track> {
        let j = self.rules.iter().position(|&r| r == rule)?;
        self.tracks.get_mut(j)
    }
}

/// Evaluates the rules; see the module documentation.
pub struct Engine {
    store: Store,
    metrics: Arc<Metrics>,
    webhooks: Arc<Webhooks>,
    input: Arc<Input>,
    rules: Vec<Rule>,
    /// Per device: one lookup per reading finds every rule that applies and its track.
    devices: HashMap<Arc<str>, DeviceState>,
    /// The newest seq evaluated: the log position each change is decided at.
    seen: i64,
    /// Which devices are stale.
    cadence: Cadence,
}

impl Engine {
    /// An engine for `rules` (validated by the config already).
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        webhooks: Arc<Webhooks>,
        input: Arc<Input>,
        rules: &[RuleConfig],
        presence: &PresenceConfig,
    ) -> Engine {
        let seen = store.opened_at();
        let mut e = Engine {
            store,
            metrics,
            webhooks,
            input,
            rules: Vec::new(),
            devices: HashMap::new(),
            seen,
            cadence: Cadence::new(presence),
        };
        e.set_rules(rules);
        e
    }

    fn set_rules(&mut self, rules: &[RuleConfig]) {
        let old = std::mem::take(&mut self.rules);
        self.rules = rules.iter().filter_map(Rule::compile).collect();
        // What each known device keeps: a rule that did not change keeps what it knew; a
        // changed one starts over, keeping only whether an alert is open.
        let devices = std::mem::take(&mut self.devices);
        for (device, was) in devices {
            let mut state = self.state_for(&device);
            for (j, &i) in state.rules.iter().enumerate() {
                let rule = &self.rules[i];
                let kept = was
                    .rules
                    .iter()
                    .position(|&o| old[o].name == rule.name)
                    .map(|k| (&old[was.rules[k]], &was.tracks[k]));
                state.tracks[j] = match kept {
                    Some((o, t)) if same_rule(o, rule) => t.clone(),
                    Some((_, t)) => Track {
                        open: t.open,
                        ..Track::default()
                    },
                    None => Track::default(),
                };
            }
            self.devices.insert(device, state);
        }
        self.input.wanted.store(
            !self.rules.is_empty() || self.cadence.enabled(),
            Ordering::Relaxed,
        );
    }

    /// A fresh state for `device`: the rules that apply to it.
    fn state_for(&self, device: &str) -> DeviceState {
        new_state(&self.rules, device)
    }

    /// Rule `i`'s track of `device`, if the rule applies to it.
    fn track(&mut self, i: usize, device: &Arc<str>) -> Option<&mut Track> {
        state_in(&mut self.devices, &self.rules, device).track(i)
    }

    /// Runs until `shutdown`: evaluates what `events` brings, checks timed conditions every
    /// second, and takes new rules from `reload` (SIGHUP).
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Vec<Observed>>,
        mut reload: watch::Receiver<Arc<Vec<RuleConfig>>>,
        shutdown: CancellationToken,
    ) {
        // Open alerts and known devices, retried until storage answers.
        loop {
            match self.load().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "alerts: cannot read open alerts yet; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        let mut reload_open = true;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                batch = events.recv() => match batch {
                    Some(batch) => self.take(batch).await,
                    None => return,
                },
                _ = tick.tick() => {
                    let now = domain::now_ms();
                    self.timed(now).await;
                    self.mark_stale(now).await;
                }
                changed = async {
                    if reload_open {
                        reload.changed().await
                    } else {
                        std::future::pending().await
                    }
                } => match changed {
                    Ok(()) => {
                        let rules = reload.borrow_and_update().clone();
                        self.reload(&rules).await;
                    }
                    Err(_) => reload_open = false,
                },
            }
        }
    }

    /// Learns the open alerts and the devices storage knows.
    async fn load(&mut self) -> Result<(), crate::store::StoreError> {
        let open = self
            .store
            .alerts(
                &[AlertState::Firing, AlertState::Acknowledged],
                None,
                i64::MAX,
            )
            .await?;
        let devices = self.store.devices().await?;
        let now = domain::now_ms();
        for d in devices {
            let device: Arc<str> = Arc::from(d.id.as_str());
            self.cadence
                .known(device.clone(), d.online, d.stale, d.last_seen);
            let mut state = self.state_for(&device);
            for (j, &i) in state.rules.iter().enumerate() {
                state.tracks[j].since = match self.rules[i].when {
                    Condition::NoReading => Some(d.last_seen),
                    Condition::Missing { .. } => Some(now),
                    Condition::Offline if !d.online => Some(now),
                    _ => None,
                };
            }
            self.devices.insert(device, state);
        }
        for a in open {
            if let Some(i) = self.rules.iter().position(|r| r.name == a.rule)
                && let Some(t) = self.track(i, &Arc::from(a.device.as_str()))
            {
                t.open = true;
                t.value = a.value;
            }
        }
        self.resolve_orphans(&[]).await;
        Ok(())
    }

    /// New rules: open alerts of rules that are gone are resolved.
    async fn reload(&mut self, rules: &[RuleConfig]) {
        let before: Vec<String> = self.rules.iter().map(|r| r.name.clone()).collect();
        self.set_rules(rules);
        let gone: Vec<String> = before
            .into_iter()
            .filter(|n| !self.rules.iter().any(|r| &r.name == n))
            .collect();
        self.resolve_orphans(&gone).await;
        tracing::info!(rules = self.rules.len(), "alerts: rules reloaded");
    }

    /// Resolves the open alerts of rules no longer configured (those named in `gone`, and
    /// any other stored open alert whose rule is unknown).
    async fn resolve_orphans(&mut self, gone: &[String]) {
        let open = match self
            .store
            .alerts(
                &[AlertState::Firing, AlertState::Acknowledged],
                None,
                i64::MAX,
            )
            .await
        {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = %e, "alerts: cannot read open alerts");
                return;
            }
        };
        for a in open {
            let known = self.rules.iter().any(|r| r.name == a.rule);
            if !known || gone.contains(&a.rule) {
                let change = AlertChange::Resolve {
                    rule: a.rule.clone(),
                    device: a.device.clone(),
                    at: domain::now_ms(),
                    seq: self.seen,
                };
                self.apply(change).await;
            }
        }
    }

    /// One committed batch; first what was missed, when the queue overflowed.
    async fn take(&mut self, batch: Vec<Observed>) {
        let last = batch.last().map_or(self.seen, Observed::seq);
        if self.input.lagged.swap(false, Ordering::AcqRel) {
            self.catch_up(last).await;
        }
        for o in batch {
            if o.seq() > self.seen {
                self.seen = o.seq();
                self.observe(o).await;
            }
        }
    }

    /// Reads the log from `seen` through `through` and evaluates it.
    async fn catch_up(&mut self, through: i64) {
        let kinds = Kinds::NONE.with(Kind::Reading).with(Kind::Status);
        self.metrics.alert_catch_ups.inc();
        while self.seen < through {
            let entries = match self.store.replay(self.seen, None, kinds, REPLAY_PAGE).await {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "alerts: cannot read back the events the queue dropped; they are not evaluated");
                    self.seen = through;
                    return;
                }
            };
            let Some(last) = entries.last().map(LogEntry::seq) else {
                break;
            };
            for e in &entries {
                if e.seq() > through {
                    break;
                }
                if let Some(o) = Observed::of_entry(e) {
                    self.seen = self.seen.max(o.seq());
                    self.observe(o).await;
                }
            }
            self.seen = last.min(through);
            if (entries.len() as i64) < REPLAY_PAGE {
                break;
            }
        }
        self.seen = self.seen.max(through);
    }

    async fn observe(&mut self, o: Observed) {
        // Judged with one lookup of the device; only what must change storage is awaited.
        let mut acts: Vec<(usize, Act)> = Vec::new();
        let (device, at) = match o {
            Observed::Reading {
                device,
                at,
                payload,
                ..
            } => {
                let rules = &self.rules;
                let state = state_in(&mut self.devices, rules, &device);
                let fresh_again = self.cadence.reading(&device, at);
                let mut body = Payload::new(&payload);
                for (j, &i) in state.rules.iter().enumerate() {
                    let act = judge_reading(&rules[i], &mut state.tracks[j], at, &mut body);
                    if !matches!(act, Act::Nothing) {
                        acts.push((i, act));
                    }
                }
                if fresh_again {
                    self.set_stale(&device, false, at).await;
                }
                (device, at)
            }
            Observed::Presence {
                device,
                online,
                stale,
                at,
                ..
            } => {
                self.cadence.presence(&device, online, stale, at);
                let rules = &self.rules;
                let state = state_in(&mut self.devices, rules, &device);
                for (j, &i) in state.rules.iter().enumerate() {
                    let act = judge_presence(&rules[i], &mut state.tracks[j], online, at);
                    if !matches!(act, Act::Nothing) {
                        acts.push((i, act));
                    }
                }
                (device, at)
            }
        };
        for (i, act) in acts {
            match act {
                Act::Fire => self.maybe_fire(i, &device, at).await,
                Act::Resolve => self.resolve(i, &device, at).await,
                Act::Nothing => {}
            }
        }
    }

    /// Fires timed conditions that have held long enough.
    async fn timed(&mut self, now: i64) {
        let mut due = Vec::new();
        for (device, state) in &self.devices {
            for (&i, t) in state.rules.iter().zip(&state.tracks) {
                if let Some(since) = t.since
                    && !t.open
                    && now.saturating_sub(since) >= self.rules[i].hold_ms
                {
                    due.push((i, device.clone()));
                }
            }
        }
        for (i, device) in due {
            self.maybe_fire(i, &device, now).await;
        }
    }

    /// Marks the devices that went silent for too long stale.
    async fn mark_stale(&mut self, now: i64) {
        for device in self.cadence.due(now) {
            if self.set_stale(&device, true, now).await {
                tracing::info!(device = %device, "device is stale: it missed its usual readings");
            }
        }
    }

    /// Stores a device as stale or fresh again; true when this call moved it.
    async fn set_stale(&mut self, device: &Arc<str>, stale: bool, at: i64) -> bool {
        match self.store.mark_stale(device, stale, at).await {
            Ok(moved) => {
                // Moved by us or another instance, or not online: either way, as stored.
                self.cadence.set_stale(device, stale);
                moved
            }
            Err(e) => {
                tracing::warn!(error = %e, device = %device, "cannot store a stale change; trying again");
                false
            }
        }
    }

    /// Fires rule `i` on `device` if its condition has held for the rule's `for` at `now`.
    async fn maybe_fire(&mut self, i: usize, device: &Arc<str>, now: i64) {
        let hold_ms = self.rules[i].hold_ms;
        let Some(t) = self.track(i, device) else {
            return;
        };
        let Some(since) = t.since else { return };
        if t.open || now.saturating_sub(since) < hold_ms {
            return;
        }
        let value = t.value;
        let rule = &self.rules[i];
        let change = AlertChange::Fire(NewAlert {
            rule: rule.name.clone(),
            device: device.to_string(),
            severity: rule.severity.as_str(),
            field: rule.when.field().map(str::to_owned),
            threshold: rule.threshold(),
            value,
            message: rule.message(value),
            at: now,
            seq: self.seen,
        });
        // Marked open before the store answers, so a failing store is not asked again on
        // every reading; a failure clears it and the next reading or tick tries again.
        if let Some(t) = self.track(i, device) {
            t.open = true;
        }
        let ok = self.apply(change).await;
        if !ok && let Some(t) = self.track(i, device) {
            t.open = false;
        }
    }

    async fn resolve(&mut self, i: usize, device: &Arc<str>, at: i64) {
        let change = AlertChange::Resolve {
            rule: self.rules[i].name.clone(),
            device: device.to_string(),
            at,
            seq: self.seen,
        };
        if let Some(t) = self.track(i, device) {
            t.open = false;
        }
        if !self.apply(change).await
            && let Some(t) = self.track(i, device)
        {
            t.open = true;
        }
    }

    /// Stores a change; the webhooks hear of it when this call moved the alert. False when
    /// storage failed.
    async fn apply(&self, change: AlertChange) -> bool {
        match self.store.change_alert(change).await {
            Ok(AlertOutcome::Changed(alert)) => {
                self.metrics.alert_changed(&alert.state);
                tracing::info!(rule = %alert.rule, device = %alert.device, state = %alert.state, severity = %alert.severity, "alert {}", alert.message);
                self.webhooks.send(&alert);
                true
            }
            Ok(AlertOutcome::Unchanged(_)) => true,
            Err(e) => {
                tracing::warn!(error = %e, "alerts: cannot store an alert change; trying again on the next event");
                false
            }
        }
    }
}

/// One reading's payload as the rules read it: parsed once, on first need, and each numeric
/// field looked up once however many rules compare it.
struct Payload<'a> {
    bytes: &'a [u8],
    json: Option<Option<Value>>,
    /// Fields looked up so far (a reading's rules name few distinct fields).
    numbers: Vec<(&'a str, Option<f64>)>,
}

impl<'a> Payload<'a> {
    fn new(bytes: &'a [u8]) -> Payload<'a> {
        Payload {
            bytes,
            json: None,
            numbers: Vec::new(),
        }
    }

    fn json(&mut self) -> Option<&Value> {
        let bytes = self.bytes;
        self.json
            .get_or_insert_with(|| serde_json::from_slice(bytes).ok())
            .as_ref()
    }

    /// A numeric field's value.
    fn number(&mut self, field: &'a str) -> Option<f64> {
        if let Some((_, v)) = self.numbers.iter().find(|(f, _)| *f == field) {
            return *v;
        }
        let v = self.json().and_then(|p| rule::lookup(p, field));
        self.numbers.push((field, v));
        v
    }

    /// Whether a field is there (and not null).
    fn has(&mut self, field: &str) -> bool {
        self.json()
            .and_then(|p| rule::field(p, field))
            .is_some_and(|v| !v.is_null())
    }

    /// Whether a comparison holds, and the value compared; `None` when the field is absent
    /// or not a number.
    fn compare(&mut self, c: &'a Condition) -> Option<(bool, f64)> {
        let v = self.number(c.field()?)?;
        Some((c.holds(v)?, v))
    }
}

/// A fresh state for `device`: the rules that apply to it.
fn new_state(rules: &[Rule], device: &str) -> DeviceState {
    let applying: Vec<usize> = (0..rules.len())
        .filter(|&i| rules[i].applies_to(device))
        .collect();
    DeviceState {
        tracks: vec![Track::default(); applying.len()],
        rules: applying,
    }
}

/// The state of `device` in `devices`, made on first sight.
fn state_in<'a>(
    devices: &'a mut HashMap<Arc<str>, DeviceState>,
    rules: &[Rule],
    device: &Arc<str>,
) -> &'a mut DeviceState {
    devices
        .entry(device.clone())
        .or_insert_with(|| new_state(rules, device))
}

/// What a reading does to `rule` on a device whose track is `t`.
fn judge_reading<'a>(rule: &'a Rule, t: &mut Track, at: i64, payload: &mut Payload<'a>) -> Act {
    match &rule.when {
        Condition::Compare { .. } => {
            let Some((holds, v)) = payload.compare(&rule.when) else {
                return Act::Nothing;
            };
            t.value = Some(v);
            if t.open {
                let clears = match &rule.clear {
                    Some(c) => payload.compare(c).is_some_and(|(h, _)| h),
                    None => !holds,
                };
                if clears {
                    t.since = None;
                    return Act::Resolve;
                }
                Act::Nothing
            } else if holds {
                t.since.get_or_insert(at);
                Act::Fire
            } else {
                t.since = None;
                Act::Nothing
            }
        }
        Condition::NoReading => {
            t.since = Some(at);
            if t.open { Act::Resolve } else { Act::Nothing }
        }
        Condition::Missing { field } => {
            if payload.has(field) {
                t.since = Some(at);
                if t.open { Act::Resolve } else { Act::Nothing }
            } else {
                // A device first seen without the field: its time starts now.
                t.since.get_or_insert(at);
                Act::Nothing
            }
        }
        Condition::Offline => Act::Nothing,
    }
}

/// What a presence change does to `rule` (when it is an `offline` rule).
fn judge_presence(rule: &Rule, t: &mut Track, online: bool, at: i64) -> Act {
    if rule.when != Condition::Offline {
        return Act::Nothing;
    }
    if online {
        t.since = None;
        if t.open { Act::Resolve } else { Act::Nothing }
    } else if t.open {
        Act::Nothing
    } else {
        t.since.get_or_insert(at);
        Act::Fire
    }
}

/// What an event does to one rule on one device.
enum Act {
    Nothing,
    /// The condition holds: fire once it has held for the rule's `for`.
    Fire,
    Resolve,
}

/// Whether a reloaded rule is the same rule (so what it learned still holds).
fn same_rule(a: &Rule, b: &Rule) -> bool {
    a.devices == b.devices
        && a.when == b.when
        && a.clear == b.clear
        && a.hold == b.hold
        && a.severity == b.severity
}

/// Acknowledges an alert for an operator; the webhooks hear of it when it moved.
pub async fn acknowledge(
    store: &Store,
    webhooks: &Webhooks,
    metrics: &Metrics,
    id: i64,
    by: &str,
) -> Result<AlertOutcome, crate::store::StoreError> {
    let outcome = store
        .change_alert(AlertChange::Ack {
            id,
            by: by.to_owned(),
            at: domain::now_ms(),
        })
        .await?;
    if let AlertOutcome::Changed(alert) = &outcome {
        metrics.alert_changed(&alert.state);
        webhooks.send(alert);
    }
    Ok(outcome)
}

/// The states `GET /api/alerts?state=` names: a list of firing, acknowledged, resolved,
/// or `open` for the first two.
pub fn parse_states(list: &str) -> Result<Vec<AlertState>, String> {
    let mut out = Vec::new();
    for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match s {
            "open" => out.extend([AlertState::Firing, AlertState::Acknowledged]),
            _ => out.push(AlertState::parse(s).ok_or_else(|| {
                format!("{s:?} is not a state: use firing, acknowledged, resolved or open")
            })?),
        }
    }
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_read_numeric_fields_only() {
        let c = Condition::parse("env.t != 3").unwrap();
        let compare = |body: &str| Payload::new(body.as_bytes()).compare(&c);
        assert_eq!(compare(r#"{"env": {"t": 4}}"#), Some((true, 4.0)));
        assert_eq!(compare(r#"{"env": {"t": 3.0}}"#), Some((false, 3.0)));
        assert_eq!(compare(r#"{"env": {"t": "4"}}"#), None);
        assert_eq!(compare(r#"{"env.t": 5}"#), Some((true, 5.0)));
        assert_eq!(compare("{}"), None);
    }
}
