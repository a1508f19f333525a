//! Token verification: a pure function of (keys, policy, token, now).
//!
//! No I/O and no clock reads happen here; the caller passes `now`. The order of checks matters:
//! size first (bounded work for any input), then the header (which key, which algorithm), then
//! the signature, and only then the claims, so unauthenticated payloads are never interpreted.
//!
//! What this deliberately does not do: honour `jku`, `x5u`, `jwk` or `x5c` headers (keys come
//! only from local configuration), accept `crit` extensions (we understand none, so RFC 7515
//! §4.1.11 says reject), or check `iat` (it says nothing about validity).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::claims::Claims;
use crate::error::AuthError;
use crate::keys::KeySet;
use crate::scope::{Scope, Scopes};

/// Largest token accepted, in bytes. Real tokens are well under 2 KiB; the bound keeps the work
/// done on hostile input small and fixed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claim rules a verified token must satisfy besides its signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Required audience. When `None`, tokens that carry an `aud` are rejected (RFC 7519 §4.1.3:
    /// a recipient that does not identify itself with the audience must reject).
    pub audience: Option<String>,
    /// Required issuer; when `None`, `iss` is not checked.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
}

/// The header fields we read. Everything else (`typ`, `jku`, `jwk`, `x5u`, `x5c`, ...) is
/// ignored on purpose; a duplicate `alg` or `kid` is a parse error.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

impl KeySet {
    /// Verifies a compact JWT against this key set and `policy` at time `now_unix_s`.
    ///
    /// Key selection: a token with a `kid` is checked against the JWKS key with that id only; a
    /// token without a `kid` is checked against the HS256 secret only. JWKS keys are never
    /// chosen without a `kid`, even when just one would fit: a token that verifies today would
    /// otherwise start failing the moment a second key is added during a rotation.
    pub fn verify(
        &self,
        token: &str,
        policy: &Policy,
        now_unix_s: u64,
    ) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("expected three dot-separated segments"));
        };

        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| AuthError::Malformed("header is not base64url"))?;
        let header: RawHeader = serde_json::from_slice(&header_json)
            .map_err(|_| AuthError::Malformed("header is not a valid JSON object"))?;
        let alg = parse_alg(&header.alg)?;
        if header.crit.is_some() {
            return Err(AuthError::Malformed("critical header extensions are not supported"));
        }

        let key = self.select(header.kid.as_deref()).ok_or(AuthError::UnknownKey)?;
        // The key's pinned algorithm decides, never the header: this is what stops an HS256
        // token "signed" with an RSA public key from being checked as HMAC.
        if alg != key.alg {
            return Err(AuthError::AlgorithmMismatch);
        }
        if signature_b64.is_empty() {
            return Err(AuthError::BadSignature);
        }
        let signed_len = header_b64.len() + 1 + payload_b64.len();
        let message = &token.as_bytes()[..signed_len];
        match jsonwebtoken::crypto::verify(signature_b64, message, &key.key, key.alg) {
            Ok(true) => {}
            Ok(false) => return Err(AuthError::BadSignature),
            Err(_) => return Err(AuthError::Malformed("signature is not base64url")),
        }

        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| AuthError::Malformed("payload is not base64url"))?;
        let mut claims = Claims::from_json(&payload)?;
        check_claims(&mut claims, policy, now_unix_s)?;
        Ok(claims)
    }
}

/// Maps the header `alg` to an algorithm we can verify. `none` in any spelling, HS384/HS512 and
/// the EC algorithms are refused: no configured key could be pinned to them.
fn parse_alg(alg: &str) -> Result<Algorithm, AuthError> {
    Ok(match alg {
        "HS256" => Algorithm::HS256,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "EdDSA" => Algorithm::EdDSA,
        _ => return Err(AuthError::UnsupportedAlgorithm),
    })
}

