//! Verification keys: one immutable set, each key pinned to exactly one algorithm.
//!
//! A [`KeySet`] is built from raw material (secret bytes, JWKS JSON) without doing any I/O, so
//! start-up, reload and tests all go through the same code. All validation of key material
//! happens here, once, so the per-request path only looks keys up.
//!
//! Pinning rules (RFC 8725 §3.1): the HS256 secret verifies HS256 only; an RSA JWK verifies
//! RS256 unless its `alg` names another RSA algorithm; an Ed25519 JWK verifies EdDSA only. A JWKS
//! may only contain public keys: symmetric (`oct`) keys and keys with private parameters are
//! refused, so a shared secret can never be smuggled in as a "public" key.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};

use crate::error::KeyLoadError;

/// Smallest RSA modulus accepted, in bytes (2048 bits, RFC 7518 §3.3).
const MIN_RSA_MODULUS_BYTES: usize = 256;
/// Largest RSA modulus accepted, in bytes (4096 bits; the RSA backend refuses larger keys).
const MAX_RSA_MODULUS_BYTES: usize = 512;
/// The backend's upper bound on the public exponent (2^33 - 1).
const MAX_RSA_EXPONENT: u64 = (1 << 33) - 1;
/// Longest `kid` accepted in a JWKS; ids are opaque but need not be unbounded.
const MAX_KID_BYTES: usize = 256;

/// A verification key and the one algorithm it may be used with.
#[derive(Clone)]
pub(crate) struct PinnedKey {
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

/// An immutable set of verification keys: an optional HS256 secret (used for tokens without a
/// `kid`) and public keys by `kid` from a JWKS.
#[derive(Clone, Default)]
pub struct KeySet {
    hs256: Option<PinnedKey>,
    by_kid: BTreeMap<String, PinnedKey>,
}

impl fmt::Debug for KeySet {
    // Key material stays out of logs: only ids and algorithms are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet")
            .field("hs256_secret", &self.hs256.is_some())
            .field(
                "jwks",
                &self.by_kid.iter().map(|(k, v)| (k.as_str(), v.alg)).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KeySet {
    /// Builds a key set from an HS256 secret and/or a JWKS document.
    ///
    /// The secret must be at least `min_secret_bytes` long (and never empty). The JWKS must be
    /// a JSON object with a `keys` array; see the module docs for what each key may be. Keys of
    /// types we do not verify (EC, other curves) and encryption keys (`"use": "enc"`) are
    /// skipped, so a JWKS copied from an identity provider still loads; a supported key that is
    /// malformed fails the whole load, so a typo never silently drops a key.
    pub fn from_material(
        hs256_secret: Option<&[u8]>,
        jwks_json: Option<&[u8]>,
        min_secret_bytes: usize,
    ) -> Result<KeySet, KeyLoadError> {
        let hs256 = match hs256_secret {
            None => None,
            Some(secret) => {
                let min = min_secret_bytes.max(1);
                if secret.len() < min {
                    return Err(KeyLoadError::SecretTooShort { len: secret.len(), min });
                }
                Some(PinnedKey { alg: Algorithm::HS256, key: DecodingKey::from_secret(secret) })
            }
        };
        let by_kid = match jwks_json {
            None => BTreeMap::new(),
            Some(json) => parse_jwks(json)?,
        };
        Ok(KeySet { hs256, by_kid })
    }

    /// The key for a token's `kid`, or the HS256 secret for a token without one.
    ///
    /// `kid` is an opaque map key: it is never interpreted, and an unknown `kid` never falls
    /// back to another key.
    pub(crate) fn select(&self, kid: Option<&str>) -> Option<&PinnedKey> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.hs256.as_ref(),
        }
    }

    /// The JWKS key ids, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.by_kid.keys().map(String::as_str)
    }

    /// Whether an HS256 secret is loaded.
    pub fn has_hs256_secret(&self) -> bool {
        self.hs256.is_some()
    }

    /// Whether the set holds no key at all.
    pub fn is_empty(&self) -> bool {
        self.hs256.is_none() && self.by_kid.is_empty()
    }
}

