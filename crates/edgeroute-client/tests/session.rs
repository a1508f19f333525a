//! The SDK against real simulator nodes and a discovery replica on loopback. Each node sits
//! behind a relay the test can cut (connections refused and reset: the node "dies").
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeroute_client::{Client, ClientConfig, ClientError, Event, Listener};
use edgeroute_discovery::config::ServingConfig;
use edgeroute_discovery::{Discovery, DiscoveryConfig};
use edgeroute_lab::fleet::{FleetBackend, FleetSpec, NodeSpec};
use edgeroute_lab::relay::Relay;
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use edgeroute_test_util::TestNode;

/// Three nodes (`tor-1` fast, `mtl-1` medium, `van-1` slow TTFT) at 2,000 tokens/s.
fn fleet() -> FleetSpec {
    let mut f = FleetSpec {
        nodes: vec![
            NodeSpec::new("tor-1", "toronto", 5),
            NodeSpec::new("mtl-1", "montreal", 40),
            NodeSpec::new("van-1", "vancouver", 90),
        ],
        backend: FleetBackend::Sim {
            tokens_per_s: 2000.0,
            prefill_us_per_token: 0,
            spare_gpu: false,
        },
        ..FleetSpec::open()
    };
    f.probe_ms = (200, 150);
    f
}

struct Fleet {
    nodes: Vec<TestNode>,
    relays: Vec<Relay>,
    discovery: Option<edgeroute_discovery::Spawned>,
    dir: std::path::PathBuf,
}

impl Fleet {
    /// Three nodes (`tor-1` fast, `mtl-1` medium, `van-1` slow TTFT), each warmed so it reports
    /// its own TTFT, behind relays, and a discovery replica that knows them.
    async fn start(tag: &str, serving: impl FnOnce(&mut ServingConfig)) -> Fleet {
        Fleet::start_with(tag, serving, |_| {}).await
    }

