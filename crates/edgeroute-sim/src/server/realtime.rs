//! `GET /v1/realtime?model=M`: a realtime session ([`crate::realtime`]) over a WebSocket, as
//! an OpenAI-compatible backend serves it. The model must be loaded (404 otherwise); text
//! frames are events, binary frames are refused with an `error` event.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use edgeroute_proto::realtime::{SUBPROTOCOL, error_event};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{ApiError, AppState};
use crate::error::SimError;

static SESSIONS: AtomicU64 = AtomicU64::new(1);

#[derive(Deserialize)]
pub(super) struct RealtimeQuery {
    model: Option<String>,
}

pub(super) async fn realtime(
    State(st): State<AppState>,
    Query(q): Query<RealtimeQuery>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(model) = q.model.filter(|m| !m.is_empty()) else {
        return ApiError::invalid("`model` is required (`?model=`).", Some("model".into()))
            .into_response();
    };
    if !st.sim.models().iter().any(|m| m.id == model) {
        return ApiError::from_sim(&SimError::UnknownModel(model)).into_response();
    }
    let sim = st.sim.clone();
    ws.protocols([SUBPROTOCOL]).on_upgrade(move |socket| async move {
        let (tx, inbound) = mpsc::channel(64);
        let (out, rx) = mpsc::channel(256);
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(crate::realtime::run(sim, model, n, inbound, out));
        bridge(socket, tx, rx).await;
    })
}

/// Frames to events and back until either side ends.
async fn bridge(mut socket: WebSocket, tx: mpsc::Sender<String>, mut rx: mpsc::Receiver<String>) {
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if tx.send(t.as_str().to_owned()).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    let e = error_event("event_binary", "invalid_request_error",
                        "invalid_frame", "Events are JSON text frames.", None, None);
                    if socket.send(Message::Text(e.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            ev = rx.recv() => match ev {
                Some(text) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
        }
    }
}
