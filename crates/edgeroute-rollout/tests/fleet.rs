//! The rollout driver against a real fleet (issue 18's lab test): four regions of simulator
//! nodes (each with a node serving `llama` v1 and a spare one), a discovery replica following
//! the policy on the bus, SDK clients talking in every region all along, and the driver with
//! the real HTTP fleet and its state on the same bus.
//!
//! - a good v2 goes out wave by wave and finishes: no turn fails, every node ends on v2, the
//!   final policy makes v2 the default, and until wave 1 validated v2 every other region's
//!   pushed split kept it at 0 %;
//! - a bad v2 (its nodes answer garbage, as a broken checkpoint would) fails the first wave's
//!   correctness probes and is rolled back there: the spare node unloads it, no other region
//!   ever loaded it, no turn fails.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeroute_auth::Scope;
use edgeroute_bus::{Bus, BusConfig};
use edgeroute_client::{Client, ClientConfig, Session};
use edgeroute_discovery::{Discovery, DiscoveryConfig};
use edgeroute_lab::fleet::{FleetBackend, FleetSpec, NodeSpec};
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use edgeroute_rollout::driver::{Counters, Driver, DriverOptions, Fleet, FleetNode, State};
use edgeroute_rollout::http::{BusStore, HttpFleet, HttpFleetConfig};
use edgeroute_rollout::{Phase, Plan};
use edgeroute_test_util::client::method;
use edgeroute_test_util::node::mint_hs256_fleet;
use edgeroute_test_util::{TestNode, get};

const REGIONS: [&str; 4] = ["tor", "mtl", "van", "sea"];

