//! Hugging Face → Triton, end to end: `POST /v1/models/load` of a hub model on a node whose
//! backend is Triton downloads it (a fake hub), converts it into a sealed Triton repository
//! entry on the shared volume (vLLM for a transformer checkpoint, ONNX Runtime for an `.onnx`
//! graph, pinned to the requested GPU), the `edgeroute watch` sidecar installs it into
//! Triton's repository, (a fake) Triton checks the entry as Triton does and loads it, and the
//! node reports the model ready. What cannot be converted is refused at once when its file
//! names say so, or ends `failed` with the reason, with no entry anywhere.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeroute_bus::{Bus, BusConfig};
use edgeroute_node::watcher::seal::SealVerifier;
use edgeroute_node::watcher::{WatchConfig, run};
use edgeroute_proto::models::ModelState;
use edgeroute_test_util::fake_hub::{FakeHub, FakeRepo};
use edgeroute_test_util::fake_triton::FakeTriton;
use edgeroute_test_util::{TestNode, get, spawn_router};
use futures_util::StreamExt;
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../edgeroute-auth/tests/fixtures").join(name)
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgeroute-hf2triton-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const LLAMA_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}"#;

fn hub() -> FakeHub {
    FakeHub::new()
        .with_repo(
            FakeRepo::new("org/tiny-llama")
                .file("config.json", LLAMA_CONFIG)
                .file("model.safetensors", vec![3u8; 8192])
                .lfs("model.safetensors", true)
                .file("tokenizer.json", "{}")
                .file("generation_config.json", "{}"),
        )
        .with_repo(
            FakeRepo::new("org/tiny-encoder")
                .file("onnx/model.onnx", vec![5u8; 4096])
                .lfs("onnx/model.onnx", true)
                .file("onnx/model_quantized.onnx", vec![6u8; 1024])
                .file("config.json", "{}"),
        )
        // Downloads fine; its config.json names no architecture, so vLLM could not run it.
        .with_repo(
            FakeRepo::new("org/no-arch")
                .file("config.json", r#"{"model_type": "mystery"}"#)
                .file("model.safetensors", vec![1u8; 512]),
        )
        .with_repo(FakeRepo::new("org/gguf-only").file("m.Q4_0.gguf", vec![2u8; 512]))
        .with_repo(FakeRepo::new("org/no-config").file("model.safetensors", vec![1u8; 512]))
}

/// The node: the shared volume is its model repository; Triton (with two GPUs) sees its own
/// repository at `triton_repo`, which the watcher fills.
fn node_cfg(shared: &Path, triton_repo: &Path, hub_url: &str, triton_url: &str) -> String {
    format!(
        "[models]\nrepository = \"{}\"\ndisk_margin_mb = 1\nseal_key_file = \"{}\"\nseal_kid = \"node-1\"\n\
         [models.hub]\nendpoint = \"{hub_url}\"\n\
         [backend]\nkind = \"openai\"\nurl = \"{triton_url}\"\ntriton_url = \"{triton_url}\"\n\
         triton_repository = \"{}\"\n\
         [[backend.gpus]]\nid = \"gpu0\"\nslots = 4\n[[backend.gpus]]\nid = \"gpu1\"\nslots = 4\n",
        shared.display(),
        fixture("ed25519_a_private.pem").display(),
        triton_repo.display(),
    )
}

/// Names in `dir` that do not start with `.`.
fn visible(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn hub_models_are_converted_installed_by_the_watcher_and_served_by_triton() {
    let (shared, triton_repo) = (tempdir("shared"), tempdir("triton"));
    let hub = hub();
    let hub_server = spawn_router(hub.router()).await;
    let triton = FakeTriton::new(&triton_repo, Duration::from_millis(20)).with_gpus(2);
    let triton_server = spawn_router(triton.router()).await;

    // The sidecar trusts only the node's seal key.
    let pem = std::fs::read_to_string(fixture("ed25519_a_public.pem")).unwrap();
    let keys = SealVerifier::from_public_pems(&[("node-1".to_owned(), pem)]).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(run(
        WatchConfig {
            shared: shared.clone(),
            repository: triton_repo.clone(),
            triton_url: Some(triton_server.url()),
            settle: Duration::from_millis(100),
            allow_backends: vec![],
            triton_restricted: None,
            seal_keys: Some(keys),
            allow_unsealed: false,
            hub: None,
            order_poll: Duration::from_secs(2),
        },
        async {
            let _ = stop_rx.await;
        },
    ));

    let bus = Bus::embedded(&BusConfig::embedded()).unwrap();
    let mut sub = bus.subscribe().await.unwrap();
    let cfg = node_cfg(&shared, &triton_repo, &hub_server.url(), &triton_server.url());
    let node = TestNode::start_with_bus(&cfg, bus.clone()).await;
    let load = |body: serde_json::Value| node.admin_post("/v1/models/load", body.to_string());

    // A transformer checkpoint → vLLM, pinned to the second GPU.
    let r = load(json!({"model": "org/tiny-llama", "id": "tiny-llama", "gpu": "gpu1"})).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    // An ONNX graph (one of two, chosen with `files`) → ONNX Runtime, on the first GPU.
    let r = load(
        json!({"model": "org/tiny-encoder", "id": "tiny-encoder", "files": ["onnx/model.onnx"]}),
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));

    let llama = node.wait_model("tiny-llama", "ready", Duration::from_secs(30)).await;
    let encoder = node.wait_model("tiny-encoder", "ready", Duration::from_secs(30)).await;
    assert_eq!(triton.state_of("tiny-llama"), Some("READY"));
    assert_eq!(triton.state_of("tiny-encoder"), Some("READY"));
    assert_eq!(triton.gpus_of("tiny-llama"), Some(vec![1]), "pinned to the requested GPU");
    assert_eq!(triton.gpus_of("tiny-encoder"), Some(vec![0]));
    assert_eq!(llama["triton_entry"], json!(shared.join("tiny-llama")), "{llama}");
    assert!(encoder["triton_entry"].is_string(), "{encoder}");

    // What Triton was given: the weights as downloaded, engine arguments pointing at them in
    // Triton's own repository, the seal kept.
    let installed = triton_repo.join("tiny-llama");
    let args: serde_json::Value =
        serde_json::from_slice(&std::fs::read(installed.join("1/model.json")).unwrap()).unwrap();
    assert_eq!(args["model"], json!(installed.join("1/weights")));
    assert_eq!(std::fs::read(installed.join("1/weights/model.safetensors")).unwrap(), [3u8; 8192]);
    assert!(installed.join(".edgeroute-seal").is_file());
    let config = std::fs::read_to_string(installed.join("config.pbtxt")).unwrap();
    assert!(config.contains("backend: \"vllm\""), "{config}");
    assert_eq!(
        std::fs::read(triton_repo.join("tiny-encoder/1/model.onnx")).unwrap(),
        [5u8; 4096],
        "the selected graph, not the quantized one"
    );

    // Served through Triton's OpenAI frontend (the fake's simulator follows its loads).
    let chat = |m: &str| {
        json!({"model": m, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            .to_string()
    };
    let r = node.chat(chat("tiny-llama")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    // Refused before anything is fetched: file names Triton cannot serve, or no config.json.
    let r = load(json!({"model": "org/gguf-only"})).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (400, "unsupported_model_format".to_owned()));
    assert!(String::from_utf8_lossy(&r.body).contains("GGUF"));
    let r = load(json!({"model": "org/no-config"})).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (400, "no_loadable_weights".to_owned()));

    // Fetched, then refused by the conversion: `failed` with the reason, no entry anywhere.
    let r = load(json!({"model": "org/no-arch"})).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let failed = node.wait_model("no-arch", "failed", Duration::from_secs(30)).await;
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("conversion for Triton failed") && reason.contains("architectures"),
        "{reason}"
    );
    let list = get(node.addr, "/v1/models", Some(&node.token())).await.json();
    let listed = list["data"].as_array().unwrap().iter().find(|m| m["id"] == "no-arch").unwrap();
    assert_eq!(listed["state"], "failed");
    // The bus says so too.
    let t = std::time::Instant::now();
    loop {
        let seen = sub.view().node("test-1").is_some_and(|n| {
            n.models.iter().any(|m| m.model == "no-arch" && m.state == ModelState::Failed)
        });
        if seen {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no failure on the bus");
        let _ = tokio::time::timeout(Duration::from_secs(1), sub.next()).await;
    }
    // Let the watcher settle on whatever changed, then look: the volume holds the two entries
    // and the downloads (kept for a retry: they are whole, sealed, and no Triton entry), the
    // staging area is empty, and Triton's repository holds the two models only.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        visible(&shared),
        ["org--no-arch", "org--tiny-encoder", "org--tiny-llama", "tiny-encoder", "tiny-llama"]
    );
    assert_eq!(std::fs::read_dir(shared.join(".staging")).unwrap().count(), 0);
    assert_eq!(visible(&triton_repo), ["tiny-encoder", "tiny-llama"]);
    assert_eq!(triton.state_of("no-arch"), None);

    // Unload with purge removes the entry and the download from the volume.
    let r = node
        .admin_post(
            "/v1/models/unload",
            json!({"model": "tiny-encoder", "purge": true}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(triton.state_of("tiny-encoder"), Some("UNAVAILABLE"));
    assert!(!shared.join("tiny-encoder").exists() && !shared.join("org--tiny-encoder").exists());

    stop_tx.send(()).unwrap();
    let installed = watcher.await.unwrap().unwrap();
    assert!(installed.contains(&"tiny-llama".to_owned()), "{installed:?}");
    assert!(installed.contains(&"tiny-encoder".to_owned()), "{installed:?}");
    std::fs::remove_dir_all(shared).ok();
    std::fs::remove_dir_all(triton_repo).ok();
}

#[tokio::test]
async fn triton_refuses_what_it_could_not_load_with_its_reason() {
    // The fake checks an entry as Triton does; each broken layout fails the load with
    // Triton's reason, and the model is UNAVAILABLE in the index.
    let repo = tempdir("layouts");
    let entry = |name: &str, config: &str, files: &[(&str, &[u8])]| {
        let dir = repo.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.pbtxt"), config).unwrap();
        for (f, body) in files {
            let p = dir.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, body).unwrap();
        }
    };
    let ckpt = repo.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("config.json"), LLAMA_CONFIG).unwrap();
    let good_json = json!({"model": ckpt}).to_string();
    entry(
        "good-onnx",
        "name: \"good-onnx\"\nbackend: \"onnxruntime\"\n",
        &[("1/model.onnx", b"g")],
    );
    entry("good-vllm", "backend: \"vllm\"\n", &[("1/model.json", good_json.as_bytes())]);
    entry("renamed", "name: \"other\"\nbackend: \"onnxruntime\"\n", &[("1/model.onnx", b"g")]);
    entry("garbled", "name: \"garbled\"\nbackend: \"onnx", &[("1/model.onnx", b"g")]);
    entry("unknown-field", "nmae: \"x\"\n", &[("1/model.onnx", b"g")]);
    entry("no-version", "backend: \"onnxruntime\"\n", &[("latest/model.onnx", b"g")]);
    entry("no-graph", "backend: \"onnxruntime\"\n", &[("1/graph.onnx", b"g")]);
    entry("no-args", "backend: \"vllm\"\n", &[("1/weights/config.json", b"{}")]);
    let hub_id = json!({"model": "meta-llama/Llama-3.1-8B"}).to_string();
    entry("hub-id", "backend: \"vllm\"\n", &[("1/model.json", hub_id.as_bytes())]);
    entry(
        "gpu-7",
        "backend: \"onnxruntime\"\ninstance_group [ { kind: KIND_GPU gpus: [ 7 ] } ]\n",
        &[("1/model.onnx", b"g")],
    );
    let triton = FakeTriton::new(&repo, Duration::from_millis(1)).with_gpus(2);
    let server = spawn_router(triton.router()).await;
    let api = edgeroute_node::backend::triton::TritonRepository::new(
        &server.url(),
        Duration::from_secs(5),
    );
    api.load("good-onnx").await.unwrap();
    api.load("good-vllm").await.unwrap();
    for (name, why) in [
        ("renamed", "directory name must equal model name"),
        ("garbled", "failed to read text proto"),
        ("unknown-field", "has no field named \"nmae\""),
        ("no-version", "at least one version must be available"),
        ("no-graph", "model.onnx"),
        ("no-args", "model.json"),
        ("hub-id", "not a checkpoint directory"),
        ("gpu-7", "invalid or unsupported gpu id 7"),
    ] {
        let err = api.load(name).await.unwrap_err().to_string();
        assert!(err.contains(why), "{name}: {err}");
        assert_eq!(triton.state_of(name), Some("UNAVAILABLE"), "{name}");
        assert!(triton.reason_of(name).unwrap().contains(why), "{name}");
    }
    std::fs::remove_dir_all(repo).ok();
}

/// Polls `cond` every 20 ms for up to 20 s.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !cond() {
        assert!(t.elapsed() < Duration::from_secs(20), "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn with_downloads_by_the_sidecar_only_the_sidecar_holds_the_hub_token() {
    use edgeroute_node::orders::{HubConfig, HubSettings, ORDER_TYP, Order};
    let (shared, triton_repo, downloads) =
        (tempdir("sc-shared"), tempdir("sc-triton"), tempdir("sc-downloads"));
    // Private repositories: nothing without the token, which only the sidecar has.
    let hub = FakeHub::new()
        .with_repo(
            FakeRepo::new("org/tiny-llama")
                .file("config.json", LLAMA_CONFIG)
                .file("model.safetensors", vec![3u8; 8192])
                .lfs("model.safetensors", true)
                .private(),
        )
        .with_repo(
            FakeRepo::new("org/no-arch")
                .file("config.json", r#"{"model_type": "mystery"}"#)
                .file("model.safetensors", vec![1u8; 512])
                .private(),
        );
    hub.require_token("hf_sidecar_only");
    let hub_server = spawn_router(hub.router()).await;
    let triton = FakeTriton::new(&triton_repo, Duration::from_millis(20)).with_gpus(2);
    let triton_server = spawn_router(triton.router()).await;

    let pem = std::fs::read_to_string(fixture("ed25519_a_public.pem")).unwrap();
    let keys = SealVerifier::from_public_pems(&[("node-1".to_owned(), pem)]).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(run(
        WatchConfig {
            shared: shared.clone(),
            repository: triton_repo.clone(),
            triton_url: Some(triton_server.url()),
            settle: Duration::from_millis(100),
            allow_backends: vec![],
            triton_restricted: None,
            seal_keys: Some(keys),
            allow_unsealed: false,
            hub: Some(HubSettings {
                hub: HubConfig {
                    endpoint: hub_server.url(),
                    token: Some("hf_sidecar_only".into()),
                    ..HubConfig::default()
                },
                downloads: downloads.clone(),
                disk_margin_bytes: 1 << 20,
            }),
            order_poll: Duration::from_millis(200),
        },
        async {
            let _ = stop_rx.await;
        },
    ));

    // The gateway as deployed: no token, no Triton repository API (`triton_url`), Triton's
    // OpenAI frontend as its backend; it orders, the sidecar does.
    let cfg = format!(
        "[models]\nrepository = \"{}\"\ndisk_margin_mb = 1\nseal_key_file = \"{}\"\nseal_kid = \"node-1\"\n\
         downloads = \"sidecar\"\n[models.hub]\nendpoint = \"{}\"\n\
         [backend]\nkind = \"openai\"\nurl = \"{}\"\n\
         [[backend.gpus]]\nid = \"gpu0\"\nslots = 4\n[[backend.gpus]]\nid = \"gpu1\"\nslots = 4\n",
        shared.display(),
        fixture("ed25519_a_private.pem").display(),
        hub_server.url(),
        triton_server.url(),
    );
    let node = TestNode::start(&cfg).await;
    let load = |body: serde_json::Value| node.admin_post("/v1/models/load", body.to_string());
    let r = load(json!({"model": "org/tiny-llama", "id": "tiny-llama", "gpu": "gpu1"})).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let ready = node.wait_model("tiny-llama", "ready", Duration::from_secs(30)).await;
    assert_eq!(ready["ordered_as"], "tiny-llama", "{ready}");
    assert_eq!(ready["progress"]["bytes_done"], ready["progress"]["bytes_total"], "{ready}");
    assert_eq!(triton.state_of("tiny-llama"), Some("READY"));
    assert_eq!(triton.gpus_of("tiny-llama"), Some(vec![1]));
    let chat = json!({"model": "tiny-llama", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let r = node.chat(chat.to_string()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // Every download carried the token; none of it is on the volume the gateway can write.
    assert!(!hub.downloads().is_empty() && hub.downloads().iter().all(|d| d.authorized));
    assert_eq!(visible(&shared), Vec::<String>::new(), "only orders and statuses, hidden");
    assert_eq!(visible(&downloads), ["org--tiny-llama"]);
    assert_eq!(visible(&triton_repo), ["tiny-llama"]);

    // Failures come back with the sidecar's reason.
    let r = load(json!({"model": "org/no-arch"})).await;
    assert_eq!(r.status, 202);
    let failed = node.wait_model("no-arch", "failed", Duration::from_secs(30)).await;
    assert!(failed["reason"].as_str().unwrap().contains("architectures"), "{failed}");
    let r = load(json!({"model": "org/unknown"})).await;
    assert_eq!(r.status, 202, "this node cannot ask the hub; the sidecar answers");
    let failed = node.wait_model("unknown", "failed", Duration::from_secs(30)).await;
    assert!(failed["reason"].as_str().unwrap().contains("not found"), "{failed}");
    assert!(!triton_repo.join("no-arch").exists() && !triton_repo.join("unknown").exists());

    // An order signed by anyone else is never carried out.
    let forger = edgeroute_node::watcher::SealSigner::from_pem(
        &std::fs::read_to_string(fixture("ed25519_b_private.pem")).unwrap(),
        "node-1",
        "forger",
    )
    .unwrap();
    let forged: Order = serde_json::from_value(json!({
        "v": 1, "id": "1-1-1", "model": "evil", "iat": 1,
        "action": {"kind": "load", "repo": "org/tiny-llama", "revision": "main", "files": null, "device": 0}
    }))
    .unwrap();
    edgeroute_node::orders::place(&shared, "evil", &forger.sign_typed(ORDER_TYP, &forged).unwrap())
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(edgeroute_node::orders::read_status(&shared, "evil").is_none());
    assert_eq!(triton.state_of("evil"), None);
    assert!(!triton_repo.join("evil").exists());

    // Unload with purge is an order as well: Triton unloads, entry and download go.
    let r = node
        .admin_post("/v1/models/unload", json!({"model": "tiny-llama", "purge": true}).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    eventually("Triton unloaded tiny-llama", || {
        triton.state_of("tiny-llama") == Some("UNAVAILABLE")
    })
    .await;
    eventually("the entry and the download are gone", || {
        !triton_repo.join("tiny-llama").exists()
            && !visible(&downloads).contains(&"org--tiny-llama".to_owned())
    })
    .await;

    stop_tx.send(()).unwrap();
    watcher.await.unwrap().unwrap();
    for d in [shared, triton_repo, downloads] {
        std::fs::remove_dir_all(d).ok();
    }
}
