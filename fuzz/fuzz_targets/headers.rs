//! The compact headers a node or upstream sends: `x-edgeroute-load` ([`LoadReport`]),
//! `x-edgeroute-migrate` ([`MigrateHint`]) and `x-edgeroute-error` ([`Fault`]).
//!
//! Properties: nothing panics; whatever parses prints back (`Display`) to a value that parses
//! to the same thing; `Fault::of_answer` prefers a parsable header over the status.

#![no_main]

use edgeroute_proto::headers::is_hint_token;
use edgeroute_proto::{Fault, LoadReport, MigrateHint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Header values reach the parsers through `HeaderValue::to_str`: visible ASCII; parse
    // arbitrary UTF-8 anyway, which is a superset.
    let Ok(s) = std::str::from_utf8(data) else { return };

    if let Ok(r) = s.parse::<LoadReport>() {
        let printed = r.to_string();
        assert_eq!(printed.parse::<LoadReport>(), Ok(r), "{s:?} -> {printed:?}");
    }

    if let Ok(h) = s.parse::<MigrateHint>() {
        let printed = h.to_string();
        assert_eq!(printed.parse::<MigrateHint>().as_ref(), Ok(&h), "{s:?} -> {printed:?}");
        // The node only writes hint tokens; those survive unchanged.
        if is_hint_token(&h.reason) {
            assert!(printed.starts_with(&format!("reason={}", h.reason)));
        }
    }

    let fault = Fault::parse(s);
    if let Some(f) = fault {
        let printed = f.to_string();
        assert_eq!(Fault::parse(&printed), Some(f), "{s:?} -> {printed:?}");
    }
    for status in [200u16, 408, 429, 500, 502] {
        let answered = Fault::of_answer(status, Some(s));
        assert_eq!(answered, fault.unwrap_or_else(|| Fault::of_status(status)));
    }
});
