//! The SSE frames of the feed: each event encoded once, as its complete frame, and shared by
//! every client that sends it, live or on replay.

use std::io::Write as _;

use bytes::Bytes;
use serde::Serialize;

use super::Kind;
use crate::domain::{self, flags};
use crate::store::StoredReading;

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

#[cfg(test)]
mod tests {
    use super::*;

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
