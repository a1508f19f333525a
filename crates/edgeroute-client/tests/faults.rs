//! Fault scenarios, deterministic: simulator nodes, a discovery stub and the SDK run on an
//! in-memory network (`edgeroute_lab::memnet`) under tokio's paused clock. No sockets, no real
//! waiting: every duration asserted below is exact virtual time, and every run is the same run.
//!
//! Each node sits behind an HTTP fault layer the test scripts (429 with and without
//! `Retry-After`, persistent 503, a 400, a malformed chunk or a missing `[DONE]` after N
//! events, a late first byte, a congested path) and a link the test can refuse, reset, silence
//! or cut; the simulator's own faults cut or stall a stream after N tokens. The text the
//! caller receives is checked against the simulator's deterministic answer.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use edgeroute_client::{Client, ClientConfig, ClientError, Event, Listener};
use edgeroute_lab::fleet::{FleetBackend, FleetSpec, NodeSpec};
use edgeroute_lab::memnet::{Fault, MemNet};
use edgeroute_proto::discovery::{Candidate, DiscoverResponse};
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use futures_util::StreamExt as _;
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;

/// What a node's HTTP front does to chat requests (probes pass, except under `Delay`).
#[derive(Debug, Clone, PartialEq)]
enum Http {
    Pass,
    Status {
        code: u16,
        retry_after: Option<u32>,
        body: &'static str,
    },
    MalformedAfter(usize),
    NoDoneAfter(usize),
    /// The chat answer's first byte is this late.
    FirstByteLate(Duration),
    /// Every answer, probes included, is this late: a congested path.
    Delay(Duration),
}

struct Front {
    mode: Mutex<Http>,
    chats: AtomicUsize,
}

async fn front(State(f): State<Arc<Front>>, req: Request, next: Next) -> Response {
    let chat = req.uri().path() == "/v1/chat/completions";
    if chat {
        f.chats.fetch_add(1, Ordering::SeqCst);
    }
    let mode = f.mode.lock().unwrap().clone();
    match mode {
        Http::Delay(d) => {
            tokio::time::sleep(d).await;
            next.run(req).await
        }
        Http::FirstByteLate(d) if chat => {
            tokio::time::sleep(d).await;
            next.run(req).await
        }
        Http::Status { code, retry_after, body } if chat => {
            let mut b = Response::builder().status(code).header("content-type", "application/json");
            if let Some(s) = retry_after {
                b = b.header("retry-after", s.to_string());
            }
            b.body(Body::from(body)).unwrap()
        }
        Http::MalformedAfter(n) | Http::NoDoneAfter(n) if chat => {
            let malformed = matches!(mode, Http::MalformedAfter(_));
            let (parts, body) = next.run(req).await.into_parts();
            Response::from_parts(parts, Body::from_stream(misbehave(body, n, malformed)))
        }
        _ => next.run(req).await,
    }
}

/// Passes `n` SSE events through, then sends a malformed event and stays open, or just ends.
fn misbehave(
    body: Body,
    n: usize,
    malformed: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    let events = body.into_data_stream().map(|r| r.unwrap_or_default()).flat_map(|chunk| {
        let mut out = Vec::new();
        for ev in chunk.split_inclusive(|b| *b == b'\n') {
            out.push(Bytes::copy_from_slice(ev));
        }
        futures_util::stream::iter(out)
    });
    // Lines → events: an event ends at an empty line.
    let mut seen = 0usize;
    let mut stop = false;
    events
        .take_while(move |line| {
            if stop {
                return std::future::ready(false);
            }
            if line.as_ref() == b"\n" {
                seen += 1;
                stop = seen >= n;
            }
            std::future::ready(true)
        })
        .map(Ok)
        .chain(futures_util::stream::iter(
            malformed.then(|| Ok(Bytes::from_static(b"data: {\"id\": tru\n\n"))),
        ))
        .chain(futures_util::stream::once(async move {
            if malformed {
                std::future::pending::<()>().await;
            }
            Ok(Bytes::new())
        }))
}

struct LabNode {
    router: axum::Router,
    /// The admin plane (an unauthenticated node serves no admin route on its public router).
    admin: axum::Router,
    front: Arc<Front>,
    _node: edgeroute_node::Node,
    server: tokio::task::JoinHandle<()>,
}

/// Toronto's client view: `tor-1` 4 ms round trip and fast, `mtl-1` 10 ms and slower (one-way
/// delays in whole milliseconds: tokio's timers tick in milliseconds).
const FLEET: [(&str, &str, u64, u64); 2] =
    [("tor-1", "toronto", 5, 2), ("mtl-1", "montreal", 40, 5)];

struct Lab {
    net: MemNet,
    nodes: HashMap<&'static str, LabNode>,
    events: Arc<Mutex<Vec<Event>>>,
}

const DISCOVERY: &str = "discovery";

impl Lab {
    async fn start() -> Lab {
        Lab::with_fleet(&FLEET).await
    }

