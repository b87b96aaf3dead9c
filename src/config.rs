//! The TOML configuration: strict serde structs, defaults, and validation that reports
//! every problem with its key and line instead of stopping at the first.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use toml::de::{DeTable, DeValue};

use crate::domain::TopicTemplate;

/// The commented example config: every key with its default (`telebridge init` writes it;
/// the demo runs on it when there is no config file).
pub const EXAMPLE: &str = include_str!("../config.toml");

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The embedded MQTT broker.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// The MQTT client connection.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Topic templates.
    #[serde(default)]
    pub topics: TopicsConfig,
    /// The HTTP server (dashboard, SSE, WebSocket, API).
    #[serde(default)]
    pub http: HttpConfig,
    /// SQLite storage.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Device presence.
    #[serde(default)]
    pub presence: PresenceConfig,
    /// Operator commands.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// Access tokens.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Alert rules and webhooks.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Units of numeric payload fields by name (dotted for nested ones), for charts and
    /// the series API; they override the units that field names imply. A table under a
    /// device glob gives those devices their own.
    #[serde(default)]
    pub units: std::collections::BTreeMap<String, UnitEntry>,
}

/// One `[units]` entry: a field's unit, or a device glob's table of field units.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "a unit (a string), or a table of field units for the devices a glob matches"
)]
pub enum UnitEntry {
    /// `temperature = "°C"`.
    Field(String),
    /// `[units."truck-*"]` with `speed = "mph"`.
    Devices(std::collections::BTreeMap<String, String>),
}

/// How the embedded broker is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    /// Start the embedded broker only when nothing listens at `listen`.
    #[default]
    Auto,
    /// Always start the embedded broker.
    Embedded,
    /// Never start it; connect to `[mqtt] url`.
    External,
}

/// `[broker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// auto, embedded or external.
    pub mode: BrokerMode,
    /// Where the embedded broker listens.
    pub listen: SocketAddr,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            mode: BrokerMode::Auto,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
        }
    }
}

/// A broker address from `mqtt://host:port` (or `mqtts://` for TLS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct MqttUrl {
    /// Whether the URL asks for TLS.
    pub tls: bool,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl TryFrom<String> for MqttUrl {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for MqttUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(format!("{s:?} is not an MQTT URL: write mqtt://HOST:PORT"));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("{p:?} is not a port number in {s:?}"))?;
                (h, port)
            }
            _ => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(format!("{s:?} has no valid host"));
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A PostgreSQL URL with its password (if any) replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".into();
    };
    // Credentials end at the last '@' (a password may hold '/', '?' or '#' unencoded); the
    // query may carry `password=` too.
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at..]),
        None => (None, rest),
    };
    let mut shown = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => {
                shown.push_str(user);
                shown.push_str(":***");
            }
            None => shown.push_str(userinfo),
        }
    }
    match after.split_once('?') {
        Some((base, query)) => {
            shown.push_str(base);
            shown.push('?');
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            shown.push_str(&params.join("&"));
        }
        None => shown.push_str(after),
    }
    shown
}

/// Whether `url` is a PostgreSQL URL sqlx can use: the scheme, a host and a database.
fn check_postgres_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        return Err(format!(
            "{shown} is not a PostgreSQL URL: write postgres://USER:PASSWORD@HOST:PORT/DATABASE"
        ));
    };
    let after_at = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = &after_at[..after_at.find(['/', '?']).unwrap_or(after_at.len())];
    if host.is_empty() && !rest.contains("host=") {
        return Err(format!(
            "{shown} names no host: write postgres://USER:PASSWORD@HOST:PORT/DATABASE"
        ));
    }
    if let Some((_, port)) = host.rsplit_once(':')
        && !host.ends_with(']')
        && port.parse::<u16>().ok().is_none_or(|p| p == 0)
    {
        return Err(format!(
            "{shown}: the port {port:?} is not a number from 1 to 65535"
        ));
    }
    url.parse::<sqlx::postgres::PgConnectOptions>()
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{shown} is not a usable PostgreSQL URL: {}",
                redact_error(&e.to_string(), url)
            )
        })
}

/// An error message about `url` with the URL's password taken out.
fn redact_error(message: &str, url: &str) -> String {
    message.replace(url, &redact_url(url))
}

/// A secret that never prints.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// The broker to connect to.
    pub url: MqttUrl,
    /// Our client id; fixed, so the broker keeps our session across restarts.
    pub client_id: String,
    /// Optional user name.
    pub username: Option<String>,
    /// Optional password.
    pub password: Option<Secret>,
    /// With `mqtts://`: CA certificates (PEM) to trust the broker with; default the system's.
    pub tls_ca: Option<PathBuf>,
    /// With `mqtts://`: client certificate chain (PEM) for brokers that require one.
    pub tls_cert: Option<PathBuf>,
    /// With `mqtts://`: the client certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Subscription QoS for telemetry and status (0, 1 or 2).
    pub qos: u8,
    /// MQTT keep-alive interval.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Largest telemetry payload stored, in bytes; larger ones are rejected and counted.
    pub max_payload: usize,
    /// Optional shared-subscription group so several instances split the ingest.
    pub shared_group: Option<String>,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: MqttUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1883,
            },
            client_id: "telebridge".into(),
            username: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            qos: 1,
            keep_alive: Duration::from_secs(30),
            max_payload: 65_536,
            shared_group: None,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(30),
        }
    }
}

impl MqttConfig {
    /// The TLS files for an `mqtts://` connection.
    pub fn tls_files(&self) -> crate::tls::ClientFiles {
        crate::tls::ClientFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

/// `[topics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Devices publish readings here.
    pub telemetry: TopicTemplate,
    /// Devices publish `online` / `offline` here (retained, and as last will).
    pub status: TopicTemplate,
    /// telebridge publishes commands here.
    pub command: TopicTemplate,
    /// Devices answer commands here.
    pub ack: TopicTemplate,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        let t = |s| TopicTemplate::parse(s).expect("default template is valid");
        Self {
            telemetry: t("devices/{device}/telemetry"),
            status: t("devices/{device}/status"),
            command: t("devices/{device}/commands"),
            ack: t("devices/{device}/commands/ack"),
        }
    }
}

