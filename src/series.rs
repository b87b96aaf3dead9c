//! Aggregated history: the buckets of `GET /api/devices/{id}/series`. A request's step is
//! answered from the coarsest stored tier that divides it (1 hour, 1 minute), else from the
//! raw readings, with the same arithmetic ([`Stats::merge`] in seq order) either way, so the
//! answer does not depend on where it came from. Buckets are aligned to multiples of the
//! step since the Unix epoch and whole: a bucket that overlaps the range holds all its
//! readings.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::config::{Config, UnitEntry};
use crate::store::rollup::{self, Stats, TIERS};
use crate::store::{Page, Store, StoreError};

/// Most buckets one answer holds.
pub const MAX_POINTS: i64 = 10_000;
/// Most raw readings one answer is computed from; a longer range needs a step that a
/// stored tier divides.
pub const MAX_RAW_READINGS: i64 = 200_000;
/// Most fields one request names.
pub const MAX_FIELDS: usize = 20;
/// About how many points `step=auto` aims at, at most.
const AUTO_POINTS: i64 = 1_000;
/// Steps `step=auto` chooses from, in ms.
const NICE_STEPS: [i64; 22] = [
    1_000,
    2_000,
    5_000,
    10_000,
    15_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    900_000,
    1_800_000,
    3_600_000,
    7_200_000,
    10_800_000,
    21_600_000,
    43_200_000,
    86_400_000,
    172_800_000,
    604_800_000,
    1_209_600_000,
    2_592_000_000,
];

/// An aggregate a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    /// The mean.
    Avg,
    /// The smallest value.
    Min,
    /// The largest value.
    Max,
    /// The value of the earliest device time.
    First,
    /// The value of the latest device time.
    Last,
    /// How many values.
    Count,
}

impl Agg {
    /// Every aggregate, in the order the API lists them.
    pub const ALL: [Agg; 6] = [
        Agg::Avg,
        Agg::Min,
        Agg::Max,
        Agg::First,
        Agg::Last,
        Agg::Count,
    ];

    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Agg::Avg => "avg",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::First => "first",
            Agg::Last => "last",
            Agg::Count => "count",
        }
    }

    /// The aggregate named `s`.
    pub fn parse(s: &str) -> Option<Agg> {
        Agg::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Its value for one bucket.
    pub fn of(self, s: &Stats) -> serde_json::Value {
        match self {
            Agg::Avg => serde_json::json!(s.avg()),
            Agg::Min => serde_json::json!(s.min),
            Agg::Max => serde_json::json!(s.max),
            Agg::First => serde_json::json!(s.first),
            Agg::Last => serde_json::json!(s.last),
            Agg::Count => serde_json::json!(s.count),
        }
    }
}

/// The bucket width asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Chosen for about 300–1,000 points.
    Auto,
    /// This many ms.
    Fixed(i64),
}

impl Step {
    /// `auto`, or a whole number of seconds, minutes, hours or days: `10s`, `5m`, `1h`, `1d`.
    pub fn parse(s: &str) -> Result<Step, String> {
        if s == "auto" {
            return Ok(Step::Auto);
        }
        let unit = |u: &str| match u {
            "s" => Some(1_000),
            "m" => Some(60_000),
            "h" => Some(3_600_000),
            "d" => Some(86_400_000),
            _ => None,
        };
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, u) = s.split_at(split);
        match (n.parse::<i64>(), unit(u)) {
            (Ok(n), Some(u))
                if n >= 1 && n.checked_mul(u).is_some_and(|ms| ms <= 366 * 86_400_000) =>
            {
                Ok(Step::Fixed(n * u))
            }
            _ => Err(format!(
                "{s:?} is not a step; use auto, or a whole number of s, m, h or d from 1s to 366d (10s, 1m, 1h, 1d)"
            )),
        }
    }
}

/// Writes a step in the largest unit that divides it: `90s`, `2m`, `1d`.
pub fn format_step(ms: i64) -> String {
    for (unit, width) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms % width == 0 {
            return format!("{}{unit}", ms / width);
        }
    }
    format!("{ms}ms")
}

