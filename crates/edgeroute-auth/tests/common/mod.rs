//! Shared helpers for the integration tests: fixture keys, scratch directories and hand-built
//! tokens (for headers and claims that `mint` would never produce).

#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use edgeroute_auth::{AuthConfig, KeyStore, MintOptions, Scopes, SigningKey, jwk_from_public_pem};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

pub const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-only";
pub const NOW: u64 = 1_700_000_000;

pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn rsa_a() -> SigningKey {
    SigningKey::Rs256 { pem: fixture("rsa_a_private.pem") }
}
pub fn ed_a() -> SigningKey {
    SigningKey::EdDsa { pem: fixture("ed25519_a_private.pem") }
}
pub fn ed_b() -> SigningKey {
    SigningKey::EdDsa { pem: fixture("ed25519_b_private.pem") }
}
pub fn hs() -> SigningKey {
    SigningKey::Hs256(SECRET.to_vec())
}

/// A JWKS document from `(public PEM fixture, kid)` pairs.
pub fn jwks(entries: &[(&str, &str)]) -> String {
    let keys: Vec<Value> = entries
        .iter()
        .map(|(file, kid)| jwk_from_public_pem(&fixture(file), kid).unwrap())
        .collect();
    serde_json::to_string_pretty(&json!({ "keys": keys })).unwrap()
}

/// Options for a plain token valid at `NOW` for an hour.
pub fn opts(kid: Option<&str>) -> MintOptions {
    MintOptions {
        sub: "tenant-a".into(),
        scopes: Scopes::parse("inference"),
        aud: None,
        iss: None,
        ttl_s: 3600,
        now_unix_s: NOW,
        kid: kid.map(str::to_owned),
        nbf: None,
        residency: None,
        claims: Default::default(),
    }
}

/// A scratch directory unique to one test, removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("edgeroute-auth-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// Replaces a file atomically, as operators are told to.
    pub fn write(&self, file: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let tmp = self.0.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, contents).unwrap();
        let path = self.path(file);
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store with the HS256 secret and a JWKS holding `rsa-a` and `ed-a`.
pub fn store_with(scratch: &Scratch, tweak: impl FnOnce(&mut AuthConfig)) -> KeyStore {
    let mut config = AuthConfig {
        hs256_secret_file: Some(scratch.write("secret", [SECRET, b"\n"].concat())),
        jwks_file: Some(scratch.write(
            "jwks.json",
            jwks(&[("rsa_a_public.pem", "rsa-a"), ("ed25519_a_public.pem", "ed-a")]),
        )),
        ..AuthConfig::default()
    };
    tweak(&mut config);
    KeyStore::from_config(&config).unwrap()
}

pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs an arbitrary header and payload (given as raw JSON text) with `key` under `alg`.
pub fn sign_raw(header: &Value, payload_json: &str, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(serde_json::to_vec(header).unwrap()), b64(payload_json));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{signature}")
}

/// An HS256 token over `payload_json`, signed with the test secret and no `kid`.
pub fn hs256_raw(payload_json: &str) -> String {
    sign_raw(
        &json!({"alg": "HS256", "typ": "JWT"}),
        payload_json,
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
}
