//! The WebSocket wire protocol of `GET /ws`, in one place: what browsers send and what they
//! get back. JSON text frames, tagged by `type`.

use serde::Serialize;
use serde_json::Value;

/// A command as a client asks for it (validated; see [`parse_client_message`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRequest {
    /// Target device (validated).
    pub device: String,
    /// Command name: 1–64 characters of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// Parameters: a JSON object (`{}` when absent).
    pub params: serde_json::Map<String, Value>,
    /// The client's own tag, echoed back.
    pub reference: Option<Value>,
    /// Idempotency key: the same key again returns the existing command.
    pub key: Option<String>,
    /// How long the command may wait for an offline device, in milliseconds.
    pub ttl_ms: Option<i64>,
}

/// Server → client messages (their schema is in the AsyncAPI document, `crate::asyncapi`).
#[derive(Debug, Clone, Serialize, PartialEq, salvo::oapi::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The command is stored: published (`status: sent`) or waiting for an offline device
    /// (`status: queued`).
    Accepted {
        /// Command id (uuid).
        id: String,
        /// The client's tag.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        /// `sent` or `queued` (or the status of an existing command for a repeated key).
        status: String,
        /// Whether an earlier command with the same idempotency key was returned.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        duplicate: bool,
    },
    /// The device answered.
    Ack {
        /// Command id.
        id: String,
        /// Whether the device reports success.
        ok: bool,
        /// The device's result, when ok.
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<Value>,
        /// The device's error, when not ok.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// Round trip from publishing the command to receiving the answer, milliseconds.
        rtt_ms: f64,
    },
    /// The device did not answer within `[commands] timeout`.
    Timeout {
        /// Command id.
        id: String,
    },
    /// The device stayed offline until the command's ttl ran out.
    Expired {
        /// Command id.
        id: String,
    },
    /// An operator cancelled it while it was queued.
    Cancelled {
        /// Command id.
        id: String,
    },
    /// A bad message; the connection stays open.
    Error {
        /// The client's tag, when the message had one.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<Value>,
        /// Stable code: `bad_json`, `unknown_type`, `invalid_device`, `invalid_command`,
        /// `invalid_params`, `too_large`, `forbidden`, `rate_limited`, `unavailable`.
        #[salvo(schema(value_type = String))]
        code: &'static str,
        /// What was wrong.
        message: String,
    },
}

/// A refused client message.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The client's tag, if it could be read.
    pub reference: Option<Value>,
    /// Error code.
    pub code: &'static str,
    /// Explanation.
    pub message: String,
}

impl Refusal {
    fn new(reference: Option<Value>, code: &'static str, message: impl Into<String>) -> Self {
        Refusal {
            reference,
            code,
            message: message.into(),
        }
    }

    /// As the message sent back.
    pub fn into_message(self) -> ServerMessage {
        ServerMessage::Error {
            reference: self.reference,
            code: self.code,
            message: self.message,
        }
    }
}

/// Parses one client text frame into a command request.
pub fn parse_client_message(text: &str) -> Result<CommandRequest, Refusal> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Refusal::new(None, "bad_json", format!("not JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(Refusal::new(
            None,
            "bad_json",
            "a message must be a JSON object",
        ));
    };
    let reference = obj.remove("ref");
    match obj.get("type").and_then(Value::as_str) {
        Some("command") => {}
        Some(other) => {
            return Err(Refusal::new(
                reference,
                "unknown_type",
                format!("unknown message type {other:?}; the only type is \"command\""),
            ));
        }
        None => {
            return Err(Refusal::new(
                reference,
                "unknown_type",
                "missing \"type\": use \"command\"",
            ));
        }
    }
    parse_command_fields(obj, reference, true)
}

