//! Verification behaviour end to end: keys loaded from files, tokens minted or hand-built.

// Helpers outside #[test] bodies unwrap too: clippy.toml's allow-unwrap-in-tests only
// covers the test functions themselves, and a panic here is still a failed test.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use edgeroute_auth::{
    AuthConfig, AuthError, KeyLoadError, KeySet, KeyStore, MAX_TOKEN_BYTES, Policy, Scope, Scopes,
    jwk_from_public_pem, mint,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

#[test]
fn hs256_happy_path() {
    let scratch = Scratch::new("hs256_happy");
    let store = store_with(&scratch, |_| {});
    let mut o = opts(None);
    o.scopes = Scopes::parse("inference admin");
    let token = mint(&hs(), &o).unwrap();
    let claims = store.verify(&token, NOW).unwrap();
    assert_eq!(claims.tenant(), "tenant-a");
    assert_eq!(claims.exp, NOW + 3600);
    assert_eq!(claims.iat, Some(NOW));
    assert!(claims.has_scope(Scope::Inference) && claims.has_scope(Scope::Admin));
}

#[test]
fn secret_file_trailing_newline_is_not_part_of_the_secret() {
    // The store's secret file ends in "\n"; a token signed with secret+"\n" must not verify.
    let scratch = Scratch::new("secret_newline");
    let store = store_with(&scratch, |_| {});
    let with_newline = edgeroute_auth::SigningKey::Hs256([SECRET, b"\n"].concat());
    let token = mint(&with_newline, &opts(None)).unwrap();
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::BadSignature)));
}

#[test]
fn short_secret_is_refused_at_load() {
    let scratch = Scratch::new("short_secret");
    let config = AuthConfig {
        hs256_secret_file: Some(scratch.write("secret", "only-16-bytes!!!\n")),
        ..AuthConfig::default()
    };
    let err = KeyStore::from_config(&config).unwrap_err();
    assert!(
        matches!(err, AuthError::KeyLoad(KeyLoadError::SecretTooShort { len: 16, min: 32 })),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "hs256 secret is 16 bytes; at least 32 are required");
    assert_eq!(err.http_status(), 500);
}

#[test]
fn secret_from_environment() {
    // The environment is the config loader's lookup, injected: no process environment here.
    let env = |k: &str| {
        (k == "EDGEROUTE_HS256").then(|| "a-secret-from-the-environment-0123456789".to_owned())
    };
    let mut config =
        AuthConfig { hs256_secret_env: Some("EDGEROUTE_HS256".into()), ..AuthConfig::default() };
    config.resolve_env(env);
    assert_eq!(format!("{:?}", config.hs256_secret_from_env), "Secret(<redacted>)");
    let store = KeyStore::from_config(&config).unwrap();
    let secret = b"a-secret-from-the-environment-0123456789".to_vec();
    let token = mint(&edgeroute_auth::SigningKey::Hs256(secret), &opts(None)).unwrap();
    assert!(store.verify(&token, NOW).is_ok());

    let mut missing = AuthConfig {
        hs256_secret_env: Some("EDGEROUTE_AUTH_TEST_SURELY_UNSET".into()),
        ..AuthConfig::default()
    };
    missing.resolve_env(env);
    assert!(matches!(
        KeyStore::from_config(&missing),
        Err(AuthError::KeyLoad(KeyLoadError::Env { .. }))
    ));
}

#[test]
fn rs256_and_eddsa_via_jwks_by_kid() {
    let scratch = Scratch::new("jwks_by_kid");
    let store = store_with(&scratch, |_| {});
    let rs = mint(&rsa_a(), &opts(Some("rsa-a"))).unwrap();
    let ed = mint(&ed_a(), &opts(Some("ed-a"))).unwrap();
    assert_eq!(store.verify(&rs, NOW).unwrap().sub, "tenant-a");
    assert_eq!(store.verify(&ed, NOW).unwrap().sub, "tenant-a");
    // The right algorithm under the wrong kid is still a different key.
    let ed_as_rsa = mint(&ed_a(), &opts(Some("rsa-a"))).unwrap();
    assert!(matches!(store.verify(&ed_as_rsa, NOW), Err(AuthError::AlgorithmMismatch)));
}

