//! Triton's restricted repository API: a Triton started with
//! `--http-restricted-api=model-repository:<name>=<value>` loads and unloads only for callers
//! holding the header, and the node is one of them when configured so.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::Duration;

use edgeroute_test_util::fake_triton::FakeTriton;
use edgeroute_test_util::{TestNode, spawn_router};
use serde_json::json;

fn repo(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edgeroute-triton-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("whisper-small/1")).unwrap();
    std::fs::write(d.join("whisper-small/1/model.onnx"), [7u8; 64]).unwrap();
    std::fs::write(d.join("whisper-small/config.pbtxt"), "name: \"whisper-small\"\n").unwrap();
    d
}

fn config(repo: &std::path::Path, url: &str, restricted: bool) -> String {
    let header = if restricted {
        "triton_restricted_header = \"admin-key\"\ntriton_restricted_key_env = \"TRITON_ADMIN_KEY\"\n"
    } else {
        ""
    };
    format!(
        "[models]\nallowed_local_roots = [\"{}\"]\n[backend]\nkind = \"openai\"\nurl = \"{url}\"\ntriton_url = \"{url}\"\n{header}",
        repo.display()
    )
}

#[tokio::test]
async fn a_restricted_triton_loads_only_for_a_node_holding_its_header() {
    let dir = repo("restricted");
    let triton = FakeTriton::restricted(&dir, Duration::from_millis(10), "admin-key", "s3cret-key");
    let up = spawn_router(triton.router()).await;
    let env = |k: &str| (k == "TRITON_ADMIN_KEY").then(|| "s3cret-key".to_owned());

    // Without the header (a node, or anything else that reaches Triton's port): refused.
    let bare = TestNode::start(&config(&dir, &up.url(), false)).await;
    let r = bare
        .admin_post("/v1/models/load", json!({"path": dir.join("whisper-small")}).to_string())
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let failed = bare.wait_model("whisper-small", "failed", Duration::from_secs(10)).await;
    assert!(failed["reason"].as_str().unwrap().contains("restricted"), "{failed}");
    assert_ne!(triton.state_of("whisper-small"), Some("READY"));

    // With it: loaded, served, unloaded.
    let node = TestNode::start_with(&config(&dir, &up.url(), true), env).await;
    let r = node
        .admin_post("/v1/models/load", json!({"path": dir.join("whisper-small")}).to_string())
        .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    node.wait_model("whisper-small", "ready", Duration::from_secs(10)).await;
    assert_eq!(triton.state_of("whisper-small"), Some("READY"));
    let r =
        node.admin_post("/v1/models/unload", json!({"model": "whisper-small"}).to_string()).await;
    assert_eq!(r.status, 200);
    assert_eq!(triton.state_of("whisper-small"), Some("UNAVAILABLE"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn the_header_and_its_secret_go_together() {
    let dir = std::env::temp_dir();
    let half = config(&dir, "http://127.0.0.1:1", true)
        .replace("triton_restricted_key_env = \"TRITON_ADMIN_KEY\"\n", "");
    let cfg = format!("[node]\nid = \"n1\"\nregion = \"r\"\nallow_unauthenticated = true\n{half}");
    let err = edgeroute_node::NodeConfig::parse(&cfg, |_| None).unwrap_err().to_string();
    assert!(err.contains("triton_restricted"), "{err}");
}