/// A series request, validated.
#[derive(Debug, Clone)]
pub struct Query {
    /// Device id.
    pub device: String,
    /// Fields asked for; `None`: every numeric field in the range.
    pub fields: Option<Vec<String>>,
    /// Range start, Unix ms.
    pub from: i64,
    /// Range end, Unix ms (inclusive).
    pub to: i64,
    /// The bucket width.
    pub step: Step,
    /// The aggregates.
    pub aggs: Vec<Agg>,
}

/// How long each tier keeps its data; `None`: forever.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Raw readings.
    pub raw: Duration,
    /// The 1-minute tier.
    pub minute: Option<Duration>,
    /// The 1-hour tier.
    pub hour: Option<Duration>,
    /// `[units]`.
    pub units: Units,
}

impl Settings {
    /// From the config.
    pub fn of(c: &Config) -> Settings {
        Settings {
            raw: c.storage.retention,
            minute: c.storage.retention_1m,
            hour: c.storage.retention_1h,
            units: Units::of(&c.units),
        }
    }
}

/// Where a field's unit comes from, most specific first: the reading's own `units` object,
/// the `[units]` table of the most specific device glob that matches, `[units]`, then what
/// the field's name implies.
#[derive(Debug, Clone, Default)]
pub struct Units {
    fields: BTreeMap<String, String>,
    /// Longest glob first: `truck-7*` before `truck-*` before `*`.
    devices: Vec<(String, BTreeMap<String, String>)>,
}

impl Units {
    /// From the config's `[units]`.
    pub fn of(config: &BTreeMap<String, UnitEntry>) -> Units {
        let mut units = Units::default();
        for (key, entry) in config {
            match entry {
                UnitEntry::Field(unit) => {
                    units.fields.insert(key.clone(), unit.clone());
                }
                UnitEntry::Devices(fields) => units.devices.push((key.clone(), fields.clone())),
            }
        }
        units
            .devices
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        units
    }

    /// The unit of `field` for `device` (none: the fleet-wide answer), given the payload
    /// of its latest reading if known.
    pub fn unit(
        &self,
        device: Option<&str>,
        field: &str,
        payload: Option<&serde_json::Value>,
    ) -> Option<String> {
        if let Some(u) = payload
            .and_then(|p| p.get(PAYLOAD_UNITS))
            .and_then(|u| u.get(field))
            .and_then(serde_json::Value::as_str)
            .filter(|u| !u.is_empty() && u.chars().count() <= 32)
        {
            return Some(u.to_owned());
        }
        let by_device = device.and_then(|d| {
            self.devices
                .iter()
                .filter(|(glob, _)| crate::auth::glob_match(glob, d))
                .find_map(|(_, fields)| fields.get(field))
        });
        by_device
            .or_else(|| self.fields.get(field))
            .cloned()
            .or_else(|| unit_of_name(field).map(str::to_owned))
    }

    /// Units of the numeric fields of a device's reading.
    pub fn of_reading(&self, device: &str, payload: &[u8]) -> BTreeMap<String, String> {
        let Ok(payload) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return BTreeMap::new();
        };
        rollup::numeric_fields_in(&payload)
            .into_iter()
            .filter_map(|(f, _)| self.unit(Some(device), &f, Some(&payload)).map(|u| (f, u)))
            .collect()
    }

    /// Units of the fields that have one.
    pub fn of_fields<'a>(
        &self,
        device: Option<&str>,
        fields: impl IntoIterator<Item = &'a String>,
        payload: Option<&serde_json::Value>,
    ) -> BTreeMap<String, String> {
        fields
            .into_iter()
            .filter_map(|f| self.unit(device, f, payload).map(|u| (f.clone(), u)))
            .collect()
    }
}

/// The payload key a device may use to name its fields' units:
/// `{"temperature": 21.5, "units": {"temperature": "°C"}}`.
pub const PAYLOAD_UNITS: &str = "units";

