//! Protobuf envelope bytes (what JetStream intake and `crm.ledger.append` receive) through
//! decoding, conversion and validation: every input is an event or a typed rejection, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use touchledger_domain::{Event, Timestamp, ValidationPolicy};
use touchledger_proto::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = v1::Envelope::decode(data) else {
        return;
    };
    if let Ok(e) = Event::try_from(env) {
        let now = Timestamp::from_unix_nanos(1_780_000_000_000_000_000);
        if e.validate(&ValidationPolicy::default(), now).is_ok() {
            // A valid event re-encodes and decodes to itself.
            let bytes = touchledger_proto::encode_event(&e);
            let back = Event::try_from(v1::Envelope::decode(bytes.as_slice()).expect("re-decodes"))
                .expect("converts back");
            assert_eq!(back, e);
        }
    }
});