    /// As [`Fleet::start`], each node's configuration changed by `adjust` first.
    async fn start_with(
        tag: &str,
        serving: impl FnOnce(&mut ServingConfig),
        adjust: impl Fn(&mut edgeroute_node::config::NodeConfig),
    ) -> Fleet {
        let dir = std::env::temp_dir().join(format!("edgeroute-sdk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        let mut relays = Vec::new();
        let mut urls = Vec::new();
        let fleet = fleet();
        for i in 0..fleet.nodes.len() {
            let mut cfg = fleet.node_config(i, None);
            adjust(&mut cfg);
            let node = TestNode::start_config(cfg, None).await;
            let chat = serde_json::json!({"model": "sim-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).to_string();
            for _ in 0..6 {
                assert_eq!(node.chat(chat.clone()).await.status, 200);
            }
            let relay = Relay::start(node.addr).await.unwrap();
            urls.push(format!("http://{}", relay.addr()));
            nodes.push(node);
            relays.push(relay);
        }
        let mut cfg = fleet.static_discovery_config("toronto", &urls);
        serving(&mut cfg.serving);
        let d = Discovery::build(cfg).unwrap();
        let running = d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let addr = running.addr();
        let f = Fleet { nodes, relays, discovery: Some(running), dir };
        // Until discovery has verified all three.
        let t = std::time::Instant::now();
        loop {
            let r = edgeroute_test_util::get(addr, "/v1/discover?model=sim-llama&k=5", None).await;
            if r.json()["candidates"].as_array().is_some_and(|c| c.len() == 3) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "discovery never listed the fleet");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f
    }

    fn discovery_url(&self) -> String {
        format!("http://{}", self.discovery.as_ref().unwrap().addr())
    }

    fn stop_discovery(&mut self) {
        self.discovery = None;
    }

    fn node(&self, id: &str) -> &TestNode {
        let i = ["tor-1", "mtl-1", "van-1"].iter().position(|n| *n == id).unwrap();
        &self.nodes[i]
    }

    fn relay(&mut self, id: &str) -> &mut Relay {
        let i = ["tor-1", "mtl-1", "van-1"].iter().position(|n| *n == id).unwrap();
        &mut self.relays[i]
    }

    /// Chat requests a node has answered (its own telemetry).
    fn served(&self, id: &str) -> u64 {
        self.node(id).state.telemetry.figures().requests
    }

    fn config(&self) -> ClientConfig {
        ClientConfig {
            discovery: vec![self.discovery_url()],
            token: Some(self.nodes[0].token()),
            seed: Some(7),
            ..ClientConfig::default()
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_discovery();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(model: &str, text: &str) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new(model, vec![ChatMessage::new(Role::User, text)]);
    r.max_tokens = Some(8);
    r
}

fn recorder() -> (Arc<Mutex<Vec<Event>>>, Listener) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = events.clone();
    (events, Arc::new(move |ev: &Event| e.lock().unwrap().push(ev.clone())))
}

#[tokio::test]
async fn a_session_pins_the_fastest_node_and_talks_to_it_directly() {
    let fleet = Fleet::start("pin", |_| {}).await;
    let (events, listener) = recorder();
    let client = Client::with_listener(fleet.config(), Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    assert_eq!(s.standby().unwrap().id, "mtl-1");
    let before = fleet.served("tor-1");
    for i in 0..5 {
        let c = s.chat(&request("sim-llama", &format!("turn {i}"))).await.unwrap();
        assert!(!c.choices.is_empty());
    }
    assert_eq!(fleet.served("tor-1") - before, 5, "every turn went straight to the pinned node");
    let ev = events.lock().unwrap().clone();
    assert!(ev.iter().any(|e| matches!(e, Event::Probed { node, .. } if node == "tor-1")));
    assert!(ev.iter().any(|e| matches!(e, Event::Pinned { node, .. } if node == "tor-1")));
    assert!(!ev.iter().any(|e| matches!(e, Event::Failover { .. })));
}

#[tokio::test]
async fn a_dead_pinned_node_fails_over_to_the_standby_within_the_same_request() {
    let mut fleet = Fleet::start("dead", |_| {}).await;
    let (events, listener) = recorder();
    let client = Client::with_listener(fleet.config(), Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    s.chat(&request("sim-llama", "hello")).await.unwrap();
    fleet.relay("tor-1").cut();
    let t = std::time::Instant::now();
    let c = s.chat(&request("sim-llama", "still there?")).await.unwrap();
    assert!(!c.choices.is_empty());
    assert!(t.elapsed() < Duration::from_secs(1), "failover took {:?}", t.elapsed());
    assert_eq!(s.pinned().id, "mtl-1", "the session moved to the standby");
    let st = client.stats();
    assert_eq!((st.sessions, st.failovers, st.discoveries), (1, 1, 1), "{st:?}");
    assert!(st.probes >= 2);
    let ev = events.lock().unwrap().clone();
    assert!(ev.iter().any(
        |e| matches!(e, Event::Failover { from, to, .. } if from == "tor-1" && to == "mtl-1")
    ));
    // Later turns stay on the new node.
    let before = fleet.served("mtl-1");
    s.chat(&request("sim-llama", "and again")).await.unwrap();
    assert_eq!(fleet.served("mtl-1") - before, 1);
}

#[tokio::test]
async fn a_client_error_is_returned_as_is_and_never_retried_elsewhere() {
    let fleet = Fleet::start("4xx", |_| {}).await;
    let (events, listener) = recorder();
    let client = Client::with_listener(fleet.config(), Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    let before: Vec<u64> = ["tor-1", "mtl-1", "van-1"].iter().map(|n| fleet.served(n)).collect();
    let mut bad = request("sim-llama", "hi");
    bad.temperature = Some(5.0);
    let err = s.chat(&bad).await.unwrap_err();
    match err {
        ClientError::Api { node, status, .. } => {
            assert_eq!((node.as_str(), status), ("tor-1", 400))
        }
        other => panic!("expected the node's 400, got {other}"),
    }
    let after: Vec<u64> = ["tor-1", "mtl-1", "van-1"].iter().map(|n| fleet.served(n)).collect();
    assert_eq!(after[1..], before[1..], "no other node saw the request");
    assert_eq!(s.pinned().id, "tor-1", "a client error does not move the session");
    assert!(!saw(&events, |e| matches!(e, Event::Failover { .. } | Event::Ejected { .. })));
}

#[tokio::test]
async fn a_model_no_node_serves_is_a_404_after_one_rediscovery_and_blames_no_node() {
    let fleet = Fleet::start("nomodel", |_| {}).await;
    let (events, listener) = recorder();
    let client = Client::with_listener(fleet.config(), Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    let err = s.chat(&request("no-such-model", "hi")).await.unwrap_err();
    assert!(matches!(err, ClientError::NoCandidates { .. }), "{err}");
    assert_eq!(err.status(), 404);
    assert!(!err.retryable());
    assert!(!saw(&events, |e| matches!(e, Event::Ejected { .. })), "no node is blamed");
    // The session's own model is still served where it was.
    s.chat(&request("sim-llama", "still here?")).await.unwrap();
}

#[tokio::test]
async fn a_model_unloaded_under_a_pinned_session_costs_no_turn_and_new_sessions_avoid_the_node() {
    let fleet = Fleet::start("unload", |_| {}).await;
    let (events, listener) = recorder();
    let client = Client::with_listener(fleet.config(), Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    s.chat(&request("sim-llama", "turn 1")).await.unwrap();
    let r = fleet.node("tor-1").admin_post("/v1/models/unload", r#"{"model": "sim-llama"}"#).await;
    assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
    // The pinned session's next turns: answered (elsewhere), JSON and streamed.
    s.chat(&request("sim-llama", "turn 2")).await.unwrap();
    let text = s.chat_stream(&request("sim-llama", "turn 3")).await.unwrap().text().await.unwrap();
    assert!(!text.is_empty());
    assert_ne!(s.pinned().id, "tor-1", "the session left the node without the model");
    // A new session right after (the cached list still names tor-1): never pinned there.
    let fresh = client.session("sim-llama").await.unwrap();
    fresh.chat(&request("sim-llama", "hello")).await.unwrap();
    assert_ne!(fresh.pinned().id, "tor-1");
    assert!(saw(&events, |e| matches!(e, Event::PlacementMiss { node, .. } if node == "tor-1")
        || matches!(e, Event::Migrated { from, .. } if from == "tor-1")));
}

#[tokio::test]
async fn a_draining_node_moves_the_session_between_turns() {
    let fleet = Fleet::start("drain", |_| {}).await;
    let (events, listener) = recorder();
    let client = Client::with_listener(fleet.config(), Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    s.chat(&request("sim-llama", "turn 1")).await.unwrap();
    let r = fleet
        .node("tor-1")
        .admin_post("/admin/drain", r#"{"deadline_ms": 30000, "to": "mtl-1"}"#)
        .await;
    assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
    // The known session is still served by the draining node, with a migrate hint...
    let before = fleet.served("tor-1");
    s.chat(&request("sim-llama", "turn 2")).await.unwrap();
    assert_eq!(fleet.served("tor-1") - before, 1);
    // ...and the next turn starts on the standby.
    let before = fleet.served("mtl-1");
    s.chat(&request("sim-llama", "turn 3")).await.unwrap();
    assert_eq!(fleet.served("mtl-1") - before, 1);
    assert_eq!(s.pinned().id, "mtl-1");
    assert!(saw(&events, |e| matches!(e, Event::Migrated { from, .. } if from == "tor-1")));
}

#[tokio::test]
async fn with_discovery_down_a_new_client_starts_from_the_persisted_list() {
    // Short ttl so the persisted answer is stale (but within stale_ok) when reused.
    let mut fleet = Fleet::start("cache", |s| {
        s.ttl_ms = 100;
        s.stale_ok_ms = 60_000;
    })
    .await;
    let cache_file = fleet.dir.join("lists.json");
    // (No revalidation window: past its ttl the list is used only when discovery is down.)
    let cfg = ClientConfig {
        cache_file: Some(cache_file.clone()),
        discovery_revalidate: Duration::ZERO,
        ..fleet.config()
    };
    let first = Client::new(cfg.clone()).unwrap();
    first.session("sim-llama").await.unwrap();
    assert!(cache_file.exists());
    fleet.stop_discovery();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (events, listener) = recorder();
    let second = Client::with_listener(cfg, Some(listener)).unwrap();
    let s = second.session("sim-llama").await.unwrap();
    s.chat(&request("sim-llama", "hello")).await.unwrap();
    let ev = events.lock().unwrap().clone();
    assert!(ev.iter().any(|e| matches!(e, Event::DiscoveryFailed { .. })));
    assert!(ev.iter().any(|e| matches!(e, Event::Discovered { cached: Some("stale"), .. })));

    // Without a cache file and with discovery down: a clear error, at once.
    let bare =
        Client::new(ClientConfig { cache_file: None, ..fleet.config_without_discovery() }).unwrap();
    let t = std::time::Instant::now();
    assert!(matches!(bare.session("sim-llama").await, Err(ClientError::Discovery(_))));
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn every_node_down_is_a_clear_error_within_the_retry_budget() {
    let mut fleet = Fleet::start("alldown", |_| {}).await;
    let client = Client::new(fleet.config()).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    for id in ["tor-1", "mtl-1", "van-1"] {
        fleet.relay(id).cut();
    }
    let t = std::time::Instant::now();
    let err = s.chat(&request("sim-llama", "anyone?")).await.unwrap_err();
    assert!(matches!(err, ClientError::Exhausted(_) | ClientError::BudgetSpent(_)), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
}

impl Fleet {
    /// The same client settings pointing at a discovery address nothing listens on.
    fn config_without_discovery(&self) -> ClientConfig {
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        ClientConfig {
            discovery: vec![format!("http://{dead}")],
            token: Some(self.nodes[0].token()),
            seed: Some(7),
            ..ClientConfig::default()
        }
    }
}

/// Sets simulator faults on a node.
async fn faults(node: &TestNode, json: &str) {
    let r = edgeroute_test_util::client::method(
        node.addr,
        "PUT",
        "/admin/faults",
        Some(&node.admin_token()),
        json.to_owned(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// What an unfaulted node answers to `text` (the simulator is deterministic).
async fn reference(node: &TestNode, text: &str, max_tokens: u32) -> String {
    let body = serde_json::json!({"model": "sim-llama", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]});
    let r = node.chat(body.to_string()).await;
    r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
}

fn long_request(text: &str) -> ChatCompletionRequest {
    let mut r = request("sim-llama", text);
    r.max_tokens = Some(40);
    r
}

#[tokio::test]
async fn a_stream_cut_mid_answer_is_continued_on_the_standby_without_losing_or_repeating_a_token() {
    let fleet = Fleet::start("cut", |_| {}).await;
    let prompt = "tell me about the weather in Toronto";
    let want = reference(fleet.node("mtl-1"), prompt, 40).await;
    assert!(want.split(' ').count() > 10, "a long enough answer to cut: {want:?}");
    let (events, listener) = recorder();
    let client = Client::with_listener(fleet.config(), Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    faults(fleet.node("tor-1"), r#"{"cut_after_tokens": 5}"#).await;
    let got = s.chat_stream(&long_request(prompt)).await.unwrap().text().await.unwrap();
    assert_eq!(got, want, "one seamless answer");
    assert!(saw(
        &events,
        |e| matches!(e, Event::Failover { from, to, reason } if from == "tor-1" && to == "mtl-1" && reason.contains("mid-stream"))
    ));
    // The next turn starts where the stream ended up.
    s.chat(&request("sim-llama", "next turn")).await.unwrap();
    assert_eq!(s.pinned().id, "mtl-1");
}

#[tokio::test]
async fn a_stalled_stream_is_continued_after_the_stall_deadline() {
    let fleet = Fleet::start("stall", |_| {}).await;
    let prompt = "book a table for two";
    let want = reference(fleet.node("mtl-1"), prompt, 40).await;
    let cfg = ClientConfig { stall_timeout: Duration::from_millis(300), ..fleet.config() };
    let client = Client::new(cfg).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    faults(fleet.node("tor-1"), r#"{"stall_after_tokens": 4}"#).await;
    let t = std::time::Instant::now();
    let got = s.chat_stream(&long_request(prompt)).await.unwrap().text().await.unwrap();
    assert_eq!(got, want);
    assert!(t.elapsed() < Duration::from_millis(1500), "dead air: {:?}", t.elapsed());
}

#[tokio::test]
async fn a_first_token_that_never_comes_moves_the_request_before_the_caller_sees_anything() {
    let fleet = Fleet::start("ttft", |_| {}).await;
    let prompt = "translate good morning";
    let want = reference(fleet.node("mtl-1"), prompt, 40).await;
    let cfg = ClientConfig { first_token_timeout: Duration::from_millis(300), ..fleet.config() };
    let (events, listener) = recorder();
    let client = Client::with_listener(cfg, Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    faults(fleet.node("tor-1"), r#"{"stall_after_tokens": 0}"#).await;
    let got = s.chat_stream(&long_request(prompt)).await.unwrap().text().await.unwrap();
    assert_eq!(got, want);
    assert_eq!(s.pinned().id, "mtl-1");
    assert!(saw(&events, |e| matches!(e, Event::Failover { to, .. } if to == "mtl-1")));
}

#[tokio::test]
async fn a_late_first_token_is_hedged_on_the_standby_and_the_loser_is_cancelled() {
    let fleet = Fleet::start("hedge", |_| {}).await;
    let prompt = "what is on my calendar";
    let want = reference(fleet.node("mtl-1"), prompt, 40).await;
    let cfg = ClientConfig {
        first_token_timeout: Duration::from_secs(5),
        hedge_initial: Duration::from_millis(200),
        ..fleet.config()
    };
    let (events, listener) = recorder();
    let client = Client::with_listener(cfg, Some(listener)).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    faults(fleet.node("tor-1"), r#"{"stall_after_tokens": 0}"#).await;
    let t = std::time::Instant::now();
    let got = s.chat_stream(&long_request(prompt)).await.unwrap().text().await.unwrap();
    assert_eq!(got, want);
    assert!(t.elapsed() < Duration::from_millis(1500), "hedged answer took {:?}", t.elapsed());
    let hedged = saw(
        &events,
        // At the node's own deadline (a multiple of its probed first token), not the 200 ms
        // a node nothing is known of would get.
        |e| matches!(e, Event::Hedged { from, to, after_ms } if from == "tor-1" && to == "mtl-1" && *after_ms < 200),
    );
    assert!(hedged);
    assert_eq!(s.pinned().id, "mtl-1", "the hedge won: the session follows it");
    // The losing request was dropped: its slot on tor-1 is free again.
    let t = std::time::Instant::now();
    while fleet.node("tor-1").state.telemetry.in_flight() > 0 {
        assert!(t.elapsed() < Duration::from_secs(2), "the losing stream was never cancelled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tls_nodes_are_reached_over_https_with_a_private_ca() {
    let dir = std::env::temp_dir().join(format!("edgeroute-sdk-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("c.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("k.pem"), cert.signing_key.serialize_pem()).unwrap();
    let tls = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[backend]\nkind = \"sim\"\n",
        dir.join("c.pem").display(),
        dir.join("k.pem").display()
    );
    let node = TestNode::start_as("tls-1", "toronto", &tls, None).await;
    let toml = format!(
        "[discovery]\nallow_unauthenticated = true\n[probe]\ninterval_ms = 200\ntimeout_ms = 150\nca_file = \"{}\"\n[[nodes]]\nid = \"tls-1\"\nurl = \"https://localhost:{}\"\nregion = \"toronto\"\n",
        dir.join("c.pem").display(),
        node.addr.port()
    );
    let d = Discovery::build(DiscoveryConfig::from_toml(&toml, |_| None).unwrap()).unwrap();
    let running = d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let addr = running.addr();
    let cfg = ClientConfig {
        discovery: vec![format!("http://{addr}")],
        token: Some(node.token()),
        ca_file: Some(dir.join("c.pem")),
        ..ClientConfig::default()
    };
    let client = Client::new(cfg).unwrap();
    let s = common::session_when_ready(&client, "sim-llama").await;
    assert!(s.pinned().url.starts_with("https://"));
    s.chat(&request("sim-llama", "over TLS")).await.unwrap();
    drop(running);
    std::fs::remove_dir_all(dir).ok();
}

/// Whether any recorded event satisfies `pred`.
fn saw(events: &Mutex<Vec<Event>>, pred: impl Fn(&Event) -> bool) -> bool {
    events.lock().unwrap().iter().any(pred)
}

#[tokio::test]
async fn a_pipeline_session_pins_every_model_of_the_pipeline_to_one_node() {
    // tor-1 is fast but holds only the LLM; van-1 holds STT, LLM and TTS, each on its own GPU.
    let mut van = NodeSpec::new("van-1", "vancouver", 40);
    van.models = vec!["sim-whisper".into(), "sim-llama".into(), "sim-tts".into()];
    van.pipeline = true;
    let fleet = FleetSpec { nodes: vec![NodeSpec::new("tor-1", "toronto", 5), van], ..fleet() };
    let tor = TestNode::start_config(fleet.node_config(0, None), None).await;
    let van = TestNode::start_config(fleet.node_config(1, None), None).await;
    let urls = [format!("http://{}", tor.addr), format!("http://{}", van.addr)];
    let d = Discovery::build(fleet.static_discovery_config("toronto", &urls)).unwrap();
    let running = d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let cfg = ClientConfig {
        discovery: vec![format!("http://{}", running.addr())],
        token: Some(tor.token()),
        seed: Some(3),
        ..ClientConfig::default()
    };
    let client = Client::new(cfg).unwrap();
    // Until discovery verified both nodes.
    let t = std::time::Instant::now();
    while client.discover("sim-llama").await.map_or(0, |c| c.len()) < 2 {
        assert!(t.elapsed() < Duration::from_secs(5), "discovery never listed both nodes");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let plain = client.session("sim-llama").await.unwrap();
    assert_eq!(plain.pinned().id, "tor-1", "for the LLM alone, the faster node");
    let voice = client.pipeline_session("voice", "sim-llama").await.unwrap();
    assert_eq!(voice.pipeline(), Some("voice"));
    assert_eq!(voice.pinned().id, "van-1", "only van-1 holds the whole pipeline");
    // A voice turn: audio in, the LLM streamed, audio out — all on the pipeline's node.
    let samples: Vec<i16> = (0..32_000).map(|i| (i % 400) as i16 * 20 - 4000).collect();
    let audio = edgeroute_sim::audio::wav_file(16_000, &samples);
    let mut form = b"--b0\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nsim-whisper\r\n--b0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.wav\"\r\nContent-Type: audio/wav\r\n\r\n".to_vec();
    form.extend_from_slice(&audio);
    form.extend_from_slice(b"\r\n--b0--\r\n");
    let stt = edgeroute_client::RawRequest {
        model: "sim-whisper".into(),
        path: "/v1/audio/transcriptions".into(),
        content_type: "multipart/form-data; boundary=b0".into(),
        body: form.into(),
    };
    let (heard, served) = voice.call(&stt).await.unwrap();
    assert_eq!(heard.status, 200, "{}", String::from_utf8_lossy(&heard.body));
    assert_eq!(served.node.id, "van-1");
    let text = serde_json::from_slice::<serde_json::Value>(&heard.body).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut stream = voice.chat_stream(&request("sim-llama", &text)).await.unwrap();
    assert_eq!(stream.served().node.id, "van-1");
    let mut answer = String::new();
    while let Some(c) = stream.next().await {
        answer.push_str(c.unwrap().choices[0].delta.content.as_deref().unwrap_or_default());
    }
    let body = serde_json::json!({"model": "sim-tts", "input": answer, "voice": "alloy",
        "response_format": "wav"});
    let tts = edgeroute_client::RawRequest {
        model: "sim-tts".into(),
        path: "/v1/audio/speech".into(),
        content_type: "application/json".into(),
        body: body.to_string().into(),
    };
    let (spoken, served) = voice.call(&tts).await.unwrap();
    assert_eq!(served.node.id, "van-1", "STT, LLM and TTS on van-1");
    assert_eq!(spoken.content_type.as_deref(), Some("audio/wav"));
    assert_eq!(&spoken.body[..4], b"RIFF");
    drop(running);
}

/// Nodes of a few slots (every one a backend lane: no queue behind them), all for one tenant.
async fn small_fleet(tag: &str) -> Fleet {
    Fleet::start_with(
        tag,
        |_| {},
        |n| {
            n.limits.max_concurrency = 3;
            n.limits.tenant_max_share = 1.0;
        },
    )
    .await
}

/// A node's capacity (slots) as discovery lists it.
async fn capacity(fleet: &Fleet, id: &str) -> u32 {
    let addr = fleet.discovery.as_ref().unwrap().addr();
    let r = edgeroute_test_util::get(addr, "/v1/discover?model=sim-llama&k=5", None).await;
    let list = r.json()["candidates"].as_array().unwrap().clone();
    let c = list.iter().find(|c| c["id"] == id).unwrap();
    u32::try_from(c["capacity"].as_u64().unwrap()).unwrap()
}

/// Every node's streams stop after their first token (until dropped): each stays in flight.
async fn stall_everywhere(fleet: &Fleet) {
    for id in ["tor-1", "mtl-1", "van-1"] {
        faults(fleet.node(id), r#"{"stall_after_tokens": 1}"#).await;
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(2), "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn with_respect_for_capacity_a_full_node_is_passed_over_and_a_dropped_stream_returns_its_slot()
 {
    let fleet = small_fleet("slots").await;
    let cap = capacity(&fleet, "tor-1").await;
    assert_eq!(cap, 3);
    let cfg = ClientConfig {
        respect_node_capacity: true,
        stall_timeout: Duration::from_secs(30),
        ..fleet.config()
    };
    let client = Client::new(cfg).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    assert_eq!(s.pinned().id, "tor-1");
    // JSON answers return their slot once read.
    s.chat(&request("sim-llama", "hello")).await.unwrap();
    assert_eq!(client.in_flight("tor-1"), 0);
    stall_everywhere(&fleet).await;
    let mut held = Vec::new();
    for _ in 0..cap {
        let st = s.chat_stream(&request("sim-llama", "a long story")).await.unwrap();
        assert_eq!(st.node(), "tor-1");
        held.push(st);
    }
    assert_eq!(client.in_flight("tor-1"), cap, "each open stream holds a slot");
    // The pinned node is full: the next stream goes to the standby, the pin stays.
    let extra = s.chat_stream(&request("sim-llama", "one more")).await.unwrap();
    assert_eq!(extra.node(), "mtl-1");
    assert_eq!(client.in_flight("tor-1"), cap, "never more than its slots");
    assert_eq!(s.pinned().id, "tor-1", "a full node is no failure: the session stays");
    // A stream the caller drops (unread, stalled at the node) returns its slot at once.
    drop(held.pop());
    eventually("the dropped stream's slot is returned", || client.in_flight("tor-1") == cap - 1)
        .await;
    let back = s.chat_stream(&request("sim-llama", "back again")).await.unwrap();
    assert_eq!(back.node(), "tor-1");
    drop((held, extra, back));
    eventually("every slot returned", || {
        ["tor-1", "mtl-1", "van-1"].iter().all(|n| client.in_flight(n) == 0)
    })
    .await;
}

#[tokio::test]
async fn with_every_node_full_a_request_fails_saturated_with_a_retry_after_then_succeeds() {
    let fleet = small_fleet("saturated").await;
    let cfg = ClientConfig {
        respect_node_capacity: true,
        first_token_timeout: Duration::from_millis(300),
        stall_timeout: Duration::from_secs(30),
        ..fleet.config()
    };
    let client = Client::new(cfg).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    let mut total = 0;
    for id in ["tor-1", "mtl-1", "van-1"] {
        total += capacity(&fleet, id).await;
    }
    stall_everywhere(&fleet).await;
    let mut held = Vec::new();
    for _ in 0..total {
        held.push(s.chat_stream(&request("sim-llama", "a long story")).await.unwrap());
    }
    let t = std::time::Instant::now();
    let err = s.chat(&request("sim-llama", "one more")).await.unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(err, ClientError::FleetSaturated { .. }), "{err}");
    assert_eq!((err.status(), err.retryable()), (503, true));
    assert!(err.retry_after().is_some());
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(client.in_flight("tor-1"), 3);
    // A slot freed while a request waits: it is sent at once.
    faults(fleet.node("tor-1"), "{}").await;
    let i = held.iter().position(|h| h.node() == "tor-1").unwrap();
    let waiting = async {
        let t = std::time::Instant::now();
        (s.chat(&request("sim-llama", "waiting")).await, t.elapsed())
    };
    let release = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held.remove(i));
    };
    let ((r, waited), ()) = tokio::join!(waiting, release);
    r.unwrap();
    assert!(waited >= Duration::from_millis(90) && waited < Duration::from_secs(1), "{waited:?}");
}

/// Events of a realtime session until `until` (included).
async fn events_until(rt: &mut edgeroute_client::Realtime, until: &str) -> Vec<serde_json::Value> {
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), rt.recv())
            .await
            .unwrap_or_else(|_| panic!("no `{until}` within 10 s; saw {seen:?}"))
            .expect("the session ended")
            .expect("the session failed");
        let done = ev["type"] == until;
        seen.push(ev);
        if done {
            return seen;
        }
    }
}

/// One realtime turn: the user's words, then the whole answer's text.
async fn realtime_turn(rt: &mut edgeroute_client::Realtime, text: &str) -> String {
    rt.send(serde_json::json!({"type": "conversation.item.create", "item": {"type": "message",
        "role": "user", "content": [{"type": "input_text", "text": text}]}}))
        .await
        .unwrap();
    rt.send(serde_json::json!({"type": "response.create", "response": {"modalities": ["text"]}}))
        .await
        .unwrap();
    let events = events_until(rt, "response.done").await;
    let done = events.last().unwrap();
    assert_eq!(done["response"]["status"], "completed", "{done}");
    assert!(
        !events.iter().any(|e| e["type"] == "error" || e["type"] == "edgeroute.migrate"),
        "the caller sees no error and no hint: {events:?}"
    );
    done["response"]["output"][0]["content"][0]["text"].as_str().unwrap().to_owned()
}

/// What the simulator answers to this conversation (it is deterministic: the same on every
/// node), asked of `node` as a chat.
async fn answer_to(node: &TestNode, turns: &[(&str, &str)]) -> String {
    let messages: Vec<_> = turns
        .iter()
        .map(|(role, text)| serde_json::json!({"role": role, "content": text}))
        .collect();
    let body = serde_json::json!({"model": "sim-llama", "messages": messages});
    let r = node.chat(body.to_string()).await;
    r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_realtime_session_moves_between_turns_on_a_drain_with_its_conversation_replayed() {
    let fleet = Fleet::start("rt-drain", |_| {}).await;
    let client = Client::new(fleet.config()).unwrap();
    let mut rt = client.realtime("sim-llama").await.unwrap();
    assert_eq!(events_until(&mut rt, "session.created").await.len(), 1);
    let first = rt.node();
    rt.send(
        serde_json::json!({"type": "session.update", "session": {"instructions": "Be brief."}}),
    )
    .await
    .unwrap();
    events_until(&mut rt, "session.updated").await;
    let a1 = realtime_turn(&mut rt, "What is the weather in Toronto?").await;
    let r = fleet.node(&first).admin_post("/admin/drain", r#"{"deadline_ms": 30000}"#).await;
    assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
    // The hint comes as an event within a tick; no turn is under way, so the session moves.
    let t = std::time::Instant::now();
    while rt.moves() == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "the session never moved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(rt.node(), first);
    let a2 = realtime_turn(&mut rt, "And tomorrow?").await;
    // The new node answered the whole conversation: the instructions and the first turn were
    // replayed there.
    let want = answer_to(
        fleet.node(&rt.node()),
        &[
            ("system", "Be brief."),
            ("user", "What is the weather in Toronto?"),
            ("assistant", &a1),
            ("user", "And tomorrow?"),
        ],
    )
    .await;
    assert_eq!(a2, want);
    assert_eq!(rt.moves(), 1);
}

#[tokio::test]
async fn a_realtime_session_survives_its_node_dying_between_turns() {
    let mut fleet = Fleet::start("rt-dead", |_| {}).await;
    let client = Client::new(fleet.config()).unwrap();
    let mut rt = client.realtime("sim-llama").await.unwrap();
    events_until(&mut rt, "session.created").await;
    let first = rt.node();
    let a1 = realtime_turn(&mut rt, "Book a table for two.").await;
    fleet.relay(&first).cut();
    let a2 = realtime_turn(&mut rt, "At eight, please.").await;
    assert_ne!(rt.node(), first);
    assert_eq!(rt.moves(), 1);
    let want = answer_to(
        fleet.node(&rt.node()),
        &[("user", "Book a table for two."), ("assistant", &a1), ("user", "At eight, please.")],
    )
    .await;
    assert_eq!(a2, want);
}

#[tokio::test]
async fn a_streamed_call_plays_speech_from_its_first_audio_and_fails_over_before_it() {
    let mut fleet = Fleet::start("raw-stream", |_| {}).await;
    let client = Client::new(fleet.config()).unwrap();
    let s = client.session("sim-llama").await.unwrap();
    let pinned = s.pinned().id;
    let body = serde_json::json!({"model": "sim-llama", "voice": "alloy",
        "input": "One sentence. Another one. And a third.", "response_format": "wav"});
    let req = edgeroute_client::RawRequest {
        model: "sim-llama".into(),
        path: "/v1/audio/speech".into(),
        content_type: "application/json".into(),
        body: body.to_string().into(),
    };
    let whole = s.call(&req).await.unwrap().0.body;
    let read = |mut st: edgeroute_client::RawStream| async move {
        let mut chunks = Vec::new();
        while let Some(c) = st.chunk().await {
            chunks.push(c);
        }
        chunks
    };
    let (st, served) = s.call_stream(&req).await.unwrap();
    assert_eq!(served.node.id, pinned);
    assert_eq!((st.status, st.content_type.as_deref()), (200, Some("audio/wav")));
    let chunks: Vec<_> = read(st).await.into_iter().map(Result::unwrap).collect();
    assert!(chunks.len() > 1, "the audio comes as the node produces it");
    assert_eq!(chunks.concat(), whole.to_vec(), "the same audio as read whole");
    // The pinned node dead before its first byte: the request goes whole to the standby.
    fleet.relay(&pinned).cut();
    let (st, served) = s.call_stream(&req).await.unwrap();
    assert_ne!(served.node.id, pinned);
    let audio: Vec<u8> = read(st).await.into_iter().flat_map(Result::unwrap).collect();
    assert_eq!(audio, whole.to_vec());
    // Cut mid-audio: the stream ends with StreamCut after what was played.
    faults(fleet.node(&served.node.id), r#"{"cut_after_tokens": 3}"#).await;
    let (st, _) = s.call_stream(&req).await.unwrap();
    let items = read(st).await;
    assert!(matches!(items.last(), Some(Err(ClientError::StreamCut(_)))), "{items:?}");
    assert_eq!(items.iter().filter(|c| c.is_ok()).count(), 3);
}
