//! Any OpenAI-compatible upstream (vLLM, SGLang, llama.cpp, TGI, Ollama, Triton's OpenAI
//! frontend) over pooled HTTP/1.1 connections that the request drives itself
//! ([`edgeroute_http::upstream`]: no task hop between the upstream's socket and the caller's).
//!
//! Streams pass through verbatim: the upstream's body is read straight into an SSE decoder's
//! buffer, and every whole event that arrived in one read is forwarded together, as soon as it
//! is complete, never buffered into a whole answer (the decoder still sees each event, for
//! `[DONE]` and error events). The request is cancelled (its connection dropped) as soon as the
//! client goes away, because dropping the returned stream drops the upstream body.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use edgeroute_http::upstream::{
    AnswerHeaders, Upstream, UpstreamBody, UpstreamError, UpstreamOptions,
};
use edgeroute_proto::ChatCompletionRequest;
use edgeroute_proto::ErrorBody;
use edgeroute_proto::health::GpuHealth;
use edgeroute_proto::models::ModelState;
use edgeroute_proto::sse::{Ending, SseDecoder};
use futures_util::StreamExt;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Limited};

use super::completions::{self, ChunkTranslator, Label};
use super::template::ChatTemplate;
use super::{BackendError, BuildError, CallContext, ModelInfo, Reply, StreamEvent};
use crate::config::{Continuation, GpuSpec, OpenAiConfig, UpstreamModel};

/// Largest single SSE event accepted from an upstream.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Most bytes of an upstream's stream taken in one go (then forwarded in one write).
const MAX_GATHER_BYTES: usize = 256 * 1024;
/// Largest error body read from an upstream.
const MAX_ERROR_BYTES: usize = 64 * 1024;

pub struct OpenAiBackend {
    upstream: Upstream,
    endpoint: http::Uri,
    /// `/v1/completions`, for continuing answers of `continuation = "template"` models.
    completions: http::Uri,
    /// Chat templates of the `continuation = "template"` models configured at start.
    templates: std::collections::HashMap<String, Arc<ChatTemplate>>,
    api_key: Option<String>,
    /// `Bearer <api_key>`, built once (marked sensitive: never logged).
    bearer: Option<HeaderValue>,
    /// Read on every request, changed only by model loads: a lock-free snapshot.
    models: arc_swap::ArcSwap<Vec<UpstreamModel>>,
    /// Triton's repository API, when the upstream is Triton.
    triton: Option<super::triton::TritonRepository>,
    /// Triton's model repository as Triton sees it (`backend.triton_repository`).
    triton_repository: Option<std::path::PathBuf>,
    base: String,
    gpus: Vec<GpuSpec>,
    first_byte_timeout: Duration,
    request_timeout: Duration,
    max_response_bytes: usize,
    /// Requests in flight to the upstream, per GPU index, for capacity reporting.
    in_flight: Arc<Vec<AtomicU32>>,
}

