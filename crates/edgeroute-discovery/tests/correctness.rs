//! Correctness probes against real simulator nodes on loopback (issue 16): the probe answer's
//! fingerprint is learnt from the fleet; a node that answers `/health` but returns garbage is
//! ejected from `/v1/discover` for the model (explain and `/metrics` say why) while its
//! `/health` stays fine; one flaky wrong answer ejects nothing; a node whose fault is cleared
//! rejoins only after a run of correct answers.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_test_util::client::method;
use edgeroute_test_util::{TestNode, get};
use serde_json::Value;

mod common;

use common::Replica;

const MODEL: &str = "sim-llama";

impl Replica {
    async fn json(&self, path: &str) -> Value {
        let r = get(self.addr, path, None).await;
        assert_eq!(r.status, 200, "{path}: {}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    async fn candidates(&self) -> Vec<String> {
        let body = self.json(&format!("/v1/discover?model={MODEL}&k=3")).await;
        body["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// `/v1/nodes`' correctness state of `id` for the model (Null before its first probe).
    async fn correctness(&self, id: &str) -> Value {
        let nodes = self.json("/v1/nodes").await;
        let node = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .unwrap_or_else(|| panic!("{id} not in /v1/nodes: {nodes}"))
            .clone();
        node["detail"]["probes"]["correctness"][MODEL].clone()
    }

    async fn metrics(&self) -> String {
        String::from_utf8(get(self.addr, "/metrics", None).await.body.to_vec()).unwrap()
    }

    /// Polls until `pred` holds of `id`'s correctness state; returns that state.
    async fn until(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t = Instant::now();
        loop {
            let c = self.correctness(id).await;
            if pred(&c) {
                return c;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{id}: never {what}; last {c}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn count(c: &Value, what: &str) -> u64 {
    c["probes"][what].as_u64().unwrap_or(0)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{series}` in\n{text}"))
}

async fn set_garbage(node: &TestNode, rate: f64) {
    let body = format!(r#"{{"garbage_rate": {rate}}}"#);
    let r = method(node.addr, "PUT", "/admin/faults", Some(&node.admin_token()), body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

const NODE: &str = "[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 1\nprefill_us_per_token = 0\ntokens_per_s = 2000.0\n";

#[tokio::test]
async fn a_node_answering_garbage_is_ejected_for_the_model_and_rejoins_only_after_a_run_of_correct_answers()
 {
    let a = TestNode::start_as("a-1", "tor", NODE, None).await;
    let b = TestNode::start_as("b-1", "tor", NODE, None).await;
    let c = TestNode::start_as("c-1", "tor", NODE, None).await;
    // The nodes require an inference token: the replica's probes carry the fleet's.
    let token = token_file("garbage");
    let d = replica(&[&a, &b, &c], &format!("token_file = \"{}\"", token.display())).await;

    // The fingerprint is learnt from the fleet's agreeing answers, and every node judged by it.
    for id in ["a-1", "b-1", "c-1"] {
        let st = d.until(id, "judged correct 5 times", |c| count(c, "correct") >= 5).await;
        assert_eq!(st["state"], "correct", "{st}");
        assert_eq!(st["basis"], "learnt");
        assert!(st["latency_p50_ms"].as_u64().is_some(), "probe latency measured: {st}");
    }
    let expected = d.correctness("a-1").await["expected"].clone();
    assert!(expected.as_str().is_some_and(|f| f.len() == 16));
    assert_eq!(d.correctness("c-1").await["expected"], expected, "one fingerprint per version");
    let mut ids = d.candidates().await;
    ids.sort();
    assert_eq!(ids, ["a-1", "b-1", "c-1"]);

    // One flaky wrong answer: judged wrong, the node stays a candidate throughout.
    set_garbage(&b, 1.0).await;
    let st = d.until("b-1", "answer wrong once", |c| count(c, "wrong") >= 1).await;
    set_garbage(&b, 0.0).await;
    assert_eq!(st["state"], "suspect", "{st}");
    let correct = count(&st, "correct");
    let t = Instant::now();
    loop {
        assert!(d.candidates().await.contains(&"b-1".to_owned()), "a single wrong answer ejected");
        let st = d.correctness("b-1").await;
        assert_ne!(st["state"], "ejected", "{st}");
        if count(&st, "correct") >= correct + 5 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(count(&d.correctness("b-1").await, "wrong") <= 2);

    // A node that answers /health but returns garbage is ejected from discover answers.
    set_garbage(&c, 1.0).await;
    let st = d.until("c-1", "ejected", |c| c["state"] == "ejected").await;
    assert!(count(&st, "wrong") >= 2, "{st}");
    assert!(!d.candidates().await.contains(&"c-1".to_owned()));
    let health = get(c.addr, "/health", None).await;
    assert_eq!(health.status, 200, "its /health is still fine");
    assert_eq!(health.json()["status"], "ready");
    let nodes = d.json("/v1/nodes").await;
    let node = nodes["nodes"].as_array().unwrap().iter().find(|n| n["id"] == "c-1").unwrap();
    assert_eq!(node["health"], "ready", "healthy by /health, no candidate for the model");
    assert!(!node["models"].as_array().unwrap().iter().any(|m| m == MODEL));
    // Explain says why; /metrics counts it.
    let ex = d.json(&format!("/v1/discover?model={MODEL}&k=3&explain=true")).await;
    let excluded = ex["excluded"].as_array().unwrap();
    let why = excluded.iter().find(|e| e["id"] == "c-1").unwrap_or_else(|| panic!("{ex}"));
    assert_eq!(why["reason"], "wrong_answers");
    let detail = why["detail"].as_str().unwrap();
    assert!(detail.contains("correctness probes") && detail.contains("probe p50"), "{why}");
    let m = d.metrics().await;
    assert_eq!(metric(&m, "edgeroute_discovery_correctness_ejected "), 1.0);
    assert!(metric(&m, "edgeroute_discovery_correctness_probes_total{outcome=\"wrong\"} ") >= 3.0);
    assert!(metric(&m, "edgeroute_discovery_correctness_probes_total{outcome=\"correct\"} ") > 0.0);
    assert!(m.contains("edgeroute_discovery_correctness_probe_seconds_count"));

    // Cleared: it rejoins, and only after recover_after (3) consecutive correct answers.
    let before = count(&d.correctness("c-1").await, "correct");
    set_garbage(&c, 0.0).await;
    let t = Instant::now();
    loop {
        let ids = d.candidates().await;
        let st = d.correctness("c-1").await;
        if ids.contains(&"c-1".to_owned()) {
            assert!(count(&st, "correct") >= before + 3, "rejoined before the run: {st}");
            break;
        }
        // Still out: a run under way, never ended early (or it rejoined just after the
        // candidates were read: the next round sees it).
        assert!(
            ["ejected", "recovering", "correct"].contains(&st["state"].as_str().unwrap()),
            "{st}"
        );
        assert!(t.elapsed() < Duration::from_secs(20), "never rejoined: {st}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let st = d.until("c-1", "correct again", |c| c["state"] == "correct").await;
    assert!(st["recovery_run"].is_null(), "{st}");
    assert_eq!(metric(&d.metrics().await, "edgeroute_discovery_correctness_ejected "), 0.0);
    let _ = std::fs::remove_file(&token);
}

/// A replica over `nodes`, correctness probes every 120 ms, with `extra` in `[correctness]`.
async fn replica(nodes: &[&TestNode], extra: &str) -> Replica {
    let mut toml = format!(
        "[discovery]\nallow_unauthenticated = true\n[probe]\ninterval_ms = 200\ntimeout_ms = 150\n\
         [correctness]\ninterval_ms = 120\ntimeout_ms = 100\nmax_tokens = 8\n{extra}\n"
    );
    for n in nodes {
        toml.push_str(&format!(
            "[[nodes]]\nid = \"{}\"\nurl = \"http://{}\"\nregion = \"tor\"\n",
            n.state.id, n.addr
        ));
    }
    Replica::start(&toml, None).await
}

fn token_file(tag: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("edgeroute-correctness-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("token");
    let token =
        edgeroute_test_util::node::mint_hs256("edgeroute-discovery", &[Scope::Inference], 600);
    std::fs::write(&file, token).unwrap();
    file
}

#[tokio::test]
async fn a_pinned_answer_ejects_a_node_that_answered_garbage_from_its_first_probe() {
    let a = TestNode::start_as("a-1", "tor", NODE, None).await;
    let g = TestNode::start_as("g-1", "tor", NODE, None).await;
    set_garbage(&g, 1.0).await;
    // The operator pins the answer a good node gives (spacing and case do not matter).
    let chat = serde_json::json!({
        "model": MODEL, "temperature": 0, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Reply with the single word: ready"}],
    });
    let r = a.chat(chat.to_string()).await;
    assert_eq!(r.status, 200);
    let answer = r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_uppercase();
    let d = replica(
        &[&a, &g],
        &format!(
            "token_file = \"{}\"\n[[correctness.expected]]\nmodel = \"{MODEL}\"\nanswer = \"  {answer} \"\n",
            token_file("pinned").display()
        ),
    )
    .await;
    let st = d.until("g-1", "ejected", |c| c["state"] == "ejected").await;
    assert_eq!(st["basis"], "configured", "{st}");
    assert_eq!(count(&st, "correct"), 0);
    let st = d.until("a-1", "judged correct", |c| count(c, "correct") >= 2).await;
    assert_eq!((st["state"].as_str(), st["basis"].as_str()), (Some("correct"), Some("configured")));
    assert_eq!(d.candidates().await, ["a-1"]);
}

#[tokio::test]
async fn probes_the_nodes_refuse_are_never_judged_and_eject_nobody() {
    // No token: the nodes (which require one) answer 401 to every probe.
    let a = TestNode::start_as("a-1", "tor", NODE, None).await;
    let b = TestNode::start_as("b-1", "tor", NODE, None).await;
    let d = replica(&[&a, &b], "").await;
    for id in ["a-1", "b-1"] {
        let st = d.until(id, "refused 4 times", |c| count(c, "unavailable") >= 4).await;
        assert_eq!(st["state"], "learning", "{st}");
        assert!(st["last_error"].as_str().unwrap().contains("401"), "{st}");
        assert_eq!(count(&st, "wrong") + count(&st, "error") + count(&st, "correct"), 0);
    }
    let mut ids = d.candidates().await;
    ids.sort();
    assert_eq!(ids, ["a-1", "b-1"]);
    let m = d.metrics().await;
    assert!(
        metric(&m, "edgeroute_discovery_correctness_probes_total{outcome=\"unavailable\"} ") >= 8.0
    );
    assert_eq!(metric(&m, "edgeroute_discovery_correctness_ejected "), 0.0);
}
