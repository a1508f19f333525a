//! Discovery's configuration: one TOML file, strictly parsed, every default documented here.
//!
//! Unknown keys are errors naming the key. `EDGEROUTE_LISTEN` and `EDGEROUTE_REGION` override
//! the file. Only the binary reads files and the environment; this module turns text and an env
//! lookup into a validated [`DiscoveryConfig`].

use std::net::SocketAddr;
use std::time::Duration;

use edgeroute_core::health::HealthParams;
use edgeroute_core::score::{Strategy, Weights};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid discovery config: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid discovery config: {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_owned(), message: message.into() }
}

pub(crate) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    #[serde(default)]
    pub discovery: Section,
    /// TLS termination. Absent: plain HTTP.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// JWT verification keys (as the node's `[auth]`). Required unless
    /// `discovery.allow_unauthenticated = true`. With them, `/v1/discover` needs an
    /// inference-scoped token, and `explain=true`, `/v1/nodes` and `/v1/topology` an
    /// admin-scoped one. `/health` and `/metrics` are open.
    #[serde(default)]
    pub auth: Option<edgeroute_auth::AuthConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub probe: ProbeConfig,
    /// What a node only the topology bus knows must prove before it is probed and served.
    #[serde(default)]
    pub announced: AnnouncedConfig,
    #[serde(default)]
    pub health: HealthConfig,
    /// Correctness probes: a fixed prompt's answer checked, not only `/health` (issue 16).
    #[serde(default)]
    pub correctness: CorrectnessConfig,
    #[serde(default)]
    pub scoring: ScoringConfig,
    #[serde(default)]
    pub serving: ServingConfig,
    /// Nodes known from configuration (others announce themselves on the bus).
    #[serde(default)]
    pub nodes: Vec<StaticNode>,
    /// The topology bus to follow. Absent: only `[[nodes]]` and their `/health`.
    #[serde(default)]
    pub bus: Option<edgeroute_bus::BusConfig>,
    /// Region → jurisdiction (`toronto = "ca"`). A node's jurisdiction is its entry in
    /// `[node_jurisdictions]`, else its region's here, else its region's in the routing
    /// policy's `[jurisdictions]`. Neither a node's `/health` nor the bus carries one yet. A node
    /// of no known jurisdiction is never answered to a token with a `jurisdictions` claim.
    #[serde(default)]
    pub jurisdictions: std::collections::BTreeMap<String, String>,
    /// Node id → jurisdiction, overriding its region's (a node whose jurisdiction is not its
    /// region's, such as a border site).
    #[serde(default)]
    pub node_jurisdictions: std::collections::BTreeMap<String, String>,
    /// The routing policy (`docs/policy.md`). Absent: discovery ranks by its own scoring.
    #[serde(default)]
    pub policy: Option<PolicySection>,
}

/// Where the routing policy comes from (a file, or the topology bus), how often a file is
/// checked for a new text, and an optional shadow policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// `file` (default): `file` is read at start (a bad one refuses to start), then polled.
    /// `bus`: the policy an admin pushes on the topology bus (`edgeroute policy push`); the
    /// current text arrives at start (until then requests are scored as without a policy)
    /// and each new one after; needs `[bus]` and refuses `file`. Either way a new text is
    /// parsed, checked against the fleet and swapped in whole; a refused text leaves the last
    /// good policy in force.
    #[serde(default)]
    pub source: crate::routing::Source,
    /// The policy document (`source = "file"`; required then). A new text is one whose mtime
    /// or length changed.
    #[serde(default)]
    pub file: Option<std::path::PathBuf>,
    /// How often the file's (and the shadow file's) mtime and length are checked, ms.
    /// Default 1000; 50 to 3,600,000.
    #[serde(default = "default_reload_ms")]
    pub reload_interval_ms: u64,
    /// A candidate policy evaluated beside the live one: every request the live policy
    /// decides, the shadow decides too, and the two are compared (model, version, tier or
    /// pool, first node) and counted (`/health` `policy.shadow`, `/metrics`
    /// `edgeroute_discovery_policy_shadow_total{result}`); it never changes an answer. Polled
    /// like `file`; a bad text is refused (the previous shadow stays). Default: none.
    #[serde(default)]
    pub shadow_file: Option<std::path::PathBuf>,
    /// Differing requests `/health` keeps as examples (the latest). Default 8; at most 64.
    #[serde(default = "default_shadow_examples")]
    pub shadow_max_examples: usize,
}

fn default_shadow_examples() -> usize {
    8
}

