//! Property fuzzing of the decoders (the stable-toolchain stand-in for a cargo-fuzz target):
//! arbitrary bytes and mutated valid encodings through protobuf decode + validate, and arbitrary
//! text through the JSON decoder. They must return a typed result, never panic; anything that
//! decodes must re-encode canonically.

use proptest::prelude::*;
use touchledger_domain::ValidationPolicy;
use touchledger_proto::{decode_event, encode_event};

use crate::support::{now, purchase};

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(e) = decode_event(&bytes) {
            let _ = e.validate(&ValidationPolicy::default(), now());
            let again = decode_event(&encode_event(&e)).expect("re-decodes");
            prop_assert_eq!(again, e);
        }
    }

    #[test]
    fn mutated_valid_events_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut bytes = encode_event(&purchase("e1", "c1", 1299));
        for (i, b) in flips {
            let n = bytes.len();
            bytes[i.index(n)] = b;
        }
        if let Ok(e) = decode_event(&bytes) {
            let _ = e.validate(&ValidationPolicy::default(), now());
        }
    }

    #[test]
    fn arbitrary_json_never_panics(s in ".{0,300}") {
        let _ = touchledger_domain::json::parse_event(s.as_bytes());
    }
}
