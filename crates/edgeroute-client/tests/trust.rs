//! Where the bearer token goes (issue 14, "tokens go only where they should"): never over
//! plaintext `http://` to a host that is not loopback, never on a `/health` probe.
//!
//! Discovery (at `localhost`), a good node at a loopback address and a rogue node at a plaintext
//! private address run on the in-memory network (`edgeroute_lab::memnet`, hosts by name) under
//! tokio's paused clock. Every server records each request's `Authorization`, and the client's
//! transport records every connection it opens: a refusal is shown to happen before any
//! connection, so the token cannot have left. The rule reads only the URL, so the in-memory
//! network exercises exactly what a real one would.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use edgeroute_client::{Client, ClientConfig, ClientError, ConnectFuture, Transport};
use edgeroute_lab::memnet::MemNet;
use edgeroute_proto::chat::{AssistantMessage, ChatCompletion, Choice, FinishReason};
use edgeroute_proto::discovery::{Candidate, DiscoverResponse};
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};

const TOKEN: &str = "sdk-trust-secret-token";
/// A private address: plaintext there is readable by anyone on the path.
const ROGUE: &str = "10.255.255.1";
const GOOD: &str = "127.0.0.2";
const DISCOVERY: &str = "localhost";

/// One request a server saw: (server, path, Authorization).
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

async fn record(State((name, seen)): State<(String, Seen)>, req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    seen.lock().unwrap().push((name, req.uri().path().to_owned(), auth));
    next.run(req).await
}

fn answer() -> ChatCompletion {
    ChatCompletion {
        id: "chatcmpl-1".into(),
        object: "chat.completion".into(),
        created: 0,
        model: "m".into(),
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage { role: Role::Assistant, content: Some("hi".into()) },
            finish_reason: Some(FinishReason::Stop),
            logprobs: None,
        }],
        usage: None,
        system_fingerprint: None,
    }
}

/// A node that answers every probe and every chat.
fn node(name: &str, seen: &Seen) -> axum::Router {
    axum::Router::new()
        .route(
            "/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ready"})) }),
        )
        .route("/v1/chat/completions", axum::routing::post(|| async { axum::Json(answer()) }))
        .layer(axum::middleware::from_fn_with_state((name.to_owned(), seen.clone()), record))
}

fn cand(id: &str, url: &str, ttft: f64) -> Candidate {
    Candidate {
        id: id.into(),
        region: "r".into(),
        url: url.into(),
        health: "ready".into(),
        models: vec!["m".into()],
        queue_depth: 0,
        in_flight: 0,
        capacity: 4,
        ttft_p50_ms: ttft,
        ttft_p99_ms: ttft,
        error_rate: 0.0,
        cost_per_1k: 0.0,
        score_ms: ttft,
        serve_as: None,
        pool: None,
    }
}

/// A transport that writes down every connection before opening it.
#[derive(Clone)]
struct Recording {
    net: MemNet,
    connects: Arc<Mutex<Vec<String>>>,
}

impl Transport for Recording {
    fn connect(&self, uri: &http::Uri) -> ConnectFuture {
        self.connects.lock().unwrap().push(uri.host().unwrap_or("").to_owned());
        self.net.connect(uri)
    }
}

struct World {
    transport: Recording,
    seen: Seen,
}

fn serve(net: &MemNet, host: &str, app: axum::Router) {
    tokio::spawn(edgeroute_http::serve(
        net.bind(host),
        app,
        edgeroute_http::ServerLimits::default(),
        None,
        std::future::pending(),
    ));
}

/// Discovery lists `candidates`; the rogue (plaintext, private address, listed first and
/// faster) and the good node both serve and record.
fn world(candidates: Vec<Candidate>) -> World {
    let net = MemNet::new();
    let seen: Seen = Arc::default();
    serve(&net, ROGUE, node(ROGUE, &seen));
    serve(&net, GOOD, node(GOOD, &seen));
    net.set_delay(GOOD, Duration::from_millis(20));
    let answer = DiscoverResponse {
        model: "m".into(),
        pipeline: None,
        strategy: "latency".into(),
        regions: vec![],
        ttl_ms: 10_000,
        stale_ok_ms: 600_000,
        generation: 1,
        generated_at_ms: 0,
        replica: "stub".into(),
        candidates,
        reason: None,
        policy: None,
    };
    let discovery = axum::Router::new()
        .route(
            "/v1/discover",
            axum::routing::get(move || std::future::ready(axum::Json(answer.clone()))),
        )
        .layer(axum::middleware::from_fn_with_state((DISCOVERY.to_owned(), seen.clone()), record));
    serve(&net, DISCOVERY, discovery);
    World { transport: Recording { net: net.from("client"), connects: Arc::default() }, seen }
}