#[test]
fn unknown_kid_and_kidless_public_key_tokens() {
    let scratch = Scratch::new("unknown_kid");
    let store = store_with(&scratch, |_| {});
    let token = mint(&ed_a(), &opts(Some("ed-zzz"))).unwrap();
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::UnknownKey)));
    // A kid that looks like a path is just an unknown id.
    let token = mint(&ed_a(), &opts(Some("../../etc/passwd"))).unwrap();
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::UnknownKey)));
    // Without a kid only the HS256 secret is considered, even though ed-a is the only EdDSA key.
    let token = mint(&ed_a(), &opts(None)).unwrap();
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::AlgorithmMismatch)));
    let jwks_only = store_with(&scratch, |c| c.hs256_secret_file = None);
    assert!(matches!(jwks_only.verify(&token, NOW), Err(AuthError::UnknownKey)));
    // An HS256 token with a kid never falls back to the secret.
    let token = mint(&hs(), &opts(Some("hs"))).unwrap();
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::UnknownKey)));
}

#[test]
fn alg_none_is_rejected() {
    let scratch = Scratch::new("alg_none");
    let store = store_with(&scratch, |_| {});
    let payload = b64(format!(r#"{{"sub":"evil","exp":{},"scope":"admin"}}"#, NOW + 60));
    for header in [
        json!({"alg": "none", "typ": "JWT"}),
        json!({"alg": "none", "kid": "rsa-a"}),
        json!({"alg": "None"}),
        json!({"alg": "NONE"}),
    ] {
        let header = b64(serde_json::to_vec(&header).unwrap());
        for signature in ["", "AAAA"] {
            let token = format!("{header}.{payload}.{signature}");
            let err = store.verify(&token, NOW).unwrap_err();
            assert!(matches!(err, AuthError::UnsupportedAlgorithm), "{token}: {err:?}");
        }
    }
    // A header without alg at all is malformed.
    let token = format!("{}.{payload}.", b64(r#"{"typ":"JWT"}"#));
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::Malformed(_))));
}

#[test]
fn algorithm_confusion_hmac_with_rsa_public_key_is_rejected() {
    let scratch = Scratch::new("alg_confusion");
    let store = store_with(&scratch, |_| {});
    let public_pem = fixture("rsa_a_public.pem");
    let hmac_key = EncodingKey::from_secret(public_pem.as_bytes());
    let payload = format!(r#"{{"sub":"evil","exp":{},"scope":"admin"}}"#, NOW + 60);

    let with_kid =
        sign_raw(&json!({"alg": "HS256", "kid": "rsa-a"}), &payload, &hmac_key, Algorithm::HS256);
    assert!(matches!(store.verify(&with_kid, NOW), Err(AuthError::AlgorithmMismatch)));

    let without_kid = sign_raw(&json!({"alg": "HS256"}), &payload, &hmac_key, Algorithm::HS256);
    assert!(matches!(store.verify(&without_kid, NOW), Err(AuthError::BadSignature)));

    // Control: the forged token is a genuine HMAC token, so a verifier that used the public
    // key bytes as an HMAC secret would accept it. The rejections above are the pinning.
    let naive = KeySet::from_material(Some(public_pem.as_bytes()), None, 32).unwrap();
    assert!(naive.verify(&without_kid, &Policy::default(), NOW).is_ok());
}

#[test]
fn header_alg_must_match_the_pinned_alg() {
    let scratch = Scratch::new("alg_mismatch");
    let store = store_with(&scratch, |_| {});
    let payload = format!(r#"{{"sub":"t","exp":{}}}"#, NOW + 60);
    let rsa = EncodingKey::from_rsa_pem(fixture("rsa_a_private.pem").as_bytes()).unwrap();
    // Same RSA key, a different RSA algorithm than the one the JWK is pinned to.
    for alg in [Algorithm::PS256, Algorithm::RS512] {
        let header = json!({"alg": serde_json::to_value(alg).unwrap(), "kid": "rsa-a"});
        let token = sign_raw(&header, &payload, &rsa, alg);
        assert!(matches!(store.verify(&token, NOW), Err(AuthError::AlgorithmMismatch)), "{alg:?}");
    }
    // The pinned one passes, so the failures above are about the algorithm only.
    let ok = sign_raw(&json!({"alg": "RS256", "kid": "rsa-a"}), &payload, &rsa, Algorithm::RS256);
    assert!(store.verify(&ok, NOW).is_ok());
    // HS384 is not an algorithm any key can be pinned to.
    let token = sign_raw(
        &json!({"alg": "HS384"}),
        &payload,
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS384,
    );
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::UnsupportedAlgorithm)));
}

