//! Any config text: loaded or refused with problems that each name a key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telebridge::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(problems) = Config::parse(text) {
        assert!(!problems.is_empty());
        assert!(problems.iter().all(|p| !p.key.is_empty()));
    }
});
