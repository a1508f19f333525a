//! The simulator as a standalone OpenAI-compatible HTTP API.
//!
//! Routes: `POST /v1/chat/completions` (JSON, or SSE with `stream: true`),
//! `POST /v1/completions` (the legacy text completions on the chat engine: module
//! `completions`),
//! `POST /v1/audio/transcriptions` and `/v1/audio/translations` (multipart),
//! `POST /v1/audio/speech` (streamed WAV or PCM), `POST /v1/embeddings` (the voice routes:
//! module `voice`), `GET /v1/realtime` (a realtime session over a WebSocket: module
//! `realtime`), `GET /v1/models`, `GET /health`, `GET`/`PUT /admin/faults`. No auth:
//! this is a backend, reachable only by the gateway or a benchmark.
//!
//! It is the "direct backend" reference in the gateway-overhead benchmark, so the hot path
//! stays lean: the request body is parsed straight from the collected bytes, and each
//! streamed token costs one buffer, filled from a chunk prefix and suffix serialized once per
//! request (byte-identical to serializing the whole `ChatCompletionChunk`, which a test
//! checks).
//!
//! Request bodies may be up to 32 MiB (a gateway in front enforces its own, smaller limit;
//! the node's default is 4 MiB), so a prompt too long for the model reaches the context check
//! and gets its 400 rather than axum's 2 MiB default refusing it first. A larger body is a 413
//! `request_too_large`.
//!
//! Error mapping (OpenAI's error JSON shape): bad JSON or a shape rule → 400 with `param`;
//! unknown model → 404 `model_not_found`; a prompt (plus completion budget) beyond the
//! model's context window → 400 `context_length_exceeded` with `param` `messages`, at once;
//! input the simulator refuses (bad or too long audio, speech text, embedding limits) → 400
//! with the field as `param` and what is wrong as `code`, at once;
//! overloaded → 503 `overloaded` with `Retry-After`;
//! refused or crashed → 503; injected error or a cut before the answer was sent → 500. Once
//! an SSE stream has started, a failure is a final `data: {"error":{...}}` event and there
//! is no `data: [DONE]`; a stall just goes silent.
//!
//! The simulator answers with one choice and ignores what would not change a deterministic
//! answer: `n`, `stop`, `temperature`, `top_p`, tools and other extensions.
//!
//! This module does not listen on sockets: `edgeroute-http` runs the accept loop around
//! [`router`].

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{BufMut, Bytes, BytesMut};
use edgeroute_proto::health::GpuHealth;
use edgeroute_proto::models::{ModelEntry, ModelList, ModelState};
use edgeroute_proto::{ChatCompletionRequest, ChunkBuilder, ErrorBody, FinishReason, Usage};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{ConfigError, Faults};
use crate::engine::{Generation, SimEvent, Simulator};
use crate::error::SimError;

use edgeroute_core::clock::{self, WallClock};

#[derive(Clone)]
struct AppState {
    sim: Arc<Simulator>,
    /// For the `created` field of responses (display only); tests pass a fixed one.
    clock: WallClock,
}

/// The full API over `sim`, stamping responses with the wall clock.
pub fn router(sim: Arc<Simulator>) -> Router {
    router_with_clock(sim, clock::system())
}

/// The full API over `sim`, stamping responses with `clock`.
pub fn router_with_clock(sim: Arc<Simulator>, clock: WallClock) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/audio/transcriptions", post(voice::transcriptions))
        .route("/v1/audio/translations", post(voice::translations))
        .route("/v1/audio/speech", post(voice::speech))
        .route("/v1/embeddings", post(voice::embeddings))
        .route("/v1/realtime", get(realtime::realtime))
        .route("/v1/models", get(list_models))
        .route("/health", get(health))
        .route("/admin/faults", get(get_faults).put(put_faults))
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(AppState { sim, clock })
}

/// The largest request body read: 32 MiB, far above any gateway's limit in front of it.
const MAX_BODY_BYTES: usize = 32 << 20;

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const DONE: &[u8] = b"data: [DONE]\n\n";

