//! Inference backends behind the gateway, never exposed to clients.
//!
//! A backend turns a validated chat request into either a complete JSON answer or a stream of
//! chunk payloads. The contract the gateway relies on is the **commit point**: `chat` resolves
//! only once the first chunk is available (or fails before it). A failure before the commit
//! point is a clean 5xx the client can fail over on; after it, the gateway ends the stream
//! with an explicit SSE error event, never a clean `[DONE]`.

mod completions;
/// Public for the fuzz targets (`fuzz/`): the GGUF metadata reader sees untrusted bytes.
pub mod gguf;
mod openai;
pub mod realtime;
mod sim;
pub mod surface;
/// Public for the fuzz targets (`fuzz/`): templates render caller-supplied messages.
pub mod template;
pub mod triton;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgeroute_http::ApiError;
use edgeroute_proto::health::GpuHealth;
use edgeroute_proto::models::ModelState;
use edgeroute_proto::{ChatCompletionRequest, ErrorBody, Fault, Side};
use futures_util::Stream;
use http::StatusCode;

pub use openai::OpenAiBackend;
pub use sim::SimBackend;

use crate::config::BackendConfig;

/// One item of a streamed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// One or more complete SSE events, framed (`data: {...}\n\n`), to be sent as they are.
    /// Upstream bytes are passed through verbatim in the batches they arrived in.
    Frames { raw: Bytes, events: u32 },
    /// The answer finished cleanly; the gateway sends `data: [DONE]`.
    Done,
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, BackendError>> + Send>>;

/// A backend's answer at the commit point.
pub enum Reply {
    /// A complete non-streaming answer (OpenAI `chat.completion` JSON).
    Json(Bytes),
    /// The first chunk is ready; the rest follow.
    Stream(EventStream),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Json(b) => f.debug_tuple("Json").field(&b.len()).finish(),
            Reply::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// Why a backend could not answer, classified by who is at fault and whether another node
/// may succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The model is not served by this node (client error: 404).
    #[error("model `{0}` is not served by this node")]
    ModelNotFound(String),
    /// The backend rejected the request itself (400 context length, 422, 429...). Passed
    /// through as is; never counted against the node.
    #[error("backend rejected the request with {status}")]
    Rejected { status: StatusCode, body: ErrorBody, retry_after: Option<String> },
    /// Full: try again later or elsewhere (503).
    #[error("{0}")]
    Overloaded(String),
    /// Cannot reach the backend at all (502).
    #[error("{0}")]
    Unavailable(String),
    /// The backend did not answer in time (504).
    #[error("{0}")]
    Timeout(String),
    /// The backend failed: 5xx, protocol error, injected fault, cut stream (502).
    #[error("{0}")]
    Failed(String),
}

impl BackendError {
    /// Whether this failure is the node's side (counts in its error rate) rather than the
    /// client's.
    pub fn is_node_fault(&self) -> bool {
        !matches!(self, BackendError::ModelNotFound(_) | BackendError::Rejected { .. })
    }

    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::ModelNotFound(_) => "model_not_found",
            BackendError::Rejected { .. } => "rejected",
            BackendError::Overloaded(_) => "overloaded",
            BackendError::Unavailable(_) => "unavailable",
            BackendError::Timeout(_) => "timeout",
            BackendError::Failed(_) => "failed",
        }
    }

    /// Which side failed and whether another node may succeed: the backend's own refusal of
    /// the request is the caller's (a 429 from it is the backend being full); anything else
    /// is the backend's, and another node may answer.
    pub fn fault(&self) -> Fault {
        match self {
            BackendError::ModelNotFound(_) => Fault::new(Side::Caller, true),
            BackendError::Rejected { status, .. } if *status == StatusCode::TOO_MANY_REQUESTS => {
                Fault::new(Side::Backend, true)
            }
            BackendError::Rejected { .. } => Fault::new(Side::Caller, false),
            BackendError::Overloaded(_)
            | BackendError::Unavailable(_)
            | BackendError::Timeout(_)
            | BackendError::Failed(_) => Fault::new(Side::Backend, true),
        }
    }

    pub fn to_api(&self) -> ApiError {
        let e = match self {
            BackendError::ModelNotFound(m) => ApiError::model_not_found(m),
            BackendError::Rejected { status, body, retry_after } => {
                let e = ApiError::from_body(*status, body.clone(), self.fault());
                match retry_after {
                    Some(r) => e.with_header(http::header::RETRY_AFTER, r),
                    None => e,
                }
            }
            BackendError::Overloaded(m) => {
                ApiError::unavailable("backend_overloaded", m.clone(), 1)
            }
            BackendError::Unavailable(m) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("backend_unavailable"),
                m.clone(),
            ),
            BackendError::Timeout(m) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_error",
                Some("backend_timeout"),
                m.clone(),
            ),
            BackendError::Failed(m) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                Some("backend_error"),
                m.clone(),
            ),
        };
        let f = self.fault();
        e.fault(f.side, f.retry)
    }
}

