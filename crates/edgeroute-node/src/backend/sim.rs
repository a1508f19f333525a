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

    /// A realtime session in process; a crashed or refusing simulator refuses it as it would
    /// a connection.
    pub fn realtime(&self, model: &str) -> Result<super::realtime::RealtimeLink, BackendError> {
        let f = self.sim.faults();
        if f.crash || f.refuse_connections {
            return Err(BackendError::Unavailable("the backend refused the session".into()));
        }
        if !self.serves(model) {
            return Err(BackendError::ModelNotFound(model.to_owned()));
        }
        Ok(super::realtime::sim(self.sim.clone(), model))
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
            id: ctx.response_id(),
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
        // The caller's audio, text or inputs: a 400 naming the field, never the node's fault.
        SimError::InvalidInput { param, code, .. } => BackendError::Rejected {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody::new(
                e.to_string(),
                "invalid_request_error",
                Some(param.into()),
                Some(code),
            ),
            retry_after: None,
        },
        SimError::Overloaded { .. } => BackendError::Overloaded(e.to_string()),
        SimError::Refused | SimError::Crashed => BackendError::Unavailable(e.to_string()),
        SimError::Injected | SimError::Cut { .. } => BackendError::Failed(e.to_string()),
    }
}

impl SimBackend {
    /// Speech-to-text, text-to-speech and embeddings from the simulator, in OpenAI's shapes.
    pub async fn surface(
        &self,
        call: super::surface::SurfaceCall,
        idle: std::time::Duration,
    ) -> Result<super::surface::SurfaceReply, BackendError> {
        use super::surface::{Parsed, SurfaceReply, TranscriptFormat, base64_f32};
        match call.parsed {
            Parsed::Transcribe { model, audio, language, format, translate, stream } => {
                let language = if translate { Some("en") } else { language.as_deref() };
                if stream {
                    let words =
                        self.sim.transcribe_stream(&model, &audio, language).map_err(map_err)?;
                    let events = edgeroute_sim::transcript_sse(words).map(|r| r.map_err(map_err));
                    let ct = http::HeaderValue::from_static("text/event-stream");
                    return SurfaceReply::first_of(ct, Box::pin(events), idle).await;
                }
                let t = self.sim.transcribe(&model, &audio, language).await.map_err(map_err)?;
                let json = |v: serde_json::Value| {
                    SurfaceReply::whole("application/json", Bytes::from(v.to_string()))
                };
                Ok(match format {
                    TranscriptFormat::Json => json(serde_json::json!({ "text": t.text })),
                    TranscriptFormat::Text => {
                        SurfaceReply::whole("text/plain; charset=utf-8", Bytes::from(t.text + "\n"))
                    }
                    TranscriptFormat::VerboseJson => json(serde_json::json!({
                        "task": if translate { "translate" } else { "transcribe" },
                        "language": t.language,
                        "duration": t.duration_s,
                        "text": t.text,
                        "segments": t.segments,
                    })),
                    TranscriptFormat::Srt | TranscriptFormat::Vtt => {
                        let vtt = format == TranscriptFormat::Vtt;
                        let text = captions(&t.segments, vtt);
                        let ct =
                            if vtt { "text/vtt; charset=utf-8" } else { "application/x-subrip" };
                        SurfaceReply::whole(ct, Bytes::from(text))
                    }
                })
            }
            Parsed::Speech { model, input, voice, format } => {
                // Unnamed: WAV, as the standalone simulator answers (it encodes no mp3).
                let (fmt, ct) = match format.as_deref().unwrap_or("wav") {
                    "wav" => (edgeroute_sim::AudioFormat::Wav, "audio/wav"),
                    "pcm" => (edgeroute_sim::AudioFormat::Pcm, "audio/pcm"),
                    other => {
                        return Err(BackendError::Rejected {
                            status: StatusCode::BAD_REQUEST,
                            body: ErrorBody::new(
                                format!(
                                    "The simulator speaks `wav` or `pcm`, not `{other}`: set \
                                     response_format."
                                ),
                                "invalid_request_error",
                                Some("response_format".into()),
                                Some("unsupported_response_format"),
                            ),
                            retry_after: None,
                        });
                    }
                };
                let audio = self.sim.speech(&model, &input, &voice, fmt).map_err(map_err)?;
                let stream = audio.map(|r| r.map_err(map_err));
                SurfaceReply::first_of(http::HeaderValue::from_static(ct), Box::pin(stream), idle)
                    .await
            }
            Parsed::Complete { model, prompt, max_tokens, stream, include_usage } => {
                let mut req = ChatCompletionRequest::new(
                    model.clone(),
                    vec![edgeroute_proto::ChatMessage::new(edgeroute_proto::Role::User, prompt)],
                );
                req.max_tokens = Some(max_tokens);
                let generation = self.sim.generate(&req).await.map_err(map_err)?;
                let head = CompletionHead {
                    id: format!("cmpl-sim-{}", generation.request_id()),
                    created: edgeroute_core::clock::unix_ms() / 1000,
                    model,
                };
                if stream {
                    let frames = completion_frames(generation, head, include_usage);
                    let ct = http::HeaderValue::from_static("text/event-stream");
                    return SurfaceReply::first_of(ct, frames, idle).await;
                }
                let mut text = String::new();
                let mut generation = generation;
                loop {
                    let next =
                        tokio::time::timeout(idle, generation.next()).await.map_err(|_| {
                            BackendError::Timeout("backend stalled while completing".into())
                        })?;
                    match next {
                        None => {
                            return Err(BackendError::Failed(
                                "backend ended the completion without finishing it".into(),
                            ));
                        }
                        Some(Err(e)) => return Err(map_err(e)),
                        Some(Ok(SimEvent::Token(t))) => text.push_str(t),
                        Some(Ok(SimEvent::Finish { reason, usage })) => {
                            let body = head.chunk(&text, Some(reason), Some(usage));
                            return Ok(SurfaceReply::whole("application/json", body));
                        }
                    }
                }
            }
            Parsed::Embed { model, inputs, dimensions, base64 } => {
                let vectors = self.sim.embed(&model, &inputs, dimensions).await.map_err(map_err)?;
                // Tokens as the simulator counts them: about four characters each.
                let tokens: usize = inputs.iter().map(|i| i.len().div_ceil(4).max(1)).sum();
                let data: Vec<serde_json::Value> = vectors
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let embedding = if base64 {
                            serde_json::Value::from(base64_f32(v))
                        } else {
                            serde_json::json!(v)
                        };
                        serde_json::json!({ "object": "embedding", "index": i, "embedding": embedding })
                    })
                    .collect();
                let body = serde_json::json!({
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
                });
                Ok(SurfaceReply::whole("application/json", Bytes::from(body.to_string())))
            }
        }
    }
}

