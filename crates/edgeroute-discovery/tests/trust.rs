//! Discovery trusts only what it verified (issue 14, "Fleet trust"): each test is an attack
//! through the topology bus or the API, and the end behaviour a client sees.
//!
//! - a bus hijack by id (a rogue announcement of a configured node at an attacker URL, with
//!   `epoch = u64::MAX`), and a lone `Heartbeat`, never change a configured node's URL;
//! - a URL that answers `/health` with another node id is a failed probe, never served;
//! - an announced `http://` node is refused (and counted) unless the lab opts in;
//! - an announced `https://` node is served only with a certificate from the fleet CA that
//!   names its id (`<id>.node.edgeroute`);
//! - an inference token gets the ranking, not the fleet's map (`explain`, `/v1/nodes`,
//!   `/v1/topology`);
//! - 10,000 announced fake nodes: the fleet and the probe rate stay within their caps.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edgeroute_bus::{Bus, BusConfig};
use edgeroute_discovery::probe::{Probe, ProbeError, ProbeFuture};
use edgeroute_discovery::{Discovery, DiscoveryConfig};
use edgeroute_proto::topology::{EventKind, ModelPlacement, NodeSnapshot, TopologyEvent};
use edgeroute_test_util::{Reply, TestNode, get};
use serde_json::Value;

const OPEN: &str = "[discovery]\nallow_unauthenticated = true\n";
const FAST: &str = "[probe]\ninterval_ms = 200\ntimeout_ms = 150\n[health]\nmin_std_ms = 50\n";
const SIM: &str = "[backend]\nkind = \"sim\"\n";

mod common;

use common::Replica;