/// The unit a field's name implies: its suffix (`_c`, `_pct`, ...) or a well-known name.
pub fn unit_of_name(field: &str) -> Option<&'static str> {
    let name = field
        .rsplit('.')
        .next()
        .unwrap_or(field)
        .to_ascii_lowercase();
    const SUFFIXES: [(&str, &str); 30] = [
        ("_celsius", "°C"),
        ("_c", "°C"),
        ("_f", "°F"),
        ("_pct", "%"),
        ("_percent", "%"),
        ("_mv", "mV"),
        ("_v", "V"),
        ("_ma", "mA"),
        ("_a", "A"),
        ("_kwh", "kWh"),
        ("_wh", "Wh"),
        ("_kw", "kW"),
        ("_w", "W"),
        ("_hpa", "hPa"),
        ("_pa", "Pa"),
        ("_ppm", "ppm"),
        ("_lux", "lx"),
        ("_dbm", "dBm"),
        ("_db", "dB"),
        ("_kmh", "km/h"),
        ("_km", "km"),
        ("_mm", "mm"),
        ("_m", "m"),
        ("_ms", "ms"),
        ("_s", "s"),
        ("_deg", "°"),
        ("_hz", "Hz"),
        ("_rpm", "rpm"),
        ("_volts", "V"),
        ("_amps", "A"),
    ];
    const NAMES: [(&str, &str); 6] = [
        ("temperature", "°C"),
        ("temp", "°C"),
        ("humidity", "%"),
        ("battery", "%"),
        ("rssi", "dBm"),
        ("pressure", "hPa"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .or_else(|| {
            SUFFIXES
                .iter()
                .find(|(s, _)| name.ends_with(s) && name.len() > s.len())
        })
        .map(|(_, u)| *u)
}

/// Where an answer's buckets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The raw readings.
    Raw,
    /// A stored tier of this width (ms).
    Tier(i64),
}

impl Source {
    /// `raw`, `1m` or `1h`.
    pub fn name(self) -> String {
        match self {
            Source::Raw => "raw".into(),
            Source::Tier(w) => format_step(w),
        }
    }
}

/// A request laid out: the step, where the buckets come from, and the bucket range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Bucket width, ms.
    pub step: i64,
    /// Where they come from.
    pub source: Source,
    /// First bucket start.
    pub lo: i64,
    /// End of the last bucket (exclusive).
    pub hi: i64,
    /// Raw readings before this time may be gone (retention), Unix ms.
    pub raw_since: i64,
}

/// Lays a request out at time `now`. Err: the request is too large, with the reason.
pub fn plan(q: &Query, s: &Settings, now: i64) -> Result<Plan, String> {
    let keep = |d: Option<Duration>| d.map_or(i64::MIN, |d| now - d.as_millis() as i64);
    let raw_since = now - s.raw.as_millis() as i64;
    let span = q.to - q.from + 1;
    let step = match q.step {
        Step::Fixed(ms) => ms,
        Step::Auto => {
            let mut step = NICE_STEPS
                .into_iter()
                .find(|st| span / st <= AUTO_POINTS)
                .unwrap_or(NICE_STEPS[NICE_STEPS.len() - 1]);
            // Where raw readings (or the 1-minute tier) are gone, the next tier up answers.
            if q.from < raw_since && step < TIERS[0] {
                step = TIERS[0];
            }
            if q.from < keep(s.minute) && step < TIERS[1] {
                step = TIERS[1];
            }
            step
        }
    };
    let lo = rollup::bucket_of(q.from, step);
    let hi = rollup::bucket_of(q.to, step) + step;
    let points = (hi - lo) / step;
    if points > MAX_POINTS {
        return Err(format!(
            "{points} buckets of {} is more than {MAX_POINTS}; use a larger step or a shorter range",
            format_step(step)
        ));
    }
    let source = TIERS
        .iter()
        .rev()
        .find(|t| step % **t == 0)
        .map_or(Source::Raw, |t| Source::Tier(*t));
    Ok(Plan {
        step,
        source,
        lo,
        hi,
        raw_since,
    })
}

