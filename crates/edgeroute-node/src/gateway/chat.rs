//! `POST /v1/chat/completions`: validate, admit, call the backend, and stream the answer.
//!
//! The stream's commit point is the backend's first chunk: until then any failure is a clean
//! 5xx (the client fails over); after it, a failure ends the stream with an SSE error event and
//! no `[DONE]`, so a truncated answer is never mistaken for a complete one.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use edgeroute_auth::Scope;
use edgeroute_http::ApiError;
use edgeroute_proto::ChatCompletionRequest;
use edgeroute_proto::MigrateHint;
use edgeroute_proto::headers::{SESSION_HEADER, is_hint_token};
use edgeroute_proto::sse::{DONE_FRAME, data_frame};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, header};
use tokio::time::Instant;

use super::admission::{self, TenantSlot};
use super::{AppState, auth, hdr, ratelimit};
use crate::backend::{BackendError, CallContext, EventStream, Reply, StreamEvent};
use crate::config::ms;
use crate::lifecycle::Admission;
use crate::models::ModelUse;
use crate::telemetry::{InFlight, Outcome};

const ROUTE: &str = "chat";

/// The chat route: authentication, the tenant's rate limit and the handler as plain calls in
/// one future (served as a [`super::Route`]). The generic middleware layers would cost this
/// route, the one every token goes through, a boxed future each and a copy of the header map;
/// here the request's own headers are borrowed and the whole path is one allocation.
pub(super) async fn serve(st: AppState, scope: Scope, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let tenant = match auth::authenticate(&st, &parts.headers, scope) {
        Ok(t) => t,
        Err(refusal) => return refusal,
    };
    let admitted = match ratelimit::check(&st, &tenant) {
        Ok(a) => a,
        Err(refusal) => return refusal,
    };
    let mut res = chat_completions(&st, &tenant, &parts.headers, body).await;
    admitted.apply(res.headers_mut());
    res
}

async fn chat_completions(
    st: &AppState,
    tenant: &Arc<str>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let mut model = None;
    let mut res = match handle(st, tenant, headers, body, &mut model).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    };
    // Every answer for a model being unloaded says so, unless the whole node already asks the
    // session to move.
    if let Some(model) = model
        && !res.headers().contains_key(hdr::MIGRATE)
        && let Some(hint) = st.models.drain_hint(&model, Instant::now())
        && let Ok(v) = HeaderValue::from_str(&hint.to_string())
    {
        res.headers_mut().insert(hdr::MIGRATE, v);
    }
    st.metrics.request(ROUTE, res.status().as_u16());
    res
}

/// Counts a refusal by `reason` and passes it on.
pub(super) fn refused<'a>(
    st: &'a AppState,
    reason: &'static str,
) -> impl FnOnce(ApiError) -> ApiError + 'a {
    move |e| {
        st.metrics.reject(reason);
        e
    }
}

