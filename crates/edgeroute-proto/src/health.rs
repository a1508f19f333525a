//! `GET /health`: a node's telemetry, pulled by discovery and readable by operators.

use serde::{Deserialize, Serialize};

use crate::models::ModelState;

/// The node's own view of itself. Discovery derives its own health estimate from this plus
/// probe results; a node never claims `unhealthy` about itself (it would not answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Serving normally.
    Ready,
    /// Serving, but its backend is failing a noticeable share of requests.
    Degraded,
    /// Healthy but full: new work is shed with 503 until capacity frees.
    Saturated,
    /// Refusing new sessions; in-flight work finishes.
    Draining,
    /// Shutting down: not ready for anything new.
    ShuttingDown,
}

impl NodeStatus {
    /// Whether the node accepts new sessions in this state.
    pub fn accepts_new_sessions(self) -> bool {
        matches!(self, NodeStatus::Ready | NodeStatus::Degraded | NodeStatus::Saturated)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    /// Samples in the window the percentiles were computed from.
    pub samples: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelHealth {
    pub id: String,
    pub state: ModelState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// The model registry's version of what is loaded under `id` (the load's `version`), when
    /// known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuHealth {
    pub id: String,
    /// Models pinned to this GPU.
    pub models: Vec<String>,
    /// Concurrency slots (batch lanes) this GPU serves at once.
    pub slots: u32,
    /// Slots in use.
    pub busy: u32,
    /// Requests waiting for one of this GPU's slots.
    pub queued: u32,
    /// `busy / slots`, in [0, 1].
    pub utilization: f64,
    pub memory_used_mb: u64,
    pub memory_total_mb: u64,
    /// Share of slots free for new work after queued requests, in [0, 1].
    #[serde(default)]
    pub availability: f64,
}

/// A multi-model pipeline (e.g. STT → LLM → TTS) and how available it is on this node: only as
/// available as the busiest GPU it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelineHealth {
    pub id: String,
    pub models: Vec<String>,
    /// Every model of the pipeline is ready here.
    pub servable: bool,
    /// The least available GPU's availability, in [0, 1]; 0 when not servable.
    pub availability: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bottleneck_gpu: Option<String>,
    /// Models of the pipeline not ready here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainInfo {
    pub reason: String,
    /// Milliseconds left before remaining sessions are refused too.
    pub deadline_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// True once every in-flight request has finished.
    pub drained: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHealth {
    pub status: NodeStatus,
    /// False while shutting down: load balancers and discovery should stop sending work.
    pub ready: bool,
    pub node_id: String,
    pub region: String,
    pub version: String,
    pub uptime_s: u64,
    pub models: Vec<ModelHealth>,
    pub gpus: Vec<GpuHealth>,
    #[serde(default)]
    pub pipelines: Vec<PipelineHealth>,
    pub queue_depth: u32,
    pub in_flight: u32,
    /// Concurrent requests admitted before shedding.
    pub capacity: u32,
    /// Sliding window the latency and error figures cover, seconds.
    pub window_s: u64,
    pub ttft_ms: Percentiles,
    pub latency_ms: Percentiles,
    /// Share of requests in the window that failed on the node's side (5xx, backend errors,
    /// cut streams). Client errors (4xx) are not counted.
    pub error_rate: f64,
    pub requests_in_window: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainInfo>,
    /// The operator's price per 1,000 tokens on this node, for cost-aware routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_per_1k: Option<f64>,
    /// The node's hardware class (`gpu`, `npu`, `cpu`: `node.hardware`), for the model
    /// registry's placement and the routing policy's hardware constraints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
}