impl OpenAiBackend {
    pub fn new(cfg: &OpenAiConfig, max_concurrency: u32) -> Result<Self, BuildError> {
        let base = cfg.url.trim_end_matches('/');
        let endpoint: http::Uri = format!("{base}/v1/chat/completions")
            .parse()
            .map_err(|e| BuildError::Upstream(format!("url `{}`: {e}", cfg.url)))?;
        let completions: http::Uri = format!("{base}/v1/completions")
            .parse()
            .map_err(|e| BuildError::Upstream(format!("url `{}`: {e}", cfg.url)))?;
        let mut templates = std::collections::HashMap::new();
        for m in &cfg.models {
            if let (Continuation::Template, Some(path)) = (m.continuation, &m.chat_template) {
                let t = ChatTemplate::load(path)
                    .map_err(|e| BuildError::Upstream(format!("model `{}`: {e}", m.id)))?;
                templates.insert(m.id.clone(), Arc::new(t));
            }
        }
        let tls = match &cfg.tls {
            Some(t) => Some(t.client_config().map_err(BuildError::Upstream)?),
            None => None,
        };
        let upstream = Upstream::new(
            &endpoint,
            UpstreamOptions {
                connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
                idle_timeout: Duration::from_secs(90),
                max_idle: cfg.pool_max_idle,
                tls,
                // All this backend reads of an answer's head, beside its status and framing.
                answer_headers: AnswerHeaders::Only(Arc::from([
                    header::CONTENT_TYPE,
                    header::RETRY_AFTER,
                ])),
            },
        )
        .map_err(|e| BuildError::Upstream(format!("url {e}")))?;
        let api_key =
            match &cfg.api_key_env {
                Some(var) => Some(cfg.api_key.get().map(str::to_owned).ok_or_else(|| {
                    BuildError::Upstream(format!("api_key_env `{var}` is not set"))
                })?),
                None => None,
            };
        let gpus = if cfg.gpus.is_empty() {
            vec![GpuSpec { id: "gpu0".into(), slots: max_concurrency, memory_total_mb: 0 }]
        } else {
            cfg.gpus.clone()
        };
        let in_flight = Arc::new((0..gpus.len()).map(|_| AtomicU32::new(0)).collect());
        let triton = match cfg.triton_url.as_deref() {
            None => None,
            Some(u) => {
                let repo = super::triton::TritonRepository::new(
                    u,
                    Duration::from_millis(cfg.load_timeout_ms),
                );
                Some(match (&cfg.triton_restricted_header, &cfg.triton_restricted_key_env) {
                    (Some(name), Some(var)) => {
                        let value = cfg.triton_restricted_key.get().ok_or_else(|| {
                            BuildError::Upstream(format!(
                                "triton_restricted_key_env `{var}` is not set"
                            ))
                        })?;
                        repo.with_restricted_header(name, value).map_err(BuildError::Upstream)?
                    }
                    _ => repo,
                })
            }
        };
        let bearer = match &api_key {
            Some(key) => {
                let mut v = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
                    BuildError::Upstream("the upstream API key is not a valid header value".into())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(OpenAiBackend {
            upstream,
            endpoint,
            completions,
            templates,
            api_key,
            bearer,
            models: arc_swap::ArcSwap::from_pointee(cfg.models.clone()),
            triton,
            triton_repository: cfg.triton_repository.clone(),
            base: base.to_owned(),
            gpus,
            first_byte_timeout: Duration::from_millis(cfg.first_byte_timeout_ms),
            request_timeout: Duration::from_millis(cfg.request_timeout_ms),
            max_response_bytes: cfg.max_response_bytes,
            in_flight,
        })
    }

    fn gpu_index(&self, m: &UpstreamModel) -> usize {
        m.gpu.as_ref().and_then(|g| self.gpus.iter().position(|s| &s.id == g)).unwrap_or(0)
    }

    pub fn models(&self) -> Vec<ModelInfo> {
        self.models
            .load()
            .iter()
            .map(|m| ModelInfo {
                id: m.id.clone(),
                state: ModelState::Ready,
                gpu: Some(self.gpus[self.gpu_index(m)].id.clone()),
                memory_mb: m.memory_mb,
            })
            .collect()
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.load().iter().any(|m| m.id == model)
    }

    pub fn gpus(&self) -> Vec<GpuHealth> {
        let models = self.models.load();
        self.gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let n = self.in_flight[i].load(Ordering::Relaxed);
                let busy = n.min(g.slots);
                let pinned: Vec<&UpstreamModel> =
                    models.iter().filter(|m| self.gpu_index(m) == i).collect();
                GpuHealth {
                    id: g.id.clone(),
                    models: pinned.iter().map(|m| m.id.clone()).collect(),
                    slots: g.slots,
                    busy,
                    queued: n - busy,
                    availability: if g.slots == 0 {
                        0.0
                    } else {
                        f64::from(g.slots.saturating_sub(n)) / f64::from(g.slots)
                    },
                    utilization: if g.slots == 0 {
                        0.0
                    } else {
                        f64::from(busy) / f64::from(g.slots)
                    },
                    memory_used_mb: pinned.iter().map(|m| m.memory_mb).sum(),
                    memory_total_mb: g.memory_total_mb,
                }
            })
            .collect()
    }