async fn handle(
    st: &AppState,
    tenant: &Arc<str>,
    headers: &HeaderMap,
    body: Body,
    model: &mut Option<String>,
) -> Result<Response, ApiError> {
    let l = &st.limits;
    let Admitted { started, now, session, hint, slot, tenant_slot, body_room, body: raw_body } =
        admit(st, tenant, headers, body, l.max_body_bytes).await?;
    let mut req: ChatCompletionRequest =
        edgeroute_http::json::parse_json(&raw_body).map_err(refused(st, "invalid_request"))?;
    req.validate()
        .map_err(|e| ApiError::invalid_request(Some(&e.param), e.message))
        .map_err(refused(st, "invalid_request"))?;
    admission::check_ceilings(&req, l).map_err(refused(st, "over_ceiling"))?;
    // Only fields the backend is meant to see reach it; the client's bytes are forwarded
    // untouched when nothing was dropped.
    let dropped = admission::drop_unknown_fields(&mut req, &st.forward_fields);
    let raw_body = if dropped == 0 {
        raw_body
    } else {
        st.metrics.fields_dropped.inc_by(dropped as u64);
        Bytes::from(serde_json::to_vec(&req).map_err(|e| ApiError::internal(e.to_string()))?)
    };
    *model = Some(req.model.clone());
    // Held until the answer ends: an unload drains until every hold is released.
    let Some(model_use) = st.models.acquire(&req.model) else {
        st.metrics.reject("model_not_found");
        return Err(ApiError::model_not_found(&req.model));
    };
    if let Some(s) = session {
        st.sessions.touch(s, now);
    }
    let version = model_use.version.clone();

    let seq = st.seq.fetch_add(1, Ordering::Relaxed);
    let ctx = CallContext {
        id_prefix: Arc::clone(&st.response_ids),
        seq,
        created: edgeroute_core::clock::unix_s(&st.clock),
        idle_timeout: ms(st.limits.stream_idle_timeout_ms),
        raw_body,
    };
    let idle = ctx.idle_timeout;
    let reply = st.backend.chat(req, ctx).await;
    // The body has reached the backend: its room is free for the next one.
    drop(body_room);
    let reply = reply.map_err(|e| backend_failed(st, started, &e))?;
    let ttft = started.elapsed();
    st.metrics.ttft.observe(ttft.as_secs_f64());
    let mut res = match reply {
        Reply::Json(bytes) => {
            st.telemetry.record(Some(ttft), ttft, Outcome::Ok);
            st.metrics.duration.observe(ttft.as_secs_f64());
            drop(slot);
            drop(tenant_slot);
            drop(model_use);
            let mut res = Response::new(Body::from(bytes));
            answer_headers(&mut res)
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            res
        }
        Reply::Stream(events) => {
            let recorder = Recorder {
                st: st.clone(),
                _slot: slot,
                _tenant: tenant_slot,
                _model: model_use,
                started,
                ttft,
                outcome: None,
            };
            let mut res = Response::new(Body::new(sse(events, recorder, idle)));
            let h = answer_headers(&mut res);
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            h.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
            res
        }
    };
    answered(&mut res, hint, version);
    Ok(res)
}

const X_ACCEL_BUFFERING: header::HeaderName = header::HeaderName::from_static("x-accel-buffering");

/// An answer's header map, sized once for what the node adds to it (content type, the
/// rate-limit, node and load headers, a hint, the version): grown one insert at a time, it
/// was allocated and then rehashed on the way.
fn answer_headers(res: &mut Response) -> &mut HeaderMap {
    let h = res.headers_mut();
    h.reserve(12);
    h
}

/// What every answer of an admitted request carries: the phase's migrate hint, and which
/// registry version answered (the model id names the logical model).
pub(super) fn answered(
    res: &mut Response,
    hint: Option<MigrateHint>,
    version: Option<HeaderValue>,
) {
    if let Some(h) = hint
        && let Ok(v) = HeaderValue::from_str(&h.to_string())
    {
        res.headers_mut().insert(hdr::MIGRATE, v);
    }
    if let Some(v) = version {
        res.headers_mut().insert(hdr::MODEL_VERSION, v);
    }
}

/// What a request holds once admitted: its slots (released when dropped), its body, and the
/// migrate hint the node's phase adds.
pub(super) struct Admitted<'h> {
    pub started: Instant,
    pub now: Duration,
    pub session: Option<&'h str>,
    pub hint: Option<MigrateHint>,
    pub slot: InFlight,
    pub tenant_slot: TenantSlot,
    pub body_room: admission::BodyRoom,
    pub body: Bytes,
}