/// Why a series could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The range holds more raw readings than one answer is computed from.
    #[error(
        "the range holds {0} raw readings at this step (at most {MAX_RAW_READINGS}); use a step of 1m or more, which stored rollups answer"
    )]
    TooManyRaw(i64),
}

/// One answer: per bucket start, per field, the aggregates; and the fields found.
#[derive(Debug, Default)]
pub struct Buckets {
    /// bucket start -> field -> stats.
    pub points: BTreeMap<i64, BTreeMap<String, Stats>>,
    /// Every field in the answer.
    pub fields: BTreeSet<String>,
}

impl Buckets {
    fn add(&mut self, bucket: i64, field: &str, s: &Stats) {
        let fields = self.points.entry(bucket).or_default();
        match fields.get_mut(field) {
            Some(have) => have.merge(s),
            None => {
                fields.insert(field.to_owned(), *s);
                self.fields.insert(field.to_owned());
            }
        }
    }
}

/// Computes the buckets of a planned request.
pub async fn compute(store: &Store, q: &Query, p: &Plan) -> Result<Buckets, SeriesError> {
    let mut out = Buckets::default();
    match p.source {
        Source::Tier(tier) => {
            let rows = store
                .rollups(&q.device, tier, p.step, p.lo, p.hi, q.fields.as_deref())
                .await?;
            for r in rows {
                out.add(rollup::bucket_of(r.bucket, p.step), &r.field, &r.stats);
            }
        }
        Source::Raw => {
            // Counted first from the 1-minute tier's all-readings rows, so that a range too
            // large is refused before it is read.
            let all = [rollup::ALL.to_owned()];
            let minute = rollup::bucket_span(Some(p.lo), Some(p.hi - 1), TIERS[0]);
            let (from, to) = (minute.0, minute.1 + TIERS[0]);
            // One step over the whole span: storage sums it into one row.
            let count: i64 = store
                .rollups(&q.device, TIERS[0], to - from, from, to, Some(&all))
                .await?
                .iter()
                .map(|r| r.stats.count)
                .sum();
            if count > MAX_RAW_READINGS {
                return Err(SeriesError::TooManyRaw(count));
            }
            let mut page = Page {
                device: q.device.clone(),
                after: 0,
                from: Some(p.lo),
                to: Some(p.hi - 1),
                limit: 10_000,
                before: None,
                newest_first: false,
            };
            loop {
                let rows = store.history(&page).await?;
                for r in &rows {
                    if r.flags & crate::domain::flags::RAW != 0 {
                        continue;
                    }
                    let bucket = rollup::bucket_of(r.ts, p.step);
                    match &q.fields {
                        Some(fields) => {
                            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.payload)
                            else {
                                continue;
                            };
                            for f in fields {
                                if let Some(x) = rollup::field_value(&v, f) {
                                    out.add(bucket, f, &Stats::one(x, r.ts));
                                }
                            }
                        }
                        None => {
                            for (f, x) in rollup::numeric_fields(&r.payload) {
                                out.add(bucket, &f, &Stats::one(x, r.ts));
                            }
                        }
                    }
                }
                match rows.last() {
                    Some(last) if rows.len() as i64 == page.limit => page.after = last.seq,
                    _ => break,
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            raw: Duration::from_secs(30 * 86_400),
            minute: Some(Duration::from_secs(365 * 86_400)),
            hour: None,
            units: Units::default(),
        }
    }

    fn query(from: i64, to: i64, step: Step) -> Query {
        Query {
            device: "d".into(),
            fields: None,
            from,
            to,
            step,
            aggs: vec![Agg::Avg],
        }
    }

    const NOW: i64 = 1_800_000_000_000;
    const H: i64 = 3_600_000;

    #[test]
    fn steps_parse_and_print() {
        assert_eq!(Step::parse("auto"), Ok(Step::Auto));
        assert_eq!(Step::parse("10s"), Ok(Step::Fixed(10_000)));
        assert_eq!(Step::parse("1d"), Ok(Step::Fixed(86_400_000)));
        for bad in ["", "0s", "1", "1w", "-1m", "1.5h", "400d", "m"] {
            assert!(Step::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(format_step(90_000), "90s");
        assert_eq!(format_step(120_000), "2m");
        assert_eq!(format_step(86_400_000), "1d");
    }

    #[test]
    fn auto_picks_the_coarsest_tier_that_still_gives_enough_points() {
        let s = settings();
        let p = plan(&query(NOW - 24 * H, NOW, Step::Auto), &s, NOW).unwrap();
        assert_eq!((p.step, p.source), (120_000, Source::Tier(60_000)));
        let points = (p.hi - p.lo) / p.step;
        assert!((300..=1_001).contains(&points), "{points}");
        let p = plan(&query(NOW - 30 * 24 * H, NOW, Step::Auto), &s, NOW).unwrap();
        assert_eq!((p.step, p.source), (H, Source::Tier(H)));
        let p = plan(&query(NOW - H, NOW, Step::Auto), &s, NOW).unwrap();
        assert_eq!(p.source, Source::Raw);
        // An hour from two months ago: raw readings are gone, the 1-minute tier answers.
        let old = NOW - 60 * 24 * H;
        let p = plan(&query(old, old + H, Step::Auto), &s, NOW).unwrap();
        assert_eq!((p.step, p.source), (60_000, Source::Tier(60_000)));
    }

    #[test]
    fn fixed_steps_use_the_tier_that_divides_them() {
        let s = settings();
        let at = |step| {
            plan(&query(NOW - H, NOW, Step::Fixed(step)), &s, NOW)
                .unwrap()
                .source
        };
        assert_eq!(at(10_000), Source::Raw);
        assert_eq!(at(90_000), Source::Raw);
        assert_eq!(at(300_000), Source::Tier(60_000));
        assert_eq!(at(86_400_000), Source::Tier(H));
        assert!(plan(&query(0, NOW, Step::Fixed(1_000)), &s, NOW).is_err());
    }

    #[test]
    fn units_come_from_the_payload_then_device_globs_then_config_then_names() {
        let config = BTreeMap::from([
            ("temperature".to_owned(), UnitEntry::Field("°F".into())),
            (
                "truck-*".to_owned(),
                UnitEntry::Devices([("speed".into(), "mph".into())].into()),
            ),
            (
                "truck-eu-*".to_owned(),
                UnitEntry::Devices([("speed".into(), "km/h".into())].into()),
            ),
        ]);
        let u = Units::of(&config);
        let unit = |d: Option<&str>, f: &str| u.unit(d, f, None);
        assert_eq!(unit(None, "temperature").as_deref(), Some("°F"));
        assert_eq!(unit(None, "engine.oil_c").as_deref(), Some("°C"));
        assert_eq!(unit(None, "humidity").as_deref(), Some("%"));
        assert_eq!(unit(None, "load_pct").as_deref(), Some("%"));
        assert_eq!(unit(None, "count"), None);
        assert_eq!(unit(None, "_c"), None);
        assert_eq!(unit(None, "speed"), None);
        assert_eq!(unit(Some("truck-1"), "speed").as_deref(), Some("mph"));
        assert_eq!(unit(Some("truck-eu-1"), "speed").as_deref(), Some("km/h"));
        assert_eq!(unit(Some("truck-1"), "temperature").as_deref(), Some("°F"));
        let payload = serde_json::json!({"speed": 3, "env": {"t": 1}, "units": {"speed": "kn", "env.t": "K"}});
        assert_eq!(
            u.unit(Some("truck-1"), "speed", Some(&payload)).as_deref(),
            Some("kn")
        );
        assert_eq!(u.unit(None, "env.t", Some(&payload)).as_deref(), Some("K"));
    }
}