/// One lab at a time: each is 8 nodes, a replica and a dozen clients on a 2-core machine, and
/// the TTFT gate compares timings.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BASE: &str = r#"
version = "ops-1"
[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"
"#;

fn plan(dir: &std::path::Path) -> String {
    format!(
        r#"
model = "llama"
from = "v1"
to = "v2"
waves = [["tor"], ["mtl"], ["van", "sea"]]
steps = [5, 25, 100]
[gates]
soak_s = 1
min_requests = 4
ttft_p99_ratio = 2.0  # default 1.10 (unit-tested); a handful of samples on a busy 2-core CI box
apply_timeout_s = 20
step_timeout_s = 20
[load.v1]
path = "{v1}"
[load.v2]
path = "{v2}"
[[probes]]
prompt = "say something deterministic"
same_as_old = true
max_tokens = 8
"#,
        v1 = dir.join("models/llama-v1").display(),
        v2 = dir.join("models/llama-v2").display(),
    )
}

struct Lab {
    nodes: Vec<TestNode>,
    ids: Vec<String>,
    discovery: edgeroute_discovery::Spawned,
    bus: Bus,
    dir: PathBuf,
}

impl Lab {
    async fn start(tag: &str) -> Lab {
        let dir =
            std::env::temp_dir().join(format!("edgeroute-rollout-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for m in ["llama-v1", "llama-v2"] {
            std::fs::create_dir_all(dir.join("models").join(m)).unwrap();
            std::fs::write(dir.join("models").join(m).join("model.gguf"), [0u8; 64]).unwrap();
        }
        let specs: Vec<NodeSpec> = REGIONS
            .iter()
            .flat_map(|r| {
                [NodeSpec::new(&format!("{r}-1"), r, 20), NodeSpec::new(&format!("{r}-2"), r, 20)]
            })
            .collect();
        let mut fleet = FleetSpec {
            nodes: specs,
            regions: REGIONS.iter().map(|r| (*r).to_owned()).collect(),
            backend: FleetBackend::Sim {
                tokens_per_s: 2000.0,
                prefill_us_per_token: 0,
                spare_gpu: false,
            },
            ..FleetSpec::open()
        };
        fleet.probe_ms = (100, 80);
        let bus = Bus::embedded(&BusConfig::default()).unwrap();
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
        let ids: Vec<String> = fleet.nodes.iter().map(|n| n.id.clone()).collect();
        let mut cfg = fleet.static_discovery_config("tor", &urls);
        let section = "[discovery]\nallow_unauthenticated = true\n\
                       [policy]\nsource = \"bus\"\n[bus]\nkind = \"embedded\"\n";
        let parsed = DiscoveryConfig::from_toml(section, |_| None).unwrap();
        cfg.policy = parsed.policy;
        cfg.bus = parsed.bus;
        cfg.serving.ttl_ms = 300;
        let discovery = Discovery::build(cfg).unwrap().with_bus(bus.clone());
        let discovery = discovery.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let lab = Lab { nodes, ids, discovery, bus, dir };
        // The operator's policy in force before the rollout.
        lab.bus.put_policy(BASE).await.unwrap();
        lab.wait_policy("ops-1").await;
        // v1 on each region's first node; the second is spare.
        for r in REGIONS {
            lab.load(&format!("{r}-1"), "llama-v1", "v1").await;
        }
        lab
    }

    fn node(&self, id: &str) -> &TestNode {
        &self.nodes[self.ids.iter().position(|n| n == id).unwrap()]
    }

    async fn load(&self, id: &str, dir: &str, version: &str) {
        let body = serde_json::json!({
            "path": self.dir.join("models").join(dir), "id": "llama", "version": version,
        });
        let node = self.node(id);
        let r = node.admin_post("/v1/models/load", body.to_string()).await;
        assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
        node.wait_model("llama", "ready", Duration::from_secs(10)).await;
    }

    async fn wait_policy(&self, version: &str) {
        let t = std::time::Instant::now();
        loop {
            let h = get(self.discovery.addr(), "/health", None).await.json();
            if h["policy"]["version"] == version {
                return;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "policy {version} never applied: {h}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Which version of `llama` node `id` holds (from its `/health`).
    async fn version_on(&self, id: &str) -> Option<String> {
        let h = get(self.node(id).addr, "/health", None).await.json();
        h["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == "llama")
            .map(|m| m["version"].as_str().unwrap_or("?").to_owned())
    }

    async fn garbage(&self, id: &str) {
        let node = self.node(id);
        let body = r#"{"garbage_rate": 1.0}"#;
        let r = method(node.addr, "PUT", "/admin/faults", Some(&node.admin_token()), body).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }

    async fn sessions(&self, per_region: usize) -> Vec<Session> {
        let mut out = Vec::new();
        for (ri, r) in REGIONS.iter().enumerate() {
            for i in 0..per_region {
                let client = Client::new(ClientConfig {
                    discovery: vec![format!("http://{}", self.discovery.addr())],
                    token: Some(self.nodes[0].token()),
                    seed: Some((ri * 100 + i) as u64),
                    routing_key: Some(format!("{r}-client-{i}")),
                    home_region: Some((*r).to_owned()),
                    ..ClientConfig::default()
                })
                .unwrap();
                out.push(client.session("llama").await.unwrap());
            }
        }
        out
    }

    fn driver_fleet(&self) -> Recording {
        let fleet = HttpFleet::new(
            HttpFleetConfig {
                discovery: format!("http://{}", self.discovery.addr()),
                token: mint_hs256_fleet("operator", &[Scope::Admin], 3600),
                inference_token: Some(self.nodes[0].token()),
                ca_file: None,
                replicas: 1,
                push_timeout: Duration::from_secs(10),
                admin_port: None,
                check_every: Duration::from_millis(50),
            },
            self.bus.clone(),
        )
        .unwrap();
        Recording { inner: fleet, pushed: Arc::default() }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real fleet, remembering each policy document pushed.
#[derive(Clone)]
struct Recording {
    inner: HttpFleet,
    pushed: Arc<Mutex<Vec<String>>>,
}

impl Fleet for Recording {
    async fn topology(&self) -> Result<Vec<FleetNode>, String> {
        self.inner.topology().await
    }
    async fn load(&self, n: &FleetNode, b: serde_json::Value, t: Duration) -> Result<(), String> {
        self.inner.load(n, b, t).await
    }
    async fn unload(&self, n: &FleetNode, m: &str, t: Duration) -> Result<(), String> {
        self.inner.unload(n, m, t).await
    }
    async fn push_policy(&self, text: &str) -> Result<(), String> {
        self.inner.push_policy(text).await?;
        self.pushed.lock().unwrap().push(text.to_owned());
        Ok(())
    }
    async fn counters(&self, n: &FleetNode) -> Result<Counters, String> {
        self.inner.counters(n).await
    }
    async fn ask(&self, n: &FleetNode, m: &str, p: &str, k: u32) -> Result<String, String> {
        self.inner.ask(n, m, p, k).await
    }
}

#[derive(Default)]
struct Tally {
    turns: AtomicU64,
    failed: AtomicU64,
}

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
                    let mut r = ChatCompletionRequest::new(
                        "llama",
                        vec![ChatMessage::new(Role::User, format!("client {i} turn {turn}"))],
                    );
                    r.max_tokens = Some(4);
                    if let Err(e) = s.chat(&r).await {
                        eprintln!("client {i} turn {turn} failed: {e}");
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    tally.turns.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            })
        })
        .collect()
}

async fn drive(lab: &Lab, fleet: Recording) -> State {
    let plan = Plan::from_toml(&plan(&lab.dir)).unwrap();
    let store = BusStore { bus: lab.bus.clone(), model: "llama".into() };
    let opts =
        DriverOptions { poll: Duration::from_millis(250), node_timeout: Duration::from_secs(20) };
    let fresh = State::new(plan, BASE.to_owned());
    let mut driver = Driver::open(fleet, store, Some(fresh), opts).await.unwrap();
    let mut print = |e: &edgeroute_rollout::Event| eprintln!("rollout: {}", e.text);
    let run = driver.run(edgeroute_core::clock::unix_ms, &mut print);
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the rollout took over 120 s")
        .unwrap()
}

/// The version shares each pushed document gives each region (`rollout-<region>` rules).
fn v2_shares(text: &str) -> Vec<(String, i64)> {
    let doc: toml::Table = toml::from_str(text).unwrap();
    doc.get("rules")
        .and_then(|r| r.as_array())
        .map(|rules| {
            rules
                .iter()
                .filter_map(|r| {
                    let id = r["id"].as_str()?.strip_prefix("rollout-")?.to_owned();
                    Some((id, r["versions"].get("v2").and_then(|v| v.as_integer()).unwrap_or(0)))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_version_goes_out_region_by_region_without_a_failed_turn() {
    let _one = ONE_AT_A_TIME.lock().await;
    let lab = Lab::start("good").await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let talkers = talk(lab.sessions(2).await, tally.clone(), stop.clone());
    let fleet = lab.driver_fleet();
    let pushed = fleet.pushed.clone();

    let state = drive(&lab, fleet).await;
    stop.store(true, Ordering::Relaxed);
    for t in talkers {
        t.await.unwrap();
    }
    assert_eq!(state.machine.phase(), &Phase::Finished, "{}", state.summary());
    let turns = tally.turns.load(Ordering::Relaxed);
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0, "of {turns} turns");
    assert!(turns > 50, "the clients talked all along: {turns} turns");
    // Every node serves v2 now (the spare ones and the converted old ones), and the final
    // policy made it the default.
    for id in &lab.ids {
        assert_eq!(lab.version_on(id).await.as_deref(), Some("v2"), "{id}");
    }
    let pushed = pushed.lock().unwrap().clone();
    let last: toml::Table = toml::from_str(pushed.last().unwrap()).unwrap();
    assert_eq!(last["models"][0]["default_version"].as_str(), Some("v2"));
    assert!(v2_shares(pushed.last().unwrap()).is_empty(), "no rollout rule is left");
    // Until wave 1 validated v2, only Toronto was given any of it: the first document giving
    // another region a share comes after Toronto reached 100 %, and three regions stayed at 0.
    let log: Vec<&str> = state.machine.log().iter().map(|e| e.text.as_str()).collect();
    let validated = log.iter().position(|t| t.contains("validated")).unwrap();
    let wave2 = log.iter().position(|t| t.starts_with("wave 2")).unwrap();
    assert!(validated < wave2, "{log:#?}");
    let mut seen_tor_full = false;
    for text in &pushed {
        let shares = v2_shares(text);
        let others = shares.iter().filter(|(r, s)| r != "tor" && *s > 0).count();
        if !seen_tor_full {
            assert_eq!(others, 0, "another region got v2 before validation: {shares:?}");
            seen_tor_full = shares.iter().any(|(r, s)| r == "tor" && *s == 100);
        }
    }
    assert!(seen_tor_full);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_version_is_rolled_back_after_the_first_region() {
    let _one = ONE_AT_A_TIME.lock().await;
    let lab = Lab::start("bad").await;
    // A broken v2: whatever node loads it answers garbage (the spare nodes are where it goes).
    for r in REGIONS {
        lab.garbage(&format!("{r}-2")).await;
    }
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let talkers = talk(lab.sessions(2).await, tally.clone(), stop.clone());
    let fleet = lab.driver_fleet();
    let pushed = fleet.pushed.clone();

    let state = drive(&lab, fleet).await;
    stop.store(true, Ordering::Relaxed);
    for t in talkers {
        t.await.unwrap();
    }
    let Phase::RolledBack { reason } = state.machine.phase() else {
        panic!("not rolled back: {}", state.summary());
    };
    assert!(reason.contains("tor") && reason.contains("correctness"), "{reason}");
    assert_eq!(state.machine.wave(), 0, "stopped in the first wave");
    assert!(!state.machine.validated());
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0);
    // v2 is gone from Toronto's spare node; no other region ever loaded it; v1 is where it was.
    for r in REGIONS {
        assert_eq!(lab.version_on(&format!("{r}-1")).await.as_deref(), Some("v1"), "{r}-1");
        assert_eq!(lab.version_on(&format!("{r}-2")).await, None, "{r}-2");
    }
    let pushed = pushed.lock().unwrap().clone();
    for text in &pushed {
        for (r, s) in v2_shares(text) {
            assert!(r == "tor" || s == 0, "{r} got {s} % of a version never validated");
        }
    }
    assert_eq!(v2_shares(pushed.last().unwrap()).iter().map(|(_, s)| s).sum::<i64>(), 0);
    let log: Vec<&str> = state.machine.log().iter().map(|e| e.text.as_str()).collect();
    assert!(log.iter().any(|t| t.contains("rolled back: every region on v1")), "{log:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_stopped_mid_rollout_resumes_from_the_bus_and_finishes() {
    let _one = ONE_AT_A_TIME.lock().await;
    let lab = Lab::start("resume").await;
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let talkers = talk(lab.sessions(1).await, tally.clone(), stop.clone());
    let plan = Plan::from_toml(&plan(&lab.dir)).unwrap();
    let opts =
        DriverOptions { poll: Duration::from_millis(250), node_timeout: Duration::from_secs(20) };
    let store = || BusStore { bus: lab.bus.clone(), model: "llama".into() };

    // The first driver is killed (its future dropped) a few seconds in, mid-wave.
    let fresh = State::new(plan, BASE.to_owned());
    let mut first =
        Driver::open(lab.driver_fleet(), store(), Some(fresh), opts.clone()).await.unwrap();
    let mut print = |e: &edgeroute_rollout::Event| eprintln!("first: {}", e.text);
    let cut = tokio::time::timeout(
        Duration::from_millis(3500),
        first.run(edgeroute_core::clock::unix_ms, &mut print),
    )
    .await;
    assert!(cut.is_err(), "the first driver was meant to be cut short");
    drop(first);
    let (_, bytes) = lab.bus.rollout_get("llama").await.unwrap().unwrap();
    let stored: State = serde_json::from_slice(&bytes).unwrap();
    assert!(!stored.machine.is_over() && stored.machine.phase() != &Phase::Ready);
    let history = stored.machine.log().len();

    // A second one, given no plan, takes the stored state and finishes it.
    let mut second = Driver::open(lab.driver_fleet(), store(), None, opts).await.unwrap();
    let mut print = |e: &edgeroute_rollout::Event| eprintln!("second: {}", e.text);
    let state = tokio::time::timeout(
        Duration::from_secs(120),
        second.run(edgeroute_core::clock::unix_ms, &mut print),
    )
    .await
    .unwrap()
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in talkers {
        t.await.unwrap();
    }
    assert_eq!(state.machine.phase(), &Phase::Finished, "{}", state.summary());
    assert!(state.machine.log().len() > history, "the history goes on from where it was");
    assert_eq!(&state.machine.log()[..history], stored.machine.log());
    assert_eq!(tally.failed.load(Ordering::Relaxed), 0);
    for id in &lab.ids {
        assert_eq!(lab.version_on(id).await.as_deref(), Some("v2"), "{id}");
    }
}
