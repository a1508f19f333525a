//! Discovery against real simulator nodes on loopback: a three-region fleet discovered, scored
//! and served; drain, stop and model loads reflected; a killed node ejected in the detector's
//! time and readmitted only after verified recovery; two replicas over a real NATS server that
//! agree on the fleet and survive NATS going away.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::{Duration, Instant};

use edgeroute_bus::{Bus, BusConfig};
use edgeroute_lab::relay::Relay;
use edgeroute_test_util::nats::NatsServer;
use edgeroute_test_util::{Reply, TestNode, get};
use serde_json::{Value, json};

mod common;

use common::Replica;

impl Replica {
    async fn discover(&self, query: &str) -> Reply {
        get(self.addr, &format!("/v1/discover?{query}"), None).await
    }

    async fn ids(&self, query: &str) -> Vec<String> {
        let r = self.discover(query).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Polls `/v1/discover?{query}` until the candidate ids satisfy `pred`; returns the time.
    async fn until(
        &self,
        query: &str,
        limit: Duration,
        pred: impl Fn(&[String]) -> bool,
    ) -> Duration {
        let t = Instant::now();
        loop {
            let ids = self.ids(query).await;
            if pred(&ids) {
                return t.elapsed();
            }
            assert!(t.elapsed() < limit, "`{query}` still gives {ids:?} after {limit:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn json(&self, path: &str) -> Value {
        let r = get(self.addr, path, None).await;
        assert_eq!(r.status, 200);
        r.json()
    }
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edgeroute-disc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("fresh-model")).unwrap();
    d
}

fn node_cfg(root: &std::path::Path, ttft_ms: u64, extra: &str) -> String {
    format!(
        "[models]\nallowed_local_roots = [\"{}\"]\nsim_load_time_ms = 20\n{extra}\n[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = {ttft_ms}\nprefill_us_per_token = 0\ntokens_per_s = 1000.0\n",
        root.display()
    )
}

const FAST: &str = "[probe]\ninterval_ms = 200\ntimeout_ms = 150\n[health]\nmin_std_ms = 50\n";

/// A loopback lab replica: no `[auth]`, and nodes announced on the bus at `http://` URLs
/// (both explicit opt-ins).
const LAB: &str = "allow_unauthenticated = true\n[announced]\nallow_plaintext = true\n";

async fn warm(node: &TestNode, n: usize) {
    let chat = json!({"model": "sim-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    for _ in 0..n {
        assert_eq!(node.chat(chat.clone()).await.status, 200);
    }
}

#[tokio::test]
async fn a_three_region_fleet_is_discovered_scored_and_served() {
    let root = tempdir("three");
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let van =
        TestNode::start_as("van-1", "vancouver", &node_cfg(&root, 60, ""), Some(bus.clone())).await;
    let mut tor =
        TestNode::start_as("tor-1", "toronto", &node_cfg(&root, 10, ""), Some(bus.clone())).await;
    let mtl =
        TestNode::start_as("mtl-1", "montreal", &node_cfg(&root, 30, ""), Some(bus.clone())).await;
    // Enough traffic that each node reports its own TTFT percentiles.
    for n in [&van, &tor, &mtl] {
        warm(n, 6).await;
    }
    let d =
        Replica::start(&format!("[discovery]\nid = \"disc-tor\"\n{LAB}{FAST}"), Some(bus.clone()))
            .await;
    let q = "model=sim-llama&k=3";
    d.until(q, Duration::from_secs(5), |ids| ids == ["tor-1", "mtl-1", "van-1"]).await;

    let r = d.discover(q).await;
    // Clients read the answer through the shared wire types.
    let typed: edgeroute_proto::discovery::DiscoverResponse =
        serde_json::from_slice(&r.body).unwrap();
    assert_eq!((typed.candidates.len(), typed.candidates[0].id.as_str()), (3, "tor-1"));
    let unknown: edgeroute_proto::discovery::DiscoverResponse =
        serde_json::from_slice(&d.discover("model=nope").await.body).unwrap();
    assert_eq!(unknown.reason.unwrap().code, "model_unknown");
    assert_eq!(r.header("x-edgeroute-discovery"), Some("disc-tor"));
    assert!(r.header("cache-control").unwrap().contains("max-age=5"));
    let body = r.json();
    assert_eq!(body["ttl_ms"], 5000);
    assert_eq!(body["stale_ok_ms"], 300_000);
    let best = &body["candidates"][0];
    assert_eq!(best["region"], "toronto");
    assert_eq!(best["health"], "ready");
    assert_eq!(best["url"], format!("http://{}", tor.addr));
    assert!(best["models"].as_array().unwrap().contains(&json!("sim-llama")));
    assert!(best["ttft_p50_ms"].as_f64().unwrap() >= 10.0);
    let scores: Vec<f64> = body["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["score_ms"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] <= w[1]), "{scores:?}");

    // Data residency is a hard filter; k bounds the answer.
    assert_eq!(d.ids("model=sim-llama&region=vancouver,montreal").await, ["mtl-1", "van-1"]);
    assert_eq!(d.ids("model=sim-llama&k=1").await, ["tor-1"]);
    // A client in Vancouver: its region's best node is added for its probes to weigh; never
    // outside the allowed regions, never twice.
    assert_eq!(d.ids("model=sim-llama&k=1&near=vancouver").await, ["tor-1", "van-1"]);
    assert_eq!(d.ids("model=sim-llama&k=1&near=toronto").await, ["tor-1"]);
    assert_eq!(d.ids("model=sim-llama&region=toronto&k=1&near=vancouver").await, ["tor-1"]);
    // Explain: every factor, and why the others were left out.
    let e = d.discover("model=sim-llama&region=toronto&explain=true").await.json();
    let f = &e["candidates"][0]["factors"];
    assert!(f["ttft_p50_ms"].as_f64().unwrap() > 0.0 && f["queue_wait_ms"].is_number());
    let excluded: Vec<(&str, &str)> = e["excluded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["id"].as_str().unwrap(), x["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(excluded, [("mtl-1", "region_not_allowed"), ("van-1", "region_not_allowed")]);

    // Bad input: precise 4xx; an unknown model is an empty answer with a reason, not an error.
    let unknown = d.discover("model=gpt-9").await;
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.json()["candidates"], json!([]));
    assert_eq!(unknown.json()["reason"]["code"], "model_unknown");
    assert!(unknown.json()["reason"]["message"].as_str().unwrap().contains("sim-llama"));
    for (query, param) in [
        ("model=sim-llama&k=0", "k"),
        ("model=sim-llama&region=to%20ronto", "region"),
        ("k=3", "model"),
        ("model=sim-llama&regoin=toronto", "regoin"),
    ] {
        let r = d.discover(query).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["error"]["param"].as_str().unwrap()),
            (400, param),
            "{query}"
        );
    }
    let none = d.discover("model=sim-llama&region=tokyo").await.json();
    assert_eq!(none["reason"]["code"], "constraints_unsatisfied");

    // Fleet views.
    let nodes = d.json("/v1/nodes").await;
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 3);
    let topo = d.json("/v1/topology").await;
    assert_eq!(topo["matrix"]["sim-llama"]["van-1"], "ready");
    let h = d.json("/health").await;
    assert_eq!((h["status"].as_str(), h["nodes"].as_u64()), (Some("ready"), Some(3)));
    let m = get(d.addr, "/metrics", None).await;
    assert!(
        String::from_utf8_lossy(&m.body).contains("edgeroute_discovery_discover_requests_total")
    );

    // A drain reaches discovery through the bus: the node leaves the list at once.
    tor.admin_post("/admin/drain", "{}").await;
    d.until(q, Duration::from_secs(2), |ids| ids == ["mtl-1", "van-1"]).await;
    let e = d.discover("model=sim-llama&explain").await.json();
    assert_eq!(e["excluded"][0]["reason"], "draining");
    edgeroute_test_util::client::method(
        tor.addr,
        "DELETE",
        "/admin/drain",
        Some(&tor.admin_token()),
        "",
    )
    .await;
    d.until(q, Duration::from_secs(2), |ids| ids.len() == 3).await;

    // A model loaded on a node is served by discovery within milliseconds.
    let r = van
        .admin_post("/v1/models/load", json!({"path": root.join("fresh-model")}).to_string())
        .await;
    assert_eq!(r.status, 202);
    let loading = d.discover("model=fresh-model").await.json();
    assert!(loading["candidates"] == json!([]));
    let took = d.until("model=fresh-model", Duration::from_secs(2), |ids| ids == ["van-1"]).await;
    println!(
        "fresh-model visible in discovery after {took:?} (embedded bus, 20 ms simulated load)"
    );

    // A clean shutdown is announced on the bus: the node leaves the list.
    tor.begin_shutdown().await.unwrap();
    d.until(q, Duration::from_secs(3), |ids| ids == ["mtl-1", "van-1"]).await;
    std::fs::remove_dir_all(root).ok();
}

#[tokio::test]
async fn an_answer_of_k_nodes_keeps_the_best_node_of_a_second_region() {
    let root = tempdir("standby");
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let tor1 =
        TestNode::start_as("tor-1", "toronto", &node_cfg(&root, 10, ""), Some(bus.clone())).await;
    let tor2 =
        TestNode::start_as("tor-2", "toronto", &node_cfg(&root, 40, ""), Some(bus.clone())).await;
    let van =
        TestNode::start_as("van-1", "vancouver", &node_cfg(&root, 120, ""), Some(bus.clone()))
            .await;
    for n in [&tor1, &tor2, &van] {
        warm(n, 6).await;
    }
    let d = Replica::start(&format!("[discovery]\nid = \"disc\"\n{LAB}{FAST}"), Some(bus)).await;
    d.until("model=sim-llama&k=3", Duration::from_secs(5), |ids| ids.len() == 3).await;
    // By score alone the two best are both in Toronto: the standby would share the pinned
    // node's region. The second place goes to Vancouver's best instead.
    assert_eq!(d.ids("model=sim-llama&k=2").await, ["tor-1", "van-1"]);
    assert_eq!(d.ids("model=sim-llama&k=3").await, ["tor-1", "tor-2", "van-1"]);
    // Residency still binds: within Toronto there is no second region to keep.
    assert_eq!(d.ids("model=sim-llama&region=toronto&k=2").await, ["tor-1", "tor-2"]);
    std::fs::remove_dir_all(root).ok();
}

#[tokio::test]
async fn a_model_being_unloaded_leaves_discovery_at_once_while_its_drain_runs() {
    let root = tempdir("unload");
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    // Answers stream for about two seconds; the drain may last 30.
    let slow = "[backend.sim]\nttft_base_ms = 2\ntokens_per_s = 20.0\nmin_answer_tokens = 40\nmax_answer_tokens = 40\n";
    let tor_cfg = format!(
        "[models]\nunload_drain_ms = 30000\n[backend]\nkind = \"sim\"\n{slow}[[backend.sim.models]]\nid = \"sim-llama\"\n[[backend.sim.models]]\nid = \"tts\"\n"
    );
    let tor = TestNode::start_as("tor-1", "toronto", &tor_cfg, Some(bus.clone())).await;
    let mtl =
        TestNode::start_as("mtl-1", "montreal", &node_cfg(&root, 30, ""), Some(bus.clone())).await;
    let d = Replica::start(&format!("[discovery]\nid = \"disc\"\n{LAB}{FAST}"), Some(bus)).await;
    let q = "model=sim-llama&k=3";
    d.until(q, Duration::from_secs(5), |ids| ids.len() == 2).await;
    d.until("model=tts", Duration::from_secs(5), |ids| ids == ["tor-1"]).await;

    // A turn in flight on tor-1 when its operator unloads the model.
    let body = json!({"model": "sim-llama", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let req = http::Request::post(format!("http://{}/v1/chat/completions", tor.addr))
        .header("authorization", format!("Bearer {}", tor.token()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let in_flight = edgeroute_test_util::client::send(tor.addr, req).await;
    assert_eq!(in_flight.status(), 200);
    let r = tor.admin_post("/v1/models/unload", json!({"model": "sim-llama"}).to_string()).await;
    assert_eq!((r.status.as_u16(), r.json()["state"].as_str()), (202, Some("draining")));

    // Discovery stops listing tor-1 for that model while the drain still runs...
    let took = d.until(q, Duration::from_secs(1), |ids| ids == ["mtl-1"]).await;
    println!("a draining model left discovery after {took:?}");
    let status = get(tor.addr, "/v1/models/sim-llama", Some(&tor.token())).await;
    assert_eq!(status.json()["state"], "draining", "the drain was over before discovery noticed");
    let e = d.discover("model=sim-llama&explain=true").await.json();
    let excluded = e["excluded"].as_array().unwrap();
    assert_eq!(
        (excluded[0]["id"].as_str(), excluded[0]["reason"].as_str()),
        (Some("tor-1"), Some("model_not_ready"))
    );
    assert!(excluded[0]["detail"].as_str().unwrap().contains("draining"), "{e}");
    // ...and keeps listing it for its other models.
    assert_eq!(d.ids("model=tts").await, ["tor-1"]);

    // The drain ends with the turn: the model is gone and stays unlisted.
    let answer = edgeroute_test_util::client::read_stream(in_flight).await;
    assert!(answer.done());
    let t = Instant::now();
    while get(tor.addr, "/v1/models/sim-llama", Some(&tor.token())).await.status != 404 {
        assert!(t.elapsed() < Duration::from_secs(5), "the unload never completed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.ids(q).await, ["mtl-1"]);
    drop(mtl);
    std::fs::remove_dir_all(root).ok();
}

#[tokio::test]
async fn a_killed_node_is_ejected_in_detector_time_and_readmitted_after_verified_recovery() {
    let root = tempdir("kill");
    let a = TestNode::start_as("tor-1", "toronto", &node_cfg(&root, 5, ""), None).await;
    let b = TestNode::start_as("tor-2", "toronto", &node_cfg(&root, 5, ""), None).await;
    let mut switch = Relay::start(a.addr).await.unwrap();
    // Probes every 100 ms, deviation floor 20 ms: φ crosses 8 about 100 + 5.2 × 20 ≈ 205 ms
    // after the last answered probe.
    let toml = format!(
        "[discovery]\nallow_unauthenticated = true\n\
         [probe]\ninterval_ms = 100\ntimeout_ms = 80\n[health]\nmin_std_ms = 20\n\
         [[nodes]]\nid = \"tor-1\"\nurl = \"http://{}\"\nregion = \"toronto\"\n\
         [[nodes]]\nid = \"tor-2\"\nurl = \"http://{}\"\nregion = \"toronto\"\n",
        switch.addr(),
        b.addr
    );
    let d = Replica::start(&toml, None).await;
    let q = "model=sim-llama&k=5";
    d.until(q, Duration::from_secs(3), |ids| ids.len() == 2).await;
    // Let the detector learn the probe rhythm.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(d.ids(q).await.len(), 2, "steady probes never eject");

    switch.cut();
    let gone = d.until(q, Duration::from_secs(3), |ids| ids == ["tor-2"]).await;
    println!("killed node ejected after {gone:?}");
    // At most one interval since the last answered probe, plus φ's 205 ms, plus a rebuild tick.
    assert!(gone < Duration::from_millis(600), "ejected only after {gone:?}");
    let nodes = d.json("/v1/nodes").await;
    let dead =
        nodes["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "tor-1").unwrap().clone();
    assert_eq!(dead["health"], "unhealthy");
    assert!(dead["health_reason"].as_str().unwrap().contains("ejected"), "{dead}");

    // Recovery must be verified by three consecutive good probes (~200 ms at 100 ms).
    switch.restore().await.unwrap();
    let back = d.until(q, Duration::from_secs(3), |ids| ids.len() == 2).await;
    println!("recovered node readmitted after {back:?}");
    assert!(
        back >= Duration::from_millis(150),
        "readmitted after {back:?}: one probe is not enough"
    );
    std::fs::remove_dir_all(root).ok();
}

#[tokio::test]
async fn two_replicas_over_nats_agree_and_survive_nats_going_away() {
    let mut nats = NatsServer::start();
    let root = tempdir("nats");
    let bus = format!(
        "[bus]\nkind = \"nats\"\nnats_url = \"{}\"\nheartbeat_ms = 200\nexpire_ms = 1500\nreconnect_max_ms = 200\n",
        nats.url()
    );
    let van = TestNode::start_as("van-1", "vancouver", &node_cfg(&root, 20, &bus), None).await;
    let tor = TestNode::start_as("tor-1", "toronto", &node_cfg(&root, 20, &bus), None).await;
    let replica = |id: &str| format!("[discovery]\nid = \"{id}\"\n{LAB}{FAST}{bus}");
    let a = Replica::start(&replica("disc-van"), None).await;
    let b = Replica::start(&replica("disc-tor"), None).await;
    let q = "model=sim-llama&k=5";
    for r in [&a, &b] {
        r.until(q, Duration::from_secs(5), |ids| ids == ["tor-1", "van-1"]).await;
    }
    assert_eq!(a.json("/v1/topology").await["matrix"], b.json("/v1/topology").await["matrix"]);

    // A model loaded on one node reaches both replicas over NATS.
    let r = tor
        .admin_post("/v1/models/load", json!({"path": root.join("fresh-model")}).to_string())
        .await;
    assert_eq!(r.status, 202);
    for r in [&a, &b] {
        let took =
            r.until("model=fresh-model", Duration::from_secs(2), |ids| ids == ["tor-1"]).await;
        println!("fresh-model visible after {took:?} over NATS");
    }
    assert_eq!(a.json("/v1/topology").await["matrix"], b.json("/v1/topology").await["matrix"]);

    // NATS goes away: both replicas keep answering from the last-known fleet...
    nats.stop();
    let t = Instant::now();
    while a.json("/health").await["bus"]["connected"] != false {
        assert!(t.elapsed() < Duration::from_secs(5), "replica never noticed NATS was down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.json("/health").await["status"], "degraded");
    for r in [&a, &b] {
        assert_eq!(r.ids(q).await, ["tor-1", "van-1"]);
    }
    // ...and keep pulling node health: a change made while NATS is down arrives by probe.
    tor.admin_post("/v1/models/unload", json!({"model": "fresh-model"}).to_string()).await;
    for r in [&a, &b] {
        r.until("model=fresh-model", Duration::from_secs(3), <[String]>::is_empty).await;
    }
    // NATS returns: the replicas reconnect and follow the bus again.
    nats.restart();
    for r in [&a, &b] {
        let t = Instant::now();
        while r.json("/health").await["bus"]["connected"] != true {
            assert!(t.elapsed() < Duration::from_secs(10), "replica never reconnected");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let r = van
        .admin_post(
            "/v1/models/load",
            json!({"path": root.join("fresh-model"), "id": "after-return"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 202);
    for r in [&a, &b] {
        r.until("model=after-return", Duration::from_secs(3), |ids| ids == ["van-1"]).await;
        assert_eq!(r.ids(q).await, ["tor-1", "van-1"]);
    }
    assert_eq!(a.json("/v1/topology").await["matrix"], b.json("/v1/topology").await["matrix"]);
    drop((van, tor));
    std::fs::remove_dir_all(root).ok();
}

#[tokio::test]
async fn tls_nodes_are_probed_over_https_and_an_untrusted_certificate_is_refused() {
    let root = tempdir("tls");
    let trusted = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let mut nodes = Vec::new();
    for (id, cert) in [("tls-ok", &trusted), ("tls-bad", &stranger)] {
        std::fs::write(root.join(format!("{id}.pem")), cert.cert.pem()).unwrap();
        std::fs::write(root.join(format!("{id}.key")), cert.signing_key.serialize_pem()).unwrap();
        let tls = format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            root.join(format!("{id}.pem")).display(),
            root.join(format!("{id}.key")).display()
        );
        nodes.push(TestNode::start_as(id, "toronto", &node_cfg(&root, 5, &tls), None).await);
    }
    let toml = format!(
        "[discovery]\nallow_unauthenticated = true\n\
         [probe]\ninterval_ms = 200\ntimeout_ms = 150\nca_file = \"{}\"\n\
         [[nodes]]\nid = \"tls-ok\"\nurl = \"https://localhost:{}\"\nregion = \"toronto\"\n\
         [[nodes]]\nid = \"tls-bad\"\nurl = \"https://localhost:{}\"\nregion = \"toronto\"\n",
        root.join("tls-ok.pem").display(),
        nodes[0].addr.port(),
        nodes[1].addr.port()
    );
    let d = Replica::start(&toml, None).await;
    d.until("model=sim-llama&k=5", Duration::from_secs(3), |ids| ids == ["tls-ok"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(d.ids("model=sim-llama&k=5").await, ["tls-ok"]);
    let all = d.json("/v1/nodes").await;
    let bad = all["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "tls-bad").unwrap();
    assert_eq!(bad["health"], "unhealthy");
    let err = bad["detail"]["probes"]["last_error"].as_str().unwrap();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    std::fs::remove_dir_all(root).ok();
}

#[tokio::test]
async fn with_auth_keys_clients_need_an_inference_token_and_fleet_views_an_admin_token() {
    use edgeroute_auth::Scope;
    use edgeroute_test_util::node::{SECRET, mint_hs256, mint_hs256_fleet};
    let root = tempdir("auth");
    std::fs::write(root.join("secret"), SECRET).unwrap();
    let toml = format!("[auth]\nhs256_secret_file = \"{}\"\n{FAST}", root.join("secret").display());
    let d = Replica::start(&toml, None).await;
    let inference = mint_hs256("tenant-a", &[Scope::Inference], 600);
    let admin = mint_hs256_fleet("operator", &[Scope::Admin], 600);
    let expired = mint_hs256("tenant-a", &[Scope::Inference], -60);
    let status = |path: &'static str, token: Option<String>| {
        let addr = d.addr;
        async move {
            let r = get(addr, path, token.as_deref()).await;
            (r.status.as_u16(), r.json()["error"]["code"].as_str().unwrap_or("").to_owned())
        }
    };
    let q = "/v1/discover?model=sim-llama";
    assert_eq!(status(q, None).await, (401, "missing_token".into()));
    assert_eq!(status(q, Some(expired)).await, (401, "token_expired".into()));
    assert_eq!(status(q, Some(inference.clone())).await, (200, String::new()));
    assert_eq!(status("/v1/nodes", Some(inference)).await, (403, "insufficient_scope".into()));
    assert_eq!(status("/v1/nodes", Some(admin.clone())).await, (200, String::new()));
    assert_eq!(status("/v1/topology", Some(admin)).await, (200, String::new()));
    assert_eq!(status("/health", None).await.0, 200);
    std::fs::remove_dir_all(root).ok();
}
