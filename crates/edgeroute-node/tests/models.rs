//! Models loaded and unloaded at run time: load → ready → routed-to and unload → drained → gone,
//! with the simulator and with (a fake) Triton, plus every bad input the load endpoint must
//! refuse.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeroute_proto::topology::EventKind;
use edgeroute_test_util::client::method;
use edgeroute_test_util::fake_triton::FakeTriton;
use edgeroute_test_util::{TestNode, get, post_json, spawn_router};
use serde_json::json;

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "edgeroute-models-{tag}-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn chat(model: &str) -> String {
    json!({"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

fn capture(node: &TestNode) -> Arc<Mutex<Vec<EventKind>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    node.state.models.set_sink(Arc::new(move |k| s2.lock().unwrap().push(k)));
    seen
}

fn sim_node_cfg(root: &std::path::Path) -> String {
    format!(
        "[models]\nallowed_local_roots = [\"{}\"]\nsim_load_time_ms = 300\n[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 2\ntokens_per_s = 1000.0\n\
         [[backend.sim.gpus]]\nid = \"gpu0\"\nslots = 2\nmemory_total_mb = 8000\n[[backend.sim.gpus]]\nid = \"gpu1\"\nslots = 2\nmemory_total_mb = 1000\n\
         [[backend.sim.models]]\nid = \"sim-llama\"\ngpu = \"gpu0\"\nmemory_mb = 4000\n",
        root.display()
    )
}

#[tokio::test]
async fn sim_load_ready_routed_then_unload_gone() {
    let root = tempdir("sim");
    std::fs::create_dir_all(root.join("qwen-tiny")).unwrap();
    std::fs::write(root.join("qwen-tiny/model.gguf"), vec![0u8; 2048]).unwrap();
    let node = TestNode::start(&sim_node_cfg(&root)).await;
    let events = capture(&node);

    let r = node
        .admin_post(
            "/v1/models/load",
            json!({"path": root.join("qwen-tiny"), "gpu": "gpu1", "memory_mb": 500}).to_string(),
        )
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["state"], "loading");
    assert_eq!(r.json()["id"], "qwen-tiny");
    assert_eq!(r.json()["status_url"], "/v1/models/qwen-tiny");

    // Loading: listed with its state, not routed.
    let list = get(node.addr, "/v1/models", Some(&node.token())).await.json();
    let entry =
        list["data"].as_array().unwrap().iter().find(|m| m["id"] == "qwen-tiny").cloned().unwrap();
    assert_eq!((entry["state"].as_str(), entry["gpu"].as_str()), (Some("loading"), Some("gpu1")));
    let r = node.chat(chat("qwen-tiny")).await;
    assert_eq!(r.status, 404);

    node.wait_model("qwen-tiny", "ready", Duration::from_secs(10)).await;
    let r = node.chat(chat("qwen-tiny")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let h = get(node.addr, "/health", None).await.json();
    let gpu1 = h["gpus"].as_array().unwrap().iter().find(|g| g["id"] == "gpu1").unwrap().clone();
    assert_eq!(gpu1["memory_used_mb"], 500);
    assert!(gpu1["models"].as_array().unwrap().iter().any(|m| m == "qwen-tiny"));

    // Nothing in flight: nothing to drain, the model is gone when the answer comes.
    let r = node.admin_post("/v1/models/unload", json!({"model": "qwen-tiny"}).to_string()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "unloaded");
    assert_eq!(node.chat(chat("qwen-tiny")).await.status, 404);
    assert_eq!(get(node.addr, "/v1/models/qwen-tiny", Some(&node.token())).await.status, 404);
    assert_eq!(
        node.admin_post("/v1/models/unload", json!({"model": "qwen-tiny"}).to_string())
            .await
            .status,
        404
    );

    let kinds: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .map(|k| format!("{k:?}").split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, vec!["ModelLoading", "ModelReady", "ModelUnloading", "ModelUnloaded"]);
    std::fs::remove_dir_all(root).ok();
}

fn event_names(events: &Mutex<Vec<EventKind>>) -> Vec<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .map(|k| format!("{k:?}").split(' ').next().unwrap().to_owned())
        .collect()
}

/// A simulator whose answers stream for about two seconds (40 tokens at 20/s).
fn slow_node_cfg(unload_drain_ms: u64) -> String {
    format!(
        "[models]\nunload_drain_ms = {unload_drain_ms}\n[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 2\ntokens_per_s = 20.0\n\
         min_answer_tokens = 40\nmax_answer_tokens = 40\n[[backend.sim.gpus]]\nid = \"gpu0\"\nslots = 4\n\
         [[backend.sim.models]]\nid = \"sim-llama\"\ngpu = \"gpu0\"\n[[backend.sim.models]]\nid = \"other\"\ngpu = \"gpu0\"\n"
    )
}

