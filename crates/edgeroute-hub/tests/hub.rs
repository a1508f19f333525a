//! The hub client and installer against the fake hub on loopback: every hostile input the
//! crate claims to refuse, resume, atomicity, shared downloads, and a real GGUF round trip.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::fake_hub::{FAKE_COMMIT, FakeHub, FakeRepo, SMOLLM2_GGUF, smollm2_gguf_path};
use common::{ServerGuard, spawn_router};
use edgeroute_hub::{
    Commit, DiskProbe, FileFilter, HubClient, HubConfig, HubError, HubModel, InstallHandle,
    Installed, Installer, InstallerConfig, Phase,
};
use sha2::{Digest, Sha256};

/// Deterministic filler bytes (so every file has distinct content).
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

/// A safetensors model: config, weights, tokenizer, plus files the default filter skips.
fn tiny_repo() -> FakeRepo {
    FakeRepo::new("org/tiny")
        .file("config.json", br#"{"model_type":"llama"}"#.to_vec())
        .file("model.safetensors", bytes(200_000, 1))
        .file("tokenizer.json", br#"{"version":"1.0"}"#.to_vec())
        .file("README.md", b"# tiny".to_vec())
        .file("pytorch_model.bin", bytes(1000, 2))
}

/// A GGUF model of 300 KB (five 64 KiB chunks), plus a second quantisation.
fn gguf_repo() -> FakeRepo {
    FakeRepo::new("org/gguf")
        .file("m.Q4.gguf", bytes(300_000, 3))
        .file("m.Q8.gguf", bytes(150_000, 4))
        .file("README.md", b"# gguf".to_vec())
}

fn config(url: &str) -> HubConfig {
    HubConfig {
        endpoint: url.to_owned(),
        read_timeout_ms: 10_000,
        retry_backoff_ms: 0,
        ..Default::default()
    }
}

fn client(url: &str) -> HubClient {
    HubClient::new(config(url)).unwrap()
}

fn model(id: &str) -> HubModel {
    HubModel::parse(id, None).unwrap()
}

fn filter(patterns: &[&str]) -> FileFilter {
    FileFilter::new(patterns.iter().copied()).unwrap()
}

struct Probe(u64);

impl DiskProbe for Probe {
    fn free_bytes(&self, _: &Path) -> std::io::Result<u64> {
        Ok(self.0)
    }
}

async fn installer(root: &Path, client: HubClient) -> Installer {
    installer_with(root, client, u64::MAX).await
}

async fn installer_with(root: &Path, client: HubClient, free: u64) -> Installer {
    let cfg = InstallerConfig { repo_root: root.to_owned(), disk_margin_bytes: 1000 };
    Installer::open_with_probe(cfg, client, Arc::new(Probe(free))).await.unwrap()
}

async fn serve(hub: &FakeHub) -> ServerGuard {
    spawn_router(hub.router()).await
}

async fn install(inst: &Installer, id: &str, f: &FileFilter) -> Result<Installed, HubError> {
    let handle: InstallHandle = inst.install(&model(id), f).await?;
    handle.wait().await
}

/// Files a reader of the repository could see: everything except the hidden partial area
/// and the lock file. Staging must be empty whenever no install is running.
fn visible_files(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let name = e.file_name();
        if name == ".partial" || name == ".lock" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            walk(&e.path(), &mut out);
        } else {
            out.push(e.path());
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn bad_ids_and_revisions_never_reach_the_hub() {
    let hub = FakeHub::new().with_repo(tiny_repo());
    let _srv = serve(&hub).await;
    for id in [
        "../../etc/passwd",
        "org/..",
        "https://huggingface.co/org/tiny",
        "org%2F..%2Ftiny",
        "org/tiny%00",
        "org\\tiny",
        "org/ti ny",
        "org/tiny\n",
        "a/b/c",
        "/org/tiny",
        "org/-tiny",
        "org/ti--ny",
        "",
    ] {
        let err = HubModel::parse(id, None).unwrap_err();
        assert!(err.is_client_error(), "{id:?}: {err}");
        assert_eq!(err.code(), "invalid_model_id", "{id:?}: {err}");
    }
    for rev in ["../main", "main/../../x", "/main", "%2e%2e", "http://evil", "a b", "a\r\nb", ""] {
        let err = HubModel::parse("org/tiny", Some(rev)).unwrap_err();
        assert!(err.is_client_error(), "{rev:?}: {err}");
        assert_eq!(err.code(), "invalid_revision", "{rev:?}: {err}");
    }
    assert_eq!(hub.api_request_count(), 0);
}

#[tokio::test]
async fn resolve_selects_validated_files_and_skips_pickles() {
    let hub = FakeHub::new().with_repo(tiny_repo());
    let srv = serve(&hub).await;
    let m = client(&srv.url()).resolve(&model("org/tiny"), &FileFilter::default()).await.unwrap();
    assert_eq!(m.commit.as_str(), FAKE_COMMIT);
    let names: Vec<_> = m.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(names, ["config.json", "model.safetensors", "tokenizer.json"]);
    let weights = &m.files[1];
    assert_eq!(weights.size, 200_000);
    assert_eq!(weights.sha256.as_deref(), Some(sha256_hex(&bytes(200_000, 1)).as_str()));
    assert_eq!(m.files[0].sha256, None, "non-LFS files carry no SHA-256");
    // A pinned commit resolves too.
    let pinned = HubModel::parse("org/tiny", Some(FAKE_COMMIT)).unwrap();
    assert_eq!(client(&srv.url()).resolve(&pinned, &FileFilter::default()).await.unwrap(), m);
}

#[tokio::test]
async fn unknown_model_or_revision_is_not_found() {
    let hub = FakeHub::new().with_repo(tiny_repo());
    let srv = serve(&hub).await;
    let c = client(&srv.url());
    let err = c.resolve(&model("org/missing"), &FileFilter::default()).await.unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err}");
    assert!(err.is_client_error());
    assert_eq!(err.code(), "model_not_found");
    let rev = HubModel::parse("org/tiny", Some("v9")).unwrap();
    let err = c.resolve(&rev, &FileFilter::default()).await.unwrap_err();
    assert!(matches!(err, HubError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn private_model_needs_the_token() {
    let hub = FakeHub::new().with_repo(tiny_repo().private());
    hub.require_token("hf_test_token");
    let srv = serve(&hub).await;
    let err = client(&srv.url()).resolve(&model("org/tiny"), &FileFilter::default()).await;
    let err = err.unwrap_err();
    assert!(matches!(err, HubError::Unauthorized { status: 401, .. }), "{err}");
    assert!(err.is_client_error());
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");

    let with_token =
        HubClient::new(HubConfig { token: Some("hf_test_token".into()), ..config(&srv.url()) })
            .unwrap();
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), with_token).await;
    install(&inst, "org/tiny", &FileFilter::default()).await.unwrap();
    assert!(hub.downloads().iter().all(|d| d.authorized));
}

#[tokio::test]
async fn gated_model_download_is_unauthorized() {
    let hub = FakeHub::new().with_repo(gguf_repo().gated());
    hub.require_token("hf_test_token");
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let err = install(&inst, "org/gguf", &filter(&["m.Q8.gguf"])).await.unwrap_err();
    assert!(matches!(err, HubError::Unauthorized { status: 401, .. }), "{err}");
    assert!(err.is_client_error());
    assert!(visible_files(root.path()).is_empty());
}

#[tokio::test]
async fn pickle_only_repo_is_refused_before_downloading() {
    let hub = FakeHub::new().with_repo(
        FakeRepo::new("org/pickled")
            .file("config.json", b"{}".to_vec())
            .file("pytorch_model.bin", bytes(1000, 5))
            .file("training_args.pt", bytes(10, 6)),
    );
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let err = install(&inst, "org/pickled", &FileFilter::default()).await.unwrap_err();
    assert!(matches!(err, HubError::PickleRefused { .. }), "{err}");
    assert!(err.is_client_error());
    assert_eq!(err.code(), "pickle_refused");
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");
    assert!(hub.downloads().is_empty());
}

#[tokio::test]
async fn malicious_file_names_refuse_the_whole_repo() {
    for name in ["../../etc/passwd", "a/../../b", "/etc/passwd", "..\\..\\evil.gguf", "a//b.json"] {
        let hub = FakeHub::new()
            .with_repo(gguf_repo().raw_sibling(serde_json::json!({"rfilename": name, "size": 4})));
        let srv = serve(&hub).await;
        let root = tempfile::tempdir().unwrap();
        let inst = installer(root.path(), client(&srv.url())).await;
        let err = install(&inst, "org/gguf", &FileFilter::default()).await.unwrap_err();
        assert!(matches!(err, HubError::UnsafePath { .. }), "{name:?}: {err}");
        assert!(!err.is_client_error(), "a hostile hub is an upstream fault");
        assert!(hub.downloads().is_empty(), "{name:?}: nothing may be fetched");
        assert!(visible_files(root.path()).is_empty());
    }
}

#[tokio::test]
async fn bad_commit_from_the_hub_is_refused() {
    for sha in ["main", "../../../../tmp/x", "C0FFEE00C0FFEE00C0FFEE00C0FFEE00C0FFEE00", "c0ffee"] {
        let hub = FakeHub::new().with_repo(gguf_repo().api_commit(sha));
        let srv = serve(&hub).await;
        let err = client(&srv.url()).resolve(&model("org/gguf"), &FileFilter::default()).await;
        let err = err.unwrap_err();
        assert!(matches!(err, HubError::BadCommit { .. }), "{sha:?}: {err}");
        assert_eq!(err.code(), "hub_bad_commit");
    }
}

#[tokio::test]
async fn wrong_sha_is_detected_and_the_download_discarded() {
    let hub = FakeHub::new().with_repo(gguf_repo().wrong_sha("m.Q8.gguf"));
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let err = install(&inst, "org/gguf", &filter(&["m.Q8.gguf"])).await.unwrap_err();
    assert!(matches!(err, HubError::HashMismatch { .. }), "{err}");
    assert_eq!(err.code(), "hash_mismatch");
    assert!(visible_files(root.path()).is_empty());
    let partial = root.path().join(".partial/org--gguf").join(FAKE_COMMIT).join("m.Q8.gguf");
    assert!(!partial.exists(), "the partial file of a bad download is deleted");
}

#[tokio::test]
async fn size_lie_is_detected() {
    let hub = FakeHub::new().with_repo(gguf_repo().advertise_size("m.Q8.gguf", 100_000));
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let err = install(&inst, "org/gguf", &filter(&["m.Q8.gguf"])).await.unwrap_err();
    assert!(matches!(err, HubError::SizeMismatch { .. }), "{err}");
    assert!(visible_files(root.path()).is_empty());
}

#[tokio::test]
async fn insufficient_disk_is_refused_before_downloading() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer_with(root.path(), client(&srv.url()), 200_000).await;
    let err = install(&inst, "org/gguf", &filter(&["m.Q4.gguf"])).await.unwrap_err();
    match err {
        HubError::InsufficientDisk { needed, free } => {
            assert_eq!(needed, 300_000 + 1000, "size plus margin");
            assert_eq!(free, 200_000);
        }
        other => panic!("expected InsufficientDisk, got {other}"),
    }
    assert!(hub.downloads().is_empty());
    // Just enough space: the margin is honoured, not more.
    let inst2 = {
        drop(inst);
        installer_with(root.path(), client(&srv.url()), 301_000).await
    };
    install(&inst2, "org/gguf", &filter(&["m.Q4.gguf"])).await.unwrap();
}

#[tokio::test]
async fn redirect_to_a_forbidden_host_is_not_followed() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    let cdn = FakeHub::new().with_repo(gguf_repo());
    let (srv, cdn_srv) = (serve(&hub).await, serve(&cdn).await);
    hub.redirect_downloads_to(&cdn_srv.url());
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let err = install(&inst, "org/gguf", &filter(&["m.Q8.gguf"])).await.unwrap_err();
    match &err {
        HubError::ForbiddenRedirect { host } => assert_eq!(host, &cdn_srv.addr.to_string()),
        other => panic!("expected ForbiddenRedirect, got {other}"),
    }
    assert!(err.is_client_error());
    assert_eq!(cdn.downloads().len(), 0, "the forbidden host was never contacted");
    assert!(visible_files(root.path()).is_empty());
}

#[tokio::test]
async fn redirect_to_an_allowed_host_is_followed_without_the_token() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    let cdn = FakeHub::new().with_repo(gguf_repo());
    let (srv, cdn_srv) = (serve(&hub).await, serve(&cdn).await);
    hub.redirect_downloads_to(&cdn_srv.url());
    let cfg = HubConfig {
        token: Some("hf_secret".into()),
        allowed_hosts: vec![cdn_srv.addr.to_string()],
        ..config(&srv.url())
    };
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), HubClient::new(cfg).unwrap()).await;
    let done = install(&inst, "org/gguf", &filter(&["m.Q8.gguf"])).await.unwrap();
    assert_eq!(sha256_file(&done.path.join("m.Q8.gguf")), sha256_hex(&bytes(150_000, 4)));
    assert!(hub.downloads().iter().all(|d| d.authorized), "the hub gets the token");
    assert_eq!(cdn.download_count("m.Q8.gguf"), 1);
    assert!(cdn.downloads().iter().all(|d| !d.authorized), "the CDN never sees the token");
}