/// Admission, from the head first (a request the node will not serve costs it no body bytes):
/// the session header, the node's phase, its concurrency, the tenant's share, the body budget;
/// then the body within `max_body` bytes and the read deadline. Every refusal is counted.
pub(super) async fn admit<'h>(
    st: &AppState,
    tenant: &Arc<str>,
    headers: &'h HeaderMap,
    body: Body,
    max_body: usize,
) -> Result<Admitted<'h>, ApiError> {
    let started = Instant::now();
    let l = &st.limits;
    // Admission first, from the head alone: a request the node will not serve costs it no
    // body bytes.
    let now = st.telemetry.now();
    let session = headers
        .get(hdr::SESSION)
        .map(|v| v.to_str().ok().filter(|s| is_hint_token(s)))
        .map(|s| {
            s.ok_or_else(|| {
                ApiError::invalid_request(
                    None,
                    format!(
                        "Header `{SESSION_HEADER}` must be 1-128 characters of [A-Za-z0-9._:-]."
                    ),
                )
            })
        })
        .transpose()
        .map_err(refused(st, "invalid_request"))?;
    let known = session.is_some_and(|s| st.sessions.is_known(s, now));
    let hint = match st.phase.load().admit(now, known) {
        Admission::Admit(hint) => hint,
        Admission::Refuse { code, hint } => {
            st.metrics.reject(if code == "node_draining" { "draining" } else { "shutting_down" });
            return Err(refusal(
                code,
                "This node is not accepting new sessions; move to another node.",
                hint,
            ));
        }
    };
    let Some(slot) = st.telemetry.try_admit(l.max_concurrency) else {
        st.metrics.reject("overloaded");
        let hint = MigrateHint { reason: "overload".into(), deadline_ms: 0, to: None, model: None };
        return Err(refusal(
            "node_overloaded",
            "This node is at its concurrency limit; retry on another node.",
            hint,
        ));
    };
    let Some(tenant_slot) = st.tenants.try_acquire(tenant) else {
        st.metrics.reject("tenant_concurrency");
        return Err(ApiError::new(
            http::StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("tenant_concurrency_exceeded"),
            format!(
                "This tenant has {} requests in flight on this node, its limit; retry on another node or when one ends.",
                l.tenant_concurrency()
            ),
        )
        .with_header(header::RETRY_AFTER, "1"));
    };
    let size =
        admission::declared_body(headers, max_body).map_err(refused(st, "body_too_large"))?;
    let Some(body_room) = st.bodies.try_reserve(tenant, size) else {
        st.metrics.reject("body_budget");
        return Err(ApiError::unavailable(
            "body_budget_exhausted",
            "This node is receiving as many request bodies as it holds; retry on another node.",
            1,
        ));
    };
    let raw_body = admission::read_body(body, max_body, ms(l.body_read_timeout_ms))
        .await
        .inspect_err(|e| {
            st.metrics.reject(match e.status.as_u16() {
                408 => "body_timeout",
                413 => "body_too_large",
                _ => "invalid_request",
            });
        })?;
    Ok(Admitted { started, now, session, hint, slot, tenant_slot, body_room, body: raw_body })
}

/// A backend failure before the commit point: counted against the node when it is the node's
/// (the backend refusing the request itself, a prompt beyond the context, is the caller's).
pub(super) fn backend_failed(st: &AppState, started: Instant, e: &BackendError) -> ApiError {
    if e.is_node_fault() {
        st.telemetry.record(None, started.elapsed(), Outcome::Failed);
        st.metrics.backend_error(e.kind());
    } else {
        st.metrics.reject("backend_rejected");
    }
    e.to_api()
}

pub(super) fn refusal(code: &'static str, message: &str, hint: MigrateHint) -> ApiError {
    let retry_s = hint.deadline_ms.div_ceil(1000).clamp(1, 60);
    ApiError::unavailable(code, message, retry_s).with_header(hdr::MIGRATE, hint.to_string())
}

