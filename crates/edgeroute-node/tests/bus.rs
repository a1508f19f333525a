//! The node on the topology bus: its placement reaches subscribers at start, and every model
//! and drain change follows within milliseconds — over the embedded bus and over real NATS.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::{Duration, Instant};

use edgeroute_bus::{Bus, BusConfig, Subscription};
use edgeroute_proto::models::ModelState;
use edgeroute_proto::topology::NodeLiveness;
use edgeroute_test_util::TestNode;
use edgeroute_test_util::nats::NatsServer;
use futures_util::StreamExt;
use serde_json::json;

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edgeroute-nodebus-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("fresh-model")).unwrap();
    d
}

fn cfg(root: &std::path::Path, extra: &str) -> String {
    format!(
        "[models]\nallowed_local_roots = [\"{}\"]\nsim_load_time_ms = 50\n{extra}[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 1\n",
        root.display()
    )
}

/// Reads updates until `pred` holds for the subscription's view of node `test-1`.
async fn until(
    sub: &mut Subscription,
    what: &str,
    pred: impl Fn(&edgeroute_proto::topology::NodeSnapshot) -> bool,
) -> Duration {
    let t = Instant::now();
    loop {
        if let Some(n) = sub.view().node("test-1")
            && pred(n)
        {
            return t.elapsed();
        }
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("subscription ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}; view: {:?}", sub.view().node("test-1")),
        }
    }
}

fn has(n: &edgeroute_proto::topology::NodeSnapshot, model: &str, state: ModelState) -> bool {
    n.models.iter().any(|m| m.model == model && m.state == state)
}

async fn exercise(node: &TestNode, sub: &mut Subscription, root: &std::path::Path) {
    until(sub, "the node with its configured model", |n| {
        has(n, "sim-llama", ModelState::Ready) && n.url.starts_with("http://127.0.0.1:")
    })
    .await;
    let admin = node.admin_token();
    let r = node
        .admin_post("/v1/models/load", json!({"path": root.join("fresh-model")}).to_string())
        .await;
    assert_eq!(r.status, 202);
    until(sub, "fresh-model loading", |n| n.models.iter().any(|m| m.model == "fresh-model")).await;
    let took = until(sub, "fresh-model ready", |n| has(n, "fresh-model", ModelState::Ready)).await;
    assert!(took < Duration::from_secs(2), "ready took {took:?} to propagate");
    node.admin_post("/admin/drain", "{}").await;
    until(sub, "draining", |n| n.liveness == NodeLiveness::Draining).await;
    node.admin_post("/v1/models/unload", json!({"model": "fresh-model"}).to_string()).await;
    until(sub, "fresh-model gone", |n| !n.models.iter().any(|m| m.model == "fresh-model")).await;
    edgeroute_test_util::client::method(node.addr, "DELETE", "/admin/drain", Some(&admin), "")
        .await;
    until(sub, "serving again", |n| n.liveness == NodeLiveness::Up).await;
}

#[tokio::test]
async fn placement_and_changes_reach_an_embedded_subscriber() {
    let root = tempdir("embedded");
    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let mut sub = bus.subscribe().await.unwrap();
    let mut node = TestNode::start_with_bus(&cfg(&root, ""), bus.clone()).await;
    exercise(&node, &mut sub, &root).await;
    // A clean shutdown says goodbye.
    node.begin_shutdown().await.unwrap();
    until(&mut sub, "node down", |n| n.liveness == NodeLiveness::Down).await;
    std::fs::remove_dir_all(root).ok();
}

#[tokio::test]
async fn placement_and_changes_reach_a_nats_subscriber_and_survive_nats_loss() {
    let mut nats = NatsServer::start();
    let root = tempdir("nats");
    let bus_toml = format!(
        "[bus]\nkind = \"nats\"\nnats_url = \"{}\"\nheartbeat_ms = 200\nexpire_ms = 1500\n",
        nats.url()
    );
    let node = TestNode::start(&cfg(&root, &bus_toml)).await;
    // A subscriber that starts after the node's first events gets them from the snapshot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sub_bus = Bus::connect(&BusConfig::nats(nats.url())).await.unwrap();
    let mut sub = sub_bus.subscribe().await.unwrap();
    exercise(&node, &mut sub, &root).await;

    // NATS goes away: the node keeps serving.
    nats.stop();
    let chat = json!({"model": "sim-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    assert_eq!(node.chat(chat.clone()).await.status, 200);
    let r = node
        .admin_post(
            "/v1/models/load",
            json!({"path": root.join("fresh-model"), "id": "while-down"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 202);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // NATS returns: the change made while it was down arrives.
    nats.restart();
    until(&mut sub, "the change made while NATS was down", |n| {
        has(n, "while-down", ModelState::Ready)
    })
    .await;
    std::fs::remove_dir_all(root).ok();
}