    /// Requests beyond the GPUs' slots: an estimate of the upstream's queue. Called for every
    /// response header, so it only reads counters.
    pub fn queue_depth(&self) -> u32 {
        self.gpus
            .iter()
            .zip(self.in_flight.iter())
            .map(|(g, n)| n.load(Ordering::Relaxed).saturating_sub(g.slots))
            .sum()
    }

    /// Starts routing `model` to the upstream (after the upstream has it loaded).
    pub fn add_model(&self, model: UpstreamModel) {
        self.models.rcu(|cur| {
            let mut v: Vec<UpstreamModel> =
                cur.iter().filter(|m| m.id != model.id).cloned().collect();
            v.push(model.clone());
            v
        });
    }

    /// Stops routing `id`; true if it was routed.
    pub fn remove_model(&self, id: &str) -> bool {
        let mut found = false;
        self.models.rcu(|cur| {
            found = cur.iter().any(|m| m.id == id);
            cur.iter().filter(|m| m.id != id).cloned().collect::<Vec<_>>()
        });
        found
    }

    pub fn triton(&self) -> Option<&super::triton::TritonRepository> {
        self.triton.as_ref()
    }

    /// `backend.triton_repository`, when set.
    pub fn triton_repository(&self) -> Option<&std::path::Path> {
        self.triton_repository.as_deref()
    }

