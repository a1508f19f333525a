//! `edgeroute proxy`: the client SDK behind an OpenAI-compatible endpoint on the client's own
//! machine, so any OpenAI client in any language gets edgeroute's routing and failover without
//! a code change — point its base URL at `http://127.0.0.1:PORT/v1`.
//!
//! Who may call it: whoever reaches its listener (it binds to loopback by default and holds the
//! user's token for the fleet); the fleet's nodes check that token on every request.
//!
//! A session (one pinned node plus standby) is kept per `x-edgeroute-session` header value and
//! model (or pipeline, with `x-edgeroute-pipeline`: every model of a voice pipeline on one
//! node); requests without the header share one session per model. Requests never wait for
//! each other: turns of one session run concurrently, and the session's moves happen between
//! turns. The session table is bounded (least recently used out first) and idle sessions
//! expire. Answers are what the SDK produced: a node's client error (4xx) is passed through as
//! is; a failure the SDK could not route around becomes a 502/503/404 in OpenAI's error shape;
//! a stream that fails after its first token ends with an SSE error event and no `[DONE]` (it
//! is never reported as complete). Every answer names its node in `x-edgeroute-node`; a stream
//! continued on another node says so in an SSE comment (`: edgeroute continued …`) at the
//! point where it moved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use edgeroute_client::{Client, ClientError, Session, StreamItem};
use edgeroute_http::ApiError;
use edgeroute_proto::headers::SESSION_HEADER;
use edgeroute_proto::{ChatCompletionRequest, ErrorBody};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Largest request body accepted, bytes.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

/// The header that asks for a pipeline session.
pub const PIPELINE_HEADER: &str = "x-edgeroute-pipeline";
/// The header naming the node that served (or started) an answer.
pub const NODE_HEADER: &str = "x-edgeroute-node";

/// The proxy's limits; every one explicit.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Largest request body, bytes. Default 4 MiB.
    pub max_body: usize,
    /// Sessions kept at once; past this the least recently used is dropped. Default 10,000.
    pub max_sessions: usize,
    /// A session unused for this long is dropped. Default 10 minutes.
    pub session_idle: Duration,
    /// Longest `x-edgeroute-session` / `x-edgeroute-pipeline` value, bytes. Default 128.
    pub max_key_len: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_body: DEFAULT_MAX_BODY,
            max_sessions: 10_000,
            session_idle: Duration::from_secs(600),
            max_key_len: 128,
        }
    }
}

/// (session header, pipeline or "", model or "").
type SessionKey = (String, String, String);

struct Slot {
    session: Arc<OnceCell<Arc<Session>>>,
    last_used: Instant,
}

struct State_ {
    client: Client,
    cfg: ProxyConfig,
    sessions: Mutex<HashMap<SessionKey, Slot>>,
}

impl State_ {
    /// The slot for `key`, created if new; expired and excess sessions are dropped first.
    fn slot(&self, key: SessionKey) -> Arc<OnceCell<Arc<Session>>> {
        let now = Instant::now();
        let mut table = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = table.get_mut(&key) {
            s.last_used = now;
            return s.session.clone();
        }
        let idle = self.cfg.session_idle;
        table.retain(|_, s| now.saturating_duration_since(s.last_used) < idle);
        while table.len() >= self.cfg.max_sessions.max(1) {
            let Some(oldest) =
                table.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| k.clone())
            else {
                break;
            };
            table.remove(&oldest);
        }
        let cell = Arc::new(OnceCell::new());
        table.insert(key, Slot { session: cell.clone(), last_used: now });
        cell
    }

    fn len(&self) -> usize {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Builds the SDK client from `client` and serves the proxy on `listener` until `shutdown`
/// resolves: all that `edgeroute proxy` runs.
pub async fn serve<L: edgeroute_http::Listener>(
    client: edgeroute_client::ClientConfig,
    cfg: ProxyConfig,
    listener: L,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ClientError> {
    let app = router_with(Client::new(client)?, cfg);
    edgeroute_http::serve(listener, app, edgeroute_http::ServerLimits::default(), None, shutdown)
        .await;
    Ok(())
}

/// The proxy's routes over `client`, with the default limits.
pub fn router(client: Client, max_body: usize) -> Router {
    router_with(client, ProxyConfig { max_body, ..ProxyConfig::default() })
}

/// The proxy's routes over `client`.
pub fn router_with(client: Client, cfg: ProxyConfig) -> Router {
    let st = Arc::new(State_ { client, cfg, sessions: Mutex::new(HashMap::new()) });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { axum::Json(serde_json::json!({"status": "ready"})) }))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(st)
}