fn default_reload_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Section {
    /// This replica's id, reported in `/health` and `x-edgeroute-discovery`. Default `discovery`.
    pub id: String,
    /// The region this replica serves (informative). Default `local`.
    pub region: String,
    /// Default `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// Runtime threads: `0` = one per core. Default `0`.
    pub worker_threads: usize,
    /// Serve without `[auth]`: every route open to anyone, `explain` and the fleet views
    /// included. For a loopback lab only. Default `false`: a replica without `[auth]` refuses
    /// to start.
    pub allow_unauthenticated: bool,
}

impl Default for Section {
    fn default() -> Self {
        Section {
            id: "discovery".into(),
            region: "local".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            worker_threads: 0,
            allow_unauthenticated: false,
        }
    }
}

pub use edgeroute_http::tls::TlsSection;

/// Server limits. Durations in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Default 5000.
    pub header_read_timeout_ms: u64,
    /// Default 60000.
    pub idle_timeout_ms: u64,
    /// Default 4096.
    pub max_connections: usize,
    /// Largest request head, bytes. Default 16384.
    pub max_header_bytes: usize,
    /// Longest query string accepted by `/v1/discover`, bytes. Default 2048.
    pub max_query_bytes: usize,
    /// Default 5000.
    pub shutdown_grace_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout_ms: 5000,
            idle_timeout_ms: 60_000,
            max_connections: 4096,
            max_header_bytes: 16 * 1024,
            max_query_bytes: 2048,
            shutdown_grace_ms: 5000,
        }
    }
}

impl Limits {
    pub fn server_limits(&self) -> edgeroute_http::ServerLimits {
        edgeroute_http::ServerLimits {
            header_read_timeout: ms(self.header_read_timeout_ms),
            idle_timeout: ms(self.idle_timeout_ms),
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
            shutdown_grace: ms(self.shutdown_grace_ms),
            ..Default::default()
        }
    }
}

/// Pulling each node's `/health`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Time between two probes of a node. Default 1000.
    pub interval_ms: u64,
    /// A probe not answered within this is failed. Must be below `interval_ms`. Default 500.
    pub timeout_ms: u64,
    /// Largest `/health` body accepted, bytes. Default 262144.
    pub max_body_bytes: usize,
    /// PEM roots that `https://` nodes' certificates must chain to (a private fleet CA).
    /// Default: unset, the Mozilla roots compiled in.
    pub ca_file: Option<std::path::PathBuf>,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval_ms: 1000,
            timeout_ms: 500,
            max_body_bytes: 256 * 1024,
            ca_file: None,
        }
    }
}

/// Nodes that announce themselves on the topology bus (not in `[[nodes]]`). The bus
/// authenticates nobody, so an announced node is trusted only as far as it proves itself:
/// its URL must be `https://`, its certificate must chain to the fleet CA (`probe.ca_file`,
/// required for announced nodes) and be valid both for the URL's host and for the DNS name
/// `<node id>.<identity_suffix>`, and its `/health` must name the id it was announced as.
/// A configured node's URL is never taken from the bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnnouncedConfig {
    /// Accept `http://` announced URLs and probe them without any certificate check (the
    /// reported `node_id` is still compared). For a loopback or in-memory lab only. Default
    /// `false`: such announcements are refused and counted
    /// (`edgeroute_discovery_bus_refused_total{reason="plaintext"}`).
    pub allow_plaintext: bool,
    /// The DNS name an announced node's certificate must also be valid for is
    /// `<node id>.<identity_suffix>`. Default `node.edgeroute`.
    pub identity_suffix: String,
    /// Announced nodes held at once; an announcement of a new id beyond it is refused and
    /// counted (`reason="over_cap"`) until one is forgotten (`health.forget_after_ms`).
    /// Default 1024.
    pub max_nodes: usize,
    /// Probes of announced nodes sent per second, all of them together (a token bucket with
    /// a burst of the same size); a probe over the budget is skipped, not failed. Bounds what
    /// announcements can make the replica fetch, whatever the churn. Default 1024.
    pub max_probes_per_s: u32,
}

impl Default for AnnouncedConfig {
    fn default() -> Self {
        AnnouncedConfig {
            allow_plaintext: false,
            identity_suffix: "node.edgeroute".into(),
            max_nodes: 1024,
            max_probes_per_s: 1024,
        }
    }
}

