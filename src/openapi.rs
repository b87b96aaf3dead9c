//! The HTTP API's OpenAPI 3.1 description, served at `/api/openapi.json`.
//!
//! The operations come from the router itself: each handler is a salvo `#[endpoint]` whose
//! attribute lists its parameters, body and answers, and `OpenApi::merge_router` walks the
//! routes. The types here only describe the JSON the handlers write (they are never built);
//! the schemathesis run (`scripts/fuzz-api`) checks real answers against them.

use std::collections::BTreeMap;
use std::sync::Arc;

use salvo::http::header::{self, HeaderValue};
use salvo::oapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use salvo::oapi::{Info, OpenApi, ToSchema};
use salvo::prelude::*;
use salvo::routing::FilterInfo;
use serde_json::Value;

/// The document for `router`, as JSON.
pub fn document(router: &Router) -> String {
    let mut doc = OpenApi::new("telebridge", env!("CARGO_PKG_VERSION")).info(
        Info::new("telebridge", env!("CARGO_PKG_VERSION")).description(
            "MQTT telemetry to SQLite or PostgreSQL, live Server-Sent Events and WebSocket \
             commands. Errors are {\"error\": {\"code\", \"message\"}}; an unknown query \
             parameter is a 400 on every endpoint. /events (SSE) and /ws (WebSocket) are \
             described with their operations; README.md has the full contract.",
        ),
    );
    doc.components.security_schemes.insert(
        "bearer".into(),
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)).into(),
    );
    doc.components.security_schemes.insert(
        "session".into(),
        SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(crate::auth::COOKIE))).into(),
    );
    let doc = doc.merge_router(router);
    doc.to_json().unwrap_or_else(|e| {
        // Serializing a document of plain maps and strings cannot fail; say so if it did.
        format!("{{\"error\": {{\"code\": \"internal\", \"message\": \"{e}\"}}}}")
    })
}

/// Serves the document made at start.
pub struct Serve(pub Arc<String>);

#[handler]
impl Serve {
    async fn handle(&self, res: &mut Response) {
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        res.body(self.0.as_str().to_owned());
    }
}

/// Every (method, path) that `router` answers with a handler of its own, paths as OpenAPI
/// writes them (`/api/devices/{id}`); catch-alls (`{**rest}`) are left out.
pub fn routes(router: &Router) -> Vec<(String, String)> {
    fn walk(r: &Router, path: &str, method: Option<String>, out: &mut Vec<(String, String)>) {
        let mut path = path.to_owned();
        let mut method = method;
        for f in r.filters() {
            match f.info() {
                FilterInfo::Path(p) => {
                    let p = p.trim_matches('/');
                    if !p.is_empty() {
                        path = format!("{}/{p}", path.trim_end_matches('/'));
                    }
                }
                FilterInfo::Method(m) => method = Some(m.as_str().to_lowercase()),
                _ => {}
            }
        }
        if r.goal.is_some() && !path.contains("{**") {
            let p = if path.is_empty() {
                "/".into()
            } else {
                path.clone()
            };
            out.push((method.clone().unwrap_or_else(|| "*".into()), p));
        }
        for child in r.routers() {
            walk(child, &path, method.clone(), out);
        }
    }
    let mut out = Vec::new();
    walk(router, "", None, &mut out);
    out.sort();
    out.dedup();
    out
}

/// The error body of every failure.
#[derive(ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(ToSchema)]
pub struct ErrorDetail {
    /// A stable code: `bad_parameter`, `invalid_device`, `not_found`, `forbidden`, ...
    pub code: String,
    /// What was wrong, starting with the parameter's name for a 400.
    pub message: String,
}

/// A stored reading.
#[derive(ToSchema)]
pub struct Reading {
    /// Its event id (the SSE `id:`), in commit order.
    pub seq: i64,
    /// The device.
    pub device: String,
    /// The MQTT topic it came on.
    pub topic: String,
    /// Device time (RFC 3339), else the receive time.
    pub ts: String,
    /// When telebridge received it (RFC 3339).
    pub received_at: String,
    /// The payload: a JSON object, or the raw text when `raw` is true.
    pub payload: Value,
    /// Present and true when the payload was not a JSON object.
    pub raw: Option<bool>,
}

