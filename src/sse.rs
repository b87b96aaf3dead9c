//! `GET /events`: one client's Server-Sent-Events stream. It starts with a `retry:` hint,
//! an optional `gap` notice and `snapshot=latest`, replays the event log from storage after
//! `Last-Event-ID`, then follows the live feed, deduplicated by seq, with heartbeats. Every
//! event carries its seq as `id:`; when the client's filter skips events, an `id:`-only
//! frame moves its resume point past them (EventSource takes the id without an event).

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::feed::{self, Interest, Kind, Kinds, Read, Tap};
use crate::observability::Metrics;
use crate::store::Store;

/// Most often an `id:`-only frame is sent to a client whose filter skipped events.
const ID_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Events fetched from storage per replay query.
const REPLAY_PAGE: i64 = 1_000;
/// Most bytes written in one chunk.
const CHUNK_MAX: usize = 256 * 1024;
/// How often a replay may restart because the live ring moved past it, before giving up.
const REPLAY_ROUNDS: u32 = 3;
/// The reconnect delay browsers are told to use.
const RETRY_MS: u64 = 1_000;

/// What a client asked for.
#[derive(Debug, Clone)]
pub struct Params {
    /// Devices to follow; `None` is all.
    pub devices: Option<Vec<String>>,
    /// Event kinds to receive.
    pub kinds: Kinds,
    /// Resume after this seq (an event id).
    pub last_event_id: Option<i64>,
    /// Start with the latest reading of each device.
    pub snapshot: bool,
    /// Device globs the client may see (`None`: all).
    pub scope: Option<Arc<Vec<String>>>,
}

enum Phase {
    Intro,
    Replay { after: i64, round: u32 },
    Live,
    Done,
}

/// One client's stream state.
pub struct Client {
    store: Store,
    tap: Tap,
    params: Params,
    /// The client's position in the log: every event at or below it was sent or skipped
    /// by its filter (live events at or below it came already by replay).
    position: i64,
    /// The highest id the client was given, in an event or an `id:`-only frame.
    id_written: i64,
    phase: Phase,
    heartbeat: tokio::time::Interval,
    /// The heartbeat's period.
    heartbeat_every: std::time::Duration,
    id_tick: tokio::time::Interval,
    /// When the last live chunk was returned. The timers are not reset per chunk (each
    /// reset takes the timer wheel's lock); a tick that comes early re-arms itself once.
    sent_at: tokio::time::Instant,
    stop: CancellationToken,
    last_seq: watch::Receiver<i64>,
    metrics: Arc<Metrics>,
    _slot: crate::limits::Slot,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.metrics.sse_clients.dec();
    }
}

impl Client {
    /// Subscribes to the feed now, so nothing committed from here on can be missed.
    pub fn new(shared: &Shared, slot: crate::limits::Slot, params: Params) -> Client {
        let store = shared.store.clone();
        let last_seq = shared.last_seq.clone();
        let heartbeat_every = shared.heartbeat;
        let stop = shared.streams_stop.clone();
        let metrics = shared.metrics.clone();
        metrics.sse_clients.inc();
        metrics.sse_connections.inc();
        let tap = shared.feed.subscribe(&Interest {
            kinds: params.kinds,
            devices: params.devices.clone(),
            scope: params.scope.clone(),
        });
        // Everything committed from here on comes live; a fresh client starts here.
        let now = *last_seq.borrow();
        let position = params.last_event_id.unwrap_or(now);
        let mut id_tick = tokio::time::interval(ID_EVERY);
        id_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + heartbeat_every,
            heartbeat_every,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Client {
            store,
            tap,
            position,
            id_written: position,
            params,
            phase: Phase::Intro,
            heartbeat,
            heartbeat_every,
            id_tick,
            sent_at: tokio::time::Instant::now(),
            stop,
            last_seq,
            metrics,
            _slot: slot,
        }
    }

