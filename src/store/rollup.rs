//! Stored rollups: per device, numeric field and time bucket of device time, the count,
//! sum, minimum, maximum, first and last value, in two tiers (1 minute and 1 hour). The
//! writer computes a batch's rollup rows here and both backends merge them into the
//! `rollups` table in the transaction that stores the readings, so the two never disagree.
//!
//! Every reading also counts in a row of the empty field `""`, numeric fields or not: its
//! count, and the range of seqs in the bucket, which finds a device's readings of a time
//! range through the index on (device or source, seq), without an index on time.

use std::sync::Arc;

use serde_json::Value;

use crate::ingest::Reading;

/// Bucket widths of the stored tiers, in ms: 1 minute and 1 hour.
pub const TIERS: [i64; 2] = [60_000, 3_600_000];

/// The field of the row every reading counts in.
pub const ALL: &str = "";

/// Most numeric fields taken from one payload; the rest are not rolled up.
pub const MAX_FIELDS: usize = 64;
/// How deep nested objects are followed for dotted names.
const MAX_DEPTH: usize = 4;
/// Longest field name (dotted path) rolled up.
pub const MAX_FIELD_LEN: usize = 128;

/// Aggregates of one bucket. `first` is the value with the smallest device time (the
/// earliest stored on a tie), `last` the one with the largest (the latest stored on a tie).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Values.
    pub count: i64,
    /// Their sum.
    pub sum: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// The value of the earliest device time.
    pub first: f64,
    /// That time (Unix ms).
    pub first_ts: i64,
    /// The value of the latest device time.
    pub last: f64,
    /// That time (Unix ms).
    pub last_ts: i64,
}

impl Stats {
    /// One value at device time `ts`.
    pub fn one(v: f64, ts: i64) -> Stats {
        Stats {
            count: 1,
            sum: v,
            min: v,
            max: v,
            first: v,
            first_ts: ts,
            last: v,
            last_ts: ts,
        }
    }

    /// Adds `other`, which was stored after `self` (so it wins ties for `last` only).
    pub fn merge(&mut self, other: &Stats) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.first_ts < self.first_ts {
            self.first = other.first;
            self.first_ts = other.first_ts;
        }
        if other.last_ts >= self.last_ts {
            self.last = other.last;
            self.last_ts = other.last_ts;
        }
    }

    /// The mean.
    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// One stored rollup row.
#[derive(Debug, Clone, PartialEq)]
pub struct RollupRow {
    /// Device id.
    pub device: Arc<str>,
    /// Bucket width, ms (one of [`TIERS`]).
    pub tier: i64,
    /// Bucket start, Unix ms.
    pub bucket: i64,
    /// Dotted field name, or [`ALL`].
    pub field: String,
    /// The aggregates (for [`ALL`]: count, and first/last device time; values are 0).
    pub stats: Stats,
    /// Smallest and largest seq in the bucket (kept for [`ALL`] only).
    pub seqs: Option<(i64, i64)>,
}

/// Start of the bucket of width `width` holding `ts`.
pub fn bucket_of(ts: i64, width: i64) -> i64 {
    ts.div_euclid(width) * width
}

/// The first and last bucket start of width `width` that device times within [from, to]
/// fall in (open ends stay open).
pub fn bucket_span(from: Option<i64>, to: Option<i64>, width: i64) -> (i64, i64) {
    (
        from.map_or(i64::MIN, |f| bucket_of(f, width)),
        to.map_or(i64::MAX, |t| bucket_of(t, width)),
    )
}