impl TryFrom<String> for TopicTemplate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TopicTemplate::parse(&s).map_err(|e| format!("topic template {s:?} {e}"))
    }
}

impl<'de> Deserialize<'de> for TopicTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TopicTemplate::try_from(s).map_err(serde::de::Error::custom)
    }
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where the dashboard, SSE, WebSocket and API listen.
    pub listen: SocketAddr,
    /// Origins allowed to open WebSockets and call the API from a browser.
    pub allowed_origins: Vec<String>,
    /// SSE heartbeat comment interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Listen beyond loopback even with no tokens configured.
    pub allow_public_without_auth: bool,
    /// Events kept for SSE clients that are behind; one further behind is cut off and
    /// resumes from storage.
    pub sse_buffer: usize,
    /// Most SSE streams open at once.
    pub max_sse_clients: usize,
    /// Most WebSockets open at once.
    pub max_ws_clients: usize,
    /// Most SSE streams and WebSockets open from one client address.
    pub max_streams_per_ip: usize,
    /// Certificate chain (PEM) to serve HTTPS with; with `tls_key`, the listener speaks only TLS.
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            allowed_origins: Vec::new(),
            heartbeat: Duration::from_secs(15),
            allow_public_without_auth: false,
            sse_buffer: 65_536,
            max_sse_clients: 15_000,
            max_ws_clients: 1_000,
            max_streams_per_ip: 1_000,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// A duration, or `"forever"` (`None`).
mod forever {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "forever" {
            return Ok(None);
        }
        humantime::parse_duration(text.trim())
            .map(Some)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "{e}; use a duration such as \"365d\", or \"forever\""
                ))
            })
    }
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// SQLite database file (the default backend; `telebridge.db` when neither this nor
    /// `url` is set).
    pub path: Option<PathBuf>,
    /// PostgreSQL connection URL (`postgres://user:password@host:port/db`), shared by
    /// every instance; instead of `path`.
    pub url: Option<Secret>,
    /// Most connections to PostgreSQL per instance.
    pub max_connections: u32,
    /// Readings older than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Presence and command events older than this are deleted (at least `retention`);
    /// unset: the longer of `retention` and 90 days.
    #[serde(with = "humantime_serde")]
    pub events_retention: Option<Duration>,
    /// 1-minute rollups whose bucket is older than this are deleted (at least
    /// `retention`); `None`: kept forever.
    #[serde(with = "forever")]
    pub retention_1m: Option<Duration>,
    /// 1-hour rollups whose bucket is older than this are deleted (at least
    /// `retention_1m`); `None` ("forever", the default): kept forever.
    #[serde(with = "forever")]
    pub retention_1h: Option<Duration>,
    /// How often the retention task runs.
    #[serde(with = "humantime_serde")]
    pub retention_interval: Duration,
    /// Most readings committed in one transaction.
    pub batch_size: usize,
    /// How long a batch may wait for more readings before it is committed.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// Readings waiting for the writer; when full, MQTT intake pauses (back-pressure).
    pub queue: usize,
    /// Longest wait between two attempts at a commit that keeps failing (disk full, ...).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// How long a write waits for a lock that another process holds before it fails.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
}

/// Where storage is, as `[storage]` says.
#[derive(Debug, Clone, Copy)]
pub enum StorageBackend<'a> {
    /// An SQLite file.
    Sqlite(&'a Path),
    /// A PostgreSQL database, by URL.
    Postgres(&'a str),
}

/// SQLite's file when `[storage]` names none.
const DEFAULT_DB: &str = "telebridge.db";

impl StorageConfig {
    /// The backend `[storage]` selects: PostgreSQL for `url`, else SQLite.
    pub fn backend(&self) -> StorageBackend<'_> {
        match (&self.url, &self.path) {
            (Some(url), _) => StorageBackend::Postgres(url.expose()),
            (None, Some(path)) => StorageBackend::Sqlite(path),
            (None, None) => StorageBackend::Sqlite(Path::new(DEFAULT_DB)),
        }
    }

    /// Where storage is, for logs and errors: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self.backend() {
            StorageBackend::Sqlite(p) => p.display().to_string(),
            StorageBackend::Postgres(url) => redact_url(url),
        }
    }

    /// How long presence and command events are kept: as set, else the longer of the
    /// readings' retention and 90 days.
    pub fn events_retention(&self) -> Duration {
        self.events_retention
            .unwrap_or_else(|| self.retention.max(Duration::from_secs(90 * 86_400)))
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: None,
            url: None,
            max_connections: 8,
            retention: Duration::from_secs(30 * 86_400),
            events_retention: None,
            retention_1m: Some(Duration::from_secs(365 * 86_400)),
            retention_1h: None,
            retention_interval: Duration::from_secs(60),
            batch_size: 1000,
            batch_delay: Duration::ZERO,
            queue: 10_000,
            retry_max: Duration::from_secs(5),
            busy_timeout: Duration::from_secs(2),
        }
    }
}

/// `[presence]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// A device silent for this long is marked offline.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// An online device that has missed this many of its usual intervals is stale (0: never).
    pub stale_after: u32,
    /// Every device's usual interval; `None` ("auto"): learned from each one's readings.
    #[serde(deserialize_with = "auto_or_duration")]
    pub interval: Option<Duration>,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            stale_after: 3,
            interval: None,
        }
    }
}

/// `"auto"` (None) or a duration such as `"10s"`.
fn auto_or_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    if s == "auto" {
        return Ok(None);
    }
    humantime::parse_duration(&s).map(Some).map_err(|e| {
        serde::de::Error::custom(format!("{s:?} is neither \"auto\" nor a duration: {e}"))
    })
}

/// `[commands]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// How long a sent command waits for the device's ack.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long a command for an offline device may wait in the queue.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Commands per second one WebSocket connection may send (bursts of twice that).
    pub rate_limit: u32,
    /// Default params per command name, offered by the dashboard's console.
    pub templates: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            ttl: Duration::from_secs(3600),
            rate_limit: 20,
            // What `telebridge simulate`'s devices answer.
            templates: [
                ("set_interval", serde_json::json!({"seconds": 5})),
                ("ping", serde_json::json!({})),
                ("reboot", serde_json::json!({})),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        }
    }
}