    /// The upstream's `GET /v1/models` ids: how an OpenAI-compatible server says what it serves.
    pub async fn upstream_models(&self) -> Result<Vec<String>, BackendError> {
        let req = Request::get(format!("{}/v1/models", self.base))
            .body(Bytes::new())
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        let res = tokio::time::timeout(Duration::from_secs(5), self.upstream.send(req))
            .await
            .map_err(|_| BackendError::Timeout("upstream /v1/models did not answer".into()))?
            .map_err(|e| {
                BackendError::Unavailable(format!("upstream /v1/models: {}", source_text(&e)))
            })?;
        if !res.status().is_success() {
            return Err(BackendError::Failed(format!(
                "upstream /v1/models answered {}",
                res.status()
            )));
        }
        let body = Limited::new(res.into_body(), 4 * 1024 * 1024)
            .collect()
            .await
            .map_err(|e| BackendError::Failed(e.to_string()))?
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| BackendError::Failed(format!("upstream /v1/models: {e}")))?;
        Ok(v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str().map(str::to_owned))
            .collect())
    }

    pub async fn chat(
        &self,
        mut req: ChatCompletionRequest,
        ctx: CallContext,
    ) -> Result<Reply, BackendError> {
        let models = self.models.load();
        let Some(model) = models.iter().find(|m| m.id == req.model) else {
            return Err(BackendError::ModelNotFound(req.model));
        };
        let guard = GpuGuard::new(self.in_flight.clone(), self.gpu_index(model));
        if req.continue_final_message == Some(true) && model.continuation == Continuation::Template
        {
            // Boxed: the rare path would otherwise size every chat call's future.
            return Box::pin(self.continue_via_completions(req, ctx, model, guard)).await;
        }
        // Same name upstream: forward the client's bytes untouched; otherwise rewrite `model`.
        let body = match &model.upstream_name {
            Some(name) if *name != req.model => {
                req.model = name.clone();
                Bytes::from(serde_json::to_vec(&req).map_err(|e| {
                    BackendError::Failed(format!("could not encode the request: {e}"))
                })?)
            }
            _ => ctx.raw_body.clone(),
        };
        self.send(self.endpoint.clone(), body, req.stream, guard).await
    }

    /// A realtime session on the upstream (`/v1/realtime` over a WebSocket of its own, on a
    /// fresh connection: never the pooled ones), the model under its upstream name.
    pub async fn realtime(
        &self,
        model: &str,
        max_event_bytes: usize,
    ) -> Result<super::realtime::RealtimeLink, BackendError> {
        let name = {
            let models = self.models.load();
            let Some(m) = models.iter().find(|m| m.id == model) else {
                return Err(BackendError::ModelNotFound(model.to_owned()));
            };
            m.upstream_name.clone().unwrap_or_else(|| m.id.clone())
        };
        let io = self
            .upstream
            .open_stream()
            .await
            .map_err(|e| BackendError::Unavailable(format!("the upstream: {e}")))?;
        let url = super::realtime::upstream_url(&self.base, &name);
        let key = self.api_key.as_deref();
        super::realtime::upstream(io, &url, key, max_event_bytes, self.first_byte_timeout).await
    }

    /// Forwards a speech, transcription or embeddings request on its own path with the
    /// client's bytes untouched, and streams the answer back from its first byte. Client
    /// errors pass through; the upstream's trouble is the node's (502/504, the client fails
    /// over). A model the upstream knows by another name has it rewritten in a JSON body; an
    /// upload goes as it came (name the model alike on both sides for uploads).
    pub async fn surface(
        &self,
        call: super::surface::SurfaceCall,
    ) -> Result<super::surface::SurfaceReply, BackendError> {
        use super::surface::SurfaceReply;
        let models = self.models.load();
        let requested = call.parsed.model().to_owned();
        let Some(model) = models.iter().find(|m| m.id == requested) else {
            return Err(BackendError::ModelNotFound(requested));
        };
        let guard = GpuGuard::new(self.in_flight.clone(), self.gpu_index(model));
        let body = match (&model.upstream_name, call.endpoint.is_upload()) {
            (Some(name), false) if *name != requested => {
                let mut v: serde_json::Value = serde_json::from_slice(&call.raw)
                    .map_err(|e| BackendError::Failed(format!("re-reading the request: {e}")))?;
                v["model"] = name.clone().into();
                Bytes::from(v.to_string())
            }
            _ => call.raw.clone(),
        };
        let uri: http::Uri = format!("{}{}", self.base, call.endpoint.path())
            .parse()
            .map_err(|e| BackendError::Failed(format!("upstream path: {e}")))?;
        let mut request = self.request(uri, body);
        request.headers_mut().insert(header::CONTENT_TYPE, call.content_type.clone());
        let deadline = self.first_byte_timeout;
        let started = tokio::time::Instant::now();
        let response = self.send_within(request, deadline).await?;
        if !response.status().is_success() {
            return Err(Box::pin(upstream_error(response)).await);
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
        let limit = self.max_response_bytes;
        let frames = futures_util::stream::unfold(
            (response.into_body(), guard, 0usize),
            move |(mut body, guard, seen)| async move {
                loop {
                    match body.frame().await? {
                        Err(e) => {
                            let e = BackendError::Failed(format!("upstream answer cut: {e}"));
                            return Some((Err(e), (body, guard, usize::MAX)));
                        }
                        Ok(f) => {
                            let Ok(data) = f.into_data() else { continue };
                            let seen = seen.saturating_add(data.len());
                            if seen > limit {
                                let e = BackendError::Failed(format!(
                                    "the upstream answer exceeds {limit} bytes (max_response_bytes)"
                                ));
                                return Some((Err(e), (body, guard, seen)));
                            }
                            return Some((Ok(data), (body, guard, seen)));
                        }
                    }
                }
            },
        )
        // After an error or the limit, nothing more.
        .take_while({
            let mut failed = false;
            move |item| {
                let go = !failed;
                failed |= item.is_err();
                std::future::ready(go)
            }
        });
        let remaining = deadline.saturating_sub(started.elapsed());
        SurfaceReply::first_of(content_type, Box::pin(frames), remaining).await
    }

    /// A `POST` of `body` to `uri`, with the upstream's API key when one is configured.
    fn request(&self, uri: http::Uri, body: Bytes) -> Request<Bytes> {
        let mut request = Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        if let Some(bearer) = &self.bearer {
            request.headers_mut().insert(header::AUTHORIZATION, bearer.clone());
        }
        request
    }

    /// Sends `request` and waits (at most `deadline`) for the answer's head, classified:
    /// no answer in time 504, no connection 502 (another node may answer), anything else 502.
    async fn send_within(
        &self,
        request: Request<Bytes>,
        deadline: Duration,
    ) -> Result<http::Response<UpstreamBody>, BackendError> {
        match tokio::time::timeout(deadline, self.upstream.send(request)).await {
            Err(_) => Err(Phase::Head.timed_out(deadline)),
            Ok(r) => r.map_err(send_failed),
        }
    }

    /// Continues the final (assistant) message through `/v1/completions`: the node renders the
    /// model's chat template up to the partial answer, and translates the completion back
    /// into the chat answer (or chunks) the client asked for.
    async fn continue_via_completions(
        &self,
        req: ChatCompletionRequest,
        ctx: CallContext,
        model: &UpstreamModel,
        guard: GpuGuard,
    ) -> Result<Reply, BackendError> {
        let Some(template) = self.templates.get(&model.id) else {
            return Err(BackendError::Failed(format!("model `{}` has no chat template", model.id)));
        };
        let prompt =
            template.continuation_prompt(&req.messages).map_err(|e| BackendError::Rejected {
                status: StatusCode::BAD_REQUEST,
                body: ErrorBody::new(
                    e.to_string(),
                    "invalid_request_error",
                    Some("messages".into()),
                    None,
                ),
                retry_after: None,
            })?;
        let name = model.upstream_name.as_deref().unwrap_or(&model.id);
        let body = completions::request(&req, name, prompt);
        let reply = self.send(self.completions.clone(), body, req.stream, guard).await?;
        let (id, created, model) = (ctx.response_id(), ctx.created, req.model);
        match reply {
            Reply::Json(b) => {
                let label = Label { id: &id, created, model: &model };
                completions::chat_json(&b, &label).map(Reply::Json).map_err(BackendError::Failed)
            }
            Reply::Stream(s) => {
                let mut chunks = ChunkTranslator::default();
                Ok(Reply::Stream(Box::pin(s.map(move |ev| {
                    match ev {
                        Ok(StreamEvent::Frames { raw, .. }) => chunks
                            .frames(&raw, &Label { id: &id, created, model: &model })
                            .map(|(raw, events)| StreamEvent::Frames { raw, events })
                            .map_err(BackendError::Failed),
                        other => other,
                    }
                }))))
            }
        }
    }

    /// Sends `body` to `uri` and reads the answer up to the commit point (the whole answer, or
    /// the first streamed event), within the first-byte deadline.
    async fn send(
        &self,
        uri: http::Uri,
        body: Bytes,
        stream: bool,
        guard: GpuGuard,
    ) -> Result<Reply, BackendError> {
        let mut request = self.request(uri, body);
        let h = request.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let accept = if stream { "text/event-stream" } else { "application/json" };
        h.insert(header::ACCEPT, HeaderValue::from_static(accept));

        let deadline = if stream { self.first_byte_timeout } else { self.request_timeout };
        // One timer for the whole way to the commit point (the answer's head, then its body or
        // first event); `phase` says which part ran out of time.
        let mut phase = Phase::Head;
        let within = async {
            let response = self.upstream.send(request).await.map_err(send_failed)?;
            if !response.status().is_success() {
                return Ok(Committed::Refused(response));
            }
            if !stream {
                phase = Phase::Body;
                let read = Limited::new(response.into_body(), self.max_response_bytes).collect();
                let bytes = read.await.map_err(|e| {
                    BackendError::Failed(format!("reading the upstream answer failed: {e}"))
                })?;
                return Ok(Committed::Json(bytes.to_bytes()));
            }
            phase = Phase::FirstToken;
            // Boxed now: it becomes the answer's stream as it is.
            let mut upstream = Box::new(UpstreamStream {
                body: response.into_body(),
                decoder: SseDecoder::new(MAX_EVENT_BYTES),
                first: None,
                pending: None,
                guard: None,
            });
            match std::future::poll_fn(|cx| upstream.poll_event(cx)).await {
                None => Err(BackendError::Failed(
                    "upstream closed the stream before the first token".into(),
                )),
                Some(Err(e)) => Err(e),
                Some(Ok(first)) => {
                    upstream.first = Some(first);
                    Ok(Committed::Stream(upstream))
                }
            }
        };
        let committed = match tokio::time::timeout(deadline, within).await {
            Err(_) => return Err(phase.timed_out(deadline)),
            Ok(c) => c?,
        };
        match committed {
            // Read outside the deadline: an upstream's refusal is passed on whole.
            Committed::Refused(response) => Err(Box::pin(upstream_error(response)).await),
            Committed::Json(bytes) => Ok(Reply::Json(bytes)),
            Committed::Stream(mut upstream) => {
                upstream.guard = Some(guard);
                Ok(Reply::Stream(Box::into_pin(upstream)))
            }
        }
    }
}

