//! Any topic and payload from the broker: classified without a panic, and a reading's
//! device id is always valid.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use telebridge::config::TopicsConfig;
use telebridge::domain::{DeviceId, TopicTemplate};
use telebridge::ingest::{Ingest, Item};
use telebridge::observability::Metrics;

fuzz_target!(|data: &[u8]| {
    // First byte: where the topic ends; the rest is the payload.
    let Some((&split, rest)) = data.split_first() else { return };
    let split = (split as usize).min(rest.len());
    let (topic, payload) = rest.split_at(split);
    let Ok(topic) = std::str::from_utf8(topic) else { return };
    let ingest = Ingest::new(TopicsConfig::default(), 1024, Arc::new(Metrics::default()));
    match ingest.classify(topic, bytes::Bytes::copy_from_slice(payload), None) {
        Item::Reading(r, _) => {
            assert!(DeviceId::check(r.device.as_str()).is_ok());
            assert!(payload.len() <= 1024);
        }
        Item::Presence { device, .. } => assert!(DeviceId::check(device.as_str()).is_ok()),
        Item::CommandAck(a) => assert!(DeviceId::check(a.device.as_str()).is_ok()),
        Item::Skip(_) => {}
    }
    let _ = telebridge::domain::inspect_payload(payload);
    if let Ok(t) = TopicTemplate::parse(topic) {
        assert!(!t.filter().contains('#'));
        let _ = t.match_device(topic);
    }
});
