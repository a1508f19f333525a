//! `AuthConfig`: where keys come from and which claims are required.
//!
//! A plain serde struct that arrives from the node's config file. Unknown keys are errors so a
//! typo (`audiance`) fails start-up instead of silently disabling a check. Nothing here reads a
//! file or the environment; [`crate::KeyStore::from_config`] does, once at start-up and then on
//! each reload.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::KeyLoadError;
use crate::verify::Policy;

/// Default clock-skew tolerance on `exp`/`nbf`, in seconds.
pub const DEFAULT_LEEWAY_S: u64 = 30;
/// Largest leeway accepted: beyond this, `exp` stops meaning much.
pub const MAX_LEEWAY_S: u64 = 300;
/// Default minimum HS256 secret length in bytes (256 bits, RFC 7518 §3.2).
pub const DEFAULT_MIN_SECRET_BYTES: usize = 32;
/// Default key-file polling interval in milliseconds.
pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 1000;
/// Default number of verified tokens remembered.
pub const DEFAULT_VERIFIED_CACHE_ENTRIES: usize = 1024;

/// Authentication settings for the gateway.
///
/// At least one key source must be set: an HS256 secret (from a file or an environment
/// variable, not both) and/or a JWKS file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File holding the HS256 shared secret as raw bytes; one trailing newline (`\n` or
    /// `\r\n`) is trimmed. Re-read on reload. Default: none.
    pub hs256_secret_file: Option<PathBuf>,
    /// Name of an environment variable holding the HS256 secret (UTF-8). Read once, by the
    /// config loader's environment lookup ([`AuthConfig::resolve_env`]). Default: none.
    pub hs256_secret_env: Option<String>,
    /// The value of `hs256_secret_env`, as the loader's lookup found it (never from the file).
    #[serde(skip)]
    pub hs256_secret_from_env: Secret,
    /// JWKS file with RS256/PS*/EdDSA public keys, selected by `kid`. Re-read on reload.
    /// Default: none.
    pub jwks_file: Option<PathBuf>,
    /// Required `aud`. When unset, tokens carrying any `aud` are rejected. Default: none.
    pub audience: Option<String>,
    /// Required `iss`. When unset, `iss` is not checked. Default: none.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds; at most 300. Default: 30.
    pub leeway_s: u64,
    /// Shortest HS256 secret accepted, in bytes; shorter secrets fail the load. At least 32
    /// (256 bits, RFC 7518 §3.2): a lower value is a config error. Default: 32.
    pub min_secret_bytes: usize,
    /// How often key files are checked for changes, in milliseconds; 0 disables polling.
    /// Default: 1000.
    pub reload_interval_ms: u64,
    /// Tokens whose verification is remembered (tenant, scopes, validity window), so a
    /// session's repeated token skips the signature check; a key reload forgets them all.
    /// Rounded up to a power of two; 0 disables the cache. Default: 1024.
    pub verified_cache_entries: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret_file: None,
            hs256_secret_env: None,
            hs256_secret_from_env: Secret::default(),
            jwks_file: None,
            audience: None,
            issuer: None,
            leeway_s: DEFAULT_LEEWAY_S,
            min_secret_bytes: DEFAULT_MIN_SECRET_BYTES,
            reload_interval_ms: DEFAULT_RELOAD_INTERVAL_MS,
            verified_cache_entries: DEFAULT_VERIFIED_CACHE_ENTRIES,
        }
    }
}

/// A secret read from the environment: compared, cloned, never printed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Option<String>);

impl Secret {
    pub fn new(value: Option<String>) -> Secret {
        Secret(value)
    }

    pub fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Secret(<redacted>)" } else { "Secret(None)" })
    }
}

impl AuthConfig {
    /// Reads `hs256_secret_env` through the caller's environment lookup (the config loader's
    /// seam: libraries never read the process environment themselves).
    pub fn resolve_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        self.hs256_secret_from_env = Secret(self.hs256_secret_env.as_deref().and_then(env));
    }

    /// The reload polling interval.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }

    /// The claim rules this config asks for.
    pub fn policy(&self) -> Policy {
        Policy {
            audience: self.audience.clone(),
            issuer: self.issuer.clone(),
            leeway_s: self.leeway_s,
        }
    }

    /// Checks the settings that do not need any file: a key source is named, the secret has
    /// one source only, and the leeway is sane.
    pub fn validate(&self) -> Result<(), KeyLoadError> {
        if self.hs256_secret_file.is_some() && self.hs256_secret_env.is_some() {
            return Err(KeyLoadError::Config(
                "set hs256_secret_file or hs256_secret_env, not both".into(),
            ));
        }
        if self.hs256_secret_file.is_none()
            && self.hs256_secret_env.is_none()
            && self.jwks_file.is_none()
        {
            return Err(KeyLoadError::Config(
                "no key source: set hs256_secret_file, hs256_secret_env or jwks_file".into(),
            ));
        }
        if self.leeway_s > MAX_LEEWAY_S {
            return Err(KeyLoadError::Config(format!(
                "leeway_s is {}; at most {MAX_LEEWAY_S} is allowed",
                self.leeway_s
            )));
        }
        if self.min_secret_bytes < DEFAULT_MIN_SECRET_BYTES {
            return Err(KeyLoadError::Config(format!(
                "min_secret_bytes is {}; HS256 secrets need at least {DEFAULT_MIN_SECRET_BYTES} bytes (256 bits)",
                self.min_secret_bytes
            )));
        }
        if matches!(&self.audience, Some(a) if a.is_empty()) {
            return Err(KeyLoadError::Config("audience must not be empty".into()));
        }
        if matches!(&self.issuer, Some(i) if i.is_empty()) {
            return Err(KeyLoadError::Config("issuer must not be empty".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_and_unknown_keys_are_rejected() {
        let cfg: AuthConfig = serde_json::from_str(r#"{"jwks_file":"/k.json"}"#).unwrap();
        assert_eq!(cfg.leeway_s, 30);
        assert_eq!(cfg.min_secret_bytes, 32);
        assert_eq!(cfg.reload_interval(), Duration::from_secs(1));
        assert!(serde_json::from_str::<AuthConfig>(r#"{"audiance":"x"}"#).is_err());
    }

    #[test]
    fn validate_catches_inconsistent_settings() {
        assert!(AuthConfig::default().validate().is_err(), "no key source");
        let both = AuthConfig {
            hs256_secret_file: Some("/s".into()),
            hs256_secret_env: Some("S".into()),
            ..AuthConfig::default()
        };
        assert!(both.validate().is_err());
        let wide =
            AuthConfig { jwks_file: Some("/k".into()), leeway_s: 3600, ..AuthConfig::default() };
        assert!(wide.validate().unwrap_err().to_string().contains("leeway_s"));
        let weak = AuthConfig {
            hs256_secret_file: Some("/s".into()),
            min_secret_bytes: 16,
            ..AuthConfig::default()
        };
        let e = weak.validate().unwrap_err().to_string();
        assert!(e.contains("min_secret_bytes") && e.contains("32"), "{e}");
    }
}