#[test]
fn expiry_and_leeway() {
    let scratch = Scratch::new("expiry");
    let store = store_with(&scratch, |_| {}); // default leeway 30 s
    let mut o = opts(None);
    o.ttl_s = 60;
    let token = mint(&hs(), &o).unwrap();
    assert!(store.verify(&token, NOW + 59).is_ok());
    assert!(store.verify(&token, NOW + 60 + 29).is_ok(), "within leeway");
    assert!(matches!(store.verify(&token, NOW + 60 + 30), Err(AuthError::Expired)));
    let strict = store_with(&scratch, |c| c.leeway_s = 0);
    assert!(matches!(strict.verify(&token, NOW + 60), Err(AuthError::Expired)));
}

#[test]
fn nbf_in_the_future() {
    let scratch = Scratch::new("nbf");
    let store = store_with(&scratch, |_| {});
    let mut o = opts(None);
    o.nbf = Some(NOW + 100);
    let token = mint(&hs(), &o).unwrap();
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::NotYetValid)));
    assert!(matches!(store.verify(&token, NOW + 69), Err(AuthError::NotYetValid)));
    assert!(store.verify(&token, NOW + 70).is_ok(), "within leeway");
}

#[test]
fn audience_and_issuer() {
    let scratch = Scratch::new("aud_iss");
    let store = store_with(&scratch, |c| {
        c.audience = Some("edge".into());
        c.issuer = Some("https://issuer.example".into());
    });
    let good = || {
        let mut o = opts(None);
        o.aud = Some("edge".into());
        o.iss = Some("https://issuer.example".into());
        o
    };
    assert!(store.verify(&mint(&hs(), &good()).unwrap(), NOW).is_ok());

    let mut o = good();
    o.aud = Some("other".into());
    assert!(matches!(store.verify(&mint(&hs(), &o).unwrap(), NOW), Err(AuthError::WrongAudience)));
    let mut o = good();
    o.aud = None;
    assert!(matches!(store.verify(&mint(&hs(), &o).unwrap(), NOW), Err(AuthError::WrongAudience)));
    let mut o = good();
    o.iss = Some("https://evil.example".into());
    assert!(matches!(store.verify(&mint(&hs(), &o).unwrap(), NOW), Err(AuthError::WrongIssuer)));
    let mut o = good();
    o.iss = None;
    assert!(matches!(store.verify(&mint(&hs(), &o).unwrap(), NOW), Err(AuthError::WrongIssuer)));

    // An array audience is accepted when it contains ours.
    let token = hs256_raw(&format!(
        r#"{{"sub":"t","exp":{},"aud":["a","edge"],"iss":"https://issuer.example"}}"#,
        NOW + 60
    ));
    assert!(store.verify(&token, NOW).is_ok());

    // With no audience configured, a token addressed to someone else is refused.
    let open = store_with(&scratch, |_| {});
    let mut o = opts(None);
    o.aud = Some("someone-else".into());
    assert!(matches!(open.verify(&mint(&hs(), &o).unwrap(), NOW), Err(AuthError::WrongAudience)));
}