    /// Nodes (id, region, first token ms, one-way delay ms), listed by discovery in this order.
    async fn with_fleet(fleet: &[(&'static str, &'static str, u64, u64)]) -> Lab {
        let net = MemNet::new();
        let mut nodes = HashMap::new();
        let mut candidates = Vec::new();
        let spec = FleetSpec {
            nodes: fleet
                .iter()
                .map(|&(id, region, ttft, _)| NodeSpec::new(id, region, ttft))
                .collect(),
            backend: FleetBackend::Sim {
                tokens_per_s: 100.0,
                prefill_us_per_token: 0,
                spare_gpu: false,
            },
            ..FleetSpec::open()
        };
        for (i, &(id, region, ttft, one_way_ms)) in fleet.iter().enumerate() {
            let node = edgeroute_node::Node::build(spec.node_config(i, None)).unwrap();
            let router = node.router();
            for _ in 0..6 {
                call(&router, "POST", "/v1/chat/completions", &body("warm up", 2, false)).await;
            }
            let f = Arc::new(Front { mode: Mutex::new(Http::Pass), chats: AtomicUsize::new(0) });
            let app = router.clone().layer(axum::middleware::from_fn_with_state(f.clone(), front));
            let listener = net.bind(id);
            net.set_delay(id, Duration::from_millis(one_way_ms));
            let server = tokio::spawn(edgeroute_http::serve(
                listener,
                app,
                edgeroute_http::ServerLimits::default(),
                None,
                std::future::pending(),
            ));
            candidates.push(Candidate {
                id: id.into(),
                region: region.into(),
                url: format!("http://{id}"),
                health: "ready".into(),
                models: vec!["sim-llama".into()],
                queue_depth: 0,
                in_flight: 0,
                capacity: 4,
                ttft_p50_ms: ttft as f64,
                ttft_p99_ms: ttft as f64,
                error_rate: 0.0,
                cost_per_1k: 0.0,
                score_ms: ttft as f64 + i as f64,
                serve_as: None,
                pool: None,
            });
            let admin = node.admin_router();
            nodes.insert(id, LabNode { router, admin, front: f, _node: node, server });
        }
        let answer = DiscoverResponse {
            model: "sim-llama".into(),
            pipeline: None,
            strategy: "latency".into(),
            regions: vec![],
            ttl_ms: 100,
            stale_ok_ms: 600_000,
            generation: 1,
            generated_at_ms: 0,
            replica: "stub".into(),
            candidates,
            reason: None,
            policy: None,
        };
        let discovery = axum::Router::new().route(
            "/v1/discover",
            axum::routing::get(move || std::future::ready(axum::Json(answer.clone()))),
        );
        tokio::spawn(edgeroute_http::serve(
            net.bind(DISCOVERY),
            discovery,
            edgeroute_http::ServerLimits::default(),
            None,
            std::future::pending(),
        ));
        Lab { net, nodes, events: Arc::new(Mutex::new(Vec::new())) }
    }

    fn config(&self) -> ClientConfig {
        ClientConfig {
            discovery: vec![format!("http://{DISCOVERY}")],
            seed: Some(1),
            first_token_timeout: Duration::from_millis(800),
            hedge_initial: Duration::from_millis(300),
            stall_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            ..ClientConfig::default()
        }
    }

    fn client(&self) -> Client {
        self.client_with(self.config())
    }

    fn client_with(&self, cfg: ClientConfig) -> Client {
        let e = self.events.clone();
        let listener: Listener = Arc::new(move |ev: &Event| e.lock().unwrap().push(ev.clone()));
        Client::with_transport(cfg, Some(listener), Arc::new(self.net.clone())).unwrap()
    }

    fn http(&self, id: &str, mode: Http) {
        *self.nodes[id].front.mode.lock().unwrap() = mode;
    }

    fn chats(&self, id: &str) -> usize {
        self.nodes[id].front.chats.load(Ordering::SeqCst)
    }

    /// Sets simulator faults on a node (its admin API, in process).
    async fn sim_faults(&self, id: &str, json: &str) {
        let (status, b) = call(&self.nodes[id].admin, "PUT", "/admin/faults", json).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    }

    /// The node's process dies: its server stops and its address refuses connections.
    fn kill(&self, id: &str) {
        self.nodes[id].server.abort();
        self.net.set_fault(id, Fault::Refuse);
    }

    /// What an unfaulted node answers (the simulator's text depends only on the prompt).
    async fn reference(&self, text: &str, max_tokens: u32) -> String {
        let (_, b) = call(
            &self.nodes["mtl-1"].router,
            "POST",
            "/v1/chat/completions",
            &body(text, max_tokens, false),
        )
        .await;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        v["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
    }

    fn saw(&self, pred: impl Fn(&Event) -> bool) -> bool {
        self.events.lock().unwrap().iter().any(pred)
    }
}

fn body(text: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({"model": "sim-llama", "max_tokens": max_tokens, "stream": stream,
                       "messages": [{"role": "user", "content": text}]})
    .to_string()
}

async fn call(router: &axum::Router, method: &str, path: &str, body: &str) -> (u16, Bytes) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    (status, res.into_body().collect().await.unwrap().to_bytes())
}

