//! Watcher mode: a model directory written to the shared volume is installed atomically into
//! the backend's repository and loaded by (a fake) Triton — only when it is sealed by a
//! trusted key and holds exactly the files sealed.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgeroute_node::watcher::seal::SealVerifier;
use edgeroute_node::watcher::{
    SealSigner, WatchConfig, WatchError, check_model_dir, run, seal_dir,
};
use edgeroute_test_util::fake_triton::FakeTriton;
use edgeroute_test_util::spawn_router;

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../edgeroute-auth/tests/fixtures")
        .join(name);
    std::fs::read_to_string(p).unwrap()
}

/// The operator's key `a` (trusted by the watchers below) or an outsider's key `b`.
fn signer(which: &str) -> SealSigner {
    SealSigner::from_pem(&fixture(&format!("ed25519_{which}_private.pem")), "ops", "test").unwrap()
}

fn trusted() -> Option<SealVerifier> {
    let keys = [("ops".to_owned(), fixture("ed25519_a_public.pem"))];
    Some(SealVerifier::from_public_pems(&keys).unwrap())
}

/// Seals `dir` for `model` with the trusted key.
fn seal(dir: &Path, model: &str) {
    seal_dir(dir, model, &signer("a"), 1_700_000_000).unwrap();
}

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
        seal_keys: trusted(),
        allow_unsealed: false,
        hub: None,
        order_poll: Duration::from_secs(2),
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
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!repo.join("tts-fast").exists(), "installed before it was sealed");
    seal(&shared.join("tts-fast"), "tts-fast");
    // A directory with an unsafe name is never installed.
    std::fs::create_dir_all(shared.join(".hidden")).unwrap();
    std::fs::write(shared.join(".hidden/config.pbtxt"), "x").unwrap();

    let t = Instant::now();
    while triton.state_of("tts-fast") != Some("READY") {
        assert!(t.elapsed() < Duration::from_secs(10), "watcher never loaded the model");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(std::fs::read(repo.join("tts-fast/1/model.onnx")).unwrap().len(), 4096);
    assert!(repo.join("tts-fast/.edgeroute-seal").is_file(), "the seal is kept");
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
        seal(&shared.join(name), name);
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
                seal_keys: trusted(),
                allow_unsealed: false,
                hub: None,
                order_poll: Duration::from_secs(2),
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

/// A Triton model directory `shared/<name>` (config, weights); not sealed.
fn write_model(dir: &Path, weights: &[u8]) {
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(dir.join("1/model.onnx"), weights).unwrap();
    std::fs::write(dir.join("config.pbtxt"), "backend: \"onnxruntime\"\n").unwrap();
}

/// Runs a watcher over `shared` until every directory present has been settled on, and
/// returns what it installed.
async fn watch_once(
    shared: &Path,
    repo: &Path,
    url: String,
    seal_keys: Option<SealVerifier>,
    allow_unsealed: bool,
) -> Vec<String> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = WatchConfig {
        shared: shared.to_owned(),
        repository: repo.to_owned(),
        triton_url: Some(url),
        settle: Duration::from_millis(50),
        allow_backends: vec![],
        triton_restricted: None,
        seal_keys,
        allow_unsealed,
        hub: None,
        order_poll: Duration::from_secs(2),
    };
    let task = tokio::spawn(run(cfg, async {
        let _ = stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop_tx.send(()).unwrap();
    task.await.unwrap().unwrap()
}

#[tokio::test]
async fn only_models_sealed_by_a_trusted_key_and_unaltered_since_are_installed() {
    let (shared, repo) = (tempdir("seal-shared"), tempdir("seal-repo"));
    let triton = FakeTriton::new(&repo, Duration::from_millis(10));
    let up = spawn_router(triton.router()).await;
    let model = |name: &str| {
        let dir = shared.join(name);
        write_model(&dir, &[7u8; 4096]);
        dir
    };
    // Sealed by the trusted key, untouched: installed and loaded.
    seal(&model("good"), "good");
    // Never sealed.
    model("unsealed");
    // Sealed by a key the watcher does not trust (same kid, other key).
    seal_dir(&model("outsider"), "outsider", &signer("b"), 1).unwrap();
    // Altered after sealing: a file added, a byte flipped (same size), a file removed, a
    // symlink added.
    let added = model("added");
    seal(&added, "added");
    std::fs::write(added.join("1/hook.bin"), b"extra").unwrap();
    let modified = model("modified");
    seal(&modified, "modified");
    let mut w = std::fs::read(modified.join("1/model.onnx")).unwrap();
    w[10] ^= 0xff;
    std::fs::write(modified.join("1/model.onnx"), &w).unwrap();
    let removed = model("removed");
    seal(&removed, "removed");
    std::fs::remove_file(removed.join("1/model.onnx")).unwrap();
    let linked = model("linked");
    seal(&linked, "linked");
    std::os::unix::fs::symlink("/etc/hostname", linked.join("1/extra")).unwrap();
    // A valid seal for `good`, copied under another name.
    let renamed = shared.join("renamed");
    write_model(&renamed, &[7u8; 4096]);
    seal(&renamed, "good");
    // The installer's layout: `<top>/<commit>/`, the newest seal wins.
    let (old, new) = (shared.join("org--tiny/aaaa"), shared.join("org--tiny/bbbb"));
    write_model(&old, &[1u8; 100]);
    seal_dir(&old, "org--tiny", &signer("a"), 2_000).unwrap();
    write_model(&new, &[2u8; 200]);
    seal_dir(&new, "org--tiny", &signer("a"), 3_000).unwrap();

    let installed = watch_once(&shared, &repo, up.url(), trusted(), false).await;
    assert_eq!(installed, ["good", "org--tiny"]);
    assert_eq!(triton.state_of("good"), Some("READY"));
    assert_eq!(triton.state_of("org--tiny"), Some("READY"));
    assert_eq!(std::fs::read(repo.join("org--tiny/1/model.onnx")).unwrap(), [2u8; 200]);
    for refused in ["unsealed", "outsider", "added", "modified", "removed", "linked", "renamed"] {
        assert!(!repo.join(refused).exists(), "{refused} was installed");
        assert_eq!(triton.state_of(refused), None, "{refused} was loaded");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&repo)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "refusals leave no staging copy: {leftovers:?}");
    std::fs::remove_dir_all(shared).ok();
    std::fs::remove_dir_all(repo).ok();
}

#[tokio::test]
async fn allow_unsealed_still_installs_an_unsealed_model() {
    let (shared, repo) = (tempdir("unsealed-shared"), tempdir("unsealed-repo"));
    let triton = FakeTriton::new(&repo, Duration::from_millis(10));
    let up = spawn_router(triton.router()).await;
    write_model(&shared.join("plain"), &[5u8; 64]);
    let installed = watch_once(&shared, &repo, up.url(), None, true).await;
    assert_eq!(installed, ["plain"]);
    assert_eq!(triton.state_of("plain"), Some("READY"));
    // With keys as well, an unsealed model goes in, but a broken seal is still refused.
    let tampered = shared.join("tampered");
    write_model(&tampered, &[5u8; 64]);
    seal(&tampered, "tampered");
    std::fs::write(tampered.join("config.pbtxt"), "backend: \"onnxruntime\" # edited").unwrap();
    let installed = watch_once(&shared, &repo, up.url(), trusted(), true).await;
    assert_eq!(installed, ["plain"]);
    assert!(!repo.join("tampered").exists());
    std::fs::remove_dir_all(shared).ok();
    std::fs::remove_dir_all(repo).ok();
}

#[tokio::test]
async fn watch_refuses_to_start_without_a_seal_key_or_allow_unsealed() {
    let (shared, repo) = (tempdir("nokey-shared"), tempdir("nokey-repo"));
    let cfg = WatchConfig {
        shared: shared.clone(),
        repository: repo.clone(),
        triton_url: None,
        settle: Duration::from_millis(50),
        allow_backends: vec![],
        triton_restricted: None,
        seal_keys: None,
        allow_unsealed: false,
        hub: None,
        order_poll: Duration::from_secs(2),
    };
    let started = tokio::time::timeout(Duration::from_secs(5), run(cfg, std::future::pending()));
    let err = started.await.expect("the watcher started without a key").unwrap_err();
    assert!(matches!(err, WatchError::NoSealKeys), "{err}");
    std::fs::remove_dir_all(shared).ok();
    std::fs::remove_dir_all(repo).ok();
}

#[test]
fn the_nodes_seal_settings_come_together_and_only_with_a_repository() {
    use edgeroute_node::NodeConfig;
    let min = "[node]\nid = \"van-1\"\nregion = \"vancouver\"\nallow_unauthenticated = true\n";
    let parse = |models: &str| NodeConfig::parse(&format!("{min}[models]\n{models}"), |_| None);
    let ok = parse("repository = \"/srv/m\"\nseal_key_file = \"/k.pem\"\nseal_kid = \"node-1\"\n");
    assert_eq!(ok.unwrap().models.seal_kid.as_deref(), Some("node-1"));
    for (bad, key) in [
        ("repository = \"/srv/m\"\nseal_key_file = \"/k.pem\"\n", "models.seal_kid"),
        ("repository = \"/srv/m\"\nseal_kid = \"node-1\"\n", "models.seal_key_file"),
        ("seal_key_file = \"/k.pem\"\nseal_kid = \"node-1\"\n", "models.seal_key_file"),
        (
            "repository = \"/srv/m\"\nseal_key_file = \"/k.pem\"\nseal_kid = \"a b\"\n",
            "models.seal_kid",
        ),
    ] {
        let err = parse(bad).unwrap_err().to_string();
        assert!(err.contains(key), "{bad}: {err}");
    }
}