fn parse_jwks(json: &[u8]) -> Result<BTreeMap<String, PinnedKey>, KeyLoadError> {
    // Parse to a Value first: serde_json's syntax errors give positions only, so no key bytes
    // end up in an error message.
    let doc: Value = serde_json::from_slice(json)
        .map_err(|e| KeyLoadError::Jwks(format!("not valid JSON ({e})")))?;
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| KeyLoadError::Jwks("expected an object with a `keys` array".into()))?;

    let mut out = BTreeMap::new();
    for (index, jwk) in keys.iter().enumerate() {
        let jwk = jwk
            .as_object()
            .ok_or_else(|| KeyLoadError::Jwks(format!("key #{index} is not an object")))?;
        let fail = |why: &str| {
            let kid = jwk.get("kid").and_then(Value::as_str).unwrap_or("?");
            KeyLoadError::Jwks(format!("key #{index} (kid {kid:?}): {why}"))
        };
        let Some(pinned) = parse_jwk(jwk).map_err(|why| fail(&why))? else {
            tracing::warn!(index, "skipping a jwks key of a type or use we do not verify");
            continue;
        };
        let kid = match jwk.get("kid") {
            Some(Value::String(kid)) if !kid.is_empty() && kid.len() <= MAX_KID_BYTES => kid,
            _ => return Err(fail("`kid` must be a non-empty string of at most 256 bytes")),
        };
        if out.insert(kid.clone(), pinned).is_some() {
            return Err(fail("duplicate `kid`"));
        }
    }
    Ok(out)
}

/// Validates one JWK. `Ok(None)` means "not for us, skip"; `Err` means "for us, but broken".
fn parse_jwk(jwk: &Map<String, Value>) -> Result<Option<PinnedKey>, String> {
    let text = |name: &str| -> Result<Option<&str>, String> {
        match jwk.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("`{name}` must be a string")),
        }
    };
    let kty = text("kty")?.ok_or("missing `kty`")?;
    if kty == "oct" {
        return Err("symmetric (`oct`) keys are not allowed in a jwks; use hs256_secret_*".into());
    }
    // A JWKS is published material: private parameters here mean someone exported the wrong
    // file, and the private key is now exposed. Refuse loudly rather than carry on.
    for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
        if jwk.contains_key(private) {
            return Err(format!("contains private key parameter `{private}`"));
        }
    }
    match text("use")? {
        None | Some("sig") => {}
        Some(_) => return Ok(None),
    }
    let alg = text("alg")?;
    match kty {
        "RSA" => {
            let alg = match alg {
                None | Some("RS256") => Algorithm::RS256,
                Some("RS384") => Algorithm::RS384,
                Some("RS512") => Algorithm::RS512,
                Some("PS256") => Algorithm::PS256,
                Some("PS384") => Algorithm::PS384,
                Some("PS512") => Algorithm::PS512,
                Some(_) => return Err("`alg` is not an RSA signature algorithm".into()),
            };
            let n = b64_field(text("n")?, "n")?;
            let e = b64_field(text("e")?, "e")?;
            let n = strip_leading_zeros(&n);
            let e = strip_leading_zeros(&e);
            if !(MIN_RSA_MODULUS_BYTES..=MAX_RSA_MODULUS_BYTES).contains(&n.len()) {
                return Err(format!(
                    "RSA modulus is {} bits; 2048 to 4096 are accepted",
                    n.len() * 8
                ));
            }
            let e_value = e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            if e.len() > 8 || !(3..=MAX_RSA_EXPONENT).contains(&e_value) || e_value % 2 == 0 {
                return Err("RSA exponent must be odd and between 3 and 2^33-1".into());
            }
            Ok(Some(PinnedKey { alg, key: DecodingKey::from_rsa_raw_components(n, e) }))
        }
        "OKP" => {
            if text("crv")? != Some("Ed25519") {
                // Ed448 and X25519 are OKP too; we verify neither.
                return Ok(None);
            }
            match alg {
                None | Some("EdDSA") | Some("Ed25519") => {}
                Some(_) => return Err("`alg` must be EdDSA for an Ed25519 key".into()),
            }
            let x = b64_field(text("x")?, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 `x` must be 32 bytes".into());
            }
            let key = DecodingKey::from_ed_der(&x);
            if !ed25519_key_is_valid(&key) {
                return Err("`x` is not a valid Ed25519 point".into());
            }
            Ok(Some(PinnedKey { alg: Algorithm::EdDSA, key }))
        }
        _ => Ok(None),
    }
}

/// The backend decompresses the point when it builds a verifier and fails on an invalid one; a
/// probe with a dummy signature finds that out at load time instead of on every request.
fn ed25519_key_is_valid(key: &DecodingKey) -> bool {
    let dummy_signature = URL_SAFE_NO_PAD.encode([0u8; 64]);
    jsonwebtoken::crypto::verify(&dummy_signature, b"probe", key, Algorithm::EdDSA).is_ok()
}

