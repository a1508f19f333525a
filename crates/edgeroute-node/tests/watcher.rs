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