/// The SDK's error as the proxy's answer: the SDK's classification ([`ClientError::fault`])
/// in `x-edgeroute-error` whatever the status, and the node's own body for a refusal.
fn error_response(e: ClientError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let fault = e.fault();
    let api = match e {
        // The node's own refusal, as the node sent it.
        ClientError::Api { body, .. } => {
            let parsed = serde_json::from_str::<ErrorBody>(&body)
                .unwrap_or_else(|_| ErrorBody::new(body, "invalid_request_error", None, None));
            ApiError::from_body(status, parsed, fault)
        }
        ClientError::Discovery(m) => ApiError::unavailable("discovery_unavailable", m, 1),
        ClientError::NoCandidates { model, reason } => ApiError::new(
            status,
            "invalid_request_error",
            Some("model_not_found"),
            format!("no node serves model `{model}`: {reason}"),
        )
        .with_param("model"),
        ClientError::Invalid(m) => ApiError::invalid_request(None, m),
        e @ ClientError::BudgetSpent(_) => {
            ApiError::unavailable("retry_budget_spent", e.to_string(), 1)
        }
        e @ (ClientError::Exhausted(_) | ClientError::StreamCut(_)) => {
            ApiError::new(status, "api_error", Some("no_node_available"), e.to_string())
        }
    };
    api.fault(fault.side, fault.retry).into_response()
}