/// What every text-completion answer or chunk repeats.
struct CompletionHead {
    id: String,
    created: u64,
    model: String,
}

impl CompletionHead {
    /// An answer (`usage` given) or a stream chunk, in OpenAI's `text_completion` shape.
    fn chunk(
        &self,
        text: &str,
        finish: Option<edgeroute_proto::FinishReason>,
        usage: Option<edgeroute_proto::Usage>,
    ) -> Bytes {
        let mut v = serde_json::json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish }],
        });
        if let Some(u) = usage {
            v["usage"] = serde_json::json!(u);
        }
        Bytes::from(v.to_string())
    }
}

/// A completion as SSE: a chunk per token, the finish chunk, the usage chunk when asked for,
/// then `[DONE]`; an error ends the stream without `[DONE]`.
fn completion_frames(
    generation: Generation,
    head: CompletionHead,
    include_usage: bool,
) -> super::surface::ByteStream {
    let sse = |json: Bytes| {
        let mut b = Vec::with_capacity(json.len() + 8);
        b.extend_from_slice(b"data: ");
        b.extend_from_slice(&json);
        b.extend_from_slice(b"\n\n");
        Bytes::from(b)
    };
    Box::pin(generation.flat_map(move |ev| {
        let items: Vec<Result<Bytes, BackendError>> = match ev {
            Ok(SimEvent::Token(t)) => vec![Ok(sse(head.chunk(t, None, None)))],
            Ok(SimEvent::Finish { reason, usage }) => {
                let mut v = vec![Ok(sse(head.chunk("", Some(reason), None)))];
                if include_usage {
                    let mut u = serde_json::json!({
                        "id": head.id, "object": "text_completion", "created": head.created,
                        "model": head.model, "choices": [],
                    });
                    u["usage"] = serde_json::json!(usage);
                    v.push(Ok(sse(Bytes::from(u.to_string()))));
                }
                v.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
                v
            }
            Err(e) => vec![Err(map_err(e))],
        };
        futures_util::stream::iter(items)
    }))
}

/// SubRip or WebVTT captions of the transcript's segments.
fn captions(segments: &[edgeroute_sim::Segment], vtt: bool) -> String {
    use std::fmt::Write as _;
    let stamp = |s: f64| {
        let ms = (s.max(0.0) * 1000.0).round() as u64;
        let sep = if vtt { '.' } else { ',' };
        format!(
            "{:02}:{:02}:{:02}{sep}{:03}",
            ms / 3_600_000,
            (ms / 60_000) % 60,
            (ms / 1000) % 60,
            ms % 1000
        )
    };
    let mut out = String::new();
    if vtt {
        out.push_str("WEBVTT\n\n");
    }
    for (i, seg) in segments.iter().enumerate() {
        if !vtt {
            let _ = writeln!(out, "{}", i + 1);
        }
        let _ = writeln!(out, "{} --> {}\n{}\n", stamp(seg.start), stamp(seg.end), seg.text.trim());
    }
    out
}
