//! Watcher mode: a model directory written to the shared volume is installed atomically into
//! the backend's repository and loaded by (a fake) Triton.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::{Duration, Instant};

use edgeroute_node::watcher::{WatchConfig, check_model_dir, run};
use edgeroute_test_util::fake_triton::FakeTriton;
use edgeroute_test_util::spawn_router;

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("edgeroute-watch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn new_model_on_shared_volume_is_installed_and_loaded() {
    let (shared, repo) = (tempdir("shared"), tempdir("repo"));
    // A stale staging directory from a crash is cleaned, never loaded.
    std::fs::create_dir_all(repo.join(".staging-old-1")).unwrap();
    let triton = FakeTriton::new(&repo, Duration::from_millis(10));
    let up = spawn_router(triton.router()).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = WatchConfig {
        shared: shared.clone(),
        repository: repo.clone(),
        triton_url: Some(up.url()),
        settle: Duration::from_millis(150),
        allow_backends: vec![],
        triton_restricted: None,
    };
    let task = tokio::spawn(run(cfg, async {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The gateway writes a model: weights first, config last (an invalid dir is ignored until then).
    std::fs::create_dir_all(shared.join("tts-fast/1")).unwrap();
    std::fs::write(shared.join("tts-fast/1/model.onnx"), vec![7u8; 4096]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!repo.join("tts-fast").exists(), "installed before it had a config");
    std::fs::write(shared.join("tts-fast/config.pbtxt"), "name: \"tts-fast\"\n").unwrap();
    // A directory with an unsafe name is never installed.
    std::fs::create_dir_all(shared.join(".hidden")).unwrap();
    std::fs::write(shared.join(".hidden/config.pbtxt"), "x").unwrap();

    let t = Instant::now();
    while triton.state_of("tts-fast") != Some("READY") {
        assert!(t.elapsed() < Duration::from_secs(10), "watcher never loaded the model");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(repo.join("tts-fast/1/model.onnx")).unwrap().len(), 4096);
    assert!(!repo.join(".staging-old-1").exists());
    assert!(!repo.join(".hidden").exists());
    stop_tx.send(()).unwrap();
    let installed = task.await.unwrap().unwrap();
    assert_eq!(installed, vec!["tts-fast".to_owned()]);
    assert!(check_model_dir(&shared.join(".hidden")).is_err());
    std::fs::remove_dir_all(shared).ok();
    std::fs::remove_dir_all(repo).ok();
}

#[tokio::test]
async fn a_model_that_carries_code_is_refused_unless_its_backend_is_allowed() {
    let (shared, repo) = (tempdir("code-shared"), tempdir("code-repo"));
    let triton =
        FakeTriton::restricted(&repo, Duration::from_millis(10), "admin-key", "s3cret-key");
    let up = spawn_router(triton.router()).await;
    let model = |name: &str, config: &str, extra: Option<(&str, &str)>| {
        std::fs::create_dir_all(shared.join(name).join("1")).unwrap();
        std::fs::write(shared.join(name).join("1/model.onnx"), vec![7u8; 64]).unwrap();
        if let Some((file, body)) = extra {
            std::fs::write(shared.join(name).join(file), body).unwrap();
        }
        std::fs::write(shared.join(name).join("config.pbtxt"), config).unwrap();
    };
    // A Python backend, and an ONNX model smuggling a .py file: code from the shared volume.
    model(
        "py-model",
        "name: \"py-model\"\nbackend: \"python\"\n",
        Some(("1/model.py", "import os")),
    );
    model(
        "smuggler",
        "name: \"smuggler\"\nbackend: \"onnxruntime\"\n",
        Some(("hook.py", "import os")),
    );
    // Weights only.
    model("weights", "name: \"weights\"\nbackend: \"onnxruntime\"\n", None);

    let run_once = |allow: Vec<String>| {
        let (shared, repo, url) = (shared.clone(), repo.clone(), up.url());
        async move {
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let cfg = WatchConfig {
                shared,
                repository: repo,
                triton_url: Some(url),
                settle: Duration::from_millis(50),
                allow_backends: allow,
                triton_restricted: Some(("admin-key".into(), "s3cret-key".into())),
            };
            let task = tokio::spawn(run(cfg, async {
                let _ = stop_rx.await;
            }));
            tokio::time::sleep(Duration::from_millis(600)).await;
            stop_tx.send(()).unwrap();
            task.await.unwrap().unwrap()
        }
    };
    let installed = run_once(vec![]).await;
    assert_eq!(installed, vec!["weights".to_owned()]);
    assert_eq!(triton.state_of("weights"), Some("READY"), "loaded through the restricted API");
    assert!(!repo.join("py-model").exists() && !repo.join("smuggler").exists());

    // The operator allows the Python backend: its model goes in; the smuggler still does not
    // (its backend, onnxruntime, is not allowed to carry code).
    let installed = run_once(vec!["python".into()]).await;
    assert!(installed.contains(&"py-model".to_owned()), "{installed:?}");
    assert!(!installed.contains(&"smuggler".to_owned()), "{installed:?}");
    std::fs::remove_dir_all(shared).ok();
    std::fs::remove_dir_all(repo).ok();
}
