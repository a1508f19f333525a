//! The driver: sessions and the loop that performs a [`Turn`]'s steps.
//!
//! Everything decided here is decided by the machine; this module sends requests, reads
//! answers, classifies them into [`Outcome`]s, sleeps until deadlines and starts background
//! probes. The client's one lock is taken for each machine call and never held across an
//! `.await`.

use std::future::Future;

use bytes::Bytes;
use edgeroute_proto::discovery::Candidate;
use edgeroute_proto::{ChatCompletion, ChatCompletionRequest};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;

use crate::cache::Freshness;
use crate::error::{Attempts, ClientError, Side};
use crate::machine::{Delivery, Kind, Outcome, Plan, Step, Turn};
use crate::stream::{ChatStream, Forward};
use crate::{Client, Query, SlotPermit, classify, fault_of, model_version, retry_after};

/// A request to one of the node's endpoints beside chat ([`Session::call`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RawRequest {
    /// The model it asks for (a pipeline session serves several).
    pub model: String,
    /// `/v1/audio/transcriptions`, `/v1/audio/translations`, `/v1/audio/speech`,
    /// `/v1/embeddings`.
    pub path: String,
    /// The body's type (a multipart upload's carries its boundary).
    pub content_type: String,
    pub body: Bytes,
}

/// A node's answer to a [`RawRequest`], read whole.
#[derive(Debug, Clone, PartialEq)]
pub struct RawAnswer {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// Who served an answer: the node the turn delivered from (its pool, and under a routing
/// policy's cascade the reduced model it served as) and the model version the node reported
/// (`x-edgeroute-model-version`). Taken from the attempt that answered, never from the plan:
/// after a placement miss or a failover the two differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub node: Candidate,
    pub model_version: Option<String>,
}

/// A conversation pinned to one node, with the others ranked behind it. Its methods take
/// `&self`: turns of one session may run concurrently (each on the order as it stood when it
/// started); moves are applied between turns.
#[derive(Debug)]
pub struct Session {
    client: Client,
    /// Sent as `x-edgeroute-session`: a draining node keeps serving known sessions until its
    /// deadline, with a migrate hint.
    id: String,
    q: Query,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.client.with(|st, _| st.plans.remove(&self.id));
    }
}

