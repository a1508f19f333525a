//! Streaming chat completions with the commit point on the client's side.
//!
//! Before the first content chunk (the commit point) a stream is retried elsewhere like a JSON
//! request: nothing has reached the caller. After it, a cut (an SSE error event, a dropped
//! connection, an end without `data: [DONE]`, a malformed chunk) or a stall (no chunk within
//! the inter-token deadline) is repaired by **continuation**: the same conversation plus the
//! partial answer as a trailing assistant message with `continue_final_message: true` goes to
//! the next node, whose chunks are forwarded under the original stream's id. The caller sees one
//! stream: no token lost, none repeated, one finish.

use std::time::Duration;

use bytes::Bytes;
use edgeroute_proto::discovery::Candidate;
use edgeroute_proto::sse::{SseDecoder, SseEvent, is_error_payload};
use edgeroute_proto::{ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Role};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::error::{Attempts, ClientError, Side};
use crate::machine::{Kind, Outcome, Turn};
use crate::session::Served;
use crate::{Client, Event, Query, SlotPermit, classify, fault_of, model_version, retry_after};

/// What a stream yields: the answer's chunks and, where it happened, the point at which the
/// answer moved to another node.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Chunk(ChatCompletionChunk),
    /// The stream was cut on `from` after `after_tokens` tokens and continues on `to`.
    Continued {
        from: String,
        to: String,
        after_tokens: u32,
    },
}

/// The caller's end of a streamed answer.
#[derive(Debug)]
pub struct ChatStream {
    rx: mpsc::Receiver<Result<StreamItem, ClientError>>,
    served: Served,
    continued_on: Vec<String>,
}

impl ChatStream {
    pub(crate) fn new(rx: mpsc::Receiver<Result<StreamItem, ClientError>>, served: Served) -> Self {
        ChatStream { rx, served, continued_on: Vec::new() }
    }

    /// The node whose first token started the stream (a continuation may finish elsewhere).
    pub fn node(&self) -> &str {
        &self.served.node.id
    }

    /// Who started the stream: the node, its pool and cascade model, the model version.
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// The nodes the answer was continued on so far, in order.
    pub fn continued_on(&self) -> &[String] {
        &self.continued_on
    }

    /// The next chunk or continuation; `None` after the last one. An `Err` is final.
    pub async fn next_item(&mut self) -> Option<Result<StreamItem, ClientError>> {
        let item = self.rx.recv().await;
        if let Some(Ok(StreamItem::Continued { to, .. })) = &item {
            self.continued_on.push(to.clone());
        }
        item
    }