/// What any failed request gets: a status, OpenAI's error body, maybe a `Retry-After`.
struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after_s: Option<u32>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody::new(message, "invalid_request_error", param, None),
            retry_after_s: None,
        }
    }

    /// A body that could not be read: 413 beyond [`MAX_BODY_BYTES`], else axum's status.
    fn from_body(e: &BytesRejection) -> Self {
        let (message, code) = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            (
                format!("Request body exceeds the limit of {MAX_BODY_BYTES} bytes."),
                "request_too_large",
            )
        } else {
            (e.body_text(), "invalid_body")
        };
        ApiError {
            status: e.status(),
            body: ErrorBody::new(message, "invalid_request_error", None, Some(code)),
            retry_after_s: None,
        }
    }

    fn from_sim(e: &SimError) -> Self {
        let (status, kind) = match e {
            SimError::UnknownModel(_) => (StatusCode::NOT_FOUND, "invalid_request_error"),
            SimError::ContextLengthExceeded { .. } | SimError::InvalidInput { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error")
            }
            SimError::Overloaded { .. } | SimError::Refused | SimError::Crashed => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error")
            }
            SimError::Injected | SimError::Cut { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "server_error")
            }
        };
        let param = e.param().map(str::to_owned);
        ApiError {
            status,
            body: ErrorBody::new(e.to_string(), kind, param, Some(e.code())),
            // A slot frees within one answer's time; a second is a fair first retry.
            retry_after_s: matches!(e, SimError::Overloaded { .. }).then_some(1),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = json_response(self.status, &self.body);
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// Serializes our own wire types. They hold only strings, numbers and string-keyed maps, so
/// this cannot fail; if it ever did, the client gets a well-formed error instead of a panic.
fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| {
        br#"{"error":{"message":"response serialization failed","type":"server_error","param":null,"code":null}}"#
            .to_vec()
    })
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let mut resp = Response::new(Body::from(to_json(value)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, JSON);
    resp
}

/// Parses a JSON body, naming the offending parameter on failure (`messages[0].role`, or the
/// missing field).
/// A JSON request body as `T`, or the refusal to answer with: the body's own trouble (too
/// large, cut) or the JSON's (a 400 naming the field).
fn read_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Response> {
    let body = body.map_err(|e| ApiError::from_body(&e).into_response())?;
    parse_json(&body).map_err(IntoResponse::into_response)
}

fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let bad = |e: serde_json::Error, param: Option<String>| {
        ApiError::invalid(format!("We could not parse the JSON body of your request: {e}"), param)
    };
    match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => match de.end() {
            Ok(()) => Ok(v),
            Err(e) => Err(bad(e, None)),
        },
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let missing = inner.to_string();
            let missing = missing.strip_prefix("missing field `").and_then(|m| m.split('`').next());
            // serde_path_to_error writes the root as `.`, and `?` where it lost track (a
            // syntax error before any field).
            let root = matches!(path.as_str(), "." | "?");
            let param = match (root, missing) {
                (true, None) => None,
                (true, Some(field)) => Some(field.to_owned()),
                (false, Some(field)) => Some(format!("{path}.{field}")),
                (false, None) => Some(path),
            };
            Err(bad(inner, param))
        }
    }
}

async fn chat_completions(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let req: ChatCompletionRequest = match read_json(body) {
        Ok(r) => r,
        Err(refusal) => return refusal,
    };
    if let Err(e) = req.validate() {
        return ApiError::invalid(e.message, Some(e.param)).into_response();
    }
    let generation = match st.sim.generate(&req).await {
        Ok(g) => g,
        Err(e) => return ApiError::from_sim(&e).into_response(),
    };
    let builder = ChunkBuilder {
        id: format!("chatcmpl-sim-{}", generation.request_id()),
        created: clock::unix_s(&st.clock),
        include_usage: req.include_usage(),
        model: req.model,
    };
    if req.stream {
        let body =
            SseBody { frames: SseFrames::new(builder), generation, role_sent: false, done: false };
        let mut resp = Response::new(Body::from_stream(body));
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return resp;
    }
    match generation.into_completion().await {
        Ok(c) => {
            json_response(StatusCode::OK, &builder.completion(c.text, c.finish_reason, c.usage))
        }
        // Nothing was sent yet, so even a mid-answer failure is a clean error response.
        Err(e) => ApiError::from_sim(&e).into_response(),
    }
}

/// One request's SSE frames. Content frames are assembled from a prefix and suffix cut once
/// from a serialized chunk, so a token costs one buffer and a JSON string escape.
struct SseFrames {
    builder: ChunkBuilder,
    /// `data: {"id":…,"delta":{"content":` — or empty when the split failed.
    content_prefix: Vec<u8>,
    /// `},"finish_reason":null,…}\n\n`.
    content_suffix: Vec<u8>,
}

/// A content value that serializes to a unique, easily found JSON string.
const PROBE: &str = "\u{0}";
const PROBE_JSON: &[u8] = br#""\u0000""#;

fn data_frame(json: &[u8]) -> BytesMut {
    let mut b = BytesMut::with_capacity(json.len() + 8);
    b.put_slice(b"data: ");
    b.put_slice(json);
    b.put_slice(b"\n\n");
    b
}

impl SseFrames {
    fn new(builder: ChunkBuilder) -> Self {
        let probe = to_json(&builder.content(PROBE));
        let at = probe.windows(PROBE_JSON.len()).position(|w| w == PROBE_JSON);
        let (content_prefix, content_suffix) = match at {
            Some(i) => {
                let mut prefix = b"data: ".to_vec();
                prefix.extend_from_slice(&probe[..i]);
                let mut suffix = probe[i + PROBE_JSON.len()..].to_vec();
                suffix.extend_from_slice(b"\n\n");
                (prefix, suffix)
            }
            None => (Vec::new(), Vec::new()),
        };
        SseFrames { builder, content_prefix, content_suffix }
    }

