//! Key rotation without restart: `reload` and the polling reloader.

// Helpers outside #[test] bodies unwrap too: clippy.toml's allow-unwrap-in-tests only
// covers the test functions themselves, and a panic here is still a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use edgeroute_auth::{AuthConfig, AuthError, KeyLoadError, KeyStore, mint, spawn_reloader};

fn jwks_store(scratch: &Scratch, jwks_json: &str) -> KeyStore {
    let config = AuthConfig {
        jwks_file: Some(scratch.write("jwks.json", jwks_json)),
        ..AuthConfig::default()
    };
    KeyStore::from_config(&config).unwrap()
}

#[test]
fn rewriting_the_jwks_swaps_keys_on_reload() {
    let scratch = Scratch::new("rotate_jwks");
    let store = jwks_store(&scratch, &jwks(&[("ed25519_a_public.pem", "key-a")]));
    let token_a = mint(&ed_a(), &opts(Some("key-a"))).unwrap();
    let token_b = mint(&ed_b(), &opts(Some("key-b"))).unwrap();
    assert!(store.verify(&token_a, NOW).is_ok());
    assert!(matches!(store.verify(&token_b, NOW), Err(AuthError::UnknownKey)));
    assert!(!store.reload().unwrap(), "unchanged file is not reloaded");

    scratch.write("jwks.json", jwks(&[("ed25519_b_public.pem", "key-b")]));
    // Verification never touches the file: the old keys hold until a reload.
    assert!(store.verify(&token_a, NOW).is_ok());
    assert!(store.reload().unwrap());
    assert_eq!(store.generation(), 1);
    assert!(matches!(store.verify(&token_a, NOW), Err(AuthError::UnknownKey)));
    assert!(store.verify(&token_b, NOW).is_ok());
    assert!(!store.reload().unwrap());
    assert_eq!(store.reload_failures(), 0);
}

#[test]
fn a_remembered_token_stops_working_when_its_key_is_rotated_out() {
    let scratch = Scratch::new("rotate_cached");
    let store = jwks_store(&scratch, &jwks(&[("ed25519_a_public.pem", "key-a")]));
    let token_a = mint(&ed_a(), &opts(Some("key-a"))).unwrap();
    let first = store.authenticate(&token_a, NOW).unwrap();
    let again = store.authenticate(&token_a, NOW).unwrap();
    assert!(Arc::ptr_eq(&first, &again), "the second check is the remembered one");
    assert_eq!(first.tenant.as_ref(), store.verify(&token_a, NOW).unwrap().tenant());

    scratch.write("jwks.json", jwks(&[("ed25519_b_public.pem", "key-b")]));
    assert!(store.reload().unwrap());
    assert!(matches!(store.authenticate(&token_a, NOW), Err(AuthError::UnknownKey)));
}

#[test]
fn a_remembered_token_still_expires() {
    let scratch = Scratch::new("cached_expiry");
    let store = jwks_store(&scratch, &jwks(&[("ed25519_a_public.pem", "key-a")]));
    let token = mint(&ed_a(), &opts(Some("key-a"))).unwrap();
    let v = store.authenticate(&token, NOW).unwrap();
    let after = v.exp + store.policy().leeway_s;
    assert!(store.authenticate(&token, after - 1).is_ok());
    assert!(matches!(store.authenticate(&token, after), Err(AuthError::Expired)));
    // A forged token that shares the remembered one's header and claims is still checked.
    let i = token.len() - 10;
    let flipped = if &token[i..=i] == "A" { "B" } else { "A" };
    let forged = format!("{}{flipped}{}", &token[..i], &token[i + 1..]);
    assert!(store.authenticate(&forged, NOW).is_err());
}

#[test]
fn same_kid_new_key_invalidates_old_signatures() {
    let scratch = Scratch::new("rotate_same_kid");
    let store = jwks_store(&scratch, &jwks(&[("ed25519_a_public.pem", "current")]));
    let old = mint(&ed_a(), &opts(Some("current"))).unwrap();
    let new = mint(&ed_b(), &opts(Some("current"))).unwrap();
    assert!(store.verify(&old, NOW).is_ok());
    assert!(matches!(store.verify(&new, NOW), Err(AuthError::BadSignature)));
    scratch.write("jwks.json", jwks(&[("ed25519_b_public.pem", "current")]));
    assert!(store.reload().unwrap());
    assert!(matches!(store.verify(&old, NOW), Err(AuthError::BadSignature)));
    assert!(store.verify(&new, NOW).is_ok());
}

