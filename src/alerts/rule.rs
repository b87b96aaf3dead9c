//! Alert rule conditions, as written in `[[alerts.rules]]`: `temperature > 80`, `offline`,
//! `no reading`, `missing humidity`. Parsed once, when the config is loaded.

use std::fmt;

use serde_json::Value;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    /// Longest first, so `>=` is not read as `>`.
    const ALL: [(&'static str, Op); 6] = [
        (">=", Op::Ge),
        ("<=", Op::Le),
        ("==", Op::Eq),
        ("!=", Op::Ne),
        (">", Op::Gt),
        ("<", Op::Lt),
    ];

    /// Whether `a op b`.
    pub fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }

    fn as_str(self) -> &'static str {
        Op::ALL
            .iter()
            .find(|(_, o)| *o == self)
            .map_or("?", |(s, _)| s)
    }
}

/// What a rule watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// A numeric payload field compared with a value.
    Compare {
        /// Top-level name, or a dotted path into nested objects.
        field: String,
        /// The comparison.
        op: Op,
        /// The value compared with.
        value: f64,
    },
    /// The device is offline (last will, a retained `offline`, or the presence timeout).
    Offline,
    /// No reading from the device (for the rule's `for`).
    NoReading,
    /// Readings without this numeric field (for the rule's `for`).
    Missing {
        /// Top-level name or dotted path.
        field: String,
    },
}

/// The forms a condition may take, for error messages.
pub const FORMS: &str =
    "\"FIELD > NUMBER\" (or >=, <, <=, ==, !=), \"offline\", \"no reading\" or \"missing FIELD\"";

impl Condition {
    /// Parses a condition; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Condition, String> {
        let t = s.trim();
        match t {
            "offline" => return Ok(Condition::Offline),
            "no reading" | "no readings" => return Ok(Condition::NoReading),
            _ => {}
        }
        if let Some(field) = t.strip_prefix("missing ") {
            let field = field.trim();
            check_field(field)?;
            return Ok(Condition::Missing {
                field: field.to_owned(),
            });
        }
        let Some((at, op_str, op)) = Op::ALL
            .iter()
            .filter_map(|(o, op)| t.find(o).map(|at| (at, *o, *op)))
            .min_by_key(|(at, o, _)| (*at, std::cmp::Reverse(o.len())))
        else {
            return Err(format!("{s:?} is not a condition: write {FORMS}"));
        };
        let field = t[..at].trim();
        let number = t[at + op_str.len()..].trim();
        check_field(field)?;
        let value = number
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("{number:?} in {s:?} is not a number"))?;
        Ok(Condition::Compare {
            field: field.to_owned(),
            op,
            value,
        })
    }

    /// The payload field it reads, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Condition::Compare { field, .. } | Condition::Missing { field } => Some(field),
            Condition::Offline | Condition::NoReading => None,
        }
    }

    /// For a comparison, whether it holds for the field's value `v`.
    pub fn holds(&self, v: f64) -> Option<bool> {
        match self {
            Condition::Compare { op, value, .. } => Some(op.holds(v, *value)),
            _ => None,
        }
    }

    /// Whether it is timed: it holds once something has been absent for the rule's `for`.
    pub fn is_absence(&self) -> bool {
        matches!(self, Condition::NoReading | Condition::Missing { .. })
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Compare { field, op, value } => {
                write!(f, "{field} {} {value}", op.as_str())
            }
            Condition::Offline => f.write_str("offline"),
            Condition::NoReading => f.write_str("no reading"),
            Condition::Missing { field } => write!(f, "missing {field}"),
        }
    }
}

/// A field of a payload, by top-level name or dotted path.
pub fn field<'a>(payload: &'a Value, name: &str) -> Option<&'a Value> {
    payload
        .get(name)
        .or_else(|| name.split('.').try_fold(payload, |v, part| v.get(part)))
}

/// A numeric field of a payload, by top-level name or dotted path.
pub fn lookup(payload: &Value, name: &str) -> Option<f64> {
    field(payload, name)?.as_f64()
}

fn check_field(field: &str) -> Result<(), String> {
    let ok = !field.is_empty()
        && field.len() <= 128
        && field
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field:?} is not a field name: use letters, digits, _ and -, with dots for nested fields"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse() {
        assert_eq!(
            Condition::parse("temperature >= 80.5").unwrap(),
            Condition::Compare {
                field: "temperature".into(),
                op: Op::Ge,
                value: 80.5
            }
        );
        assert_eq!(
            Condition::parse(" env.t<-3").unwrap(),
            Condition::Compare {
                field: "env.t".into(),
                op: Op::Lt,
                value: -3.0
            }
        );
        assert_eq!(Condition::parse("offline").unwrap(), Condition::Offline);
        assert_eq!(
            Condition::parse("no reading").unwrap(),
            Condition::NoReading
        );
        assert_eq!(
            Condition::parse("missing humidity").unwrap(),
            Condition::Missing {
                field: "humidity".into()
            }
        );
        for bad in [
            "",
            "temperature",
            "temperature > hot",
            "> 3",
            "a b > 3",
            "t > inf",
        ] {
            assert!(Condition::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