impl AnnouncedConfig {
    /// The pure registry's rules, given whether a fleet CA is configured.
    pub fn policy(&self, fleet_ca: bool) -> crate::fleet::AnnouncePolicy {
        crate::fleet::AnnouncePolicy {
            allow_plaintext: self.allow_plaintext,
            fleet_ca,
            max_nodes: self.max_nodes,
        }
    }

    /// The DNS name `id`'s certificate must be valid for.
    pub fn identity_name(&self, id: &str) -> String {
        format!("{id}.{}", self.identity_suffix)
    }
}

/// The health detector's parameters; see `edgeroute_core::health` for what each means.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// φ above which a silent node is ejected. Default 8.
    pub phi_eject: f64,
    /// Probe inter-arrival history. Default 100.
    pub window: usize,
    /// Floor on the probe-interval deviation, ms. Default 100.
    pub min_std_ms: u64,
    /// Wilson lower bound of the error rate that ejects. Default 0.5.
    pub eject_error_rate: f64,
    /// Wilson lower bound of the error rate that degrades. Default 0.1.
    pub degrade_error_rate: f64,
    /// z of the Wilson interval. Default 1.96.
    pub z: f64,
    /// Consecutive good probes before an ejected node rejoins. Default 3.
    pub readmit_after: u32,
    /// A node only on the bus, down, is forgotten after this long. Default 600000.
    pub forget_after_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        let p = HealthParams::default();
        HealthConfig {
            phi_eject: p.phi_eject,
            window: p.window,
            min_std_ms: p.min_std.as_millis() as u64,
            eject_error_rate: p.eject_error_rate,
            degrade_error_rate: p.degrade_error_rate,
            z: p.z,
            readmit_after: p.readmit_after,
            forget_after_ms: 600_000,
        }
    }
}

impl HealthConfig {
    pub fn params(&self) -> HealthParams {
        HealthParams {
            phi_eject: self.phi_eject,
            window: self.window,
            min_std: ms(self.min_std_ms),
            eject_error_rate: self.eject_error_rate,
            degrade_error_rate: self.degrade_error_rate,
            z: self.z,
            readmit_after: self.readmit_after,
        }
    }
}

/// Correctness probes (see `crate::correctness` and `crate::answer_probe`): each node is
/// asked a short fixed prompt at temperature 0 for each model it serves, and the fingerprint of
/// its answer compared with the one expected for the model's version; a node whose answers
/// are wrong is no candidate for that model until a run of correct answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorrectnessConfig {
    /// The off switch. Default `true`.
    pub enabled: bool,
    /// The one user message asked. Default `Reply with the single word: ready`.
    pub prompt: String,
    /// The answer's cap, tokens. Default 16; 1 to 256.
    pub max_tokens: u32,
    /// Time between two probes of a node (each of its ready models, in sequence), ms; each
    /// node at its own phase, the first round one interval after the node is first seen.
    /// Default 10000; at least 50.
    pub interval_ms: u64,
    /// A probe not answered within this is a bad answer. Default 5000; below `interval_ms`.
    pub timeout_ms: u64,
    /// Probes sent per second, all nodes together (a token bucket); a probe over it is
    /// skipped, not failed. Default 50.
    pub max_probes_per_s: u32,
    /// Results kept per node and model. Default 20; 2 to 1000.
    pub window: usize,
    /// z of the Wilson interval on the bad-answer rate. Default 1.96.
    pub z: f64,
    /// Eject a node for a model when the Wilson lower bound of its bad-answer rate exceeds
    /// this. Default 0.3. Must exceed what one bad answer alone can show (0.21 at z = 1.96),
    /// so a single wrong answer never ejects; below 1.
    pub eject_above: f64,
    /// Consecutive correct answers before an ejected node rejoins. Default 3.
    pub recover_after: u32,
    /// Agreeing answers (a strict majority of those seen) that make a version's expected
    /// fingerprint learnt. Default 3.
    pub learn_quorum: u32,
    /// Answers after which a version without a majority is not judged (`no_consensus`).
    /// Default 30; at least `learn_quorum`.
    pub learn_max_answers: u32,
    /// A file holding the fleet's inference-scoped JWT, sent to nodes over `https://` or to
    /// loopback only; mint it for a tenant of its own (`sub = "edgeroute-discovery"`), so
    /// probes never count against a customer's rate limit. Default: none (nodes with `[auth]`
    /// then refuse the probe: counted as `unavailable`, never judged).
    pub token_file: Option<std::path::PathBuf>,
    /// Expected answers pinned by the operator (instead of learnt).
    pub expected: Vec<ExpectedAnswer>,
}