#[tokio::test]
async fn redirect_loops_stop() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    let srv = serve(&hub).await;
    hub.redirect_downloads_to(&srv.url());
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let err = install(&inst, "org/gguf", &filter(&["m.Q8.gguf"])).await.unwrap_err();
    assert!(matches!(err, HubError::TooManyRedirects { max: 5 }), "{err}");
    assert_eq!(hub.download_count("m.Q8.gguf"), 6, "the first request and five redirects");
}

#[tokio::test]
async fn interrupted_download_resumes_with_a_range() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    hub.cut_first_download_after(100_000);
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let done = install(&inst, "org/gguf", &filter(&["m.Q4.gguf"])).await.unwrap();
    let ranges: Vec<_> = hub.downloads().into_iter().map(|d| d.range).collect();
    assert_eq!(ranges, [None, Some("bytes=100000-".to_owned())]);
    assert_eq!(sha256_file(&done.path.join("m.Q4.gguf")), sha256_hex(&bytes(300_000, 3)));
    assert!(!done.already_present);
}

#[tokio::test]
async fn a_200_answer_to_a_range_restarts_from_zero() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    hub.cut_first_download_after(100_000);
    hub.ignore_ranges();
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let done = install(&inst, "org/gguf", &filter(&["m.Q4.gguf"])).await.unwrap();
    let ranges: Vec<_> = hub.downloads().into_iter().map(|d| d.range).collect();
    assert_eq!(ranges, [None, Some("bytes=100000-".to_owned())]);
    // Appending the whole file after the first 100 000 bytes would fail the size check.
    assert_eq!(sha256_file(&done.path.join("m.Q4.gguf")), sha256_hex(&bytes(300_000, 3)));
}

