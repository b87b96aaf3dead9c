//! Stored alerts: what the rules fired, and how each moved (`firing`, `acknowledged`,
//! `resolved`). One open alert at most per rule and device, which the database enforces, so
//! that two instances evaluating the same rule never fire it twice.

use serde_json::{Value, json};

use crate::domain;

/// An alert's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    /// The condition holds and nobody has acknowledged it.
    Firing,
    /// An operator has seen it; the condition may still hold.
    Acknowledged,
    /// The condition cleared.
    Resolved,
}

impl AlertState {
    /// As stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Resolved => "resolved",
        }
    }

    /// Parses a stored or requested state.
    pub fn parse(s: &str) -> Option<AlertState> {
        match s {
            "firing" => Some(AlertState::Firing),
            "acknowledged" => Some(AlertState::Acknowledged),
            "resolved" => Some(AlertState::Resolved),
            _ => None,
        }
    }
}

/// A stored alert.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    /// Its id, for `POST /api/alerts/{id}/ack`.
    pub id: i64,
    /// The rule's name.
    pub rule: String,
    /// The device.
    pub device: String,
    /// info, warning or critical.
    pub severity: String,
    /// firing, acknowledged or resolved.
    pub state: String,
    /// The payload field the rule watches, if any.
    pub field: Option<String>,
    /// The rule's threshold, for a comparison.
    pub threshold: Option<f64>,
    /// The value that fired it.
    pub value: Option<f64>,
    /// What happened, in words.
    pub message: String,
    /// Unix ms.
    pub fired_at: i64,
    /// Unix ms.
    pub acked_at: Option<i64>,
    /// Who acknowledged it.
    pub acked_by: Option<String>,
    /// Unix ms.
    pub resolved_at: Option<i64>,
}

impl AlertRow {
    /// Whether it is still open (firing or acknowledged).
    pub fn is_open(&self) -> bool {
        self.state != AlertState::Resolved.as_str()
    }

    /// The JSON the API, the `alert` events and the webhooks show.
    pub fn to_json(&self) -> Value {
        let ms = |v: Option<i64>| v.map(domain::format_ms);
        json!({
            "id": self.id,
            "rule": self.rule,
            "device": self.device,
            "severity": self.severity,
            "state": self.state,
            "field": self.field,
            "threshold": self.threshold,
            "value": self.value,
            "message": self.message,
            "fired_at": domain::format_ms(self.fired_at),
            "acked_at": ms(self.acked_at),
            "acked_by": self.acked_by,
            "resolved_at": ms(self.resolved_at),
        })
    }
}

/// A new alert to fire.
#[derive(Debug, Clone)]
pub struct NewAlert {
    /// The rule's name.
    pub rule: String,
    /// The device.
    pub device: String,
    /// info, warning or critical.
    pub severity: &'static str,
    /// The payload field the rule watches, if any.
    pub field: Option<String>,
    /// The rule's threshold, for a comparison.
    pub threshold: Option<f64>,
    /// The value that fired it.
    pub value: Option<f64>,
    /// What happened, in words.
    pub message: String,
    /// Unix ms.
    pub at: i64,
    /// The log position the decision was made at: no alert of the rule and device may have
    /// been resolved past it.
    pub seq: i64,
}

/// A change to the alerts, made in one transaction with its `alert` event.
#[derive(Debug, Clone)]
pub enum AlertChange {
    /// Fire, unless the rule already has an open alert for the device.
    Fire(NewAlert),
    /// Resolve the open alert of a rule and device, if there is one.
    Resolve {
        /// The rule's name.
        rule: String,
        /// The device.
        device: String,
        /// Unix ms.
        at: i64,
        /// The log position the decision was made at: the alert must have fired at or
        /// before it.
        seq: i64,
    },
    /// Acknowledge a firing alert.
    Ack {
        /// Alert id.
        id: i64,
        /// Who.
        by: String,
        /// Unix ms.
        at: i64,
    },
}

/// What an [`AlertChange`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertOutcome {
    /// It moved the alert, which now reads so (and its event is in the log).
    Changed(AlertRow),
    /// Nothing moved: the alert as it is (an open one already firing, one already
    /// acknowledged or resolved), or `None` when there is none.
    Unchanged(Option<AlertRow>),
}

/// Columns of an alert row, in the order the decoders read.
pub(crate) const ALERT_COLUMNS: &str = "id, rule, device, severity, state, field, threshold, value, \
     message, fired_at, acked_at, acked_by, resolved_at";