fn request(text: &str, max_tokens: u32) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new("sim-llama", vec![ChatMessage::new(Role::User, text)]);
    r.max_tokens = Some(max_tokens);
    r
}

const PROMPT: &str = "what should I pack for Vancouver";

/// One turn on a session pinned to `tor-1` after `fault` was applied: checks the caller got
/// the simulator's whole answer; returns how long the turn took and where the session lives
/// on the next turn.
async fn turn(lab: &Lab, fault: impl FnOnce(&Lab), stream: bool) -> (Duration, String) {
    let want = lab.reference(PROMPT, 30).await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    fault(lab);
    let t = Instant::now();
    let got = if stream {
        s.chat_stream(&request(PROMPT, 30)).await.unwrap().text().await.unwrap()
    } else {
        match s.chat(&request(PROMPT, 30)).await {
            Ok(c) => c.choices[0].message.content.clone().unwrap(),
            Err(e) => panic!("{e}: {:#?} at {:?}", lab.events.lock().unwrap(), t.elapsed()),
        }
    };
    let took = t.elapsed();
    assert_eq!(got, want, "the caller gets the simulator's answer, whole, once");
    s.chat(&request("and the next turn", 4)).await.unwrap();
    (took, s.pinned().id.clone())
}

const RTT_TOR: u64 = 4;
/// The SDK's default hedge floor, ms.
const HEDGE_MIN: u64 = 40;
const RTT_MTL: u64 = 10;
/// The simulator's time per token after the first.
const TOKEN: Duration = Duration::from_millis(10);

#[tokio::test(start_paused = true)]
async fn the_session_pins_the_nearest_fast_node_and_a_turn_costs_its_rtt_plus_generation() {
    let lab = Lab::start().await;
    let (took, pinned) = turn(&lab, |_| {}, false).await;
    assert_eq!(pinned, "tor-1");
    // 4 ms round trip + 5 ms first token + 29 more tokens at 10 ms, on a warm connection.
    assert_eq!(took, Duration::from_millis(RTT_TOR + 5) + 29 * TOKEN);
}

#[tokio::test(start_paused = true)]
async fn status_429_with_retry_after_moves_the_request_without_ejecting_the_node() {
    let lab = Lab::start().await;
    let busy =
        r#"{"error":{"message":"busy","type":"rate_limit_error","param":null,"code":"busy"}}"#;
    let fault =
        |l: &Lab| l.http("tor-1", Http::Status { code: 429, retry_after: Some(2), body: busy });
    let (_, pinned) = turn(&lab, fault, false).await;
    assert_eq!(pinned, "tor-1", "a busy node keeps the session");
    assert!(!lab.saw(|e| matches!(e, Event::Ejected { .. } | Event::Failover { .. })));
}

