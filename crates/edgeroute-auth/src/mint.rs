//! Minting tokens and building JWKS entries, for operators and tests.
//!
//! This is the issuing side of what [`crate::KeyStore`] verifies. It takes `now` as a parameter
//! like everything else here. Private keys come in as PKCS#8 PEM (`openssl genpkey` output);
//! PKCS#1 `RSA PRIVATE KEY` PEM is accepted too. Public keys for the JWKS come in as SPKI
//! `PUBLIC KEY` PEM (`openssl pkey -pubout`) or PKCS#1 `RSA PUBLIC KEY` PEM.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey, Header};
use serde_json::{Map, Value, json};

use crate::error::MintError;
use crate::scope::Scopes;

/// A private key to sign tokens with. Each variant signs with exactly one algorithm.
#[derive(Clone)]
pub enum SigningKey {
    /// HS256 with a shared secret (the same bytes the verifier loads).
    Hs256(Vec<u8>),
    /// RS256 with an RSA private key in PEM.
    Rs256 {
        /// PKCS#8 (`PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`) PEM.
        pem: String,
    },
    /// EdDSA with an Ed25519 private key in PEM.
    EdDsa {
        /// PKCS#8 (`PRIVATE KEY`) PEM.
        pem: String,
    },
}

impl fmt::Debug for SigningKey {
    // Private material never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            SigningKey::Hs256(_) => "Hs256",
            SigningKey::Rs256 { .. } => "Rs256",
            SigningKey::EdDsa { .. } => "EdDsa",
        };
        write!(f, "SigningKey::{name}([redacted])")
    }
}

impl SigningKey {
    /// The algorithm tokens signed with this key carry.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            SigningKey::Hs256(_) => Algorithm::HS256,
            SigningKey::Rs256 { .. } => Algorithm::RS256,
            SigningKey::EdDsa { .. } => Algorithm::EdDSA,
        }
    }

    fn encoding_key(&self) -> Result<EncodingKey, MintError> {
        match self {
            SigningKey::Hs256(secret) if secret.is_empty() => {
                Err(MintError::InvalidKey("hs256 secret is empty"))
            }
            SigningKey::Hs256(secret) => Ok(EncodingKey::from_secret(secret)),
            SigningKey::Rs256 { pem } => {
                require_label(
                    pem,
                    &["PRIVATE KEY", "RSA PRIVATE KEY"],
                    "expected a private key PEM",
                )
                .map_err(MintError::InvalidKey)?;
                EncodingKey::from_rsa_pem(pem.as_bytes())
                    .map_err(|_| MintError::InvalidKey("not an RSA private key PEM"))
            }
            SigningKey::EdDsa { pem } => {
                require_label(pem, &["PRIVATE KEY"], "expected a PKCS#8 private key PEM")
                    .map_err(MintError::InvalidKey)?;
                EncodingKey::from_ed_pem(pem.as_bytes())
                    .map_err(|_| MintError::InvalidKey("not an Ed25519 private key PEM"))
            }
        }
    }
}

/// What to put in a minted token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintOptions {
    /// The tenant (`sub`); must not be empty.
    pub sub: String,
    /// Scopes, written as the space-separated `scope` claim (omitted when empty).
    pub scopes: Scopes,
    /// `aud`, as a single string.
    pub aud: Option<String>,
    /// `iss`.
    pub iss: Option<String>,
    /// Lifetime: `exp = now_unix_s + ttl_s`.
    pub ttl_s: u64,
    /// Issue time (`iat`), seconds since the Unix epoch.
    pub now_unix_s: u64,
    /// Header `kid`; needed for JWKS keys, must be absent for the HS256 secret.
    pub kid: Option<String>,
    /// `nbf`, seconds since the Unix epoch.
    pub nbf: Option<u64>,
    /// Residency claims (`jurisdictions`, `regions`), when the tenant is confined.
    pub residency: Option<crate::Residency>,
    /// Other string claims (`plan = "premium"`), which routing rules may match on: at most
    /// [`crate::claims::MAX_ATTRS`], within the verifier's key and value bounds, none of the
    /// claims above.
    pub claims: std::collections::BTreeMap<String, String>,
}

