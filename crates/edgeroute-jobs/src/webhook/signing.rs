//! Standard Webhooks signatures: HMAC-SHA256 over `"{webhook-id}.{webhook-timestamp}.{body}"`
//! with a secret written `whsec_` + base64, sent as `webhook-signature: v1,<base64>`. During a
//! secret rotation the sender signs with every current secret and sends the signatures
//! space-separated; a receiver accepts the message when any of them verifies under any of its
//! secrets. Receivers refuse timestamps more than the tolerance (5 minutes by default) away
//! from their clock, which bounds replays; deduplication by `webhook-id` is theirs.
//!
//! Comparisons are constant-time (`hmac`'s `verify_slice`); secrets never print.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The secret's prefix.
pub const SECRET_PREFIX: &str = "whsec_";
/// The header names.
pub const HEADER_ID: &str = "webhook-id";
/// Seconds since the epoch, as a decimal string.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// `v1,<base64>` signatures, space-separated.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// The specification's default tolerance between the timestamp and the receiver's clock.
pub const DEFAULT_TOLERANCE_S: u64 = 5 * 60;
/// The specification's bounds on a secret's size (bytes, decoded).
pub const MIN_SECRET_BYTES: usize = 24;
/// The upper bound.
pub const MAX_SECRET_BYTES: usize = 64;

/// A signing secret (decoded bytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// Why a secret was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Not `whsec_` followed by base64.
    #[error("a webhook secret is \"whsec_\" followed by base64")]
    Malformed,
    /// Outside the specification's 24..=64 bytes.
    #[error("a webhook secret must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, got {0}")]
    Size(usize),
}

impl Secret {
    /// Parses `whsec_<base64>` (the prefix may be omitted, as receivers accept).
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let b64 = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let bytes = B64.decode(b64).map_err(|_| SecretError::Malformed)?;
        Secret::from_bytes(bytes)
    }

    /// A secret from raw bytes.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, SecretError> {
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&bytes.len()) {
            return Err(SecretError::Size(bytes.len()));
        }
        Ok(Secret(bytes))
    }

    /// A new 32-byte secret from `rng` (the OS's, in production).
    pub fn generate(rng: &mut impl rand::RngCore) -> Self {
        let mut bytes = vec![0u8; 32];
        rng.fill_bytes(&mut bytes);
        Secret(bytes)
    }

    /// The `whsec_` form to hand to the tenant.
    pub fn to_whsec(&self) -> String {
        format!("{SECRET_PREFIX}{}", B64.encode(&self.0))
    }

    fn mac(&self, id: &str, timestamp_s: u64, body: &[u8]) -> HmacSha256 {
        // Any key length is valid for HMAC: `new_from_slice` cannot fail here.
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable_hmac(),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp_s.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

#[cold]
fn unreachable_hmac() -> ! {
    // HMAC accepts keys of any length (RFC 2104); hmac's error exists for fixed-key MACs.
    panic!("HMAC-SHA256 refused a key")
}

/// The three headers of a signed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedHeaders {
    /// `webhook-id`.
    pub id: String,
    /// `webhook-timestamp` (seconds).
    pub timestamp: String,
    /// `webhook-signature`.
    pub signature: String,
}

impl SignedHeaders {
    /// As (name, value) pairs.
    pub fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            (HEADER_ID, &self.id),
            (HEADER_TIMESTAMP, &self.timestamp),
            (HEADER_SIGNATURE, &self.signature),
        ]
    }
}

/// Signs `body` under every secret (one during normal operation, two or more during a
/// rotation). The same `id` must be kept across retries of one message: receivers dedupe by it.
pub fn sign(secrets: &[Secret], id: &str, timestamp_s: u64, body: &[u8]) -> SignedHeaders {
    let signature = secrets
        .iter()
        .map(|s| format!("v1,{}", B64.encode(s.mac(id, timestamp_s, body).finalize().into_bytes())))
        .collect::<Vec<_>>()
        .join(" ");
    SignedHeaders { id: id.to_owned(), timestamp: timestamp_s.to_string(), signature }
}

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// `webhook-timestamp` is not a number of seconds.
    #[error("webhook-timestamp {0:?} is not a number of seconds")]
    BadTimestamp(String),
    /// The timestamp is further from the receiver's clock than the tolerance.
    #[error("webhook-timestamp is {off_s} s from now, beyond the tolerance of {tolerance_s} s")]
    OutsideTolerance {
        /// How far off (seconds).
        off_s: u64,
        /// The tolerance.
        tolerance_s: u64,
    },
    /// No `v1` signature verified under any secret.
    #[error("no webhook-signature matches")]
    NoMatch,
}

