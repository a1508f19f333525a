//! Realtime sessions (`/v1/realtime`, OpenAI's realtime event protocol over a WebSocket) that
//! survive the fleet: [`Client::realtime`].
//!
//! The session opens on the best node with the failover ladder of a chat turn (a node that
//! refuses the upgrade, or opens and sends nothing, costs an attempt, not the session). Events
//! pass through as they are; the driver keeps only what a move needs: the session's settings
//! (every `session.update` merged), the conversation's items (as the server reported them:
//! created, transcribed, answered, deleted) and whether a response is under way.
//!
//! It moves the session:
//! - **between turns on a migrate hint** (`edgeroute.migrate`: the node drains, shuts down or
//!   unloads the model): once no response is under way it opens the session on another node,
//!   replays the settings and the conversation (each item as text: typed words, transcripts of
//!   audio, answers' transcripts), then switches; the old node is closed. The caller sees no
//!   event of it (the hint and the replay's acknowledgements are not passed on).
//! - **when the connection is lost** (the node died, or closed the session): the same, at once;
//!   a response that was under way is asked for again on the new node (`response.create`
//!   re-sent), so the caller sees it restart: its `response.created` again, then the whole
//!   answer. Audio already played of the lost answer is not un-played: a voice agent hears
//!   the turn restart, which is documented rather than hidden.
//!
//! What the caller sent that the lost node never confirmed — items not yet
//! `conversation.item.created`, audio appended since the last `input_audio_buffer.committed`
//! (up to 32 MiB), commits, clears, deletes — is sent again on the new node, in order, so no
//! word of the caller's is lost with a connection. (An item created by the caller without an
//! `id` is given one, `item_edgeroute_<n>`, so its confirmation is known.)
//! [`Realtime::moves`] counts moves, [`Realtime::node`] names the node serving now.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use edgeroute_proto::discovery::Candidate;
use edgeroute_proto::realtime::{TextItem, event_type, parse_migrate, replayable};
use futures_util::{SinkExt, StreamExt};
use http::{Method, header};
use http_body_util::{BodyExt, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::error::{ClientError, Side};
use crate::machine::Outcome;
use edgeroute_proto::headers::SESSION_HEADER;

use crate::{Auth, Client, Session, SlotPermit, classify, fault_of, retry_after};

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Largest event accepted from a node.
const MAX_EVENT_BYTES: usize = 16 << 20;
/// Events queued each way between the caller and the driver.
const QUEUE: usize = 256;
/// After a move was refused everywhere, the wait before trying again (a hint's deadline may
/// still be far).
const MOVE_RETRY: Duration = Duration::from_millis(500);

/// A session opened on one node: the socket and its first event.
pub(crate) struct Opened {
    ws: Ws,
    first: Value,
    pub(crate) permit: Option<SlotPermit>,
}

/// A realtime session held by the SDK. `send` events, `recv` events; dropping it closes the
/// session.
#[derive(Debug)]
pub struct Realtime {
    tx: mpsc::Sender<Value>,
    rx: mpsc::Receiver<Result<Value, ClientError>>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    node: Mutex<String>,
    moves: AtomicU32,
}

impl Realtime {
    /// Sends an event (a JSON object with a `type`).
    pub async fn send(&self, event: Value) -> Result<(), ClientError> {
        if event_type(&event).is_none() {
            return Err(ClientError::Invalid("a realtime event is an object with a `type`".into()));
        }
        self.tx
            .send(event)
            .await
            .map_err(|_| ClientError::Invalid("the realtime session has ended".into()))
    }

    /// The next event; `None` once the session has ended. An `Err` ends it: no node could
    /// take the session over.
    pub async fn recv(&mut self) -> Option<Result<Value, ClientError>> {
        self.rx.recv().await
    }

    /// The node serving the session now.
    pub fn node(&self) -> String {
        self.shared.node.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// How many times the session moved to another node.
    pub fn moves(&self) -> u32 {
        self.shared.moves.load(Ordering::Relaxed)
    }
}

impl Client {
    /// Opens a realtime session for `model` on the best node (see the module docs for how it
    /// survives drains, unloads and dead nodes).
    pub async fn realtime(&self, model: &str) -> Result<Realtime, ClientError> {
        Realtime::start(self.session(model).await?).await
    }

    /// As [`Client::realtime`], acting for a caller with its own token (see
    /// [`Client::session_as`]).
    pub async fn realtime_as(&self, model: &str, bearer: &str) -> Result<Realtime, ClientError> {
        Realtime::start(self.session_as(model, bearer).await?).await
    }
}

impl Realtime {
    async fn start(session: Session) -> Result<Realtime, ClientError> {
        let (opened, node) = session.open_realtime(None).await?;
        let (tx, app_rx) = mpsc::channel(QUEUE);
        let (app_tx, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared::default());
        *shared.node.lock().unwrap_or_else(PoisonError::into_inner) = node.id.clone();
        let first = opened.first.clone();
        let driver = Driver {
            session,
            ws: opened.ws,
            _permit: opened.permit,
            node,
            app_rx,
            app_tx,
            shared: shared.clone(),
            conv: Conversation::default(),
            moving: false,
            retry_at: None,
            swallow: Swallow::default(),
        };
        // The caller sees the session's first event, as from any server.
        let _ = driver.app_tx.send(Ok(first)).await;
        tokio::spawn(driver.run());
        Ok(Realtime { tx, rx, shared })
    }
}

/// What a move must carry over, learned from the events both ways.
#[derive(Debug, Default)]
struct Conversation {
    /// Every `session.update`'s `session`, merged.
    settings: serde_json::Map<String, Value>,
    /// The conversation's items in order, as the server last described each.
    items: Vec<Value>,
    /// The `response.create` of the response under way, while one is.
    responding: Option<Value>,
    /// Events sent whose effect the server has not confirmed yet (items created, audio
    /// appended and not yet committed, commits, clears, deletes): sent again after a move,
    /// so a connection lost under them loses none of the caller's words.
    unacked: Vec<Value>,
    /// Bytes of audio held in `unacked`.
    audio_bytes: usize,
    /// Items created by the caller without an id get one, so their confirmation is known.
    next_id: u64,
}

/// Audio appended and not yet committed kept for a move, at most; beyond it the oldest is not
/// carried over (the caller's commit then covers less audio).
const MAX_UNACKED_AUDIO: usize = 32 << 20;

impl Conversation {
    /// Notes an event the caller sends (an item without an id is given one first).
    fn sent(&mut self, ev: &mut Value) {
        match event_type(ev) {
            Some("conversation.item.create") => {
                if let Some(item) = ev.get_mut("item").and_then(Value::as_object_mut)
                    && !item.get("id").is_some_and(Value::is_string)
                {
                    self.next_id += 1;
                    item.insert("id".into(), format!("item_edgeroute_{}", self.next_id).into());
                }
                self.unacked.push(ev.clone());
            }
            Some("input_audio_buffer.append") => {
                let n = ev.get("audio").and_then(Value::as_str).map_or(0, str::len);
                self.audio_bytes += n;
                self.unacked.push(ev.clone());
                while self.audio_bytes > MAX_UNACKED_AUDIO {
                    let Some(i) = self
                        .unacked
                        .iter()
                        .position(|e| event_type(e) == Some("input_audio_buffer.append"))
                    else {
                        break;
                    };
                    let old = self.unacked.remove(i);
                    self.audio_bytes -=
                        old.get("audio").and_then(Value::as_str).map_or(0, str::len);
                }
            }
            Some(
                "input_audio_buffer.commit"
                | "input_audio_buffer.clear"
                | "conversation.item.delete",
            ) => self.unacked.push(ev.clone()),
            _ => {}
        }
        match event_type(ev) {
            Some("session.update") => {
                if let Some(s) = ev.get("session").and_then(Value::as_object) {
                    for (k, v) in s {
                        self.settings.insert(k.clone(), v.clone());
                    }
                }
            }
            Some("response.create") if self.responding.is_none() => {
                self.responding = Some(ev.clone());
            }
            _ => {}
        }
    }

    /// Forgets the caller's events `ev` confirms.
    fn confirmed(&mut self, ev: &Value) {
        let is = |e: &Value, t: &str| event_type(e) == Some(t);
        match event_type(ev) {
            Some("conversation.item.created") => {
                let id = ev.pointer("/item/id");
                self.unacked.retain(|e| {
                    !(is(e, "conversation.item.create") && e.pointer("/item/id") == id)
                });
            }
            Some("input_audio_buffer.committed" | "input_audio_buffer.cleared") => {
                self.unacked.retain(|e| {
                    !(is(e, "input_audio_buffer.append")
                        || is(e, "input_audio_buffer.commit")
                        || is(e, "input_audio_buffer.clear"))
                });
                self.audio_bytes = 0;
            }
            Some("conversation.item.deleted") => {
                let id = ev.get("item_id");
                self.unacked
                    .retain(|e| !(is(e, "conversation.item.delete") && e.get("item_id") == id));
            }
            Some("error") => {
                // The server refused one of them: it will not take effect anywhere.
                if let Some(id) = ev.pointer("/error/event_id").filter(|v| v.is_string()) {
                    self.unacked.retain(|e| e.get("event_id") != Some(id));
                }
            }
            _ => {}
        }
    }

    fn received(&mut self, ev: &Value) {
        self.confirmed(ev);
        let id_of = |v: &Value| v.get("id").and_then(Value::as_str).map(str::to_owned);
        match event_type(ev) {
            Some("conversation.item.created") | Some("response.output_item.done") => {
                let Some(item) = ev.get("item") else { return };
                let id = id_of(item);
                match self.items.iter_mut().find(|i| id.is_some() && id_of(i) == id) {
                    Some(known) => *known = item.clone(),
                    None => self.items.push(item.clone()),
                }
            }
            Some("conversation.item.input_audio_transcription.completed") => {
                let id = ev.get("item_id").and_then(Value::as_str);
                let index = ev.get("content_index").and_then(Value::as_u64).unwrap_or(0) as usize;
                if let Some(item) = self.items.iter_mut().find(|i| id_of(i).as_deref() == id)
                    && let Some(part) = item.pointer_mut(&format!("/content/{index}"))
                {
                    part["transcript"] = ev.get("transcript").cloned().unwrap_or(Value::Null);
                }
            }
            Some("conversation.item.deleted") => {
                let id = ev.get("item_id").and_then(Value::as_str);
                self.items.retain(|i| id_of(i).as_deref() != id);
            }
            // A response the server started on its own (or ours): under way.
            Some("response.created") if self.responding.is_none() => {
                self.responding = Some(json!({"type": "response.create"}));
            }
            Some("response.done") => self.responding = None,
            _ => {}
        }
    }

    /// The events that recreate this session elsewhere, and the item ids they create.
    fn replay(&self) -> (Vec<Value>, Vec<String>) {
        let mut events = Vec::new();
        let mut ids = Vec::new();
        if !self.settings.is_empty() {
            events.push(json!({"type": "session.update", "event_id": "edgeroute_replay_session",
                "session": self.settings}));
        }
        for (n, item) in self.items.iter().enumerate() {
            let event_id = format!("edgeroute_replay_{n}");
            let ev = if let Some(t) = TextItem::of(item) {
                t.create_event(&event_id)
            } else if replayable(item) {
                let mut item = item.clone();
                if let Some(o) = item.as_object_mut() {
                    o.remove("object");
                    o.remove("status");
                }
                json!({"type": "conversation.item.create", "event_id": event_id, "item": item})
            } else {
                // An item with nothing to carry (audio whose transcript never came).
                continue;
            };
            if let Some(id) = ev.pointer("/item/id").and_then(Value::as_str) {
                ids.push(id.to_owned());
            }
            events.push(ev);
        }
        // What the caller sent that the lost node never confirmed, in order.
        events.extend(self.unacked.iter().cloned());
        (events, ids)
    }
}

/// Acknowledgements of a replay, not passed on to the caller.
#[derive(Debug, Default)]
struct Swallow {
    session_updated: bool,
    items: Vec<String>,
}

impl Swallow {
    /// Whether `ev` acknowledges the replay.
    fn takes(&mut self, ev: &Value) -> bool {
        match event_type(ev) {
            Some("session.updated") if self.session_updated => {
                self.session_updated = false;
                true
            }
            Some("conversation.item.created") => {
                let id = ev.pointer("/item/id").and_then(Value::as_str);
                match self.items.iter().position(|i| Some(i.as_str()) == id) {
                    Some(p) => {
                        self.items.remove(p);
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        }
    }
}

struct Driver {
    session: Session,
    ws: Ws,
    _permit: Option<SlotPermit>,
    node: Candidate,
    app_rx: mpsc::Receiver<Value>,
    app_tx: mpsc::Sender<Result<Value, ClientError>>,
    shared: Arc<Shared>,
    conv: Conversation,
    /// A node's request to move, until the session has moved.
    moving: bool,
    retry_at: Option<Instant>,
    swallow: Swallow,
}

/// How one step of the loop ended.
enum Next {
    Go,
    /// The connection is gone: move now.
    Lost(String),
    /// The caller is gone.
    Done,
}

impl Driver {
    async fn run(mut self) {
        loop {
            let next = tokio::select! {
                ev = self.app_rx.recv() => match ev {
                    None => Next::Done,
                    Some(mut ev) => {
                        self.conv.sent(&mut ev);
                        match self.ws.send(Message::Text(ev.to_string().into())).await {
                            Ok(()) => Next::Go,
                            Err(e) => Next::Lost(format!("sending: {e}")),
                        }
                    }
                },
                m = self.ws.next() => self.on_node_message(m).await,
                () = sleep_until(self.retry_at) => {
                    self.retry_at = None;
                    Next::Go
                }
            };
            match next {
                Next::Done => {
                    let _ = self.ws.close(None).await;
                    return;
                }
                Next::Lost(why) => {
                    tracing::debug!(node = %self.node.id, %why, "realtime session lost; moving");
                    if let Err(e) = self.relocate(false).await {
                        let _ = self.app_tx.send(Err(e)).await;
                        return;
                    }
                }
                Next::Go => {
                    if self.moving
                        && self.conv.responding.is_none()
                        && self.retry_at.is_none()
                        && let Err(e) = self.relocate(true).await
                    {
                        tracing::debug!(error = %e, "no node took the session; staying");
                        self.retry_at = Some(Instant::now() + MOVE_RETRY);
                    }
                }
            }
        }
    }

    async fn on_node_message(&mut self, m: Option<Result<Message, tungstenite::Error>>) -> Next {
        match m {
            Some(Ok(Message::Text(t))) => {
                let Ok(ev) = serde_json::from_str::<Value>(t.as_str()) else {
                    return Next::Go;
                };
                if parse_migrate(&ev).is_some() {
                    self.moving = true;
                    return Next::Go;
                }
                if self.swallow.takes(&ev) {
                    return Next::Go;
                }
                self.conv.received(&ev);
                if self.app_tx.send(Ok(ev)).await.is_err() {
                    return Next::Done;
                }
                Next::Go
            }
            Some(Ok(Message::Close(frame))) => {
                Next::Lost(format!("closed: {}", frame.map(|f| f.to_string()).unwrap_or_default()))
            }
            Some(Ok(_)) => Next::Go,
            Some(Err(e)) => Next::Lost(e.to_string()),
            None => Next::Lost("the connection ended".into()),
        }
    }

    /// Opens the session on another node (any node, the current one last, when it was
    /// lost), replays it there and switches to it.
    async fn relocate(&mut self, asked: bool) -> Result<(), ClientError> {
        let avoid = asked.then(|| self.node.id.clone());
        let (opened, node) = self.session.open_realtime(avoid.as_deref()).await?;
        if asked && node.id == self.node.id {
            return Err(ClientError::Invalid("no other node holds the model".into()));
        }
        let Opened { mut ws, permit, .. } = opened;
        let (events, ids) = self.conv.replay();
        let mut swallow = Swallow { session_updated: !self.conv.settings.is_empty(), items: ids };
        for ev in &events {
            ws.send(Message::Text(ev.to_string().into()))
                .await
                .map_err(|e| ClientError::Invalid(format!("replaying on {}: {e}", node.id)))?;
        }
        // A response lost with the connection is asked for again.
        if !asked && let Some(r) = self.conv.responding.take() {
            ws.send(Message::Text(r.to_string().into()))
                .await
                .map_err(|e| ClientError::Invalid(format!("replaying on {}: {e}", node.id)))?;
        }
        let mut old = std::mem::replace(&mut self.ws, ws);
        tokio::spawn(async move {
            let _ = old.close(None).await;
        });
        std::mem::swap(&mut self.swallow, &mut swallow);
        self._permit = permit;
        self.node = node;
        self.moving = false;
        *self.shared.node.lock().unwrap_or_else(PoisonError::into_inner) = self.node.id.clone();
        self.shared.moves.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One attempt to open the session on `node`: the upgrade, then its first event, within the
/// request timeout. A refusal is classified as any answer is (the ladder moves on, or the
/// caller's own error comes back).
pub(crate) async fn attempt(
    client: &Client,
    node: &Candidate,
    model: &str,
    session: &str,
    bearer: Option<&str>,
) -> (Outcome, Option<Opened>) {
    let t = Instant::now();
    let work = async {
        let base = node.url.trim_end_matches('/');
        let model = node.serve_as.as_deref().unwrap_or(model);
        let url = format!("{base}/v1/realtime?model={}", escape(model));
        let auth = match bearer {
            Some(t) => Auth::Caller(t),
            None => Auth::Fleet,
        };
        let mut req = match client.request(Method::GET, &url, Bytes::new(), auth) {
            Ok(r) => r,
            Err(what) => return (Outcome::Failed { side: Side::Caller, what }, None),
        };
        let key = generate_key();
        let h = req.headers_mut();
        h.insert(header::CONNECTION, http::HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_VERSION, http::HeaderValue::from_static("13"));
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static("realtime"));
        if let Ok(v) = http::HeaderValue::from_str(&key) {
            h.insert(header::SEC_WEBSOCKET_KEY, v);
        }
        if let Ok(v) = http::HeaderValue::from_str(session) {
            h.insert(SESSION_HEADER, v);
        }
        let res = match client.inner.http.request(req).await {
            Ok(r) => r,
            Err(e) => {
                let what = format!("connect/send: {e}");
                return (Outcome::Failed { side: Side::Network, what }, None);
            }
        };
        let status = res.status();
        if status != http::StatusCode::SWITCHING_PROTOCOLS {
            let retry = retry_after(res.headers());
            let fault = fault_of(status, res.headers());
            let body = Limited::new(res.into_body(), 64 * 1024).collect().await;
            let text = body.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned());
            return (classify(status, fault, text.unwrap_or_default(), None, retry), None);
        }
        let accept = res.headers().get(header::SEC_WEBSOCKET_ACCEPT).and_then(|v| v.to_str().ok());
        if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
            let what = "the node's WebSocket accept key is wrong".to_owned();
            return (Outcome::Failed { side: Side::Node, what }, None);
        }
        let upgraded = match hyper::upgrade::on(res).await {
            Ok(u) => u,
            Err(e) => {
                let what = format!("upgrade: {e}");
                return (Outcome::Failed { side: Side::Network, what }, None);
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_EVENT_BYTES))
            .max_frame_size(Some(MAX_EVENT_BYTES));
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, Some(config))
                .await;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => {
                    let Ok(first) = serde_json::from_str::<Value>(text.as_str()) else {
                        let what = "the node's first event is not JSON".to_owned();
                        return (Outcome::Failed { side: Side::Backend, what }, None);
                    };
                    let outcome = Outcome::Committed { after: t.elapsed(), hint: None };
                    return (outcome, Some(Opened { ws, first, permit: None }));
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    let what = "the node closed the session before its first event".to_owned();
                    return (Outcome::Failed { side: Side::Node, what }, None);
                }
                Some(Ok(_)) => {}
            }
        }
    };
    tokio::time::timeout(client.inner.cfg.request_timeout, work).await.unwrap_or_else(|_| {
        let what = "the realtime session did not open within the request timeout".to_owned();
        (Outcome::Failed { side: Side::Network, what }, None)
    })
}

/// A query value, percent-encoded.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, role: &str, text: &str) -> Value {
        json!({"id": id, "type": "message", "role": role,
            "content": [{"type": "input_text", "text": text}]})
    }

    #[test]
    fn the_conversation_follows_the_servers_events() {
        let mut c = Conversation::default();
        c.sent(&mut json!({"type": "session.update", "session": {"voice": "verse"}}));
        c.sent(&mut json!({"type": "session.update", "session": {"instructions": "Brief."}}));
        c.received(&json!({"type": "conversation.item.created", "item": item("a", "user", "Hi")}));
        // Audio committed: the item first without its transcript, then with it.
        c.received(&json!({"type": "conversation.item.created", "item": {"id": "b",
            "type": "message", "role": "user",
            "content": [{"type": "input_audio", "transcript": null}]}}));
        c.received(&json!({"type": "conversation.item.input_audio_transcription.completed",
            "item_id": "b", "content_index": 0, "transcript": "Weather?"}));
        c.sent(&mut json!({"type": "response.create"}));
        assert!(c.responding.is_some());
        c.received(&json!({"type": "conversation.item.created", "item": {"id": "c",
            "type": "message", "role": "assistant", "status": "in_progress", "content": []}}));
        c.received(&json!({"type": "response.output_item.done", "item": {"id": "c",
            "type": "message", "role": "assistant",
            "content": [{"type": "audio", "transcript": "Sunny."}]}}));
        c.received(&json!({"type": "response.done", "response": {"status": "completed"}}));
        assert!(c.responding.is_none());
        c.received(&json!({"type": "conversation.item.created", "item": item("d", "user", "x")}));
        c.received(&json!({"type": "conversation.item.deleted", "item_id": "d"}));
        let (events, ids) = c.replay();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(events[0]["session"], json!({"voice": "verse", "instructions": "Brief."}));
        assert_eq!(events[2]["item"]["content"][0]["text"], "Weather?");
        assert_eq!(events[3]["item"]["role"], "assistant");
        assert_eq!(events[3]["item"]["content"][0], json!({"type": "text", "text": "Sunny."}));
    }

    #[test]
    fn what_the_server_never_confirmed_is_sent_again_in_order() {
        let mut c = Conversation::default();
        let mut create = json!({"type": "conversation.item.create", "item": {"type": "message",
            "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}});
        c.sent(&mut create);
        assert_eq!(create["item"]["id"], "item_edgeroute_1", "an id is given");
        c.sent(&mut json!({"type": "input_audio_buffer.append", "audio": "AAAA"}));
        c.sent(&mut json!({"type": "input_audio_buffer.commit"}));
        let (events, _) = c.replay();
        let types: Vec<_> = events.iter().map(|e| event_type(e).unwrap()).collect();
        assert_eq!(
            types,
            ["conversation.item.create", "input_audio_buffer.append", "input_audio_buffer.commit"]
        );
        // Confirmed: not sent again (the item now replays from the conversation instead).
        c.received(&json!({"type": "conversation.item.created", "item": {"id": "item_edgeroute_1",
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}));
        c.received(&json!({"type": "input_audio_buffer.committed", "item_id": "x"}));
        let (events, ids) = c.replay();
        assert_eq!(events.len(), 1);
        assert_eq!(ids, ["item_edgeroute_1"]);
        // A refused event is forgotten.
        let mut bad = json!({"type": "conversation.item.delete", "event_id": "e9", "item_id": "z"});
        c.sent(&mut bad);
        c.received(&json!({"type": "error", "error": {"event_id": "e9"}}));
        assert_eq!(c.replay().0.len(), 1);
    }

    #[test]
    fn the_replays_acknowledgements_are_swallowed_once() {
        let mut s = Swallow { session_updated: true, items: vec!["a".into()] };
        assert!(s.takes(&json!({"type": "session.updated"})));
        assert!(!s.takes(&json!({"type": "session.updated"})));
        let created = json!({"type": "conversation.item.created", "item": {"id": "a"}});
        assert!(s.takes(&created));
        assert!(!s.takes(&created));
        assert!(!s.takes(&json!({"type": "response.created"})));
    }

    #[test]
    fn models_are_escaped_in_the_query() {
        assert_eq!(escape("org/voice 1"), "org%2Fvoice%201");
    }
}
