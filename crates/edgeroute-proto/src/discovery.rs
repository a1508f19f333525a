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
    /// The model id to name in requests sent here, when a routing policy's cascade answered
    /// with another model than the one asked for (the answer's model says which served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve_as: Option<String>,
    /// Set when the candidate is a routing policy's cloud pool rather than an edge node: `url`
    /// is then its OpenAI-compatible base URL (`…/v1`), requests go to `{url}/chat/completions`,
    /// and the fleet's token is never sent there (a client sends the pool's own key, if it
    /// has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

impl Candidate {
    /// The model id a request for `asked` names when sent to this candidate.
    pub fn model_for<'a>(&'a self, asked: &'a str) -> &'a str {
        self.serve_as.as_deref().unwrap_or(asked)
    }

    /// Where this candidate's chat completions are served.
    pub fn chat_url(&self) -> String {
        let base = self.url.trim_end_matches('/');
        match self.pool {
            Some(_) => format!("{base}/chat/completions"),
            None => format!("{base}/v1/chat/completions"),
        }
    }
}

/// What a routing policy decided (`/v1/discover` answers a policy decided carry it).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PolicyDecision {
    /// The policy document's version.
    pub version: String,
    #[serde(default)]
    pub rule: Option<String>,
    /// The logical model served (another than the one asked for after a cascade).
    #[serde(default)]
    pub model: Option<String>,
    /// The registry version chosen (a canary's split).
    #[serde(default)]
    pub version_id: Option<String>,
    /// `edge`, or the cloud pool's name.
    #[serde(default)]
    pub tier: Option<String>,
    /// 0: the model asked for; n: the n-th fallback of the rule's cascade.
    #[serde(default)]
    pub cascade_step: u8,
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
    /// What the routing policy decided, when one did.
    #[serde(default)]
    pub policy: Option<PolicyDecision>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_an_openai_base_and_a_node_a_gateway_root() {
        let json = r#"{"id":"tor-1","region":"toronto","url":"http://n:8080/","health":"ready","score_ms":5}"#;
        let mut c: Candidate = serde_json::from_str(json).unwrap();
        assert_eq!((c.serve_as.as_deref(), c.pool.as_deref()), (None, None), "older answers parse");
        assert_eq!(c.chat_url(), "http://n:8080/v1/chat/completions");
        c.url = "https://eu.cloud.example/v1".into();
        c.pool = Some("eu-cloud".into());
        assert_eq!(c.chat_url(), "https://eu.cloud.example/v1/chat/completions");
        let back = serde_json::to_string(&c).unwrap();
        assert!(back.contains(r#""pool":"eu-cloud""#) && !back.contains("serve_as"), "{back}");
    }
}
