//! The fleet the router's integration tests stand on: two simulator nodes (`tor-1` in
//! Toronto, `mtl-1` in Montreal, 8 slots each), each reached through a relay the test can cut
//! (connections reset and refused: the node "dies"), a discovery replica that has verified
//! both, and a directory holding the fleet's HS256 secret (`secret`).
#![allow(clippy::unwrap_used, dead_code)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_discovery::Discovery;
use edgeroute_lab::fleet::{FleetBackend, FleetSpec, NodeSpec};
use edgeroute_lab::relay::Relay;
use edgeroute_test_util::node::{SECRET, mint_hs256_fleet};
use edgeroute_test_util::{TestNode, get};

pub struct Fleet {
    pub nodes: Vec<TestNode>,
    pub relays: Vec<Relay>,
    pub discovery: edgeroute_discovery::Spawned,
    pub dir: PathBuf,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Fleet {
    /// Nodes at `tokens_per_s`; discovery probes every `probe_ms.0` ms (timeout `probe_ms.1`).
    pub async fn start(tag: &str, tokens_per_s: f64, probe_ms: (u64, u64)) -> Fleet {
        Fleet::start_tuned(tag, tokens_per_s, probe_ms, |_| {}).await
    }

    /// [`Fleet::start`], each node's config passed through `tune` first.
    pub async fn start_tuned(
        tag: &str,
        tokens_per_s: f64,
        probe_ms: (u64, u64),
        tune: impl Fn(&mut edgeroute_node::NodeConfig),
    ) -> Fleet {
        let dir =
            std::env::temp_dir().join(format!("edgeroute-router-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), SECRET).unwrap();
        let mut spec = FleetSpec {
            nodes: vec![
                NodeSpec::new("tor-1", "toronto", 8),
                NodeSpec::new("mtl-1", "montreal", 8),
            ],
            backend: FleetBackend::Sim { tokens_per_s, prefill_us_per_token: 0, spare_gpu: false },
            ..FleetSpec::open()
        };
        spec.probe_ms = probe_ms;
        let (mut nodes, mut relays, mut urls) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..spec.nodes.len() {
            let mut cfg = spec.node_config(i, None);
            tune(&mut cfg);
            let node = TestNode::start_config(cfg, None).await;
            let relay = Relay::start(node.addr).await.unwrap();
            urls.push(format!("http://{}", relay.addr()));
            nodes.push(node);
            relays.push(relay);
        }
        let cfg = spec.static_discovery_config("toronto", &urls);
        let discovery = Discovery::build(cfg)
            .unwrap()
            .spawn(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let t = Instant::now();
        loop {
            let r = get(discovery.addr(), "/v1/discover?model=sim-llama&k=5", None).await;
            if r.json()["candidates"].as_array().is_some_and(|c| c.len() == 2) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "discovery never listed the fleet");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Fleet { nodes, relays, discovery, dir }
    }

    /// Chat completions node `i` answered 200 (its `/metrics`).
    pub async fn answered(&self, i: usize) -> u64 {
        let admin = mint_hs256_fleet("op", &[Scope::Admin], 60);
        let m = get(self.nodes[i].addr, "/metrics", Some(&admin)).await;
        String::from_utf8_lossy(&m.body)
            .lines()
            .find_map(|l| {
                l.strip_prefix("edgeroute_node_requests_total{route=\"chat\",status=\"200\"} ")
            })
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// A router's `[router]` and `[auth]` sections (the fleet's secret), then `extra`.
    pub fn router_config(&self, id: &str, extra: &str) -> String {
        format!(
            "[router]\nid = \"{id}\"\nregion = \"toronto\"\ndiscovery = [\"http://{}\"]\n\
             [auth]\nhs256_secret_file = \"{}\"\n{extra}\n",
            self.discovery.addr(),
            self.dir.join("secret").display(),
        )
    }
}

/// A counter of a router's `/metrics` (read with an admin token); panics when it is absent.
pub async fn router_metric(router: SocketAddr, name: &str) -> u64 {
    let admin = mint_hs256_fleet("op", &[Scope::Admin], 60);
    let m = get(router, "/metrics", Some(&admin)).await;
    let text = String::from_utf8_lossy(&m.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in {text}"))
        .trim()
        .parse()
        .unwrap()
}