#[test]
fn malformed_exp_never_bypasses_expiry() {
    let scratch = Scratch::new("malformed_exp");
    let store = store_with(&scratch, |_| {});
    for exp in [r#""9999999999""#, "9999999999.5", "1.7e9", "-1", "null", "{}"] {
        let token = hs256_raw(&format!(r#"{{"sub":"t","exp":{exp}}}"#));
        let err = store.verify(&token, NOW).unwrap_err();
        assert!(matches!(err, AuthError::InvalidClaim("exp")), "exp={exp}: {err:?}");
    }
    let token = hs256_raw(r#"{"sub":"t"}"#);
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::InvalidClaim("exp"))));
    let token = hs256_raw(r#"{"sub":"t","exp":9999999999,"nbf":"0"}"#);
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::InvalidClaim("nbf"))));
}

#[test]
fn missing_sub_is_rejected() {
    let scratch = Scratch::new("missing_sub");
    let store = store_with(&scratch, |_| {});
    for payload in [
        format!(r#"{{"exp":{}}}"#, NOW + 60),
        format!(r#"{{"sub":"","exp":{}}}"#, NOW + 60),
        format!(r#"{{"sub":null,"exp":{}}}"#, NOW + 60),
    ] {
        let err = store.verify(&hs256_raw(&payload), NOW).unwrap_err();
        assert!(matches!(err, AuthError::InvalidClaim("sub")), "{payload}: {err:?}");
    }
}

#[test]
fn oversized_token_is_rejected_before_parsing() {
    let scratch = Scratch::new("oversized");
    let store = store_with(&scratch, |_| {});
    // Validly signed, so only the size rule can reject it.
    let padding = "x".repeat(MAX_TOKEN_BYTES);
    let token = hs256_raw(&format!(r#"{{"sub":"t","exp":{},"pad":"{padding}"}}"#, NOW + 60));
    assert!(token.len() > MAX_TOKEN_BYTES);
    assert!(matches!(store.verify(&token, NOW), Err(AuthError::TooLarge)));
    let small =
        hs256_raw(&format!(r#"{{"sub":"t","exp":{},"pad":"{}"}}"#, NOW + 60, "x".repeat(5000)));
    assert!(small.len() <= MAX_TOKEN_BYTES);
    assert!(store.verify(&small, NOW).is_ok());
    assert!(matches!(store.verify(&"a".repeat(1 << 20), NOW), Err(AuthError::TooLarge)));
}

#[test]
fn scopes_from_scope_string_and_scp_array() {
    let scratch = Scratch::new("scopes");
    let store = store_with(&scratch, |_| {});
    let token =
        hs256_raw(&format!(r#"{{"sub":"t","exp":{},"scope":"inference  other"}}"#, NOW + 60));
    let claims = store.verify(&token, NOW).unwrap();
    assert!(claims.has_scope(Scope::Inference));
    assert!(!claims.has_scope(Scope::Admin));
    let err = claims.require_scope(Scope::Admin).unwrap_err();
    assert!(matches!(err, AuthError::InsufficientScope { required: Scope::Admin }));
    assert_eq!(err.http_status(), 403);
    assert_eq!(err.bearer_error_code(), Some("insufficient_scope"));

    let token = hs256_raw(&format!(r#"{{"sub":"t","exp":{},"scp":["admin"]}}"#, NOW + 60));
    let claims = store.verify(&token, NOW).unwrap();
    assert!(claims.has_scope(Scope::Admin) && !claims.has_scope(Scope::Inference));

    let token = hs256_raw(&format!(r#"{{"sub":"t","exp":{}}}"#, NOW + 60));
    assert!(store.verify(&token, NOW).unwrap().scope.is_empty());
}

#[test]
fn key_pointing_headers_are_ignored() {
    let scratch = Scratch::new("jku_jwk");
    let store = store_with(&scratch, |c| c.hs256_secret_file = None);
    let payload = format!(r#"{{"sub":"t","exp":{},"scope":"admin"}}"#, NOW + 60);
    let ed_a_key = EncodingKey::from_ed_pem(fixture("ed25519_a_private.pem").as_bytes()).unwrap();
    let ed_b_key = EncodingKey::from_ed_pem(fixture("ed25519_b_private.pem").as_bytes()).unwrap();
    let ed_b_jwk = jwk_from_public_pem(&fixture("ed25519_b_public.pem"), "attacker").unwrap();

    // Signed by the attacker, who also supplies their key in every way a header can.
    let header = json!({
        "alg": "EdDSA", "kid": "ed-a",
        "jku": "https://attacker.example/jwks.json",
        "x5u": "https://attacker.example/cert.pem",
        "jwk": ed_b_jwk,
    });
    let forged = sign_raw(&header, &payload, &ed_b_key, Algorithm::EdDSA);
    assert!(matches!(store.verify(&forged, NOW), Err(AuthError::BadSignature)));
    let header = json!({"alg": "EdDSA", "jwk": ed_b_jwk});
    let forged = sign_raw(&header, &payload, &ed_b_key, Algorithm::EdDSA);
    assert!(matches!(store.verify(&forged, NOW), Err(AuthError::UnknownKey)));

    // A genuine token that happens to carry such headers verifies with our key, not theirs.
    let header = json!({"alg": "EdDSA", "kid": "ed-a", "jku": "https://attacker.example/jwks.json", "jwk": ed_b_jwk});
    let genuine = sign_raw(&header, &payload, &ed_a_key, Algorithm::EdDSA);
    assert!(store.verify(&genuine, NOW).is_ok());
}

#[test]
fn structural_problems() {
    let scratch = Scratch::new("structure");
    let store = store_with(&scratch, |_| {});
    let token = mint(&hs(), &opts(None)).unwrap();
    let (head, sig) = token.rsplit_once('.').unwrap();

    assert!(matches!(store.verify("", NOW), Err(AuthError::Missing)));
    for bad in [
        "a.b".to_owned(),
        format!("{token}.extra"),
        format!("{head}=.{sig}"),
        format!(" {token}"),
        format!("{}.{sig}", head.replacen('.', ".!", 1)),
    ] {
        let err = store.verify(&bad, NOW).unwrap_err();
        assert!(matches!(err, AuthError::Malformed(_) | AuthError::BadSignature), "{bad}: {err:?}");
    }
    // A tampered payload fails the signature, not the claim checks.
    let (h, rest) = token.split_once('.').unwrap();
    let (_, s) = rest.split_once('.').unwrap();
    let tampered =
        format!("{h}.{}.{s}", b64(format!(r#"{{"sub":"t","exp":{},"scope":"admin"}}"#, NOW + 60)));
    assert!(matches!(store.verify(&tampered, NOW), Err(AuthError::BadSignature)));
    let no_sig = format!("{head}.");
    assert!(matches!(store.verify(&no_sig, NOW), Err(AuthError::BadSignature)));
    // Unknown critical extensions must be refused (RFC 7515 §4.1.11).
    let crit = sign_raw(
        &json!({"alg":"HS256","crit":["exp"],"exp":1}),
        r#"{"sub":"t","exp":9999999999}"#,
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    );
    assert!(matches!(store.verify(&crit, NOW), Err(AuthError::Malformed(_))));
}

#[test]
fn jwk_from_public_pem_matches_openssl() {
    let rsa = jwk_from_public_pem(&fixture("rsa_a_public.pem"), "r").unwrap();
    assert_eq!(rsa["kty"], "RSA");
    assert_eq!(rsa["alg"], "RS256");
    assert_eq!(rsa["e"], "AQAB");
    let modulus = fixture("rsa_a_modulus.hex").trim().to_lowercase();
    let n = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        rsa["n"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(n.iter().map(|b| format!("{b:02x}")).collect::<String>(), modulus);

    let ed = jwk_from_public_pem(&fixture("ed25519_a_public.pem"), "e").unwrap();
    assert_eq!((ed["kty"].as_str(), ed["crv"].as_str()), (Some("OKP"), Some("Ed25519")));
    let x = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ed["x"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        x.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        fixture("ed25519_a_public.hex").trim()
    );
}

#[test]
fn jwk_from_public_pem_refuses_private_keys_and_garbage() {
    for file in ["rsa_a_private.pem", "ed25519_a_private.pem"] {
        let err = jwk_from_public_pem(&fixture(file), "k").unwrap_err();
        assert!(err.to_string().contains("expected a public key"), "{file}: {err}");
    }
    assert!(jwk_from_public_pem("not a pem", "k").is_err());
    assert!(jwk_from_public_pem(&fixture("ed25519_a_public.pem"), "").is_err());
}

#[test]
fn short_rsa_keys_in_jwks_are_refused() {
    let scratch = Scratch::new("rsa1024");
    let config = AuthConfig {
        jwks_file: Some(scratch.write("jwks.json", jwks(&[("rsa_1024_public.pem", "small")]))),
        ..AuthConfig::default()
    };
    let err = KeyStore::from_config(&config).unwrap_err().to_string();
    assert!(err.contains("1024 bits"), "{err}");
}

#[test]
fn minting_refuses_bad_input() {
    let mut o = opts(None);
    o.sub.clear();
    assert!(mint(&hs(), &o).is_err());
    let mut o = opts(None);
    o.now_unix_s = u64::MAX;
    assert!(mint(&hs(), &o).is_err());
    assert!(mint(&edgeroute_auth::SigningKey::Hs256(Vec::new()), &opts(None)).is_err());
    // Keys of the wrong kind, or public halves, cannot sign.
    let wrong = edgeroute_auth::SigningKey::EdDsa { pem: fixture("rsa_a_private.pem") };
    assert!(mint(&wrong, &opts(None)).is_err());
    let public = edgeroute_auth::SigningKey::Rs256 { pem: fixture("rsa_a_public.pem") };
    assert!(mint(&public, &opts(None)).is_err());
    assert_eq!(format!("{:?}", hs()), "SigningKey::Hs256([redacted])");
}

#[test]
fn error_messages_carry_no_secrets() {
    let scratch = Scratch::new("messages");
    let store = store_with(&scratch, |_| {});
    let token = mint(
        &edgeroute_auth::SigningKey::Hs256(b"another-secret-of-32-bytes-length".to_vec()),
        &opts(None),
    )
    .unwrap();
    let err = store.verify(&token, NOW).unwrap_err();
    assert_eq!(err.to_string(), "invalid token signature");
    assert_eq!(err.http_status(), 401);
    assert_eq!(err.bearer_error_code(), Some("invalid_token"));
    let debug = format!("{store:?}");
    assert!(!debug.contains(std::str::from_utf8(SECRET).unwrap()), "{debug}");
}

#[test]
fn verifying_with_an_in_memory_key_set() {
    let keys = KeySet::from_material(Some(SECRET), None, 32).unwrap();
    let store = KeyStore::from_key_set(Policy { leeway_s: 0, ..Policy::default() }, keys);
    let token = mint(&hs(), &opts(None)).unwrap();
    assert!(store.verify(&token, NOW).is_ok());
    assert!(!store.reload().unwrap(), "no files: nothing to reload");
}

#[test]
fn minted_claims_reach_the_verified_token_and_cannot_shadow_named_ones() {
    let scratch = Scratch::new("attrs");
    let store = store_with(&scratch, |_| {});
    let mut o = opts(None);
    o.claims.insert("plan".into(), "premium".into());
    let token = mint(&hs(), &o).unwrap();
    let claims = store.verify(&token, NOW).unwrap();
    assert_eq!(claims.attrs.get("plan").map(String::as_str), Some("premium"));
    for named in ["sub", "exp", "jurisdictions", "scope"] {
        let mut o = opts(None);
        o.claims.insert(named.into(), "x".into());
        assert!(mint(&hs(), &o).is_err(), "--claim {named} must be refused");
    }
    let mut o = opts(None);
    o.claims.insert("k".into(), "v".repeat(257));
    assert!(mint(&hs(), &o).is_err(), "a value over 256 bytes");
}
