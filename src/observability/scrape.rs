//! One `GET /metrics` answer: the daemon's registry, then what storage and this instance
//! report at that moment, in the format the scraper asked for.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::Metrics;
use crate::store::Gauges;
use crate::store::health::{FaultKind, Report};

/// The exposition formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0, what `prometheus-client` writes and Prometheus asks for first.
    OpenMetrics,
    /// The Prometheus text format 0.0.4, for everything else (curl, promtool, older agents).
    Text,
}

impl Format {
    /// The format for a request's `Accept` header: OpenMetrics only when it is named.
    pub fn for_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// The response's content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// What is read afresh at each scrape, besides the daemon's own metrics.
#[derive(Debug)]
pub struct Scrape<'a> {
    /// This instance's name (its MQTT client id).
    pub instance: &'a str,
    /// `sqlite` or `postgres`.
    pub backend: &'a str,
    /// The storage writer's state.
    pub writer: &'a Report,
    /// Devices by presence and open alerts, unless storage could not count them.
    pub gauges: Option<&'a Gauges>,
}

impl Metrics {
    /// The whole exposition for one scrape.
    pub fn encode(&self, scrape: &Scrape<'_>, format: Format) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        encode_registry(&mut out, self.registry())?;
        encode_registry(&mut out, &scrape.registry(self))?;
        encode_eof(&mut out)?;
        Ok(match format {
            Format::OpenMetrics => out,
            Format::Text => to_text(&out),
        })
    }
}