/// A role that a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Feeds, history and the device list.
    Viewer,
    /// Also commands.
    Operator,
}

/// One `[[auth.tokens]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 of the token, hex.
    pub hash: Secret,
    /// Device id globs it may see.
    #[serde(default = "all_devices")]
    pub devices: Vec<String>,
}

fn all_devices() -> Vec<String> {
    vec!["*".into()]
}

/// `[auth]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Tokens; none means no authentication (loopback only).
    pub tokens: Vec<TokenConfig>,
}

/// How serious an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing.
    Info,
    /// Needs a look.
    #[default]
    Warning,
    /// Needs someone now.
    Critical,
}

impl Severity {
    /// As shown and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// One `[[alerts.rules]]` entry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique name, shown with each alert.
    pub name: String,
    /// Device id globs the rule applies to.
    #[serde(default = "all_devices")]
    pub devices: Vec<String>,
    /// The condition: `FIELD > NUMBER` (or >=, <, <=, ==, !=), `offline`, `no reading`,
    /// `missing FIELD`.
    pub when: String,
    /// How long the condition must hold before the alert fires.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub hold: Duration,
    /// info, warning or critical.
    #[serde(default)]
    pub severity: Severity,
    /// For a comparison: the condition that resolves it (default: `when` no longer holds).
    #[serde(default)]
    pub clear: Option<String>,
}

/// One `[[alerts.webhooks]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where alert changes are POSTed: http:// or https://.
    pub url: String,
    /// The severities it receives.
    #[serde(default = "all_severities")]
    pub severities: Vec<Severity>,
    /// Key of the `X-Telebridge-Signature` HMAC-SHA256; unsigned without one.
    #[serde(default)]
    pub secret: Option<Secret>,
}

fn all_severities() -> Vec<Severity> {
    vec![Severity::Info, Severity::Warning, Severity::Critical]
}

/// `[alerts]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The rules.
    pub rules: Vec<RuleConfig>,
    /// Where alert changes are delivered.
    pub webhooks: Vec<WebhookConfig>,
    /// Deliveries waiting per webhook; beyond it new ones are dropped and counted.
    pub webhook_queue: usize,
    /// Attempts per delivery before it is counted as failed.
    pub webhook_attempts: u32,
    /// How long one attempt may take.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// The longest wait between attempts (they back off from 1 s, doubling).
    #[serde(with = "humantime_serde")]
    pub webhook_backoff_max: Duration,
    /// CA certificates (PEM) that https:// receivers are checked against, instead of the
    /// system's.
    pub webhook_ca: Option<PathBuf>,
}

/// Whether every glob is made of device id characters and `*` `?`.
fn device_globs_ok(globs: &[String]) -> bool {
    !globs.is_empty()
        && globs.iter().all(|g| {
            !g.is_empty()
                && g.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-*?".contains(c))
        })
}

impl AlertsConfig {
    /// Reports what is wrong with the rules and webhooks.
    fn problems(&self, bad: &mut impl FnMut(&str, String)) {
        use crate::alerts::rule::Condition;
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let key = |k: &str| format!("alerts.rules[{i}].{k}");
            if r.name.is_empty() || r.name.len() > 64 {
                bad(&key("name"), "must be 1 to 64 characters".into());
            } else if !names.insert(r.name.as_str()) {
                bad(
                    &key("name"),
                    format!(
                        "{:?} is the name of another rule: names must be unique",
                        r.name
                    ),
                );
            }
            if !device_globs_ok(&r.devices) {
                bad(
                    &key("devices"),
                    "must be globs of A-Z a-z 0-9 . _ - * ?, like [\"sensor-*\"]".into(),
                );
            }
            let when = match Condition::parse(&r.when) {
                Ok(c) => Some(c),
                Err(why) => {
                    bad(&key("when"), why);
                    None
                }
            };
            if r.hold > Duration::from_secs(30 * 86_400) {
                bad(&key("for"), "must be at most 30 days".into());
            }
            if let Some(c) = &when
                && c.is_absence()
                && r.hold < Duration::from_secs(1)
            {
                bad(
                    &key("for"),
                    format!(
                        "{:?} needs a time: how long without it fires, like for = \"5m\"",
                        r.when
                    ),
                );
            }
            if let Some(clear) = &r.clear {
                match (&when, Condition::parse(clear)) {
                    (_, Err(why)) => bad(&key("clear"), why),
                    (_, Ok(Condition::Compare { .. }))
                        if matches!(when, Some(Condition::Compare { .. })) => {}
                    (Some(Condition::Compare { .. }), Ok(_)) => bad(
                        &key("clear"),
                        "must be a comparison, like \"temperature < 75\"".into(),
                    ),
                    (Some(_), Ok(_)) => bad(
                        &key("clear"),
                        "is only for comparisons: this condition clears when it stops holding"
                            .into(),
                    ),
                    (None, Ok(_)) => {}
                }
            }
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            let key = |k: &str| format!("alerts.webhooks[{i}].{k}");
            let scheme_ok = w.url.starts_with("http://") || w.url.starts_with("https://");
            let host_ok = w
                .url
                .split_once("://")
                .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
            if !scheme_ok || !host_ok || w.url.chars().any(char::is_whitespace) {
                bad(
                    &key("url"),
                    format!("{:?} is not an http:// or https:// URL", w.url),
                );
            }
            if w.severities.is_empty() {
                bad(
                    &key("severities"),
                    "must name at least one of info, warning, critical".into(),
                );
            }
            if w.secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                bad(
                    &key("secret"),
                    "must not be empty (leave it out to send unsigned)".into(),
                );
            }
        }
        if self.webhook_queue == 0 || self.webhook_queue > 1_000_000 {
            bad(
                "alerts.webhook_queue",
                "must be between 1 and 1000000".into(),
            );
        }
        if self.webhook_attempts == 0 || self.webhook_attempts > 100 {
            bad(
                "alerts.webhook_attempts",
                "must be between 1 and 100".into(),
            );
        }
        if self.webhook_timeout < Duration::from_millis(100) {
            bad("alerts.webhook_timeout", "must be at least 100ms".into());
        }
        if self.webhook_backoff_max < Duration::from_secs(1) {
            bad("alerts.webhook_backoff_max", "must be at least 1s".into());
        }
        if let Some(ca) = &self.webhook_ca
            && let Err(e) = crate::tls::load_certs(ca)
        {
            bad("alerts.webhook_ca", e.to_string());
        }
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            webhooks: Vec::new(),
            webhook_queue: 1000,
            webhook_attempts: 5,
            webhook_timeout: Duration::from_secs(10),
            webhook_backoff_max: Duration::from_secs(60),
            webhook_ca: None,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// When text logs carry colour codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogColor {
    /// When stderr is a terminal.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `telebridge=debug`; `RUST_LOG` overrides it.
    pub level: String,
    /// text or json.
    pub format: LogFormat,
    /// Colour codes in text logs: auto (on a terminal), always or never.
    pub color: LogColor,
    /// Interval of the one-line summary of rates at info level; "0s" turns it off.
    #[serde(with = "humantime_serde")]
    pub summary: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            color: LogColor::Auto,
            summary: Duration::from_secs(60),
        }
    }
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, such as `mqtt.qos`.
    pub key: String,
    /// 1-based line, when the key is in the file.
    pub line: Option<usize>,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Why a config could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file has problems.
    #[error("config file {path} has {} problem(s):\n{}", problems.len(), ProblemList(problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Checks a `tls_cert` / `tls_key` pair: both or neither, readable, and matching.