/// What [`OpenAiBackend::send`] has at the commit point.
enum Committed {
    /// A non-2xx answer, its body not read yet.
    Refused(http::Response<UpstreamBody>),
    Json(Bytes),
    Stream(Box<UpstreamStream>),
}

/// The part of an upstream call that was running when its deadline passed.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Sending the request and waiting for the answer's head.
    Head,
    /// Reading a JSON answer's body.
    Body,
    /// Waiting for a stream's first event.
    FirstToken,
}

impl Phase {
    fn timed_out(self, deadline: Duration) -> BackendError {
        let ms = deadline.as_millis();
        BackendError::Timeout(match self {
            Phase::Head => format!("upstream sent no response within {ms} ms"),
            Phase::Body => format!("upstream did not finish its answer within {ms} ms"),
            Phase::FirstToken => format!("upstream sent no token within {ms} ms"),
        })
    }
}

/// An upstream call that failed before its answer's head: no connection 502 (another node may
/// answer), anything else 502.
fn send_failed(e: UpstreamError) -> BackendError {
    if e.is_connect() {
        BackendError::Unavailable(format!("cannot connect to the upstream: {}", source_text(&e)))
    } else {
        BackendError::Failed(format!("upstream request failed: {}", source_text(&e)))
    }
}

/// Counts a request against its GPU while it is in flight.
struct GpuGuard(Arc<Vec<AtomicU32>>, usize);