/// The stored buckets that cover device times within [from, to] (open ends stay open), as
/// (tier, first bucket, last bucket): minutes at the partial hours of the ends, whole hours
/// between. Every reading of the range is in one of them, and reading them costs at most
/// 120 minute rows plus one row per hour.
pub fn covering(from: Option<i64>, to: Option<i64>) -> Vec<(i64, i64, i64)> {
    let [m, h] = TIERS;
    let hour_of = |t: Option<i64>| t.map(|t| bucket_of(t, h));
    let (first_hour, last_hour) = (hour_of(from), hour_of(to));
    if let (Some(f), Some(t)) = (from, to)
        && first_hour == last_hour
    {
        return vec![(m, bucket_of(f, m), bucket_of(t, m))];
    }
    let mut out = Vec::new();
    if let (Some(f), Some(fh)) = (from, first_hour) {
        out.push((m, bucket_of(f, m), fh + h - m));
    }
    let (mid_lo, mid_hi) = (
        first_hour.map_or(i64::MIN, |fh| fh + h),
        last_hour.map_or(i64::MAX, |lh| lh - h),
    );
    if mid_lo <= mid_hi {
        out.push((h, mid_lo, mid_hi));
    }
    if let (Some(t), Some(lh)) = (to, last_hour) {
        out.push((m, lh, bucket_of(t, m)));
    }
    out
}

/// The numeric fields of a JSON object payload: top-level names and nested ones by dotted
/// path (`a.b`), numbers only, without the top-level `ts` (the reading's time). At most
/// [`MAX_FIELDS`], by name.
pub fn numeric_fields(payload: &[u8]) -> Vec<(String, f64)> {
    serde_json::from_slice::<Value>(payload)
        .map(|v| numeric_fields_in(&v))
        .unwrap_or_default()
}

/// [`numeric_fields`] of a payload already parsed.
pub fn numeric_fields_in(payload: &Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    if let Value::Object(map) = payload {
        for (k, v) in map {
            if k != "ts" {
                collect(k.clone(), v, 1, &mut out);
            }
        }
    }
    out
}

fn collect(name: String, v: &Value, depth: usize, out: &mut Vec<(String, f64)>) {
    if out.len() >= MAX_FIELDS || name.len() > MAX_FIELD_LEN || name.is_empty() {
        return;
    }
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                out.push((name, f));
            }
        }
        Value::Object(map) if depth < MAX_DEPTH => {
            for (k, v) in map {
                collect(format!("{name}.{k}"), v, depth + 1, out);
            }
        }
        _ => {}
    }
}

/// One field's value in a payload by dotted path, when it is a finite number.
pub fn field_value(payload: &Value, path: &str) -> Option<f64> {
    let mut v = payload;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    v.as_f64().filter(|f| f.is_finite())
}

type Key = (Arc<str>, i64, i64, String);

/// A reading as rollups see it.
pub struct Sample<'a> {
    /// Device id.
    pub device: Arc<str>,
    /// Device time, Unix ms.
    pub ts: i64,
    /// The payload as sent.
    pub payload: &'a [u8],
    /// `domain::flags` bits.
    pub flags: i64,
    /// Its seq.
    pub seq: i64,
}

/// The rollup rows of a batch of new readings, each with its seq (in seq order).
pub fn of_batch(readings: &[(&Reading, i64)]) -> Vec<RollupRow> {
    of_samples(readings.iter().map(|(r, seq)| Sample {
        device: r.device.shared(),
        ts: r.ts,
        payload: &r.payload,
        flags: r.flags,
        seq: *seq,
    }))
}

/// The rollup rows of stored readings, in seq order (the backfill of older databases).
pub fn of_stored(readings: &[super::StoredReading]) -> Vec<RollupRow> {
    of_samples(readings.iter().map(|r| Sample {
        device: Arc::from(r.device.as_str()),
        ts: r.ts,
        payload: &r.payload,
        flags: r.flags,
        seq: r.seq,
    }))
}