impl Session {
    pub(crate) fn new(
        client: Client,
        id: String,
        q: Query,
        order: Vec<Candidate>,
        stamp: u64,
    ) -> Session {
        client.with(|st, now| {
            st.plans.insert(id.clone(), Plan::new(&q.model, order, stamp, now));
        });
        Session { client, id, q }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn model(&self) -> &str {
        &self.q.model
    }

    /// The pipeline this session holds, if it is a pipeline session.
    pub fn pipeline(&self) -> Option<&str> {
        self.q.pipeline.as_deref()
    }

    fn order(&self) -> Vec<Candidate> {
        self.client
            .with(|st, _| st.plans.get(&self.id).map(|p| p.order().to_vec()))
            .unwrap_or_default()
    }

    /// The node the session is pinned to.
    pub fn pinned(&self) -> Candidate {
        self.order().into_iter().next().unwrap_or_else(|| unreachable_candidate(&self.q.model))
    }

    pub fn standby(&self) -> Option<Candidate> {
        self.order().into_iter().nth(1)
    }

    /// Before a turn: a newer candidate list is taken in, a stale one revalidated behind;
    /// pending moves are made; a re-probe is started when one is due. The order to try.
    fn begin_turn(&self) -> Vec<Candidate> {
        let key = self.client.key(&self.q);
        let now_ms = self.client.wall_ms();
        let revalidate = self.client.inner.cfg.discovery_revalidate.as_millis() as u64;
        let (order, reprobe, stale) = self.client.with(|st, now| {
            let crate::State { m, plans, cache, .. } = st;
            let Some(plan) = plans.get_mut(&self.id) else { return (vec![], None, false) };
            let cached = cache.get_revalidating(&key, now_ms, revalidate);
            let stale = cached.is_none_or(|(_, f)| f != Freshness::Fresh);
            if let (Some((answer, _)), Some(at)) = (cached, cache.fetched_at(&key))
                && at > plan.stamp()
            {
                plan.refresh(m, &answer.candidates, at, now);
            }
            let b = plan.before_turn(m, now);
            (plan.order().to_vec(), b.reprobe, stale)
        });
        if stale {
            self.client.revalidate(&self.q);
        }
        if let Some((a, b)) = reprobe {
            let (client, id, q) = (self.client.clone(), self.id.clone(), self.q.clone());
            tokio::spawn(async move {
                let (pa, pb) =
                    tokio::join!(client.probe_recorded(&a, &q), client.probe_recorded(&b, &q));
                client.with(|st, _| {
                    if let Some(plan) = st.plans.get_mut(&id) {
                        plan.reprobed(pa, pb);
                    }
                });
            });
        }
        order
    }

    /// After a turn: moves and hints are applied, nodes that lost the model leave the order,
    /// the list is revalidated after a placement miss or when every node failed, and a node
    /// that lost a hedge is probed.
    fn end_turn(&self, turn: &Turn, d: Option<&Delivery>, failed: bool) {
        self.client.with(|st, now| {
            if let Some(plan) = st.plans.get_mut(&self.id) {
                plan.after_turn(&mut st.m, d, turn.misses(), now);
            }
        });
        if !turn.misses().is_empty() || failed {
            self.client.expire(&self.q);
        }
        if let Some(s) = d.and_then(|d| d.suspect.clone()) {
            self.client.suspect(s, self.q.clone());
        }
    }

    /// One chat completion (JSON), with the failover ladder.
    pub async fn chat(&self, req: &ChatCompletionRequest) -> Result<ChatCompletion, ClientError> {
        self.chat_served(req).await.map(|(c, _)| c)
    }

    /// [`Session::chat`], with who served the answer.
    pub async fn chat_served(
        &self,
        req: &ChatCompletionRequest,
    ) -> Result<(ChatCompletion, Served), ClientError> {
        if req.stream {
            return Err(ClientError::Invalid("use Session::chat_stream for streaming".into()));
        }
        let body =
            Bytes::from(serde_json::to_vec(req).map_err(|e| ClientError::Invalid(e.to_string()))?);
        let mut turn = Turn::new(&req.model, Kind::Json, self.begin_turn());
        let (client, id, bearer) = (&self.client, self.id.as_str(), self.q.bearer.as_deref());
        let r = client
            .drive(&self.q, &mut turn, |node| {
                let body = body.clone();
                async move { client.attempt_json(&node, &body, id, bearer).await }
            })
            .await;
        self.end_turn(&turn, r.as_ref().ok().map(|(_, _, d)| &**d), exhausted(&r));
        // The answer is read: its slot (the permit) is returned here.
        r.map(|((c, model_version), _, d)| (c, Served { node: d.node, model_version }))
    }

    /// One request to another endpoint of the session's model — `/v1/audio/transcriptions`,
    /// `/v1/audio/translations`, `/v1/audio/speech`, `/v1/embeddings` — with the failover
    /// ladder of [`Session::chat`]: until a node answers, the whole request (an upload
    /// included) is sent again to the next node. The answer is read whole (speech too: a
    /// cut audio stream is a failed attempt, restarted on the standby, never half-delivered).
    /// A node's refusal of the request itself (4xx) comes back as the answer.
    pub async fn call(&self, req: &RawRequest) -> Result<(RawAnswer, Served), ClientError> {
        let (client, id, bearer) = (&self.client, self.id.as_str(), self.q.bearer.as_deref());
        let r = self
            .raw_turn(req, Kind::Json, |node| async move {
                client.attempt_raw(&node, req, id, bearer).await
            })
            .await;
        r.map(|((a, model_version), _, d)| (a, Served { node: d.node, model_version }))
    }

    /// One turn of a request to another endpoint: the path checked, the ladder driven with
    /// `attempt`, the turn's lessons applied.
    async fn raw_turn<T, F, Fut>(
        &self,
        req: &RawRequest,
        kind: Kind,
        attempt: F,
    ) -> Result<(T, SlotPermit, Box<Delivery>), ClientError>
    where
        F: FnMut(Candidate) -> Fut,
        Fut: Future<Output = (Outcome, Option<T>)>,
    {
        if !req.path.starts_with("/v1/") || req.path.contains("..") {
            return Err(ClientError::Invalid(format!("`{}` is not an endpoint path", req.path)));
        }
        let mut turn = Turn::new(&req.model, kind, self.begin_turn());
        let r = self.client.drive(&self.q, &mut turn, attempt).await;
        self.end_turn(&turn, r.as_ref().ok().map(|(_, _, d)| &**d), exhausted(&r));
        r
    }

    /// [`Session::call`], the answer streamed from its first byte: the ladder runs until a node
    /// has sent a first byte of a 2xx answer within the first-token timeout (the commit point:
    /// before it, a failed node costs an attempt and the request goes whole to the next); then
    /// the body comes as the node sends it, so a voice agent plays speech from its first audio.
    /// A node that fails after the commit point ends the stream with
    /// [`ClientError::StreamCut`]: bytes cannot be un-played, so the caller decides (ask again
    /// with [`Session::call`], which restarts the answer whole on the standby).
    pub async fn call_stream(&self, req: &RawRequest) -> Result<(RawStream, Served), ClientError> {
        let (client, id, bearer) = (&self.client, self.id.as_str(), self.q.bearer.as_deref());
        let r = self
            .raw_turn(req, Kind::Stream, |node| async move {
                client.attempt_first_byte(&node, req, id, bearer).await
            })
            .await;
        let ((mut stream, model_version), permit, d) = r?;
        stream.permit = Some(permit);
        stream.node = d.node.id.clone();
        Ok((stream, Served { node: d.node, model_version }))
    }

    /// Opens a realtime session (`/v1/realtime`) with the failover ladder of
    /// [`Session::chat`], skipping `avoid` (a node that asked the session to move): the
    /// WebSocket is open and its first event (`session.created`) read. The slot on the node is
    /// held as long as the session is.
    pub(crate) async fn open_realtime(
        &self,
        avoid: Option<&str>,
    ) -> Result<(crate::realtime::Opened, Candidate), ClientError> {
        let mut order = self.begin_turn();
        if let Some(a) = avoid
            && order.len() > 1
        {
            order.retain(|c| c.id != a);
        }
        let mut turn = Turn::new(&self.q.model, Kind::Json, order);
        let (client, id, bearer) = (&self.client, self.id.as_str(), self.q.bearer.as_deref());
        let model = self.q.model.as_str();
        let r = client
            .drive(&self.q, &mut turn, |node| async move {
                crate::realtime::attempt(client, &node, model, id, bearer).await
            })
            .await;
        self.end_turn(&turn, r.as_ref().ok().map(|(_, _, d)| &**d), exhausted(&r));
        let (mut opened, permit, d) = r?;
        opened.permit = Some(permit);
        Ok((opened, d.node))
    }

    /// A streamed chat completion. Before the first token it fails over (and hedges) like
    /// [`Session::chat`]; after it, a cut or stalled stream is continued on the next node and
    /// the caller sees one seamless stream.
    pub async fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
    ) -> Result<ChatStream, ClientError> {
        let mut req = req.clone();
        req.stream = true;
        let body =
            Bytes::from(serde_json::to_vec(&req).map_err(|e| ClientError::Invalid(e.to_string()))?);
        let mut turn = Turn::new(&req.model, Kind::Stream, self.begin_turn());
        let first_token = self.client.inner.cfg.first_token_timeout;
        let (client, id, bearer) = (&self.client, self.id.as_str(), self.q.bearer.as_deref());
        let r = client
            .drive(&self.q, &mut turn, |node| {
                let body = body.clone();
                async move { client.start_stream(&node, &body, id, bearer, first_token).await }
            })
            .await;
        self.end_turn(&turn, r.as_ref().ok().map(|(_, _, d)| &**d), exhausted(&r));
        let (committed, permit, d) = r?;
        let served = Served { node: d.node.clone(), model_version: committed.version.clone() };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(
            Forward {
                client: self.client.clone(),
                session: self.id.clone(),
                q: self.q.clone(),
                req,
                current: d.node,
                committed: *committed,
                permit: Some(permit),
                tx,
            }
            .run(),
        );
        Ok(ChatStream::new(rx, served))
    }
}

