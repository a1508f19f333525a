//! Degraded mode: the model a tenant asked for leaves the fleet, the routing policy's cascade
//! names a reduced model that is available, and the router's answer comes from it — and says
//! so (`x-edgeroute-served-model`, `x-edgeroute-degraded: cascade`), rather than failing.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_discovery::{Discovery, DiscoveryConfig};
use edgeroute_lab::fleet::{FleetBackend, FleetSpec, NodeSpec};
use edgeroute_router::{RouterConfig, RouterService};
use edgeroute_test_util::node::{CASCADE_POLICY, SECRET, mint_hs256};
use edgeroute_test_util::{TestNode, get, post_json, spawn_router};

async fn listed(discovery: SocketAddr, model: &str) -> Vec<(String, Option<String>)> {
    let r = get(discovery, &format!("/v1/discover?model={model}&k=10"), None).await.json();
    r["candidates"]
        .as_array()
        .map(|c| {
            c.iter()
                .map(|c| {
                    (
                        c["id"].as_str().unwrap().to_owned(),
                        c["serve_as"].as_str().map(str::to_owned),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_asked_model_gone_the_cascade_answers_and_the_answer_says_it_is_degraded() {
    let dir =
        std::env::temp_dir().join(format!("edgeroute-router-degraded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for m in ["llama", "nemotron"] {
        std::fs::create_dir_all(dir.join("models").join(m)).unwrap();
        std::fs::write(dir.join("models").join(m).join("model.gguf"), [0u8; 64]).unwrap();
    }
    std::fs::write(dir.join("policy.toml"), CASCADE_POLICY).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let mut fleet = FleetSpec {
        nodes: vec![NodeSpec::new("tor-1", "toronto", 5), NodeSpec::new("mtl-1", "montreal", 5)],
        backend: FleetBackend::Sim {
            tokens_per_s: 2000.0,
            prefill_us_per_token: 0,
            spare_gpu: false,
        },
        ..FleetSpec::open()
    };
    fleet.probe_ms = (100, 80);
    let (mut nodes, mut urls) = (Vec::new(), Vec::new());
    for i in 0..fleet.nodes.len() {
        let mut cfg = fleet.node_config(i, None);
        cfg.models.allowed_local_roots = vec![dir.join("models")];
        cfg.models.sim_load_time_ms = 10;
        let node = TestNode::start_config(cfg, None).await;
        urls.push(format!("http://{}", node.addr));
        nodes.push(node);
    }
    let mut cfg = fleet.static_discovery_config("toronto", &urls);
    let section = format!(
        "[discovery]\nallow_unauthenticated = true\n[policy]\nfile = \"{}\"\nreload_interval_ms = 100\n",
        dir.join("policy.toml").display()
    );
    cfg.policy = DiscoveryConfig::from_toml(&section, |_| None).unwrap().policy;
    cfg.serving.ttl_ms = 300;
    let discovery =
        Discovery::build(cfg).unwrap().spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
    let models = dir.join("models");
    nodes[0].load_local(&models, "nemotron", Some("v1")).await;
    nodes[0].load_local(&models, "llama", Some("v1")).await;
    nodes[1].load_local(&models, "llama", Some("v1")).await;
    let t = Instant::now();
    while listed(discovery.addr(), "nemotron").await != [("tor-1".to_owned(), None)] {
        assert!(t.elapsed() < Duration::from_secs(10), "nemotron never listed on tor-1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let text = format!(
        "[router]\nid = \"router-tor\"\ndiscovery = [\"http://{}\"]\n[auth]\nhs256_secret_file = \"{}\"\n",
        discovery.addr(),
        dir.join("secret").display()
    );
    let router = RouterService::build(RouterConfig::from_toml(&text).unwrap()).unwrap();
    let server = spawn_router(router.routes()).await;
    let acme = mint_hs256("acme", &[Scope::Inference], 600);
    let chat = |stream: bool| {
        serde_json::json!({"model": "nemotron", "max_tokens": 3, "stream": stream,
                           "messages": [{"role": "user", "content": "hello"}]})
        .to_string()
    };
    let r = post_json(server.addr, "/v1/chat/completions", Some(&acme), &[], chat(false)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["model"], "nemotron");
    assert_eq!(
        (r.header("x-edgeroute-served-model"), r.header("x-edgeroute-degraded")),
        (None, None)
    );
    assert_eq!(r.header("x-edgeroute-node"), Some("tor-1"));
    assert_eq!(r.header("x-edgeroute-model-version"), Some("v1"), "the version that served");
    assert_eq!(r.header("x-edgeroute-tier"), Some("edge"));

    // nemotron leaves the fleet: the cascade's llama answers, and the answer says so.
    let body = serde_json::json!({"model": "nemotron"}).to_string();
    assert!(nodes[0].admin_post("/v1/models/unload", body).await.status.is_success());
    let t = Instant::now();
    loop {
        let l = listed(discovery.addr(), "nemotron").await;
        if !l.is_empty() && l.iter().all(|(_, s)| s.as_deref() == Some("llama")) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the cascade never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for stream in [false, true] {
        let key = format!("after-{stream}");
        let r = post_json(
            server.addr,
            "/v1/chat/completions",
            Some(&acme),
            &[("x-edgeroute-session", &key)],
            chat(stream),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        if !stream {
            assert_eq!(r.json()["model"], "llama", "the body names the model that served");
        }
        assert_eq!(r.header("x-edgeroute-served-model"), Some("llama"), "stream: {stream}");
        assert_eq!(r.header("x-edgeroute-degraded"), Some("cascade"));
        assert_eq!(r.header("x-edgeroute-model-version"), Some("v1"));
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
