//! Realtime sessions (`/v1/realtime`) on each backend, as a pair of channels of JSON event
//! texts — the gateway (`crate::gateway::realtime`) bridges them to the client's WebSocket:
//!
//! - the simulator runs the session in process (`edgeroute_sim::realtime`);
//! - an OpenAI-compatible upstream that speaks the realtime protocol gets a WebSocket of its
//!   own (`ws://` or `wss://` on the backend's origin, the backend's key as a bearer token,
//!   the model as the upstream names it), opened before the client's upgrade is answered, so
//!   an upstream that refuses is a clean HTTP error the client fails over on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use super::BackendError;

/// Events queued each way before the slower side holds the faster one back.
const QUEUE: usize = 256;

static SESSIONS: AtomicU64 = AtomicU64::new(1);

/// A session on the backend: events to it, events from it. The session ends when `tx` is
/// dropped (the backend side closes) or `rx` ends (the backend closed it).
#[derive(Debug)]
pub struct RealtimeLink {
    pub tx: mpsc::Sender<String>,
    pub rx: mpsc::Receiver<String>,
}

/// A session on the simulator, in process.
pub fn sim(sim: std::sync::Arc<edgeroute_sim::Simulator>, model: &str) -> RealtimeLink {
    let (tx, inbound) = mpsc::channel(QUEUE);
    let (out, rx) = mpsc::channel(QUEUE);
    let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(edgeroute_sim::realtime::run(sim, model.to_owned(), n, inbound, out));
    RealtimeLink { tx, rx }
}

/// A session on an upstream over `io` (a fresh connection to its origin): the WebSocket
/// handshake for `url` within `deadline`, then a task that carries frames each way.
pub async fn upstream<S>(
    io: S,
    url: &str,
    api_key: Option<&str>,
    max_event_bytes: usize,
    deadline: Duration,
) -> Result<RealtimeLink, BackendError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut req = url
        .into_client_request()
        .map_err(|e| BackendError::Failed(format!("the upstream realtime URL: {e}")))?;
    if let Some(key) = api_key {
        let v = http::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|e| BackendError::Failed(format!("the upstream key: {e}")))?;
        req.headers_mut().insert(http::header::AUTHORIZATION, v);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_event_bytes.max(1 << 20) * 2))
        .max_frame_size(Some(max_event_bytes.max(1 << 20) * 2));
    let handshake = tokio_tungstenite::client_async_with_config(req, io, Some(config));
    let (ws, _) = match tokio::time::timeout(deadline, handshake).await {
        Err(_) => {
            return Err(BackendError::Timeout(format!(
                "the upstream did not open a realtime session within {} ms",
                deadline.as_millis()
            )));
        }
        Ok(Err(tungstenite::Error::Http(res))) => return Err(refused(res.status())),
        Ok(Err(e)) => return Err(BackendError::Failed(format!("realtime handshake: {e}"))),
        Ok(Ok(pair)) => pair,
    };
    let (tx, mut inbound) = mpsc::channel::<String>(QUEUE);
    let (out, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let (mut sink, mut stream) = ws.split();
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        if out.send(t.as_str().to_owned()).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                m = inbound.recv() => match m {
                    Some(t) => {
                        if sink.send(Message::Text(t.into())).await.is_err() {
                            break;
                        }
                    }
                    None => {
                        let _ = sink.close().await;
                        break;
                    }
                },
            }
        }
    });
    Ok(RealtimeLink { tx, rx })
}

/// An upstream's refusal of the upgrade, by its status.
fn refused(status: http::StatusCode) -> BackendError {
    match status.as_u16() {
        404 => BackendError::Unavailable(
            "the upstream has no realtime endpoint for this model (404)".into(),
        ),
        429 | 503 => BackendError::Overloaded(format!("the upstream is full ({status})")),
        _ => BackendError::Failed(format!("the upstream refused the realtime session ({status})")),
    }
}

/// The realtime URL on an upstream whose base is `base` (`http[s]://host:port`).
pub fn upstream_url(base: &str, model: &str) -> String {
    let ws = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else {
        format!("ws://{}", base.strip_prefix("http://").unwrap_or(base))
    };
    let mut q = String::new();
    for b in model.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    format!("{}/v1/realtime?model={q}", ws.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_url_keeps_the_origin_and_escapes_the_model() {
        assert_eq!(
            upstream_url("http://10.0.0.5:8000", "gpt-realtime"),
            "ws://10.0.0.5:8000/v1/realtime?model=gpt-realtime"
        );
        assert_eq!(
            upstream_url("https://tts.internal/", "org/model v2"),
            "wss://tts.internal/v1/realtime?model=org%2Fmodel%20v2"
        );
    }
}