#[tokio::test]
async fn a_failed_download_resumes_after_a_restart() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    hub.cut_first_download_after(100_000);
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let no_retries = HubConfig { retries: 0, ..config(&srv.url()) };
    let inst = installer(root.path(), HubClient::new(no_retries).unwrap()).await;
    let err = install(&inst, "org/gguf", &filter(&["m.Q4.gguf"])).await.unwrap_err();
    assert!(matches!(err, HubError::Transport { .. }), "{err}");
    assert!(!err.is_client_error());
    assert!(visible_files(root.path()).is_empty(), "no half file in sight");
    drop(inst);

    // A new installer (as after a restart) continues from the partial data.
    let inst = installer(root.path(), client(&srv.url())).await;
    let done = install(&inst, "org/gguf", &filter(&["m.Q4.gguf"])).await.unwrap();
    let ranges: Vec<_> = hub.downloads().into_iter().map(|d| d.range).collect();
    assert_eq!(ranges, [None, Some("bytes=100000-".to_owned())]);
    assert_eq!(sha256_file(&done.path.join("m.Q4.gguf")), sha256_hex(&bytes(300_000, 3)));
    assert!(!root.path().join(".partial/org--gguf").join(FAKE_COMMIT).exists());
}

#[tokio::test]
async fn installs_atomically_with_the_documented_layout() {
    let hub = FakeHub::new().with_repo(tiny_repo());
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let handle = inst.install(&model("org/tiny"), &FileFilter::default()).await.unwrap();
    let progress = handle.progress();
    let done = handle.wait().await.unwrap();
    let canonical_root = std::fs::canonicalize(root.path()).unwrap();
    assert_eq!(done.path, canonical_root.join("org--tiny").join(FAKE_COMMIT));
    assert_eq!(done.bytes, 200_000 + 22 + 17);
    assert_eq!(done.gguf(), None);
    let p = progress.borrow().clone();
    assert_eq!(p.phase, Phase::Done);
    assert_eq!((p.done_bytes, p.total_bytes), (done.bytes, done.bytes));
    assert!(p.files.iter().all(|f| f.done_bytes == f.total_bytes));
    let mut files: Vec<_> = visible_files(root.path())
        .into_iter()
        .map(|p| p.strip_prefix(&canonical_root).unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let dir = format!("org--tiny/{FAKE_COMMIT}");
    assert_eq!(
        files,
        [
            format!("{dir}/config.json"),
            format!("{dir}/model.safetensors"),
            format!("{dir}/tokenizer.json")
        ]
    );
    let listed = inst.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id.to_string(), "org/tiny");

    // Installing again downloads nothing.
    let n = hub.downloads().len();
    let again = install(&inst, "org/tiny", &FileFilter::default()).await.unwrap();
    assert!(again.already_present);
    assert_eq!(hub.downloads().len(), n);
}

