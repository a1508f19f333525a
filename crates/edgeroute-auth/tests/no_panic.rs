//! Property tests: no input, however hostile, makes verification panic.

// Helpers outside #[test] bodies unwrap too: clippy.toml's allow-unwrap-in-tests only
// covers the test functions themselves, and a panic here is still a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edgeroute_auth::{KeySet, Policy, Scopes};
use proptest::prelude::*;

fn key_set() -> KeySet {
    let jwks = jwks(&[("rsa_a_public.pem", "rsa-a"), ("ed25519_a_public.pem", "ed-a")]);
    KeySet::from_material(Some(SECRET), Some(jwks.as_bytes()), 32).unwrap()
}

proptest! {
    #[test]
    fn arbitrary_strings_never_panic(token in any::<String>(), now in any::<u64>()) {
        let _ = key_set().verify(&token, &Policy::default(), now);
    }

    #[test]
    fn arbitrary_segments_never_panic(
        header in proptest::collection::vec(any::<u8>(), 0..200),
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        signature in "[A-Za-z0-9_-]{0,100}",
    ) {
        let token = format!("{}.{}.{signature}", b64(&header), b64(&payload));
        let _ = key_set().verify(&token, &Policy::default(), NOW);
    }

    /// Correctly signed tokens with arbitrary payloads reach the claims parser: it may refuse
    /// them, but must not panic, and anything it accepts has a tenant and is unexpired.
    #[test]
    fn signed_arbitrary_payloads_never_panic(
        payload in prop_oneof![
            "\\PC{0,200}",
            "\\{\"sub\":\"[a-z]{0,5}\",\"exp\":(-?[0-9]{1,25}(\\.[0-9])?|\"x\"|null)\\}",
        ],
        now in any::<u64>(),
    ) {
        let token = hs256_raw(&payload);
        if let Ok(claims) = key_set().verify(&token, &Policy::default(), now) {
            prop_assert!(!claims.sub.is_empty());
            prop_assert!(now < claims.exp);
        }
    }

    #[test]
    fn scope_strings_round_trip(names in proptest::collection::vec("inference|admin|[a-z]{1,8}", 0..6)) {
        let parsed = Scopes::parse(&names.join(" "));
        prop_assert_eq!(Scopes::parse(&parsed.to_string()), parsed);
        for name in &names {
            if let Some(scope) = edgeroute_auth::Scope::from_name(name) {
                prop_assert!(parsed.contains(scope));
            }
        }
    }
}