/// A node's answer to [`Session::call_stream`], from its first byte on.
pub struct RawStream {
    pub status: u16,
    pub content_type: Option<String>,
    first: Option<Bytes>,
    body: hyper::body::Incoming,
    stall: std::time::Duration,
    node: String,
    sent: Instant,
    /// The slot on the node, held until the answer ends or the stream is dropped.
    permit: Option<SlotPermit>,
    done: bool,
}

impl std::fmt::Debug for RawStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawStream")
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl RawStream {
    /// The next piece of the answer; `None` at its end. An `Err` (a node that failed or went
    /// silent for the stall timeout mid-answer) ends it.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, ClientError>> {
        use hyper::body::Body as _;
        if let Some(b) = self.first.take() {
            return Some(Ok(b));
        }
        if self.done {
            return None;
        }
        loop {
            let frame = tokio::time::timeout(
                self.stall,
                std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.body).poll_frame(cx)),
            )
            .await;
            let what = match frame {
                Ok(Some(Ok(f))) => match f.into_data() {
                    Ok(b) if b.is_empty() => continue,
                    Ok(b) => return Some(Ok(b)),
                    Err(_) => continue,
                },
                Ok(None) => {
                    self.done = true;
                    self.permit = None;
                    return None;
                }
                Ok(Some(Err(e))) => format!("cut mid-answer: {e}"),
                Err(_) => format!("stalled mid-answer: no data for {} ms", self.stall.as_millis()),
            };
            self.done = true;
            self.permit = None;
            let report = crate::error::AttemptReport {
                node: self.node.clone(),
                side: Side::Network,
                what,
                after: self.sent.elapsed(),
                hedge: false,
            };
            return Some(Err(ClientError::StreamCut(Attempts(vec![report]))));
        }
    }
}

