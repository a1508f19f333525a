//! `GET /v1/models`: OpenAI's list shape, extended with each model's state and GPU.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    Loading,
    Ready,
    Failed,
    /// Being unloaded: requests already in flight, and turns of sessions pinned to the node,
    /// are still served (with a migrate hint), but routing must send no new session here.
    Draining,
    Unloading,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
    pub state: ModelState,
    /// The GPU the model is pinned to (`gpu0`), if the node has GPUs configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// Why the model is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelEntry>,
}
