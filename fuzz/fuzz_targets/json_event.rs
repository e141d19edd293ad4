//! JSON event lines (files, `touchledger append`/`publish`) through decoding and validation:
//! every input is an event or a typed rejection, never a panic; a valid event's JSON form reads
//! back as the same event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use touchledger_domain::{Timestamp, ValidationPolicy, json::parse_event};

fuzz_target!(|data: &[u8]| {
    let Ok(e) = parse_event(data) else {
        return;
    };
    let now = Timestamp::from_unix_nanos(1_780_000_000_000_000_000);
    if e.validate(&ValidationPolicy::default(), now).is_ok() {
        let line = serde_json::to_string(&e).expect("an event serialises");
        let back = parse_event(line.as_bytes()).expect("own JSON reads back");
        assert_eq!(back, e);
    }
});