impl GpuGuard {
    fn new(counters: Arc<Vec<AtomicU32>>, i: usize) -> Self {
        counters[i].fetch_add(1, Ordering::Relaxed);
        GpuGuard(counters, i)
    }
}

impl Drop for GpuGuard {
    fn drop(&mut self) {
        self.0[self.1].fetch_sub(1, Ordering::Relaxed);
    }
}

/// An upstream's SSE answer as a stream of [`StreamEvent`]s: whole events forwarded verbatim,
/// in batches of what arrived together, then `Done` or an error, then nothing. No timer per
/// event: the gateway's one idle deadline per stream (chat.rs) ends a stalled stream, and
/// dropping this stream closes the upstream.
struct UpstreamStream {
    body: UpstreamBody,
    decoder: SseDecoder,
    /// The event met at the commit point, delivered first.
    first: Option<StreamEvent>,
    /// An ending read together with the last batch, delivered on the next call.
    pending: Option<Result<StreamEvent, BackendError>>,
    /// Held until the stream ends; `None` once it has.
    guard: Option<GpuGuard>,
}

impl UpstreamStream {
    /// The next batch of whole events (verbatim), `Done`, or an error; `None` when the body
    /// ended with nothing but whitespace pending. The body's bytes are decoded where they
    /// land: read straight into the decoder's buffer, chunk framing removed on the way.
    fn poll_event(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<StreamEvent, BackendError>>> {
        if let Some(p) = self.pending.take() {
            return Poll::Ready(Some(p));
        }
        loop {
            match self.decoder.next_batch() {
                Err(e) => {
                    return Poll::Ready(Some(Err(BackendError::Failed(format!(
                        "upstream stream is malformed: {e}"
                    )))));
                }
                Ok(Some(batch)) => {
                    let ending = batch.ending.map(|e| match e {
                        Ending::Done => Ok(StreamEvent::Done),
                        Ending::Error(payload) => Err(BackendError::Failed(format!(
                            "upstream reported an error: {}",
                            String::from_utf8_lossy(&payload)
                        ))),
                    });
                    if batch.events == 0 {
                        match ending {
                            Some(e) => return Poll::Ready(Some(e)),
                            None => continue,
                        }
                    }
                    self.pending = ending;
                    let ev = StreamEvent::Frames { raw: batch.raw, events: batch.events };
                    return Poll::Ready(Some(Ok(ev)));
                }
                Ok(None) => {}
            }
            match self.body.poll_read_into(cx, self.decoder.buf_mut(), MAX_GATHER_BYTES) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => return Poll::Ready(None),
                Poll::Ready(Err(e)) => {
                    let e = BackendError::Failed(format!("upstream stream broke: {e}"));
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

impl futures_util::Stream for UpstreamStream {
    type Item = Result<StreamEvent, BackendError>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.guard.is_none() {
            return Poll::Ready(None);
        }
        let item = match this.first.take() {
            Some(first) => Ok(first),
            None => match std::task::ready!(this.poll_event(cx)) {
                Some(item) => item,
                None => Err(BackendError::Failed("upstream stream ended before [DONE]".into())),
            },
        };
        if matches!(item, Err(_) | Ok(StreamEvent::Done)) {
            this.guard = None;
        }
        Poll::Ready(Some(item))
    }
}

fn source_text(e: &UpstreamError) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Maps a non-2xx upstream answer: client errors pass through (never the node's fault),
/// server errors become a 502 the client can fail over on.
async fn upstream_error(response: http::Response<UpstreamBody>) -> BackendError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = tokio::time::timeout(
        Duration::from_secs(5),
        Limited::new(response.into_body(), MAX_ERROR_BYTES).collect(),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .map(|c| c.to_bytes())
    .unwrap_or_default();
    let message = || {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                let m = v
                    .pointer("/error/message")
                    .or_else(|| v.get("error"))
                    .or_else(|| v.get("message"))?;
                Some(m.as_str().map(str::to_owned).unwrap_or_else(|| m.to_string()))
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(500).collect())
    };
    if status.is_client_error() {
        let parsed = serde_json::from_slice::<ErrorBody>(&body).ok();
        let body = parsed.unwrap_or_else(|| {
            let kind = if status == StatusCode::TOO_MANY_REQUESTS {
                "rate_limit_error"
            } else {
                "invalid_request_error"
            };
            ErrorBody::new(format!("upstream: {}", message()), kind, None, None)
        });
        return BackendError::Rejected { status, body, retry_after };
    }
    if status == StatusCode::SERVICE_UNAVAILABLE {
        return BackendError::Overloaded(format!("upstream is overloaded: {}", message()));
    }
    BackendError::Failed(format!("upstream answered {status}: {}", message()))
}
