//! `edgeroute router --config router.toml`: every key, its default, and the checks serde
//! cannot make. A mistake names its key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use edgeroute_http::tls::TlsSection;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub router: RouterSection,
    /// How tenants' tokens are verified (the node's `[auth]`). Required unless
    /// `router.allow_unauthenticated` (loopback labs only).
    #[serde(default)]
    pub auth: Option<edgeroute_auth::AuthConfig>,
    /// TLS for the public listener; absent: plain HTTP (refused on a non-loopback address
    /// unless `router.insecure_public`).
    #[serde(default)]
    pub tls: Option<TlsSection>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSection {
    /// This replica's name (answers' `x-edgeroute-router`). Default `router`.
    #[serde(default = "default_id")]
    pub id: String,
    #[serde(default)]
    pub region: String,
    /// Default `127.0.0.1:8090`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Discovery base URLs, tried in order. Required.
    #[serde(default)]
    pub discovery: Vec<String>,
    /// Serve without `[auth]`: every caller is the tenant `anonymous` and the nodes see no
    /// token. For loopback labs only; refused on a non-loopback `listen`.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Serve plaintext (no `[tls]`) on a non-loopback address. Default false.
    #[serde(default)]
    pub insecure_public: bool,
    /// Tenants' tokens may go over plaintext to nodes on a private network. Default false.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// PEM roots for `https://` nodes and discovery (the fleet's CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A stream's first token must arrive within this, else the request moves on. Default 3000.
    #[serde(default = "default_first_token_ms")]
    pub first_token_timeout_ms: u64,
}

impl Default for RouterSection {
    fn default() -> Self {
        RouterSection {
            id: default_id(),
            region: String::new(),
            listen: default_listen(),
            discovery: vec![],
            allow_unauthenticated: false,
            insecure_public: false,
            allow_plaintext: false,
            ca_file: None,
            first_token_timeout_ms: default_first_token_ms(),
        }
    }
}

fn default_id() -> String {
    "router".into()
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8090))
}

fn default_first_token_ms() -> u64 {
    3000
}

/// Every limit, explicit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Requests per second per tenant (GCRA), and the burst above it. Default 50 and 100.
    pub rate_limit_per_s: u32,
    pub rate_limit_burst: u32,
    /// Requests the router runs at once, all tenants (what the fleet behind it takes).
    /// Default 512.
    pub total_in_flight: u32,
    /// Requests one tenant runs at once. Default 64.
    pub tenant_in_flight: u32,
    /// Requests one tenant may have waiting for capacity; past it, 429. Default 128.
    pub tenant_queue: u32,
    /// Longest wait for capacity, ms; past it, 503 with `Retry-After`. Default 2000.
    pub queue_timeout_ms: u64,
    /// Largest request body, bytes. Default 4 MiB.
    pub max_body_bytes: usize,
    /// Sessions kept at once (least recently used out first). Default 10,000.
    pub max_sessions: usize,
    /// A session unused this long is dropped, s. Default 600.
    pub session_idle_s: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rate_limit_per_s: 50,
            rate_limit_burst: 100,
            total_in_flight: 512,
            tenant_in_flight: 64,
            tenant_queue: 128,
            queue_timeout_ms: 2000,
            max_body_bytes: 4 << 20,
            max_sessions: 10_000,
            session_idle_s: 600,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("router config: {0}")]
    Parse(String),
    #[error("router config `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

impl RouterConfig {
    pub fn from_toml(text: &str) -> Result<RouterConfig, ConfigError> {
        let cfg: RouterConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.router;
        if r.discovery.is_empty() {
            return Err(invalid("router.discovery", "name at least one discovery URL"));
        }
        let loopback = r.listen.ip().is_loopback();
        if self.auth.is_none() && !r.allow_unauthenticated {
            return Err(invalid(
                "auth",
                "no [auth] section: configure JWT keys, or set router.allow_unauthenticated = true (loopback labs only)",
            ));
        }
        if r.allow_unauthenticated && !loopback {
            return Err(invalid(
                "router.allow_unauthenticated",
                format!("refused on {}: an open router is for loopback labs only", r.listen),
            ));
        }
        if self.tls.is_none() && !loopback && !r.insecure_public {
            return Err(invalid(
                "tls",
                format!(
                    "{} is not loopback: configure [tls], or set router.insecure_public = true",
                    r.listen
                ),
            ));
        }
        if r.id.is_empty()
            || !r.id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid("router.id", "1+ characters of [A-Za-z0-9._-]"));
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.rate_limit_per_s", u64::from(l.rate_limit_per_s)),
            ("limits.rate_limit_burst", u64::from(l.rate_limit_burst)),
            ("limits.total_in_flight", u64::from(l.total_in_flight)),
            ("limits.tenant_in_flight", u64::from(l.tenant_in_flight)),
            ("limits.max_body_bytes", l.max_body_bytes as u64),
            ("limits.max_sessions", l.max_sessions as u64),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if l.queue_timeout_ms > 60_000 {
            return Err(invalid(
                "limits.queue_timeout_ms",
                "at most 60000: a caller waiting longer has gone",
            ));
        }
        Ok(())
    }

    pub fn admission(&self) -> crate::admission::Limits {
        let l = &self.limits;
        crate::admission::Limits {
            total_in_flight: l.total_in_flight,
            tenant_in_flight: l.tenant_in_flight,
            tenant_queue: l.tenant_queue,
            queue_timeout: Duration::from_millis(l.queue_timeout_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    #[test]
    fn mistakes_name_their_key() {
        let err = |s: &str| RouterConfig::from_toml(s).unwrap_err().to_string();
        let base = "[router]\ndiscovery = [\"http://127.0.0.1:7070\"]\n";
        assert!(err("[router]\n").contains("router.discovery"));
        assert!(err(base).contains("[auth]"));
        let open = format!("{base}allow_unauthenticated = true\n");
        assert!(RouterConfig::from_toml(&open).is_ok());
        let public = format!("{open}listen = \"0.0.0.0:8090\"\n");
        assert!(err(&public).contains("router.allow_unauthenticated"));
        assert!(
            err(&format!("{open}[limits]\ntenant_in_flight = 0\n"))
                .contains("limits.tenant_in_flight")
        );
        assert!(
            err(&format!("{open}[limits]\nqueue_timeout_ms = 99999\n"))
                .contains("queue_timeout_ms")
        );
        assert!(err(&format!("{open}[limits]\ntenant_inflight = 3\n")).contains("tenant_inflight"));
        let auth = format!("{base}listen = \"0.0.0.0:8090\"\n[auth]\nhs256_secret_file = \"/s\"\n");
        assert!(err(&auth).contains("[tls]"), "plaintext on a public address");
    }
}
