//! The event log's rows besides readings: presence and command lifecycle changes. Each is
//! stored with the seq the writer gives it (from the counter readings use too), in the
//! transaction that changes the device or command row, and streamed with the very bytes it
//! was stored with, so that replay and live are the same events.

use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::AssertSqlSafe;
use sqlx::sqlite::SqliteConnection;

use super::StoreError;
use crate::domain;
use crate::feed::{self, Event, Kind};

/// Rows per multi-row INSERT into `events`.
const EVENTS_PER_INSERT: usize = 100;

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

    /// The feed's event: the stored data behind its `id:` and `event:` lines.
    pub fn to_event(&self) -> Event {
        Event {
            kind: self.kind,
            device: self.device.clone(),
            seq: self.seq,
            frame: feed::encode_event(self.seq, self.kind, &self.data),
        }
    }
}

/// Appends `rows` to the log on `conn`, inside the caller's transaction.
pub async fn append(conn: &mut SqliteConnection, rows: &[EventRow]) -> Result<(), StoreError> {
    for chunk in rows.chunks(EVENTS_PER_INSERT) {
        let mut sql = String::from("INSERT INTO events (seq, kind, device, at, data) VALUES ");
        for i in 0..chunk.len() {
            sql.push_str(if i == 0 {
                "(?,?,?,?,?)"
            } else {
                ",(?,?,?,?,?)"
            });
        }
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for r in chunk {
            q = q
                .bind(r.seq)
                .bind(r.kind.as_str())
                .bind(r.device.clone())
                .bind(r.at)
                .bind(r.data.clone());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}
