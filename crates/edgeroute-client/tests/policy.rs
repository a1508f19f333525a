//! The SDK follows a routing policy's decisions (issue 15), against real simulator nodes, a
//! discovery replica applying the policy file, and a second OpenAI-compatible server standing
//! in for a regional cloud pool:
//!
//! - a v2 canary moved from 5 % to 50 % to 100 % while clients keep talking: no turn fails,
//!   and the share of turns v2 serves follows the weights;
//! - the specialised model unloaded everywhere: the policy's cascade answers with the general
//!   model, the caller sees which model answered, no turn fails;
//! - every edge node over the rule's GPU threshold: the cloud pool answers (with its own key,
//!   never the fleet's token), and traffic returns to the edge when the nodes recover.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgeroute_client::{Client, ClientConfig, Session};
use edgeroute_discovery::{Discovery, DiscoveryConfig};
use edgeroute_lab::fleet::{FleetBackend, FleetSpec, NodeSpec};
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use edgeroute_test_util::node::CASCADE_POLICY;
use edgeroute_test_util::{ServerGuard, TestNode, get, spawn_router};

/// A fleet of simulator nodes with a policy-following discovery replica.
struct PolicyFleet {
    nodes: Vec<TestNode>,
    ids: Vec<String>,
    discovery: edgeroute_discovery::Spawned,
    dir: PathBuf,
}

impl PolicyFleet {
    /// `specs`: the nodes; `policy`: the policy file's first text. Nodes may load any model
    /// under `dir/models` (each a directory with one weights file).
    async fn start(tag: &str, specs: Vec<NodeSpec>, tokens_per_s: f64, policy: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("edgeroute-sdkpol-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for m in ["llama", "nemotron"] {
            std::fs::create_dir_all(dir.join("models").join(m)).unwrap();
            std::fs::write(dir.join("models").join(m).join("model.gguf"), [0u8; 64]).unwrap();
        }
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        let mut fleet = FleetSpec {
            nodes: specs,
            backend: FleetBackend::Sim { tokens_per_s, prefill_us_per_token: 0, spare_gpu: false },
            ..FleetSpec::open()
        };
        fleet.probe_ms = (100, 80);
        let mut nodes = Vec::new();
        let mut urls = Vec::new();
        for i in 0..fleet.nodes.len() {
            let mut cfg = fleet.node_config(i, None);
            cfg.models.allowed_local_roots = vec![dir.join("models")];
            cfg.models.sim_load_time_ms = 10;
            let node = TestNode::start_config(cfg, None).await;
            urls.push(format!("http://{}", node.addr));
            nodes.push(node);
        }
        let ids = fleet.nodes.iter().map(|n| n.id.clone()).collect();
        let mut cfg = fleet.static_discovery_config("toronto", &urls);
        let section = format!(
            "[discovery]\nallow_unauthenticated = true\n\
             [policy]\nfile = \"{}\"\nreload_interval_ms = 100\n",
            dir.join("policy.toml").display()
        );
        cfg.policy = DiscoveryConfig::from_toml(&section, |_| None).unwrap().policy;
        // Answers are taken in again within a third of a second: a policy change reaches
        // sessions between their turns.
        cfg.serving.ttl_ms = 300;
        let discovery = Discovery::build(cfg).unwrap();
        let discovery = discovery.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        PolicyFleet { nodes, ids, discovery, dir }
    }

    fn node(&self, id: &str) -> &TestNode {
        &self.nodes[self.ids.iter().position(|n| n == id).unwrap()]
    }

    /// Loads `model` (version `version`) on node `id` and waits until it is ready.
    async fn load(&self, id: &str, model: &str, version: Option<&str>) {
        self.node(id).load_local(&self.dir.join("models"), model, version).await;
    }

    async fn unload(&self, id: &str, model: &str) {
        let body = serde_json::json!({"model": model}).to_string();
        let r = self.node(id).admin_post("/v1/models/unload", body).await;
        assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
    }

    fn discovery_url(&self) -> String {
        format!("http://{}", self.discovery.addr())
    }

