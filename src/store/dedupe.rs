//! Telling a repeated reading from a new one. QoS 1 is "at least once": after a crash
//! between our commit and the broker getting our ack, or when a device resends because it
//! missed the broker's, the same message arrives again. A reading is the same when its
//! device, device time (`ts`) and payload bytes are; a repeat is acknowledged but neither
//! stored nor rolled up, so history and rollups count it once.

use std::collections::VecDeque;
use std::hash::BuildHasher as _;
use std::sync::Arc;

// foldhash, not std's SipHash: every reading is hashed on the writer's path (its payload
// once, its identity in two maps), and SipHash was a fifth of that thread's time at 100 B.
use foldhash::{HashMap, HashSet, HashSetExt as _};

use crate::ingest::{Item, Reading};

/// How many of the newest readings the SQLite writer remembers (about 8 MB): a repeat
/// arriving after this many newer readings is taken for a new one.
pub const RECENT: usize = 100_000;

/// A reading's identity: device, device time and a hash of the payload.
type Id = (Arc<str>, i64, u64);

/// A payload's hash: fixed seeds, so that the same bytes give the same hash in every run
/// (the remembered readings are reloaded at start).
pub fn payload_hash(payload: &[u8]) -> u64 {
    foldhash::fast::FixedState::default().hash_one(payload)
}

/// The identity of a reading.
pub fn id_of(device: Arc<str>, ts: i64, payload: &[u8]) -> (Arc<str>, i64, u64) {
    (device, ts, payload_hash(payload))
}

/// The newest readings stored, by identity (SQLite, where this writer is the only one).
#[derive(Debug, Default)]
pub struct Recent {
    ids: HashMap<Id, u32>,
    order: VecDeque<Id>,
}

impl Recent {
    /// Whether a reading, whose payload hashes to `hash`, is among the remembered ones.
    pub fn contains(&self, r: &Reading, hash: u64) -> bool {
        self.ids.contains_key(&(r.device.shared(), r.ts, hash))
    }

    /// Remembers a stored reading, forgetting the oldest past [`RECENT`].
    pub fn insert(&mut self, id: Id) {
        *self.ids.entry(id.clone()).or_default() += 1;
        self.order.push_back(id);
        while self.order.len() > RECENT {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(n) = self.ids.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.ids.remove(&old);
                }
            }
        }
    }
}

/// Which items of a batch are repeats: of a stored reading (`stored` says, given the
/// reading and its payload's hash), or of an earlier reading in the same batch.
pub fn repeats(batch: &[Item], stored: impl Fn(&Reading, u64) -> bool) -> Vec<bool> {
    let mut seen: HashSet<(&str, i64, &[u8])> = HashSet::with_capacity(batch.len());
    batch
        .iter()
        .map(|item| match item {
            Item::Reading(r, _) => {
                !seen.insert((r.device.as_str(), r.ts, &r.payload[..]))
                    || stored(r, payload_hash(&r.payload))
            }
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DeviceId;

    fn reading(device: &str, ts: i64, payload: &'static str) -> Reading {
        Reading {
            device: DeviceId::parse(device).expect("device"),
            topic: Arc::from("t"),
            ts,
            received_at: ts,
            payload: bytes::Bytes::from_static(payload.as_bytes()),
            flags: 0,
        }
    }

    #[test]
    fn a_repeat_is_the_same_device_time_and_bytes() {
        let batch: Vec<Item> = [
            reading("a", 1, "{}"),
            reading("a", 1, "{}"),
            reading("a", 1, "{\"x\":1}"),
            reading("b", 1, "{}"),
            reading("a", 2, "{}"),
        ]
        .into_iter()
        .map(|r| Item::Reading(r, None))
        .collect();
        let stored = reading("a", 2, "{}");
        let mut recent = Recent::default();
        recent.insert(id_of(stored.device.shared(), stored.ts, &stored.payload));
        assert_eq!(
            repeats(&batch, |r, h| recent.contains(r, h)),
            vec![false, true, false, false, true]
        );
    }

    #[test]
    fn the_oldest_are_forgotten_past_the_window() {
        let mut recent = Recent::default();
        let first = reading("a", 0, "{}");
        for ts in 0..=RECENT as i64 {
            recent.insert(id_of(first.device.shared(), ts, &first.payload));
        }
        assert!(!recent.contains(&first, payload_hash(&first.payload)));
        let r = reading("a", 1, "{}");
        assert!(recent.contains(&r, payload_hash(&r.payload)));
        let r = reading("a", RECENT as i64, "{}");
        assert!(recent.contains(&r, payload_hash(&r.payload)));
    }
}
