//! `GET /v1/realtime?model=M`: a realtime session (OpenAI's realtime event protocol) over a
//! WebSocket, proxied to the backend's session (issue 19).
//!
//! Who may call: a token with the inference scope, checked at the upgrade — in
//! `Authorization: Bearer`, or for a browser in the subprotocol
//! `openai-insecure-api-key.<token>` as OpenAI's API takes it. Everything is decided before
//! the upgrade is answered, so each refusal is a plain OpenAI-shaped HTTP error: 401/403
//! (token), 429 (the tenant's rate, or its share of realtime sessions), 400 (no model, not a
//! WebSocket upgrade), 404 (model not served), 503 + `Retry-After` (draining, full), 502/504
//! (the backend would not open a session: the client fails over). The backend's session is
//! opened before the upgrade for the same reason.
//!
//! Once open, events pass through untouched both ways (text frames; a binary frame gets an
//! `error` event). The node keeps, per session: its hold on the model (an unload drains it),
//! its realtime seat, an idle deadline (`limits.realtime_idle_timeout_ms`), a lifetime
//! (`limits.realtime_max_session_s`) and the event size (`limits.max_realtime_event_bytes`,
//! tungstenite closes with 1009 beyond). When the node drains, shuts down or unloads the
//! model, the session gets one `edgeroute.migrate` event (the migrate header's fields) and,
//! at the hint's deadline, a close with 1012 — the SDK moves the session between turns, with
//! its conversation replayed. Time to first audio (from `response.create` to the first
//! `response.audio.delta`, or text delta for a text-only response) is recorded as
//! `edgeroute_node_first_byte_seconds{route="realtime"}`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Request};
use axum::response::{IntoResponse, Response};
use edgeroute_auth::Scope;
use edgeroute_http::ApiError;
use edgeroute_proto::MigrateHint;
use edgeroute_proto::realtime::{
    CLOSE_BACKEND_FAILED, CLOSE_MOVED, CLOSE_POLICY, KEY_SUBPROTOCOL_PREFIX, SUBPROTOCOL,
    error_event, migrate_event,
};
use http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::admission::{TenantSlot, TenantSlots};
use super::chat::backend_failed;
use super::{AppState, auth, ratelimit};
use crate::backend::realtime::RealtimeLink;
use crate::config::{Limits, ms};
use crate::lifecycle::Admission;
use crate::models::ModelUse;

/// How often an open session looks for a migrate hint (drain, shutdown, unload).
const HINT_EVERY: Duration = Duration::from_millis(250);

/// The node's realtime seats: all sessions together, and each tenant's share.
#[derive(Debug)]
pub struct Seats {
    total: Arc<Semaphore>,
    tenants: Arc<TenantSlots>,
}

/// One session's seat, given back when it ends.
#[derive(Debug)]
struct Seat {
    _total: OwnedSemaphorePermit,
    _tenant: TenantSlot,
}

impl Seats {
    pub fn new(l: &Limits) -> Seats {
        Seats {
            total: Arc::new(Semaphore::new(l.max_realtime_sessions as usize)),
            tenants: TenantSlots::new(l.tenant_realtime_sessions()),
        }
    }

    /// Sessions open now.
    pub fn open(&self, max: u32) -> u32 {
        max.saturating_sub(self.total.available_permits() as u32)
    }
}

/// The upgrade: every check, the backend's session, then the WebSocket.
pub(super) async fn upgrade(st: AppState, scope: Scope, req: Request) -> Response {
    let (mut parts, _) = req.into_parts();
    let ws = WebSocketUpgrade::from_request_parts(&mut parts, &()).await;
    let res = match open(&st, scope, &parts.uri, &parts.headers, ws).await {
        Ok(res) => res,
        Err(e) => e.into_response(),
    };
    st.metrics.request("realtime", res.status().as_u16());
    res
}