impl Replica {
    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        get(self.addr, path, token).await
    }

    /// `(id, url)` of every candidate for `sim-llama`.
    async fn candidates(&self) -> Vec<(String, String)> {
        let r = self.get("/v1/discover?model=sim-llama&k=10", None).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["id"].as_str().unwrap().to_owned(), c["url"].as_str().unwrap().to_owned()))
            .collect()
    }

    async fn until(&self, limit: Duration, pred: impl Fn(&[(String, String)]) -> bool) {
        let t = Instant::now();
        loop {
            let c = self.candidates().await;
            if pred(&c) {
                return;
            }
            assert!(t.elapsed() < limit, "still {c:?} after {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Checks `pred` on every answer for `span`.
    async fn always(&self, span: Duration, pred: impl Fn(&[(String, String)]) -> bool) {
        let t = Instant::now();
        while t.elapsed() < span {
            let c = self.candidates().await;
            assert!(pred(&c), "answered {c:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self) -> String {
        String::from_utf8_lossy(&self.get("/metrics", None).await.body).into_owned()
    }

    async fn explain(&self, token: Option<&str>) -> Value {
        let r = self.get("/v1/discover?model=sim-llama&explain=true", token).await;
        assert_eq!(r.status, 200);
        r.json()
    }
}

/// Publishes what a node (or anyone) would: `NodeUp` at `url` then `sim-llama` ready, as
/// epoch `epoch`, with the matching stored snapshot.
async fn announce(bus: &Bus, id: &str, url: &str, epoch: u64) {
    let ev = |seq: u64, kind: EventKind| TopologyEvent {
        node_id: id.into(),
        region: "toronto".into(),
        epoch,
        seq,
        at_ms: 1,
        kind,
    };
    let events = [
        ev(1, EventKind::NodeUp { url: url.into() }),
        ev(2, EventKind::ModelReady { model: "sim-llama".into(), gpu: None, version: None }),
    ];
    let mut snap = NodeSnapshot::new(id, "toronto", url, epoch);
    snap.seq = 2;
    snap.models = vec![ModelPlacement {
        model: "sim-llama".into(),
        gpu: None,
        state: edgeroute_proto::models::ModelState::Ready,
        reason: None,
        version: None,
    }];
    bus.publish_batch(&events, &snap).await.unwrap();
}

/// A first event that is a `Heartbeat`: the bus view makes a node with no URL of it.
async fn heartbeat_only(bus: &Bus, id: &str) {
    let ev = TopologyEvent {
        node_id: id.into(),
        region: "toronto".into(),
        epoch: 7,
        seq: 1,
        at_ms: 1,
        kind: EventKind::Heartbeat,
    };
    let mut snap = NodeSnapshot::new(id, "toronto", "", 7);
    snap.seq = 1;
    bus.publish_batch(&[ev], &snap).await.unwrap();
}

fn static_node(id: &str, url: &str) -> String {
    format!("[[nodes]]\nid = \"{id}\"\nurl = \"{url}\"\nregion = \"toronto\"\n")
}

#[tokio::test]
async fn a_bus_hijack_by_id_never_moves_a_configured_node_and_a_lone_heartbeat_never_drops_it() {
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let tor = TestNode::start_as("tor-1", "toronto", SIM, None).await;
    let mtl = TestNode::start_as("mtl-1", "toronto", SIM, None).await;
    // The attacker's server even answers as `tor-1`.
    let rogue = TestNode::start_as("tor-1", "toronto", SIM, None).await;
    let (tor_url, mtl_url) = (format!("http://{}", tor.addr), format!("http://{}", mtl.addr));
    let toml =
        format!("{OPEN}{FAST}{}{}", static_node("tor-1", &tor_url), static_node("mtl-1", &mtl_url));
    let d = Replica::start(&toml, Some(bus.clone())).await;
    let want = |c: &[(String, String)]| {
        let mut c = c.to_vec();
        c.sort();
        c == [("mtl-1".to_owned(), mtl_url.clone()), ("tor-1".to_owned(), tor_url.clone())]
    };
    d.until(Duration::from_secs(5), want).await;

    // The hijack: `tor-1` announced at the attacker's URL, with an epoch nothing can top.
    announce(&bus, "tor-1", &format!("http://{}", rogue.addr), u64::MAX).await;
    // A lone heartbeat for `mtl-1`, and one for an id nobody configured.
    heartbeat_only(&bus, "mtl-1").await;
    heartbeat_only(&bus, "ghost").await;
    d.always(Duration::from_millis(1500), want).await;

    let nodes = d.get("/v1/nodes", None).await.json();
    let urls: Vec<(&str, &str)> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n["url"].as_str().unwrap()))
        .collect();
    assert_eq!(urls, [("mtl-1", mtl_url.as_str()), ("tor-1", tor_url.as_str())], "no ghost");
    let m = d.metrics().await;
    assert!(
        m.contains("edgeroute_discovery_bus_refused_total{reason=\"url_mismatch\"}"),
        "the hijack is counted:\n{m}"
    );
}

#[tokio::test]
async fn a_url_answering_as_another_node_is_a_failed_probe_and_never_served() {
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let tor = TestNode::start_as("tor-1", "toronto", SIM, None).await;
    // Configured `van-1` at an address where `mtl-1` answers (reassigned, or an attacker's).
    let other = TestNode::start_as("mtl-1", "toronto", SIM, None).await;
    // A lab replica (plaintext announcements allowed): `evil-1` announced at a URL whose
    // `/health` names `rogue`.
    let rogue = TestNode::start_as("rogue", "toronto", SIM, None).await;
    let toml = format!(
        "{OPEN}[announced]\nallow_plaintext = true\n{FAST}{}{}",
        static_node("tor-1", &format!("http://{}", tor.addr)),
        static_node("van-1", &format!("http://{}", other.addr))
    );
    let d = Replica::start(&toml, Some(bus.clone())).await;
    announce(&bus, "evil-1", &format!("http://{}", rogue.addr), 1).await;
    d.until(Duration::from_secs(5), |c| c.iter().any(|(id, _)| id == "tor-1")).await;
    d.always(Duration::from_millis(1000), |c| c.len() == 1 && c[0].0 == "tor-1").await;

    let e = d.explain(None).await;
    for id in ["van-1", "evil-1"] {
        let x = e["excluded"].as_array().unwrap().iter().find(|x| x["id"] == id).unwrap();
        let detail = x["detail"].as_str().unwrap();
        assert!(detail.contains("identity"), "{id}: {x}");
    }
    let nodes = d.get("/v1/nodes", None).await.json();
    let van = nodes["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "van-1").unwrap();
    assert_eq!(van["health"], "unhealthy");
    assert!(van["detail"]["probes"]["failed"].as_u64().unwrap() >= 1, "{van}");
    assert!(d.metrics().await.contains("outcome=\"identity\""));
}

#[tokio::test]
async fn a_plaintext_announced_node_is_refused_unless_the_lab_opts_in() {
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let node = TestNode::start_as("van-1", "toronto", SIM, None).await;
    let strict = Replica::start(&format!("{OPEN}{FAST}"), Some(bus.clone())).await;
    let lab = Replica::start(
        &format!("{OPEN}[announced]\nallow_plaintext = true\n{FAST}"),
        Some(bus.clone()),
    )
    .await;
    announce(&bus, "van-1", &format!("http://{}", node.addr), 1).await;
    lab.until(Duration::from_secs(5), |c| c.len() == 1).await;
    strict.always(Duration::from_millis(800), <[(String, String)]>::is_empty).await;
    let nodes = strict.get("/v1/nodes", None).await.json();
    assert_eq!(nodes["nodes"], serde_json::json!([]), "not even held");
    let m = strict.metrics().await;
    assert!(m.contains("edgeroute_discovery_bus_refused_total{reason=\"plaintext\"} 1"), "{m}");
}

struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "edgeroute fleet CA");
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { issuer: rcgen::Issuer::new(params, key), pem }
    }

    /// A node certificate for `names`, as `[tls]` keys written under `dir`.
    fn node_tls(&self, dir: &std::path::Path, tag: &str, names: &[&str]) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &self.issuer);
        let (c, k) = (dir.join(format!("{tag}.pem")), dir.join(format!("{tag}.key")));
        std::fs::write(&c, cert.unwrap().pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        format!("[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n", c.display(), k.display())
    }
}

