//! The live feed behind `GET /events`: committed events of every kind (readings, presence and
//! command changes), in log order, each encoded once as an SSE event with its `id:` and shared
//! by every client, in a ring buffer with a bounded number of events. A client that falls further behind than the ring holds is cut off and resumes
//! from storage with `Last-Event-ID`; ingest never waits on a client.

mod frame;
mod route;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

pub use frame::{ReadingRef, StatusData, encode, encode_event, encode_plain, encode_reading};
pub use route::INBOX_MAX_BYTES;
use route::{Inbox, Router, Watch};

/// Kinds of events on the feed, as named in SSE `event:` lines and the `type=` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A telemetry reading (`event: reading`).
    Reading,
    /// A presence change (`event: status`).
    Status,
    /// A command lifecycle change (`event: command`).
    Command,
    /// An alert lifecycle change (`event: alert`).
    Alert,
}

impl Kind {
    /// The kinds besides readings: they share the events table of the log.
    pub const EVENTS: [Kind; 3] = [Kind::Status, Kind::Command, Kind::Alert];

    /// The SSE `event:` name, also stored in the event log.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Reading => "reading",
            Kind::Status => "status",
            Kind::Command => "command",
            Kind::Alert => "alert",
        }
    }

    /// Parses a `type=` filter value.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "reading" => Some(Kind::Reading),
            "status" => Some(Kind::Status),
            "command" => Some(Kind::Command),
            "alert" => Some(Kind::Alert),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Kind::Reading => 1,
            Kind::Status => 2,
            Kind::Command => 4,
            Kind::Alert => 8,
        }
    }
}

/// A set of kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    /// Every kind.
    pub const ALL: Kinds = Kinds(15);
    /// No kind.
    pub const NONE: Kinds = Kinds(0);

    /// Adds a kind.
    pub fn with(self, k: Kind) -> Kinds {
        Kinds(self.0 | k.bit())
    }

    /// Whether `k` is in the set.
    pub fn has(self, k: Kind) -> bool {
        self.0 & k.bit() != 0
    }
}

/// One encoded event, shared by every client.
#[derive(Debug, Clone)]
pub struct Event {
    /// Its kind.
    pub kind: Kind,
    /// The device it concerns.
    pub device: Arc<str>,
    /// Its position in the event log: the SSE id.
    pub seq: i64,
    /// The complete SSE frame, `id:`/`event:`/`data:` lines and the blank line.
    pub frame: Bytes,
    /// When this instance learned it was committed: just after its own commit, or when its
    /// tail read it from the shared log (PostgreSQL). The SSE delivery lag counts from here.
    pub committed: Instant,
}

struct Ring {
    /// Position of `events[0]`; positions grow by one per event, forever.
    start: u64,
    events: VecDeque<Event>,
}

/// The shared live feed.
pub struct Feed {
    ring: RwLock<Ring>,
    capacity: usize,
    /// Per kind, the ring's head after the last push with an event of that kind: a ring
    /// client waits only on the kinds it asked for.
    heads: [watch::Sender<u64>; 4],
    router: Router,
    /// The seq of the last event pushed: every event up to it is in the ring and in each
    /// inbox it was routed to.
    pushed_through: AtomicI64,
    subscribers: AtomicUsize,
}

/// What one client watches.
#[derive(Clone)]
pub struct Interest {
    /// The event kinds it takes.
    pub kinds: Kinds,
    /// Its device filter (`None`: every device).
    pub devices: Option<Vec<String>>,
    /// The device globs its token may see (`None`: all).
    pub scope: Option<Arc<Vec<String>>>,
}

/// A client's place on the feed.
///
/// A client that watches every device reads the shared ring, which holds what it sends
/// anyway; one that watches some devices (a filter or a token scope) has an inbox that
/// only its own events are routed to.
pub struct Tap {
    feed: Arc<Feed>,
    way: Way,
}

enum Way {
    Ring {
        /// Next ring position to read.
        pos: u64,
        kinds: Kinds,
        /// The heads of the kinds it takes.
        heads: [Option<watch::Receiver<u64>>; 4],
    },
    Inbox {
        watch: Watch,
        inbox: Arc<Inbox>,
    },
}

/// What reading from the feed gave.
pub enum Read {
    /// New matching events.
    Events {
        /// Their frames (empty when none matched).
        bytes: Bytes,
        /// The seq through which the client has seen every event it takes: its position.
        last_read: Option<i64>,
        /// The seq of the last event whose frame is in `bytes`.
        last_sent: Option<i64>,
        /// When the oldest event whose frame is in `bytes` was committed.
        oldest: Option<Instant>,
    },
    /// The client fell behind what the feed keeps for it.
    Lagged,
}