fn config() -> ClientConfig {
    ClientConfig {
        discovery: vec![format!("http://{DISCOVERY}")],
        token: Some(TOKEN.into()),
        seed: Some(7),
        ..ClientConfig::default()
    }
}

fn rogue_and_good() -> Vec<Candidate> {
    vec![cand(ROGUE, &format!("http://{ROGUE}"), 1.0), cand(GOOD, &format!("http://{GOOD}"), 50.0)]
}

fn request() -> ChatCompletionRequest {
    ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::User, "hello")])
}

impl World {
    fn client(&self, cfg: ClientConfig) -> Result<Client, ClientError> {
        Client::with_transport(cfg, None, Arc::new(self.transport.clone()))
    }

    fn connects(&self) -> Vec<String> {
        self.transport.connects.lock().unwrap().clone()
    }

    fn seen_by(&self, server: &str) -> Vec<(String, Option<String>)> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(s, _, _)| s == server)
            .map(|(_, p, a)| (p.clone(), a.clone()))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_plaintext_node_in_a_discovery_answer_is_skipped_and_never_sees_the_token() {
    let w = world(rogue_and_good());
    let client = w.client(config()).unwrap();
    let session = client.session("m").await.unwrap();
    assert_eq!(session.pinned().id, GOOD, "the rogue is no candidate: the next one serves");
    let answer = session.chat(&request()).await.unwrap();
    assert_eq!(answer.choices[0].message.content.as_deref(), Some("hi"));
    // Refused before connecting: no byte went to the rogue, so neither did the token.
    assert!(!w.connects().iter().any(|h| h == ROGUE), "connected to the rogue: {:?}", w.connects());
    assert_eq!(w.seen_by(ROGUE), vec![], "the rogue saw requests");
    // The good node and discovery got the token where it is due.
    let bearer = Some(format!("Bearer {TOKEN}"));
    assert!(w.seen_by(GOOD).contains(&("/v1/chat/completions".into(), bearer.clone())));
    assert!(w.seen_by(DISCOVERY).iter().all(|(_, a)| *a == bearer));
}

#[tokio::test(start_paused = true)]
async fn health_probes_carry_no_token() {
    let w = world(vec![cand(GOOD, &format!("http://{GOOD}"), 50.0)]);
    let client = w.client(config()).unwrap();
    client.session("m").await.unwrap();
    client.prepare("m").await.unwrap();
    let probes: Vec<_> = w.seen_by(GOOD).into_iter().filter(|(p, _)| p == "/health").collect();
    assert!(!probes.is_empty(), "the good node was probed");
    assert!(probes.iter().all(|(_, a)| a.is_none()), "a probe carried the token: {probes:?}");
}

#[tokio::test(start_paused = true)]
async fn a_list_of_only_plaintext_nodes_is_refused_with_the_reason() {
    let w = world(vec![cand(ROGUE, &format!("http://{ROGUE}:8000"), 1.0)]);
    let client = w.client(config()).unwrap();
    let err = client.session("m").await.err().unwrap();
    assert!(matches!(err, ClientError::NoCandidates { .. }), "{err}");
    assert!(err.to_string().contains("plaintext"), "the reason says why: {err}");
    assert!(!w.connects().iter().any(|h| h == ROGUE));
    assert_eq!(w.seen_by(ROGUE), vec![]);
}