#[tokio::test]
async fn an_announced_https_node_is_served_only_with_a_fleet_certificate_naming_its_id() {
    let dir = std::env::temp_dir().join(format!("edgeroute-trust-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new();
    let stranger = Ca::new();
    std::fs::write(dir.join("ca.pem"), &ca.pem).unwrap();
    let start = |id: &'static str, tls: String| async move {
        TestNode::start_as(id, "toronto", &format!("{SIM}{tls}"), None).await
    };
    // The honest node: its certificate names its host and its id.
    let good =
        start("tls-ok", ca.node_tls(&dir, "ok", &["localhost", "tls-ok.node.edgeroute"])).await;
    // Under the fleet CA, but for another node's identity (a compromised node's own cert).
    let liar =
        start("tls-liar", ca.node_tls(&dir, "liar", &["localhost", "tls-ok.node.edgeroute"])).await;
    // Names its id, but not under the fleet CA.
    let outsider =
        start("tls-out", stranger.node_tls(&dir, "out", &["localhost", "tls-out.node.edgeroute"]))
            .await;
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let toml = format!(
        "{OPEN}[probe]\ninterval_ms = 200\ntimeout_ms = 150\nca_file = \"{}\"\n",
        dir.join("ca.pem").display()
    );
    let d = Replica::start(&toml, Some(bus.clone())).await;
    for (id, node) in [("tls-ok", &good), ("tls-liar", &liar), ("tls-out", &outsider)] {
        announce(&bus, id, &format!("https://localhost:{}", node.addr.port()), 1).await;
    }
    d.until(Duration::from_secs(5), |c| c.iter().any(|(id, _)| id == "tls-ok")).await;
    d.always(Duration::from_millis(800), |c| c.len() == 1 && c[0].0 == "tls-ok").await;
    let nodes = d.get("/v1/nodes", None).await.json();
    let error = |id: &str| {
        let n = nodes["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap();
        n["detail"]["probes"]["last_error"].as_str().unwrap_or_default().to_lowercase()
    };
    assert!(error("tls-liar").contains("identity"), "{}", error("tls-liar"));
    assert!(error("tls-out").contains("certificate"), "{}", error("tls-out"));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn an_inference_token_gets_the_ranking_but_not_the_fleets_map() {
    use edgeroute_auth::Scope;
    use edgeroute_test_util::node::{SECRET, mint_hs256, mint_hs256_fleet};
    let dir = std::env::temp_dir().join(format!("edgeroute-trust-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let node = TestNode::start_as("tor-1", "toronto", SIM, None).await;
    let toml = format!(
        "[auth]\nhs256_secret_file = \"{}\"\n{FAST}{}",
        dir.join("secret").display(),
        static_node("tor-1", &format!("http://{}", node.addr))
    );
    let d = Replica::start(&toml, None).await;
    let inference = mint_hs256("tenant-a", &[Scope::Inference], 600);
    let admin = mint_hs256_fleet("operator", &[Scope::Admin], 600);
    let both = mint_hs256_fleet("operator", &[Scope::Inference, Scope::Admin], 600);
    // An admin token for one node (or none named) administers that node, not the fleet's map.
    let node_admin = edgeroute_auth::mint(
        &edgeroute_auth::SigningKey::Hs256(SECRET.as_bytes().to_vec()),
        &edgeroute_auth::MintOptions {
            sub: "operator".into(),
            scopes: [Scope::Admin].into_iter().collect(),
            aud: Some(edgeroute_auth::admin::node_audience("tor-1")),
            iss: None,
            ttl_s: 600,
            now_unix_s: edgeroute_core::clock::unix_ms() / 1000,
            kid: None,
            nbf: None,
            residency: None,
            claims: Default::default(),
        },
    )
    .unwrap();
    let unscoped = mint_hs256("operator", &[Scope::Admin], 600);
    let call = |path: &'static str, token: &String| {
        let (addr, token) = (d.addr, token.clone());
        async move {
            let r = get(addr, path, Some(&token)).await;
            let e = r.json();
            (r.status.as_u16(), e["error"]["code"].as_str().map(str::to_owned), e)
        }
    };
    let explain = "/v1/discover?model=sim-llama&explain=true";
    let t = Instant::now();
    while call("/v1/discover?model=sim-llama", &inference).await.2["candidates"] == Value::Null
        || call("/v1/discover?model=sim-llama", &inference).await.2["candidates"]
            .as_array()
            .unwrap()
            .is_empty()
    {
        assert!(t.elapsed() < Duration::from_secs(5), "never verified");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The inference caller: the ranking, yes; the map, no.
    let (status, _, body) = call("/v1/discover?model=sim-llama", &inference).await;
    assert_eq!((status, body["candidates"][0]["id"].as_str()), (200, Some("tor-1")));
    assert!(body.get("excluded").is_none() && body["candidates"][0].get("factors").is_none());
    let (status, code, body) = call(explain, &inference).await;
    assert_eq!((status, code.as_deref()), (403, Some("insufficient_scope")));
    assert_eq!(body["error"]["param"], "explain");
    for path in ["/v1/nodes", "/v1/topology"] {
        assert_eq!(call(path, &inference).await.0, 403, "{path}");
    }
    // The operator, with a token naming the fleet: the map.
    for operator in [&both, &admin] {
        let (status, _, body) = call(explain, operator).await;
        assert_eq!(status, 200);
        assert!(body["excluded"].is_array() && body["candidates"][0]["factors"].is_object());
    }
    // An admin token for one node is neither a client nor the fleet's operator.
    assert_eq!(call(explain, &node_admin).await.0, 403);
    for path in ["/v1/nodes", "/v1/topology"] {
        assert_eq!(call(path, &admin).await.0, 200, "{path}");
        for partial in [&node_admin, &unscoped] {
            let (status, code, _) = call(path, partial).await;
            assert_eq!((status, code.as_deref()), (403, Some("admin_token_not_for_the_fleet")));
        }
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Counts probes and refuses them at once (the fake ids lead nowhere).
#[derive(Debug, Default)]
struct Counting {
    probes: AtomicU64,
}

impl Probe for Counting {
    fn probe(&self, _uri: http::Uri) -> ProbeFuture {
        self.probes.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Err(ProbeError::Connect("connection refused".into())) })
    }
}

#[tokio::test]
async fn ten_thousand_announced_fake_nodes_stay_within_the_fleet_and_probe_caps() {
    const FAKES: usize = 10_000;
    const MAX_NODES: usize = 100;
    const PER_S: u64 = 50;
    // The bus view has its own cap (4096 nodes by default): lifted here, so that every fake
    // reaches discovery and discovery's own cap is what is tested.
    let bus = Bus::embedded(&BusConfig { max_nodes: 2 * FAKES, ..BusConfig::embedded() }).unwrap();
    let toml = format!(
        "{OPEN}[announced]\nallow_plaintext = true\nmax_nodes = {MAX_NODES}\nmax_probes_per_s = {PER_S}\n{FAST}"
    );
    let counting = Arc::new(Counting::default());
    let d = Discovery::build(DiscoveryConfig::from_toml(&toml, |_| None).unwrap())
        .unwrap()
        .with_bus(bus.clone())
        .with_probe(counting.clone());
    let t0 = Instant::now();
    let served = d.clone().spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    for i in 0..FAKES {
        let url = format!("http://10.{}.{}.{}:8080", i / 65_536, (i / 256) % 256, i % 256);
        announce(&bus, &format!("fake-{i}"), &url, 1).await;
    }
    let over_cap = || async {
        let m = get(served.addr(), "/metrics", None).await;
        String::from_utf8_lossy(&m.body)
            .lines()
            .find(|l| l.starts_with("edgeroute_discovery_bus_refused_total{reason=\"over_cap\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Until the replica has taken in every announcement (generous: a loaded machine).
    let t = Instant::now();
    while over_cap().await < (FAKES - MAX_NODES) as u64 && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let probes = counting.probes.load(Ordering::SeqCst);
    let fleet = d.snapshot().len();
    println!("{FAKES} announced: fleet {fleet}, {probes} probes in {elapsed:.1} s");
    assert!(fleet <= MAX_NODES, "the fleet grew to {fleet}");
    // The budget: full at the start, then PER_S a second (an upper bound: a loaded machine
    // only probes less).
    let budget = PER_S as f64 * (1.0 + elapsed) + 1.0;
    assert!((probes as f64) <= budget, "{probes} probes in {elapsed:.1} s (budget {budget})");
    assert!(probes > 0, "the held nodes are probed");
    let refused = over_cap().await;
    assert!(refused >= (FAKES - MAX_NODES) as u64, "{refused} counted over the cap");
}