/// What an answer's head says: its status, how a failure is classified (`Retry-After`, the
/// node's fault header), the model version and the content type.
struct Head {
    status: http::StatusCode,
    retry: Option<std::time::Duration>,
    fault: edgeroute_proto::Fault,
    version: Option<String>,
    content_type: Option<String>,
}

impl Head {
    fn of<B>(res: &http::Response<B>) -> Head {
        let status = res.status();
        Head {
            status,
            retry: retry_after(res.headers()),
            fault: fault_of(status, res.headers()),
            version: model_version(res.headers()),
            content_type: res
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        }
    }
}

/// Every candidate failed: the list behind the session is revalidated.
fn exhausted<T>(r: &Result<T, ClientError>) -> bool {
    matches!(r, Err(ClientError::Exhausted(_)))
}

/// A placeholder for a session whose plan is gone (never seen by a caller that holds it).
fn unreachable_candidate(model: &str) -> Candidate {
    Candidate {
        id: String::new(),
        region: String::new(),
        url: String::new(),
        health: "unknown".into(),
        models: vec![model.into()],
        queue_depth: 0,
        in_flight: 0,
        capacity: 0,
        ttft_p50_ms: 0.0,
        ttft_p99_ms: 0.0,
        error_rate: 0.0,
        cost_per_1k: 0.0,
        score_ms: 0.0,
        serve_as: None,
        pool: None,
    }
}