    /// The stream of chunks for the HTTP body; it ends on shutdown or when the client lags.
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
        futures_util::stream::unfold(self, |mut c| async move {
            c.next_chunk().await.map(|b| (Ok(b), c))
        })
    }

    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            match self.phase {
                Phase::Done => return None,
                // The storage queries' futures are boxed: an idle stream, waiting in `live`,
                // then holds only what waiting needs (about 0.5 KiB less per connection).
                Phase::Intro => return Some(Box::pin(self.intro()).await),
                Phase::Replay { after, round } => {
                    if let Some(chunk) = Box::pin(self.replay(after, round)).await {
                        return Some(chunk);
                    }
                }
                Phase::Live => return self.live().await,
            }
        }
    }

    /// `retry:`, then a `gap` notice or a snapshot, as asked.
    async fn intro(&mut self) -> Bytes {
        let mut out = BytesMut::new();
        out.extend_from_slice(format!("retry: {RETRY_MS}\n\n").as_bytes());
        let kinds = self.params.kinds;
        self.phase = Phase::Live;
        match self.params.last_event_id {
            Some(n) => {
                let mut last = *self.last_seq.borrow();
                if n > last {
                    // Another instance may have served the client past where our tail is:
                    // the shared log's head decides whether the id exists.
                    if let Ok(Some(head)) = self.store.head_seq().await {
                        last = last.max(head);
                    }
                }
                if n > last {
                    // An id from the future (another database?): say so and go live.
                    out.extend_from_slice(&feed::encode_plain(
                        "gap",
                        &json!({"requested_after": n, "first_available": last + 1, "reason": "unknown_id"}),
                    ));
                    self.position = last;
                    self.id_written = last;
                } else {
                    match self.store.purged_through().await {
                        Ok((readings, others)) => {
                            // What retention removed of the kinds asked for, past the id.
                            let lost = [
                                (kinds.has(Kind::Reading), readings),
                                (Kind::EVENTS.iter().any(|k| kinds.has(*k)), others),
                            ]
                            .into_iter()
                            .filter(|(wanted, purged)| *wanted && *purged > n)
                            .map(|(_, purged)| purged)
                            .max();
                            if let Some(purged) = lost {
                                out.extend_from_slice(&feed::encode_plain(
                                    "gap",
                                    &json!({"requested_after": n, "first_available": purged + 1, "reason": "retention"}),
                                ));
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read how far retention went"),
                    }
                    self.phase = Phase::Replay { after: n, round: 0 };
                }
            }
            None if self.params.snapshot && kinds.has(Kind::Reading) => {
                // Only what was committed before we subscribed: all later comes live.
                let through = self.position;
                match self
                    .store
                    .latest(self.params.devices.as_deref(), Some(through))
                    .await
                {
                    Ok(rows) => {
                        for r in rows
                            .iter()
                            .filter(|r| in_scope(&self.params.scope, &r.device))
                        {
                            out.extend_from_slice(&feed::encode_reading(r));
                        }
                        // The last snapshot frame may carry an older id than our position.
                        push_id(&mut out, through);
                    }
                    Err(e) => tracing::warn!(error = %e, "snapshot query failed"),
                }
                self.phase = Phase::Replay {
                    after: through,
                    round: 0,
                };
            }
            // A fresh client starts at the newest committed seq, but an event committed just
            // before it subscribed may not be in the ring (the writer skips the feed while
            // nobody listens): one replay query from there, usually empty, closes that gap.
            None => {
                self.phase = Phase::Replay {
                    after: self.position,
                    round: 0,
                };
            }
        }
        out.freeze()
    }

    /// One page of the stored log after `after`; `None` when the replay is over.
    async fn replay(&mut self, after: i64, round: u32) -> Option<Bytes> {
        let page = tokio::select! {
            _ = self.stop.cancelled() => { self.phase = Phase::Done; return Some(shutdown_frame()); }
            page = self.store.replay(after, self.params.devices.as_deref(), self.params.kinds, REPLAY_PAGE) => page,
        };
        let rows = match page {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "replay query failed; closing the stream so the client resumes");
                self.phase = Phase::Done;
                return Some(Bytes::from_static(
                    b": storage error, reconnect to resume\n\n",
                ));
            }
        };
        if let Some(last) = rows.last() {
            let mut out = BytesMut::new();
            let mut sent = None;
            for r in rows
                .iter()
                .filter(|r| in_scope(&self.params.scope, r.device()))
            {
                out.extend_from_slice(&r.frame());
                sent = Some(r.seq());
            }
            self.position = last.seq();
            if sent != Some(self.position) {
                push_id(&mut out, self.position);
            }
            self.id_written = self.position;
            self.phase = if rows.len() as i64 == REPLAY_PAGE {
                Phase::Replay {
                    after: self.position,
                    round,
                }
            } else {
                self.after_replay(round)
            };
            return Some(out.freeze());
        }
        self.phase = self.after_replay(round);
        None
    }

    /// Live from our cursor if the ring still holds it; else replay again from storage.
    fn after_replay(&mut self, round: u32) -> Phase {
        if self.tap.holds() {
            return Phase::Live;
        }
        if round + 1 >= REPLAY_ROUNDS {
            return Phase::Done;
        }
        self.tap.restart();
        Phase::Replay {
            after: self.position,
            round: round + 1,
        }
    }

    async fn live(&mut self) -> Option<Bytes> {
        let mut id_due = false;
        loop {
            match self.tap.read(CHUNK_MAX, self.position) {
                Read::Lagged => {
                    self.metrics.sse_cut.inc();
                    self.phase = Phase::Done;
                    return Some(Bytes::from_static(
                        b": too slow: this stream is closed, reconnect with Last-Event-ID to resume\n\n",
                    ));
                }
                Read::Events {
                    bytes,
                    last_read,
                    last_sent,
                    oldest,
                } => {
                    self.position = self.position.max(last_read.unwrap_or(0));
                    if !bytes.is_empty() {
                        // One sample per chunk, for its oldest event: the chunk is written to
                        // the socket as soon as it is returned (the driver asks for the next
                        // only once this one is written and flushed).
                        if let Some(at) = oldest {
                            self.metrics.sse_delivery_lag.observe_duration(at.elapsed());
                        }
                        // This chunk is a sign of life and carries the client's id: no
                        // heartbeat and no `id:`-only frame is due until their periods
                        // have passed from now.
                        self.sent_at = tokio::time::Instant::now();
                        self.id_written = last_sent.unwrap_or(self.id_written);
                        if self.position > self.id_written {
                            // Skipped events after the last one sent: the id rides along.
                            let mut out = BytesMut::from(&bytes[..]);
                            push_id(&mut out, self.position);
                            self.id_written = self.position;
                            return Some(out.freeze());
                        }
                        return Some(bytes);
                    }
                }
            }
            if id_due && self.position > self.id_written {
                self.id_written = self.position;
                let mut out = BytesMut::new();
                push_id(&mut out, self.position);
                return Some(out.freeze());
            }
            id_due = false;
            tokio::select! {
                _ = self.stop.cancelled() => {
                    self.phase = Phase::Done;
                    return Some(shutdown_frame());
                }
                changed = self.tap.changed() => {
                    if !changed {
                        self.phase = Phase::Done;
                        return None;
                    }
                }
                // Only skipped events since the last id: at most one `id:` frame a second. A
                // routed client learns how far the feed went only by reading, so it looks.
                _ = self.id_tick.tick(), if self.position > self.id_written || self.tap.routed() => {
                    let due = self.sent_at + ID_EVERY;
                    if tokio::time::Instant::now() < due {
                        self.id_tick.reset_at(due);
                    } else {
                        id_due = true;
                    }
                }
                _ = self.heartbeat.tick() => {
                    let due = self.sent_at + self.heartbeat_every;
                    if tokio::time::Instant::now() < due {
                        self.heartbeat.reset_at(due);
                    } else {
                        return Some(Bytes::from_static(b": heartbeat\n\n"));
                    }
                }
            }
        }
    }
}

/// An `id:`-only frame: EventSource sets its last event id from it and fires no event.
fn push_id(out: &mut BytesMut, seq: i64) {
    out.extend_from_slice(format!("id: {seq}\n\n").as_bytes());
}

fn in_scope(scope: &Option<Arc<Vec<String>>>, device: &str) -> bool {
    scope
        .as_ref()
        .is_none_or(|globs| globs.iter().any(|g| crate::auth::glob_match(g, device)))
}

fn shutdown_frame() -> Bytes {
    feed::encode_plain(
        "shutdown",
        &json!({"reason": "server shutting down; reconnect with Last-Event-ID to resume"}),
    )
}