#[tokio::test]
async fn cancelling_mid_download_leaves_nothing_installed() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    hub.stall_downloads_after(70_000);
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let handle = inst.install(&model("org/gguf"), &filter(&["m.Q4.gguf"])).await.unwrap();
    let mut progress = handle.progress();
    tokio::time::timeout(Duration::from_secs(10), progress.wait_for(|p| p.done_bytes >= 70_000))
        .await
        .unwrap()
        .unwrap();
    let commit = Commit::parse(FAKE_COMMIT).unwrap();
    let id = edgeroute_hub::HubId::parse("org/gguf").unwrap();
    assert!(inst.cancel(&id, &commit));
    let err = handle.wait().await.unwrap_err();
    assert!(matches!(err, HubError::Cancelled), "{err}");
    assert_eq!(progress.borrow().phase, Phase::Failed);
    assert!(visible_files(root.path()).is_empty(), "no half file in sight");
    assert!(!inst.model_path(&id, &commit).exists());
    assert!(inst.list().await.unwrap().is_empty());
    assert!(!inst.cancel(&id, &commit), "nothing left to cancel");
}

#[tokio::test]
async fn a_failed_install_leaves_existing_models_untouched() {
    let hub = FakeHub::new().with_repo(tiny_repo()).with_repo(gguf_repo().wrong_sha("m.Q4.gguf"));
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let tiny = install(&inst, "org/tiny", &FileFilter::default()).await.unwrap();
    let before = visible_files(root.path());
    let err = install(&inst, "org/gguf", &filter(&["m.Q4.gguf"])).await.unwrap_err();
    assert!(matches!(err, HubError::HashMismatch { .. }), "{err}");
    assert_eq!(visible_files(root.path()), before);
    assert_eq!(sha256_file(&tiny.path.join("model.safetensors")), sha256_hex(&bytes(200_000, 1)));
}

