//! The two streams, `/events` (SSE) and `/ws` (WebSocket), as an AsyncAPI 3.0 document served
//! at `/api/asyncapi.json`, beside the OpenAPI one.
//!
//! The WebSocket's answers are described by the wire type itself ([`ServerMessage`]); the SSE
//! events and the client's command by the types below, which only describe JSON. A test checks
//! real frames and messages against the schemas.

use salvo::oapi::{Components, ToSchema};
use serde_json::{Map, Value, json};

use crate::feed::Kind;
use crate::openapi::{Alert, Reading};
use crate::protocol::ServerMessage;

/// `event: status`: a presence change.
#[derive(ToSchema)]
pub struct StatusEvent {
    /// The device.
    pub device: String,
    /// Online (or stale) after the change.
    pub online: bool,
    /// With a stale change: whether it is stale now.
    pub stale: Option<bool>,
    /// With a stale change: `stale` or `online`.
    pub presence: Option<String>,
    /// When (RFC 3339).
    pub at: String,
}

/// `event: command`: a command's status changed.
#[derive(ToSchema)]
pub struct CommandEvent {
    /// The command's id.
    pub id: String,
    /// The device.
    pub device: String,
    /// `queued`, `sent`, `acked`, `failed`, `timeout`, `expired` or `cancelled`.
    pub status: String,
    /// When (RFC 3339).
    pub at: String,
    /// With an answer: the device's word.
    pub ok: Option<bool>,
    /// With an answer: its result.
    pub result: Option<Value>,
    /// With an answer: its error.
    pub error: Option<String>,
    /// With an answer: publish → answer, milliseconds.
    pub rtt_ms: Option<f64>,
}

/// `event: gap`: events the client asked for are gone (retention) or never existed.
#[derive(ToSchema)]
pub struct GapEvent {
    /// The id the client resumed from.
    pub requested_after: i64,
    /// The first id the stream can give.
    pub first_available: i64,
    /// `retention` or `unknown_id`.
    pub reason: String,
}

/// `event: shutdown`: the daemon is stopping; reconnect with Last-Event-ID.
#[derive(ToSchema)]
pub struct ShutdownEvent {
    /// Why.
    pub reason: String,
}

/// What a client sends on `/ws`.
#[derive(ToSchema)]
pub struct ClientCommand {
    /// Always `command`.
    #[salvo(schema(rename = "type"))]
    pub kind: String,
    /// The device: 1–64 of `A-Z a-z 0-9 . _ -`.
    pub device: String,
    /// The command's name: 1–64 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// A JSON object.
    pub params: Option<Map<String, Value>>,
    /// A tag echoed back in `accepted` and `error`.
    #[salvo(schema(rename = "ref"))]
    pub reference: Option<Value>,
    /// An idempotency key.
    pub key: Option<String>,
    /// How long it may wait for an offline device: `"10m"` or seconds.
    pub ttl: Option<Value>,
}

/// The SSE events by name, with their data's schema: each [`Kind`] (the match fails to compile
/// when one is added), then the two the stream writes itself.
fn sse_events(components: &mut Components) -> Vec<(&'static str, Value)> {
    let schema = |s| serde_json::to_value(s).unwrap_or(Value::Null);
    let mut out = Vec::new();
    for kind in std::iter::once(Kind::Reading).chain(Kind::EVENTS) {
        let data = match kind {
            Kind::Reading => schema(Reading::to_schema(components)),
            Kind::Status => schema(StatusEvent::to_schema(components)),
            Kind::Command => schema(CommandEvent::to_schema(components)),
            // The alert's fields, and `at`.
            Kind::Alert => {
                json!({"allOf": [schema(Alert::to_schema(components)), {"type": "object", "required": ["at"], "properties": {"at": {"type": "string"}}}]})
            }
        };
        out.push((kind.as_str(), data));
    }
    out.push(("gap", schema(GapEvent::to_schema(components))));
    out.push(("shutdown", schema(ShutdownEvent::to_schema(components))));
    out
}

/// The document, as JSON.
pub fn document() -> String {
    let mut components = Components::new();
    let mut messages = Map::new();
    let mut sse = Map::new();
    for (name, payload) in sse_events(&mut components) {
        let key = format!("sse_{name}");
        messages.insert(
            key.clone(),
            json!({
                "name": name,
                "title": format!("event: {name}"),
                "summary": format!("An SSE frame `id: SEQ` (not for gap and shutdown), `event: {name}`, `data: JSON`."),
                "contentType": "application/json",
                "payload": payload,
            }),
        );
        sse.insert(
            key.clone(),
            json!({"$ref": format!("#/components/messages/{key}")}),
        );
    }
    let command =
        serde_json::to_value(ClientCommand::to_schema(&mut components)).unwrap_or(Value::Null);
    let answer =
        serde_json::to_value(ServerMessage::to_schema(&mut components)).unwrap_or(Value::Null);
    messages.insert(
        "ws_command".into(),
        json!({"name": "command", "contentType": "application/json", "payload": command}),
    );
    messages.insert(
        "ws_answer".into(),
        json!({
            "name": "answer",
            "summary": "accepted, ack, timeout, expired, cancelled or error, by `type`; match by `ref` (accepted, error) or `id`.",
            "contentType": "application/json",
            "payload": answer,
        }),
    );
    let schemas = serde_json::to_value(&components.schemas).unwrap_or(Value::Null);
    let doc = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "telebridge streams",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The live feed (Server-Sent Events at GET /events; filters and resume in the OpenAPI document /api/openapi.json) and the command channel (WebSocket at GET /ws, JSON text frames).",
        },
        "channels": {
            "events": {
                "address": "/events",
                "title": "Live feed (SSE)",
                "description": "Every event has `id:` (its place in the one ordered log; resume with Last-Event-ID), `event:` and `data:`. A comment line is a heartbeat.",
                "messages": sse,
            },
            "ws": {
                "address": "/ws",
                "title": "Command channel (WebSocket)",
                "messages": {
                    "ws_command": {"$ref": "#/components/messages/ws_command"},
                    "ws_answer": {"$ref": "#/components/messages/ws_answer"},
                },
            },
        },
        "operations": {
            "receiveEvents": {"action": "receive", "channel": {"$ref": "#/channels/events"}},
            "sendCommand": {
                "action": "send",
                "channel": {"$ref": "#/channels/ws"},
                "messages": [{"$ref": "#/channels/ws/messages/ws_command"}],
                "reply": {"channel": {"$ref": "#/channels/ws"}, "messages": [{"$ref": "#/channels/ws/messages/ws_answer"}]},
            },
        },
        "components": { "messages": messages, "schemas": schemas },
    });
    doc.to_string()
}