fn tls_identity_problems(
    bad: &mut impl FnMut(&str, String),
    section: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) {
    let (cert_key, key_key) = (format!("{section}.tls_cert"), format!("{section}.tls_key"));
    match (cert, key) {
        (None, None) => {}
        (Some(_), None) => bad(&cert_key, format!("needs {key_key} too")),
        (None, Some(_)) => bad(&key_key, format!("needs {cert_key} too")),
        (Some(cert), Some(key)) => {
            let chain = crate::tls::load_certs(cert)
                .map_err(|e| bad(&cert_key, e.to_string()))
                .ok();
            let private = crate::tls::load_key(key)
                .map_err(|e| bad(&key_key, e.to_string()))
                .ok();
            if let (Some(chain), Some(private)) = (chain, private)
                && let Err(e) = crate::tls::check_pair(cert, key, chain, private)
            {
                bad(&key_key, e.to_string());
            }
        }
    }
}

/// Keys each section accepts; kept in step with the structs by a test on `config.toml`.
const SCHEMA: &[(&str, &[&str])] = &[
    ("broker", &["mode", "listen"]),
    (
        "mqtt",
        &[
            "url",
            "client_id",
            "username",
            "password",
            "tls_ca",
            "tls_cert",
            "tls_key",
            "qos",
            "keep_alive",
            "max_payload",
            "shared_group",
            "reconnect_min",
            "reconnect_max",
        ],
    ),
    ("topics", &["telemetry", "status", "command", "ack"]),
    (
        "http",
        &[
            "listen",
            "allowed_origins",
            "heartbeat",
            "allow_public_without_auth",
            "sse_buffer",
            "max_sse_clients",
            "max_ws_clients",
            "max_streams_per_ip",
            "tls_cert",
            "tls_key",
        ],
    ),
    (
        "storage",
        &[
            "path",
            "url",
            "max_connections",
            "retention",
            "events_retention",
            "retention_1m",
            "retention_1h",
            "retention_interval",
            "batch_size",
            "batch_delay",
            "queue",
            "retry_max",
            "busy_timeout",
        ],
    ),
    ("presence", &["timeout", "stale_after", "interval"]),
    ("commands", &["timeout", "ttl", "rate_limit", "templates"]),
    ("auth", &["tokens"]),
    ("log", &["level", "format", "color", "summary"]),
    (
        "alerts",
        &[
            "rules",
            "webhooks",
            "webhook_queue",
            "webhook_attempts",
            "webhook_timeout",
            "webhook_backoff_max",
            "webhook_ca",
        ],
    ),
    // Any field name.
    ("units", &[ANY_KEY]),
];

/// Keys each entry of an array of tables accepts.
const ENTRIES: &[(&str, &str, &[&str])] = &[
    ("auth", "tokens", &["name", "role", "hash", "devices"]),
    (
        "alerts",
        "rules",
        &["name", "devices", "when", "for", "severity", "clear"],
    ),
    ("alerts", "webhooks", &["url", "severities", "secret"]),
];

