//! Seals: a sealed directory verifies only under a trusted key and only while it holds exactly
//! the files sealed; the installer seals every hub install before it is renamed into place.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::fake_hub::{FakeHub, FakeRepo};
use common::{ServerGuard, spawn_router};
use edgeroute_hub::seal::{MAX_SEAL_BYTES, SEAL_FILE};
use edgeroute_hub::{
    DiskProbe, FileFilter, HubClient, HubConfig, HubModel, Installer, InstallerConfig, SealError,
    SealSigner, SealVerifier, seal_dir, verify_dir,
};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../edgeroute-auth/tests/fixtures")
        .join(name);
    std::fs::read_to_string(p).unwrap()
}

fn signer(which: &str, kid: &str) -> SealSigner {
    SealSigner::from_pem(&fixture(&format!("ed25519_{which}_private.pem")), kid, "node-1").unwrap()
}

fn verifier(keys: &[(&str, &str)]) -> SealVerifier {
    let pems: Vec<(String, String)> = keys
        .iter()
        .map(|(which, kid)| ((*kid).to_owned(), fixture(&format!("ed25519_{which}_public.pem"))))
        .collect();
    SealVerifier::from_public_pems(&pems).unwrap()
}

/// A small Triton model directory: config, a version directory with weights.
fn model_dir(root: &Path) -> PathBuf {
    let dir = root.join("tts-fast");
    std::fs::create_dir_all(dir.join("1")).unwrap();
    std::fs::write(dir.join("config.pbtxt"), "name: \"tts-fast\"\n").unwrap();
    std::fs::write(dir.join("1/model.onnx"), vec![7u8; 4096]).unwrap();
    dir
}

fn sealed(root: &Path) -> PathBuf {
    let dir = model_dir(root);
    seal_dir(&dir, "tts-fast", &signer("a", "ops-a"), 1_700_000_000).unwrap();
    dir
}

#[test]
fn a_sealed_directory_verifies_and_lists_every_file() {
    let root = tempfile::tempdir().unwrap();
    let dir = sealed(root.path());
    let seal = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap();
    assert_eq!((seal.v, seal.model.as_str(), seal.iss.as_str()), (1, "tts-fast", "node-1"));
    assert_eq!(seal.iat, 1_700_000_000);
    let paths: Vec<&str> = seal.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["1/model.onnx", "config.pbtxt"], "sorted, the seal itself excluded");
    assert_eq!(seal.files[0].bytes, 4096);
    // Rotation: a verifier trusting the old and the new key accepts seals of both.
    let both = verifier(&[("b", "ops-b"), ("a", "ops-a")]);
    verify_dir(&dir, &both).unwrap();
    seal_dir(&dir, "tts-fast", &signer("b", "ops-b"), 1_700_000_001).unwrap();
    assert_eq!(verify_dir(&dir, &both).unwrap().iat, 1_700_000_001);
}

#[test]
fn an_unsealed_directory_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = model_dir(root.path());
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(err, SealError::NoSeal { .. }), "{err}");
}

#[test]
fn a_seal_by_an_untrusted_key_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = sealed(root.path());
    let err = verify_dir(&dir, &verifier(&[("b", "ops-b")])).unwrap_err();
    assert!(matches!(&err, SealError::UnknownKey { kid } if kid == "ops-a"), "{err}");
    // The trusted kid, but signed by another key: the signature fails.
    seal_dir(&dir, "tts-fast", &signer("b", "ops-a"), 1).unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(&err, SealError::BadSignature { kid } if kid == "ops-a"), "{err}");
}

#[test]
fn edited_claims_break_the_signature() {
    let root = tempfile::tempdir().unwrap();
    let dir = sealed(root.path());
    let token = std::fs::read_to_string(dir.join(SEAL_FILE)).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    // Another model's claims under this seal's header and signature.
    let other = root.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("config.pbtxt"), "x").unwrap();
    seal_dir(&other, "tts-fast", &signer("a", "ops-a"), 2).unwrap();
    let other_token = std::fs::read_to_string(other.join(SEAL_FILE)).unwrap();
    let other_claims = other_token.split('.').nth(1).unwrap();
    std::fs::write(other.join(SEAL_FILE), format!("{}.{other_claims}.{}", parts[0], parts[2]))
        .unwrap();
    let err = verify_dir(&other, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(err, SealError::BadSignature { .. }), "{err}");
    // Garbage and an oversized seal are refused before any hashing.
    std::fs::write(dir.join(SEAL_FILE), "not a jws").unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(err, SealError::Malformed { .. }), "{err}");
    std::fs::write(dir.join(SEAL_FILE), vec![b'a'; MAX_SEAL_BYTES as usize + 1]).unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(err, SealError::TooLarge { .. }), "{err}");
}

#[test]
fn a_file_added_after_sealing_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = sealed(root.path());
    std::fs::write(dir.join("1/hook.py"), "import os").unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(&err, SealError::Unlisted { path } if path == "1/hook.py"), "{err}");
}

#[test]
fn a_file_modified_at_the_same_size_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = sealed(root.path());
    let mut weights = std::fs::read(dir.join("1/model.onnx")).unwrap();
    weights[100] ^= 1;
    std::fs::write(dir.join("1/model.onnx"), &weights).unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(&err, SealError::Modified { path, .. } if path == "1/model.onnx"), "{err}");
    // A different size is refused as well (without hashing).
    std::fs::write(dir.join("1/model.onnx"), [1u8; 10]).unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(&err, SealError::Modified { path, .. } if path == "1/model.onnx"), "{err}");
}