/// A model as the node reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub id: String,
    pub state: ModelState,
    pub gpu: Option<String>,
    pub memory_mb: u64,
}

/// What a backend needs to load a model.
#[derive(Debug, Clone)]
pub struct Activation {
    pub id: String,
    pub gpu: Option<String>,
    pub memory_mb: u64,
    /// The name the upstream (Triton, vLLM…) knows the model by. Default: `id`.
    pub upstream_name: Option<String>,
    /// The simulator's load time; for an upstream, how long to wait for it.
    pub load_time: Duration,
    /// The model's Triton entry was just written to the node's repository (a shared volume
    /// the `edgeroute watch` sidecar copies into Triton's, or Triton's own): wait until
    /// Triton's repository lists it (within `load_time`) before asking Triton to load it.
    /// Triton's load is idempotent, so the sidecar's own load after its install does no harm.
    /// Known limit: a name Triton already lists (an earlier entry of the same name, since
    /// the sidecar never deletes) is loaded at once, before the sidecar has copied the new
    /// entry; the sidecar's load then reloads it.
    pub await_repository: bool,
}

/// Everything the gateway passes along with a request.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// What the response id starts with (`chatcmpl-<node>-`) and this request's number on
    /// the node: [`CallContext::response_id`], formatted only by the backends that answer
    /// with an id of their own (the simulator, translated completions).
    pub id_prefix: Arc<str>,
    pub seq: u64,
    /// Unix seconds, for the `created` field.
    pub created: u64,
    /// Longest silence accepted between two events of a stream (also bounds a non-streaming
    /// answer's generation).
    pub idle_timeout: Duration,
    /// The request body exactly as the client sent it (already validated). Upstreams that
    /// know the model by the same name receive these bytes untouched, with no re-encoding.
    pub raw_body: Bytes,
}

impl CallContext {
    /// Response id (`chatcmpl-<node>-<n>`), unique per node.
    pub fn response_id(&self) -> String {
        format!("{}{}", self.id_prefix, self.seq)
    }
}

pub enum Backend {
    Sim(SimBackend),
    OpenAi(Box<OpenAiBackend>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sim(_) => "Backend::Sim",
            Backend::OpenAi(_) => "Backend::OpenAi",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("simulator config: {0}")]
    Sim(String),
    #[error("upstream config: {0}")]
    Upstream(String),
}

impl Backend {
    pub fn from_config(cfg: &BackendConfig, max_concurrency: u32) -> Result<Backend, BuildError> {
        Ok(match cfg {
            BackendConfig::Sim { sim } => {
                let s = edgeroute_sim::Simulator::new(sim.clone())
                    .map_err(|e| BuildError::Sim(e.to_string()))?;
                Backend::Sim(SimBackend::new(Arc::new(s)))
            }
            BackendConfig::Openai(o) => {
                Backend::OpenAi(Box::new(OpenAiBackend::new(o, max_concurrency)?))
            }
        })
    }

    /// Runs a speech, transcription or embeddings request up to its first byte.
    pub async fn surface(
        &self,
        call: surface::SurfaceCall,
        idle: Duration,
    ) -> Result<surface::SurfaceReply, BackendError> {
        match self {
            Backend::Sim(b) => b.surface(call, idle).await,
            Backend::OpenAi(b) => b.surface(call).await,
        }
    }

    /// Opens a realtime session for `model` (`/v1/realtime`): the simulator's in process, an
    /// upstream's over its own WebSocket.
    pub async fn realtime(
        &self,
        model: &str,
        max_event_bytes: usize,
    ) -> Result<realtime::RealtimeLink, BackendError> {
        match self {
            Backend::Sim(b) => b.realtime(model),
            Backend::OpenAi(b) => b.realtime(model, max_event_bytes).await,
        }
    }

    /// Runs a request up to its commit point.
    pub async fn chat(
        &self,
        req: ChatCompletionRequest,
        ctx: CallContext,
    ) -> Result<Reply, BackendError> {
        match self {
            Backend::Sim(b) => b.chat(req, ctx).await,
            Backend::OpenAi(b) => b.chat(req, ctx).await,
        }
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        match self {
            Backend::Sim(b) => b.models(),
            Backend::OpenAi(b) => b.models(),
        }
    }