/// Starts a streamed answer and returns it once its head has arrived (the request is in flight).
async fn open_stream(node: &TestNode, model: &str) -> hyper::Response<hyper::body::Incoming> {
    let body =
        json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let req = http::Request::post(format!("http://{}/v1/chat/completions", node.addr))
        .header("authorization", format!("Bearer {}", node.token()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let res = edgeroute_test_util::client::send(node.addr, req).await;
    assert_eq!(res.status(), 200);
    res
}

fn model_state(health: &serde_json::Value, id: &str) -> Option<String> {
    health["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .map(|m| m["state"].as_str().unwrap().to_owned())
}

/// Polls `GET /v1/models/{id}` until it is gone; returns how long that took.
async fn until_gone(node: &TestNode, id: &str, limit: Duration) -> Duration {
    let t = std::time::Instant::now();
    while get(node.addr, &format!("/v1/models/{id}"), Some(&node.token())).await.status != 404 {
        assert!(t.elapsed() < limit, "`{id}` still there after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.elapsed()
}

#[tokio::test]
async fn unload_drains_the_model_until_its_last_request_in_flight_ends() {
    let node = TestNode::start(&slow_node_cfg(30_000)).await;
    let events = capture(&node);
    // A request in flight (a session's turn) when the unload arrives.
    let in_flight = open_stream(&node, "sim-llama").await;
    assert!(in_flight.headers().get("x-edgeroute-migrate").is_none());
    let t = std::time::Instant::now();

    let r = node.admin_post("/v1/models/unload", json!({"model": "sim-llama"}).to_string()).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let answer = r.json();
    assert_eq!(
        (answer["id"].as_str(), answer["state"].as_str()),
        (Some("sim-llama"), Some("draining"))
    );
    let deadline = answer["deadline_ms"].as_u64().unwrap();
    assert!((29_000..=30_000).contains(&deadline), "{answer}");
    assert_eq!(answer["in_flight"], 1);
    assert_eq!(answer["status_url"], "/v1/models/sim-llama");

    // Draining is visible at once: in /health (discovery's probe) and the model's status.
    let h = get(node.addr, "/health", None).await.json();
    assert_eq!(model_state(&h, "sim-llama").as_deref(), Some("draining"));
    assert_eq!(model_state(&h, "other").as_deref(), Some("ready"));
    let status = get(node.addr, "/v1/models/sim-llama", Some(&node.token())).await.json();
    assert_eq!(status["state"], "draining");
    assert!(status["deadline_ms"].as_u64().unwrap() <= deadline);

    // A pinned session's next turn is still served, and told to move this model's session.
    let turn = node
        .chat(json!({"model": "sim-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).to_string())
        .await;
    assert_eq!(turn.status, 200, "{}", String::from_utf8_lossy(&turn.body));
    let hint: edgeroute_proto::MigrateHint =
        turn.header("x-edgeroute-migrate").unwrap().parse().unwrap();
    assert_eq!((hint.reason.as_str(), hint.model.as_deref()), ("unload", Some("sim-llama")));
    assert!(hint.deadline_ms > 25_000 && hint.deadline_ms <= deadline, "{hint}");
    assert!(turn.header("x-edgeroute-migrate").unwrap().starts_with("reason=unload; deadline_ms="));
    // Other models on the node are untouched.
    let other = node.chat(chat("other")).await;
    assert_eq!(other.status, 200);
    assert!(other.header("x-edgeroute-migrate").is_none());

    // The request in flight finishes normally.
    let answer = edgeroute_test_util::client::read_stream(in_flight).await;
    assert!(answer.done() && answer.error().is_none(), "{}", String::from_utf8_lossy(&answer.raw));
    // Then the unload completes, long before the 30 s deadline.
    until_gone(&node, "sim-llama", Duration::from_secs(5)).await;
    assert!(t.elapsed() < Duration::from_secs(10), "waited for the deadline: {:?}", t.elapsed());
    let gone = node.chat(chat("sim-llama")).await;
    assert_eq!((gone.status.as_u16(), gone.error_code().as_str()), (404, "model_not_found"));
    assert_eq!(event_names(&events), vec!["ModelDraining", "ModelUnloading", "ModelUnloaded"]);
}

#[tokio::test]
async fn an_unload_drain_ends_at_its_deadline_when_a_request_hangs() {
    let node = TestNode::start(&slow_node_cfg(400)).await;
    let events = capture(&node);
    // Two seconds of streaming: far past the 400 ms drain.
    let hanging = open_stream(&node, "sim-llama").await;
    let r = node.admin_post("/v1/models/unload", json!({"model": "sim-llama"}).to_string()).await;
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["state"], "draining");
    let took = until_gone(&node, "sim-llama", Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(300), "unloaded before the deadline: {took:?}");
    assert!(took < Duration::from_millis(1500), "unload waited for the stream: {took:?}");
    assert_eq!(node.chat(chat("sim-llama")).await.status, 404);
    assert_eq!(event_names(&events), vec!["ModelDraining", "ModelUnloading", "ModelUnloaded"]);
    drop(hanging);
}

#[tokio::test]
async fn unload_drain_ms_zero_unloads_at_once() {
    let node = TestNode::start(&slow_node_cfg(0)).await;
    let _in_flight = open_stream(&node, "sim-llama").await;
    let r = node.admin_post("/v1/models/unload", json!({"model": "sim-llama"}).to_string()).await;
    assert_eq!((r.status.as_u16(), r.json()["state"].as_str()), (200, Some("unloaded")));
    assert_eq!(node.chat(chat("sim-llama")).await.status, 404);
}

#[tokio::test]
async fn bad_loads_get_precise_errors_and_change_nothing() {
    let root = tempdir("bad");
    std::fs::create_dir_all(root.join("ok-model")).unwrap();
    let outside = tempdir("outside");
    let node = TestNode::start(&sim_node_cfg(&root)).await;
    let load = |body: serde_json::Value| node.admin_post("/v1/models/load", body.to_string());
    let ok = root.join("ok-model");
    let cases = vec![
        (json!({"path": ok, "gpu": "gpu7"}), 400, "unknown_gpu"),
        (json!({"path": ok, "gpu": "gpu1", "memory_mb": 5000}), 409, "insufficient_gpu_memory"),
        (json!({"path": outside}), 403, "path_not_allowed"),
        (json!({"path": "relative/dir"}), 400, ""),
        (json!({"path": root.join("ok-model/../../etc")}), 400, ""),
        (json!({"path": ok, "id": "bad id/.."}), 400, ""),
        (json!({"model": "../../etc/passwd"}), 400, "invalid_model_id"),
        (json!({"model": "https://evil.example/x"}), 400, "invalid_model_id"),
        (json!({"model": "org/na%2e%2eme"}), 400, "invalid_model_id"),
        (json!({"model": "org/name", "revision": "../main"}), 400, "invalid_revision"),
        (json!({"model": "org/name"}), 409, "hub_not_configured"),
        (json!({"model": "org/name", "path": ok}), 400, ""),
        (json!({}), 400, ""),
        (json!({"path": ok, "bogus": 1}), 400, ""),
    ];
    for (body, status, code) in cases {
        let r = load(body.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {}", String::from_utf8_lossy(&r.body));
        if !code.is_empty() {
            assert_eq!(r.error_code(), code, "{body}");
        }
    }
    // Nothing changed: only the configured model is there.
    let list = get(node.addr, "/v1/models", Some(&node.token())).await.json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    // Inference tokens cannot load.
    let r = post_json(
        node.addr,
        "/v1/models/load",
        Some(&node.token()),
        &[],
        json!({"path": ok}).to_string(),
    )
    .await;
    assert_eq!(r.status, 403);
    std::fs::remove_dir_all(root).ok();
    std::fs::remove_dir_all(outside).ok();
}

#[tokio::test]
async fn triton_load_routes_through_its_repository_api_and_unloads() {
    let repo = tempdir("triton-repo");
    std::fs::create_dir_all(repo.join("whisper-small/1")).unwrap();
    std::fs::write(repo.join("whisper-small/1/model.onnx"), [7u8; 64]).unwrap();
    std::fs::write(repo.join("whisper-small/config.pbtxt"), "name: \"whisper-small\"\n").unwrap();
    std::fs::create_dir_all(repo.join("broken")).unwrap();
    let triton = FakeTriton::new(&repo, Duration::from_millis(100));
    let up = spawn_router(triton.router()).await;
    let cfg = format!(
        "[models]\nallowed_local_roots = [\"{}\"]\n[backend]\nkind = \"openai\"\nurl = \"{}\"\ntriton_url = \"{}\"\n",
        repo.display(),
        up.url(),
        up.url()
    );
    let node = TestNode::start(&cfg).await;
    let r = node
        .admin_post("/v1/models/load", json!({"path": repo.join("whisper-small")}).to_string())
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    node.wait_model("whisper-small", "ready", Duration::from_secs(10)).await;
    assert_eq!(triton.state_of("whisper-small"), Some("READY"));
    let r = node.chat(chat("whisper-small")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // A directory Triton cannot load fails with Triton's reason; the node keeps serving.
    let r =
        node.admin_post("/v1/models/load", json!({"path": repo.join("broken")}).to_string()).await;
    assert_eq!(r.status, 202);
    let failed = node.wait_model("broken", "failed", Duration::from_secs(10)).await;
    assert!(failed["reason"].as_str().unwrap().contains("failed to load"), "{failed}");
    assert_eq!(node.chat(chat("whisper-small")).await.status, 200);

    let r =
        node.admin_post("/v1/models/unload", json!({"model": "whisper-small"}).to_string()).await;
    assert_eq!(r.status, 200);
    assert_eq!(triton.state_of("whisper-small"), Some("UNAVAILABLE"));
    assert_eq!(node.chat(chat("whisper-small")).await.status, 404);
    std::fs::remove_dir_all(repo).ok();
}

#[tokio::test]
async fn pipelines_are_as_available_as_their_busiest_gpu() {
    let cfg = "[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 2\ntokens_per_s = 20.0\nmin_answer_tokens = 40\nmax_answer_tokens = 40\n\
        [[backend.sim.gpus]]\nid = \"gpu0\"\nslots = 2\n[[backend.sim.gpus]]\nid = \"gpu1\"\nslots = 2\n[[backend.sim.gpus]]\nid = \"gpu2\"\nslots = 2\n\
        [[backend.sim.models]]\nid = \"stt\"\ngpu = \"gpu0\"\n[[backend.sim.models]]\nid = \"llm\"\ngpu = \"gpu1\"\n[[backend.sim.models]]\nid = \"tts\"\ngpu = \"gpu2\"\n\
        [[pipelines]]\nid = \"voice\"\nmodels = [\"stt\", \"llm\", \"tts\"]\n[[pipelines]]\nid = \"vision\"\nmodels = [\"clip\", \"llm\"]\n";
    let node = TestNode::start(cfg).await;
    let h = get(node.addr, "/health", None).await.json();
    let voice =
        h["pipelines"].as_array().unwrap().iter().find(|p| p["id"] == "voice").unwrap().clone();
    assert_eq!(
        (voice["servable"].as_bool(), voice["availability"].as_f64()),
        (Some(true), Some(1.0))
    );
    let vision =
        h["pipelines"].as_array().unwrap().iter().find(|p| p["id"] == "vision").unwrap().clone();
    assert_eq!(vision["servable"], false);
    assert_eq!(vision["missing"], json!(["clip"]));

    // Occupy one of the LLM GPU's two slots: the pipeline drops to 0.5, limited by gpu1.
    let (addr, t) = (node.addr, node.token());
    let busy = tokio::spawn(async move {
        edgeroute_test_util::stream(
            addr,
            Some(&t),
            &[],
            json!({"model":"llm","stream":true,"messages":[{"role":"user","content":"x"}]})
                .to_string(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let h = get(node.addr, "/health", None).await.json();
    let voice =
        h["pipelines"].as_array().unwrap().iter().find(|p| p["id"] == "voice").unwrap().clone();
    assert_eq!(voice["availability"], 0.5);
    assert_eq!(voice["bottleneck_gpu"], "gpu1");
    let gpu1 = h["gpus"].as_array().unwrap().iter().find(|g| g["id"] == "gpu1").unwrap().clone();
    assert_eq!(gpu1["availability"], 0.5);
    busy.abort();
    let _ = method(node.addr, "GET", "/health", None, "").await;
}

#[tokio::test]
async fn openai_upstream_load_waits_for_the_model_to_appear_in_its_model_list() {
    let root = tempdir("upstream");
    std::fs::create_dir_all(root.join("late-model")).unwrap();
    // The upstream (the simulator's server) does not serve `late-model` yet.
    let sim = Arc::new(
        edgeroute_sim::Simulator::new(edgeroute_sim::SimConfig {
            ttft_base_ms: 1,
            tokens_per_s: 1000.0,
            ..Default::default()
        })
        .unwrap(),
    );
    let up = spawn_router(edgeroute_sim::server::router(sim.clone())).await;
    let cfg = format!(
        "[models]\nallowed_local_roots = [\"{}\"]\n[backend]\nkind = \"openai\"\nurl = \"{}\"\n",
        root.display(),
        up.url()
    );
    let node = TestNode::start(&cfg).await;
    let r = post_json(
        node.addr,
        "/v1/models/load",
        Some(&node.admin_token()),
        &[],
        json!({"path": root.join("late-model")}).to_string(),
    )
    .await;
    assert_eq!(r.status, 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get(node.addr, "/v1/models/late-model", Some(&node.token())).await.json()["state"],
        "loading",
        "ready before the upstream had it"
    );
    // The upstream finishes loading it (as vLLM or llama.cpp would): the node notices.
    sim.load_model(edgeroute_sim::SimModel {
        memory_mb: 0,
        ..edgeroute_sim::SimModel::new("late-model", "gpu0")
    })
    .unwrap();
    node.wait_model("late-model", "ready", Duration::from_secs(10)).await;
    assert_eq!(node.chat(chat("late-model")).await.status, 200);
    std::fs::remove_dir_all(root).ok();
}