/// A pinned expected answer: `[[correctness.expected]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedAnswer {
    pub model: String,
    /// The model's registry version; absent: as served by nodes that name none.
    #[serde(default)]
    pub version: Option<String>,
    /// The answer text (normalised before hashing: spacing and case do not matter).
    pub answer: String,
}

impl Default for CorrectnessConfig {
    fn default() -> Self {
        let p = crate::correctness::Params::default();
        CorrectnessConfig {
            enabled: true,
            prompt: "Reply with the single word: ready".into(),
            max_tokens: 16,
            interval_ms: 10_000,
            timeout_ms: 5000,
            max_probes_per_s: 50,
            window: p.window,
            z: p.z,
            eject_above: p.eject_above,
            recover_after: p.recover_after,
            learn_quorum: p.learn_quorum,
            learn_max_answers: p.learn_max_answers,
            token_file: None,
            expected: Vec::new(),
        }
    }
}

impl CorrectnessConfig {
    pub fn params(&self) -> crate::correctness::Params {
        crate::correctness::Params {
            window: self.window,
            z: self.z,
            eject_above: self.eject_above,
            recover_after: self.recover_after,
            learn_quorum: self.learn_quorum,
            learn_max_answers: self.learn_max_answers,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = self;
        let checks: [(&str, bool, &str); 9] = [
            (
                "correctness.prompt",
                !c.prompt.trim().is_empty() && c.prompt.len() <= 4096,
                "1 to 4096 bytes",
            ),
            ("correctness.max_tokens", (1..=256).contains(&c.max_tokens), "1 to 256"),
            ("correctness.interval_ms", c.interval_ms >= 50, "at least 50"),
            (
                "correctness.timeout_ms",
                c.timeout_ms > 0 && c.timeout_ms < c.interval_ms,
                "positive and below correctness.interval_ms",
            ),
            ("correctness.max_probes_per_s", c.max_probes_per_s >= 1, "at least 1"),
            ("correctness.window", (2..=1000).contains(&c.window), "2 to 1000"),
            ("correctness.z", c.z.is_finite() && c.z > 0.0, "a finite number > 0"),
            ("correctness.recover_after", c.recover_after >= 1, "at least 1"),
            (
                "correctness.learn_max_answers",
                c.learn_quorum >= 1 && c.learn_max_answers >= c.learn_quorum,
                "learn_quorum ≥ 1 and learn_max_answers ≥ learn_quorum",
            ),
        ];
        if let Some((key, _, why)) = checks.iter().find(|(_, ok, _)| !ok) {
            return Err(invalid(key, *why));
        }
        let single = self.params().single_sample_bound();
        if !(c.eject_above.is_finite() && c.eject_above > single && c.eject_above < 1.0) {
            return Err(invalid(
                "correctness.eject_above",
                format!(
                    "above {single:.3} (what one bad answer alone shows at z = {}) and below 1",
                    c.z
                ),
            ));
        }
        for (i, e) in c.expected.iter().enumerate() {
            if e.model.is_empty() || e.answer.trim().is_empty() {
                return Err(invalid(
                    &format!("correctness.expected[{i}]"),
                    "a model and a non-empty answer",
                ));
            }
        }
        Ok(())
    }
}

/// Overrides of one strategy's weights (see `edgeroute_core::score::Weights`); unset keys keep
/// the preset's value.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WeightOverrides {
    pub degraded_ms: Option<f64>,
    pub saturated_ms: Option<f64>,
    pub error_rate_ms: Option<f64>,
    pub queue_factor: Option<f64>,
    pub load_ms: Option<f64>,
    pub cost_ms: Option<f64>,
    pub pipeline_busy_ms: Option<f64>,
}

