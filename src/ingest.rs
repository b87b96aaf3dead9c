//! Turns MQTT messages into typed items for the store: a reading, a presence change, or a
//! rejection. Every item carries the token that acknowledges its message once committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::config::TopicsConfig;
use crate::domain::{self, DeviceId};
use crate::observability::Metrics;

/// What acknowledges one MQTT message to the broker, once its item is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    /// MQTT packet id.
    pub pkid: u16,
    /// QoS the message arrived with (1 or 2).
    pub qos: u8,
    /// The connection the message arrived on; acks for an older one are dropped.
    pub generation: u64,
}

/// Sends acknowledgements to the broker. Must never block.
pub trait AckSink: Send + 'static {
    /// Acknowledges what it can now and keeps the rest in `tokens` for a later retry.
    fn ack(&mut self, tokens: &mut Vec<AckToken>);
}

/// A reading ready to be stored.
#[derive(Debug, Clone)]
pub struct Reading {
    /// The device that sent it.
    pub device: DeviceId,
    /// The topic it arrived on.
    pub topic: Arc<str>,
    /// Device time, else receive time (Unix ms).
    pub ts: i64,
    /// Receive time (Unix ms).
    pub received_at: i64,
    /// The payload as sent.
    pub payload: Bytes,
    /// `domain::flags` bits.
    pub flags: i64,
}

/// One unit of work for the store writer.
#[derive(Debug)]
pub enum Item {
    /// A telemetry reading.
    Reading(Reading, Option<AckToken>),
    /// A presence report.
    Presence {
        /// The device.
        device: DeviceId,
        /// online or offline.
        online: bool,
        /// Receive time (Unix ms).
        at: i64,
        /// Ack for the status message.
        ack: Option<AckToken>,
    },
    /// A device's answer to a command.
    CommandAck(CommandAck),
    /// A message that is not stored, acknowledged in order with the rest.
    Skip(Option<AckToken>),
}

/// A device's answer on its ack topic.
#[derive(Debug, Clone)]
pub struct CommandAck {
    /// The device.
    pub device: DeviceId,
    /// The command id it answers.
    pub id: String,
    /// Success.
    pub ok: bool,
    /// Result (JSON text), when ok.
    pub result: Option<String>,
    /// Error text, when not ok.
    pub error: Option<String>,
    /// Receive time (Unix ms).
    pub at: i64,
    /// Ack for the MQTT message.
    pub ack: Option<AckToken>,
}

#[derive(serde::Deserialize)]
struct AckPayload<'a> {
    id: String,
    ok: bool,
    #[serde(borrow, default)]
    result: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// Why a message was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// The payload is above `[mqtt] max_payload`.
    TooLarge,
    /// The device level of the topic is not a valid device id.
    BadDevice,
    /// The topic matches no template.
    UnknownTopic,
    /// A status message that is neither `online` nor `offline`.
    BadStatus,
    /// A command ack that is not `{"id", "ok", ...}`.
    BadAck,
}

impl Reject {
    /// Every reason.
    pub const ALL: [Reject; 5] = [
        Reject::TooLarge,
        Reject::BadDevice,
        Reject::UnknownTopic,
        Reject::BadStatus,
        Reject::BadAck,
    ];

    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::TooLarge => "too_large",
            Reject::BadDevice => "invalid_device",
            Reject::UnknownTopic => "unknown_topic",
            Reject::BadStatus => "bad_status",
            Reject::BadAck => "bad_ack",
        }
    }
}

/// Classifies incoming messages; owns the counters and log rate limits of rejections.
pub struct Ingest {
    topics: TopicsConfig,
    max_payload: usize,
    metrics: Arc<Metrics>,
    last_log_ms: AtomicU64,
}