/// Signs a compact JWT with `key`.
pub fn mint(key: &SigningKey, opts: &MintOptions) -> Result<String, MintError> {
    if opts.sub.is_empty() {
        return Err(MintError::InvalidClaims("sub must not be empty"));
    }
    let exp = opts
        .now_unix_s
        .checked_add(opts.ttl_s)
        .ok_or(MintError::InvalidClaims("now_unix_s + ttl_s overflows"))?;

    let mut claims = Map::new();
    claims.insert("sub".into(), Value::from(opts.sub.as_str()));
    claims.insert("exp".into(), Value::from(exp));
    claims.insert("iat".into(), Value::from(opts.now_unix_s));
    if let Some(nbf) = opts.nbf {
        claims.insert("nbf".into(), Value::from(nbf));
    }
    if let Some(aud) = &opts.aud {
        claims.insert("aud".into(), Value::from(aud.as_str()));
    }
    if let Some(iss) = &opts.iss {
        claims.insert("iss".into(), Value::from(iss.as_str()));
    }
    if !opts.scopes.is_empty() {
        claims.insert("scope".into(), Value::from(opts.scopes.to_string()));
    }
    if let Some(r) = &opts.residency {
        for (name, list) in [("jurisdictions", &r.jurisdictions), ("regions", &r.regions)] {
            if let Some(list) = list {
                if list.is_empty() || list.len() > crate::claims::MAX_RESIDENCY_ENTRIES {
                    return Err(MintError::InvalidClaims("a residency list holds 1-64 names"));
                }
                if list.iter().any(String::is_empty) {
                    return Err(MintError::InvalidClaims("a residency name must not be empty"));
                }
                claims.insert(name.into(), Value::from(list.clone()));
            }
        }
    }

    if opts.claims.len() > crate::claims::MAX_ATTRS {
        return Err(MintError::InvalidClaims("at most 32 other claims"));
    }
    for (k, v) in &opts.claims {
        if crate::claims::is_named(k) || claims.contains_key(k) {
            return Err(MintError::InvalidClaims(
                "a claim of its own flag cannot be given as --claim",
            ));
        }
        if k.is_empty()
            || k.len() > crate::claims::MAX_ATTR_KEY
            || v.len() > crate::claims::MAX_ATTR_VALUE
        {
            return Err(MintError::InvalidClaims(
                "a claim's name is 1-64 bytes, its value at most 256",
            ));
        }
        claims.insert(k.clone(), Value::from(v.as_str()));
    }

    let mut header = Header::new(key.algorithm());
    header.kid = opts.kid.clone();
    let encoding_key = key.encoding_key()?;
    jsonwebtoken::encode(&header, &claims, &encoding_key).map_err(|e| match e.kind() {
        ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::RsaFailedSigning => MintError::InvalidKey("key cannot sign"),
        _ => MintError::Sign,
    })
}

/// Builds a JWKS entry (`{"kty": ..., "kid": ..., "use": "sig", "alg": ..., ...}`) from a public
/// key PEM: RSA keys give `n`/`e` and `alg: RS256`, Ed25519 keys give `x` and `alg: EdDSA`.
///
/// Private key PEMs are refused, so the output can never leak a private key into a JWKS.
/// Collect entries as `{"keys": [entry, ...]}` to form the file the verifier loads.
pub fn jwk_from_public_pem(pem: &str, kid: &str) -> Result<Value, MintError> {
    if kid.is_empty() {
        return Err(MintError::InvalidPublicKey("kid must not be empty"));
    }
    require_label(pem, &["PUBLIC KEY", "RSA PUBLIC KEY"], "expected a public key PEM")
        .map_err(MintError::InvalidPublicKey)?;

    if let Ok(key) = DecodingKey::from_ed_pem(pem.as_bytes()) {
        let DecodingKeyKind::SecretOrDer(x) = key.kind() else {
            return Err(MintError::InvalidPublicKey("unexpected Ed25519 key encoding"));
        };
        if x.len() != 32 {
            return Err(MintError::InvalidPublicKey("Ed25519 public key is not 32 bytes"));
        }
        return Ok(json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "kid": kid,
            "use": "sig",
            "alg": "EdDSA",
            "x": URL_SAFE_NO_PAD.encode(x),
        }));
    }

    let key = DecodingKey::from_rsa_pem(pem.as_bytes())
        .map_err(|_| MintError::InvalidPublicKey("neither an Ed25519 nor an RSA public key"))?;
    let DecodingKeyKind::SecretOrDer(der) = key.kind() else {
        return Err(MintError::InvalidPublicKey("unexpected RSA key encoding"));
    };
    let (n, e) = der::rsa_public_key(der)
        .ok_or(MintError::InvalidPublicKey("RSA public key DER is malformed"))?;
    Ok(json!({
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(n),
        "e": URL_SAFE_NO_PAD.encode(e),
    }))
}