#[test]
fn a_file_removed_after_sealing_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let dir = sealed(root.path());
    std::fs::remove_file(dir.join("1/model.onnx")).unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(&err, SealError::Missing { path } if path == "1/model.onnx"), "{err}");
}

#[test]
fn a_symlink_or_special_file_is_refused_for_sealing_and_verifying() {
    let root = tempfile::tempdir().unwrap();
    let dir = sealed(root.path());
    std::os::unix::fs::symlink("/etc/passwd", dir.join("1/link")).unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(&err, SealError::NotARegularFile { path } if path == "1/link"), "{err}");
    let err = seal_dir(&dir, "tts-fast", &signer("a", "ops-a"), 1).unwrap_err();
    assert!(matches!(err, SealError::NotARegularFile { .. }), "{err}");
    // The seal file itself may not be a symlink to a valid seal elsewhere.
    std::fs::remove_file(dir.join("1/link")).unwrap();
    let elsewhere = root.path().join("seal-copy");
    std::fs::rename(dir.join(SEAL_FILE), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join(SEAL_FILE)).unwrap();
    let err = verify_dir(&dir, &verifier(&[("a", "ops-a")])).unwrap_err();
    assert!(matches!(err, SealError::NotARegularFile { .. }), "{err}");
}

#[test]
fn keys_are_checked_when_loaded() {
    // A public key cannot sign; a private key is not accepted as a trusted key.
    assert!(SealSigner::from_pem(&fixture("ed25519_a_public.pem"), "k", "n").is_err());
    assert!(SealSigner::from_pem(&fixture("rsa_a_private.pem"), "k", "n").is_err());
    assert!(SealSigner::from_pem(&fixture("ed25519_a_private.pem"), "", "n").is_err());
    let private = vec![("k".to_owned(), fixture("ed25519_a_private.pem"))];
    assert!(SealVerifier::from_public_pems(&private).is_err());
    let rsa = vec![("k".to_owned(), fixture("rsa_a_public.pem"))];
    assert!(SealVerifier::from_public_pems(&rsa).is_err());
    assert!(SealVerifier::from_public_pems(&[]).is_err());
    let twice = vec![
        ("k".to_owned(), fixture("ed25519_a_public.pem")),
        ("k".to_owned(), fixture("ed25519_b_public.pem")),
    ];
    assert!(SealVerifier::from_public_pems(&twice).is_err());
}

struct Plenty;

impl DiskProbe for Plenty {
    fn free_bytes(&self, _: &Path) -> std::io::Result<u64> {
        Ok(u64::MAX)
    }
}

#[tokio::test]
async fn the_installers_hub_installs_carry_a_valid_seal() {
    let hub = FakeHub::new().with_repo(
        FakeRepo::new("org/tiny")
            .file("config.json", br#"{"model_type":"llama"}"#.to_vec())
            .file("model.safetensors", vec![3u8; 50_000])
            .file("tokenizer.json", br#"{"version":"1.0"}"#.to_vec()),
    );
    let srv: ServerGuard = spawn_router(hub.router()).await;
    let client = HubClient::new(HubConfig {
        endpoint: srv.url(),
        read_timeout_ms: 10_000,
        retry_backoff_ms: 0,
        ..Default::default()
    })
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let cfg = InstallerConfig { repo_root: root.path().to_owned(), disk_margin_bytes: 1000 };
    let inst = Installer::open_with(cfg, client, Arc::new(Plenty), Some(signer("a", "node-key")))
        .await
        .unwrap();
    let model = HubModel::parse("org/tiny", None).unwrap();
    let only = FileFilter::new(["config.json", "model.safetensors"]).unwrap();
    let installed = inst.install(&model, &only).await.unwrap().wait().await.unwrap();
    let v = verifier(&[("a", "node-key")]);
    let seal = verify_dir(&installed.path, &v).unwrap();
    assert_eq!(seal.model, "org--tiny", "the top directory's name");
    assert_eq!(installed.path.parent().unwrap().file_name().unwrap(), "org--tiny");
    let paths: Vec<&str> = seal.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["config.json", "model.safetensors"]);
    // A wider selection of the same commit is sealed again, listing the carried-over files.
    let installed = inst.install(&model, &FileFilter::default()).await.unwrap().wait().await;
    let seal = verify_dir(&installed.unwrap().path, &v).unwrap();
    let paths: Vec<&str> = seal.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["config.json", "model.safetensors", "tokenizer.json"]);
}

#[test]
fn typed_tokens_and_seals_are_never_taken_for_one_another() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Order {
        model: String,
    }
    let (a, trusted) = (signer("a", "k1"), verifier(&[("a", "k1")]));
    let order = Order { model: "llm".into() };
    let token = a.sign_typed("edgeroute-order+jwt", &order).unwrap();
    assert_eq!(trusted.verify_typed::<Order>("edgeroute-order+jwt", &token).unwrap(), order);
    // Another type, a seal's verification, an untrusted key: refused.
    assert!(trusted.verify_typed::<Order>("other+jwt", &token).is_err());
    assert!(matches!(trusted.verify_token(&token), Err(SealError::Malformed { .. })));
    let outsider = signer("b", "k1").sign_typed("edgeroute-order+jwt", &order).unwrap();
    assert!(matches!(
        trusted.verify_typed::<Order>("edgeroute-order+jwt", &outsider),
        Err(SealError::BadSignature { .. })
    ));
    // A seal is not an order either.
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir(dir.path());
    seal_dir(&m, "tts-fast", &a, 1).unwrap();
    let seal = std::fs::read_to_string(m.join(SEAL_FILE)).unwrap();
    assert!(trusted.verify_typed::<Order>("edgeroute-order+jwt", seal.trim()).is_err());
}
