//! Any WebSocket text frame: parsed or refused with a code, never a panic; an accepted
//! command's device id can never inject a topic level or wildcard.
#![no_main]

use libfuzzer_sys::fuzz_target;
use telebridge::protocol::parse_client_message;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match parse_client_message(text) {
        Ok(cmd) => {
            assert!(!cmd.device.contains(['/', '+', '#']));
            assert!(!cmd.device.is_empty() && cmd.device.len() <= 64);
        }
        Err(r) => assert!(!r.code.is_empty() && !r.message.is_empty()),
    }
});