impl WeightOverrides {
    fn apply(&self, mut w: Weights) -> Weights {
        let set = |slot: &mut f64, v: Option<f64>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut w.degraded_ms, self.degraded_ms);
        set(&mut w.saturated_ms, self.saturated_ms);
        set(&mut w.error_rate_ms, self.error_rate_ms);
        set(&mut w.queue_factor, self.queue_factor);
        set(&mut w.load_ms, self.load_ms);
        set(&mut w.cost_ms, self.cost_ms);
        set(&mut w.pipeline_busy_ms, self.pipeline_busy_ms);
        w
    }

    fn values(&self) -> [(&'static str, Option<f64>); 7] {
        [
            ("degraded_ms", self.degraded_ms),
            ("saturated_ms", self.saturated_ms),
            ("error_rate_ms", self.error_rate_ms),
            ("queue_factor", self.queue_factor),
            ("load_ms", self.load_ms),
            ("cost_ms", self.cost_ms),
            ("pipeline_busy_ms", self.pipeline_busy_ms),
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoringConfig {
    /// The strategy used when a request names none: `latency_first`, `availability_first` or
    /// `cost_optimized`. Default `latency_first`.
    pub strategy: String,
    pub latency_first: WeightOverrides,
    pub availability_first: WeightOverrides,
    pub cost_optimized: WeightOverrides,
    /// Predicted TTFT of a node that has served fewer than `min_ttft_samples` requests, when no
    /// node of the fleet has either; otherwise the fleet's median p50 is used. Default 250.
    pub unknown_ttft_ms: f64,
    /// Default 5.
    pub min_ttft_samples: u64,
    /// Shortest time between two rebuilds of the ranked lists: changes arriving meanwhile are
    /// folded into the next one. Default 1.
    pub rebuild_interval_ms: u64,
    /// A change of telemetry only (queue, TTFT, error rate: already up to a probe interval
    /// old) waits this long for more before a rebuild. Placement and health changes do not
    /// wait. Default 50.
    pub telemetry_delay_ms: u64,
}

impl Default for ScoringConfig {
    fn default() -> Self {
        ScoringConfig {
            strategy: "latency_first".into(),
            latency_first: WeightOverrides::default(),
            availability_first: WeightOverrides::default(),
            cost_optimized: WeightOverrides::default(),
            unknown_ttft_ms: 250.0,
            min_ttft_samples: 5,
            rebuild_interval_ms: 1,
            telemetry_delay_ms: 50,
        }
    }
}

impl ScoringConfig {
    pub fn default_strategy(&self) -> Strategy {
        Strategy::from_name(&self.strategy).unwrap_or(Strategy::LatencyFirst)
    }

    /// Each strategy's weights, in [`Strategy::ALL`] order.
    pub fn weights(&self) -> [Weights; 3] {
        Strategy::ALL.map(|s| self.overrides(s).apply(Weights::for_strategy(s)))
    }

    fn overrides(&self, s: Strategy) -> &WeightOverrides {
        match s {
            Strategy::LatencyFirst => &self.latency_first,
            Strategy::AvailabilityFirst => &self.availability_first,
            Strategy::CostOptimized => &self.cost_optimized,
        }
    }
}

/// What `/v1/discover` tells clients about caching, and the bounds on `k`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServingConfig {
    /// How long a client may use an answer before asking again. Default 5000.
    pub ttl_ms: u64,
    /// How long a client may keep using an answer while discovery is unreachable. Default
    /// 300000.
    pub stale_ok_ms: u64,
    /// Candidates returned when the request gives no `k`. Default 3.
    pub default_k: usize,
    /// Largest `k` accepted. Default 32.
    pub max_k: usize,
}

impl Default for ServingConfig {
    fn default() -> Self {
        ServingConfig { ttl_ms: 5000, stale_ok_ms: 300_000, default_k: 3, max_k: 32 }
    }
}

/// A node known from configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticNode {
    pub id: String,
    /// Base URL of the node's gateway (`http://10.0.0.5:8080`).
    pub url: String,
    pub region: String,
    /// Price per 1,000 tokens, for the cost-optimized strategy. Default: what the node
    /// reports in `/health` (`[node] cost_per_1k`), else 0.
    #[serde(default)]
    pub cost_per_1k: Option<f64>,
    /// The jurisdiction the node processes data in (`eu`, `ca`), for residency; the same as
    /// an entry in `[node_jurisdictions]` (which wins when both name the node).
    #[serde(default)]
    pub jurisdiction: Option<String>,
}

/// A node or region name: the fleet's one rule (`edgeroute_proto::names`).
pub use edgeroute_proto::names::is_name;

impl DiscoveryConfig {
    /// Parses `text`, applies environment overrides from `env`, validates.
    pub fn from_toml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<DiscoveryConfig, ConfigError> {
        let mut cfg: DiscoveryConfig = toml::from_str(text)?;
        if let Some(a) = &mut cfg.auth {
            a.resolve_env(&env);
        }
        if let Some(v) = env("EDGEROUTE_LISTEN") {
            cfg.discovery.listen =
                v.parse().map_err(|_| invalid("EDGEROUTE_LISTEN", "not an ip:port"))?;
        }
        if let Some(v) = env("EDGEROUTE_REGION") {
            cfg.discovery.region = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_name(&self.discovery.id) {
            return Err(invalid("discovery.id", edgeroute_proto::names::NAME_RULE));
        }
        if !is_name(&self.discovery.region) {
            return Err(invalid("discovery.region", edgeroute_proto::names::NAME_RULE));
        }
        let p = &self.probe;
        if p.interval_ms == 0 || p.timeout_ms == 0 || p.timeout_ms >= p.interval_ms {
            return Err(invalid(
                "probe.timeout_ms",
                "must be positive and below probe.interval_ms",
            ));
        }
        if p.max_body_bytes < 1024 {
            return Err(invalid("probe.max_body_bytes", "at least 1024"));
        }
        if self.auth.is_none() && !self.discovery.allow_unauthenticated {
            return Err(invalid(
                "auth",
                "no [auth] section: configure JWT keys, or set discovery.allow_unauthenticated = true (loopback labs only)",
            ));
        }
        let a = &self.announced;
        let suffix_ok = !a.identity_suffix.is_empty()
            && a.identity_suffix.len() <= 180
            && rustls_pki_types::ServerName::try_from(format!("x.{}", a.identity_suffix)).is_ok()
            && !a.identity_suffix.starts_with('.')
            && !a.identity_suffix.ends_with('.');
        if !suffix_ok {
            return Err(invalid("announced.identity_suffix", "a DNS name such as node.edgeroute"));
        }
        if a.max_probes_per_s == 0 {
            return Err(invalid("announced.max_probes_per_s", "at least 1"));
        }
        let h = &self.health;
        let checks: [(&str, bool); 6] = [
            ("health.phi_eject", h.phi_eject.is_finite() && h.phi_eject > 0.0),
            ("health.window", h.window >= 2),
            ("health.eject_error_rate", (0.0..=1.0).contains(&h.eject_error_rate)),
            (
                "health.degrade_error_rate",
                (0.0..=1.0).contains(&h.degrade_error_rate)
                    && h.degrade_error_rate <= h.eject_error_rate,
            ),
            ("health.z", h.z.is_finite() && h.z > 0.0),
            ("health.readmit_after", h.readmit_after >= 1),
        ];
        if let Some((key, _)) = checks.iter().find(|(_, ok)| !ok) {
            return Err(invalid(key, "out of range (see the documented default)"));
        }
        self.correctness.validate()?;
        let s = &self.scoring;
        if Strategy::from_name(&s.strategy).is_none() {
            return Err(invalid(
                "scoring.strategy",
                "one of latency_first, availability_first, cost_optimized",
            ));
        }
        for strategy in Strategy::ALL {
            for (name, v) in s.overrides(strategy).values() {
                if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(invalid(
                        &format!("scoring.{}.{name}", strategy.name()),
                        "a finite number ≥ 0",
                    ));
                }
            }
        }
        if !s.unknown_ttft_ms.is_finite() || s.unknown_ttft_ms < 0.0 {
            return Err(invalid("scoring.unknown_ttft_ms", "a finite number ≥ 0"));
        }
        let v = &self.serving;
        if v.max_k == 0 || v.max_k > 1000 || v.default_k == 0 || v.default_k > v.max_k {
            return Err(invalid("serving.default_k", "1 ≤ default_k ≤ max_k ≤ 1000"));
        }
        if v.ttl_ms == 0 || v.stale_ok_ms < v.ttl_ms {
            return Err(invalid("serving.stale_ok_ms", "ttl_ms > 0 and stale_ok_ms ≥ ttl_ms"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let key = |f: &str| format!("nodes[{i}].{f}");
            if !is_name(&n.id) {
                return Err(invalid(&key("id"), edgeroute_proto::names::NAME_RULE));
            }
            if !seen.insert(n.id.as_str()) {
                return Err(invalid(&key("id"), format!("`{}` is listed twice", n.id)));
            }
            if !is_name(&n.region) {
                return Err(invalid(&key("region"), edgeroute_proto::names::NAME_RULE));
            }
            if crate::probe::health_uri(&n.url).is_none() {
                return Err(invalid(&key("url"), "an http:// or https:// URL with a host"));
            }
            if n.cost_per_1k.is_some_and(|c| !c.is_finite() || c < 0.0) {
                return Err(invalid(&key("cost_per_1k"), "a finite number ≥ 0"));
            }
        }
        if let Some(b) = &self.bus {
            b.validate().map_err(|e| invalid("bus", e.to_string()))?;
        }
        for (table, map) in [
            ("jurisdictions", &self.jurisdictions),
            ("node_jurisdictions", &self.node_jurisdictions),
        ] {
            for (key, j) in map {
                if !is_name(key) || !is_name(j) {
                    return Err(invalid(
                        &format!("{table}.{key}"),
                        edgeroute_proto::names::NAME_RULE,
                    ));
                }
            }
        }
        if let Some(p) = &self.policy {
            if !(50..=3_600_000).contains(&p.reload_interval_ms) {
                return Err(invalid("policy.reload_interval_ms", "between 50 and 3600000"));
            }
            if p.shadow_max_examples > 64 {
                return Err(invalid("policy.shadow_max_examples", "at most 64"));
            }
            match (p.source, &p.file) {
                (crate::routing::Source::File, None) => {
                    return Err(invalid(
                        "policy.file",
                        "required with source = \"file\" (the default); or set source = \"bus\"",
                    ));
                }
                (crate::routing::Source::Bus, Some(_)) => {
                    return Err(invalid(
                        "policy.file",
                        "not with source = \"bus\": the policy comes from the bus only (push a file with `edgeroute policy push`)",
                    ));
                }
                (crate::routing::Source::Bus, None) if self.bus.is_none() => {
                    return Err(invalid(
                        "policy.source",
                        "\"bus\" needs a [bus] table (the bus the policy is pushed on)",
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open replica (these tests are not about auth) with `s`.
    fn parse(s: &str) -> Result<DiscoveryConfig, ConfigError> {
        DiscoveryConfig::from_toml(
            &format!("[discovery]\nallow_unauthenticated = true\n{s}"),
            |_| None,
        )
    }

    #[test]
    fn a_replica_without_auth_refuses_to_start_unless_it_opts_out_explicitly() {
        let err = DiscoveryConfig::from_toml("", |_| None).unwrap_err().to_string();
        assert!(err.contains("auth") && err.contains("allow_unauthenticated"), "{err}");
        assert!(DiscoveryConfig::default().validate().is_err(), "the default is closed");
        let open = parse("").unwrap();
        assert!(open.auth.is_none() && open.discovery.allow_unauthenticated);
        let keyed = DiscoveryConfig::from_toml(
            "[auth]\nhs256_secret_file = \"/etc/edgeroute/secret\"\n",
            |_| None,
        );
        assert!(keyed.is_ok(), "{keyed:?}");
    }

    #[test]
    fn announced_nodes_default_to_strict_and_bounded() {
        let c = parse("").unwrap();
        let a = &c.announced;
        assert!(!a.allow_plaintext);
        assert_eq!((a.max_nodes, a.max_probes_per_s), (1024, 1024));
        assert_eq!(a.identity_name("tor-1"), "tor-1.node.edgeroute");
        let err = |s: &str| parse(s).unwrap_err().to_string();
        assert!(err("[announced]\nidentity_suffix = \"\"").contains("identity_suffix"));
        assert!(err("[announced]\nidentity_suffix = \"a b\"").contains("identity_suffix"));
        assert!(err("[announced]\nmax_probes_per_s = 0").contains("max_probes_per_s"));
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse(
            r#"
            [scoring]
            strategy = "cost-optimized"
            [scoring.latency_first]
            degraded_ms = 500
            [[nodes]]
            id = "tor-1"
            url = "http://127.0.0.1:9000"
            region = "toronto"
            cost_per_1k = 0.2
            "#,
        )
        .unwrap();
        assert_eq!(c.scoring.default_strategy(), Strategy::CostOptimized);
        let w = c.scoring.weights();
        assert_eq!(w[0].degraded_ms, 500.0);
        assert_eq!(w[1], Weights::for_strategy(Strategy::AvailabilityFirst));
        assert_eq!(c.probe.interval_ms, 1000);
        let c = DiscoveryConfig::from_toml("[discovery]\nallow_unauthenticated = true", |k| {
            (k == "EDGEROUTE_LISTEN").then(|| "127.0.0.1:9999".to_owned())
        })
        .unwrap();
        assert_eq!(c.discovery.listen.port(), 9999);
    }

    #[test]
    fn policy_and_jurisdictions_are_optional_and_checked() {
        let c = parse("").unwrap();
        assert!(c.policy.is_none() && c.jurisdictions.is_empty());
        let c = parse(
            "[policy]\nfile = \"p.toml\"\n[jurisdictions]\ntoronto = \"ca\"\n[node_jurisdictions]\nfra-1 = \"eu\"",
        )
        .unwrap();
        assert_eq!(c.policy.unwrap().reload_interval_ms, 1000);
        assert_eq!(c.jurisdictions["toronto"], "ca");
        assert_eq!(c.node_jurisdictions["fra-1"], "eu");
        let err = |s: &str| parse(s).unwrap_err().to_string();
        assert!(
            err("[policy]\nfile = \"p\"\nreload_interval_ms = 1").contains("reload_interval_ms")
        );
        assert!(err("[policy]\nfil = \"p\"").contains("fil"));
        // Where the policy comes from.
        let c = parse("[policy]\nsource = \"bus\"\n[bus]\nkind = \"embedded\"").unwrap();
        let p = c.policy.unwrap();
        assert_eq!(
            (p.source, p.file, p.shadow_max_examples),
            (crate::routing::Source::Bus, None, 8)
        );
        assert!(err("[policy]\nsource = \"bus\"").contains("policy.source"));
        assert!(err("[policy]\nsource = \"bus\"\nfile = \"p\"\n[bus]\n").contains("policy.file"));
        assert!(err("[policy]\nreload_interval_ms = 100").contains("policy.file"));
        assert!(err("[policy]\nsource = \"kafka\"\nfile = \"p\"").contains("source"));
        let c = parse("[policy]\nfile = \"p\"\nshadow_file = \"c.toml\"").unwrap();
        assert_eq!(c.policy.unwrap().shadow_file.unwrap().to_str(), Some("c.toml"));
        assert!(
            err("[policy]\nfile = \"p\"\nshadow_max_examples = 65").contains("shadow_max_examples")
        );
        assert!(err("[jurisdictions]\ntoronto = \"c a\"").contains("jurisdictions.toronto"));
    }

    #[test]
    fn correctness_defaults_and_bounds() {
        let c = parse("").unwrap().correctness;
        assert!(c.enabled);
        assert_eq!((c.max_tokens, c.interval_ms, c.timeout_ms), (16, 10_000, 5000));
        assert_eq!((c.window, c.recover_after, c.learn_quorum), (20, 3, 3));
        assert!(c.eject_above > c.params().single_sample_bound());
        let c = parse(
            "[correctness]\nenabled = false\n[[correctness.expected]]\nmodel = \"m\"\nanswer = \"ok\"",
        )
        .unwrap()
        .correctness;
        assert!(!c.enabled && c.expected[0].version.is_none());
        let err = |s: &str| parse(s).unwrap_err().to_string();
        // A threshold one bad sample could cross is refused.
        assert!(err("[correctness]\neject_above = 0.2").contains("correctness.eject_above"));
        assert!(err("[correctness]\neject_above = 1.0").contains("correctness.eject_above"));
        assert!(err("[correctness]\ntimeout_ms = 20000").contains("correctness.timeout_ms"));
        assert!(err("[correctness]\nmax_tokens = 0").contains("correctness.max_tokens"));
        assert!(err("[correctness]\nprompt = \" \"").contains("correctness.prompt"));
        assert!(err("[correctness]\nrecover_after = 0").contains("recover_after"));
        assert!(err("[correctness]\npromt = \"x\"").contains("promt"));
        assert!(
            err("[[correctness.expected]]\nmodel = \"m\"\nanswer = \"\"")
                .contains("correctness.expected[0]")
        );
    }

    #[test]
    fn mistakes_name_their_key() {
        let err = |s: &str| parse(s).unwrap_err().to_string();
        assert!(err("[probe]\ninterval_ms = 100\ntimeout_ms = 200").contains("probe.timeout_ms"));
        assert!(err("[scoring]\nstrategy = \"fastest\"").contains("scoring.strategy"));
        assert!(err("[scoring.cost_optimized]\ncost_ms = -1").contains("cost_optimized.cost_ms"));
        assert!(err("[serving]\ndefault_k = 50").contains("default_k"));
        assert!(err("[scoring]\nstratgy = \"x\"").contains("stratgy"));
        let dup = "[[nodes]]\nid=\"a\"\nurl=\"http://h:1\"\nregion=\"r\"\n".repeat(2);
        assert!(err(&dup).contains("listed twice"));
        assert!(err("[[nodes]]\nid=\"a\"\nurl=\"ftp://h\"\nregion=\"r\"").contains("nodes[0].url"));
        assert!(
            err("[[nodes]]\nid=\"a b\"\nurl=\"http://h\"\nregion=\"r\"").contains("nodes[0].id")
        );
    }
}