/// Parses the fields of a command (from a WebSocket message, or an HTTP body where the device
/// comes from the URL and `with_device` is false).
pub fn parse_command_fields(
    mut obj: serde_json::Map<String, Value>,
    reference: Option<Value>,
    with_device: bool,
) -> Result<CommandRequest, Refusal> {
    let bad = |code, msg: String| Refusal::new(reference.clone(), code, msg);
    let device = if with_device {
        let d = match obj.remove("device") {
            Some(Value::String(d)) => d,
            Some(_) => return Err(bad("invalid_device", "\"device\" must be a string".into())),
            None => return Err(bad("invalid_device", "missing \"device\"".into())),
        };
        crate::domain::DeviceId::check(&d)
            .map_err(|e| bad("invalid_device", format!("device {d:?}: {e}")))?;
        d
    } else {
        String::new()
    };
    let name = match obj.remove("name") {
        Some(Value::String(n)) => n,
        _ => return Err(bad("invalid_command", "\"name\" must be a string".into())),
    };
    crate::domain::DeviceId::check(&name).map_err(|e| {
        bad(
            "invalid_command",
            format!(
                "command name {name:?}: {}",
                e.to_string().replace("device id", "a command name")
            ),
        )
    })?;
    let params = match obj.remove("params") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err(bad(
                "invalid_params",
                "\"params\" must be a JSON object".into(),
            ));
        }
    };
    let key = match obj.remove("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) if !k.is_empty() && k.len() <= 128 => Some(k),
        Some(_) => {
            return Err(bad(
                "invalid_command",
                "\"key\" must be a string of 1 to 128 characters".into(),
            ));
        }
    };
    let ttl_ms = match obj.remove("ttl") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if s > 0.0 && s <= 30.0 * 86_400.0 => Some((s * 1000.0) as i64),
            _ => {
                return Err(bad(
                    "invalid_command",
                    "\"ttl\" must be 1 ms to 30 days".into(),
                ));
            }
        },
        Some(Value::String(s)) => match humantime::parse_duration(&s) {
            Ok(d) if !d.is_zero() && d.as_secs() <= 30 * 86_400 => Some(d.as_millis() as i64),
            _ => {
                return Err(bad(
                    "invalid_command",
                    format!("\"ttl\" {s:?} is not a duration such as \"30s\""),
                ));
            }
        },
        Some(_) => {
            return Err(bad(
                "invalid_command",
                "\"ttl\" must be seconds or a duration string".into(),
            ));
        }
    };
    obj.remove("type");
    if let Some(extra) = obj.keys().next() {
        return Err(bad("invalid_command", format!("unknown field {extra:?}")));
    }
    Ok(CommandRequest {
        device,
        name,
        params,
        reference,
        key,
        ttl_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> &'static str {
        parse_client_message(text).unwrap_err().code
    }

    #[test]
    fn a_good_command_parses() {
        let c = parse_client_message(
            r#"{"type":"command","device":"dev-1","name":"set_interval","params":{"seconds":5},"ref":"a","ttl":"10s"}"#,
        )
        .unwrap();
        assert_eq!(c.device, "dev-1");
        assert_eq!(c.params["seconds"], 5);
        assert_eq!(c.reference, Some(Value::String("a".into())));
        assert_eq!(c.ttl_ms, Some(10_000));
    }

    #[test]
    fn every_bad_message_has_its_code() {
        assert_eq!(code("{"), "bad_json");
        assert_eq!(code("[1]"), "bad_json");
        assert_eq!(code(r#"{"type":"hello"}"#), "unknown_type");
        assert_eq!(code(r#"{"name":"x"}"#), "unknown_type");
        assert_eq!(
            code(r#"{"type":"command","device":"a/b","name":"x"}"#),
            "invalid_device"
        );
        assert_eq!(
            code(r#"{"type":"command","device":"+","name":"x"}"#),
            "invalid_device"
        );
        assert_eq!(
            code(r##"{"type":"command","device":"#","name":"x"}"##),
            "invalid_device"
        );
        assert_eq!(code(r#"{"type":"command","name":"x"}"#), "invalid_device");
        assert_eq!(
            code(r#"{"type":"command","device":"d"}"#),
            "invalid_command"
        );
        assert_eq!(
            code(r#"{"type":"command","device":"d","name":"x","params":[1]}"#),
            "invalid_params"
        );
        assert_eq!(
            code(r#"{"type":"command","device":"d","name":"x","bogus":1}"#),
            "invalid_command"
        );
    }

    #[test]
    fn refusals_keep_the_ref() {
        let r = parse_client_message(r#"{"type":"nope","ref":7}"#).unwrap_err();
        assert_eq!(r.reference, Some(Value::from(7)));
    }

    #[test]
    fn server_messages_have_the_contract_shape() {
        let m = ServerMessage::Ack {
            id: "x".into(),
            ok: false,
            result: None,
            error: Some("no".into()),
            rtt_ms: 1.5,
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"type":"ack","id":"x","ok":false,"error":"no","rtt_ms":1.5})
        );
    }
}
