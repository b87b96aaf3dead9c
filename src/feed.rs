//! The live feed behind `GET /events`: committed events of every kind (readings, presence and
//! command changes), in log order, each encoded once as an SSE event with its `id:` and shared
//! by every client, in a ring buffer with a bounded number of events. A client that falls further behind than the ring holds is cut off and resumes
//! from storage with `Last-Event-ID`; ingest never waits on a client.

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tokio::sync::watch;

use crate::domain::{self, flags};
use crate::store::StoredReading;

/// Kinds of events on the feed, as named in SSE `event:` lines and the `type=` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A telemetry reading (`event: reading`).
    Reading,
    /// A presence change (`event: status`).
    Status,
    /// A command lifecycle change (`event: command`).
    Command,
}

impl Kind {
    /// The SSE `event:` name, also stored in the event log.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Reading => "reading",
            Kind::Status => "status",
            Kind::Command => "command",
        }
    }

    /// Parses a `type=` filter value.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "reading" => Some(Kind::Reading),
            "status" => Some(Kind::Status),
            "command" => Some(Kind::Command),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Kind::Reading => 1,
            Kind::Status => 2,
            Kind::Command => 4,
        }
    }
}

/// A set of kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    /// Every kind.
    pub const ALL: Kinds = Kinds(7);
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
}

/// The data of a `reading` event.
#[derive(Serialize)]
struct ReadingData<'a> {
    seq: i64,
    device: &'a str,
    topic: &'a str,
    ts: String,
    received_at: String,
    payload: &'a serde_json::value::RawValue,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    raw: bool,
}

/// Encodes a stored reading as its SSE frame.
pub fn encode_reading(r: &StoredReading) -> Bytes {
    encode(&ReadingRef {
        seq: r.seq,
        device: &r.device,
        topic: &r.topic,
        ts: r.ts,
        received_at: r.received_at,
        payload: &r.payload,
        flags: r.flags,
    })
}

/// A reading's fields, borrowed.
pub struct ReadingRef<'a> {
    /// Seq.
    pub seq: i64,
    /// Device id.
    pub device: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Device time, Unix ms.
    pub ts: i64,
    /// Receive time, Unix ms.
    pub received_at: i64,
    /// Payload as sent.
    pub payload: &'a [u8],
    /// Flags.
    pub flags: i64,
}

