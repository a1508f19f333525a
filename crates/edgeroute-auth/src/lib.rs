//! JWT authentication for the edge node gateway: verify bearer tokens against locally stored
//! keys, rotate those keys without a restart, and mint tokens for operators and tests.
//!
//! Verification is on every request's path, so it does no I/O and reads no clock: keys live in
//! memory ([`KeyStore`], swapped lock-free on reload) and the caller passes `now`. Keys come
//! from local files or the environment only; nothing is ever fetched over the network, and
//! token headers that point at keys (`jku`, `x5u`, `jwk`, `x5c`) are ignored.
//!
//! Algorithms: HS256 (one shared secret, used for tokens without a `kid`), RS256/PS* and EdDSA
//! (public keys from a JWKS file, selected by `kid`). Each key is pinned to one algorithm and a
//! token whose header names another is rejected, which rules out `alg: none` and algorithm
//! confusion.
//!
//! Admin tokens: the `admin` scope plus an audience naming where the token is valid (a node, a
//! region or the fleet; see [`admin`]). Mint them with EdDSA, the default: a node then holds
//! only public keys (its JWKS file), so only the operator's private key can mint admin tokens.
//! An HS256 secret lets every node that verifies also mint; keep it for inference tokens and
//! labs. HS256 secrets are at least 32 bytes ([`DEFAULT_MIN_SECRET_BYTES`] is also the floor of
//! `min_secret_bytes`).
//!
//! This crate does not know about HTTP: the gateway extracts the header with [`parse_bearer`],
//! calls [`KeyStore::verify`], checks scopes with [`Claims::require_scope`], and maps
//! [`AuthError`] to a response with [`AuthError::http_status`] and
//! [`AuthError::bearer_error_code`].

pub mod admin;
pub mod cache;
mod claims;
mod config;
mod error;
mod keys;
mod mint;
mod scope;
mod store;
mod verify;

pub use cache::{Residency, Verified};
pub use claims::Claims;
pub use config::{
    AuthConfig, DEFAULT_LEEWAY_S, DEFAULT_MIN_SECRET_BYTES, DEFAULT_RELOAD_INTERVAL_MS,
    DEFAULT_VERIFIED_CACHE_ENTRIES, MAX_LEEWAY_S, Secret,
};
pub use error::{AuthError, KeyLoadError, MintError};
pub use keys::KeySet;
pub use mint::{MintOptions, SigningKey, jwk_from_public_pem, mint};
pub use scope::{Scope, Scopes};
pub use store::{KeyStore, spawn_reloader};
pub use verify::{MAX_TOKEN_BYTES, Policy, parse_bearer};