const KINDS: [Kind; 4] = [Kind::Reading, Kind::Status, Kind::Command, Kind::Alert];

impl Feed {
    /// A feed that keeps the last `capacity` events (and at most that many per inbox).
    pub fn new(capacity: usize) -> Arc<Feed> {
        Arc::new(Feed {
            ring: RwLock::new(Ring {
                start: 0,
                events: VecDeque::with_capacity(capacity.min(65_536)),
            }),
            capacity: capacity.max(1),
            heads: std::array::from_fn(|_| watch::channel(0).0),
            router: Router::default(),
            pushed_through: AtomicI64::new(0),
            subscribers: AtomicUsize::new(0),
        })
    }

    /// Whether anyone listens (so the writer can skip encoding when nobody does).
    pub fn has_subscribers(&self) -> bool {
        self.subscribers.load(Ordering::Acquire) > 0
    }

    /// Appends events, in log order, to the ring (the oldest fall out when it is full) and
    /// to the inboxes they are routed to, then wakes the clients that take them.
    pub fn push(&self, events: Vec<Event>) {
        let Some(last) = events.last().map(|e| e.seq) else {
            return;
        };
        self.router.route(&events);
        let mut present = Kinds::NONE;
        let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
        for e in events {
            present = present.with(e.kind);
            if ring.events.len() == self.capacity {
                ring.events.pop_front();
                ring.start += 1;
            }
            ring.events.push_back(e);
        }
        let head = ring.start + ring.events.len() as u64;
        drop(ring);
        self.pushed_through.fetch_max(last, Ordering::AcqRel);
        for (k, tx) in KINDS.iter().zip(&self.heads) {
            if present.has(*k) {
                tx.send_replace(head);
            }
        }
    }

    /// A tap at the head: the client gets every event it takes pushed from now on.
    pub fn subscribe(self: &Arc<Self>, interest: &Interest) -> Tap {
        // Counted first, so a writer that checks `has_subscribers` after this sees us.
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        let watch = match (&interest.devices, &interest.scope) {
            (Some(devices), _) => Some(Watch::Devices(route::distinct(devices))),
            (None, Some(globs)) => Some(Watch::Scope(globs.clone())),
            (None, None) => None,
        };
        let way = match watch {
            Some(watch) => {
                let inbox = self.router.add(&watch, interest.kinds, self.capacity);
                Way::Inbox { watch, inbox }
            }
            None => Way::Ring {
                pos: self.ring_head(),
                kinds: interest.kinds,
                heads: std::array::from_fn(|i| {
                    interest
                        .kinds
                        .has(KINDS[i])
                        .then(|| self.heads[i].subscribe())
                }),
            },
        };
        Tap {
            feed: self.clone(),
            way,
        }
    }

    fn ring_head(&self) -> u64 {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner());
        ring.start + ring.events.len() as u64
    }
}

impl Tap {
    /// Collects the frames of the events after the tap with a seq above `after`, up to
    /// about `max_bytes`, and moves the tap past every event it looked at.
    pub fn read(&mut self, max_bytes: usize, after: i64) -> Read {
        let mut c = Collect {
            one: None,
            out: BytesMut::new(),
            max_bytes,
            after,
            last_read: None,
            last_sent: None,
            oldest: None,
        };
        match &mut self.way {
            Way::Ring { pos, kinds, .. } => {
                let ring = self.feed.ring.read().unwrap_or_else(|p| p.into_inner());
                if *pos < ring.start {
                    return Read::Lagged;
                }
                let from = (*pos - ring.start) as usize;
                for e in ring.events.range(from..) {
                    *pos += 1;
                    if !c.take(e, kinds.has(e.kind)) {
                        break;
                    }
                }
            }
            Way::Inbox { inbox, .. } => {
                // Read before draining: everything pushed up to it is in the inbox by now.
                let through = self.feed.pushed_through.load(Ordering::Acquire);
                let drained = inbox.drain(|e| c.take(e, true));
                if drained.lagged {
                    return Read::Lagged;
                }
                if drained.empty {
                    c.last_read = Some(c.last_read.map_or(through, |l| l.max(through)));
                }
            }
        }
        Read::Events {
            bytes: c.one.take().unwrap_or_else(|| c.out.freeze()),
            last_read: c.last_read,
            last_sent: c.last_sent,
            oldest: c.oldest,
        }
    }

    /// Waits until the feed may hold something new for this tap; `false` once it never will.
    pub async fn changed(&mut self) -> bool {
        match &mut self.way {
            Way::Ring { heads, .. } => {
                let [a, b, c, d] = heads;
                tokio::select! {
                    r = head_changed(a) => r,
                    r = head_changed(b) => r,
                    r = head_changed(c) => r,
                    r = head_changed(d) => r,
                }
            }
            Way::Inbox { inbox, .. } => {
                inbox.notify.notified().await;
                true
            }
        }
    }