#[tokio::test(start_paused = true)]
async fn status_429_without_retry_after_is_slowness_too() {
    let lab = Lab::start().await;
    let busy =
        r#"{"error":{"message":"busy","type":"rate_limit_error","param":null,"code":"busy"}}"#;
    let fault =
        |l: &Lab| l.http("tor-1", Http::Status { code: 429, retry_after: None, body: busy });
    let (_, pinned) = turn(&lab, fault, true).await;
    assert_eq!(pinned, "tor-1");
    assert!(!lab.saw(|e| matches!(e, Event::Ejected { .. })));
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_as_a_cool_down_not_an_ejection() {
    for (retry_after, hits_again) in [(Some(5), false), (None, true)] {
        let lab = Lab::start().await;
        let client = lab.client();
        let s = client.session("sim-llama").await.unwrap();
        let busy =
            r#"{"error":{"message":"busy","type":"rate_limit_error","param":null,"code":null}}"#;
        lab.http("tor-1", Http::Status { code: 429, retry_after, body: busy });
        s.chat(&request("turn 1", 4)).await.unwrap();
        let before = lab.chats("tor-1");
        s.chat(&request("turn 2", 4)).await.unwrap();
        assert_eq!(lab.chats("tor-1") > before, hits_again, "Retry-After {retry_after:?}");
        assert_eq!(s.pinned().id, "tor-1", "still the session's node");
        assert!(!lab.saw(|e| matches!(e, Event::Ejected { .. })));
    }
}

#[tokio::test(start_paused = true)]
async fn persistent_503_is_routed_around_on_every_turn() {
    let lab = Lab::start().await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    let full = r#"{"error":{"message":"full","type":"overloaded_error","param":null,"code":null}}"#;
    lab.http("tor-1", Http::Status { code: 503, retry_after: Some(1), body: full });
    let before = lab.chats("mtl-1");
    for i in 0..4 {
        s.chat(&request(&format!("turn {i}"), 4)).await.unwrap();
    }
    assert_eq!(lab.chats("mtl-1") - before, 4, "every turn was answered by mtl-1");
    assert!(!lab.saw(|e| matches!(e, Event::Ejected { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_400_context_length_error_is_returned_as_is_never_retried_never_held_against_the_node() {
    let lab = Lab::start().await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    let too_long = r#"{"error":{"message":"This model's maximum context length is 2048 tokens","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    lab.http("tor-1", Http::Status { code: 400, retry_after: None, body: too_long });
    let before = lab.chats("mtl-1");
    match s.chat(&request("a very long prompt", 4)).await {
        Err(ClientError::Api { node, status, body }) => {
            assert_eq!((node.as_str(), status, body.as_str()), ("tor-1", 400, too_long));
        }
        other => panic!("expected the node's 400, got {other:?}"),
    }
    assert!(s.chat_stream(&request("again, streamed", 4)).await.is_err());
    assert_eq!(lab.chats("mtl-1"), before, "never retried elsewhere");
    lab.http("tor-1", Http::Pass);
    s.chat(&request("a short one", 4)).await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    assert!(!lab.saw(|e| matches!(e, Event::Ejected { .. } | Event::Failover { .. })));
}

#[tokio::test(start_paused = true)]
async fn connection_refused_fails_over_at_once() {
    let lab = Lab::start().await;
    let (took, pinned) = turn(&lab, |l| l.kill("tor-1"), false).await;
    assert_eq!(pinned, "mtl-1");
    assert!(lab.saw(
        |e| matches!(e, Event::Failover { from, to, .. } if from == "tor-1" && to == "mtl-1")
    ));
    // The refusal costs nothing: mtl-1's round trip (on its warm standby connection) plus
    // its answer.
    assert_eq!(took, Duration::from_millis(RTT_MTL + 40) + 29 * TOKEN);
}

#[tokio::test(start_paused = true)]
async fn reset_before_headers_fails_over_at_once() {
    let lab = Lab::start().await;
    let (took, pinned) =
        turn(&lab, |l| l.net.set_fault("tor-1", Fault::ResetBeforeHeaders), false).await;
    assert_eq!(pinned, "mtl-1");
    assert!(lab.saw(|e| matches!(e, Event::Failover { .. })));
    assert_eq!(took, Duration::from_millis(RTT_MTL + 40) + 29 * TOKEN);
}

#[tokio::test(start_paused = true)]
async fn accept_then_silence_is_hedged_at_the_deadline() {
    let lab = Lab::start().await;
    let (took, pinned) = turn(&lab, |l| l.net.set_fault("tor-1", Fault::Silence), true).await;
    assert_eq!(pinned, "mtl-1");
    // tor-1's own first token is ~10 ms (its probe): the deadline is twice that, floored at
    // `hedge_min` (40 ms) — not the fleet-wide 300 ms of `hedge_initial`.
    assert!(lab.saw(|e| matches!(e, Event::Hedged { after_ms: HEDGE_MIN, .. })));
    assert_eq!(took, Duration::from_millis(HEDGE_MIN + RTT_MTL + 40) + 29 * TOKEN);
}

#[tokio::test(start_paused = true)]
async fn accept_then_silence_on_a_json_request_moves_it_after_the_request_timeout() {
    let lab = Lab::start().await;
    let (took, pinned) = turn(&lab, |l| l.net.set_fault("tor-1", Fault::Silence), false).await;
    assert_eq!(pinned, "mtl-1");
    assert_eq!(took, Duration::from_secs(2) + Duration::from_millis(RTT_MTL + 40) + 29 * TOKEN);
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_holds_a_json_request_only_for_a_multiple_of_its_usual_answer_time() {
    let lab = Lab::start().await;
    let want = lab.reference(PROMPT, 30).await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    // Five JSON answers of 30 tokens teach the client tor-1's answer time: RTT + 5 ms first
    // token + 29 tokens.
    for _ in 0..5 {
        s.chat(&request(PROMPT, 30)).await.unwrap();
    }
    let usual = Duration::from_millis(RTT_TOR + 5) + 29 * TOKEN;
    // tor-1 accepts the next request and says nothing for ten seconds.
    lab.http("tor-1", Http::FirstByteLate(Duration::from_secs(10)));
    let t = Instant::now();
    let c = s.chat(&request(PROMPT, 30)).await.unwrap();
    assert_eq!(c.choices[0].message.content.as_deref(), Some(want.as_str()));
    // Hedged at twice the usual answer (not the 2 s request timeout), then mtl-1's answer.
    let hedged_after = lab.events.lock().unwrap().iter().find_map(|e| match e {
        Event::Hedged { from, after_ms, .. } if from == "tor-1" => Some(*after_ms),
        _ => None,
    });
    let Some(hedged_after) = hedged_after else {
        panic!("not hedged after {:?}: {:#?}", t.elapsed(), lab.events.lock().unwrap())
    };
    let hedged_after = Duration::from_millis(hedged_after);
    assert!(hedged_after >= usual * 2 && hedged_after < usual * 2 + Duration::from_millis(20));
    assert_eq!(t.elapsed(), hedged_after + Duration::from_millis(RTT_MTL + 40) + 29 * TOKEN);
    assert_eq!(s.pinned().id, "mtl-1", "the hedge won: the session follows it");
}

#[tokio::test(start_paused = true)]
async fn a_slow_first_token_is_hedged_the_first_token_wins_and_the_loser_is_cancelled() {
    let lab = Lab::start().await;
    let fault = |l: &Lab| l.http("tor-1", Http::FirstByteLate(Duration::from_millis(900)));
    let (took, _) = turn(&lab, fault, true).await;
    assert!(
        lab.saw(
            |e| matches!(e, Event::Hedged { from, to, .. } if from == "tor-1" && to == "mtl-1")
        )
    );
    assert_eq!(
        took,
        Duration::from_millis(HEDGE_MIN + RTT_MTL + 40) + 29 * TOKEN,
        "mtl-1 won the race"
    );
    // The loser's request was cancelled: nothing is left in flight on tor-1.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, h) = call(&lab.nodes["tor-1"].router, "GET", "/health", "").await;
    let h: serde_json::Value = serde_json::from_slice(&h).unwrap();
    assert_eq!(h["in_flight"], 0, "{h}");
}

#[tokio::test(start_paused = true)]
async fn a_stream_cut_after_n_tokens_is_continued_with_no_token_lost_or_repeated() {
    let lab = Lab::start().await;
    let want = lab.reference(PROMPT, 30).await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    lab.sim_faults("tor-1", r#"{"cut_after_tokens": 7}"#).await;
    let mut stream = s.chat_stream(&request(PROMPT, 30)).await.unwrap();
    let mut chunks = Vec::new();
    let mut finishes = 0;
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        for ch in &c.choices {
            chunks.extend(ch.delta.content.clone());
            finishes += usize::from(ch.finish_reason.is_some());
        }
    }
    assert_eq!(chunks.concat(), want);
    assert_eq!(finishes, 1, "one finish for the whole answer");
    assert!(
        lab.saw(
            |e| matches!(e, Event::Failover { reason, .. } if reason.contains("after 7 tokens"))
        )
    );
}

#[tokio::test(start_paused = true)]
async fn a_stall_mid_stream_is_continued_after_exactly_the_stall_deadline() {
    let lab = Lab::start().await;
    let want = lab.reference(PROMPT, 30).await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    lab.sim_faults("tor-1", r#"{"stall_after_tokens": 10}"#).await;
    let t = Instant::now();
    let got = s.chat_stream(&request(PROMPT, 30)).await.unwrap().text().await.unwrap();
    assert_eq!(got, want);
    // 10 tokens from tor-1 (4 ms + 5 ms + 9 × 10 ms), 500 ms of silence, then the other 20
    // tokens from mtl-1 (10 ms + 40 ms + 19 × 10 ms).
    assert_eq!(t.elapsed(), Duration::from_millis(RTT_TOR + 5 + 90 + 500 + RTT_MTL + 40 + 190));
}

#[tokio::test(start_paused = true)]
async fn a_malformed_chunk_after_tokens_is_continued_elsewhere() {
    let lab = Lab::start().await;
    let (_, pinned) = turn(&lab, |l| l.http("tor-1", Http::MalformedAfter(6)), true).await;
    assert_eq!(pinned, "mtl-1");
    assert!(
        lab.saw(|e| matches!(e, Event::Failover { reason, .. } if reason.contains("malformed")))
    );
}

#[tokio::test(start_paused = true)]
async fn a_stream_without_done_is_continued_elsewhere() {
    let lab = Lab::start().await;
    let (_, pinned) = turn(&lab, |l| l.http("tor-1", Http::NoDoneAfter(6)), true).await;
    assert_eq!(pinned, "mtl-1");
    assert!(lab.saw(|e| matches!(e, Event::Failover { reason, .. } if reason.contains("[DONE]"))));
}

#[tokio::test(start_paused = true)]
async fn a_node_dying_mid_stream_costs_no_request_and_under_a_second_of_dead_air() {
    let lab = Lab::start().await;
    let want = lab.reference(PROMPT, 30).await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    let mut stream = s.chat_stream(&request(PROMPT, 30)).await.unwrap();
    let mut text = String::new();
    let mut last = Instant::now();
    let mut worst_gap = Duration::ZERO;
    let mut n = 0;
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        let now = Instant::now();
        worst_gap = worst_gap.max(now - last);
        last = now;
        for ch in &c.choices {
            text.push_str(ch.delta.content.as_deref().unwrap_or(""));
        }
        n += 1;
        if n == 8 {
            lab.kill("tor-1");
        }
    }
    assert_eq!(text, want, "no request failed, no token lost or repeated");
    // The cut is seen at once (the connection closes); the continuation's first token comes
    // after mtl-1's round trip and first token.
    assert_eq!(worst_gap, Duration::from_millis(RTT_MTL + 40));
}

#[tokio::test(start_paused = true)]
async fn a_flapping_node_is_ejected_with_backoff_and_sessions_avoid_it() {
    let lab = Lab::start().await;
    let client = lab.client();
    let a = client.session("sim-llama").await.unwrap();
    let b = client.session("sim-llama").await.unwrap();
    assert_eq!((a.pinned().id.as_str(), b.pinned().id.as_str()), ("tor-1", "tor-1"));
    lab.net.set_fault("tor-1", Fault::ResetBeforeHeaders);
    for s in [&a, &b] {
        s.chat(&request("hello", 4)).await.unwrap();
        assert_eq!(s.pinned().id, "mtl-1");
    }
    assert!(
        lab.saw(|e| matches!(e, Event::Ejected { node, .. } if node == "tor-1")),
        "{:#?}",
        lab.events.lock().unwrap()
    );
    // It comes back, but is still in its backoff: a new session does not pin it...
    lab.net.set_fault("tor-1", Fault::None);
    assert_eq!(client.session("sim-llama").await.unwrap().pinned().id, "mtl-1");
    // ...and once the backoff is over, it is a candidate again.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(client.session("sim-llama").await.unwrap().pinned().id, "tor-1");
}

#[tokio::test(start_paused = true)]
async fn a_node_another_client_ejected_is_left_before_the_turn_with_no_failover() {
    // Issue 16: a router replica is told another replica ejected tor-1 (which is dead by now).
    // Its session pinned there moves before its turn, tor-1 is never tried, and no failover
    // is counted: nothing failed here.
    let lab = Lab::start().await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    s.chat(&request("hello", 4)).await.unwrap();
    lab.kill("tor-1");
    let until = edgeroute_core::clock::unix_ms() + 10_000;
    assert!(client.apply_remote_ejection("tor-1", until));
    let (before, tried) = (client.stats(), lab.chats("tor-1"));
    s.chat(&request("hello again", 4)).await.unwrap();
    assert_eq!(s.pinned().id, "mtl-1");
    assert_eq!(lab.chats("tor-1"), tried, "tor-1 was not tried");
    let after = client.stats();
    assert_eq!(after.failovers, before.failovers, "{:#?}", lab.events.lock().unwrap());
    assert_eq!(after.migrations, before.migrations + 1, "a planned move");
    assert!(lab.saw(|e| matches!(e, Event::Migrated { from, to, reason }
        if from == "tor-1" && to == "mtl-1" && reason.contains("another client"))));
    assert!(client.is_ejected("tor-1"), "mtl-1 serving leaves tor-1's remote ejection as is");
}

#[tokio::test(start_paused = true)]
async fn a_drained_node_moves_the_session_between_turns_with_its_migrate_hint() {
    let lab = Lab::start().await;
    let client = lab.client();
    let s = client.session("sim-llama").await.unwrap();
    s.chat(&request("turn 1", 4)).await.unwrap();
    let (status, b) = call(
        &lab.nodes["tor-1"].admin,
        "POST",
        "/admin/drain",
        r#"{"deadline_ms": 30000, "to": "mtl-1"}"#,
    )
    .await;
    assert!(status < 300, "{}", String::from_utf8_lossy(&b));
    // The known session is still served by the draining node, which hints the move...
    let before = lab.chats("tor-1");
    s.chat(&request("turn 2", 4)).await.unwrap();
    assert_eq!(lab.chats("tor-1") - before, 1);
    // ...and the next turn starts on mtl-1, on its warm connection.
    let before = lab.chats("mtl-1");
    s.chat(&request("turn 3", 4)).await.unwrap();
    assert_eq!(lab.chats("mtl-1") - before, 1);
    assert_eq!(s.pinned().id, "mtl-1");
    assert!(lab.saw(|e| matches!(e, Event::Migrated { from, .. } if from == "tor-1")));
}

#[tokio::test(start_paused = true)]
async fn a_persistently_better_standby_takes_the_session_between_turns_not_before() {
    let lab = Lab::start().await;
    let cfg = ClientConfig {
        reprobe_interval: Duration::from_millis(50),
        probe_deadline: Duration::from_millis(500),
        ..lab.config()
    };
    let client = lab.client_with(cfg);
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    lab.http("tor-1", Http::Delay(Duration::from_millis(80)));
    let mut moved_at = None;
    for turn in 1..=6 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        s.chat(&request(&format!("turn {turn}"), 4)).await.unwrap();
        if moved_at.is_none() && s.pinned().id == "mtl-1" {
            moved_at = Some(turn);
        }
    }
    // Re-probes run between turns, off the turn's path: each is weighed at the next turn, so
    // the third agreeing one moves the session before turn 4.
    assert_eq!(moved_at, Some(4), "three consecutive re-probes must agree before the move");
    assert!(lab.saw(
        |e| matches!(e, Event::Migrated { from, to, .. } if from == "tor-1" && to == "mtl-1")
    ));
}

#[tokio::test(start_paused = true)]
async fn discovery_down_at_start_and_for_the_whole_run_is_served_from_the_persisted_list() {
    let lab = Lab::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClientConfig { cache_file: Some(dir.path().join("lists.json")), ..lab.config() };
    lab.client_with(cfg.clone()).session("sim-llama").await.unwrap();
    lab.net.set_fault(DISCOVERY, Fault::Refuse);

    let want = lab.reference(PROMPT, 30).await;
    let client = lab.client_with(cfg);
    for i in 0..3 {
        let s = client.session("sim-llama").await.unwrap();
        assert_eq!(s.pinned().id, "tor-1", "session {i}");
        assert_eq!(s.chat_stream(&request(PROMPT, 30)).await.unwrap().text().await.unwrap(), want);
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    assert!(lab.saw(|e| matches!(e, Event::DiscoveryFailed { .. })));
    assert!(lab.saw(|e| matches!(e, Event::Discovered { cached: Some("stale"), .. })));

    // With no persisted list: a clear error, within the discovery timeout.
    let bare = lab.client();
    let t = Instant::now();
    assert!(matches!(bare.session("sim-llama").await, Err(ClientError::Discovery(_))));
    assert!(t.elapsed() <= Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn every_node_down_is_a_clear_error_at_once_and_attempts_stay_within_the_budget() {
    let lab = Lab::start().await;
    let client = lab.client();
    let mut sessions = Vec::new();
    for _ in 0..4 {
        sessions.push(client.session("sim-llama").await.unwrap());
    }
    lab.kill("tor-1");
    lab.kill("mtl-1");
    let before = client.stats();
    let t = Instant::now();
    for (i, s) in sessions.iter_mut().enumerate() {
        for turn in 0..25 {
            let err = s.chat(&request(&format!("{i}/{turn}"), 4)).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    ClientError::Exhausted(_)
                        | ClientError::BudgetSpent(_)
                        | ClientError::Discovery(_)
                        | ClientError::NoCandidates { .. }
                ),
                "{err}"
            );
        }
    }
    assert!(t.elapsed() < Duration::from_secs(1), "no hang: {:?}", t.elapsed());
    let after = client.stats();
    // 100 requests from one client: its budget is 10 % of them plus 1/s over a 10 s window,
    // 20 extra attempts in all; every further one was refused, not sent.
    let (retries, denied) =
        (after.retries - before.retries, after.retries_denied - before.retries_denied);
    assert_eq!(retries, 20, "{after:?}");
    assert!(denied > 0, "{after:?}");
}

#[tokio::test(start_paused = true)]
async fn a_later_session_uses_known_paths_and_does_not_wait_for_probes() {
    let lab = Lab::start().await;
    let client = lab.client();
    let t = Instant::now();
    let _first = client.session("sim-llama").await.unwrap();
    // Discovery (no delay on its host) and probes that only end when mtl-1's cannot win.
    let cold = t.elapsed();
    assert!(cold >= Duration::from_millis(RTT_TOR), "{cold:?}");
    let probes_before =
        lab.events.lock().unwrap().iter().filter(|e| matches!(e, Event::Probed { .. })).count();
    // Past probe_ttl (2 s), within path_ttl (30 s): the measured paths stand.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t = Instant::now();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO, "no probe in the session's start");
    assert_eq!(s.pinned().id, "tor-1");
    // ...and the probes are refreshed behind it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probes_after =
        lab.events.lock().unwrap().iter().filter(|e| matches!(e, Event::Probed { .. })).count();
    assert!(probes_after > probes_before, "{probes_before} → {probes_after}");
    // After a long quiet, probing again.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let t = Instant::now();
    let _s = client.session("sim-llama").await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(RTT_TOR), "{:?}", t.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_pinned_node_that_stops_answering_re_probes_is_left_before_the_next_turn() {
    let lab = Lab::start().await;
    let cfg = ClientConfig { reprobe_interval: Duration::from_millis(50), ..lab.config() };
    let client = lab.client_with(cfg);
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    s.chat(&request("turn 1", 4)).await.unwrap();
    // tor-1 falls off the network between turns; the next turn starts the re-probe (off the
    // turn's path), which finds it silent.
    lab.net.set_fault("tor-1", Fault::Blackhole);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let tor_before = lab.chats("tor-1");
    let _ = tokio::time::timeout(Duration::from_secs(5), s.chat(&request("turn 2", 4))).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    s.chat(&request("turn 3", 4)).await.unwrap();
    assert_eq!(s.pinned().id, "mtl-1");
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "turn 3 went straight to mtl-1: {:?}",
        t.elapsed()
    );
    assert_eq!(lab.chats("tor-1"), tor_before, "nothing reached the black hole");
    assert!(lab.saw(|e| matches!(e, Event::Failover { from, .. } if from == "tor-1")));
}

#[tokio::test(start_paused = true)]
async fn a_list_just_past_its_ttl_is_used_at_once_and_revalidated_behind() {
    let lab = Lab::start().await;
    lab.net.set_delay(DISCOVERY, Duration::from_millis(20));
    let client = lab.client();
    let discovered = |cached: Option<&'static str>| {
        lab.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Event::Discovered { cached: c, .. } if *c == cached))
            .count()
    };
    let t = Instant::now();
    client.discover("sim-llama").await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(40), "the first list: one round trip");
    // Past the answer's 100 ms ttl: no wait, and the list is asked for again behind.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = Instant::now();
    client.discover("sim-llama").await.unwrap();
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(discovered(Some("revalidating")), 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(discovered(None), 2, "revalidated in the background");
    // Long past (beyond ttl + 10 s): the caller waits for discovery again.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let t = Instant::now();
    client.discover("sim-llama").await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(40));
}

#[tokio::test(start_paused = true)]
async fn a_node_that_lost_a_hedge_and_misses_a_probe_is_ejected_for_every_session() {
    let lab = Lab::start().await;
    let client = lab.client();
    let a = client.session("sim-llama").await.unwrap();
    let b = client.session("sim-llama").await.unwrap();
    assert_eq!((a.pinned().id.as_str(), b.pinned().id.as_str()), ("tor-1", "tor-1"));
    a.chat(&request("warm", 2)).await.unwrap();
    b.chat(&request("warm", 2)).await.unwrap();
    // tor-1 falls off the network: a's next (streamed) turn waits out the first-token
    // deadline and is answered by the hedge on mtl-1; tor-1 is then probed, stays silent,
    // and is ejected.
    lab.net.set_fault("tor-1", Fault::Blackhole);
    let tor_before = lab.chats("tor-1");
    a.chat_stream(&request("turn", 2)).await.unwrap().text().await.unwrap();
    assert_eq!(a.pinned().id, "mtl-1");
    assert!(lab.saw(|e| matches!(e, Event::Hedged { from, .. } if from == "tor-1")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        lab.saw(|e| matches!(e, Event::Ejected { node, .. } if node == "tor-1")),
        "{:#?}",
        lab.events.lock().unwrap()
    );
    // b never waits on tor-1: it leaves before its turn and goes straight to mtl-1.
    let t = Instant::now();
    b.chat_stream(&request("turn", 2)).await.unwrap().text().await.unwrap();
    assert_eq!(b.pinned().id, "mtl-1");
    assert!(t.elapsed() < Duration::from_millis(100), "no hedge wait: {:?}", t.elapsed());
    assert_eq!(lab.chats("tor-1"), tor_before, "nothing else reached the black hole");
}

/// Counts the connections the SDK opens, per host.
struct Counting {
    net: MemNet,
    opened: Mutex<HashMap<String, usize>>,
}

impl edgeroute_client::Transport for Counting {
    fn connect(&self, uri: &http::Uri) -> edgeroute_client::ConnectFuture {
        let host = uri.host().unwrap_or_default().to_owned();
        *self.opened.lock().unwrap().entry(host).or_default() += 1;
        edgeroute_client::Transport::connect(&self.net, uri)
    }
}

#[tokio::test(start_paused = true)]
async fn two_turns_ten_seconds_apart_reuse_one_warm_connection() {
    let lab = Lab::start().await;
    let counting = Arc::new(Counting { net: lab.net.clone(), opened: Mutex::new(HashMap::new()) });
    // No re-probe between these turns: only the turns' own connections are counted.
    let cfg = ClientConfig { reprobe_interval: Duration::from_secs(60), ..lab.config() };
    let client = Client::with_transport(cfg, None, counting.clone()).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    s.chat_stream(&request(PROMPT, 4)).await.unwrap().text().await.unwrap();
    let after_first = counting.opened.lock().unwrap()["tor-1"];
    // A voice turn later: the node kept the idle connection (its header-read deadline only
    // starts with a request's first byte), and so did the client.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let t = Instant::now();
    s.chat_stream(&request(PROMPT, 4)).await.unwrap().text().await.unwrap();
    assert_eq!(counting.opened.lock().unwrap()["tor-1"], after_first, "no new connection");
    // No handshake in the turn: the first token costs one round trip plus the node's own time.
    assert_eq!(t.elapsed(), Duration::from_millis(RTT_TOR + 5) + 3 * TOKEN);
}

#[tokio::test(start_paused = true)]
async fn a_whole_region_going_dark_costs_no_turn_and_the_slowest_under_a_second() {
    // Toronto holds the two best nodes; discovery lists them first.
    let fleet = [
        ("tor-1", "toronto", 5, 2),
        ("tor-2", "toronto", 6, 2),
        ("mtl-1", "montreal", 40, 5),
        ("van-1", "vancouver", 30, 30),
    ];
    let lab = Lab::with_fleet(&fleet).await;
    let client = lab.client();
    let mut sessions = Vec::new();
    for _ in 0..6 {
        let s = client.session("sim-llama").await.unwrap();
        assert_eq!(s.pinned().region, "toronto");
        assert_ne!(s.standby().unwrap().region, "toronto", "the standby is out of region");
        s.chat_stream(&request(PROMPT, 4)).await.unwrap().text().await.unwrap();
        sessions.push(s);
    }
    // Every Toronto node goes silent at once (a region's network is gone).
    lab.net.set_fault("tor-1", Fault::Blackhole);
    lab.net.set_fault("tor-2", Fault::Blackhole);
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        for s in &sessions {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let t = Instant::now();
            let text = s.chat_stream(&request(PROMPT, 4)).await.unwrap().text().await.unwrap();
            assert!(!text.is_empty(), "round {round}");
            slowest = slowest.max(t.elapsed());
        }
    }
    assert!(slowest < Duration::from_secs(1), "the slowest turn took {slowest:?}");
    for s in &sessions {
        assert_ne!(s.pinned().region, "toronto");
    }
}