async fn open(
    st: &AppState,
    scope: Scope,
    uri: &Uri,
    headers: &HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let (offered, token) = subprotocols(headers);
    let tenant = match token {
        // The browser's way: the token rides in the subprotocol (never both).
        Some(t) if !headers.contains_key(AUTHORIZATION) => {
            let mut h = HeaderMap::new();
            let v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                ApiError::unauthorized(
                    "invalid_token",
                    "The token in the subprotocol is malformed.",
                )
            })?;
            h.insert(AUTHORIZATION, v);
            auth::authenticate(st, &h, scope)
        }
        _ => auth::authenticate(st, headers, scope),
    };
    let tenant = match tenant {
        Ok(t) => t,
        Err(refusal) => return Ok(refusal),
    };
    let admitted = match ratelimit::check(st, &tenant) {
        Ok(a) => a,
        Err(refusal) => return Ok(refusal),
    };
    let ws = ws.map_err(|e| {
        st.metrics.reject("invalid_request");
        ApiError::invalid_request(
            None,
            format!("`/v1/realtime` is a WebSocket: send a GET with `Upgrade: websocket` ({e})."),
        )
    })?;
    let model = model_of(uri).ok_or_else(|| {
        st.metrics.reject("invalid_request");
        ApiError::invalid_request(Some("model"), "`model` is required: `/v1/realtime?model=…`.")
    })?;
    if let Admission::Refuse { code, hint } = st.phase.load().admit(st.telemetry.now(), false) {
        st.metrics.reject(if code == "node_draining" { "draining" } else { "shutting_down" });
        return Err(super::chat::refusal(
            code,
            "This node is not accepting new sessions; move to another node.",
            hint,
        ));
    }
    let l = &st.limits;
    let Ok(total) = st.realtime.total.clone().try_acquire_owned() else {
        st.metrics.reject("realtime_full");
        let hint = MigrateHint { reason: "overload".into(), deadline_ms: 0, to: None, model: None };
        return Err(super::chat::refusal(
            "node_overloaded",
            &format!(
                "This node holds {} realtime sessions, its limit; open the session on another \
                 node.",
                l.max_realtime_sessions
            ),
            hint,
        ));
    };
    let Some(tenant_seat) = st.realtime.tenants.try_acquire(&tenant) else {
        st.metrics.reject("tenant_concurrency");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("tenant_realtime_sessions_exceeded"),
            format!(
                "This tenant holds {} realtime sessions on this node, its limit; close one or \
                 open it on another node.",
                l.tenant_realtime_sessions()
            ),
        )
        .with_header(http::header::RETRY_AFTER, "1"));
    };
    let Some(model_use) = st.models.acquire(&model) else {
        st.metrics.reject("model_not_found");
        return Err(ApiError::model_not_found(&model));
    };
    let started = Instant::now();
    let link = st
        .backend
        .realtime(&model, l.max_realtime_event_bytes)
        .await
        .map_err(|e| backend_failed(st, started, &e))?;
    let seat = Seat { _total: total, _tenant: tenant_seat };
    let session = Open { st: st.clone(), model, _use: model_use, _seat: seat, link };
    let mut ws =
        ws.max_message_size(l.max_realtime_event_bytes).max_frame_size(l.max_realtime_event_bytes);
    if offered {
        ws = ws.protocols([SUBPROTOCOL]);
    }
    let mut res = ws.on_upgrade(move |socket| session.run(socket));
    admitted.apply(res.headers_mut());
    Ok(res)
}

/// Whether the client offered the `realtime` subprotocol, and the token it carries in
/// `openai-insecure-api-key.<token>` if any.
fn subprotocols(headers: &HeaderMap) -> (bool, Option<String>) {
    let (mut offered, mut token) = (false, None);
    for v in headers.get_all(SEC_WEBSOCKET_PROTOCOL) {
        for p in v.to_str().unwrap_or_default().split(',').map(str::trim) {
            if p == SUBPROTOCOL {
                offered = true;
            } else if let Some(t) = p.strip_prefix(KEY_SUBPROTOCOL_PREFIX) {
                token = Some(t.to_owned());
            }
        }
    }
    (offered, token)
}

/// `model` from the query string, percent-decoded; `None` when absent or empty.
fn model_of(uri: &Uri) -> Option<String> {
    #[derive(Deserialize)]
    struct Q {
        model: Option<String>,
    }
    let q: Q = serde_urlencoded_lite(uri.query().unwrap_or_default())?;
    q.model.filter(|m| !m.is_empty() && m.len() <= 256)
}

/// A query string's pairs, as axum's `Query` reads them.
fn serde_urlencoded_lite<T: serde::de::DeserializeOwned>(q: &str) -> Option<T> {
    let uri: Uri = format!("/?{q}").parse().ok()?;
    axum::extract::Query::<T>::try_from_uri(&uri).ok().map(|axum::extract::Query(t)| t)
}

/// An event's `type`, read without building the event.
fn kind(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct K<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<K>(text).ok()?.kind.map(|k| k.into_owned())
}

/// An open session: what it holds until it ends.
struct Open {
    st: AppState,
    model: String,
    _use: ModelUse,
    _seat: Seat,
    link: RealtimeLink,
}

/// Why a session ended, as the close frame says it.
fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

