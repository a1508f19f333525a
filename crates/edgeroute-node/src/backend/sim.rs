//! The simulator, in process: no socket between gateway and backend.

use std::sync::Arc;

use bytes::Bytes;
use edgeroute_proto::health::GpuHealth;
use edgeroute_proto::models::ModelState;
use edgeroute_proto::{ChatCompletionRequest, ChunkBuilder, ErrorBody};
use edgeroute_sim::{Generation, SimError, SimEvent, Simulator};
use futures_util::StreamExt;
use http::StatusCode;

use super::{BackendError, CallContext, EventStream, ModelInfo, Reply, StreamEvent};

pub struct SimBackend {
    sim: Arc<Simulator>,
}

impl SimBackend {
    pub fn new(sim: Arc<Simulator>) -> Self {
        SimBackend { sim }
    }

    pub fn simulator(&self) -> &Arc<Simulator> {
        &self.sim
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        self.sim
            .models()
            .into_iter()
            .map(|m| ModelInfo {
                id: m.id,
                state: ModelState::Ready,
                gpu: Some(m.gpu),
                memory_mb: m.memory_mb,
            })
            .collect()
    }

    pub fn serves(&self, model: &str) -> bool {
        self.sim.models().iter().any(|m| m.id == model)
    }

    pub fn gpus(&self) -> Vec<GpuHealth> {
        self.sim.gpu_status().into_iter().map(GpuHealth::from).collect()
    }

    pub fn queue_depth(&self) -> u32 {
        self.sim.queue_depth()
    }

    pub async fn chat(
        &self,
        req: ChatCompletionRequest,
        ctx: CallContext,
    ) -> Result<Reply, BackendError> {
        let builder = ChunkBuilder {
            id: ctx.response_id.clone(),
            created: ctx.created,
            model: req.model.clone(),
            include_usage: req.include_usage(),
        };
        let generation = self.sim.generate(&req).await.map_err(map_err)?;
        if req.stream {
            return Ok(Reply::Stream(stream(generation, builder)));
        }
        // A stalled simulator must not hold a non-streaming request forever.
        let mut text = String::new();
        let mut generation = generation;
        loop {
            match tokio::time::timeout(ctx.idle_timeout, generation.next()).await {
                Err(_) => {
                    return Err(BackendError::Timeout(
                        "backend stalled while generating the answer".into(),
                    ));
                }
                Ok(None) => {
                    return Err(BackendError::Failed(
                        "backend ended the answer without finishing it".into(),
                    ));
                }
                Ok(Some(Err(e))) => return Err(map_err(e)),
                Ok(Some(Ok(SimEvent::Token(t)))) => text.push_str(t),
                Ok(Some(Ok(SimEvent::Finish { reason, usage }))) => {
                    let body = serde_json::to_vec(&builder.completion(text, reason, usage))
                        .map_err(|e| {
                            BackendError::Failed(format!("could not encode the answer: {e}"))
                        })?;
                    return Ok(Reply::Json(Bytes::from(body)));
                }
            }
        }
    }
}

fn encode<T: serde::Serialize>(v: &T) -> Result<StreamEvent, BackendError> {
    let mut raw = Vec::with_capacity(256);
    raw.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut raw, v)
        .map_err(|e| BackendError::Failed(format!("could not encode a chunk: {e}")))?;
    raw.extend_from_slice(b"\n\n");
    Ok(StreamEvent::Frames { raw: Bytes::from(raw), events: 1 })
}

/// OpenAI's chunk order: a role chunk, content chunks, a finish chunk, the usage chunk when
/// asked for, then `[DONE]`.
fn stream(generation: Generation, b: ChunkBuilder) -> EventStream {
    let role = futures_util::stream::once(std::future::ready(encode(&b.role())));
    let body = generation.flat_map(move |ev| {
        let items: Vec<Result<StreamEvent, BackendError>> = match ev {
            Ok(SimEvent::Token(t)) => vec![encode(&b.content(t))],
            Ok(SimEvent::Finish { reason, usage }) => {
                let mut v = vec![encode(&b.finish(reason))];
                if let Some(u) = b.usage(usage) {
                    v.push(encode(&u));
                }
                v.push(Ok(StreamEvent::Done));
                v
            }
            Err(e) => vec![Err(map_err(e))],
        };
        futures_util::stream::iter(items)
    });
    Box::pin(role.chain(body))
}

/// A prompt beyond the context window is the caller's request, refused as vLLM or OpenAI
/// refuse it (400 `context_length_exceeded`), so it never counts against the node; the rest
/// are the backend's trouble.
fn map_err(e: SimError) -> BackendError {
    match e {
        SimError::UnknownModel(m) => BackendError::ModelNotFound(m),
        SimError::ContextLengthExceeded { .. } => BackendError::Rejected {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody::new(
                e.to_string(),
                "invalid_request_error",
                Some("messages".into()),
                Some(e.code()),
            ),
            retry_after: None,
        },
        SimError::Overloaded { .. } => BackendError::Overloaded(e.to_string()),
        SimError::Refused | SimError::Crashed => BackendError::Unavailable(e.to_string()),
        SimError::Injected | SimError::Cut { .. } => BackendError::Failed(e.to_string()),
    }
}
