//! Fault scenarios: each node sits behind a front the test scripts — HTTP faults on chat
//! requests (429 with and without `Retry-After`, persistent 503, a malformed chunk or a missing
//! `[DONE]` after N tokens) and TCP faults (reset before headers, accept then silence). The
//! text the caller receives is checked against the simulator's deterministic answer.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgeroute_client::{Client, ClientConfig, Event, Listener};
use edgeroute_discovery::{Discovery, DiscoveryConfig};
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use edgeroute_test_util::TestNode;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Pass,
    Status {
        code: u16,
        retry_after: Option<u32>,
    },
    MalformedAfter(usize),
    NoDoneAfter(usize),
    ResetBeforeHeaders,
    Silence,
    /// Every answer (probes included) is held this long: a congested path.
    Delay(Duration),
}

struct Front {
    addr: SocketAddr,
    target: SocketAddr,
    task: Option<JoinHandle<()>>,
    chats: Arc<Mutex<usize>>,
}

type Http = HttpClient<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

impl Front {
    async fn start(target: SocketAddr) -> Front {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let chats = Arc::new(Mutex::new(0));
        let task = tokio::spawn(serve(listener, target, Mode::Pass, chats.clone()));
        Front { addr, target, task: Some(task), chats }
    }

    /// Applies `mode` to every connection from now on (open ones are closed).
    async fn set(&mut self, mode: Mode) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.task = Some(tokio::spawn(serve(listener, self.target, mode, self.chats.clone())));
    }

    fn chats(&self) -> usize {
        *self.chats.lock().unwrap()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    target: SocketAddr,
    mode: Mode,
    chats: Arc<Mutex<usize>>,
) {
    let http: Http = HttpClient::builder(TokioExecutor::new()).build_http();
    let mut conns = tokio::task::JoinSet::new();
    while let Ok((mut stream, _)) = listener.accept().await {
        let (mode, http, chats) = (mode.clone(), http.clone(), chats.clone());
        conns.spawn(async move {
            match mode {
                Mode::ResetBeforeHeaders => {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    // Linger 0: the close is a reset (RST), and it does not block.
                    #[allow(deprecated)]
                    let _ = stream.set_linger(Some(Duration::ZERO));
                }
                Mode::Silence => {
                    let mut buf = [0u8; 4096];
                    while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                }
                mode => {
                    let svc = hyper::service::service_fn(move |req| {
                        forward(req, target, mode.clone(), http.clone(), chats.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                }
            }
        });
    }
}

type Boxed = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn forward(
    req: http::Request<hyper::body::Incoming>,
    target: SocketAddr,
    mode: Mode,
    http: Http,
    chats: Arc<Mutex<usize>>,
) -> Result<http::Response<Boxed>, Infallible> {
    if let Mode::Delay(d) = &mode {
        tokio::time::sleep(*d).await;
    }
    let chat = req.uri().path() == "/v1/chat/completions";
    if chat {
        *chats.lock().unwrap() += 1;
    }
    if chat && let Mode::Status { code, retry_after } = &mode {
        let mut b =
            http::Response::builder().status(*code).header("content-type", "application/json");
        if let Some(s) = retry_after {
            b = b.header("retry-after", s.to_string());
        }
        let body = Full::new(Bytes::from_static(
            br#"{"error":{"message":"busy","type":"overloaded_error","param":null,"code":"busy"}}"#,
        ));
        return Ok(b.body(body.map_err(|e| match e {}).boxed()).unwrap());
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut out = http::Request::builder()
        .method(parts.method)
        .uri(format!("http://{target}{}", parts.uri.path_and_query().map_or("/", |p| p.as_str())));
    for (k, v) in &parts.headers {
        out = out.header(k, v);
    }
    let res = http.request(out.body(Full::new(body)).unwrap()).await.unwrap();
    let (parts, mut body) = res.into_parts();
    let cut = match mode {
        Mode::MalformedAfter(n) | Mode::NoDoneAfter(n) if chat => Some(n),
        _ => None,
    };
    let Some(n) = cut else {
        let b = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Ok(http::Response::from_parts(parts, Full::new(b).map_err(|e| match e {}).boxed()));
    };
    // Pass `n` SSE events through, then misbehave.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    tokio::spawn(async move {
        let mut pending = Vec::new();
        let mut events = 0;
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else { continue };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = pending.drain(..end + 2).collect();
                if events == n {
                    if matches!(mode, Mode::MalformedAfter(_)) {
                        let _ = tx
                            .send(Ok(Frame::data(Bytes::from_static(b"data: {\"id\": tru\n\n"))))
                            .await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                    return; // NoDone: the body just ends.
                }
                events += 1;
                if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                    return;
                }
            }
        }
    });
    let stream = tokio_stream_from(rx);
    Ok(http::Response::from_parts(parts, StreamBody::new(stream).boxed()))
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

struct Lab {
    nodes: Vec<TestNode>,
    fronts: Vec<Front>,
    _running: edgeroute_discovery::Spawned,
    discovery: SocketAddr,
}

impl Lab {
    /// `tor-1` (fast) and `mtl-1` (slower), each behind a front, and a discovery replica.
    async fn start() -> Lab {
        let mut nodes = Vec::new();
        let mut fronts = Vec::new();
        let mut toml = String::from("[probe]\ninterval_ms = 200\ntimeout_ms = 150\n");
        for (id, region, ttft) in [("tor-1", "toronto", 5), ("mtl-1", "montreal", 40)] {
            let cfg = format!(
                "[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = {ttft}\nprefill_us_per_token = 0\ntokens_per_s = 2000.0\n"
            );
            let node = TestNode::start_as(id, region, &cfg, None).await;
            let chat = serde_json::json!({"model": "sim-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).to_string();
            for _ in 0..6 {
                node.chat(chat.clone()).await;
            }
            let front = Front::start(node.addr).await;
            toml.push_str(&format!(
                "[[nodes]]\nid = \"{id}\"\nurl = \"http://{}\"\nregion = \"{region}\"\n",
                front.addr
            ));
            nodes.push(node);
            fronts.push(front);
        }
        let d = Discovery::build(DiscoveryConfig::from_toml(&toml, |_| None).unwrap()).unwrap();
        let running = d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let discovery = running.addr();
        let t = Instant::now();
        while edgeroute_test_util::get(discovery, "/v1/discover?model=sim-llama&k=5", None)
            .await
            .json()["candidates"]
            .as_array()
            .is_none_or(|c| c.len() < 2)
        {
            assert!(t.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Lab { nodes, fronts, _running: running, discovery }
    }

    fn client(&self, events: Listener) -> Client {
        self.client_with(events, ClientConfig::default())
    }

    fn client_with(&self, events: Listener, base: ClientConfig) -> Client {
        let cfg = ClientConfig {
            discovery: vec![format!("http://{}", self.discovery)],
            token: Some(self.nodes[0].token()),
            seed: Some(1),
            first_token_timeout: Duration::from_millis(800),
            hedge_initial: Duration::from_millis(300),
            stall_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            ..base
        };
        Client::with_listener(cfg, Some(events)).unwrap()
    }

    async fn reference(&self, text: &str) -> String {
        let body = serde_json::json!({"model": "sim-llama", "max_tokens": 30, "messages": [{"role": "user", "content": text}]});
        self.nodes[1].chat(body.to_string()).await.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

fn recorder() -> (Arc<Mutex<Vec<Event>>>, Listener) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    (events, Arc::new(move |ev: &Event| e.lock().unwrap().push(ev.clone())))
}

fn request(text: &str) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new("sim-llama", vec![ChatMessage::new(Role::User, text)]);
    r.max_tokens = Some(30);
    r
}

/// Runs one scenario: pin to `tor-1`, apply `mode` to its front, send one turn (streamed or
/// not), and check the answer is the simulator's own; returns the events and the session's
/// pinned node afterwards.
async fn scenario(mode: Mode, stream: bool) -> (Vec<Event>, String, Duration) {
    let mut lab = Lab::start().await;
    let text = "what should I pack for Vancouver";
    let want = lab.reference(text).await;
    let (events, listener) = recorder();
    let client = lab.client(listener);
    let mut s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    lab.fronts[0].set(mode.clone()).await;
    let t = Instant::now();
    let got = if stream {
        s.chat_stream(&request(text)).await.unwrap().text().await.unwrap()
    } else {
        s.chat(&request(text)).await.unwrap().choices[0].message.content.clone().unwrap_or_default()
    };
    let took = t.elapsed();
    assert_eq!(got, want, "{mode:?}: the caller must get the simulator's answer, whole");
    // The next turn shows where the session lives now (moves happen between turns).
    s.chat(&request("and the next turn")).await.unwrap();
    let pinned = s.pinned().id.clone();
    let ev = events.lock().unwrap().clone();
    (ev, pinned, took)
}

#[tokio::test]
async fn status_429_with_retry_after_moves_the_request_without_ejecting_the_node() {
    let (ev, pinned, _) = scenario(Mode::Status { code: 429, retry_after: Some(2) }, false).await;
    assert_eq!(pinned, "tor-1", "a busy node keeps the session");
    assert!(!ev.iter().any(|e| matches!(e, Event::Ejected { .. } | Event::Failover { .. })));
}

#[tokio::test]
async fn status_429_without_retry_after_is_slowness_too() {
    let (ev, pinned, _) = scenario(Mode::Status { code: 429, retry_after: None }, true).await;
    assert_eq!(pinned, "tor-1");
    assert!(!ev.iter().any(|e| matches!(e, Event::Ejected { .. })));
}

#[tokio::test]
async fn persistent_503_is_routed_around_on_every_turn() {
    let mut lab = Lab::start().await;
    let (events, listener) = recorder();
    let client = lab.client(listener);
    let mut s = client.session("sim-llama").await.unwrap();
    lab.fronts[0].set(Mode::Status { code: 503, retry_after: Some(1) }).await;
    let served_before = lab.fronts[1].chats();
    for i in 0..4 {
        s.chat(&request(&format!("turn {i}"))).await.unwrap();
    }
    assert_eq!(lab.fronts[1].chats() - served_before, 4, "every turn was answered by mtl-1");
    assert!(!saw(&events, |e| matches!(e, Event::Ejected { .. })));
}

#[tokio::test]
async fn reset_before_headers_fails_over_at_once() {
    let (ev, pinned, took) = scenario(Mode::ResetBeforeHeaders, false).await;
    assert_eq!(pinned, "mtl-1");
    assert!(ev.iter().any(|e| matches!(e, Event::Failover { .. })));
    assert!(took < Duration::from_millis(500), "{took:?}");
}

#[tokio::test]
async fn accept_then_silence_on_a_stream_is_hedged() {
    let (ev, pinned, took) = scenario(Mode::Silence, true).await;
    assert_eq!(pinned, "mtl-1");
    assert!(ev.iter().any(|e| matches!(e, Event::Hedged { .. })));
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[tokio::test]
async fn a_malformed_chunk_after_tokens_is_continued_elsewhere() {
    let (ev, pinned, _) = scenario(Mode::MalformedAfter(6), true).await;
    assert_eq!(pinned, "mtl-1");
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::Failover { reason, .. } if reason.contains("malformed")))
    );
}

#[tokio::test]
async fn a_stream_without_done_is_continued_elsewhere() {
    let (ev, pinned, _) = scenario(Mode::NoDoneAfter(6), true).await;
    assert_eq!(pinned, "mtl-1");
    assert!(
        ev.iter().any(|e| matches!(e, Event::Failover { reason, .. } if reason.contains("[DONE]")))
    );
}

#[tokio::test]
async fn a_flapping_node_is_ejected_with_backoff_and_sessions_avoid_it() {
    let mut lab = Lab::start().await;
    let (events, listener) = recorder();
    let client = lab.client(listener);
    let mut a = client.session("sim-llama").await.unwrap();
    let mut b = client.session("sim-llama").await.unwrap();
    assert_eq!((a.pinned().id.as_str(), b.pinned().id.as_str()), ("tor-1", "tor-1"));
    lab.fronts[0].set(Mode::ResetBeforeHeaders).await;
    // Both sessions find tor-1 broken (eject_after = 2 hard failures) and move on.
    for s in [&mut a, &mut b] {
        s.chat(&request("hello")).await.unwrap();
        assert_eq!(s.pinned().id, "mtl-1");
    }
    assert!(saw(&events, |e| matches!(e, Event::Ejected { node, .. } if node == "tor-1")));
    // It comes back, but is still in its backoff: a new session does not pin it.
    lab.fronts[0].set(Mode::Pass).await;
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "mtl-1");
}

#[tokio::test]
async fn retry_after_is_honoured_as_a_cool_down_not_an_ejection() {
    for (retry_after, hits_again) in [(Some(5), false), (None, true)] {
        let mut lab = Lab::start().await;
        let (events, listener) = recorder();
        let client = lab.client(listener);
        let mut s = client.session("sim-llama").await.unwrap();
        lab.fronts[0].set(Mode::Status { code: 429, retry_after }).await;
        s.chat(&request("turn 1")).await.unwrap();
        let before = lab.fronts[0].chats();
        s.chat(&request("turn 2")).await.unwrap();
        let again = lab.fronts[0].chats() > before;
        assert_eq!(again, hits_again, "Retry-After {retry_after:?}");
        assert_eq!(s.pinned().id, "tor-1", "still the session's node");
        assert!(!saw(&events, |e| matches!(e, Event::Ejected { .. })));
    }
}

#[tokio::test]
async fn a_persistently_better_standby_takes_the_session_between_turns_not_before() {
    let mut lab = Lab::start().await;
    let (events, listener) = recorder();
    let base = ClientConfig {
        reprobe_interval: Duration::from_millis(50),
        probe_deadline: Duration::from_millis(500),
        ..ClientConfig::default()
    };
    let client = lab.client_with(listener, base);
    let mut s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    // tor-1's path gets congested: 80 ms on every answer.
    lab.fronts[0].set(Mode::Delay(Duration::from_millis(80))).await;
    let mut moved_at = None;
    for turn in 1..=6 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        s.chat(&request(&format!("turn {turn}"))).await.unwrap();
        if moved_at.is_none() && s.pinned().id == "mtl-1" {
            moved_at = Some(turn);
        }
    }
    // Three consecutive re-probes must agree before the session moves.
    assert_eq!(moved_at, Some(3), "moved on turn {moved_at:?}");
    assert!(saw(
        &events,
        |e| matches!(e, Event::Migrated { from, to, .. } if from == "tor-1" && to == "mtl-1")
    ));
}

/// Whether any recorded event satisfies `pred`.
fn saw(events: &Mutex<Vec<Event>>, pred: impl Fn(&Event) -> bool) -> bool {
    events.lock().unwrap().iter().any(pred)
}
