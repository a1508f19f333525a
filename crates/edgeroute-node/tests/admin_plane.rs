//! The admin plane (issue 14): who may drain a node, inject faults or load and unload models,
//! and on which listener. Each test is an attack that must be refused:
//!
//! - an admin token minted for node A (or region A) used on node B;
//! - an inference token on an admin route, and an admin audience used to reach inference;
//! - admin routes on the public listener when an admin listener is configured;
//! - an `allow_unauthenticated` node's admin routes on the public listener;
//! - a non-loopback listener in plaintext or without auth, without `node.insecure_public`;
//! - a non-loopback admin listener without mTLS and auth, and a client without a certificate
//!   from the operators' CA on an mTLS admin listener;
//! - an HS256 secret floor below 32 bytes.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use axum::body::Body;
use edgeroute_auth::{MintOptions, Scope, Scopes, SigningKey};
use edgeroute_node::{Node, NodeConfig};
use edgeroute_test_util::client::method;
use edgeroute_test_util::{SECRET, TestNode, post_json};
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

fn now() -> u64 {
    edgeroute_core::clock::unix_ms() / 1000
}

/// A token signed with the test secret, with `aud` (one audience) and `scopes`.
fn token(sub: &str, scopes: &[Scope], aud: Option<&str>) -> String {
    edgeroute_auth::mint(
        &SigningKey::Hs256(SECRET.as_bytes().to_vec()),
        &MintOptions {
            sub: sub.into(),
            scopes: scopes.iter().copied().collect::<Scopes>(),
            aud: aud.map(str::to_owned),
            iss: None,
            ttl_s: 600,
            now_unix_s: now(),
            kid: None,
            nbf: None,
            residency: None,
            claims: Default::default(),
        },
    )
    .unwrap()
}

fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

/// One request through a router in process: (status, body).
async fn call(
    router: &axum::Router,
    verb: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Vec<u8>) {
    let mut req =
        Request::builder().method(verb).uri(path).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let res = router.clone().oneshot(req.body(Body::from(body.to_owned())).unwrap()).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, bytes.to_vec())
}

fn secret_file() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("edgeroute-admin-plane-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("secret");
    std::fs::write(&f, SECRET).unwrap();
    f
}

/// `[node]` (id `node-b`, region `toronto`) with `[auth]` (the test secret) and `extra`.
fn authed(extra: &str) -> String {
    format!(
        "[node]\nid = \"node-b\"\nregion = \"toronto\"\n[auth]\nhs256_secret_file = \"{}\"\n{extra}",
        secret_file().display()
    )
}

const OPEN: &str = "[node]\nid = \"node-b\"\nregion = \"toronto\"\nallow_unauthenticated = true\n";

fn parse(text: &str) -> Result<NodeConfig, String> {
    NodeConfig::parse(text, |_| None).map_err(|e| e.to_string())
}

