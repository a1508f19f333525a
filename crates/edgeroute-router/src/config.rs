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
    /// Async jobs: OpenAI's Batch API and single async requests with webhooks. Absent: the
    /// routes answer 404 saying so.
    #[serde(default)]
    pub jobs: Option<JobsSection>,
    /// The topology bus the region's router replicas share their node ejections on (NATS in
    /// production; `embedded` shares only between replicas of one process). Absent: each
    /// replica learns alone.
    #[serde(default)]
    pub bus: Option<edgeroute_bus::BusConfig>,
}

/// `[jobs]`: where jobs are kept, how this replica works them, who it signs webhooks as.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsSection {
    /// `sqlite:<path>` (one file, the embedded default) or `postgres://…` (several replicas
    /// of a region share it). Required.
    pub store: String,
    /// The PostgreSQL schema. Default `edgeroute_jobs`.
    #[serde(default = "default_schema")]
    pub postgres_schema: String,
    /// Items this replica runs at once (each also takes a `batch`-class admission place, so
    /// interactive traffic goes first). Default 16.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// How long a claimed item is this replica's before another may take it (renewed while
    /// it runs). Default 60000.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// How often leases, expiry and finalizing are checked, and the store polled when no
    /// wake-up came. Default 1000.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// After the fleet had no capacity for an item, claims pause this long. Default 1000.
    #[serde(default = "default_backoff_ms")]
    pub busy_backoff_ms: u64,
    /// The longest completion window a batch may ask for, s (OpenAI's is `24h`). Default 86400.
    #[serde(default = "default_max_window_s")]
    pub max_completion_window_s: u64,
    /// NATS URL for wake-ups and cancel fan-out between replicas (the store stays the truth:
    /// without it, replicas poll every `tick_ms`). Used only without a NATS `[bus]`: when the
    /// router has one, its connection (and credentials) carries these too.
    #[serde(default)]
    pub nats_url: Option<String>,
    /// The key the router signs the tenant's short-lived tokens with when it runs a job's
    /// items later (the submitting token may have expired by then); nodes must trust it (its
    /// public key in their JWKS, or the shared HS256 secret). Required with `[auth]`.
    #[serde(default)]
    pub delegation_key_file: Option<PathBuf>,
    /// `eddsa` (default), `rs256` or `hs256`.
    #[serde(default = "default_delegation_alg")]
    pub delegation_alg: String,
    /// The `kid` of the delegation key (JWKS keys).
    #[serde(default)]
    pub delegation_kid: Option<String>,
    /// Lifetime of a delegated token, s. Default 300.
    #[serde(default = "default_delegation_ttl_s")]
    pub delegation_ttl_s: u64,
    /// Standard Webhooks secrets (`whsec_…`), newest first: every one signs (rotation).
    #[serde(default)]
    pub webhook_secret_files: Vec<PathBuf>,
    /// Hosts webhooks may reach over `http` or at internal addresses (an operator's own
    /// receivers); everything else must be public `https`.
    #[serde(default)]
    pub webhook_allowed_hosts: Vec<String>,
    /// One webhook attempt's time limit, ms. Default 10000.
    #[serde(default = "default_webhook_timeout_ms")]
    pub webhook_timeout_ms: u64,
    /// Attempts before a webhook is given up (the job stays pollable). Default 8.
    #[serde(default = "default_webhook_attempts")]
    pub webhook_max_attempts: u32,
    /// First retry delay, ms (doubling, jittered, capped at an hour). Default 5000.
    #[serde(default = "default_webhook_first_delay_ms")]
    pub webhook_first_delay_ms: u64,
}

fn default_schema() -> String {
    "edgeroute_jobs".into()
}
fn default_workers() -> usize {
    16
}
fn default_lease_ms() -> u64 {
    60_000
}
fn default_tick_ms() -> u64 {
    1000
}
fn default_backoff_ms() -> u64 {
    1000
}
fn default_max_window_s() -> u64 {
    86_400
}
fn default_delegation_alg() -> String {
    "eddsa".into()
}
fn default_delegation_ttl_s() -> u64 {
    300
}
fn default_webhook_timeout_ms() -> u64 {
    10_000
}
fn default_webhook_attempts() -> u32 {
    8
}
fn default_webhook_first_delay_ms() -> u64 {
    5_000
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
    /// Never send a node more requests at once than its slots (its capacity, from discovery
    /// and its load reports): a full node is passed over, and when every eligible node is
    /// full a request waits (up to `first_token_timeout_ms`) and is then refused 503
    /// `fleet_saturated` with `Retry-After`. Default true.
    #[serde(default = "default_true")]
    pub respect_node_capacity: bool,
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
            respect_node_capacity: true,
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

fn default_true() -> bool {
    true
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
        if let Some(j) = &self.jobs {
            j.validate(self.auth.is_some())?;
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

impl JobsSection {
    fn validate(&self, auth: bool) -> Result<(), ConfigError> {
        if !(self.store.starts_with("sqlite:")
            || self.store.starts_with("postgres://")
            || self.store.starts_with("postgresql://"))
        {
            return Err(invalid("jobs.store", "`sqlite:<path>` or `postgres://…`"));
        }
        for (key, v) in [
            ("jobs.workers", self.workers as u64),
            ("jobs.lease_ms", self.lease_ms),
            ("jobs.tick_ms", self.tick_ms),
            ("jobs.max_completion_window_s", self.max_completion_window_s),
            ("jobs.delegation_ttl_s", self.delegation_ttl_s),
            ("jobs.webhook_timeout_ms", self.webhook_timeout_ms),
            ("jobs.webhook_max_attempts", u64::from(self.webhook_max_attempts)),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.lease_ms < 3000 {
            return Err(invalid("jobs.lease_ms", "at least 3 s: leases are renewed at a third"));
        }
        if auth && self.delegation_key_file.is_none() {
            return Err(invalid(
                "jobs.delegation_key_file",
                "with [auth], a job's items run after the submitting token may have expired: \
                 name a key the nodes trust to sign the tenant's short-lived tokens",
            ));
        }
        if !["eddsa", "rs256", "hs256"].contains(&self.delegation_alg.as_str()) {
            return Err(invalid("jobs.delegation_alg", "`eddsa`, `rs256` or `hs256`"));
        }
        Ok(())
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
        let jobs = |extra: &str| format!("{open}[jobs]\nstore = \"sqlite:/tmp/j.db\"\n{extra}");
        assert!(RouterConfig::from_toml(&jobs("")).is_ok());
        assert!(err(&format!("{open}[jobs]\nstore = \"mysql://x\"\n")).contains("jobs.store"));
        assert!(err(&jobs("workers = 0\n")).contains("jobs.workers"));
        assert!(err(&jobs("delegation_alg = \"none\"\n")).contains("jobs.delegation_alg"));
        let authed = format!(
            "{base}[auth]\nhs256_secret_file = \"/s\"\n[jobs]\nstore = \"sqlite:/tmp/j.db\"\n"
        );
        assert!(err(&authed).contains("jobs.delegation_key_file"));
    }
}
