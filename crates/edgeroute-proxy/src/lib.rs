//! `edgeroute proxy`: the client SDK behind an OpenAI-compatible endpoint on the client's own
//! machine, so any OpenAI client in any language gets edgeroute's routing and failover without
//! a code change — point its base URL at `http://127.0.0.1:PORT/v1`.
//!
//! A session (one pinned node plus standby) is kept per `x-edgeroute-session` header value and
//! model; requests without the header share one session per model. Turns of one session run
//! one at a time, as a conversation's turns do. Answers are what the SDK produced: a node's
//! client error (4xx) is passed through as is; a failure the SDK could not route around becomes
//! a 502/503 in OpenAI's error shape; a stream that fails after its first token ends with an SSE
//! error event and no `[DONE]` (it is never reported as complete).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use edgeroute_client::{Client, ClientError, Session};
use edgeroute_http::ApiError;
use edgeroute_proto::ChatCompletionRequest;
use edgeroute_proto::headers::SESSION_HEADER;
use http::{HeaderValue, StatusCode, header};
use tokio::sync::Mutex;

/// Largest request body accepted, bytes.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

type SessionKey = (String, String);

struct State_ {
    client: Client,
    max_body: usize,
    sessions: std::sync::Mutex<HashMap<SessionKey, Arc<Mutex<Option<Session>>>>>,
}

/// The proxy's routes over `client`.
pub fn router(client: Client, max_body: usize) -> Router {
    let st = Arc::new(State_ { client, max_body, sessions: std::sync::Mutex::new(HashMap::new()) });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { axum::Json(serde_json::json!({"status": "ready"})) }))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(st)
}

fn error_response(e: ClientError) -> Response {
    match e {
        // The node's own refusal, as the node sent it.
        ClientError::Api { status, body, .. } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        ClientError::Discovery(m) => {
            ApiError::unavailable("discovery_unavailable", m, 1).into_response()
        }
        ClientError::NoCandidates { model, reason } => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!("no node serves model `{model}`: {reason}"),
        )
        .with_param("model")
        .into_response(),
        ClientError::Invalid(m) => ApiError::invalid_request(None, m).into_response(),
        e @ (ClientError::Exhausted(_)
        | ClientError::BudgetSpent(_)
        | ClientError::StreamCut(_)) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "api_error",
            Some("no_node_available"),
            e.to_string(),
        )
        .into_response(),
    }
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
        ("hedges", "Late first tokens hedged on the standby", s.hedges),
        ("migrations", "Planned session moves", s.migrations),
        ("ejections", "Nodes ejected after repeated failures", s.ejections),
        ("retries", "Attempts beyond a request's first, allowed by the retry budget", s.retries),
        ("retries_denied", "Attempts the retry budget refused", s.retries_denied),
    ];
    let mut out = String::new();
    for (name, help, v) in rows {
        out.push_str(&format!(
            "# HELP edgeroute_client_{name} {help}.\n# TYPE edgeroute_client_{name} counter\nedgeroute_client_{name}_total {v}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

async fn chat(State(st): State<Arc<State_>>, req: Request) -> Response {
    let key_header = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("default")
        .to_owned();
    let body: ChatCompletionRequest =
        match edgeroute_http::json::read_json(req.into_body(), st.max_body).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
    let key = (key_header, body.model.clone());
    let slot = match st.sessions.lock() {
        Ok(mut m) => m.entry(key).or_default().clone(),
        Err(_) => return ApiError::internal("session table poisoned").into_response(),
    };
    // One turn at a time per session.
    let mut guard = slot.lock().await;
    if guard.is_none() {
        match st.client.session(&body.model).await {
            Ok(s) => *guard = Some(s),
            Err(e) => return error_response(e),
        }
    }
    let Some(session) = guard.as_mut() else {
        return ApiError::internal("no session").into_response();
    };
    let node = HeaderValue::from_str(&session.pinned().id).ok();
    if !body.stream {
        let mut res = match session.chat(&body).await {
            Ok(c) => axum::Json(c).into_response(),
            Err(e) => error_response(e),
        };
        if let Some(n) = HeaderValue::from_str(&session.pinned().id).ok().or(node) {
            res.headers_mut().insert("x-edgeroute-node", n);
        }
        return res;
    }
    let stream = match session.chat_stream(&body).await {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    drop(guard);
    let frames = futures_util::stream::unfold(Some(stream), |state| async move {
        let mut s = state?;
        match s.next().await {
            Some(Ok(chunk)) => {
                let json = serde_json::to_vec(&chunk).unwrap_or_default();
                Some((
                    Ok::<Bytes, std::convert::Infallible>(edgeroute_proto::sse::data_frame(&json)),
                    Some(s),
                ))
            }
            // After the first token: an error event, and never [DONE].
            Some(Err(e)) => {
                let body = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    Some("stream_failed"),
                    e.to_string(),
                )
                .body_json();
                Some((Ok(edgeroute_proto::sse::data_frame(&body)), None))
            }
            None => Some((Ok(Bytes::from_static(edgeroute_proto::sse::DONE_FRAME)), None)),
        }
    });
    let mut res = Response::new(Body::from_stream(frames));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}
