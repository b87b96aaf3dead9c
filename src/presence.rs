//! Stale presence: each device's usual interval, learned from when its readings arrive (or
//! set in `[presence] interval`), and which online devices have missed `stale_after` of
//! them. The alert engine, which sees every committed reading and presence change, keeps it
//! and stores the transitions (each an `event: status` with `presence: "stale"`, then
//! `"online"` again); offline still comes from the last will, a retained status or the
//! presence timeout.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::PresenceConfig;

/// The shortest silence that makes a device stale, however fast it sends: below it, the
/// batching of commits and the once-a-second check would make fast devices flap.
const MIN_SILENCE_MS: i64 = 2_000;
/// Intervals seen before a learned cadence counts.
const LEARNED_AFTER: u32 = 3;
/// Weight of a new interval in the running average.
const WEIGHT: f64 = 0.2;

/// What is known of one device's cadence.
#[derive(Debug, Clone)]
struct Beat {
    /// Receive time of the last reading, Unix ms.
    last: i64,
    /// The usual interval, ms (a running average).
    interval: f64,
    /// Intervals seen.
    seen: u32,
    online: bool,
    /// As stored.
    stale: bool,
}

/// Every device's cadence; see the module documentation.
#[derive(Debug)]
pub struct Cadence {
    stale_after: u32,
    fixed_ms: Option<i64>,
    devices: HashMap<Arc<str>, Beat>,
}

impl Cadence {
    /// Cadences as `[presence]` says.
    pub fn new(cfg: &PresenceConfig) -> Cadence {
        Cadence {
            stale_after: cfg.stale_after,
            fixed_ms: cfg
                .interval
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            devices: HashMap::new(),
        }
    }

    /// Whether devices can go stale at all.
    pub fn enabled(&self) -> bool {
        self.stale_after > 0
    }

    /// A device as storage knows it at start.
    pub fn known(&mut self, device: Arc<str>, online: bool, stale: bool, last_seen: i64) {
        self.devices.insert(
            device,
            Beat {
                last: last_seen,
                interval: 0.0,
                seen: 0,
                online,
                stale,
            },
        );
    }

    /// A reading arrived at `at`; true when the device is stored as stale, so it must be
    /// marked fresh again.
    pub fn reading(&mut self, device: &Arc<str>, at: i64) -> bool {
        let Some(b) = self.devices.get_mut(device) else {
            self.devices.insert(
                device.clone(),
                Beat {
                    last: at,
                    interval: 0.0,
                    seen: 0,
                    online: true,
                    stale: false,
                },
            );
            return false;
        };
        let dt = (at - b.last) as f64;
        if dt > 0.0 && b.online {
            // Clamped, so that an outage (one long gap) or the burst the broker kept for
            // it (many short ones) moves the average only a little.
            let dt = if b.seen == 0 {
                dt
            } else {
                dt.clamp(b.interval / 4.0, b.interval * 4.0)
            };
            b.interval = if b.seen == 0 {
                dt
            } else {
                b.interval * (1.0 - WEIGHT) + dt * WEIGHT
            };
            b.seen = b.seen.saturating_add(1);
        }
        b.last = b.last.max(at);
        b.online = true;
        b.stale
    }

    /// A presence change; `stale` when the event says (a stale or fresh-again event).
    pub fn presence(&mut self, device: &Arc<str>, online: bool, stale: Option<bool>, at: i64) {
        let b = self.devices.entry(device.clone()).or_insert(Beat {
            last: at,
            interval: 0.0,
            seen: 0,
            online,
            stale: false,
        });
        if online && !b.online {
            // Back: its silence starts now, not at its last reading.
            b.last = b.last.max(at);
        }
        b.online = online;
        if let Some(s) = stale {
            b.stale = s;
        }
    }

    /// Records what storage now says of `device`.
    pub fn set_stale(&mut self, device: &Arc<str>, stale: bool) {
        if let Some(b) = self.devices.get_mut(device) {
            b.stale = stale;
        }
    }

    /// Online devices, not yet stale, silent for `stale_after` of their intervals at `now`.
    pub fn due(&self, now: i64) -> Vec<Arc<str>> {
        if !self.enabled() {
            return Vec::new();
        }
        self.devices
            .iter()
            .filter(|(_, b)| b.online && !b.stale)
            .filter_map(|(d, b)| {
                let interval = match self.fixed_ms {
                    Some(ms) => ms,
                    None if b.seen >= LEARNED_AFTER => b.interval.round() as i64,
                    None => return None,
                };
                let silence =
                    (interval.saturating_mul(i64::from(self.stale_after))).max(MIN_SILENCE_MS);
                (now - b.last >= silence).then(|| d.clone())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cadence(interval: Option<Duration>) -> Cadence {
        Cadence::new(&PresenceConfig {
            interval,
            ..PresenceConfig::default()
        })
    }

    #[test]
    fn a_device_is_stale_after_three_of_its_own_intervals_and_fresh_on_its_next_reading() {
        let mut c = cadence(None);
        let d: Arc<str> = Arc::from("d");
        for t in 0..5 {
            assert!(!c.reading(&d, t * 1_000));
        }
        // Last reading at 4 s, every second: stale from 7 s.
        assert!(c.due(6_900).is_empty());
        assert_eq!(c.due(7_000), vec![d.clone()]);
        c.set_stale(&d, true);
        assert!(c.due(9_000).is_empty(), "already stale");
        assert!(c.reading(&d, 9_500), "a stale device is fresh again");
        c.set_stale(&d, false);
        assert!(c.due(10_000).is_empty());
    }

    #[test]
    fn fast_devices_wait_the_floor_and_outages_barely_move_the_cadence() {
        let mut c = cadence(None);
        let d: Arc<str> = Arc::from("d");
        for t in 0..10 {
            c.reading(&d, t * 100);
        }
        // 100 ms apart: three would be 300 ms, the floor is 2 s.
        assert!(c.due(900 + 1_999).is_empty());
        assert_eq!(c.due(900 + 2_000).len(), 1);
        // One 60 s gap counts as at most 4 intervals.
        c.reading(&d, 60_900);
        let b = &c.devices[&d];
        assert!(b.interval < 200.0, "{}", b.interval);
    }

    #[test]
    fn a_fixed_interval_needs_no_learning_and_offline_devices_are_never_stale() {
        let mut c = cadence(Some(Duration::from_secs(10)));
        let d: Arc<str> = Arc::from("d");
        c.reading(&d, 0);
        assert!(c.due(29_999).is_empty());
        assert_eq!(c.due(30_000).len(), 1);
        c.presence(&d, false, None, 30_000);
        assert!(c.due(100_000).is_empty());
        // Back online: its silence counts from then.
        c.presence(&d, true, None, 100_000);
        assert!(c.due(129_999).is_empty());
        assert_eq!(c.due(130_000).len(), 1);
        let mut off = Cadence::new(&PresenceConfig {
            stale_after: 0,
            ..PresenceConfig::default()
        });
        off.reading(&d, 0);
        assert!(off.due(i64::MAX / 2).is_empty());
    }
}
