//! Query strings of the HTTP API through decoding and the parameter checks of each endpoint
//! (`as_of`, `axis`, levels, causes, sorting, paging): an answer or a 400 message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(query) = std::str::from_utf8(rest) else {
        return;
    };
    let endpoint = ["customer", "at-risk", "overview"][usize::from(which) % 3];
    let _ = touchledger_http::check_query(endpoint, query);
});