    /// Whether `model` is loaded and ready here.
    pub fn serves(&self, model: &str) -> bool {
        match self {
            Backend::Sim(b) => b.serves(model),
            Backend::OpenAi(b) => b.serves(model),
        }
    }

    pub fn gpus(&self) -> Vec<GpuHealth> {
        match self {
            Backend::Sim(b) => b.gpus(),
            Backend::OpenAi(b) => b.gpus(),
        }
    }

    /// Requests waiting for a backend slot.
    pub fn queue_depth(&self) -> u32 {
        match self {
            Backend::Sim(b) => b.queue_depth(),
            Backend::OpenAi(b) => b.queue_depth(),
        }
    }

    /// Concurrent requests the backend serves without queueing.
    pub fn slots(&self) -> u32 {
        self.gpus().iter().map(|g| g.slots).sum()
    }

    /// Loads a model into the backend; resolves once the backend serves it.
    pub async fn activate(&self, a: &Activation) -> Result<(), String> {
        match self {
            Backend::Sim(b) => {
                tokio::time::sleep(a.load_time).await;
                let gpu = a.gpu.clone().unwrap_or_else(|| "gpu0".into());
                let model = edgeroute_sim::SimModel {
                    memory_mb: a.memory_mb,
                    ..edgeroute_sim::SimModel::new(a.id.clone(), gpu)
                };
                b.simulator().load_model(model).map_err(|e| e.to_string())
            }
            Backend::OpenAi(b) => {
                let name = a.upstream_name.clone().unwrap_or_else(|| a.id.clone());
                if let Some(triton) = b.triton() {
                    if a.await_repository {
                        let deadline = tokio::time::Instant::now() + a.load_time;
                        triton
                            .wait_listed(&name, deadline, crate::models::UPSTREAM_POLL)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    triton.load(&name).await.map_err(|e| e.to_string())?;
                } else {
                    // A plain OpenAI-compatible server loads on its own (vLLM, llama.cpp are
                    // started with their model); wait until it lists the model.
                    let deadline =
                        tokio::time::Instant::now() + a.load_time.max(Duration::from_secs(1));
                    loop {
                        match b.upstream_models().await {
                            Ok(ids) if ids.contains(&name) => break,
                            Ok(_) | Err(_) if tokio::time::Instant::now() >= deadline => {
                                return Err(format!(
                                    "the upstream did not list `{name}` in GET /v1/models within {} ms",
                                    a.load_time.as_millis()
                                ));
                            }
                            _ => tokio::time::sleep(crate::models::UPSTREAM_POLL).await,
                        }
                    }
                }
                b.add_model(crate::config::UpstreamModel {
                    id: a.id.clone(),
                    upstream_name: (name != a.id).then_some(name),
                    gpu: a.gpu.clone(),
                    memory_mb: a.memory_mb,
                    continuation: crate::config::Continuation::Native,
                    chat_template: None,
                });
                Ok(())
            }
        }
    }

    /// Stops serving a model and frees it in the backend.
    pub async fn deactivate(&self, id: &str, upstream_name: Option<&str>) -> Result<(), String> {
        match self {
            Backend::Sim(b) => {
                b.simulator().unload_model(id);
                Ok(())
            }
            Backend::OpenAi(b) => {
                b.remove_model(id);
                match b.triton() {
                    Some(t) => {
                        t.unload(upstream_name.unwrap_or(id)).await.map_err(|e| e.to_string())
                    }
                    None => Ok(()),
                }
            }
        }
    }

    /// Triton's repository API, when the backend is Triton.
    pub fn triton(&self) -> Option<&triton::TritonRepository> {
        match self {
            Backend::Sim(_) => None,
            Backend::OpenAi(b) => b.triton(),
        }
    }

    /// Triton's model repository as Triton sees it, when configured apart from the node's
    /// (`backend.triton_repository`).
    pub fn triton_repository(&self) -> Option<&std::path::Path> {
        match self {
            Backend::Sim(_) => None,
            Backend::OpenAi(b) => b.triton_repository(),
        }
    }

    /// The in-process simulator, for its fault admin endpoint.
    pub fn simulator(&self) -> Option<&Arc<edgeroute_sim::Simulator>> {
        match self {
            Backend::Sim(b) => Some(b.simulator()),
            Backend::OpenAi(_) => None,
        }
    }
}
