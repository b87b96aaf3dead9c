//! Parsed, validated values from the outside world: device ids, topic templates and the
//! classification of an incoming MQTT message. Nothing downstream sees raw strings.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;

/// Longest allowed device id, in bytes (all allowed characters are ASCII).
pub const DEVICE_ID_MAX: usize = 64;

/// Why a device id was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceIdError {
    /// The id is empty.
    #[error("device id is empty")]
    Empty,
    /// The id is longer than 64 characters.
    #[error("device id is longer than {DEVICE_ID_MAX} characters")]
    TooLong,
    /// The id holds a character outside `A-Z a-z 0-9 . _ -`.
    #[error("device id may only contain A-Z a-z 0-9 . _ - (found {0:?})")]
    BadChar(char),
}

/// A device id: 1–64 characters of `A-Z a-z 0-9 . _ -`, so it can never inject `+`, `#`
/// or `/` into a topic.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Arc<str>);

impl DeviceId {
    /// Validates `s` as a device id.
    pub fn parse(s: &str) -> Result<Self, DeviceIdError> {
        Self::check(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// Checks `s` without allocating.
    pub fn check(s: &str) -> Result<(), DeviceIdError> {
        if s.is_empty() {
            return Err(DeviceIdError::Empty);
        }
        if s.len() > DEVICE_ID_MAX {
            return Err(DeviceIdError::TooLong);
        }
        match s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            Some(c) => Err(DeviceIdError::BadChar(c)),
            None => Ok(()),
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id as a shared string, without copying.
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Why a topic template was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `{device}` must appear exactly once.
    #[error("must contain {{device}} exactly once")]
    DevicePlaceholder,
    /// `{device}` must be a whole topic level.
    #[error("{{device}} must be a whole topic level, like a/{{device}}/b")]
    PartialLevel,
    /// Wildcards and empty levels make no sense in a template.
    #[error("must not contain '+', '#', empty levels or a leading '$'")]
    BadLevel,
}

/// A topic template such as `devices/{device}/telemetry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    raw: String,
    levels: Vec<String>,
    device_level: usize,
}

impl TopicTemplate {
    /// Parses and validates a template.
    pub fn parse(raw: &str) -> Result<Self, TemplateError> {
        if raw.matches("{device}").count() != 1 {
            return Err(TemplateError::DevicePlaceholder);
        }
        let levels: Vec<String> = raw.split('/').map(str::to_owned).collect();
        let mut device_level = None;
        for (i, level) in levels.iter().enumerate() {
            if level == "{device}" {
                device_level = Some(i);
            } else if level.contains("{device}") {
                return Err(TemplateError::PartialLevel);
            } else if level.is_empty() || level.contains(['+', '#', '\0']) {
                return Err(TemplateError::BadLevel);
            }
        }
        if raw.starts_with('$') {
            return Err(TemplateError::BadLevel);
        }
        let device_level = device_level.ok_or(TemplateError::DevicePlaceholder)?;
        Ok(Self {
            raw: raw.to_owned(),
            levels,
            device_level,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The subscription filter: `{device}` replaced by `+`.
    pub fn filter(&self) -> String {
        self.raw.replace("{device}", "+")
    }

    /// The concrete topic for one device.
    pub fn topic_for(&self, device: &DeviceId) -> String {
        self.raw.replace("{device}", device.as_str())
    }

    /// If `topic` has this template's shape, the raw text at the device level.
    pub fn match_device<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut found = None;
        let mut n = 0;
        for (i, level) in topic.split('/').enumerate() {
            if i >= self.levels.len() {
                return None;
            }
            if i == self.device_level {
                found = Some(level);
            } else if level != self.levels[i] {
                return None;
            }
            n = i + 1;
        }
        if n == self.levels.len() { found } else { None }
    }

    /// Whether two templates can match the same topic.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.levels.len() == other.levels.len()
            && self
                .levels
                .iter()
                .zip(&other.levels)
                .enumerate()
                .all(|(i, (a, b))| i == self.device_level || i == other.device_level || a == b)
    }
}

/// Bit flags stored with a reading.
pub mod flags {
    /// The payload is not a JSON object; it is stored raw, as received.
    pub const RAW: i64 = 1;
    /// The payload had a `ts` field that could not be read; the receive time is used.
    pub const BAD_TS: i64 = 2;
}

/// What the payload of a telemetry message turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadInfo {
    /// Device time in Unix milliseconds, when the payload carried a readable `ts`.
    pub ts: Option<i64>,
    /// `flags::*` bits.
    pub flags: i64,
}

#[derive(Deserialize)]
struct Probe<'a> {
    // Every other field is skipped by serde, which still checks its syntax.
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
}

/// Inspects a telemetry payload: is it a JSON object, and does it carry a device time?
pub fn inspect_payload(payload: &[u8]) -> PayloadInfo {
    let raw = PayloadInfo {
        ts: None,
        flags: flags::RAW,
    };
    let Ok(text) = std::str::from_utf8(payload) else {
        return raw;
    };
    // serde would also accept an array for a struct; only an object is a reading.
    if !text.trim_start().starts_with('{') {
        return raw;
    }
    let Ok(probe) = serde_json::from_str::<Probe<'_>>(text) else {
        return raw;
    };
    match probe.ts.map(parse_ts) {
        None => PayloadInfo { ts: None, flags: 0 },
        Some(Some(ts)) => PayloadInfo {
            ts: Some(ts),
            flags: 0,
        },
        Some(None) => PayloadInfo {
            ts: None,
            flags: flags::BAD_TS,
        },
    }
}