impl Ingest {
    /// An ingest stage for these topics and limits.
    pub fn new(topics: TopicsConfig, max_payload: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            topics,
            max_payload,
            metrics,
            last_log_ms: AtomicU64::new(0),
        }
    }

    /// Turns one message into an item; rejections are counted and logged (rate-limited).
    pub fn classify(&self, topic: &str, payload: Bytes, ack: Option<AckToken>) -> Item {
        self.metrics.received.inc();
        match self.try_classify(topic, payload, ack) {
            Ok(item) => item,
            Err(reject) => {
                self.metrics.rejected(reject);
                self.log_reject(reject, topic);
                Item::Skip(ack)
            }
        }
    }

    fn try_classify(
        &self,
        topic: &str,
        payload: Bytes,
        ack: Option<AckToken>,
    ) -> Result<Item, Reject> {
        let now = domain::now_ms();
        if let Some(raw) = self.topics.telemetry.match_device(topic) {
            let device = DeviceId::parse(raw).map_err(|_| Reject::BadDevice)?;
            if payload.len() > self.max_payload {
                return Err(Reject::TooLarge);
            }
            let info = domain::inspect_payload(&payload);
            return Ok(Item::Reading(
                Reading {
                    device,
                    topic: Arc::from(topic),
                    ts: info.ts.unwrap_or(now),
                    received_at: now,
                    payload,
                    flags: info.flags,
                },
                ack,
            ));
        }
        if let Some(raw) = self.topics.status.match_device(topic) {
            let device = DeviceId::parse(raw).map_err(|_| Reject::BadDevice)?;
            let online = domain::parse_presence(&payload).ok_or(Reject::BadStatus)?;
            return Ok(Item::Presence {
                device,
                online,
                at: now,
                ack,
            });
        }
        if let Some(raw) = self.topics.ack.match_device(topic) {
            let device = DeviceId::parse(raw).map_err(|_| Reject::BadDevice)?;
            if payload.len() > self.max_payload {
                return Err(Reject::TooLarge);
            }
            let p: AckPayload<'_> = serde_json::from_slice(&payload).map_err(|_| Reject::BadAck)?;
            let error = match p.error {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s),
                Some(other) => Some(other.to_string()),
            };
            return Ok(Item::CommandAck(CommandAck {
                device,
                id: p.id,
                ok: p.ok,
                result: p.result.map(|r| r.get().to_owned()),
                error: if p.ok {
                    None
                } else {
                    error.or_else(|| Some("failed".into()))
                },
                at: now,
                ack,
            }));
        }
        Err(Reject::UnknownTopic)
    }

    /// At most one warning every 10 s, so a flood of bad input cannot flood the log.
    fn log_reject(&self, reject: Reject, topic: &str) {
        let now = domain::now_ms() as u64;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self
                .last_log_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let topic: String = topic.chars().take(200).collect();
            tracing::warn!(
                reason = reject.as_str(),
                topic,
                rejected_total = self.metrics.rejected_total(),
                "message rejected (further rejections are counted in /metrics, logged at most every 10s)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingest() -> Ingest {
        Ingest::new(TopicsConfig::default(), 16, Arc::new(Metrics::default()))
    }

    #[test]
    fn telemetry_becomes_a_reading() {
        let item = ingest().classify(
            "devices/d1/telemetry",
            Bytes::from_static(b"{\"t\":1}"),
            None,
        );
        let Item::Reading(r, _) = item else {
            panic!("{item:?}")
        };
        assert_eq!(r.device.as_str(), "d1");
        assert_eq!(r.flags, 0);
    }

    #[test]
    fn rejections_are_counted_and_skipped() {
        let i = ingest();
        let ack = Some(AckToken {
            pkid: 7,
            qos: 1,
            generation: 1,
        });
        let big = Bytes::from(vec![b'x'; 17]);
        assert!(matches!(i.classify("devices/d1/telemetry", big, ack), Item::Skip(a) if a == ack));
        assert!(matches!(
            i.classify("devices/a+b/telemetry", Bytes::new(), ack),
            Item::Skip(_)
        ));
        assert!(matches!(
            i.classify("devices/d1/status", Bytes::from_static(b"hm"), ack),
            Item::Skip(_)
        ));
        assert!(matches!(
            i.classify("x/y", Bytes::new(), ack),
            Item::Skip(_)
        ));
        assert_eq!(i.metrics.rejected_total(), 4);
    }

    #[test]
    fn status_becomes_presence() {
        let item = ingest().classify("devices/d1/status", Bytes::from_static(b"offline"), None);
        assert!(matches!(item, Item::Presence { online: false, .. }));
    }
}