impl Open {
    async fn run(self, mut socket: WebSocket) {
        let Open { st, model, _use, _seat, link } = self;
        let RealtimeLink { tx, mut rx } = link;
        let l = &st.limits;
        let idle = ms(l.realtime_idle_timeout_ms);
        let end_of_life = Instant::now() + Duration::from_secs(l.realtime_max_session_s);
        let mut last = Instant::now();
        let mut tick = tokio::time::interval(HINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The deadline of the migrate hint sent, once one is.
        let mut moving: Option<Instant> = None;
        // When the response under way was asked for, until its first audio (or text).
        let mut asked: Option<Instant> = None;
        let mut events = 0u64;
        let mut event_id = || {
            events += 1;
            format!("event_edgeroute_{events}")
        };
        let ended = loop {
            tokio::select! {
                m = socket.recv() => {
                    last = Instant::now();
                    match m {
                        Some(Ok(Message::Text(t))) => {
                            if t.as_str().contains("response.create")
                                && kind(t.as_str()).as_deref() == Some("response.create")
                            {
                                asked = Some(Instant::now());
                            }
                            if tx.send(t.as_str().to_owned()).await.is_err() {
                                break Some(close(CLOSE_BACKEND_FAILED, "the backend ended the session"));
                            }
                        }
                        Some(Ok(Message::Binary(_))) => {
                            let e = error_event(&event_id(), "invalid_request_error",
                                "invalid_frame", "Events are JSON text frames.", None, None);
                            if socket.send(Message::Text(e.to_string().into())).await.is_err() {
                                break None;
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => break None,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            let too_big = e.into_inner().downcast_ref::<tokio_tungstenite::tungstenite::Error>()
                                .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
                            if too_big {
                                st.metrics.reject("realtime_event_too_large");
                                break Some(close(1009, "an event is larger than limits.max_realtime_event_bytes"));
                            }
                            break None;
                        }
                    }
                }
                ev = rx.recv() => match ev {
                    Some(text) => {
                        last = Instant::now();
                        if let Some(t0) = asked {
                            match kind(&text).as_deref() {
                                Some("response.audio.delta" | "response.text.delta") => {
                                    st.metrics.first_byte("realtime", t0.elapsed().as_secs_f64());
                                    asked = None;
                                }
                                Some("response.done") => asked = None,
                                _ => {}
                            }
                        }
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            break None;
                        }
                    }
                    None => {
                        st.metrics.backend_error("realtime_closed");
                        let e = error_event(&event_id(), "server_error", "backend_closed",
                            "The backend ended the session; open it again (on another node).",
                            None, None);
                        let _ = socket.send(Message::Text(e.to_string().into())).await;
                        break Some(close(CLOSE_BACKEND_FAILED, "the backend ended the session"));
                    }
                },
                _ = tick.tick() => {
                    let now = Instant::now();
                    if now.duration_since(last) >= idle {
                        break Some(close(1000, "idle: no event within limits.realtime_idle_timeout_ms"));
                    }
                    if now >= end_of_life {
                        break Some(close(CLOSE_POLICY, "the session reached limits.realtime_max_session_s"));
                    }
                    match moving {
                        Some(deadline) if now >= deadline => {
                            break Some(close(CLOSE_MOVED, "moved: this node asked the session to move"));
                        }
                        Some(_) => {}
                        None => {
                            let hint = st.phase.load().hint(st.telemetry.now())
                                .or_else(|| st.models.drain_hint(&model, now));
                            if let Some(h) = hint {
                                let ev = migrate_event(&event_id(), &h);
                                if socket.send(Message::Text(ev.to_string().into())).await.is_err() {
                                    break None;
                                }
                                moving = Some(now + Duration::from_millis(h.deadline_ms));
                            }
                        }
                    }
                }
            }
        };
        if let Some(frame) = ended {
            let _ = socket.send(frame).await;
        }
        // Dropping `tx` ends the backend's session; the seat and the model's hold go with
        // `_seat` and `_use`.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_may_ride_in_the_subprotocol() {
        let mut h = HeaderMap::new();
        h.insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(
                "realtime, openai-insecure-api-key.abc.def, openai-beta.realtime-v1",
            ),
        );
        assert_eq!(subprotocols(&h), (true, Some("abc.def".into())));
        assert_eq!(subprotocols(&HeaderMap::new()), (false, None));
    }

    #[test]
    fn the_model_comes_from_the_query_decoded() {
        let u: Uri = "/v1/realtime?model=org%2Fvoice-1&x=1".parse().unwrap();
        assert_eq!(model_of(&u).as_deref(), Some("org/voice-1"));
        assert_eq!(model_of(&"/v1/realtime".parse().unwrap()), None);
        assert_eq!(model_of(&"/v1/realtime?model=".parse().unwrap()), None);
    }

    #[test]
    fn an_events_type_is_read_alone() {
        assert_eq!(
            kind(r#"{"event_id":"e","type":"response.create"}"#).as_deref(),
            Some("response.create")
        );
        assert_eq!(kind(r#"{"audio":"AAAA"}"#), None);
        assert_eq!(kind("not json"), None);
    }
}