    /// The next chunk; `None` after the last one. An `Err` is final.
    pub async fn next(&mut self) -> Option<Result<ChatCompletionChunk, ClientError>> {
        loop {
            match self.next_item().await? {
                Ok(StreamItem::Chunk(c)) => return Some(Ok(c)),
                Ok(StreamItem::Continued { .. }) => {}
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Reads the whole stream and returns the answer's text.
    pub async fn text(mut self) -> Result<String, ClientError> {
        let mut out = String::new();
        while let Some(c) = self.next().await {
            for ch in c?.choices {
                if let Some(t) = ch.delta.content {
                    out.push_str(&t);
                }
            }
        }
        Ok(out)
    }
}

/// A stream that reached its commit point on some node.
pub(crate) struct Committed {
    pub body: Incoming,
    pub dec: SseDecoder,
    /// Chunks read up to and including the first content chunk.
    pub first: Vec<ChatCompletionChunk>,
    pub done: bool,
    /// The model version the node reported.
    pub version: Option<String>,
}

const MAX_EVENT: usize = 1 << 20;

fn content_of(c: &ChatCompletionChunk) -> Option<&str> {
    c.choices.first().and_then(|ch| ch.delta.content.as_deref()).filter(|t| !t.is_empty())
}

/// Reads frames until one SSE event is available; `Err` on a cut, stall or malformed data.
async fn next_event(
    body: &mut Incoming,
    dec: &mut SseDecoder,
    stall: Duration,
) -> Result<SseEvent, String> {
    loop {
        match dec.next_event() {
            Ok(Some(ev)) => return Ok(ev),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed stream: {e}")),
        }
        match tokio::time::timeout(stall, body.frame()).await {
            Err(_) => return Err(format!("stalled: no data for {} ms", stall.as_millis())),
            Ok(None) => return Err("stream ended without [DONE]".into()),
            Ok(Some(Err(e))) => return Err(format!("stream cut: {e}")),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    dec.push(&data);
                }
            }
        }
    }
}

/// Parses one `data:` payload into a chunk; an error payload or bad JSON is a cut.
fn chunk(d: &Bytes) -> Result<ChatCompletionChunk, String> {
    if is_error_payload(d) {
        return Err(format!("error event: {}", String::from_utf8_lossy(d)));
    }
    serde_json::from_slice(d).map_err(|e| format!("malformed chunk: {e}"))
}

/// How a stream's start on one node ended, and the stream when it committed.
pub(crate) type Start = (Outcome, Option<Box<Committed>>);

fn failed(side: Side, what: String) -> Start {
    (Outcome::Failed { side, what }, None)
}

impl Client {
    /// Sends a streaming request to `node` and reads up to the commit point (the first
    /// content chunk) within `first_token`.
    pub(crate) async fn start_stream(
        &self,
        node: &Candidate,
        body: &Bytes,
        session: &str,
        bearer: Option<&str>,
        first_token: Duration,
    ) -> Start {
        let stall = self.inner.cfg.stall_timeout;
        let sent = tokio::time::Instant::now();
        let work = async {
            let (res, hint) = match self.send_chat(node, body, session, bearer).await {
                Ok(r) => r,
                Err(e) => return failed(Side::Network, e),
            };
            let status = res.status();
            if !status.is_success() {
                let retry = retry_after(res.headers());
                let fault = fault_of(status, res.headers());
                let text = Limited::new(res.into_body(), 1 << 20)
                    .collect()
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                return (classify(status, fault, text, hint, retry), None);
            }
            let version = model_version(res.headers());
            let mut body = res.into_body();
            let mut dec = SseDecoder::new(MAX_EVENT);
            let mut first = Vec::new();
            loop {
                let done = match next_event(&mut body, &mut dec, stall).await {
                    Err(e) => return failed(Side::Network, e),
                    Ok(SseEvent::Done) => true,
                    Ok(SseEvent::Data(d)) => match chunk(&d) {
                        Err(e) => return failed(Side::Backend, e),
                        Ok(c) => {
                            let committed = content_of(&c).is_some();
                            first.push(c);
                            if !committed {
                                continue;
                            }
                            false
                        }
                    },
                };
                let c = Committed { body, dec, first, done, version };
                let outcome = Outcome::Committed { after: sent.elapsed(), hint };
                return (outcome, Some(Box::new(c)));
            }
        };
        tokio::time::timeout(first_token, work).await.unwrap_or_else(|_| {
            failed(Side::Network, format!("no first token within {} ms", first_token.as_millis()))
        })
    }
}

/// Everything the forwarding task needs.
pub(crate) struct Forward {
    pub client: Client,
    pub session: String,
    pub q: Query,
    pub req: ChatCompletionRequest,
    pub current: Candidate,
    pub committed: Committed,
    /// The slot on `current` this stream holds: returned when the task ends (the stream
    /// finished, failed, or its caller dropped it) or the stream moves on.
    pub permit: Option<SlotPermit>,
    pub tx: mpsc::Sender<Result<StreamItem, ClientError>>,
}

impl Forward {
    pub(crate) async fn run(mut self) {
        let stall = self.client.inner.cfg.stall_timeout;
        // The stream's identity as the caller first saw it.
        let (id, created, model) = match self.committed.first.first() {
            Some(c) => (c.id.clone(), c.created, c.model.clone()),
            None => (String::new(), 0, self.req.model.clone()),
        };
        let mut text = String::new();
        let mut tokens: u32 = 0;
        let mut continuing = false;
        let mut tried = vec![self.current.id.clone()];
        let mut pending: Vec<ChatCompletionChunk> = std::mem::take(&mut self.committed.first);
        let mut done = self.committed.done;
        loop {
            for mut c in pending.drain(..) {
                let content = content_of(&c).map(str::to_owned);
                // A continuation's own role chunk is not news to the caller.
                if continuing
                    && content.is_none()
                    && c.choices.iter().all(|ch| ch.finish_reason.is_none())
                    && c.choices.first().is_some_and(|ch| ch.delta.role.is_some())
                {
                    continue;
                }
                if let Some(t) = content {
                    text.push_str(&t);
                    tokens += 1;
                }
                c.id.clone_from(&id);
                c.created = created;
                c.model.clone_from(&model);
                if self.tx.send(Ok(StreamItem::Chunk(c))).await.is_err() {
                    return; // The caller went away: dropping the body cancels the node's work.
                }
            }
            if done {
                return;
            }
            let next = tokio::select! {
                next = next_event(&mut self.committed.body, &mut self.committed.dec, stall) => next,
                // The caller dropped the stream: stop now (cancelling the node's work and
                // returning its slot), not at the next chunk.
                () = self.tx.closed() => return,
            };
            let next = next.and_then(|ev| match ev {
                SseEvent::Done => Ok(None),
                SseEvent::Data(d) => chunk(&d).map(Some),
            });
            match next {
                Ok(None) => done = true,
                Ok(Some(c)) => pending.push(c),
                Err(e) => {
                    if !self.continue_elsewhere(&e, &text, tokens, &mut tried).await {
                        return;
                    }
                    continuing = true;
                    pending = std::mem::take(&mut self.committed.first);
                    done = self.committed.done;
                }
            }
        }
    }