    fn role(&self) -> Bytes {
        data_frame(&to_json(&self.builder.role())).freeze()
    }

    fn content(&self, token: &str) -> Bytes {
        if self.content_prefix.is_empty() {
            return data_frame(&to_json(&self.builder.content(token))).freeze();
        }
        let mut b = BytesMut::with_capacity(
            self.content_prefix.len() + self.content_suffix.len() + token.len() + 8,
        );
        b.put_slice(&self.content_prefix);
        // Writing into memory cannot fail, and a `str` always serializes.
        if serde_json::to_writer((&mut b).writer(), token).is_err() {
            return data_frame(&to_json(&self.builder.content(token))).freeze();
        }
        b.put_slice(&self.content_suffix);
        b.freeze()
    }

    /// The finish chunk, the usage chunk if asked for, and `[DONE]`, in one buffer.
    fn finish(&self, reason: FinishReason, usage: Usage) -> Bytes {
        let mut b = data_frame(&to_json(&self.builder.finish(reason)));
        if let Some(u) = self.builder.usage(usage) {
            b.extend_from_slice(&data_frame(&to_json(&u)));
        }
        b.put_slice(DONE);
        b.freeze()
    }
}

fn error_frame(e: &SimError) -> Bytes {
    data_frame(&to_json(&ApiError::from_sim(e).body)).freeze()
}

/// The SSE body: a role chunk, a chunk per token, then finish (+ usage) + `[DONE]`, or an
/// error event. Dropping it (the client went away) drops the generation and frees its slot.
struct SseBody {
    frames: SseFrames,
    generation: Generation,
    role_sent: bool,
    done: bool,
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.role_sent {
            this.role_sent = true;
            return Poll::Ready(Some(Ok(this.frames.role())));
        }
        let frame = match ready!(this.generation.poll_next_unpin(cx)) {
            Some(Ok(SimEvent::Token(t))) => this.frames.content(t),
            Some(Ok(SimEvent::Finish { reason, usage })) => {
                this.done = true;
                this.frames.finish(reason, usage)
            }
            Some(Err(e)) => {
                this.done = true;
                error_frame(&e)
            }
            None => {
                this.done = true;
                return Poll::Ready(None);
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }
}

async fn list_models(State(st): State<AppState>) -> Response {
    let created = clock::unix_s(&st.clock);
    let data = st
        .sim
        .models()
        .into_iter()
        .map(|m| ModelEntry {
            id: m.id,
            object: "model".into(),
            created,
            owned_by: "edgeroute-sim".into(),
            state: ModelState::Ready,
            gpu: Some(m.gpu),
            reason: None,
        })
        .collect();
    json_response(StatusCode::OK, &ModelList { object: "list".into(), data })
}

/// `GET /health`: the simulator's own view, `503` while a fault makes every request fail, so
/// the health check reflects the request path.
#[derive(Debug, Serialize)]
struct SimHealth {
    /// `ok`, `crashed` or `refusing`.
    status: &'static str,
    in_flight: u32,
    queue_depth: u32,
    capacity: u32,
    gpus: Vec<GpuHealth>,
}

async fn health(State(st): State<AppState>) -> Response {
    let faults = st.sim.faults();
    let (status, code) = if faults.crash {
        ("crashed", StatusCode::SERVICE_UNAVAILABLE)
    } else if faults.refuse_connections {
        ("refusing", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("ok", StatusCode::OK)
    };
    let body = SimHealth {
        status,
        in_flight: st.sim.in_flight(),
        queue_depth: st.sim.queue_depth(),
        capacity: st.sim.capacity(),
        gpus: st.sim.gpu_status().into_iter().map(GpuHealth::from).collect(),
    };
    json_response(code, &body)
}

async fn get_faults(State(st): State<AppState>) -> Response {
    json_response(StatusCode::OK, &st.sim.faults())
}

async fn put_faults(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let faults: Faults = match read_json(body) {
        Ok(f) => f,
        Err(refusal) => return refusal,
    };
    match st.sim.set_faults(faults) {
        Ok(()) => json_response(StatusCode::OK, &st.sim.faults()),
        Err(e) => {
            let param = match &e {
                ConfigError::OutOfRange { key, .. } => {
                    Some(key.strip_prefix("faults.").unwrap_or(key).to_owned())
                }
                _ => None,
            };
            ApiError::invalid(e.to_string(), param).into_response()
        }
    }
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    let body = ErrorBody::new(
        format!("Unknown request URL: {method} {}", uri.path()),
        "invalid_request_error",
        None,
        Some("unknown_url"),
    );
    json_response(StatusCode::NOT_FOUND, &body)
}

mod completions;
mod realtime;
mod voice;

#[cfg(test)]
mod tests;