#[tokio::test(start_paused = true)]
async fn a_plaintext_non_loopback_discovery_url_is_refused_before_connecting() {
    let w = world(rogue_and_good());
    for url in ["http://10.255.255.1:7070", "http://disc", "http://127.0.0.1.nip.io", "disc:7070"] {
        let cfg = ClientConfig { discovery: vec![url.into()], ..config() };
        match w.client(cfg) {
            Err(ClientError::PlaintextToken { url: u }) => assert_eq!(u, url),
            other => panic!("{url}: expected PlaintextToken, got {other:?}"),
        }
        // Built outside any transport too (TCP): refused as it is built, nothing dialled.
        let cfg = ClientConfig { discovery: vec![url.into()], ..config() };
        assert!(matches!(Client::new(cfg), Err(ClientError::PlaintextToken { .. })), "{url}");
    }
    assert_eq!(w.connects(), Vec::<String>::new());
    // What stays allowed: TLS anywhere, plaintext to loopback, no token at all, or an explicit
    // private-network opt-in.
    for url in [
        "https://disc",
        "http://127.0.0.1:7070",
        "http://127.9.9.9:7070",
        "http://localhost:7070",
        "http://LOCALHOST.:7070",
        "http://[::1]:7070",
    ] {
        let cfg = ClientConfig { discovery: vec![url.into()], ..config() };
        assert!(w.client(cfg).is_ok(), "{url}");
    }
    let plain = ClientConfig { discovery: vec!["http://disc".into()], ..config() };
    assert!(w.client(ClientConfig { token: None, ..plain.clone() }).is_ok());
    assert!(w.client(ClientConfig { allow_plaintext: true, ..plain }).is_ok());
}

#[tokio::test(start_paused = true)]
async fn allow_plaintext_sends_the_token_to_a_private_network_node() {
    let w = world(rogue_and_good());
    let client = w.client(ClientConfig { allow_plaintext: true, ..config() }).unwrap();
    let session = client.session("m").await.unwrap();
    assert_eq!(session.pinned().id, ROGUE, "opted in: the faster private node is used");
    session.chat(&request()).await.unwrap();
    assert!(
        w.seen_by(ROGUE)
            .contains(&("/v1/chat/completions".into(), Some(format!("Bearer {TOKEN}"))))
    );
}

#[tokio::test(start_paused = true)]
async fn a_persisted_list_naming_a_plaintext_node_is_not_trusted_either() {
    let dir = tempfile::tempdir().unwrap();
    let cache_file = Some(dir.path().join("lists.json"));
    let w = world(rogue_and_good());
    // A list written by a client without a token (or an older version) names the rogue.
    let open = ClientConfig { token: None, cache_file: cache_file.clone(), ..config() };
    w.client(open).unwrap().discover("m").await.unwrap();
    // Discovery is gone; the token-holding client starts from the persisted list.
    let cfg = ClientConfig { discovery: vec!["http://127.0.0.9".into()], cache_file, ..config() };
    let client = w.client(cfg).unwrap();
    let session = client.session("m").await.unwrap();
    assert_eq!(session.pinned().id, GOOD);
    session.chat(&request()).await.unwrap();
    assert!(
        w.seen_by(ROGUE).iter().all(|(_, a)| a.is_none()),
        "the rogue saw the token: {:?}",
        w.seen_by(ROGUE)
    );
}

#[test]
fn the_token_is_redacted_in_debug() {
    let cfg = ClientConfig { token: Some(TOKEN.into()), ..ClientConfig::default() };
    let shown = format!("{cfg:?} {cfg:#?}");
    assert!(!shown.contains(TOKEN), "{shown}");
    assert!(shown.contains("token"), "the field is still listed: {shown}");
    let client = Client::new(cfg).unwrap();
    assert!(!format!("{client:?}").contains(TOKEN));
}

/// A service acting for many tenants (the regional router) sends each caller's own token to
/// discovery and the nodes, never its own, and never a caller's over plaintext to a remote
/// host; each caller's list is asked for and cached apart.
#[tokio::test(start_paused = true)]
async fn a_session_as_a_caller_carries_that_callers_token_everywhere_it_goes() {
    let w = world(rogue_and_good());
    let client = w.client(ClientConfig { token: None, ..config() }).unwrap();
    for tenant in ["tenant-a-token", "tenant-b-token"] {
        let s = client.session_as("m", tenant).await.unwrap();
        assert_eq!(s.pinned().id, GOOD, "a caller's token is held to the plaintext rule too");
        s.chat(&request()).await.unwrap();
    }
    let bearer = |t: &str| Some(format!("Bearer {t}"));
    let chats: Vec<_> =
        w.seen_by(GOOD).into_iter().filter(|(p, _)| p == "/v1/chat/completions").collect();
    assert_eq!(chats.len(), 2);
    assert_eq!(chats[0].1, bearer("tenant-a-token"));
    assert_eq!(chats[1].1, bearer("tenant-b-token"));
    let asked: Vec<_> = w.seen_by(DISCOVERY).into_iter().map(|(_, a)| a).collect();
    assert_eq!(asked, [bearer("tenant-a-token"), bearer("tenant-b-token")], "one list per caller");
    assert!(!w.connects().iter().any(|h| h == ROGUE));
}