/// How a device publishes, for the dashboard's first run.
#[derive(ToSchema)]
pub struct PublishHint {
    /// The broker's host as devices reach it.
    pub host: String,
    /// Its port.
    pub port: i64,
    /// Whether devices must use TLS.
    pub tls: bool,
    /// The telemetry topic template.
    pub topic: String,
    /// A `mosquitto_pub` line to copy.
    pub example: String,
    /// A sample payload.
    pub payload: Value,
}

/// A device as the list shows it.
#[derive(ToSchema)]
pub struct Device {
    /// The device id.
    pub id: String,
    /// Online (or stale).
    pub online: bool,
    /// Online but it missed its usual readings.
    pub stale: bool,
    /// `online`, `stale` or `offline`.
    pub presence: String,
    /// First reading or status (RFC 3339).
    pub first_seen: String,
    /// Last reading or status (RFC 3339).
    pub last_seen: String,
    /// Units of its latest reading's fields.
    pub units: BTreeMap<String, String>,
    /// Its latest reading, if any.
    pub latest: Option<Reading>,
}

/// `GET /api/devices`.
#[derive(ToSchema)]
pub struct DeviceList {
    /// The devices in the token's scope.
    pub devices: Vec<Device>,
    /// The log position the list reflects: stream `/events?last_event_id=` from it.
    pub last_event_id: i64,
    /// Units of the latest readings' fields, fleet-wide.
    pub units: BTreeMap<String, String>,
    /// How devices publish.
    pub publish: Option<PublishHint>,
}

/// A page of readings.
#[derive(ToSchema)]
pub struct ReadingsPage {
    /// The device.
    pub device: String,
    /// Oldest first, or newest first with `order=desc`.
    pub readings: Vec<Reading>,
    /// The next page's `after`; null at the end.
    pub next_after: Option<i64>,
    /// With `order=desc`: the next page's `before`; null at the end.
    pub next_before: Option<i64>,
}

/// A presence change.
#[derive(ToSchema)]
pub struct StatusChange {
    /// Its event id.
    pub seq: i64,
    /// The device.
    pub device: String,
    /// Online after the change.
    pub online: bool,
    /// When (RFC 3339).
    pub at: String,
}

/// `GET /api/devices/{id}/status-history`.
#[derive(ToSchema)]
pub struct StatusHistory {
    /// The device.
    pub device: String,
    /// Oldest first.
    pub changes: Vec<StatusChange>,
    /// The next page's `after`; null at the end.
    pub next_after: Option<i64>,
}

/// `GET /api/devices/{id}/series`.
#[derive(ToSchema)]
pub struct Series {
    /// The device.
    pub device: String,
    /// Start of the range (RFC 3339).
    pub from: String,
    /// End of the range (RFC 3339).
    pub to: String,
    /// The bucket width, as `10s`, `1m`, `1h`.
    pub step: String,
    /// The bucket width in milliseconds.
    pub step_ms: i64,
    /// Where the buckets came from: `raw`, `1m` or `1h`.
    pub resolution: String,
    /// The aggregates given per field.
    pub agg: Vec<String>,
    /// The fields.
    pub fields: Vec<String>,
    /// Units of the fields.
    pub units: BTreeMap<String, String>,
    /// Raw readings may be gone before this time (RFC 3339).
    pub raw_since: String,
    /// Whether the range reaches past `raw_since`.
    pub past_raw: bool,
    /// One object per bucket: `t` and, per field, its aggregates.
    pub points: Vec<BTreeMap<String, Value>>,
}

/// A command.
#[derive(ToSchema)]
pub struct Command {
    /// Its id.
    pub id: String,
    /// The device.
    pub device: String,
    /// The command's name.
    pub name: String,
    /// Its params.
    pub params: Value,
    /// `queued`, `sent`, `acked`, `failed`, `timeout`, `expired` or `cancelled`.
    pub status: String,
    /// The idempotency key, if one was given.
    pub key: Option<String>,
    /// When it was stored (RFC 3339).
    pub created_at: String,
    /// When a queued command expires (RFC 3339).
    pub expires_at: String,
    /// When it was published (RFC 3339).
    pub sent_at: Option<String>,
    /// When it ended (RFC 3339).
    pub finished_at: Option<String>,
    /// The device's result.
    pub result: Option<Value>,
    /// The device's error.
    pub error: Option<String>,
}

/// `GET /api/commands`.
#[derive(ToSchema)]
pub struct CommandList {
    /// Newest first.
    pub commands: Vec<Command>,
}

