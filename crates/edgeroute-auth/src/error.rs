//! Error types: what went wrong verifying a token, loading keys, or minting.
//!
//! `AuthError` is what the gateway maps to an HTTP answer, so every message here is written to be
//! shown to a client: it names the rule that failed and never includes key material, secrets or
//! token contents. Load errors name files and sizes, which are operator facts, not secrets.

use std::path::PathBuf;

use crate::scope::Scope;

/// Why a request was not authenticated (or, for [`AuthError::KeyLoad`], why keys could not be
/// loaded).
///
/// `verify` never returns `KeyLoad`; only construction and [`crate::KeyStore::reload`] do.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No bearer credentials were presented.
    #[error("missing bearer token")]
    Missing,
    /// The token is longer than [`crate::MAX_TOKEN_BYTES`].
    #[error("token too large")]
    TooLarge,
    /// The token is not a well-formed compact JWS/JWT.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm this service does not accept (including `none`).
    #[error("unsupported token algorithm")]
    UnsupportedAlgorithm,
    /// No configured key matches the token's `kid` (or the token has no `kid` and no default key
    /// applies).
    #[error("unknown signing key")]
    UnknownKey,
    /// The header algorithm differs from the one the selected key is pinned to.
    #[error("token algorithm does not match the signing key")]
    AlgorithmMismatch,
    /// The signature does not verify with the selected key.
    #[error("invalid token signature")]
    BadSignature,
    /// A claim is missing or has the wrong type or range (the claim name is given).
    #[error("invalid or missing claim `{0}`")]
    InvalidClaim(&'static str),
    /// `exp` is in the past, beyond the configured leeway.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future, beyond the configured leeway.
    #[error("token not yet valid")]
    NotYetValid,
    /// The token's `aud` does not contain the configured audience (or carries an audience when
    /// none is configured).
    #[error("token audience not accepted")]
    WrongAudience,
    /// The token's `iss` differs from the configured issuer.
    #[error("token issuer not accepted")]
    WrongIssuer,
    /// The token is valid but lacks the scope the endpoint requires.
    #[error("insufficient scope: `{required}` required")]
    InsufficientScope {
        /// The scope the endpoint requires.
        required: Scope,
    },
    /// Keys could not be loaded (start-up or reload). Never returned by `verify`.
    #[error(transparent)]
    KeyLoad(#[from] KeyLoadError),
}

impl AuthError {
    /// The HTTP status this error maps to: 401 for credential problems, 403 for a valid token
    /// without the required scope, 500 for key-loading failures.
    /// The OpenAI-style error `code` for an answer refusing the request.
    pub fn api_code(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Expired => "token_expired",
            Self::InsufficientScope { .. } => "insufficient_scope",
            _ => "invalid_token",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            Self::InsufficientScope { .. } => 403,
            Self::KeyLoad(_) => 500,
            _ => 401,
        }
    }

    /// The RFC 6750 `error` code for the `WWW-Authenticate: Bearer` challenge, if any.
    ///
    /// A request without credentials gets a challenge without an error code (RFC 6750 §3.1).
    pub fn bearer_error_code(&self) -> Option<&'static str> {
        match self {
            Self::Missing | Self::KeyLoad(_) => None,
            Self::InsufficientScope { .. } => Some("insufficient_scope"),
            _ => Some("invalid_token"),
        }
    }
}

/// Why a key set could not be loaded. The previous key set (if any) stays in force.
#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    /// A key file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The environment variable named by `hs256_secret_env` is unset or not UTF-8.
    #[error("environment variable {var} is unset or not valid UTF-8")]
    Env {
        /// The variable's name.
        var: String,
    },
    /// The HS256 secret is shorter than `min_secret_bytes`.
    #[error("hs256 secret is {len} bytes; at least {min} are required")]
    SecretTooShort {
        /// Length of the secret that was found.
        len: usize,
        /// The configured minimum.
        min: usize,
    },
    /// The JWKS document is not acceptable (malformed JSON or an invalid supported key).
    #[error("invalid jwks: {0}")]
    Jwks(String),
    /// The configuration itself is inconsistent.
    #[error("invalid auth config: {0}")]
    Config(String),
}

/// Why a token or JWK could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The key could not be parsed or used for signing.
    #[error("invalid signing key: {0}")]
    InvalidKey(&'static str),
    /// The public key PEM could not be turned into a JWK.
    #[error("invalid public key: {0}")]
    InvalidPublicKey(&'static str),
    /// The requested claims are not acceptable.
    #[error("invalid claims: {0}")]
    InvalidClaims(&'static str),
    /// Signing failed inside the JWT library.
    #[error("signing failed")]
    Sign,
}