/// Time, issuer and audience rules. The audience rule is the configured one, or, for a token
/// holding the `admin` scope, an admin audience (see [`crate::admin`]); a token accepted only
/// through its admin audience loses its `inference` scope.
fn check_claims(claims: &mut Claims, policy: &Policy, now: u64) -> Result<(), AuthError> {
    // A token is valid strictly before `exp` (RFC 7519 §4.1.4), widened by the leeway.
    if now >= claims.exp.saturating_add(policy.leeway_s) {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.nbf
        && nbf > now.saturating_add(policy.leeway_s)
    {
        return Err(AuthError::NotYetValid);
    }
    if let Some(issuer) = &policy.issuer
        && claims.iss.as_deref() != Some(issuer.as_str())
    {
        return Err(AuthError::WrongIssuer);
    }
    let configured = match &policy.audience {
        Some(audience) => claims.aud.iter().any(|a| a == audience),
        None => claims.aud.is_empty(),
    };
    if configured {
        return Ok(());
    }
    if claims.scope.contains(Scope::Admin)
        && claims.aud.iter().any(|a| crate::admin::is_admin_audience(a))
    {
        claims.scope = Scopes::from(Scope::Admin);
        return Ok(());
    }
    Err(AuthError::WrongAudience)
}

/// Extracts the token from an `Authorization` header value (`Bearer <token>`; the scheme is
/// case-insensitive per RFC 7235). Absent header, another scheme or an empty token is
/// [`AuthError::Missing`].
pub fn parse_bearer(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::Missing)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Missing);
    }
    let token = token.trim_matches(' ');
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        assert_eq!(parse_bearer(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(parse_bearer(Some("bearer  abc ")).unwrap(), "abc");
        for bad in [None, Some("Basic abc"), Some("Bearer"), Some("Bearer   "), Some("")] {
            assert!(matches!(parse_bearer(bad), Err(AuthError::Missing)), "{bad:?}");
        }
    }

    fn claims(exp: u64, nbf: Option<u64>) -> Claims {
        Claims {
            sub: "t".into(),
            exp,
            nbf,
            iat: None,
            aud: vec![],
            iss: None,
            scope: crate::Scopes::EMPTY,
            jurisdictions: None,
            regions: None,
            attrs: Default::default(),
        }
    }

    #[test]
    fn expiry_boundaries_with_leeway() {
        let p = Policy { leeway_s: 30, ..Policy::default() };
        assert!(check_claims(&mut claims(100, None), &p, 129).is_ok());
        assert!(matches!(check_claims(&mut claims(100, None), &p, 130), Err(AuthError::Expired)));
        let strict = Policy::default();
        assert!(check_claims(&mut claims(100, None), &strict, 99).is_ok());
        assert!(matches!(
            check_claims(&mut claims(100, None), &strict, 100),
            Err(AuthError::Expired)
        ));
        assert!(check_claims(&mut claims(u64::MAX, None), &p, u64::MAX - 1).is_ok());
    }

    #[test]
    fn nbf_boundaries_with_leeway() {
        let p = Policy { leeway_s: 30, ..Policy::default() };
        assert!(check_claims(&mut claims(1000, Some(130)), &p, 100).is_ok());
        assert!(matches!(
            check_claims(&mut claims(1000, Some(131)), &p, 100),
            Err(AuthError::NotYetValid)
        ));
    }

    fn with(aud: &[&str], scope: &str) -> Claims {
        Claims {
            aud: aud.iter().map(|a| (*a).to_owned()).collect(),
            scope: crate::Scopes::parse(scope),
            ..claims(1000, None)
        }
    }

    #[test]
    fn an_admin_audience_admits_admin_tokens_only() {
        let open = Policy::default();
        let api = Policy { audience: Some("api".into()), ..Policy::default() };
        for p in [&open, &api] {
            let mut c = with(&["edgeroute:node:a"], "admin inference");
            assert!(check_claims(&mut c, p, 1).is_ok());
            assert_eq!(c.scope, Scopes::from(Scope::Admin), "inference dropped");
            let mut c = with(&["edgeroute:fleet"], "inference");
            assert!(matches!(check_claims(&mut c, p, 1), Err(AuthError::WrongAudience)));
            let mut c = with(&["elsewhere"], "admin");
            assert!(matches!(check_claims(&mut c, p, 1), Err(AuthError::WrongAudience)));
        }
        // The configured audience keeps every scope.
        let mut c = with(&["api", "edgeroute:fleet"], "admin inference");
        assert!(check_claims(&mut c, &api, 1).is_ok());
        assert_eq!(c.scope.to_string(), "inference admin");
        let mut c = with(&[], "admin inference");
        assert!(check_claims(&mut c, &open, 1).is_ok());
        assert_eq!(c.scope.to_string(), "inference admin");
    }

    #[test]
    fn alg_names_are_exact() {
        for bad in ["none", "None", "NONE", "hs256", "HS384", "ES256", ""] {
            assert!(matches!(parse_alg(bad), Err(AuthError::UnsupportedAlgorithm)), "{bad}");
        }
    }
}