/// Verifies a message: the timestamp within `tolerance_s` of `now_s`, and one `v1` signature
/// valid under one of `secrets`. Unknown versions (`v1a,…`) are skipped, as the specification
/// asks.
pub fn verify(
    secrets: &[Secret],
    headers: &SignedHeaders,
    body: &[u8],
    now_s: u64,
    tolerance_s: u64,
) -> Result<(), VerifyError> {
    let ts: u64 = headers
        .timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp(headers.timestamp.clone()))?;
    let off_s = ts.abs_diff(now_s);
    if off_s > tolerance_s {
        return Err(VerifyError::OutsideTolerance { off_s, tolerance_s });
    }
    for candidate in headers.signature.split(' ').filter(|s| !s.is_empty()) {
        let Some(("v1", b64)) = candidate.split_once(',') else { continue };
        let Ok(sig) = B64.decode(b64) else { continue };
        for secret in secrets {
            if secret.mac(&headers.id, ts, body).verify_slice(&sig).is_ok() {
                return Ok(());
            }
        }
    }
    Err(VerifyError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example the Standard Webhooks reference libraries test against.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TS: u64 = 1_614_265_330;
    const SPEC_BODY: &str = r#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret(byte: u8) -> Secret {
        Secret::from_bytes(vec![byte; 32]).unwrap()
    }

    #[test]
    fn the_specifications_example_signs_and_verifies() {
        let s = Secret::parse(SPEC_SECRET).unwrap();
        let h = sign(std::slice::from_ref(&s), SPEC_ID, SPEC_TS, SPEC_BODY.as_bytes());
        assert_eq!(h.signature, SPEC_SIGNATURE);
        assert_eq!(h.timestamp, "1614265330");
        assert_eq!(verify(&[s], &h, SPEC_BODY.as_bytes(), SPEC_TS, DEFAULT_TOLERANCE_S), Ok(()));
        assert_eq!(Secret::parse(SPEC_SECRET).unwrap().to_whsec(), SPEC_SECRET);
    }

    #[test]
    fn a_changed_body_id_or_timestamp_fails() {
        let s = [secret(1)];
        let h = sign(&s, "msg_1", 1_000, b"{}");
        assert_eq!(verify(&s, &h, b"{ }", 1_000, 300), Err(VerifyError::NoMatch));
        let other_id = SignedHeaders { id: "msg_2".into(), ..h.clone() };
        assert_eq!(verify(&s, &other_id, b"{}", 1_000, 300), Err(VerifyError::NoMatch));
        let other_ts = SignedHeaders { timestamp: "1001".into(), ..h.clone() };
        assert_eq!(verify(&s, &other_ts, b"{}", 1_000, 300), Err(VerifyError::NoMatch));
        assert_eq!(verify(&[secret(2)], &h, b"{}", 1_000, 300), Err(VerifyError::NoMatch));
    }

    #[test]
    fn the_tolerance_is_five_minutes_either_way() {
        let s = [secret(1)];
        let h = sign(&s, "msg_1", 10_000, b"x");
        assert!(verify(&s, &h, b"x", 10_300, DEFAULT_TOLERANCE_S).is_ok());
        assert!(verify(&s, &h, b"x", 9_700, DEFAULT_TOLERANCE_S).is_ok());
        assert_eq!(
            verify(&s, &h, b"x", 10_301, DEFAULT_TOLERANCE_S),
            Err(VerifyError::OutsideTolerance { off_s: 301, tolerance_s: 300 })
        );
        assert!(verify(&s, &h, b"x", 9_699, DEFAULT_TOLERANCE_S).is_err());
        let bad = SignedHeaders { timestamp: "soon".into(), ..h };
        assert_eq!(
            verify(&s, &bad, b"x", 10_000, 300),
            Err(VerifyError::BadTimestamp("soon".into()))
        );
    }

    #[test]
    fn during_a_rotation_both_secrets_sign_and_either_verifies() {
        let (old, new) = (secret(1), secret(2));
        let h = sign(&[old.clone(), new.clone()], "msg_1", 5, b"b");
        assert_eq!(h.signature.split(' ').count(), 2);
        assert!(h.signature.split(' ').all(|s| s.starts_with("v1,")));
        assert!(verify(&[old], &h, b"b", 5, 300).is_ok());
        assert!(verify(&[new], &h, b"b", 5, 300).is_ok());
        // Unknown versions and garbage are skipped, not fatal.
        let noisy = SignedHeaders { signature: format!("v1a,abc v1,!!! {}", h.signature), ..h };
        assert!(verify(&[secret(2)], &noisy, b"b", 5, 300).is_ok());
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        assert_eq!(Secret::parse("whsec_!!"), Err(SecretError::Malformed));
        assert_eq!(Secret::parse("whsec_AAAA"), Err(SecretError::Size(3)));
        let s = Secret::generate(&mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7));
        assert!(!format!("{s:?}").contains(&s.to_whsec()[6..]));
        assert_eq!(Secret::parse(&s.to_whsec()).unwrap(), s);
    }
}