#[tokio::test]
async fn orphaned_staging_is_removed_on_open() {
    let root = tempfile::tempdir().unwrap();
    let orphan = root.path().join(".staging/4242-7/sub");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("half.gguf"), b"half").unwrap();
    std::fs::write(root.path().join(".staging/stray"), b"x").unwrap();
    let inst = installer(root.path(), client("http://127.0.0.1:9")).await;
    assert_eq!(std::fs::read_dir(root.path().join(".staging")).unwrap().count(), 0);
    // One installer per repository at a time.
    let second = Installer::open(InstallerConfig::new(root.path()), client("http://127.0.0.1:9"));
    let err = second.await.unwrap_err();
    assert!(matches!(err, HubError::Config { .. }), "{err}");
    drop(inst);
}

#[tokio::test]
async fn concurrent_loads_share_one_download() {
    let hub = FakeHub::new().with_repo(tiny_repo());
    // Downloads wait until every load has registered, so all four overlap for certain.
    hub.hold_downloads();
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let (tiny, all) = (model("org/tiny"), FileFilter::default());
    let starts = (0..4).map(|_| inst.install(&tiny, &all));
    // Joining must not wait for the download: a load that waits here has not joined.
    let started =
        tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(starts))
            .await
            .expect("every load registers while the downloads are held");
    let handles: Vec<InstallHandle> = started.into_iter().map(Result::unwrap).collect();
    let starters = handles.iter().filter(|h| !h.joined()).count();
    hub.release_downloads();
    assert_eq!(starters, 1, "one load downloads, the others join it");
    let results = futures_util::future::join_all(handles.iter().map(InstallHandle::wait)).await;
    let paths: Vec<_> = results.into_iter().map(|r| r.unwrap().path).collect();
    assert!(paths.iter().all(|p| p == &paths[0]));
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(hub.download_count(f), 1, "{f} downloaded once");
    }
    assert_eq!(hub.api_request_count(), 4, "each load resolves; one downloads");
}

