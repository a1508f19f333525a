//! Bearer tokens checked by `edgeroute_auth::KeyStore` (an HS256 secret, an audience, leeway),
//! as every authenticated request is.
//!
//! Input: byte 0 picks the mode, the rest is its payload.
//! - 0: the payload is an `Authorization` header value: `parse_bearer`, then `verify`.
//! - 1: the payload is `header JSON 0xFF claims JSON`, base64url-encoded and signed with the
//!   store's secret, so the fuzzer reaches header and claims decoding past the signature.
//! - 2: the payload is a JWKS document, loaded as the key file would be.
//!
//! Properties: nothing panics; an accepted token has a non-empty subject, is not expired at
//! `now` (with leeway), names the audience, and was signed with the secret.

#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use edgeroute_auth::{KeySet, KeyStore, Policy, parse_bearer};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzzing-secret-at-least-32-bytes-long";
const NOW: u64 = 1_700_000_000;
const LEEWAY: u64 = 30;

fn store() -> KeyStore {
    let keys = KeySet::from_material(Some(SECRET), None, 32).expect("a valid secret");
    let policy = Policy { audience: Some("edgeroute".into()), issuer: None, leeway_s: LEEWAY };
    KeyStore::from_key_set(policy, keys)
}

fn check(store: &KeyStore, token: &str) {
    let Ok(claims) = store.verify(token, NOW) else { return };
    assert!(!claims.sub.is_empty(), "accepted a token without a subject");
    assert!(NOW < claims.exp.saturating_add(LEEWAY), "accepted an expired token");
    assert!(claims.nbf.is_none_or(|nbf| nbf <= NOW + LEEWAY), "accepted a token before nbf");
    assert!(claims.aud.iter().any(|a| a == "edgeroute"), "accepted a token for another audience");
    // It verified, so it must be signed with the secret: re-sign and compare.
    let (signed, sig) = token.rsplit_once('.').expect("three segments");
    let key = EncodingKey::from_secret(SECRET);
    let expected =
        jsonwebtoken::crypto::sign(signed.as_bytes(), &key, Algorithm::HS256).expect("HS256 signs");
    assert_eq!(sig, expected, "accepted a signature the secret did not make");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let store = store();
    match mode % 3 {
        0 => {
            let Ok(value) = std::str::from_utf8(rest) else { return };
            if let Ok(token) = parse_bearer(Some(value)) {
                assert!(!token.is_empty() && !token.starts_with(' ') && !token.ends_with(' '));
                check(&store, token);
            }
            check(&store, value);
        }
        1 => {
            let (header, claims) = match rest.iter().position(|&b| b == 0xFF) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest),
            };
            let signed =
                format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
            let key = EncodingKey::from_secret(SECRET);
            let sig = jsonwebtoken::crypto::sign(signed.as_bytes(), &key, Algorithm::HS256)
                .expect("HS256 signs");
            check(&store, &format!("{signed}.{sig}"));
        }
        _ => {
            if let Ok(keys) = KeySet::from_material(None, Some(rest), 32) {
                // Tokens without a `kid` never fall back to a JWKS key.
                assert!(!keys.has_hs256_secret());
                let store = KeyStore::from_key_set(Policy::default(), keys);
                let _ = store.verify("eyJhbGciOiJSUzI1NiJ9.e30.c2ln", NOW);
            }
        }
    }
});