    /// Continues the answer on the next node (the machine's continuation ladder over the
    /// session's order as it stands now); false (after telling the caller) when none can.
    async fn continue_elsewhere(
        &mut self,
        why: &str,
        text: &str,
        tokens: u32,
        tried: &mut Vec<String>,
    ) -> bool {
        let client = self.client.clone();
        let cut = self.current.id.clone();
        // The cut node's slot is returned before the next one is chosen.
        drop(self.permit.take());
        let order = client.with(|st, now| {
            st.m.note_failure(&cut, 0, now);
            st.plans.get(&self.session).map(|p| p.order().to_vec())
        });
        let order: Vec<Candidate> =
            order.unwrap_or_default().into_iter().filter(|c| !tried.contains(&c.id)).collect();
        let body = match continuation(&self.req, text, tokens) {
            Ok(b) => b,
            Err(e) => {
                let _ = self.tx.send(Err(e)).await;
                return false;
            }
        };
        let first_token = client.inner.cfg.first_token_timeout;
        let mut turn = Turn::new(&self.req.model, Kind::Continuation, order);
        let (session, bearer) = (self.session.as_str(), self.q.bearer.as_deref());
        let r = client
            .drive(&self.q, &mut turn, |node| {
                let (client, body) = (&client, body.clone());
                async move { client.start_stream(&node, &body, session, bearer, first_token).await }
            })
            .await;
        tried.extend(turn.reports().iter().map(|a| a.node.clone()));
        match r {
            Ok((c, permit, d)) => {
                let to = d.node.id.clone();
                self.permit = Some(permit);
                client.emit(Event::Failover {
                    from: cut.clone(),
                    to: to.clone(),
                    reason: format!("mid-stream after {tokens} tokens: {why}"),
                });
                client.with(|st, now| {
                    if let Some(plan) = st.plans.get_mut(&self.session) {
                        plan.reorder(&mut st.m, &to, now);
                    }
                });
                tried.push(to.clone());
                self.current = d.node;
                self.committed = *c;
                let moved = StreamItem::Continued { from: cut, to, after_tokens: tokens };
                self.tx.send(Ok(moved)).await.is_ok()
            }
            Err(e) => {
                let e = match e {
                    ClientError::Exhausted(a) | ClientError::StreamCut(a) => {
                        let mut all = vec![crate::error::AttemptReport {
                            node: cut,
                            side: Side::Network,
                            what: why.to_owned(),
                            after: Duration::ZERO,
                            hedge: false,
                        }];
                        all.extend(a.0);
                        ClientError::StreamCut(Attempts(all))
                    }
                    other => other,
                };
                let _ = self.tx.send(Err(e)).await;
                false
            }
        }
    }
}

/// The request that continues `req` from the partial answer `text` (`tokens` long).
fn continuation(
    req: &ChatCompletionRequest,
    text: &str,
    tokens: u32,
) -> Result<Bytes, ClientError> {
    let mut req = req.clone();
    req.messages.push(ChatMessage::new(Role::Assistant, text));
    req.continue_final_message = Some(true);
    // vLLM refuses `continue_final_message` together with its default
    // `add_generation_prompt: true`; SGLang and edgeroute's nodes read it the same way.
    req.extra.insert("add_generation_prompt".into(), false.into());
    if let Some(m) = req.max_tokens {
        req.max_tokens = Some(m.saturating_sub(tokens).max(1));
    }
    if let Some(m) = req.max_completion_tokens {
        req.max_completion_tokens = Some(m.saturating_sub(tokens).max(1));
    }
    serde_json::to_vec(&req).map(Bytes::from).map_err(|e| ClientError::Invalid(e.to_string()))
}
