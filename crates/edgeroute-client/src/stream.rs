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
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;

use crate::{Client, ClientError, Event, Outcome, refusal};

/// The caller's end of a streamed answer.
#[derive(Debug)]
pub struct ChatStream {
    rx: mpsc::Receiver<Result<ChatCompletionChunk, ClientError>>,
    node: String,
}

impl ChatStream {
    pub(crate) fn new(
        rx: mpsc::Receiver<Result<ChatCompletionChunk, ClientError>>,
        node: String,
    ) -> Self {
        ChatStream { rx, node }
    }

    /// The node whose first token started the stream (a continuation may finish elsewhere).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The next chunk; `None` after the last one. An `Err` is final.
    pub async fn next(&mut self) -> Option<Result<ChatCompletionChunk, ClientError>> {
        self.rx.recv().await
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
    /// From sending the request to the first content chunk.
    pub ttft: Duration,
}

/// How a stream's start on one node ended.
pub(crate) type Start = Outcome<Box<Committed>>;

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

impl Client {
    /// Sends a streaming request to `node` and reads up to the commit point (the first
    /// content chunk) within `first_token`.
    pub(crate) async fn start_stream(
        &self,
        node: &Candidate,
        body: &Bytes,
        session: &str,
        first_token: Duration,
    ) -> Start {
        let stall = self.inner.cfg.stall_timeout;
        let sent = tokio::time::Instant::now();
        let work = async {
            let (res, hint) = match self.send_chat(node, body, session).await {
                Ok(r) => r,
                Err(e) => return Start::Failed(e),
            };
            let status = res.status();
            if !status.is_success() {
                let text = res
                    .into_body()
                    .collect()
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                return refusal(status, text, hint);
            }
            let mut body = res.into_body();
            let mut dec = SseDecoder::new(MAX_EVENT);
            let mut first = Vec::new();
            loop {
                match next_event(&mut body, &mut dec, stall).await {
                    Err(e) => return Start::Failed(e),
                    Ok(SseEvent::Done) => {
                        let c = Committed { body, dec, first, done: true, ttft: sent.elapsed() };
                        return Start::Done(Box::new(c), hint);
                    }
                    Ok(SseEvent::Data(d)) => match chunk(&d) {
                        Err(e) => return Start::Failed(e),
                        Ok(c) => {
                            let committed = content_of(&c).is_some();
                            first.push(c);
                            if committed {
                                let c = Committed {
                                    body,
                                    dec,
                                    first,
                                    done: false,
                                    ttft: sent.elapsed(),
                                };
                                return Start::Done(Box::new(c), hint);
                            }
                        }
                    },
                }
            }
        };
        tokio::time::timeout(first_token, work).await.unwrap_or_else(|_| {
            Start::Failed(format!("no first token within {} ms", first_token.as_millis()))
        })
    }
}

/// Everything the forwarding task needs.
pub(crate) struct Forward {
    pub client: Client,
    pub session: String,
    pub req: ChatCompletionRequest,
    /// The nodes to continue on, in order (the one streaming now excluded).
    pub next: Vec<Candidate>,
    pub current: Candidate,
    pub committed: Committed,
    pub tx: mpsc::Sender<Result<ChatCompletionChunk, ClientError>>,
    /// Where a move caused mid-stream is reported back to the session: (node, reason).
    pub moved: std::sync::Arc<std::sync::Mutex<Option<(String, String)>>>,
}

impl Forward {
    pub(crate) async fn run(mut self) {
        let stall = self.client.inner.cfg.stall_timeout;
        let first_token = self.client.inner.cfg.first_token_timeout;
        // The stream's identity as the caller first saw it.
        let (id, created, model) = match self.committed.first.first() {
            Some(c) => (c.id.clone(), c.created, c.model.clone()),
            None => (String::new(), 0, self.req.model.clone()),
        };
        let mut text = String::new();
        let mut tokens: u32 = 0;
        let mut continuing = false;
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
                if self.tx.send(Ok(c)).await.is_err() {
                    return; // The caller went away: dropping the body cancels the node's work.
                }
            }
            if done {
                return;
            }
            let next = next_event(&mut self.committed.body, &mut self.committed.dec, stall)
                .await
                .and_then(|ev| match ev {
                    SseEvent::Done => Ok(None),
                    SseEvent::Data(d) => chunk(&d).map(Some),
                });
            match next {
                Ok(None) => done = true,
                Ok(Some(c)) => pending.push(c),
                Err(e) => {
                    if !self.continue_elsewhere(&e, &text, tokens, first_token).await {
                        return;
                    }
                    continuing = true;
                    pending = std::mem::take(&mut self.committed.first);
                    done = self.committed.done;
                }
            }
        }
    }

    /// Continues the answer on the next node; false (after telling the caller) when none can.
    async fn continue_elsewhere(
        &mut self,
        why: &str,
        text: &str,
        tokens: u32,
        first_token: Duration,
    ) -> bool {
        self.client.node_failed(&self.current.id);
        let mut req = self.req.clone();
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
        let body = match serde_json::to_vec(&req) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                let _ = self.tx.send(Err(ClientError::Invalid(e.to_string()))).await;
                return false;
            }
        };
        let mut failures = vec![format!("{}: {why}", self.current.id)];
        while !self.next.is_empty() {
            if !self.client.try_retry() {
                break;
            }
            let node = self.next.remove(0);
            match self.client.start_stream(&node, &body, &self.session, first_token).await {
                Start::Done(c, _) => {
                    self.client.emit(Event::Failover {
                        from: self.current.id.clone(),
                        to: node.id.clone(),
                        reason: format!("mid-stream after {tokens} tokens: {why}"),
                    });
                    if let Ok(mut m) = self.moved.lock() {
                        *m = Some((node.id.clone(), why.to_owned()));
                    }
                    self.current = node;
                    self.committed = *c;
                    return true;
                }
                Outcome::Refused { status, body } => {
                    let _ =
                        self.tx.send(Err(ClientError::Api { node: node.id, status, body })).await;
                    return false;
                }
                Outcome::Busy(e, _) => failures.push(format!("{}: {e}", node.id)),
                Outcome::Failed(e) => {
                    self.client.node_failed(&node.id);
                    failures.push(format!("{}: {e}", node.id));
                }
            }
        }
        let _ = self.tx.send(Err(ClientError::StreamCut(failures.join("; ")))).await;
        false
    }
}