impl Client {
    /// Performs a turn's steps until it delivers or fails. `attempt` sends the request to one
    /// node and classifies how it ended (with the answer when it committed). Attempts run
    /// concurrently (a hedge races the first); dropping the losers cancels their work and
    /// returns their slots. The winner's slot comes with its answer: held until the caller is
    /// done with it.
    pub(crate) async fn drive<T, F, Fut>(
        &self,
        q: &Query,
        turn: &mut Turn,
        mut attempt: F,
    ) -> Result<(T, SlotPermit, Box<Delivery>), ClientError>
    where
        F: FnMut(Candidate) -> Fut,
        Fut: Future<Output = (Outcome, Option<T>)>,
    {
        let mut running = FuturesUnordered::new();
        let mut answers: Vec<(usize, T, SlotPermit)> = Vec::new();
        let mut step = self.with(|st, now| turn.start(&mut st.m, now));
        loop {
            let until = match step {
                Step::Send { attempt: a, node, hedge_at } => {
                    // The machine took a slot on `node` for this attempt: owned from here.
                    let permit = SlotPermit::new(self, &node.id);
                    let work = attempt(node);
                    running.push(async move { (a, work.await, permit) });
                    hedge_at
                }
                Step::Wait { until } => until,
                Step::Rediscover => {
                    let list = self.query_discovery(q).await;
                    step = self.with(|st, now| turn.on_rediscovered(&mut st.m, list, now));
                    continue;
                }
                Step::Deliver(d) => {
                    let Some(i) = answers.iter().position(|(a, _, _)| *a == d.attempt) else {
                        return Err(ClientError::Exhausted(Attempts(turn.reports().to_vec())));
                    };
                    let (_, answer, permit) = answers.swap_remove(i);
                    return Ok((answer, permit, d));
                }
                Step::Fail(e) => return Err(e),
            };
            if running.is_empty() && until.is_none() {
                // The machine waits on nothing: never expected, never a hang.
                return Err(ClientError::Exhausted(Attempts(turn.reports().to_vec())));
            }
            let timer = async {
                match until {
                    Some(t) => tokio::time::sleep_until(Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            // Waiting for a node's slot: woken as soon as any is returned (the timer is the
            // machine's fallback).
            let waiting = turn.waiting_for_room();
            let freed = self.inner.slot_freed.notified();
            tokio::select! {
                Some((a, (outcome, answer), permit)) = running.next(), if !running.is_empty() => {
                    match answer {
                        Some(x) => answers.push((a, x, permit)),
                        // Ended without an answer: its slot is free before the next rung.
                        None => drop(permit),
                    }
                    step = self.with(|st, now| turn.on_outcome(&mut st.m, a, outcome, now));
                }
                () = timer => step = self.with(|st, now| turn.on_timer(&mut st.m, now)),
                () = freed, if waiting => {
                    step = self.with(|st, now| turn.on_timer(&mut st.m, now));
                }
            }
        }
    }

    /// One attempt of [`Session::call`] on `node`.
    async fn attempt_raw(
        &self,
        node: &Candidate,
        req: &RawRequest,
        session: &str,
        bearer: Option<&str>,
    ) -> (Outcome, Option<(RawAnswer, Option<String>)>) {
        let raw = Some((req.path.as_str(), req.content_type.as_str()));
        self.attempt_whole(node, raw, &req.body, session, bearer).await
    }

    /// One attempt of [`Session::call_stream`] on `node`: a 2xx answer's first byte within the
    /// first-token timeout commits it; a node's trouble fails over; the caller's own error is
    /// delivered.
    async fn attempt_first_byte(
        &self,
        node: &Candidate,
        req: &RawRequest,
        session: &str,
        bearer: Option<&str>,
    ) -> (Outcome, Option<(RawStream, Option<String>)>) {
        use hyper::body::Body as _;
        let t = Instant::now();
        let raw = Some((req.path.as_str(), req.content_type.as_str()));
        let work = async {
            let (res, hint) = match self.send_to(node, raw, &req.body, session, bearer).await {
                Ok(r) => r,
                Err(what) => return (Outcome::Failed { side: Side::Network, what }, None),
            };
            let Head { status, retry, fault, version, content_type } = Head::of(&res);
            let mut body = res.into_body();
            if !status.is_success() {
                let text = match Limited::new(body, 1 << 20).collect().await {
                    Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
                    Err(_) => String::new(),
                };
                return (classify(status, fault, text, hint, retry), None);
            }
            // The commit point: the answer's first byte (or its end, for an empty one).
            let first = loop {
                match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
                {
                    Some(Ok(f)) => match f.into_data() {
                        Ok(b) if !b.is_empty() => break Some(b),
                        _ => continue,
                    },
                    None => break None,
                    Some(Err(e)) => {
                        let what = format!("reading the answer: {e}");
                        return (Outcome::Failed { side: Side::Network, what }, None);
                    }
                }
            };
            let done = first.is_none();
            let stream = RawStream {
                status: status.as_u16(),
                content_type,
                first,
                body,
                stall: self.inner.cfg.stall_timeout,
                node: node.id.clone(),
                sent: t,
                permit: None,
                done,
            };
            (Outcome::Committed { after: t.elapsed(), hint }, Some((stream, version)))
        };
        let first_token = self.inner.cfg.first_token_timeout;
        tokio::time::timeout(first_token, work).await.unwrap_or_else(|_| {
            let what = format!("no first byte within {} ms", first_token.as_millis());
            (Outcome::Failed { side: Side::Network, what }, None)
        })
    }

    /// One JSON chat attempt on `node`: [`Client::attempt_whole`], the answer parsed (a
    /// malformed one is the backend's failure).
    async fn attempt_json(
        &self,
        node: &Candidate,
        body: &Bytes,
        session: &str,
        bearer: Option<&str>,
    ) -> (Outcome, Option<(ChatCompletion, Option<String>)>) {
        match self.attempt_whole(node, None, body, session, bearer).await {
            (outcome, Some((answer, version))) => {
                match serde_json::from_slice::<ChatCompletion>(&answer.body) {
                    Ok(c) => (outcome, Some((c, version))),
                    Err(e) => {
                        let what = format!("malformed answer: {e}");
                        (Outcome::Failed { side: Side::Backend, what }, None)
                    }
                }
            }
            (outcome, None) => (outcome, None),
        }
    }

    /// One attempt whose answer is read whole (chat when `raw` is `None`, else the endpoint
    /// and content type it names), classified: a 2xx commits, a node's trouble fails over, the
    /// caller's own error is delivered; all within the request timeout.
    async fn attempt_whole(
        &self,
        node: &Candidate,
        raw: Option<(&str, &str)>,
        body: &Bytes,
        session: &str,
        bearer: Option<&str>,
    ) -> (Outcome, Option<(RawAnswer, Option<String>)>) {
        let t = Instant::now();
        let work = async {
            let (res, hint) = match self.send_to(node, raw, body, session, bearer).await {
                Ok(r) => r,
                Err(what) => return (Outcome::Failed { side: Side::Network, what }, None),
            };
            let Head { status, retry, fault, version, content_type } = Head::of(&res);
            let body = match Limited::new(res.into_body(), self.inner.cfg.max_response_bytes)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    let what = format!("reading the answer: {e}");
                    return (Outcome::Failed { side: Side::Network, what }, None);
                }
            };
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body).into_owned();
                return (classify(status, fault, text, hint, retry), None);
            }
            let answer = RawAnswer { status: status.as_u16(), content_type, body };
            (Outcome::Committed { after: t.elapsed(), hint }, Some((answer, version)))
        };
        tokio::time::timeout(self.inner.cfg.request_timeout, work).await.unwrap_or_else(|_| {
            let what = "no answer within the request timeout".to_owned();
            (Outcome::Failed { side: Side::Network, what }, None)
        })
    }
}