/// The rollup rows of readings in seq order: one row per (device, tier, bucket, field),
/// ready to be merged into what is stored.
pub fn of_samples<'a>(readings: impl IntoIterator<Item = Sample<'a>>) -> Vec<RollupRow> {
    // foldhash: a batch makes a key per reading, tier and field (see store::dedupe).
    let mut rows: foldhash::HashMap<Key, (Stats, Option<(i64, i64)>)> =
        foldhash::HashMap::default();
    let mut add = |key: Key, stats: Stats, seq: Option<i64>| {
        rows.entry(key)
            .and_modify(|(s, seqs)| {
                s.merge(&stats);
                if let (Some((lo, hi)), Some(q)) = (seqs.as_mut(), seq) {
                    *lo = (*lo).min(q);
                    *hi = (*hi).max(q);
                }
            })
            .or_insert((stats, seq.map(|q| (q, q))));
    };
    for r in readings {
        let fields = if r.flags & crate::domain::flags::RAW == 0 {
            numeric_fields(r.payload)
        } else {
            Vec::new()
        };
        let (device, seq) = (r.device, &r.seq);
        for tier in TIERS {
            let bucket = bucket_of(r.ts, tier);
            add(
                (device.clone(), tier, bucket, ALL.to_owned()),
                Stats::one(0.0, r.ts),
                Some(*seq),
            );
            for (name, v) in &fields {
                add(
                    (device.clone(), tier, bucket, name.clone()),
                    Stats::one(*v, r.ts),
                    None,
                );
            }
        }
    }
    let mut out: Vec<RollupRow> = rows
        .into_iter()
        .map(|((device, tier, bucket, field), (stats, seqs))| RollupRow {
            device,
            tier,
            bucket,
            field,
            stats,
            seqs,
        })
        .collect();
    // One order for every writer, so two instances' upserts never lock rows crosswise.
    out.sort_unstable_by(|a, b| {
        (&*a.device, a.tier, a.bucket, &a.field).cmp(&(&*b.device, b.tier, b.bucket, &b.field))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields_follow_dotted_paths_and_skip_the_rest() {
        let f = numeric_fields(
            br#"{"ts":5,"t":21.5,"on":true,"s":"x","n":{"a":1,"b":{"c":-2}},"arr":[1]}"#,
        );
        assert_eq!(
            f,
            vec![
                ("n.a".to_owned(), 1.0),
                ("n.b.c".to_owned(), -2.0),
                ("t".to_owned(), 21.5)
            ]
        );
        assert!(numeric_fields(b"[1,2]").is_empty());
        assert!(numeric_fields(b"nope").is_empty());
    }

    #[test]
    fn merging_keeps_first_and_last_by_device_time() {
        let mut s = Stats::one(5.0, 100);
        s.merge(&Stats::one(1.0, 50)); // late: becomes first
        s.merge(&Stats::one(9.0, 200));
        s.merge(&Stats::one(7.0, 200)); // tie: the later stored is last
        s.merge(&Stats::one(3.0, 50)); // tie: the earlier stored stays first
        assert_eq!(s.count, 5);
        assert_eq!(s.sum, 25.0);
        assert_eq!((s.min, s.max), (1.0, 9.0));
        assert_eq!((s.first, s.first_ts), (1.0, 50));
        assert_eq!((s.last, s.last_ts), (7.0, 200));
        assert_eq!(s.avg(), 5.0);
    }

    #[test]
    fn a_range_is_covered_by_minutes_at_its_ends_and_hours_between() {
        const M: i64 = 60_000;
        const H: i64 = 3_600_000;
        let t = 100 * H;
        assert_eq!(
            covering(Some(t + 5 * M + 7), Some(t + 9 * M)),
            vec![(M, t + 5 * M, t + 9 * M)]
        );
        assert_eq!(
            covering(Some(t + 5 * M), Some(t + 3 * H + 2 * M + 1)),
            vec![
                (M, t + 5 * M, t + H - M),
                (H, t + H, t + 2 * H),
                (M, t + 3 * H, t + 3 * H + 2 * M)
            ]
        );
        assert_eq!(
            covering(Some(t + 5 * M), Some(t + H)),
            vec![(M, t + 5 * M, t + H - M), (M, t + H, t + H)]
        );
        assert_eq!(
            covering(Some(t + M), None),
            vec![(M, t + M, t + H - M), (H, t + H, i64::MAX)]
        );
        assert_eq!(
            covering(None, Some(t + M)),
            vec![(H, i64::MIN, t - H), (M, t, t + M)]
        );
    }

    #[test]
    fn buckets_floor_even_before_1970() {
        assert_eq!(bucket_of(119_999, 60_000), 60_000);
        assert_eq!(bucket_of(-1, 60_000), -60_000);
    }
}
