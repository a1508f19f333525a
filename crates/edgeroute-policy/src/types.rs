//! The words every other module speaks: hardware classes, request classes, strategies, the
//! tenant's claims, what discovery knows of a node, and a request.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's hardware class, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hardware {
    Gpu,
    Npu,
    Cpu,
}

impl Hardware {
    pub fn name(self) -> &'static str {
        match self {
            Hardware::Gpu => "gpu",
            Hardware::Npu => "npu",
            Hardware::Cpu => "cpu",
        }
    }
}

/// What kind of traffic a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    #[default]
    Interactive,
    Batch,
}

/// What a canary split hashes, so the same caller keeps the same version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    /// The request's session id (the tenant's `sub` when it has none).
    #[default]
    Session,
    /// The tenant's `sub`: all of a tenant's traffic on one version.
    Tenant,
}

/// How the eligible candidates are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// Lowest predicted first token: TTFT p50, queue wait, the client's RTT, error penalty.
    #[default]
    LatencyFirst,
    /// Spare capacity weighs heavily (in-flight / capacity).
    AvailabilityFirst,
    /// Cheapest blended price first, then latency.
    CostOptimized,
    /// Each decision of the rule starts one further along the eligible nodes (by id).
    RoundRobin,
    /// Fewest in-flight requests first, then latency.
    LeastConnections,
    /// The first candidate drawn by the rule's `weights` (node id or region → weight), the
    /// rest by latency.
    Weighted,
}

impl StrategyKind {
    pub fn name(self) -> &'static str {
        match self {
            StrategyKind::LatencyFirst => "latency_first",
            StrategyKind::AvailabilityFirst => "availability_first",
            StrategyKind::CostOptimized => "cost_optimized",
            StrategyKind::RoundRobin => "round_robin",
            StrategyKind::LeastConnections => "least_connections",
            StrategyKind::Weighted => "weighted",
        }
    }
}

/// What the tenant's verified token says, as the caller maps it (suggested claim names:
/// `sub`, `edgeroute_jurisdictions`, `edgeroute_regions`; every other string claim in `attrs`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claims {
    pub sub: String,
    /// Jurisdictions the tenant's data may be processed in; `None`: the token says nothing
    /// (the policy's `[[tenants]]` entry may still). `Some(empty)` allows nothing.
    pub jurisdictions: Option<Vec<String>>,
    /// Regions the tenant's data may be processed in, as above.
    pub regions: Option<Vec<String>>,
    /// Other claims, for rules' `match.claims` (shared with the verified token: a decision
    /// copies a pointer, not the map).
    pub attrs: std::sync::Arc<BTreeMap<String, String>>,
}

/// A price per 1,000 tokens, in the deployment's currency.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Price {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

impl Price {
    /// The price of 1,000 tokens mixed as `tokens` says, or the dearer of the two without it.
    pub fn blended_per_1k(&self, tokens: Option<Tokens>) -> f64 {
        match tokens {
            Some(t) if t.input + t.output > 0 => {
                let (i, o) = (f64::from(t.input), f64::from(t.output));
                (i * self.input_per_1k + o * self.output_per_1k) / (i + o)
            }
            _ => self.input_per_1k.max(self.output_per_1k),
        }
    }

    /// What a request of `tokens` costs.
    pub fn request(&self, t: Tokens) -> f64 {
        (f64::from(t.input) * self.input_per_1k + f64::from(t.output) * self.output_per_1k) / 1000.0
    }
}

/// The caller's estimate of a request's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tokens {
    pub input: u32,
    pub output: u32,
}

/// A model version ready on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub model: String,
    pub version: String,
}

impl Served {
    pub fn new(model: impl Into<String>, version: impl Into<String>) -> Served {
        Served { model: model.into(), version: version.into() }
    }
}

/// What discovery knows of one edge node: built once per snapshot, not per request.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFacts {
    pub id: String,
    pub region: String,
    /// The node's jurisdiction when it reports one; otherwise the policy's `[jurisdictions]`
    /// table maps its region. A node of no known jurisdiction serves no tenant whose
    /// residency is restricted.
    pub jurisdiction: Option<String>,
    pub hardware: Hardware,
    /// Accepts new sessions (not draining, not ejected).
    pub available: bool,
    /// Model versions ready on the node.
    pub models: Vec<Served>,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub queue: u32,
    pub in_flight: u32,
    pub capacity: u32,
    /// Busiest GPU's utilisation, in [0, 1].
    pub gpu_util: f64,
    /// Server-side failures over the node's window, in [0, 1].
    pub error_rate: f64,
    /// `None`: unknown (fails any price bound).
    pub price: Option<Price>,
}

impl NodeFacts {
    /// An idle, available GPU node with no model: fill in what matters.
    pub fn new(id: impl Into<String>, region: impl Into<String>) -> NodeFacts {
        NodeFacts {
            id: id.into(),
            region: region.into(),
            jurisdiction: None,
            hardware: Hardware::Gpu,
            available: true,
            models: Vec::new(),
            ttft_p50_ms: 0.0,
            ttft_p99_ms: 0.0,
            queue: 0,
            in_flight: 0,
            capacity: 1,
            gpu_util: 0.0,
            error_rate: 0.0,
            price: None,
        }
    }
}

/// One request to decide, borrowed from the caller's parsed query.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub claims: &'a Claims,
    /// The logical model asked for.
    pub model: &'a str,
    /// A version pinned by the client (no canary, no other version).
    pub version: Option<&'a str>,
    pub class: Class,
    pub streamed: bool,
    /// Where the client is.
    pub client_region: Option<&'a str>,
    /// Regions the client asks for: can only narrow what residency allows, never widen it.
    pub regions: &'a [String],
    pub session: Option<&'a str>,
    /// The client's measured round trip per region, ms.
    pub rtt_ms: &'a [(String, f64)],
    pub tokens: Option<Tokens>,
    /// Candidates wanted; 0: the rule's `k`, else 3.
    pub k: usize,
}

impl<'a> Request<'a> {
    pub fn new(claims: &'a Claims, model: &'a str) -> Request<'a> {
        Request {
            claims,
            model,
            version: None,
            class: Class::Interactive,
            streamed: true,
            client_region: None,
            regions: &[],
            session: None,
            rtt_ms: &[],
            tokens: None,
            k: 0,
        }
    }

    pub(crate) fn rtt_to(&self, region: &str) -> Option<f64> {
        self.rtt_ms.iter().find(|(r, _)| r == region).map(|(_, ms)| *ms)
    }
}

/// An owned request, for shadow-mode samples and `edgeroute policy check`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub claims: Claims,
    pub model: String,
    pub version: Option<String>,
    pub class: Class,
    pub streamed: bool,
    pub client_region: Option<String>,
    pub regions: Vec<String>,
    pub session: Option<String>,
    pub rtt_ms: Vec<(String, f64)>,
    pub tokens: Option<Tokens>,
    pub k: usize,
}

impl Sample {
    pub fn as_request(&self) -> Request<'_> {
        Request {
            claims: &self.claims,
            model: &self.model,
            version: self.version.as_deref(),
            class: self.class,
            streamed: self.streamed,
            client_region: self.client_region.as_deref(),
            regions: &self.regions,
            session: self.session.as_deref(),
            rtt_ms: &self.rtt_ms,
            tokens: self.tokens,
            k: self.k,
        }
    }
}