/// A section whose keys are names the user chooses.
const ANY_KEY: &str = "*";

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parses and validates config text, returning every problem found.
    pub fn parse(text: &str) -> Result<Self, Vec<Problem>> {
        let doc = match DeTable::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                return Err(vec![Problem {
                    key: "(syntax)".into(),
                    line: e.span().map(|s| line_of(text, s.start)),
                    message: e.message().trim().to_owned(),
                }]);
            }
        };
        let doc = doc.get_ref();
        let (mut problems, unknown_spans) = unknown_keys(text, doc);
        // Blank unknown keys out (keeping every offset and line) so that each section's own
        // errors show up too, not just serde's first "unknown field".
        let mut cleaned = text.to_owned().into_bytes();
        for span in unknown_spans {
            for b in &mut cleaned[span] {
                if *b != b'\n' {
                    *b = b' ';
                }
            }
        }
        let cleaned = String::from_utf8_lossy(&cleaned);
        problems.extend(section_errors(&cleaned, doc));
        if !problems.is_empty() {
            return Err(problems);
        }
        let config: Config = toml::from_str(text).map_err(|e| {
            vec![Problem {
                key: "(file)".into(),
                line: e.span().map(|s| line_of(text, s.start)),
                message: e.message().trim().to_owned(),
            }]
        })?;
        let problems = config.semantic_problems(text, doc);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Checks that need more than one value's type.
    fn semantic_problems(&self, text: &str, doc: &DeTable<'_>) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, message: String| {
            out.push(Problem {
                key: key.into(),
                line: key_line(text, doc, key),
                message,
            });
        };
        if self.mqtt.qos > 2 {
            bad(
                "mqtt.qos",
                format!("{} is not a QoS: use 0, 1 or 2", self.mqtt.qos),
            );
        }
        if self.mqtt.client_id.is_empty() || self.mqtt.client_id.len() > 128 {
            bad("mqtt.client_id", "must be 1 to 128 characters".into());
        }
        if self.mqtt.max_payload == 0 || self.mqtt.max_payload > 16 * 1024 * 1024 {
            bad(
                "mqtt.max_payload",
                "must be between 1 and 16777216 bytes".into(),
            );
        }
        if self.mqtt.keep_alive < Duration::from_secs(5) {
            bad("mqtt.keep_alive", "must be at least 5s".into());
        }
        if self.mqtt.reconnect_min.is_zero() || self.mqtt.reconnect_min > self.mqtt.reconnect_max {
            bad(
                "mqtt.reconnect_min",
                "must be above 0 and not above mqtt.reconnect_max".into(),
            );
        }
        if let Some(g) = &self.mqtt.shared_group
            && (g.is_empty() || g.contains(['/', '+', '#']))
        {
            bad(
                "mqtt.shared_group",
                "must be a non-empty name without '/', '+' or '#'".into(),
            );
        }
        if self.mqtt.shared_group.is_some() && self.storage.url.is_none() {
            bad(
                "mqtt.shared_group",
                "instances that share the ingest must share storage: set [storage] url to a PostgreSQL database (with SQLite each instance would hold only its share of the readings)".into(),
            );
        }
        let t = &self.topics;
        let pairs = [
            ("telemetry", &t.telemetry, "status", &t.status),
            ("telemetry", &t.telemetry, "ack", &t.ack),
            ("status", &t.status, "ack", &t.ack),
        ];
        for (an, a, bn, b) in pairs {
            if a.overlaps(b) {
                bad(
                    &format!("topics.{bn}"),
                    format!("{:?} can match the same topics as topics.{an}", b.as_str()),
                );
            }
        }
        if t.command.overlaps(&t.ack) || t.command.overlaps(&t.telemetry) {
            bad(
                "topics.command",
                "must differ from the telemetry and ack topics".into(),
            );
        }
        if self.storage.batch_size == 0 || self.storage.batch_size > 100_000 {
            bad("storage.batch_size", "must be between 1 and 100000".into());
        }
        if self.storage.queue < 16 || self.storage.queue > 10_000_000 {
            bad("storage.queue", "must be between 16 and 10000000".into());
        }
        if self.storage.batch_delay > Duration::from_secs(1) {
            bad("storage.batch_delay", "must be at most 1s".into());
        }
        if self.storage.retention < Duration::from_secs(60) {
            bad("storage.retention", "must be at least 1m".into());
        }
        if self
            .storage
            .events_retention
            .is_some_and(|e| e < self.storage.retention)
        {
            bad(
                "storage.events_retention",
                "must be at least storage.retention: presence and command events are kept at least as long as readings".into(),
            );
        }
        let keep = |d: Option<Duration>| d.unwrap_or(Duration::MAX);
        if keep(self.storage.retention_1m) < self.storage.retention {
            bad(
                "storage.retention_1m",
                "must be at least storage.retention: the rollups outlive the readings they summarize".into(),
            );
        }
        if keep(self.storage.retention_1h) < keep(self.storage.retention_1m) {
            bad(
                "storage.retention_1h",
                "must be at least storage.retention_1m (or \"forever\")".into(),
            );
        }
        let unit_ok = |unit: &str| !unit.is_empty() && unit.chars().count() <= 32;
        for (key, entry) in &self.units {
            match entry {
                UnitEntry::Field(unit) if !unit_ok(unit) => {
                    bad(&format!("units.{key}"), "must be 1 to 32 characters".into());
                }
                UnitEntry::Field(_) => {}
                UnitEntry::Devices(fields) => {
                    for (field, _) in fields.iter().filter(|(_, u)| !unit_ok(u)) {
                        bad(
                            &format!("units.{key}.{field}"),
                            "must be 1 to 32 characters".into(),
                        );
                    }
                }
            }
        }
        for (name, params) in &self.commands.templates {
            if let Err(e) = crate::domain::DeviceId::check(name) {
                bad(
                    &format!("commands.templates.{name}"),
                    format!(
                        "not a command name: {}",
                        e.to_string().replace("device id", "a command name")
                    ),
                );
            }
            if !params.is_object() {
                bad(
                    &format!("commands.templates.{name}"),
                    "must be a table of parameters, like { seconds = 5 } (or {} for none)".into(),
                );
            }
        }
        if self.storage.retention_interval.is_zero() {
            bad("storage.retention_interval", "must be above 0".into());
        }
        if self.storage.retry_max < Duration::from_millis(10)
            || self.storage.retry_max > Duration::from_secs(300)
        {
            bad("storage.retry_max", "must be between 10ms and 5m".into());
        }
        if self.storage.busy_timeout > Duration::from_secs(60) {
            bad("storage.busy_timeout", "must be at most 1m".into());
        }
        if self
            .storage
            .path
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            bad("storage.path", "must not be empty".into());
        }
        if let Some(url) = &self.storage.url {
            if self.storage.path.is_some() {
                bad(
                    "storage.url",
                    "set either path (SQLite) or url (PostgreSQL), not both".into(),
                );
            }
            if let Err(why) = check_postgres_url(url.expose()) {
                bad("storage.url", why);
            }
        }
        if self.storage.max_connections < 2 || self.storage.max_connections > 1000 {
            bad(
                "storage.max_connections",
                "must be between 2 and 1000".into(),
            );
        }
        if self.presence.timeout < Duration::from_secs(1) {
            bad("presence.timeout", "must be at least 1s".into());
        }
        if self.presence.stale_after > 1000 {
            bad(
                "presence.stale_after",
                "must be between 0 (never stale) and 1000".into(),
            );
        }
        if self
            .presence
            .interval
            .is_some_and(|i| i < Duration::from_millis(10) || i >= self.presence.timeout)
        {
            bad(
                "presence.interval",
                "must be \"auto\", or at least 10ms and below presence.timeout".into(),
            );
        }
        if self.http.sse_buffer < 16 || self.http.sse_buffer > 10_000_000 {
            bad(
                "http.sse_buffer",
                "must be between 16 and 10000000 events".into(),
            );
        }
        for (key, v) in [
            ("http.max_sse_clients", self.http.max_sse_clients),
            ("http.max_ws_clients", self.http.max_ws_clients),
            ("http.max_streams_per_ip", self.http.max_streams_per_ip),
        ] {
            if v == 0 || v > 1_000_000 {
                bad(key, "must be between 1 and 1000000".into());
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            if t.name.is_empty() || !names.insert(t.name.clone()) {
                bad(
                    &key,
                    format!("name {:?} must be non-empty and unique", t.name),
                );
            }
            let h = t.hash.expose();
            if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                bad(
                    &key,
                    "hash must be the 64 hex digits that `telebridge token` prints".into(),
                );
            }
            if !device_globs_ok(&t.devices) {
                bad(
                    &key,
                    "devices must be globs of A-Z a-z 0-9 . _ - * ?, like [\"sensor-*\"]".into(),
                );
            }
        }
        self.alerts.problems(&mut bad);
        if self.http.heartbeat < Duration::from_secs(1) {
            bad("http.heartbeat", "must be at least 1s".into());
        }
        if self.commands.timeout.is_zero() {
            bad("commands.timeout", "must be above 0".into());
        }
        if self.commands.rate_limit == 0 || self.commands.rate_limit > 100_000 {
            bad("commands.rate_limit", "must be between 1 and 100000".into());
        }
        if self.commands.ttl.is_zero() {
            bad("commands.ttl", "must be above 0".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            bad(
                "log.level",
                format!("{:?} is not a log filter: {e}", self.log.level),
            );
        }
        if self.auth.tokens.is_empty()
            && !self.http.listen.ip().is_loopback()
            && !self.http.allow_public_without_auth
        {
            bad(
                "http.listen",
                format!(
                    "{} is not a loopback address and no [[auth.tokens]] are configured: add tokens, \
                     listen on 127.0.0.1, or set http.allow_public_without_auth = true",
                    self.http.listen
                ),
            );
        }
        let mqtt = &self.mqtt;
        if !mqtt.url.tls {
            for (key, set) in [
                ("mqtt.tls_ca", mqtt.tls_ca.is_some()),
                ("mqtt.tls_cert", mqtt.tls_cert.is_some()),
                ("mqtt.tls_key", mqtt.tls_key.is_some()),
            ] {
                if set {
                    bad(
                        key,
                        "is only used over TLS: write mqtt.url as mqtts://HOST:PORT".into(),
                    );
                }
            }
        } else {
            let roots = match &mqtt.tls_ca {
                Some(ca) => crate::tls::load_certs(ca).map(|_| ()),
                None => crate::tls::system_roots().map(|_| ()),
            };
            if let Err(e) = roots {
                let key = if mqtt.tls_ca.is_some() {
                    "mqtt.tls_ca"
                } else {
                    "mqtt.url"
                };
                bad(key, e.to_string());
            }
            tls_identity_problems(&mut bad, "mqtt", &mqtt.tls_cert, &mqtt.tls_key);
        }
        tls_identity_problems(&mut bad, "http", &self.http.tls_cert, &self.http.tls_key);
        out
    }
}