/// Encodes a reading as its SSE frame: once, for every client.
pub fn encode(r: &ReadingRef<'_>) -> Bytes {
    let raw = r.flags & flags::RAW != 0;
    let lossy;
    let payload_json = if raw {
        // A raw payload goes out as a JSON string of its text (invalid UTF-8 replaced).
        lossy = serde_json::to_string(&String::from_utf8_lossy(r.payload))
            .unwrap_or_else(|_| "\"\"".into());
        lossy.as_str()
    } else {
        std::str::from_utf8(r.payload).unwrap_or("{}")
    };
    let payload =
        serde_json::value::RawValue::from_string(payload_json.to_owned()).unwrap_or_else(|_| {
            serde_json::value::RawValue::from_string("null".into()).expect("null is JSON")
        });
    let data = ReadingData {
        seq: r.seq,
        device: r.device,
        topic: r.topic,
        ts: domain::format_ms(r.ts),
        received_at: domain::format_ms(r.received_at),
        payload: &payload,
        raw,
    };
    // The frame's fixed part (id, event, keys, two RFC 3339 times) is about 150 bytes: sized
    // right, the buffer is never doubled, which would leave the shared frame (kept for every
    // slot of the ring) at twice its length.
    let mut out = Vec::with_capacity(176 + r.payload.len() + r.topic.len() + r.device.len());
    let _ = write!(out, "id: {}\nevent: reading\ndata: ", r.seq);
    let _ = serde_json::to_writer(&mut out, &data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Encodes a logged event other than a reading (`status`, `command`) from its stored data:
/// the same bytes live and on replay.
pub fn encode_event(seq: i64, kind: Kind, data: &str) -> Bytes {
    let mut out = Vec::with_capacity(32 + data.len());
    let _ = write!(out, "id: {seq}\nevent: {}\ndata: {data}\n\n", kind.as_str());
    Bytes::from(out)
}

/// Encodes a notice that is not part of the log (`gap`, `shutdown`): no id.
pub fn encode_plain<T: Serialize>(event: &str, data: &T) -> Bytes {
    let mut out = Vec::with_capacity(128);
    let _ = write!(out, "event: {event}\ndata: ");
    let _ = serde_json::to_writer(&mut out, data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The data of a `status` event.
#[derive(Serialize)]
pub struct StatusData<'a> {
    /// Device id.
    pub device: &'a str,
    /// Presence.
    pub online: bool,
    /// When it changed (RFC 3339).
    pub at: String,
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
    head: watch::Sender<u64>,
    subscribers: AtomicUsize,
}

/// Where a client stands in the feed.
pub struct Cursor {
    /// Next position to read.
    pub pos: u64,
    /// Wakes on new events.
    pub head: watch::Receiver<u64>,
}

/// What reading from the feed gave.
pub enum Read {
    /// New matching events.
    Events {
        /// Their frames (empty when none matched).
        bytes: Bytes,
        /// The seq of the last event read, matching or not: the client's position.
        last_read: Option<i64>,
        /// The seq of the last event whose frame is in `bytes`.
        last_sent: Option<i64>,
    },
    /// The client fell behind what the ring holds.
    Lagged,
}

impl Feed {
    /// A feed that keeps the last `capacity` events.
    pub fn new(capacity: usize) -> Arc<Feed> {
        let (head, _) = watch::channel(0);
        Arc::new(Feed {
            ring: RwLock::new(Ring {
                start: 0,
                events: VecDeque::with_capacity(capacity.min(65_536)),
            }),
            capacity: capacity.max(1),
            head,
            subscribers: AtomicUsize::new(0),
        })
    }

    /// Whether anyone listens (so the writer can skip encoding when nobody does).
    pub fn has_subscribers(&self) -> bool {
        self.subscribers.load(Ordering::Acquire) > 0
    }

    /// Appends events; the oldest fall out when the ring is full.
    pub fn push(&self, events: impl IntoIterator<Item = Event>) {
        let mut ring = self.ring.write().unwrap_or_else(|p| p.into_inner());
        for e in events {
            if ring.events.len() == self.capacity {
                ring.events.pop_front();
                ring.start += 1;
            }
            ring.events.push_back(e);
        }
        let head = ring.start + ring.events.len() as u64;
        drop(ring);
        self.head.send_replace(head);
    }

    /// A cursor at the current head: the client sees every event pushed from now on.
    pub fn subscribe(self: &Arc<Self>) -> (Cursor, Subscription) {
        // Counted first, so a writer that checks `has_subscribers` after this sees us.
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        (self.cursor_at_head(), Subscription(self.clone()))
    }

    /// A fresh cursor at the head, for a client that is already counted.
    pub fn cursor_at_head(&self) -> Cursor {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner());
        let pos = ring.start + ring.events.len() as u64;
        Cursor {
            pos,
            head: self.head.subscribe(),
        }
    }

    /// Whether `pos` is still in the ring (or at its head).
    pub fn holds(&self, pos: u64) -> bool {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner());
        pos >= ring.start
    }

    /// Collects the frames of every event after the cursor that `wanted` accepts, up to
    /// about `max_bytes`, and advances the cursor past every event it looked at.
    pub fn read(
        &self,
        cursor: &mut Cursor,
        max_bytes: usize,
        mut wanted: impl FnMut(&Event) -> bool,
    ) -> Read {
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner());
        if cursor.pos < ring.start {
            return Read::Lagged;
        }
        let head = ring.start + ring.events.len() as u64;
        let mut out = BytesMut::new();
        let mut last_read = None;
        let mut last_sent = None;
        let from = (cursor.pos - ring.start) as usize;
        for e in ring.events.range(from..) {
            cursor.pos += 1;
            last_read = Some(e.seq);
            if wanted(e) {
                out.extend_from_slice(&e.frame);
                last_sent = Some(e.seq);
                if out.len() >= max_bytes {
                    break;
                }
            }
        }
        debug_assert!(cursor.pos <= head);
        Read::Events {
            bytes: out.freeze(),
            last_read,
            last_sent,
        }
    }
}

/// Counts a client for as long as it lives.
pub struct Subscription(Arc<Feed>);

impl Drop for Subscription {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64) -> Event {
        Event {
            kind: Kind::Reading,
            device: Arc::from("d"),
            seq,
            frame: Bytes::from(format!("id: {seq}\n\n")),
        }
    }

    #[test]
    fn a_client_reads_what_came_after_it_subscribed() {
        let feed = Feed::new(4);
        feed.push([ev(1)]);
        let (mut c, _s) = feed.subscribe();
        feed.push([ev(2), ev(3)]);
        let Read::Events {
            bytes,
            last_read,
            last_sent,
        } = feed.read(&mut c, 1 << 20, |e| e.seq != 3)
        else {
            panic!()
        };
        assert_eq!(&bytes[..], b"id: 2\n\n");
        assert_eq!((last_read, last_sent), (Some(3), Some(2)));
    }

    #[test]
    fn a_client_behind_the_ring_is_told_it_lagged() {
        let feed = Feed::new(2);
        let (mut c, _s) = feed.subscribe();
        feed.push([ev(1), ev(2), ev(3)]);
        assert!(matches!(feed.read(&mut c, 1 << 20, |_| true), Read::Lagged));
    }

    #[test]
    fn subscribers_are_counted() {
        let feed = Feed::new(2);
        assert!(!feed.has_subscribers());
        let (_c, s) = feed.subscribe();
        assert!(feed.has_subscribers());
        drop(s);
        assert!(!feed.has_subscribers());
    }

    #[test]
    fn raw_payloads_are_sent_as_strings() {
        let r = StoredReading {
            seq: 5,
            device: "d".into(),
            topic: "devices/d/telemetry".into(),
            ts: 0,
            received_at: 0,
            payload: vec![b'h', b'i', 0xff],
            flags: flags::RAW,
        };
        let f = encode_reading(&r);
        let text = std::str::from_utf8(&f).unwrap();
        assert!(text.starts_with("id: 5\nevent: reading\ndata: {"), "{text}");
        let data: serde_json::Value =
            serde_json::from_str(text.lines().nth(2).unwrap().strip_prefix("data: ").unwrap())
                .unwrap();
        assert_eq!(data["payload"], "hi\u{fffd}");
        assert_eq!(data["raw"], true);
    }
}