#[tokio::test]
async fn an_admin_token_for_node_a_is_refused_on_node_b() {
    let node = TestNode::start_as("node-b", "toronto", "", None).await;
    // Minted for another node, another region, or for no place at all.
    for aud in [Some("edgeroute:node:node-a"), Some("edgeroute:region:vancouver"), None] {
        let t = token("operator", &[Scope::Admin], aud);
        let r = post_json(node.addr, "/admin/drain", Some(&t), &[], "{}").await;
        assert_eq!(r.status, 403, "aud {aud:?}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(code(&r.body), "admin_token_not_for_this_node", "aud {aud:?}");
        let r = post_json(node.addr, "/v1/models/unload", Some(&t), &[], r#"{"model":"x"}"#).await;
        assert_eq!(r.status, 403, "aud {aud:?} on unload");
    }
    // Nothing was drained by the refused calls.
    assert_eq!(node.state.phase.load().hint(node.state.telemetry.now()), None);
    // Minted for this node, its region, or the fleet: accepted.
    for aud in ["edgeroute:node:node-b", "edgeroute:region:toronto", "edgeroute:fleet"] {
        let t = token("operator", &[Scope::Admin], Some(aud));
        let r = post_json(node.addr, "/admin/drain", Some(&t), &[], "{}").await;
        assert_eq!(r.status, 202, "aud {aud}: {}", String::from_utf8_lossy(&r.body));
        let r = method(node.addr, "DELETE", "/admin/drain", Some(&t), "").await;
        assert_eq!(r.status, 200, "aud {aud}");
    }
}

#[tokio::test]
async fn an_inference_token_is_refused_on_admin_routes() {
    let node = TestNode::start_as("node-b", "toronto", "", None).await;
    let inference = token("tenant-a", &[Scope::Inference], None);
    for (verb, path, body) in [
        ("POST", "/admin/drain", "{}"),
        ("PUT", "/admin/faults", "{}"),
        ("POST", "/v1/models/load", "{}"),
        ("POST", "/v1/models/unload", r#"{"model":"sim-llama"}"#),
    ] {
        let r = method(node.addr, verb, path, Some(&inference), body).await;
        assert_eq!(r.status, 403, "{verb} {path}");
        assert_eq!(code(&r.body), "insufficient_scope", "{verb} {path}");
    }
    // Naming the fleet does not make an inference token an admin token.
    let t = token("tenant-a", &[Scope::Inference], Some("edgeroute:fleet"));
    let r = post_json(node.addr, "/admin/drain", Some(&t), &[], "{}").await;
    assert!(r.status == 401 || r.status == 403, "{}", r.status);
}

#[tokio::test]
async fn an_admin_audience_does_not_open_inference() {
    // The node has no `auth.audience`, so inference tokens carry none. A token holding both
    // scopes passes the verifier through its admin audience only: it is an admin token there.
    let node = TestNode::start_as("node-b", "toronto", "", None).await;
    let both = token("operator", &[Scope::Inference, Scope::Admin], Some("edgeroute:fleet"));
    let body =
        r#"{"model":"sim-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":2}"#;
    let r = post_json(node.addr, "/v1/chat/completions", Some(&both), &[], body).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    // The same token is a valid admin token here.
    let r = post_json(node.addr, "/admin/drain", Some(&both), &[], "{}").await;
    assert_eq!(r.status, 202);
}

#[tokio::test]
async fn admin_routes_are_not_on_the_public_listener_when_an_admin_listener_is_configured() {
    let cfg = parse(&authed("[admin]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    let node = Node::build(cfg).unwrap();
    let admin = token("operator", &[Scope::Admin], Some("edgeroute:node:node-b"));
    let public = node.router();
    for (verb, path, body) in [
        ("POST", "/admin/drain", "{}"),
        ("DELETE", "/admin/drain", ""),
        ("GET", "/admin/faults", ""),
        ("PUT", "/admin/faults", "{}"),
        ("POST", "/v1/models/load", "{}"),
        ("POST", "/v1/models/unload", r#"{"model":"sim-llama"}"#),
    ] {
        let (status, b) = call(&public, verb, path, Some(&admin), body).await;
        assert_eq!(status, 404, "{verb} {path}: {}", String::from_utf8_lossy(&b));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert!(v["error"]["message"].is_string(), "OpenAI-shaped: {v}");
    }
    // The admin listener serves them (with the admin token), and serves no inference.
    let plane = node.admin_router();
    let (status, _) = call(&plane, "GET", "/admin/faults", Some(&admin), "").await;
    assert_eq!(status, 200);
    let (status, _) = call(&plane, "GET", "/admin/faults", None, "").await;
    assert_eq!(status, 401, "the admin listener still needs the token when [auth] is set");
    let inference = token("tenant-a", &[Scope::Inference], None);
    let (status, _) = call(&plane, "GET", "/v1/models", Some(&inference), "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn both_listeners_are_served_and_keep_their_planes() {
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_listener.local_addr().unwrap();
    let cfg = parse(&authed(&format!("[admin]\nlisten = \"{admin_addr}\"\n"))).unwrap();
    let node = Node::build(cfg).unwrap();
    let public_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public_addr = public_listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(node.serve_planes(public_listener, Some(admin_listener), async {
        let _ = rx.await;
    }));
    let admin = token("operator", &[Scope::Admin], Some("edgeroute:fleet"));
    let r = post_json(public_addr, "/admin/drain", Some(&admin), &[], "{}").await;
    assert_eq!(r.status, 404);
    let r = method(admin_addr, "GET", "/admin/faults", Some(&admin), "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_unauthenticated_node_never_serves_admin_routes_on_the_public_listener() {
    let node = Node::build(parse(OPEN).unwrap()).unwrap();
    let public = node.router();
    for (verb, path, body) in [
        ("POST", "/admin/drain", "{}"),
        ("GET", "/admin/faults", ""),
        ("PUT", "/admin/faults", "{}"),
        ("POST", "/v1/models/load", "{}"),
        ("POST", "/v1/models/unload", r#"{"model":"sim-llama"}"#),
    ] {
        let (status, b) = call(&public, verb, path, None, body).await;
        assert_eq!(status, 403, "{verb} {path}: {}", String::from_utf8_lossy(&b));
        assert_eq!(code(&b), "admin_needs_auth", "{verb} {path}");
    }
    assert_eq!(node.state().phase.load().hint(node.state().telemetry.now()), None);
    // Inference stays open, as configured.
    let (status, _) = call(&public, "GET", "/v1/models", None, "").await;
    assert_eq!(status, 200);
    // With a loopback admin listener, the operator on this machine administers the node there.
    let node =
        Node::build(parse(&format!("{OPEN}[admin]\nlisten = \"127.0.0.1:0\"\n")).unwrap()).unwrap();
    let (status, _) = call(&node.router(), "GET", "/admin/faults", None, "").await;
    assert_eq!(status, 404);
    let (status, b) = call(&node.admin_router(), "GET", "/admin/faults", None, "").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
}

#[test]
fn a_non_loopback_listener_in_plaintext_or_without_auth_is_refused_without_the_flag() {
    // Authenticated but plaintext, on every interface.
    let plaintext = authed("")
        .replace("region = \"toronto\"\n", "region = \"toronto\"\nlisten = \"0.0.0.0:8080\"\n");
    let e = parse(&plaintext).unwrap_err();
    assert!(e.contains("insecure_public") && e.contains("[tls]"), "{e}");
    // TLS but no auth, on a public address.
    let open = format!(
        "{}[tls]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n",
        OPEN.replace(
            "region = \"toronto\"\n",
            "region = \"toronto\"\nlisten = \"10.0.0.5:8443\"\n"
        )
    );
    let e = parse(&open).unwrap_err();
    assert!(e.contains("insecure_public") && e.contains("[auth]"), "{e}");
    // The environment's listen address is checked too.
    let e = NodeConfig::parse(&authed(""), |k| {
        (k == "EDGEROUTE_LISTEN").then(|| "192.168.1.4:8080".to_owned())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("insecure_public"), "{e}");
    // The second, explicit flag says so.
    let flagged = plaintext.replace("[auth]", "insecure_public = true\n[auth]");
    assert!(parse(&flagged).is_ok(), "{:?}", parse(&flagged));
    // Loopback stays the development default.
    assert!(parse(OPEN).is_ok());
    assert!(parse(&authed("")).is_ok());
}

#[test]
fn a_non_loopback_admin_listener_needs_mtls_and_auth() {
    let mtls = "[admin.tls]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\nclient_ca_file = \"/ca.pem\"\n";
    for addr in ["0.0.0.0:9090", "10.1.2.3:9090", "[::]:9090"] {
        let e = parse(&authed(&format!("[admin]\nlisten = \"{addr}\"\n"))).unwrap_err();
        assert!(e.contains("admin.listen") && e.contains("mTLS"), "{addr}: {e}");
        // mTLS without [auth] is still refused: a remote admin call needs an admin token.
        let e = parse(&format!("{OPEN}[admin]\nlisten = \"{addr}\"\n{mtls}")).unwrap_err();
        assert!(e.contains("admin.listen") && e.contains("[auth]"), "{addr}: {e}");
        assert!(parse(&authed(&format!("[admin]\nlisten = \"{addr}\"\n{mtls}"))).is_ok(), "{addr}");
    }
    assert!(parse(&authed("[admin]\nlisten = \"[::1]:9090\"\n")).is_ok());
    // Sharing the public listener's address is a mistake, not two planes.
    let e = parse(&authed("[admin]\nlisten = \"127.0.0.1:8080\"\n")).unwrap_err();
    assert!(e.contains("admin.listen"), "{e}");
    let e = parse(&authed(&format!("[admin]\n{mtls}"))).unwrap_err();
    assert!(e.contains("admin.tls"), "{e}");
}

/// A CA, and certificates it signs, written as PEM files under `dir`.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { issuer: rcgen::Issuer::new(params, key), pem }
    }

    /// (certificate PEM, key PEM) for `names`.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &self.issuer);
        (cert.unwrap().pem(), key.serialize_pem())
    }
}

/// `GET /admin/faults` over TLS to `addr`, trusting `server_ca`, presenting `client` (cert,
/// key) if given: the status, or `None` when the handshake or the request failed.
async fn admin_over_tls(
    addr: std::net::SocketAddr,
    server_ca: &str,
    client: Option<&(String, String)>,
    token: &str,
) -> Option<u16> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(server_ca.as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .ok()?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.ok()?;
    tokio::spawn(conn);
    let res = send
        .send_request(
            Request::get("https://localhost/admin/faults")
                .header("host", "localhost")
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .ok()?;
    Some(res.status().as_u16())
}

#[tokio::test]
async fn a_remote_admin_listener_needs_a_client_certificate_from_the_operators_ca() {
    let dir = secret_file().parent().unwrap().to_owned();
    let (server_ca, operators, stranger) = (Ca::new("server"), Ca::new("operators"), Ca::new("x"));
    let (cert, key) = server_ca.leaf(&["localhost"]);
    for (name, text) in
        [("admin.pem", &cert), ("admin.key", &key), ("operators.pem", &operators.pem)]
    {
        std::fs::write(dir.join(name), text).unwrap();
    }
    // Bound on loopback for the test; the config names a routable address as production would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = parse(&authed(&format!(
        "[admin]\nlisten = \"0.0.0.0:{}\"\n[admin.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        addr.port(),
        dir.join("admin.pem").display(),
        dir.join("admin.key").display(),
        dir.join("operators.pem").display(),
    )))
    .unwrap();
    let node = Node::build(cfg).unwrap();
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(node.serve_planes(public, Some(listener), async {
        let _ = rx.await;
    }));
    let admin = token("operator", &[Scope::Admin], Some("edgeroute:node:node-b"));
    // An operator's certificate and an admin token: served.
    let operator = operators.leaf(&["alice"]);
    assert_eq!(admin_over_tls(addr, &server_ca.pem, Some(&operator), &admin).await, Some(200));
    // The certificate alone is not enough: the token is still checked.
    let other = token("operator", &[Scope::Admin], Some("edgeroute:node:node-a"));
    assert_eq!(admin_over_tls(addr, &server_ca.pem, Some(&operator), &other).await, Some(403));
    // No client certificate, or one from another CA: refused in the handshake.
    assert_eq!(admin_over_tls(addr, &server_ca.pem, None, &admin).await, None);
    let outsider = stranger.leaf(&["mallory"]);
    assert_eq!(admin_over_tls(addr, &server_ca.pem, Some(&outsider), &admin).await, None);
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

#[test]
fn an_hs256_secret_floor_below_32_bytes_is_refused() {
    let e = parse(&authed("min_secret_bytes = 16\n")).unwrap_err();
    assert!(e.contains("min_secret_bytes") && e.contains("32"), "{e}");
    assert!(parse(&authed("min_secret_bytes = 64\n")).is_ok());
}