/// Checks the label of the first PEM block, because the PEM parser below us accepts any key
/// type behind some labels (a private key would pass as a "decoding key").
fn require_label(pem: &str, allowed: &[&str], error: &'static str) -> Result<(), &'static str> {
    let label = pem
        .lines()
        .map(str::trim)
        .find_map(|line| line.strip_prefix("-----BEGIN "))
        .and_then(|rest| rest.strip_suffix("-----"));
    match label {
        Some(label) if allowed.contains(&label) => Ok(()),
        _ => Err(error),
    }
}

/// Just enough DER to read a PKCS#1 `RSAPublicKey ::= SEQUENCE { modulus INTEGER,
/// publicExponent INTEGER }`. Everything else is refused.
mod der {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;

    /// Splits one TLV with the expected tag into (content, rest).
    fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = input.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            // Long form; 0x80 (indefinite) and lengths over 4 bytes are not DER we expect.
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let (len_bytes, rest) = rest.split_at(count);
            let len = len_bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, rest)
        };
        if rest.len() < len {
            return None;
        }
        Some(rest.split_at(len))
    }

    /// A positive INTEGER's magnitude, big-endian, without leading zeros.
    fn positive_integer(input: &[u8]) -> Option<(&[u8], &[u8])> {
        let (content, rest) = tlv(input, INTEGER)?;
        if content.first()? & 0x80 != 0 {
            return None;
        }
        let start = content.iter().position(|b| *b != 0)?;
        Some((&content[start..], rest))
    }

    pub(super) fn rsa_public_key(der: &[u8]) -> Option<(&[u8], &[u8])> {
        let (body, trailing) = tlv(der, SEQUENCE)?;
        let (n, body) = positive_integer(body)?;
        let (e, body) = positive_integer(body)?;
        (body.is_empty() && trailing.is_empty()).then_some((n, e))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_short_and_long_forms() {
            let der = [0x30, 0x08, 0x02, 0x02, 0x00, 0xc5, 0x02, 0x02, 0x01, 0x01];
            assert_eq!(rsa_public_key(&der), Some((&[0xc5u8][..], &[1u8, 1][..])));
            let mut long = vec![0x30, 0x81, 0x08];
            long.extend_from_slice(&der[2..]);
            assert!(rsa_public_key(&long).is_some());
        }

        #[test]
        fn refuses_garbage() {
            assert!(rsa_public_key(&[]).is_none());
            assert!(rsa_public_key(&[0x30, 0x80]).is_none());
            assert!(rsa_public_key(&[0x30, 0x03, 0x02, 0x01, 0x80]).is_none(), "negative");
            assert!(rsa_public_key(&[0x30, 0x05, 0x02, 0x01, 0x05]).is_none(), "truncated");
            // A PKCS#1 private key starts with three integers: refused.
            let private = [0x30, 0x09, 0x02, 0x01, 0x00, 0x02, 0x01, 0x05, 0x02, 0x01, 0x03];
            assert!(rsa_public_key(&private).is_none());
            assert!(rsa_public_key(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        }
    }
}
