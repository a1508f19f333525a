//! Keys rotate without a restart: the node re-reads its JWKS file while serving.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgeroute_auth::{MintOptions, Scope, SigningKey, jwk_from_public_pem, mint};
use edgeroute_test_util::{TestNode, get};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../edgeroute-auth/tests/fixtures")
        .join(name);
    std::fs::read_to_string(p).unwrap()
}

fn token(private: &str, kid: &str) -> String {
    let now = edgeroute_core::clock::unix_ms() / 1000;
    mint(
        &SigningKey::EdDsa { pem: fixture(private) },
        &MintOptions {
            sub: "t".into(),
            scopes: Scope::Inference.into(),
            aud: None,
            iss: None,
            ttl_s: 600,
            now_unix_s: now,
            kid: Some(kid.into()),
            nbf: None,
            residency: None,
            claims: Default::default(),
        },
    )
    .unwrap()
}

fn jwks(public: &str, kid: &str) -> String {
    serde_json::json!({ "keys": [jwk_from_public_pem(&fixture(public), kid).unwrap()] }).to_string()
}

/// Writes atomically (temp file + rename), as operators are told to.
fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn jwks_rotation_takes_effect_without_restart() {
    let dir = std::env::temp_dir().join(format!("edgeroute-rot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jwks_path = dir.join("jwks.json");
    write_atomic(&jwks_path, &jwks("ed25519_a_public.pem", "key-a"));
    let node = TestNode::start_with_auth(
        &format!("jwks_file = \"{}\"\nreload_interval_ms = 50\n", jwks_path.display()),
        "",
    )
    .await;
    let (a, b) = (token("ed25519_a_private.pem", "key-a"), token("ed25519_b_private.pem", "key-b"));
    assert_eq!(get(node.addr, "/v1/models", Some(&a)).await.status, 200);
    assert_eq!(get(node.addr, "/v1/models", Some(&b)).await.status, 401);

    write_atomic(&jwks_path, &jwks("ed25519_b_public.pem", "key-b"));
    let t = Instant::now();
    while get(node.addr, "/v1/models", Some(&b)).await.status != 200 {
        assert!(t.elapsed() < Duration::from_secs(5), "new key not picked up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        get(node.addr, "/v1/models", Some(&a)).await.status,
        401,
        "retired key still accepted"
    );

    // A broken file keeps the last good keys and is counted.
    write_atomic(&jwks_path, "{ not json");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(node.addr, "/v1/models", Some(&b)).await.status, 200);
    let metrics = String::from_utf8(get(node.addr, "/metrics", None).await.body.to_vec()).unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("edgeroute_node_auth_key_reload_failures "))
        .unwrap();
    assert!(!line.ends_with(" 0"), "{line}");
    std::fs::remove_dir_all(dir).ok();
}