impl Scrape<'_> {
    /// A registry of this scrape's values, made for it and dropped after it.
    fn registry(&self, m: &Metrics) -> Registry {
        let mut r = Registry::default();
        let info = Family::<[(&'static str, String); 2], Gauge>::default();
        info.get_or_create(&[
            ("instance", self.instance.to_owned()),
            ("backend", self.backend.to_owned()),
        ])
        .set(1);
        r.register(
            "telebridge_instance_info",
            "This instance: its name (the MQTT client id) and storage backend",
            info,
        );
        if self.backend == "postgres" {
            let seen = m.tail_seen.load(Ordering::Relaxed);
            let head = m.tail_head.load(Ordering::Relaxed).max(seen);
            let gauges = [
                (
                    "telebridge_tail_seen_seq",
                    "The newest event id this instance has read from the shared log and serves live",
                    seen,
                ),
                (
                    "telebridge_tail_head_seq",
                    "The newest event id committed by any instance, as last read",
                    head,
                ),
                (
                    "telebridge_tail_lag_events",
                    "Events committed that this instance has not read yet",
                    head - seen,
                ),
            ];
            for (name, help, v) in gauges {
                r.register(name, help, ConstGauge::new(v));
            }
        }
        self.register_writer(&mut r);
        if let Some(g) = self.gauges {
            register_counts(&mut r, g);
        }
        r
    }

    /// The storage writer's state: one sample per state (1 for the current one), and what
    /// waits for it.
    fn register_writer(&self, r: &mut Registry) {
        let w = self.writer;
        let current = w.fault.as_ref().map(|f| f.kind);
        let state = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        state
            .get_or_create(&[("state", "ok")])
            .set(i64::from(current.is_none()));
        for k in FaultKind::ALL {
            state
                .get_or_create(&[("state", k.label())])
                .set(i64::from(current == Some(k)));
        }
        r.register(
            "telebridge_store_writer_state",
            "The storage writer's state: ok, or the fault that stops its commits",
            state,
        );
        r.register(
            "telebridge_store_oldest_pending_seconds",
            "Age of the oldest reading not yet committed (0 when none waits)",
            ConstGauge::new(w.oldest_age.as_secs_f64()),
        );
        r.register(
            "telebridge_store_pending",
            "Items taken by the writer or queued for it, not yet committed",
            ConstGauge::new(w.waiting as i64),
        );
        r.register(
            "telebridge_store_checkpoint_failing",
            "1 while the WAL checkpoint keeps failing",
            ConstGauge::new(i64::from(w.checkpoint.is_some())),
        );
    }
}

/// What storage counts: devices by presence, open alerts by severity. Counted in storage at
/// each scrape, so every instance of a cluster agrees.
fn register_counts(r: &mut Registry, g: &Gauges) {
    r.register(
        "telebridge_devices_known",
        "Devices ever seen",
        ConstGauge::new(g.devices),
    );
    let presence = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    for (state, n) in [
        ("online", g.online - g.stale),
        ("stale", g.stale),
        ("offline", g.devices - g.online),
    ] {
        presence.get_or_create(&[("presence", state)]).set(n);
    }
    r.register("telebridge_devices", "Devices by presence", presence);
    let open = Family::<[(&'static str, &'static str); 1], Gauge>::default();
    for severity in ["info", "warning", "critical"] {
        let n = g
            .open_alerts
            .iter()
            .find(|(s, _)| s == severity)
            .map_or(0, |(_, n)| *n);
        open.get_or_create(&[("severity", severity)]).set(n);
    }
    r.register(
        "telebridge_alerts_open",
        "Open (firing or acknowledged) alerts by severity",
        open,
    );
}

/// OpenMetrics text as the Prometheus 0.0.4 text format: a counter family is named there
/// by its sample (`x_total`), not by its family name (`x`), and there is no `# EOF`.
/// `prometheus-client` writes only OpenMetrics (client_rust#51); this is the whole
/// difference for the metric types we use (no units, info metrics or exemplars).
fn to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len() + 1024);
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" {
            continue;
        }
        // A family's HELP comes just before its TYPE: both get the counter's sample name.
        let counter = match line.strip_prefix("# HELP ") {
            Some(rest) => {
                let name = rest.split(' ').next().unwrap_or_default();
                lines
                    .peek()
                    .is_some_and(|next| *next == format!("# TYPE {name} counter"))
            }
            None => line.starts_with("# TYPE ") && line.ends_with(" counter"),
        };
        match (
            counter,
            line.strip_prefix("# ").and_then(|l| l.split_once(' ')),
        ) {
            (true, Some((keyword, rest))) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(&format!("# {keyword} {name}_total {tail}\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format_names_counters_by_their_sample_and_has_no_eof() {
        let om = "# HELP a_x Xs seen.\n# TYPE a_x counter\na_x_total 1\n# HELP b_y Ys.\n# TYPE b_y gauge\nb_y 2\n# EOF\n";
        assert_eq!(
            to_text(om),
            "# HELP a_x_total Xs seen.\n# TYPE a_x_total counter\na_x_total 1\n# HELP b_y Ys.\n# TYPE b_y gauge\nb_y 2\n"
        );
    }

    #[test]
    fn prometheus_gets_openmetrics_and_everyone_else_the_text_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::for_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::for_accept(Some("*/*")), Format::Text);
        assert_eq!(Format::for_accept(None), Format::Text);
    }

    #[test]
    fn every_metric_is_encoded_once_and_ends_with_eof() {
        let m = Metrics::default();
        m.command_rtt.observe(0.02);
        let writer = Report {
            ok: true,
            text: "ok".into(),
            fault: None,
            checkpoint: None,
            waiting: 0,
            oldest_age: std::time::Duration::ZERO,
            failures: 0,
        };
        let gauges = Gauges {
            devices: 3,
            online: 2,
            stale: 1,
            open_alerts: vec![],
        };
        let scrape = Scrape {
            instance: "tb \"1\"",
            backend: "postgres",
            writer: &writer,
            gauges: Some(&gauges),
        };
        let om = m.encode(&scrape, Format::OpenMetrics).expect("encode");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let mut families: Vec<&str> = om
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let n = families.len();
        families.sort_unstable();
        families.dedup();
        assert_eq!(families.len(), n, "a family name twice:\n{om}");
        assert!(
            om.contains("telebridge_devices{presence=\"stale\"} 1\n"),
            "{om}"
        );
        assert!(om.contains("telebridge_tail_lag_events 0\n"), "{om}");
        assert!(om.contains("instance=\"tb \\\"1\\\"\""), "escaped: {om}");
        let text = m.encode(&scrape, Format::Text).expect("encode");
        assert!(
            text.contains("# TYPE telebridge_messages_received_total counter\ntelebridge_messages_received_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("telebridge_command_rtt_seconds_count 1\n"),
            "{text}"
        );
    }
}