/// The SDK's decision counters, in the Prometheus text format.
async fn metrics(State(st): State<Arc<State_>>) -> Response {
    let s = st.client.stats();
    let rows = [
        ("discoveries", "Candidate lists obtained", s.discoveries),
        ("stale_lists", "Lists served from the cache with discovery unreachable", s.stale_lists),
        ("discovery_failures", "Discovery endpoints that failed", s.discovery_failures),
        ("probes", "Node probes answered", s.probes),
        ("probe_failures", "Node probes failed or late", s.probe_failures),
        ("sessions", "Sessions pinned", s.sessions),
        ("failovers", "Requests moved after a failure", s.failovers),
        ("hedges", "Late first answers hedged on another node", s.hedges),
        ("migrations", "Planned session moves", s.migrations),
        ("ejections", "Nodes ejected after repeated failures", s.ejections),
        (
            "placement_misses",
            "Nodes that no longer had a model they were listed for",
            s.placement_misses,
        ),
        ("retries", "Attempts beyond a request's first, allowed by the retry budget", s.retries),
        ("retries_denied", "Attempts the retry budget refused", s.retries_denied),
    ];
    let mut out = String::new();
    for (name, help, v) in rows {
        out.push_str(&format!(
            "# HELP edgeroute_client_{name} {help}.\n# TYPE edgeroute_client_{name} counter\nedgeroute_client_{name}_total {v}\n"
        ));
    }
    out.push_str(&format!(
        "# HELP edgeroute_proxy_sessions Sessions in the proxy's table.\n# TYPE edgeroute_proxy_sessions gauge\nedgeroute_proxy_sessions {}\n",
        st.len()
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A session or pipeline header: 1 to `max` bytes of `[A-Za-z0-9._:-]`; `None` when absent.
fn key_header(h: &HeaderMap, name: &str, max: usize) -> Result<Option<String>, Response> {
    let Some(v) = h.get(name) else { return Ok(None) };
    let ok = !v.is_empty()
        && v.len() <= max
        && v.as_bytes().iter().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b));
    if !ok {
        let msg = format!("`{name}` must be 1-{max} characters of [A-Za-z0-9._:-]");
        return Err(ApiError::invalid_request(None, msg)
            .with_code("invalid_header")
            .into_response());
    }
    Ok(v.to_str().ok().map(str::to_owned))
}

async fn chat(State(st): State<Arc<State_>>, req: Request) -> Response {
    let max = st.cfg.max_key_len;
    let (session_key, pipeline) = match (
        key_header(req.headers(), SESSION_HEADER, max),
        key_header(req.headers(), PIPELINE_HEADER, max),
    ) {
        (Ok(s), Ok(p)) => (s.unwrap_or_else(|| "default".into()), p),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let body: ChatCompletionRequest =
        match edgeroute_http::json::read_json(req.into_body(), st.cfg.max_body).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
    // A pipeline session serves every model of the pipeline from one node.
    let key = match &pipeline {
        Some(p) => (session_key, p.clone(), String::new()),
        None => (session_key, String::new(), body.model.clone()),
    };
    let cell = st.slot(key);
    let session = cell
        .get_or_try_init(|| async {
            let s = match &pipeline {
                Some(p) => st.client.pipeline_session(p, &body.model).await,
                None => st.client.session(&body.model).await,
            };
            s.map(Arc::new)
        })
        .await;
    let session = match session {
        Ok(s) => s.clone(),
        Err(e) => return error_response(e),
    };
    if !body.stream {
        let answer = session.chat(&body).await;
        let node = HeaderValue::from_str(&session.pinned().id).ok();
        let mut res = match answer {
            Ok(c) => axum::Json(c).into_response(),
            Err(e) => return error_response(e),
        };
        if let Some(n) = node {
            res.headers_mut().insert(NODE_HEADER, n);
        }
        return res;
    }
    let stream = match session.chat_stream(&body).await {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    let node = HeaderValue::from_str(stream.node()).ok();
    let frames = futures_util::stream::unfold(Some(stream), |state| async move {
        let mut s = state?;
        let frame = match s.next_item().await {
            Some(Ok(StreamItem::Chunk(chunk))) => {
                let json = serde_json::to_vec(&chunk).unwrap_or_default();
                edgeroute_proto::sse::data_frame(&json)
            }
            Some(Ok(StreamItem::Continued { from, to, after_tokens })) => Bytes::from(format!(
                ": edgeroute continued from={from} to={to} after_tokens={after_tokens}\n\n"
            )),
            // After the first token: an error event, and never [DONE].
            Some(Err(e)) => {
                let body = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    Some("stream_failed"),
                    e.to_string(),
                )
                .body_json();
                return Some((Ok(edgeroute_proto::sse::data_frame(&body)), None));
            }
            None => {
                return Some((Ok(Bytes::from_static(edgeroute_proto::sse::DONE_FRAME)), None));
            }
        };
        Some((Ok::<Bytes, std::convert::Infallible>(frame), Some(s)))
    });
    let mut res = Response::new(Body::from_stream(frames));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(n) = node {
        h.insert(NODE_HEADER, n);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SessionKey {
        (s.to_owned(), String::new(), "m".to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn the_session_table_is_bounded_and_idle_sessions_expire() {
        let client = Client::new(edgeroute_client::ClientConfig::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let cfg = ProxyConfig {
            max_sessions: 2,
            session_idle: Duration::from_secs(10),
            ..ProxyConfig::default()
        };
        let st = State_ { client, cfg, sessions: Mutex::new(HashMap::new()) };
        let a = st.slot(key("a"));
        tokio::time::advance(Duration::from_secs(1)).await;
        st.slot(key("b"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(Arc::ptr_eq(&a, &st.slot(key("a"))), "the same key, the same session");
        st.slot(key("c"));
        let mut keys: Vec<String> = st
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .map(|k| k.0.clone())
            .collect();
        keys.sort();
        assert_eq!(keys, ["a", "c"], "the least recently used went first");
        tokio::time::advance(Duration::from_secs(11)).await;
        st.slot(key("d"));
        assert_eq!(st.len(), 1, "idle sessions expired");
    }

    #[test]
    fn session_headers_are_validated() {
        let mut h = HeaderMap::new();
        assert_eq!(key_header(&h, SESSION_HEADER, 8).ok(), Some(None));
        h.insert(SESSION_HEADER, HeaderValue::from_static("call-42.a:b_c"));
        assert!(key_header(&h, SESSION_HEADER, 128).is_ok_and(|v| v.is_some()));
        assert!(key_header(&h, SESSION_HEADER, 8).is_err(), "too long");
        h.insert(SESSION_HEADER, HeaderValue::from_static("a b"));
        assert!(key_header(&h, SESSION_HEADER, 128).is_err(), "bad character");
        h.insert(SESSION_HEADER, HeaderValue::from_static(""));
        assert!(key_header(&h, SESSION_HEADER, 128).is_err(), "empty");
    }
}
