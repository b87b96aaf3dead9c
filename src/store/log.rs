//! The event log's rows besides readings: presence, command and alert lifecycle changes. Each is
//! stored with the seq the writer gives it (from the counter readings use too), in the
//! transaction that changes the device or command row, and streamed with the very bytes it
//! was stored with, so that replay and live are the same events.

use std::sync::Arc;

use crate::domain;
use crate::feed::{self, Event, Kind};
use serde_json::{Value, json};

/// A presence or command change, as stored and streamed.
#[derive(Debug, Clone)]
pub struct EventRow {
    /// Its position in the log: the SSE id.
    pub seq: i64,
    /// `Status` or `Command`.
    pub kind: Kind,
    /// The device it concerns.
    pub device: Arc<str>,
    /// When it happened, Unix ms.
    pub at: i64,
    /// The SSE event's data, JSON text.
    pub data: String,
}

impl EventRow {
    /// A presence change: `{"device", "online", "at"}`.
    pub fn status(seq: i64, device: &str, online: bool, at: i64) -> EventRow {
        let data = json!({"device": device, "online": online, "at": domain::format_ms(at)});
        EventRow {
            seq,
            kind: Kind::Status,
            device: Arc::from(device),
            at,
            data: data.to_string(),
        }
    }

    /// A device gone stale or fresh again (online all along): `{"device", "online": true,
    /// "stale", "presence", "at"}`.
    pub fn stale(seq: i64, device: &str, stale: bool, at: i64) -> EventRow {
        let presence = if stale { "stale" } else { "online" };
        let data = json!({"device": device, "online": true, "stale": stale, "presence": presence, "at": domain::format_ms(at)});
        EventRow {
            seq,
            kind: Kind::Status,
            device: Arc::from(device),
            at,
            data: data.to_string(),
        }
    }

    /// A command lifecycle change: `{"id", "device", "status", "at"}` and, for an answer,
    /// `ok`, `result`, `error` and `rtt_ms`.
    pub fn command(
        seq: i64,
        id: &str,
        device: &str,
        status: &str,
        at: i64,
        extra: Option<Value>,
    ) -> EventRow {
        let mut data =
            json!({"id": id, "device": device, "status": status, "at": domain::format_ms(at)});
        if let (Some(Value::Object(extra)), Value::Object(d)) = (extra, &mut data) {
            d.extend(extra);
        }
        EventRow {
            seq,
            kind: Kind::Command,
            device: Arc::from(device),
            at,
            data: data.to_string(),
        }
    }

    /// An alert change: the alert as it now reads, and `at`, when it moved.
    pub fn alert(seq: i64, alert: &super::alert::AlertRow, at: i64) -> EventRow {
        let mut data = alert.to_json();
        if let Value::Object(d) = &mut data {
            d.insert("at".into(), Value::String(domain::format_ms(at)));
        }
        EventRow {
            seq,
            kind: Kind::Alert,
            device: Arc::from(alert.device.as_str()),
            at,
            data: data.to_string(),
        }
    }

    /// The feed's event: the stored data behind its `id:` and `event:` lines.
    pub fn to_event(&self, committed: std::time::Instant) -> Event {
        Event {
            kind: self.kind,
            device: self.device.clone(),
            seq: self.seq,
            frame: feed::encode_event(self.seq, self.kind, &self.data),
            committed,
        }
    }
}