/// Reads a `ts` value: an RFC 3339 string or Unix milliseconds.
fn parse_ts(raw: &RawValue) -> Option<i64> {
    let text = raw.get();
    if text.starts_with('"') {
        let s: std::borrow::Cow<'_, str> = serde_json::from_str(text).ok()?;
        parse_rfc3339_ms(&s)
    } else {
        let n: f64 = serde_json::from_str(text).ok()?;
        // Plausible Unix milliseconds: 1970 .. year 10000.
        (n.is_finite() && (0.0..253_402_300_800_000.0).contains(&n)).then_some(n as i64)
    }
}

/// Parses an RFC 3339 timestamp into Unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Formats Unix milliseconds as RFC 3339 UTC with millisecond precision.
pub fn format_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).unwrap_or_default()
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A presence report from a device's status topic.
pub fn parse_presence(payload: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    let text = text.trim_matches('"');
    if text.eq_ignore_ascii_case("online") {
        Some(true)
    } else if text.eq_ignore_ascii_case("offline") {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_allow_only_the_safe_alphabet() {
        assert!(DeviceId::parse("dev-1.a_B").is_ok());
        assert_eq!(DeviceId::parse(""), Err(DeviceIdError::Empty));
        assert_eq!(DeviceId::parse("a+b"), Err(DeviceIdError::BadChar('+')));
        assert_eq!(DeviceId::parse("a#"), Err(DeviceIdError::BadChar('#')));
        assert_eq!(DeviceId::parse("a/b"), Err(DeviceIdError::BadChar('/')));
        assert_eq!(DeviceId::parse("é"), Err(DeviceIdError::BadChar('é')));
        assert!(DeviceId::parse(&"x".repeat(64)).is_ok());
        assert_eq!(
            DeviceId::parse(&"x".repeat(65)),
            Err(DeviceIdError::TooLong)
        );
    }

    #[test]
    fn templates_match_only_their_own_shape() {
        let t = TopicTemplate::parse("devices/{device}/telemetry").unwrap();
        assert_eq!(t.filter(), "devices/+/telemetry");
        assert_eq!(t.match_device("devices/d1/telemetry"), Some("d1"));
        assert_eq!(t.match_device("devices/d1/telemetry/x"), None);
        assert_eq!(t.match_device("devices/d1"), None);
        assert_eq!(t.match_device("other/d1/telemetry"), None);
        assert_eq!(t.match_device("devices//telemetry"), Some(""));
        let s = TopicTemplate::parse("devices/{device}/status").unwrap();
        assert!(!t.overlaps(&s));
        assert!(t.overlaps(&TopicTemplate::parse("{device}/x/telemetry").unwrap()));
    }

    #[test]
    fn bad_templates_are_refused() {
        assert_eq!(
            TopicTemplate::parse("devices/telemetry"),
            Err(TemplateError::DevicePlaceholder)
        );
        assert_eq!(
            TopicTemplate::parse("devices/x{device}/t"),
            Err(TemplateError::PartialLevel)
        );
        assert_eq!(
            TopicTemplate::parse("devices/{device}/#"),
            Err(TemplateError::BadLevel)
        );
        assert_eq!(
            TopicTemplate::parse("devices//{device}"),
            Err(TemplateError::BadLevel)
        );
    }

    #[test]
    fn payloads_are_classified() {
        assert_eq!(
            inspect_payload(br#"{"t":1}"#),
            PayloadInfo { ts: None, flags: 0 }
        );
        assert_eq!(
            inspect_payload(br#"{"ts":1700000000123,"t":1}"#).ts,
            Some(1_700_000_000_123)
        );
        assert_eq!(
            inspect_payload(br#"{"ts":"2023-11-14T22:13:20.5Z"}"#).ts,
            Some(1_700_000_000_500)
        );
        assert_eq!(
            inspect_payload(br#"{"ts":"yesterday"}"#).flags,
            flags::BAD_TS
        );
        assert_eq!(inspect_payload(b"[1,2]").flags, flags::RAW);
        assert_eq!(inspect_payload(b"hello").flags, flags::RAW);
        assert_eq!(inspect_payload(b"").flags, flags::RAW);
        assert_eq!(inspect_payload(b"{\"a\":").flags, flags::RAW);
        assert_eq!(inspect_payload(&[0xff, 0xfe]).flags, flags::RAW);
    }

    #[test]
    fn times_round_trip() {
        assert_eq!(format_ms(1_700_000_000_500), "2023-11-14T22:13:20.500Z");
        assert_eq!(
            parse_rfc3339_ms("2023-11-14T22:13:20.500Z"),
            Some(1_700_000_000_500)
        );
    }

    #[test]
    fn presence_words() {
        assert_eq!(parse_presence(b"online"), Some(true));
        assert_eq!(parse_presence(b" OFFLINE\n"), Some(false));
        assert_eq!(parse_presence(b"\"online\""), Some(true));
        assert_eq!(parse_presence(b"maybe"), None);
    }
}