    /// Whether the tap still holds everything since it was made (or restarted).
    pub fn holds(&self) -> bool {
        match &self.way {
            Way::Ring { pos, .. } => {
                let ring = self.feed.ring.read().unwrap_or_else(|p| p.into_inner());
                *pos >= ring.start
            }
            Way::Inbox { inbox, .. } => !inbox.lagged(),
        }
    }

    /// Moves the tap to the head, dropping what it held, for a client that catches up from
    /// storage first.
    pub fn restart(&mut self) {
        match &mut self.way {
            Way::Ring { pos, .. } => *pos = self.feed.ring_head(),
            Way::Inbox { inbox, .. } => inbox.clear(),
        }
    }

    /// Whether events reach this tap through an inbox of its own (it watches some devices).
    pub fn routed(&self) -> bool {
        matches!(self.way, Way::Inbox { .. })
    }
}

/// The frames one read collects.
struct Collect {
    /// The chunk while it is one frame: sent as it is, shared, not copied.
    one: Option<Bytes>,
    /// The chunk once it is more than one frame.
    out: BytesMut,
    max_bytes: usize,
    after: i64,
    last_read: Option<i64>,
    last_sent: Option<i64>,
    oldest: Option<Instant>,
}

impl Collect {
    /// Takes `e`'s frame if `wanted` and new; `false` once the chunk is full.
    fn take(&mut self, e: &Event, wanted: bool) -> bool {
        self.last_read = Some(e.seq);
        if wanted && e.seq > self.after {
            if self.last_sent.is_none() {
                self.one = Some(e.frame.clone());
            } else {
                if let Some(first) = self.one.take() {
                    self.out.extend_from_slice(&first);
                }
                self.out.extend_from_slice(&e.frame);
            }
            self.last_sent = Some(e.seq);
            self.oldest.get_or_insert(e.committed);
        }
        self.one.as_ref().map_or(0, Bytes::len) + self.out.len() < self.max_bytes
    }
}