/// A command to send (as over the WebSocket).
#[derive(ToSchema)]
pub struct NewCommand {
    /// The command's name: 1–64 of `A-Z a-z 0-9 . _ -`.
    #[salvo(schema(pattern = "^[A-Za-z0-9._-]{1,64}$"))]
    pub name: String,
    /// A JSON object.
    pub params: Option<BTreeMap<String, Value>>,
    /// A tag echoed back.
    #[salvo(schema(rename = "ref"))]
    pub reference: Option<Value>,
    /// An idempotency key: the same key for the same device returns the stored command.
    pub key: Option<String>,
    /// How long it may wait for an offline device: `"10m"` or seconds.
    pub ttl: Option<Value>,
}

/// `POST /api/devices/{id}/commands`.
#[derive(ToSchema)]
pub struct CommandAccepted {
    /// The command's id.
    pub id: String,
    /// `sent` or `queued`.
    pub status: String,
    /// True when the key matched a stored command.
    pub duplicate: bool,
    /// The request's `ref`.
    #[salvo(schema(rename = "ref"))]
    pub reference: Option<Value>,
}

/// A console template.
#[derive(ToSchema)]
pub struct Template {
    /// The command's name.
    pub name: String,
    /// Its default params.
    pub params: Value,
}

/// `GET /api/commands/templates`.
#[derive(ToSchema)]
pub struct Templates {
    /// In name order.
    pub templates: Vec<Template>,
}

/// An alert.
#[derive(ToSchema)]
pub struct Alert {
    /// Its id.
    pub id: i64,
    /// The rule's name.
    pub rule: String,
    /// The device.
    pub device: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// `firing`, `acknowledged` or `resolved`.
    pub state: String,
    /// The field the rule watches.
    pub field: Option<String>,
    /// The rule's threshold.
    pub threshold: Option<f64>,
    /// The value that fired it.
    pub value: Option<f64>,
    /// What fired, in words.
    pub message: String,
    /// When it fired (RFC 3339).
    pub fired_at: String,
    /// When it was acknowledged (RFC 3339).
    pub acked_at: Option<String>,
    /// Who acknowledged it.
    pub acked_by: Option<String>,
    /// When it resolved (RFC 3339).
    pub resolved_at: Option<String>,
}

/// `GET /api/alerts`.
#[derive(ToSchema)]
pub struct AlertList {
    /// Newest first.
    pub alerts: Vec<Alert>,
}

/// `POST /api/alerts/{id}/ack`.
#[derive(ToSchema)]
pub struct AlertAcked {
    /// The alert, now acknowledged.
    pub alert: Alert,
}

/// `GET /api/session`.
#[derive(ToSchema)]
pub struct Session {
    /// Whether tokens are required.
    pub auth: bool,
    /// The token's name, when signed in.
    pub name: Option<String>,
    /// `operator` or `viewer`, when signed in (always `operator` without auth).
    pub role: Option<String>,
}

/// `POST /api/session`.
#[derive(ToSchema)]
pub struct Login {
    /// An access token.
    pub token: String,
}

/// `GET /healthz`.
#[derive(ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// `GET /readyz`.
#[derive(ToSchema)]
pub struct Ready {
    /// Broker connected, storage readable, writer committing.
    pub ready: bool,
    /// This instance's name.
    pub instance: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Storage answers reads.
    pub database: bool,
    /// The MQTT connection is up.
    pub broker_connected: bool,
    /// The writer commits.
    pub storage_writable: bool,
    /// The writer's state in words.
    pub storage: String,
    /// Readings waiting for a commit.
    pub storage_waiting: i64,
    /// The WAL checkpoint's state.
    pub checkpoint: String,
    /// The newest event id.
    pub last_seq: i64,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The operations of a document, as (method, path).
    fn operations(doc: &Value) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                out.insert((method.clone(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn the_document_has_an_operation_for_every_route_and_no_other() {
        let router = crate::web::routes();
        let doc: Value = serde_json::from_str(&document(&router)).expect("JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{}",
            doc["openapi"]
        );
        // The dashboard's page and assets are not the API.
        let served: BTreeSet<(String, String)> = routes(&router)
            .into_iter()
            .filter(|(_, p)| p != "/" && p != "/favicon.ico" && !p.starts_with("/assets"))
            .collect();
        assert!(served.len() >= 20, "{served:?}");
        assert_eq!(operations(&doc), served);
        for (method, path) in &served {
            let op = &doc["paths"][path][method];
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path} has no answers");
            assert!(op["summary"].is_string(), "{method} {path} has no summary");
        }
    }
}