    /// Waits until discovery lists `want` (sorted ids) for `model` under the policy.
    async fn wait_listed(&self, model: &str, want: &[&str]) {
        let t = Instant::now();
        loop {
            let path = format!("/v1/discover?model={model}&k=10");
            let r = get(self.discovery.addr(), &path, None).await.json();
            let mut ids: Vec<String> = r["candidates"]
                .as_array()
                .map(|c| c.iter().map(|c| c["id"].as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            ids.sort();
            if ids == want {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "discovery never listed {want:?}: {r}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Writes a new policy text and waits until discovery applied `version`.
    async fn apply(&self, text: &str, version: &str) {
        std::fs::write(self.dir.join("policy.toml"), text).unwrap();
        let t = Instant::now();
        loop {
            let h = get(self.discovery.addr(), "/health", None).await.json();
            if h["policy"]["version"] == version {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "policy {version} never applied: {h}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Chat requests node `id` has answered.
    fn served(&self, id: &str) -> u64 {
        self.node(id).state.telemetry.figures().requests
    }

    fn client(&self, key: &str, seed: u64) -> Client {
        Client::new(ClientConfig {
            discovery: vec![self.discovery_url()],
            token: Some(self.nodes[0].token()),
            seed: Some(seed),
            routing_key: Some(key.into()),
            ..ClientConfig::default()
        })
        .unwrap()
    }
}

impl Drop for PolicyFleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn request(model: &str, text: &str) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new(model, vec![ChatMessage::new(Role::User, text)]);
    r.max_tokens = Some(4);
    r
}

fn canary(weights: (u32, u32), version: &str) -> String {
    format!(
        r#"
version = "{version}"

[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"

[[rules]]
id = "llama-canary"
match.models = ["llama"]
versions = {{ v1 = {}, v2 = {} }}
sticky = "session"
"#,
        weights.0, weights.1
    )
}

/// Turns by many clients, counted by the version of the node that served them.
#[derive(Default)]
struct Tally {
    turns: AtomicU64,
    failed: AtomicU64,
}

/// Each of `sessions` runs turns until `stop`; every failure is counted (and printed).
fn talk(
    sessions: Vec<Session>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    sessions
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                let mut turn = 0;
                while !stop.load(Ordering::Relaxed) {
                    turn += 1;
                    match s.chat(&request(s.model(), &format!("client {i} turn {turn}"))).await {
                        Ok(c) => assert!(!c.choices.is_empty()),
                        Err(e) => {
                            eprintln!("client {i} turn {turn} failed: {e}");
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tally.turns.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_moves_from_5_to_50_to_100_percent_without_a_failed_turn() {
    let specs = ["tor-1", "tor-2", "mtl-1", "mtl-2"]
        .iter()
        .map(|id| NodeSpec::new(id, if id.starts_with("tor") { "toronto" } else { "montreal" }, 5))
        .collect();
    let fleet = PolicyFleet::start("canary", specs, 2000.0, &canary((95, 5), "c-5")).await;
    for (id, v) in [("tor-1", "v1"), ("tor-2", "v1"), ("mtl-1", "v2"), ("mtl-2", "v2")] {
        fleet.load(id, "llama", Some(v)).await;
    }
    fleet.wait_listed("llama", &["tor-1", "tor-2"]).await;
    let v2_served = || fleet.served("mtl-1") + fleet.served("mtl-2");
    let all_served = || fleet.ids.iter().map(|id| fleet.served(id)).sum::<u64>();

    // 24 clients, one session each: the split is per client (its routing key).
    let mut sessions = Vec::new();
    for i in 0..24 {
        let client = fleet.client(&format!("client-{i}"), i);
        sessions.push(client.session("llama").await.unwrap());
    }
    let (tally, stop) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
    let tasks = talk(sessions, tally.clone(), stop.clone());
    // A client reports the policy version its discovery answers name, and each change once
    // (what router replicas share so that the others ask discovery again at once).
    let observer = fleet.client("observer", 99);
    let mut heard = observer.ejections();
    let sees = |version: &'static str| {
        let observer = observer.clone();
        async move {
            let t = Instant::now();
            while observer.policy_version().as_deref() != Some(version) {
                assert!(t.elapsed() < Duration::from_secs(5), "never saw policy {version}");
                drop(observer.session("llama").await.unwrap());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    sees("c-5").await;

    // The share of turns v2 served over `window`, after `settle` for sessions to move.
    let share = |settle: Duration, window: Duration| {
        let (v2_served, all_served) = (&v2_served, &all_served);
        async move {
            tokio::time::sleep(settle).await;
            let (v2a, alla) = (v2_served(), all_served());
            tokio::time::sleep(window).await;
            let (v2, all) = (v2_served() - v2a, all_served() - alla);
            assert!(all > 50, "only {all} turns in the window");
            v2 as f64 / all as f64
        }
    };
    let settle = Duration::from_millis(1500);
    let window = Duration::from_secs(2);
    let at_5 = share(Duration::ZERO, window).await;
    assert!(at_5 <= 0.2, "v2 served {at_5:.2} of turns at 5 %");

    fleet.apply(&canary((50, 50), "c-50"), "c-50").await;
    sees("c-50").await;
    let at_50 = share(settle, window).await;
    assert!((0.2..=0.8).contains(&at_50), "v2 served {at_50:.2} of turns at 50 %");

    fleet.apply(&canary((0, 100), "c-100"), "c-100").await;
    sees("c-100").await;
    let heard: Vec<_> = std::iter::from_fn(|| heard.try_recv().ok()).collect();
    let version = |v: &str| edgeroute_client::EjectionEvent::PolicyVersion { version: v.into() };
    assert_eq!(heard, [version("c-5"), version("c-50"), version("c-100")]);
    let at_100 = share(settle, window).await;
    // Every turn, but for a rare hedge on a loaded machine: a late first token is raced on the
    // session's standby, which may still come from the list fetched before the change (seen
    // once in ~1,200 turns in CI, with other fleet tests running beside this one).
    assert!(at_100 >= 0.995, "v2 served {at_100:.4} of turns at 100 %");

    // The rollout ends: v1 leaves the fleet while sessions talk.
    fleet.unload("tor-1", "llama").await;
    fleet.unload("tor-2", "llama").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (turns, failed) =
        (tally.turns.load(Ordering::Relaxed), tally.failed.load(Ordering::Relaxed));
    eprintln!(
        "v2's share of turns: {at_5:.2} at 5 %, {at_50:.2} at 50 %, {at_100:.2} at 100 %; {failed} of {turns} turns failed"
    );
    assert!(turns > 300, "{turns} turns");
    assert_eq!(failed, 0, "{failed} of {turns} turns failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_specialised_model_unloaded_everywhere_the_cascade_answers_and_says_so() {
    let specs = vec![NodeSpec::new("tor-1", "toronto", 5), NodeSpec::new("mtl-1", "montreal", 5)];
    let fleet = PolicyFleet::start("cascade", specs, 2000.0, CASCADE_POLICY).await;
    fleet.load("tor-1", "nemotron", Some("v1")).await;
    fleet.load("tor-1", "llama", Some("v1")).await;
    fleet.load("mtl-1", "llama", Some("v1")).await;
    fleet.wait_listed("nemotron", &["tor-1"]).await;

    let client = fleet.client("voice-agent", 3);
    let s = client.session("nemotron").await.unwrap();
    let c = s.chat(&request("nemotron", "hello")).await.unwrap();
    assert_eq!(c.model, "nemotron");

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = talk(vec![s], tally.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.unload("tor-1", "nemotron").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "a turn failed while nemotron left");

    // Now the cascade answers: the caller asked for nemotron and is told llama answered.
    let s = client.session("nemotron").await.unwrap();
    assert_eq!(s.pinned().serve_as.as_deref(), Some("llama"));
    let c = s.chat(&request("nemotron", "and now?")).await.unwrap();
    assert_eq!(c.model, "llama", "the answer names the model that served it");
    let r = get(fleet.discovery.addr(), "/v1/discover?model=nemotron", None).await;
    assert_eq!(r.json()["policy"]["cascade_step"], 1);
    assert!(r.header("x-edgeroute-decision").unwrap().ends_with(";step=1"));
}

fn edge_then_cloud(endpoint: &str) -> String {
    format!(
        r#"
version = "cloud-1"

[[models]]
name = "llama"
[[models.versions]]
id = "v1"

[[pools]]
name = "ca-cloud"
tier = "cloud"
endpoint = "{endpoint}"
region = "toronto"
serves = {{ llama = "v1" }}
price_in_per_1k = 0.5
price_out_per_1k = 1.5

[[rules]]
id = "edge-then-cloud"
match.models = ["llama"]
tiers = ["edge", "ca-cloud"]
constraints.below = {{ gpu_util = 0.8 }}
"#
    )
}

/// The stand-in for a cloud provider: an OpenAI-compatible server serving `llama`, which
/// counts requests and remembers the last bearer it was sent.
struct Cloud {
    _server: ServerGuard,
    endpoint: String,
    seen: Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

async fn cloud() -> Cloud {
    let mut cfg = edgeroute_sim::SimConfig::zero_latency();
    cfg.models = vec![edgeroute_sim::SimModel::new("llama", "gpu0")];
    let sim = Arc::new(edgeroute_sim::Simulator::new(cfg).unwrap());
    let seen: Arc<std::sync::Mutex<Vec<Option<String>>>> = Arc::default();
    let s2 = seen.clone();
    let app = edgeroute_sim::server::router(sim).layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let auth = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            if req.uri().path().ends_with("/chat/completions") {
                s2.lock().unwrap().push(auth);
            }
            next.run(req)
        },
    ));
    let server = spawn_router(app).await;
    let endpoint = format!("{}/v1", server.url());
    Cloud { _server: server, endpoint, seen }
}

/// Keeps every slot of `node`'s GPU busy with long streams until `stop`.
fn saturate(node: &TestNode, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|i| {
            let (addr, token, stop) = (node.addr, node.token(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut r = request("llama", &format!("long answer {i}"));
                    r.max_tokens = Some(64);
                    let body = serde_json::to_vec(&r).unwrap();
                    let _ = edgeroute_test_util::post_json(
                        addr,
                        "/v1/chat/completions",
                        Some(&token),
                        &[],
                        body,
                    )
                    .await;
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_edge_node_over_the_threshold_sends_traffic_to_the_cloud_and_back() {
    let cloud = cloud().await;
    let mut specs =
        vec![NodeSpec::new("tor-1", "toronto", 5), NodeSpec::new("mtl-1", "montreal", 5)];
    for s in &mut specs {
        // One GPU with the model on it: its utilisation is what the rule's threshold reads.
        s.models = vec!["llama".into()];
    }
    // 64 tokens at 40 tokens/s: a long stream holds its slot for 1.6 s.
    let fleet = PolicyFleet::start("cloud", specs, 40.0, &edge_then_cloud(&cloud.endpoint)).await;
    fleet.wait_listed("llama", &["mtl-1", "tor-1"]).await;

    let client = Client::new(ClientConfig {
        discovery: vec![fleet.discovery_url()],
        token: Some(fleet.nodes[0].token()),
        pool_keys: [("ca-cloud".to_owned(), "cloud-key".to_owned())].into(),
        seed: Some(5),
        ..ClientConfig::default()
    })
    .unwrap();
    let s = client.session("llama").await.unwrap();
    assert!(s.pinned().pool.is_none(), "the edge first");
    s.chat(&request("llama", "hello")).await.unwrap();
    assert!(cloud.seen.lock().unwrap().is_empty());

    // Every edge GPU full: discovery's next probe sees it, the policy answers the pool.
    let release = Arc::new(AtomicBool::new(false));
    let mut load = saturate(fleet.node("tor-1"), release.clone());
    load.extend(saturate(fleet.node("mtl-1"), release.clone()));
    let t = Instant::now();
    loop {
        let r = get(fleet.discovery.addr(), "/v1/discover?model=llama", None).await.json();
        if r["policy"]["tier"] == "ca-cloud" {
            assert_eq!(r["candidates"][0]["pool"], "ca-cloud", "{r}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the pool never answered: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = talk(vec![s], tally.clone(), stop.clone());
    let t = Instant::now();
    while cloud.seen.lock().unwrap().len() < 3 {
        assert!(t.elapsed() < Duration::from_secs(5), "the session never reached the cloud");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for auth in cloud.seen.lock().unwrap().iter() {
        assert_eq!(auth.as_deref(), Some("Bearer cloud-key"), "the pool's key, never the token");
    }

    // The edge recovers: traffic returns to it.
    release.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let t = Instant::now();
    loop {
        let r = get(fleet.discovery.addr(), "/v1/discover?model=llama", None).await.json();
        if r["policy"]["tier"] == "edge" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the edge never came back: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (at_cloud, at_edge) =
        (cloud.seen.lock().unwrap().len(), fleet.served("tor-1") + fleet.served("mtl-1"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(cloud.seen.lock().unwrap().len(), at_cloud, "no turn went to the cloud any more");
    assert!(fleet.served("tor-1") + fleet.served("mtl-1") > at_edge, "turns back on the edge");
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "no turn failed on the way");
}
