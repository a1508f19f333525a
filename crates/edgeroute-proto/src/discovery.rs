//! `GET /v1/discover`: what discovery answers, as a client reads it.
//!
//! The discovery server serialises borrowed views of its snapshot; these owned types are the
//! client's side of the same JSON (a test in the discovery crate keeps the two in step).
//! Unknown fields are ignored, so a newer server can add fields without breaking clients.

use serde::{Deserialize, Serialize};

/// One candidate node, best first in [`DiscoverResponse::candidates`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: String,
    pub region: String,
    /// Base URL of the node's gateway.
    pub url: String,
    /// `ready`, `degraded` or `saturated` (discovery never returns draining or unhealthy nodes).
    pub health: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub queue_depth: u32,
    #[serde(default)]
    pub in_flight: u32,
    #[serde(default)]
    pub capacity: u32,
    #[serde(default)]
    pub ttft_p50_ms: f64,
    #[serde(default)]
    pub ttft_p99_ms: f64,
    #[serde(default)]
    pub error_rate: f64,
    #[serde(default)]
    pub cost_per_1k: f64,
    /// Predicted time to first token, ms (lower is better).
    pub score_ms: f64,
}

/// Why an answer has no candidates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmptyReason {
    /// `model_unknown`, `model_not_ready`, `no_healthy_node`, `constraints_unsatisfied`,
    /// `pipeline_unknown`.
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoverResponse {
    pub model: String,
    #[serde(default)]
    pub pipeline: Option<String>,
    pub strategy: String,
    #[serde(default)]
    pub regions: Vec<String>,
    /// Use the answer for this long before asking again.
    pub ttl_ms: u64,
    /// Keep using it this long while discovery is unreachable.
    pub stale_ok_ms: u64,
    pub generation: u64,
    /// When the snapshot was built, Unix milliseconds (discovery's clock).
    pub generated_at_ms: u64,
    /// The replica that answered.
    pub replica: String,
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub reason: Option<EmptyReason>,
}