#[tokio::test]
async fn a_second_selection_of_the_same_commit_extends_the_install() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let q4 = install(&inst, "org/gguf", &filter(&["m.Q4.gguf"])).await.unwrap();
    let q8 = install(&inst, "org/gguf", &filter(&["m.Q8.gguf"])).await.unwrap();
    assert_eq!(q4.path, q8.path);
    assert!(q8.path.join("m.Q4.gguf").exists(), "the earlier file stays");
    assert!(q8.path.join("m.Q8.gguf").exists());
    assert_eq!(q8.gguf(), Some(q8.path.join("m.Q8.gguf")));
    assert_eq!(hub.download_count("m.Q4.gguf"), 1);
    assert_eq!(sha256_file(&q8.path.join("m.Q4.gguf")), sha256_hex(&bytes(300_000, 3)));
}

#[tokio::test]
async fn remove_unloads_an_installed_model() {
    let hub = FakeHub::new().with_repo(gguf_repo());
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let done = install(&inst, "org/gguf", &filter(&["m.Q8.gguf"])).await.unwrap();
    assert!(inst.remove_path(&done.path).await.unwrap());
    assert!(visible_files(root.path()).is_empty());
    assert!(!root.path().join("org--gguf").exists());
    assert!(!inst.remove(&done.id, &done.commit).await.unwrap(), "already gone");
    for outside in [root.path().join("org--gguf"), PathBuf::from("/etc"), root.path().join("..")] {
        let err = inst.remove_path(&outside).await.unwrap_err();
        assert!(matches!(err, HubError::LocalPathForbidden { .. }), "{outside:?}: {err}");
    }
}

#[tokio::test]
async fn smollm2_gguf_round_trip_with_resume() {
    let gguf = smollm2_gguf_path();
    assert!(
        gguf.exists(),
        "{} is missing: run scripts/setup-python.sh (it installs the SmolLM2 GGUF)",
        gguf.display()
    );
    let repo = FakeRepo::new("HuggingFaceTB/SmolLM2-135M-Instruct")
        .disk_file(SMOLLM2_GGUF, &gguf)
        .unwrap()
        .file("README.md", b"# SmolLM2".to_vec());
    let expected = repo.sha256_of(SMOLLM2_GGUF).unwrap();
    let hub = FakeHub::new().with_repo(repo);
    let cut = 30 * 1024 * 1024;
    hub.cut_first_download_after(cut);
    let srv = serve(&hub).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), client(&srv.url())).await;
    let handle = inst
        .install(&model("HuggingFaceTB/SmolLM2-135M-Instruct"), &filter(&["*.Q4_1.gguf"]))
        .await
        .unwrap();
    let progress = handle.progress();
    let done = handle.wait().await.unwrap();
    let ranges: Vec<_> = hub.downloads().into_iter().map(|d| d.range).collect();
    assert_eq!(ranges, [None, Some(format!("bytes={cut}-"))]);
    let installed = done.gguf().unwrap();
    assert_eq!(installed, done.path.join(SMOLLM2_GGUF));
    assert_eq!(sha256_file(&installed), expected);
    assert_eq!(sha256_file(&gguf), expected);
    let size = std::fs::metadata(&gguf).unwrap().len();
    assert_eq!(progress.borrow().done_bytes, size);
    assert_eq!(done.bytes, size);
}
