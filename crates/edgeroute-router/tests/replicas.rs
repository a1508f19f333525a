//! Three router replicas of a region share what they learn of the nodes over the topology bus:
//! a node one replica ejected (after failures it saw) is not tried first by the others, which
//! never saw it fail — and each still answers from its own local state.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_bus::{Bus, BusConfig};
use edgeroute_discovery::Discovery;
use edgeroute_lab::fleet::{FleetBackend, FleetSpec, NodeSpec};
use edgeroute_lab::relay::Relay;
use edgeroute_router::{RouterConfig, RouterService};
use edgeroute_test_util::node::{SECRET, mint_hs256};
use edgeroute_test_util::{TestNode, get, post_json};

mod common;
use common::router_metric;

fn chat() -> String {
    serde_json::json!({"model": "sim-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_one_replica_ejected_is_not_tried_first_by_the_others() {
    let dir = std::env::temp_dir().join(format!("edgeroute-replicas-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let mut spec = FleetSpec {
        nodes: vec![NodeSpec::new("tor-1", "toronto", 8), NodeSpec::new("mtl-1", "montreal", 8)],
        backend: FleetBackend::Sim {
            tokens_per_s: 2000.0,
            prefill_us_per_token: 0,
            spare_gpu: false,
        },
        ..FleetSpec::open()
    };
    // Discovery probes slowly: for the test's seconds it still lists the node that died, so
    // only the replicas' own learning (and sharing) keeps requests off it.
    spec.probe_ms = (30_000, 1_000);
    let (mut nodes, mut relays, mut urls) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..spec.nodes.len() {
        let node = TestNode::start_config(spec.node_config(i, None), None).await;
        let relay = Relay::start(node.addr).await.unwrap();
        urls.push(format!("http://{}", relay.addr()));
        nodes.push(node);
        relays.push(relay);
    }
    let cfg = spec.static_discovery_config("toronto", &urls);
    let discovery =
        Discovery::build(cfg).unwrap().spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let t = Instant::now();
    while get(discovery.addr(), "/v1/discover?model=sim-llama&k=5", None).await.json()["candidates"]
        .as_array()
        .is_none_or(|c| c.len() < spec.nodes.len().min(5))
    {
        assert!(t.elapsed() < Duration::from_secs(5), "discovery never listed the fleet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Three replicas on one bus (embedded: one process; NATS across machines).
    let bus = Bus::connect(&BusConfig::default()).await.unwrap();
    let mut replicas = Vec::new();
    for id in ["router-a", "router-b", "router-c"] {
        let text = format!(
            "[router]\nid = \"{id}\"\nregion = \"toronto\"\ndiscovery = [\"http://{}\"]\n\
             [auth]\nhs256_secret_file = \"{}\"\n[limits]\nrate_limit_per_s = 10000\nrate_limit_burst = 10000\n",
            discovery.addr(),
            dir.join("secret").display()
        );
        let service = RouterService::build(RouterConfig::from_toml(&text).unwrap())
            .unwrap()
            .with_bus(bus.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(service.serve(listener, std::future::pending()));
        replicas.push(addr);
    }
    let (a, b, c) = (replicas[0], replicas[1], replicas[2]);
    let acme = mint_hs256("acme", &[Scope::Inference], 600);

    // On every replica, sessions pinned to tor-1 (session keys tried until some were). A new
    // session goes to the node whose probe predicts the first token soonest, near-ties at
    // random: a probe that caught a busy moment on a loaded host can send a whole burst of new
    // sessions to mtl-1 for the probes' lifetime (2 s). Past the first 60 keys, keys keep
    // coming slowly until the router has measured the paths again.
    let mut pinned = Vec::new();
    for r in [a, b, c] {
        let mut found = Vec::new();
        let t = Instant::now();
        for i in 0.. {
            if found.len() == 3 || (!found.is_empty() && i >= 60) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "no session of {r} settled on tor-1 in 15 s ({i} keys)"
            );
            if i >= 60 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let k = format!("pin-{i}");
            let res = post_json(
                r,
                "/v1/chat/completions",
                Some(&acme),
                &[("x-edgeroute-session", &k)],
                chat(),
            )
            .await;
            assert_eq!(res.status, 200);
            if res.header("x-edgeroute-node") == Some("tor-1") {
                found.push(k);
            }
        }
        pinned.push(found);
    }

    // tor-1 dies. Replica A alone sees it fail (its sessions' turns), and ejects it.
    relays[0].cut();
    let t = Instant::now();
    'eject: loop {
        for k in &pinned[0] {
            if router_metric(a, "edgeroute_router_share_published_total").await > 0 {
                break 'eject;
            }
            let res = post_json(
                a,
                "/v1/chat/completions",
                Some(&acme),
                &[("x-edgeroute-session", k)],
                chat(),
            )
            .await;
            assert_eq!(res.status, 200, "A's callers see no failure: the SDK moved them");
        }
        assert!(t.elapsed() < Duration::from_secs(10), "A never ejected tor-1");
    }
    for r in [b, c] {
        let t = Instant::now();
        while router_metric(r, "edgeroute_router_share_applied_ejections_total").await == 0 {
            assert!(t.elapsed() < Duration::from_secs(2), "the ejection never reached {r}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // B and C move their tor-1 sessions without trying tor-1: no failover, no failure.
    for (r, keys) in [b, c].into_iter().zip(&pinned[1..]) {
        let k = &keys[0];
        let before = router_metric(r, "edgeroute_router_client_failovers_total").await;
        let res = post_json(
            r,
            "/v1/chat/completions",
            Some(&acme),
            &[("x-edgeroute-session", k)],
            chat(),
        )
        .await;
        assert_eq!(res.status, 200);
        assert_eq!(res.header("x-edgeroute-node"), Some("mtl-1"));
        let after = router_metric(r, "edgeroute_router_client_failovers_total").await;
        assert_eq!(after, before, "{r} tried the node replica A had ejected");
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
