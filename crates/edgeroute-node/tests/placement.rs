//! The model registry's placement constraints, enforced by the node's load API: data
//! sovereignty at placement, not only at routing. The node reads the fleet's policy file at
//! each load (no restart for a new version) and fails closed when it cannot.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use edgeroute_test_util::TestNode;
use serde_json::json;

const POLICY: &str = r#"
version = "2026-12-03.1"

[jurisdictions]
eu = ["frankfurt", "paris"]
ca = ["toronto", "montreal"]

[[models]]
name = "llama-eu"
jurisdictions = ["eu"]
[[models.versions]]
id = "v1"

[[models]]
name = "llama"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"
hardware = ["npu"]
"#;

fn dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edgeroute-placement-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    for m in ["llama-eu", "llama", "free-model"] {
        std::fs::create_dir_all(d.join("models").join(m)).unwrap();
        std::fs::write(d.join("models").join(m).join("model.gguf"), [0u8; 64]).unwrap();
    }
    d
}

async fn toronto_node(d: &std::path::Path) -> TestNode {
    let cfg = format!(
        "[models]\nallowed_local_roots = [\"{}\"]\nsim_load_time_ms = 10\n[policy]\nfile = \"{}\"\n",
        d.join("models").display(),
        d.join("policy.toml").display()
    );
    TestNode::start_with(&cfg, |k| match k {
        "EDGEROUTE_REGION" => Some("toronto".into()),
        "EDGEROUTE_JURISDICTION" => Some("ca".into()),
        _ => None,
    })
    .await
}

async fn load(
    node: &TestNode,
    d: &std::path::Path,
    id: &str,
    version: Option<&str>,
) -> (u16, String) {
    let mut body = json!({"path": d.join("models").join(id), "id": id});
    if let Some(v) = version {
        body["version"] = json!(v);
    }
    let r = node.admin_post("/v1/models/load", body.to_string()).await;
    let code = if r.status.is_success() { String::new() } else { r.error_code() };
    (r.status.as_u16(), code)
}

#[tokio::test]
async fn a_load_the_registry_forbids_here_is_refused_and_others_pass() {
    let d = dir("refuse");
    std::fs::write(d.join("policy.toml"), POLICY).unwrap();
    let node = toronto_node(&d).await;

    // An EU-only model may not be placed in Canada.
    let r = node
        .admin_post(
            "/v1/models/load",
            json!({"path": d.join("models/llama-eu"), "id": "llama-eu"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_code(), "placement_violation");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("llama-eu") && msg.contains("ca") && msg.contains("2026-12-03.1"),
        "{msg}"
    );

    // A version for other hardware is refused; an unknown version is a 400 naming the field;
    // the model's allowed version and an unregistered model load.
    assert_eq!(load(&node, &d, "llama", Some("v2")).await, (403, "placement_violation".into()));
    assert_eq!(load(&node, &d, "llama", Some("v9")).await, (400, "unknown_version".into()));
    assert_eq!(load(&node, &d, "llama", Some("v1")).await.0, 202);
    assert_eq!(load(&node, &d, "free-model", None).await.0, 202);
    node.wait_model("llama", "ready", std::time::Duration::from_secs(10)).await;

    // The node reports the version it loaded, and every answer says which version served it.
    let health = edgeroute_test_util::get(node.addr, "/health", None).await.json();
    let llama = health["models"].as_array().unwrap().iter().find(|m| m["id"] == "llama").cloned();
    assert_eq!(llama.unwrap()["version"], "v1", "{health}");
    assert_eq!(health["hardware"], "gpu", "node.hardware's default");
    let chat =
        json!({"model": "llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let r = node.chat(chat.to_string()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-edgeroute-model-version"), Some("v1"));
    node.wait_model("free-model", "ready", std::time::Duration::from_secs(10)).await;
    let chat = json!({"model": "free-model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let r = node.chat(chat.to_string()).await;
    assert_eq!(r.header("x-edgeroute-model-version"), None, "no version was named");
}

#[tokio::test]
async fn a_new_policy_applies_at_the_next_load_and_a_broken_one_refuses_loads() {
    let d = dir("reload");
    std::fs::write(d.join("policy.toml"), POLICY).unwrap();
    let node = toronto_node(&d).await;
    assert_eq!(load(&node, &d, "llama-eu", None).await.0, 403);

    // The operator widens the model to Canada: no restart.
    let widened = POLICY.replace("jurisdictions = [\"eu\"]", "jurisdictions = [\"eu\", \"ca\"]");
    std::fs::write(d.join("policy.toml"), widened).unwrap();
    assert_eq!(load(&node, &d, "llama-eu", None).await.0, 202);

    // A broken policy file refuses loads rather than skipping the check.
    std::fs::write(d.join("policy.toml"), "version = ").unwrap();
    assert_eq!(load(&node, &d, "free-model", None).await, (503, "policy_unavailable".into()));
    std::fs::remove_file(d.join("policy.toml")).unwrap();
    assert_eq!(load(&node, &d, "free-model", None).await, (503, "policy_unavailable".into()));
}