async fn head_changed(rx: &mut Option<watch::Receiver<u64>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Way::Inbox { watch, inbox } = &self.way {
            self.feed.router.remove(watch, inbox);
        }
        self.feed.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64, device: &str, kind: Kind) -> Event {
        Event {
            kind,
            device: Arc::from(device),
            seq,
            frame: Bytes::from(format!("id: {seq}\n\n")),
            committed: Instant::now(),
        }
    }

    fn reading(seq: i64) -> Event {
        ev(seq, "d", Kind::Reading)
    }

    fn everything() -> Interest {
        Interest {
            kinds: Kinds::ALL,
            devices: None,
            scope: None,
        }
    }

    fn devices(list: &[&str]) -> Interest {
        Interest {
            devices: Some(list.iter().map(|d| d.to_string()).collect()),
            ..everything()
        }
    }

    /// The frames and position of one read.
    fn read(tap: &mut Tap, after: i64) -> (String, Option<i64>) {
        match tap.read(1 << 20, after) {
            Read::Events {
                bytes, last_read, ..
            } => (String::from_utf8(bytes.to_vec()).unwrap(), last_read),
            Read::Lagged => panic!("lagged"),
        }
    }

    #[test]
    fn a_client_reads_what_came_after_it_subscribed() {
        let feed = Feed::new(4);
        feed.push(vec![reading(1)]);
        let mut tap = feed.subscribe(&everything());
        let (skipped, sent) = (reading(2), reading(3));
        let committed = sent.committed;
        feed.push(vec![skipped, sent]);
        let Read::Events {
            bytes,
            last_read,
            last_sent,
            oldest,
        } = tap.read(1 << 20, 2)
        else {
            panic!()
        };
        assert_eq!(&bytes[..], b"id: 3\n\n");
        assert_eq!((last_read, last_sent), (Some(3), Some(3)));
        // The delivery lag counts from the oldest event sent, not from one skipped.
        assert_eq!(oldest, Some(committed));
    }

    #[test]
    fn a_client_behind_the_ring_is_told_it_lagged() {
        let feed = Feed::new(2);
        let mut tap = feed.subscribe(&everything());
        feed.push(vec![reading(1), reading(2), reading(3)]);
        assert!(matches!(tap.read(1 << 20, 0), Read::Lagged));
        assert!(!tap.holds());
        tap.restart();
        assert!(tap.holds());
    }

    #[test]
    fn subscribers_are_counted() {
        let feed = Feed::new(2);
        assert!(!feed.has_subscribers());
        let tap = feed.subscribe(&devices(&["a"]));
        assert!(feed.has_subscribers());
        drop(tap);
        assert!(!feed.has_subscribers());
    }

    #[test]
    fn a_device_filter_gets_only_its_devices_in_order_and_moves_past_the_rest() {
        let feed = Feed::new(16);
        let mut tap = feed.subscribe(&devices(&["a", "c", "a"]));
        assert!(tap.routed());
        feed.push(vec![
            ev(1, "a", Kind::Reading),
            ev(2, "b", Kind::Reading),
            ev(3, "c", Kind::Status),
            ev(4, "a", Kind::Command),
            ev(5, "b", Kind::Reading),
        ]);
        assert_eq!(
            read(&mut tap, 0),
            ("id: 1\n\nid: 3\n\nid: 4\n\n".into(), Some(5))
        );
        // Nothing new: the position is where the feed is.
        feed.push(vec![ev(6, "b", Kind::Reading)]);
        assert_eq!(read(&mut tap, 5), (String::new(), Some(6)));
    }

    #[test]
    fn kinds_are_routed_and_woken_separately() {
        let feed = Feed::new(16);
        let mut statuses = feed.subscribe(&Interest {
            kinds: Kinds::NONE.with(Kind::Status),
            ..everything()
        });
        let mut a_readings = feed.subscribe(&Interest {
            kinds: Kinds::NONE.with(Kind::Reading),
            ..devices(&["a"])
        });
        feed.push(vec![ev(1, "a", Kind::Reading), ev(2, "a", Kind::Status)]);
        assert_eq!(read(&mut statuses, 0), ("id: 2\n\n".into(), Some(2)));
        assert_eq!(read(&mut a_readings, 0), ("id: 1\n\n".into(), Some(2)));
        let woke = futures_util::FutureExt::now_or_never(statuses.changed());
        assert_eq!(woke, Some(true), "the status watcher woke for a status");
        // A batch of readings only does not wake the status watcher.
        feed.push(vec![ev(3, "a", Kind::Reading)]);
        let woke = futures_util::FutureExt::now_or_never(statuses.changed());
        assert!(woke.is_none(), "a status watcher woke for a reading");
        assert_eq!(
            futures_util::FutureExt::now_or_never(a_readings.changed()),
            Some(true)
        );
    }

    #[test]
    fn a_scope_gets_the_devices_its_globs_match() {
        let feed = Feed::new(16);
        let mut tap = feed.subscribe(&Interest {
            scope: Some(Arc::new(vec!["fleet-a/*".into(), "x".into()])),
            ..everything()
        });
        feed.push(vec![
            ev(1, "fleet-a/1", Kind::Reading),
            ev(2, "fleet-b/1", Kind::Reading),
            ev(3, "x", Kind::Status),
            ev(4, "fleet-a/1", Kind::Reading),
        ]);
        assert_eq!(read(&mut tap, 0).0, "id: 1\n\nid: 3\n\nid: 4\n\n");
    }

    #[test]
    fn a_full_inbox_lags_at_the_next_batch_and_restarts_empty() {
        let feed = Feed::new(1_000_000);
        let mut tap = feed.subscribe(&devices(&["d"]));
        let big = |seq| Event {
            frame: Bytes::from(vec![b'x'; INBOX_MAX_BYTES / 2 + 1]),
            ..reading(seq)
        };
        // One batch larger than the limit still fits...
        feed.push(vec![big(1), big(2), big(3)]);
        assert!(tap.holds());
        // ...but a client that has not read it is cut off when the next one comes.
        feed.push(vec![reading(4)]);
        assert!(matches!(tap.read(1 << 30, 0), Read::Lagged));
        tap.restart();
        feed.push(vec![reading(5)]);
        assert_eq!(read(&mut tap, 4), ("id: 5\n\n".into(), Some(5)));
    }

    #[test]
    fn a_read_stops_at_about_max_bytes_and_keeps_the_rest() {
        let feed = Feed::new(16);
        let mut tap = feed.subscribe(&devices(&["d"]));
        feed.push((1..=4).map(reading).collect());
        let Read::Events {
            bytes, last_read, ..
        } = tap.read(14, 0)
        else {
            panic!()
        };
        assert_eq!(
            (&bytes[..], last_read),
            (&b"id: 1\n\nid: 2\n\n"[..], Some(2))
        );
        assert_eq!(read(&mut tap, 2), ("id: 3\n\nid: 4\n\n".into(), Some(4)));
    }

    #[test]
    fn a_client_that_leaves_is_no_longer_routed_to() {
        let feed = Feed::new(16);
        let tap = feed.subscribe(&devices(&["d"]));
        drop(tap);
        assert!(feed.router.is_empty());
    }
}