#[test]
fn malformed_rewrite_keeps_the_last_good_keys_and_counts_failures() {
    let scratch = Scratch::new("rotate_malformed");
    let good = jwks(&[("ed25519_a_public.pem", "key-a")]);
    let store = jwks_store(&scratch, &good);
    let token_a = mint(&ed_a(), &opts(Some("key-a"))).unwrap();

    scratch.write("jwks.json", &good[..good.len() / 2]); // a torn write
    let err = store.reload().unwrap_err();
    assert!(matches!(err, AuthError::KeyLoad(KeyLoadError::Jwks(_))), "{err:?}");
    assert_eq!(store.reload_failures(), 1);
    assert_eq!(store.generation(), 0);
    assert!(store.verify(&token_a, NOW).is_ok(), "last good keys still in force");

    // A supported key that is broken also fails the whole reload.
    scratch
        .write("jwks.json", r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"key-a","x":"AAAA"}]}"#);
    assert!(store.reload().is_err());
    std::fs::remove_file(scratch.path("jwks.json")).unwrap();
    assert!(matches!(store.reload(), Err(AuthError::KeyLoad(KeyLoadError::Read { .. }))));
    assert_eq!(store.reload_failures(), 3);
    assert!(store.verify(&token_a, NOW).is_ok());

    scratch.write("jwks.json", jwks(&[("ed25519_b_public.pem", "key-b")]));
    assert!(store.reload().unwrap());
    assert!(store.verify(&mint(&ed_b(), &opts(Some("key-b"))).unwrap(), NOW).is_ok());
    assert_eq!(store.reload_failures(), 3, "successes do not reset the counter");
}

#[test]
fn secret_file_rotation() {
    let scratch = Scratch::new("rotate_secret");
    let config = AuthConfig {
        hs256_secret_file: Some(scratch.write("secret", SECRET)),
        ..AuthConfig::default()
    };
    let store = KeyStore::from_config(&config).unwrap();
    let old = mint(&hs(), &opts(None)).unwrap();
    let new_secret = b"a-completely-different-secret-of-40-bytes".to_vec();
    let new = mint(&edgeroute_auth::SigningKey::Hs256(new_secret.clone()), &opts(None)).unwrap();
    assert!(store.verify(&old, NOW).is_ok());

    // Too short a replacement is refused; the old secret stays.
    scratch.write("secret", "short\n");
    assert!(matches!(
        store.reload(),
        Err(AuthError::KeyLoad(KeyLoadError::SecretTooShort { len: 5, .. }))
    ));
    assert!(store.verify(&old, NOW).is_ok());

    scratch.write("secret", [new_secret.as_slice(), b"\r\n"].concat());
    assert!(store.reload().unwrap());
    assert!(matches!(store.verify(&old, NOW), Err(AuthError::BadSignature)));
    assert!(store.verify(&new, NOW).is_ok());
}

#[tokio::test(start_paused = true)]
async fn reloader_picks_up_changes_on_its_interval() {
    let scratch = Scratch::new("reloader");
    let store = Arc::new(jwks_store(&scratch, &jwks(&[("ed25519_a_public.pem", "key-a")])));
    let token_b = mint(&ed_b(), &opts(Some("key-b"))).unwrap();
    let interval = Duration::from_millis(1000);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = spawn_reloader(Arc::clone(&store), interval, async move {
        let _ = stopped.await;
    });

    // Nothing happens before the first tick, even after the file changes.
    scratch.write("jwks.json", jwks(&[("ed25519_b_public.pem", "key-b")]));
    tokio::time::sleep(interval / 2).await;
    assert_eq!(store.generation(), 0);
    assert!(store.verify(&token_b, NOW).is_err());

    // Virtual time: each sleep lets the reloader tick; the blocking read holds the clock.
    let mut waited = 0;
    while store.generation() == 0 && waited < 5 {
        tokio::time::sleep(interval).await;
        waited += 1;
    }
    assert_eq!(store.generation(), 1, "reloaded within {waited} intervals");
    assert!(store.verify(&token_b, NOW).is_ok());

    // A broken file is counted on every poll and the keys stay.
    scratch.write("jwks.json", "{broken");
    let before = store.reload_failures();
    let mut waited = 0;
    while store.reload_failures() < before + 2 && waited < 10 {
        tokio::time::sleep(interval).await;
        waited += 1;
    }
    assert!(store.reload_failures() >= before + 2);
    assert!(store.verify(&token_b, NOW).is_ok());

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), handle).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn zero_interval_disables_the_reloader() {
    let scratch = Scratch::new("reloader_zero");
    let store = Arc::new(jwks_store(&scratch, &jwks(&[("ed25519_a_public.pem", "key-a")])));
    let handle = spawn_reloader(store, Duration::ZERO, std::future::pending());
    tokio::time::timeout(Duration::from_secs(1), handle).await.unwrap().unwrap();
}