fn b64_field(value: Option<&str>, name: &str) -> Result<Vec<u8>, String> {
    let value = value.ok_or_else(|| format!("missing `{name}`"))?;
    URL_SAFE_NO_PAD.decode(value).map_err(|_| format!("`{name}` is not base64url without padding"))
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwks(keys: Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap()
    }

    fn err(json: &[u8]) -> String {
        KeySet::from_material(None, Some(json), 32).unwrap_err().to_string()
    }

    #[test]
    fn secret_length_is_enforced_and_empty_never_allowed() {
        assert!(matches!(
            KeySet::from_material(Some(b"short"), None, 32),
            Err(KeyLoadError::SecretTooShort { len: 5, min: 32 })
        ));
        assert!(KeySet::from_material(Some(b""), None, 0).is_err());
        assert!(KeySet::from_material(Some(&[7u8; 32]), None, 32).is_ok());
    }

    #[test]
    fn refuses_symmetric_and_private_keys() {
        let oct = jwks(serde_json::json!([{"kty":"oct","kid":"s","k":"c2VjcmV0"}]));
        assert!(err(&oct).contains("symmetric"));
        let private = jwks(serde_json::json!([{"kty":"OKP","crv":"Ed25519","kid":"p",
            "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","d":"secret"}]));
        let msg = err(&private);
        assert!(msg.contains("private key parameter `d`"), "{msg}");
        assert!(!msg.contains("secret"), "no key material in messages: {msg}");
    }

    #[test]
    fn skips_unsupported_types_and_encryption_keys() {
        let doc = jwks(serde_json::json!([
            {"kty":"EC","crv":"P-256","kid":"ec","x":"AA","y":"AA"},
            {"kty":"OKP","crv":"Ed25519","kid":"enc","use":"enc",
             "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","kid":"ok",
             "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]));
        let set = KeySet::from_material(None, Some(&doc), 32).unwrap();
        assert_eq!(set.key_ids().collect::<Vec<_>>(), vec!["ok"]);
        assert_eq!(set.select(Some("ok")).map(|k| k.alg), Some(Algorithm::EdDSA));
    }

    #[test]
    fn rejects_broken_supported_keys() {
        let short_x = jwks(serde_json::json!([{"kty":"OKP","crv":"Ed25519","kid":"a","x":"AAAA"}]));
        assert!(err(&short_x).contains("32 bytes"));
        let no_kid = jwks(serde_json::json!([{"kty":"OKP","crv":"Ed25519",
            "x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]));
        assert!(err(&no_kid).contains("kid"));
        let confused = jwks(serde_json::json!([{"kty":"RSA","kid":"r","alg":"HS256",
            "n":"AQAB","e":"AQAB"}]));
        assert!(err(&confused).contains("not an RSA signature algorithm"));
        let small = jwks(serde_json::json!([{"kty":"RSA","kid":"r",
            "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e":"AQAB"}]));
        assert!(err(&small).contains("1024 bits"));
        let even_e = jwks(serde_json::json!([{"kty":"RSA","kid":"r",
            "n": URL_SAFE_NO_PAD.encode([0xffu8; 256]), "e":"AQAA"}]));
        assert!(err(&even_e).contains("exponent"));
        let dup = jwks(serde_json::json!([
            {"kty":"OKP","crv":"Ed25519","kid":"a","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty":"OKP","crv":"Ed25519","kid":"a","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
        ]));
        assert!(err(&dup).contains("duplicate"));
        assert!(err(b"{\"keys\": 5}").contains("`keys` array"));
        assert!(err(b"{not json").contains("not valid JSON"));
    }

    #[test]
    fn rsa_alg_pins_the_algorithm() {
        let n = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
        let doc = jwks(serde_json::json!([
            {"kty":"RSA","kid":"default","n":n,"e":"AQAB"},
            {"kty":"RSA","kid":"pss","alg":"PS384","n":n,"e":"AQAB"}
        ]));
        let set = KeySet::from_material(None, Some(&doc), 32).unwrap();
        assert_eq!(set.select(Some("default")).map(|k| k.alg), Some(Algorithm::RS256));
        assert_eq!(set.select(Some("pss")).map(|k| k.alg), Some(Algorithm::PS384));
        assert!(set.select(None).is_none(), "jwks keys are never chosen without a kid");
    }
}