/// Records how a stream ended when it is dropped: finished, failed, or abandoned by the client
/// (hyper drops the body when the connection goes away, which drops the backend stream and
/// with it the upstream request and the node's slot).
struct Recorder {
    st: AppState,
    _slot: InFlight,
    _tenant: TenantSlot,
    _model: ModelUse,
    started: Instant,
    ttft: Duration,
    outcome: Option<Outcome>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let total = self.started.elapsed();
        match self.outcome {
            Some(o) => {
                self.st.telemetry.record(Some(self.ttft), total, o);
                if o == Outcome::Ok {
                    self.st.metrics.duration.observe(total.as_secs_f64());
                }
            }
            None => {
                self.st.metrics.streams_cancelled.inc();
            }
        }
    }
}

fn error_frame(e: &BackendError) -> Bytes {
    data_frame(&e.to_api().body_json())
}

/// Frames backend events as SSE, enforcing the idle deadline between events. Each backend item
/// (a batch of whole events as the upstream sent them) is one body frame, passed on without a
/// copy; hyper writes the frames that are ready together in one write, as a byte-forwarding
/// proxy would, and nothing is ever held back waiting for more.
fn sse(events: EventStream, recorder: Recorder, idle: Duration) -> Sse {
    Sse { events, rec: Some(recorder), idle, last: Instant::now(), deadline: None }
}

/// The answer's SSE body. The idle deadline is one timer per stream, made the first time the
/// backend has nothing ready (an answer that arrives whole never arms one), and moved lazily:
/// an event only records the time (no timer-wheel update per token); when the timer fires
/// early it is re-armed from the last event, and fires for real only after `idle` of silence.
struct Sse {
    events: EventStream,
    /// `None` once the stream is over.
    rec: Option<Recorder>,
    idle: Duration,
    /// The last event's time, kept once the deadline exists.
    last: Instant,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// An HTTP body itself (not a `Stream` wrapped into one): one layer less per frame, and its
/// end is known with its last frame, so the server writes the closing chunk with it.
impl hyper::body::Body for Sse {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.poll_data(cx).map(|d| d.map(|d| Ok(hyper::body::Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.rec.is_none()
    }
}

impl Sse {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = self;
        let Some(rec) = this.rec.as_mut() else { return Poll::Ready(None) };
        if let Poll::Ready(item) = this.events.poll_next_unpin(cx) {
            if this.deadline.is_some() {
                this.last = Instant::now();
            }
            let (frame, done) = rec.frame(item);
            if done {
                this.rec = None;
            }
            return Poll::Ready(Some(frame));
        }
        if this.deadline.is_none() {
            this.last = Instant::now();
        }
        let idle = this.idle;
        let deadline = this.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        loop {
            if deadline.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let due = this.last + this.idle;
            if Instant::now() < due {
                deadline.as_mut().reset(due);
                continue;
            }
            rec.st.metrics.backend_error("timeout");
            rec.outcome = Some(Outcome::Failed);
            this.rec = None;
            let e = BackendError::Timeout(format!(
                "backend produced nothing for {} ms",
                this.idle.as_millis()
            ));
            return Poll::Ready(Some(error_frame(&e)));
        }
    }
}

impl Recorder {
    /// One backend item as the body's next frame; true when the stream is over.
    fn frame(&mut self, item: Option<Result<StreamEvent, BackendError>>) -> (Bytes, bool) {
        match item {
            Some(Ok(StreamEvent::Frames { raw, events })) => {
                self.st.metrics.stream_chunks.inc_by(u64::from(events));
                (raw, false)
            }
            Some(Ok(StreamEvent::Done)) => {
                self.outcome = Some(Outcome::Ok);
                (Bytes::from_static(DONE_FRAME), true)
            }
            Some(Err(e)) => {
                self.st.metrics.backend_error(e.kind());
                self.outcome = Some(Outcome::Failed);
                (error_frame(&e), true)
            }
            None => {
                self.st.metrics.backend_error("failed");
                self.outcome = Some(Outcome::Failed);
                let e = BackendError::Failed(
                    "backend ended the stream before finishing the answer".into(),
                );
                (error_frame(&e), true)
            }
        }
    }
}