/// Every key that no section accepts, and the byte ranges of those `key = value` pairs.
fn unknown_keys(text: &str, doc: &DeTable<'_>) -> (Vec<Problem>, Vec<std::ops::Range<usize>>) {
    let mut out = Vec::new();
    let mut spans = Vec::new();
    for (key, value) in doc.iter() {
        let name: &str = key.get_ref();
        let Some((_, known)) = SCHEMA.iter().find(|(s, _)| *s == name) else {
            out.push(Problem {
                key: name.to_owned(),
                line: Some(line_of(text, key.span().start)),
                message: format!(
                    "unknown section; known sections are {}",
                    SCHEMA
                        .iter()
                        .map(|(s, _)| *s)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
            continue;
        };
        let DeValue::Table(table) = value.get_ref() else {
            out.push(Problem {
                key: name.to_owned(),
                line: Some(line_of(text, key.span().start)),
                message: format!("must be a table, like [{name}]"),
            });
            continue;
        };
        for (k, v) in table.iter() {
            let key: &str = k.get_ref();
            if !known.contains(&key) && !known.contains(&ANY_KEY) {
                out.push(Problem {
                    key: format!("{name}.{key}"),
                    line: Some(line_of(text, k.span().start)),
                    message: format!("unknown key; [{name}] accepts {}", known.join(", ")),
                });
                spans.push(k.span().start..v.span().end.min(text.len()));
                continue;
            }
            let entry_keys = ENTRIES
                .iter()
                .find(|(s, a, _)| *s == name && *a == key)
                .map(|(_, _, keys)| *keys);
            if let (Some(entry_keys), DeValue::Array(items)) = (entry_keys, v.get_ref()) {
                for (i, item) in items.iter().enumerate() {
                    let DeValue::Table(entry) = item.get_ref() else {
                        continue;
                    };
                    for (ek, ev) in entry.iter() {
                        if !entry_keys.contains(&ek.get_ref().as_ref()) {
                            out.push(Problem {
                                key: format!("{name}.{key}[{i}].{}", ek.get_ref()),
                                line: Some(line_of(text, ek.span().start)),
                                message: format!(
                                    "unknown key; [[{name}.{key}]] accepts {}",
                                    entry_keys.join(", ")
                                ),
                            });
                            spans.push(ek.span().start..ev.span().end.min(text.len()));
                        }
                    }
                }
            }
        }
    }
    (out, spans)
}

/// Deserializes each section on its own, so one bad section does not hide another.
fn section_errors(text: &str, doc: &DeTable<'_>) -> Vec<Problem> {
    macro_rules! check {
        ($($name:ident: $ty:ty),* $(,)?) => {{
            let mut errors = Vec::new();
            $(
                #[derive(Deserialize)]
                #[allow(dead_code, reason = "only deserialized to find errors")]
                struct $name {
                    #[serde(default)]
                    $name: $ty,
                }
                if let Err(e) = toml::from_str::<$name>(text) {
                    errors.push((stringify!($name), e));
                }
            )*
            errors
        }};
    }
    #[allow(non_camel_case_types, reason = "struct named after its section")]
    let errors = check!(
        broker: BrokerConfig,
        mqtt: MqttConfig,
        topics: TopicsConfig,
        http: HttpConfig,
        storage: StorageConfig,
        presence: PresenceConfig,
        commands: CommandsConfig,
        auth: AuthConfig,
        log: LogConfig,
        alerts: AlertsConfig,
        units: std::collections::BTreeMap<String, UnitEntry>,
    );
    let mut out = Vec::new();
    for (section, e) in errors {
        let message = e.message().trim().to_owned();
        // Unknown keys are reported, all of them, by `unknown_keys`.
        if message.starts_with("unknown field") {
            continue;
        }
        let start = e.span().map(|s| s.start);
        out.push(Problem {
            key: start
                .and_then(|s| key_at(doc, section, s))
                .unwrap_or_else(|| section.to_owned()),
            line: start.map(|s| line_of(text, s)),
            message,
        });
    }
    out
}

/// The dotted key whose value holds byte offset `pos`.
fn key_at(doc: &DeTable<'_>, section: &str, pos: usize) -> Option<String> {
    let (_, value) = doc.iter().find(|(k, _)| k.get_ref() == section)?;
    let DeValue::Table(table) = value.get_ref() else {
        return None;
    };
    // An entry of an array of tables: `alerts.rules[1].severity` (the array's own span
    // need not cover its entries).
    for (k, v) in table.iter() {
        let DeValue::Array(items) = v.get_ref() else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let DeValue::Table(entry) = item.get_ref() else {
                continue;
            };
            if let Some((ek, _)) = entry
                .iter()
                .find(|(ek, ev)| ek.span().contains(&pos) || ev.span().contains(&pos))
            {
                return Some(format!("{section}.{}[{i}].{}", k.get_ref(), ek.get_ref()));
            }
        }
    }
    table
        .iter()
        .find(|(k, v)| k.span().contains(&pos) || v.span().contains(&pos) || v.span().start == pos)
        .map(|(k, _)| format!("{section}.{}", k.get_ref()))
}

/// The line of `key` in entry `index` of the array of tables `section.array` (of the
/// entry's header when `key` is not written there).
fn entry_line(
    text: &str,
    doc: &DeTable<'_>,
    section: &str,
    array: &str,
    index: usize,
    key: &str,
) -> Option<usize> {
    let (_, value) = doc.iter().find(|(k, _)| k.get_ref() == section)?;
    let DeValue::Table(table) = value.get_ref() else {
        return None;
    };
    let (_, items) = table.iter().find(|(k, _)| k.get_ref() == array)?;
    let DeValue::Array(items) = items.get_ref() else {
        return None;
    };
    let item = items.get(index)?;
    let DeValue::Table(entry) = item.get_ref() else {
        return None;
    };
    let pos = entry
        .iter()
        .find(|(k, _)| k.get_ref() == key)
        .map(|(k, _)| k.span().start)
        .or_else(|| entry.iter().next().map(|(k, _)| k.span().start))
        .unwrap_or(item.span().start);
    Some(line_of(text, pos))
}

/// The line of a dotted key in the file, if it is there.
fn key_line(text: &str, doc: &DeTable<'_>, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.split_once('.')?;
    // `alerts.rules[2].when`, or `auth.tokens[0]` for the entry as a whole.
    if let Some((array, rest)) = key.split_once('[') {
        let (index, field) = rest.split_once(']')?;
        let field = field.strip_prefix('.').unwrap_or("");
        return entry_line(text, doc, section, array, index.parse().ok()?, field);
    }
    let (_, value) = doc.iter().find(|(k, _)| k.get_ref() == section)?;
    let DeValue::Table(table) = value.get_ref() else {
        return None;
    };
    let (k, _) = table.iter().find(|(k, _)| k.get_ref() == key)?;
    Some(line_of(text, k.span().start))
}

fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_is_shown_without_its_password_wherever_it_hides() {
        for (url, shown) in [
            (
                "postgres://tb:hunter2@db:5432/tb",
                "postgres://tb:***@db:5432/tb",
            ),
            ("postgres://tb:se/cr?e#t@db/tb", "postgres://tb:***@db/tb"),
            (
                "postgres://db/tb?user=tb&password=hunter2&sslmode=require",
                "postgres://db/tb?user=tb&password=***&sslmode=require",
            ),
            ("postgres://tb@db/tb", "postgres://tb@db/tb"),
        ] {
            assert_eq!(redact_url(url), shown);
            assert!(!redact_url(url).contains("hunter2") && !redact_url(url).contains("cr?e"));
        }
        let text = "[storage]\nurl = \"postgres://tb:hunter2@db:0/tb\"\n";
        let problems = format!("{:?}", Config::parse(text).expect_err("port 0"));
        assert!(problems.contains("storage.url"), "{problems}");
        assert!(!problems.contains("hunter2"), "{problems}");
        let both = "[storage]\npath = \"x.db\"\nurl = \"postgres://db/tb\"\n";
        let problems = format!("{:?}", Config::parse(both).expect_err("both"));
        assert!(problems.contains("not both"), "{problems}");
    }

    #[test]
    fn events_are_kept_at_least_as_long_as_readings() {
        let long = Config::parse("[storage]\nretention = \"180d\"\n").expect("valid");
        assert_eq!(
            long.storage.events_retention(),
            Duration::from_secs(180 * 86_400)
        );
        let short = Config::parse("[storage]\nretention = \"180d\"\nevents_retention = \"7d\"\n");
        let problems = format!("{:?}", short.err());
        assert!(problems.contains("storage.events_retention"), "{problems}");
    }

    #[test]
    fn the_example_config_parses_and_writes_out_every_default() {
        let text = EXAMPLE;
        let doc = DeTable::parse(text).unwrap();
        for (section, keys) in SCHEMA {
            let (_, table) = doc
                .get_ref()
                .iter()
                .find(|(k, _)| k.get_ref() == section)
                .unwrap_or_else(|| panic!("config.toml lacks [{section}]"));
            let DeValue::Table(table) = table.get_ref() else {
                panic!("[{section}] is not a table")
            };
            for key in keys.iter().filter(|k| **k != ANY_KEY) {
                let commented = text.contains(&format!("# {key} = "))
                    || text.contains(&format!("# [[{section}.{key}]]"));
                let present = table.iter().any(|(k, _)| k.get_ref() == key);
                assert!(present || commented, "config.toml lacks {section}.{key}");
            }
        }
        let parsed = Config::parse(text).expect("config.toml is valid");
        let defaults = Config::default();
        assert_eq!(parsed.mqtt.url, defaults.mqtt.url);
        assert_eq!(parsed.broker.listen, defaults.broker.listen);
        assert_eq!(parsed.storage.retention, defaults.storage.retention);
        assert_eq!(parsed.commands.templates, defaults.commands.templates);
        assert_eq!(
            parsed.storage.events_retention(),
            Duration::from_secs(90 * 86_400)
        );
        assert_eq!(parsed.topics.telemetry, defaults.topics.telemetry);
        assert_eq!(parsed.storage.retention_1m, defaults.storage.retention_1m);
        assert_eq!(parsed.storage.retention_1h, None);
    }

    #[test]
    fn rollups_outlive_the_tier_below() {
        let ok = Config::parse("[storage]\nretention_1m = \"forever\"\n").expect("valid");
        assert_eq!(ok.storage.retention_1m, None);
        let short = Config::parse("[storage]\nretention = \"90d\"\nretention_1m = \"30d\"\n");
        assert!(format!("{:?}", short.err()).contains("storage.retention_1m"));
        let hour =
            Config::parse("[storage]\nretention_1m = \"forever\"\nretention_1h = \"400d\"\n");
        assert!(format!("{:?}", hour.err()).contains("storage.retention_1h"));
        let bad = format!(
            "{:?}",
            Config::parse("[storage]\nretention_1h = \"ever\"\n").err()
        );
        assert!(
            bad.contains("storage.retention_1h") && bad.contains("forever"),
            "{bad}"
        );
        let units = Config::parse("[units]\ntemperature = \"°F\"\n\"engine.rpm\" = \"rpm\"\n")
            .expect("valid");
        assert_eq!(
            units.units.get("engine.rpm"),
            Some(&UnitEntry::Field("rpm".into()))
        );
        assert!(Config::parse("[units]\nx = 3\n").is_err());
        let glob =
            Config::parse("[units]\nspeed = \"km/h\"\n[units.\"truck-*\"]\nspeed = \"mph\"\n")
                .expect("valid");
        assert_eq!(
            glob.units.get("truck-*"),
            Some(&UnitEntry::Devices([("speed".into(), "mph".into())].into()))
        );
        let bad = format!(
            "{:?}",
            Config::parse("[units.\"t-*\"]\nspeed = \"\"\n").expect_err("empty unit")
        );
        assert!(bad.contains("units.t-*.speed"), "{bad}");
        let bad = format!(
            "{:?}",
            Config::parse("[commands.templates]\n\"a/b\" = {}\nping = 3\n")
                .expect_err("bad templates")
        );
        assert!(
            bad.contains("commands.templates.a/b") && bad.contains("commands.templates.ping"),
            "{bad}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_key_and_line() {
        let text = "[mqtt]\nqos = 7\nurl = \"http://x\"\n\n[storage]\nretention = \"forever\"\nbogus = 1\n\n[nope]\n";
        let problems = Config::parse(text).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert!(keys.contains(&("storage.bogus", Some(7))), "{problems:?}");
        assert!(keys.contains(&("nope", Some(9))), "{problems:?}");
        assert!(keys.contains(&("mqtt.url", Some(3))), "{problems:?}");
        assert!(
            keys.contains(&("storage.retention", Some(6))),
            "{problems:?}"
        );
    }

    #[test]
    fn broken_alert_rules_are_reported_with_key_and_line() {
        let text = r#"[alerts]
webhook_attempts = 0

[[alerts.rules]]
name = "hot"
when = "temperature > 80"
threshold = 80

[[alerts.rules]]
name = "hot"
when = "temperature is hot"
for = "1m"

[[alerts.rules]]
name = "quiet"
when = "no reading"

[[alerts.rules]]
name = "gone"
when = "offline"
clear = "temperature < 3"

[[alerts.webhooks]]
url = "ftp://x"
"#;
        let problems = Config::parse(text).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert!(
            keys.contains(&("alerts.rules[0].threshold", Some(7))),
            "{problems:?}"
        );
        // With the unknown key blanked out, the rest is checked too.
        let text = text.replace("threshold = 80", "");
        let problems = Config::parse(&text).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| (p.key.as_str(), p.line)).collect();
        for want in [
            ("alerts.webhook_attempts", Some(2)),
            ("alerts.rules[1].name", Some(10)),
            ("alerts.rules[1].when", Some(11)),
            ("alerts.rules[2].for", Some(15)),
            ("alerts.rules[3].clear", Some(21)),
            ("alerts.webhooks[0].url", Some(24)),
        ] {
            assert!(keys.contains(&want), "{want:?} not in {problems:?}");
        }
        let severity =
            "[[alerts.rules]]\nname = \"a\"\nwhen = \"offline\"\nseverity = \"urgent\"\n";
        let problems = Config::parse(severity).unwrap_err();
        assert_eq!(problems[0].key, "alerts.rules[0].severity", "{problems:?}");
        assert_eq!(problems[0].line, Some(4), "{problems:?}");
    }

    #[test]
    fn semantic_problems_are_all_reported() {
        let text = "[mqtt]\nqos = 7\n[topics]\nstatus = \"devices/{device}/telemetry\"\n";
        let problems = Config::parse(text).unwrap_err();
        let keys: Vec<_> = problems.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert!(keys.contains(&("mqtt.qos", Some(2))), "{problems:?}");
        assert!(keys.contains(&("topics.status", Some(4))), "{problems:?}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let problems = Config::parse("[mqtt]\nqos = = 1\n").unwrap_err();
        assert_eq!(problems[0].line, Some(2));
    }

    #[test]
    fn mqtt_urls_parse() {
        let u: MqttUrl = "mqtt://example.com:1884".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("example.com", 1884, false)
        );
        let u: MqttUrl = "mqtts://h".parse().unwrap();
        assert_eq!((u.port, u.tls), (8883, true));
        assert!("tcp://h:1".parse::<MqttUrl>().is_err());
        assert!("mqtt://h:port".parse::<MqttUrl>().is_err());
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
