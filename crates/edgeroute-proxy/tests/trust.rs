//! The local proxy is not a web page's tool (issue 14): it holds the user's token, so a
//! browser tab must not be able to drive it. Each refusal is sent as raw HTTP (so the test
//! controls `Host`, `Origin` and `Content-Type` byte for byte) to a real proxy on loopback in
//! front of a real SDK, a discovery stub and a node stub that counts the chats it receives: a
//! refused request never reaches the fleet.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use edgeroute_client::{Client, ClientConfig};
use edgeroute_proto::chat::{AssistantMessage, ChatCompletion, Choice, FinishReason, Role};
use edgeroute_proto::discovery::{Candidate, DiscoverResponse};
use edgeroute_proxy::ProxyConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "proxy-trust-secret-token";
const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;

async fn serve(app: axum::Router) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(edgeroute_http::serve(
        l,
        app,
        edgeroute_http::ServerLimits::default(),
        None,
        std::future::pending(),
    ));
    addr
}

/// A node stub (counting chats that carry the token) and discovery listing it.
async fn fleet() -> (SocketAddr, Arc<AtomicUsize>) {
    let chats = Arc::new(AtomicUsize::new(0));
    let counted = chats.clone();
    let node = axum::Router::new()
        .route(
            "/health",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ready"})) }),
        )
        .route(
            "/v1/chat/completions",
            axum::routing::post(move |h: http::HeaderMap| {
                let counted = counted.clone();
                async move {
                    let auth = h.get("authorization").and_then(|v| v.to_str().ok());
                    assert_eq!(auth, Some(format!("Bearer {TOKEN}").as_str()));
                    counted.fetch_add(1, Ordering::SeqCst);
                    axum::Json(ChatCompletion {
                        id: "chatcmpl-1".into(),
                        object: "chat.completion".into(),
                        created: 0,
                        model: "m".into(),
                        choices: vec![Choice {
                            index: 0,
                            message: AssistantMessage {
                                role: Role::Assistant,
                                content: Some("hi from the fleet".into()),
                            },
                            finish_reason: Some(FinishReason::Stop),
                            logprobs: None,
                        }],
                        usage: None,
                        system_fingerprint: None,
                    })
                }
            }),
        );
    let node = serve(node).await;
    let answer = DiscoverResponse {
        model: "m".into(),
        pipeline: None,
        strategy: "latency".into(),
        regions: vec![],
        ttl_ms: 60_000,
        stale_ok_ms: 600_000,
        generation: 1,
        generated_at_ms: 0,
        replica: "stub".into(),
        candidates: vec![Candidate {
            id: "n1".into(),
            region: "r".into(),
            url: format!("http://{node}"),
            health: "ready".into(),
            models: vec!["m".into()],
            queue_depth: 0,
            in_flight: 0,
            capacity: 4,
            ttft_p50_ms: 5.0,
            ttft_p99_ms: 5.0,
            error_rate: 0.0,
            cost_per_1k: 0.0,
            score_ms: 5.0,
            serve_as: None,
            pool: None,
        }],
        reason: None,
        policy: None,
    };
    let discovery = axum::Router::new().route(
        "/v1/discover",
        axum::routing::get(move || std::future::ready(axum::Json(answer.clone()))),
    );
    (serve(discovery).await, chats)
}

/// A proxy over the fleet; generous deadlines (a loaded 2-core machine is slow, never wrong).
async fn proxy(cfg: ProxyConfig) -> (SocketAddr, Arc<AtomicUsize>) {
    let (disc, chats) = fleet().await;
    let slow = Duration::from_secs(30);
    let client = Client::new(ClientConfig {
        discovery: vec![format!("http://{disc}")],
        token: Some(TOKEN.into()),
        probe_deadline: slow,
        discovery_timeout: slow,
        connect_timeout: slow,
        json_hedge_initial: slow,
        request_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    })
    .unwrap();
    (serve(edgeroute_proxy::router_with(client, cfg)).await, chats)
}

/// Sends one raw HTTP/1.1 request; returns the status and the whole response text.
async fn send(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req =
        format!("{head}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}

fn post(host: &str, extra: &str) -> String {
    let mut h = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {host}");
    if !extra.is_empty() {
        h.push_str("\r\n");
        h.push_str(extra);
    }
    h
}

#[tokio::test]
async fn a_cross_site_simple_post_is_refused() {
    let (p, chats) = proxy(ProxyConfig::default()).await;
    let host = p.to_string();
    // What a web page can send without a preflight: text/plain, with the page's Origin.
    let (status, text) =
        send(p, &post(&host, "Origin: https://evil.example\r\nContent-Type: text/plain"), CHAT)
            .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("\"code\":\"origin_not_allowed\""), "{text}");
    // The same form post from a page whose Origin is hidden (`null`: sandboxed, file://).
    let (status, text) =
        send(p, &post(&host, "Origin: null\r\nContent-Type: text/plain"), CHAT).await;
    assert_eq!(status, 403, "{text}");
    // A no-cors form post where the browser only says where it came from.
    let (status, text) =
        send(p, &post(&host, "Sec-Fetch-Site: cross-site\r\nContent-Type: text/plain"), CHAT).await;
    assert_eq!(status, 403, "{text}");
    assert_eq!(chats.load(Ordering::SeqCst), 0, "a refused request reached the fleet");
}

#[tokio::test]
async fn a_foreign_origin_is_refused_even_with_json() {
    let (p, chats) = proxy(ProxyConfig::default()).await;
    let host = p.to_string();
    for origin in ["https://evil.example", "http://localhost:3000", "null"] {
        let (status, text) = send(
            p,
            &post(&host, &format!("Origin: {origin}\r\nContent-Type: application/json")),
            CHAT,
        )
        .await;
        assert_eq!(status, 403, "{origin}: {text}");
        assert!(text.contains("\"type\":\"permission_error\""), "{text}");
    }
    // A CORS preflight is refused too, so a non-simple request is never sent.
    let (status, _) = send(
        p,
        &format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nOrigin: https://evil.example\r\nAccess-Control-Request-Method: POST"
        ),
        "",
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(chats.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_configured_origin_is_served() {
    let cfg = ProxyConfig {
        allowed_origins: vec!["http://localhost:3000".into()],
        ..ProxyConfig::default()
    };
    let (p, chats) = proxy(cfg).await;
    let extra = "Origin: http://localhost:3000\r\nContent-Type: application/json";
    let (status, text) = send(p, &post(&p.to_string(), extra), CHAT).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(chats.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_rebinding_host_is_refused() {
    let (p, chats) = proxy(ProxyConfig::default()).await;
    // DNS rebinding: evil.example now resolves to 127.0.0.1, so the page is same-origin with
    // the proxy, sends JSON and no cross-origin signal; only the Host gives it away.
    let port = p.port();
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("0.0.0.0:{port}"),
        format!("192.168.1.10:{port}"),
    ] {
        let (status, text) = send(p, &post(&host, "Content-Type: application/json"), CHAT).await;
        assert_eq!(status, 421, "{host}: {text}");
        assert!(text.contains("\"code\":\"host_not_allowed\""), "{text}");
    }
    // Reading the decisions through a rebound name is refused too.
    let (status, _) =
        send(p, &format!("GET /metrics HTTP/1.1\r\nHost: evil.example:{port}"), "").await;
    assert_eq!(status, 421);
    assert_eq!(chats.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_post_without_a_json_content_type_is_refused() {
    let (p, chats) = proxy(ProxyConfig::default()).await;
    let host = p.to_string();
    for extra in [
        "",
        "Content-Type: text/plain",
        "Content-Type: application/x-www-form-urlencoded",
        "Content-Type: multipart/form-data; boundary=x",
        "Content-Type: application/jsonp",
    ] {
        let (status, text) = send(p, &post(&host, extra), CHAT).await;
        assert_eq!(status, 415, "{extra:?}: {text}");
        assert!(text.contains("\"code\":\"unsupported_media_type\""), "{text}");
    }
    assert_eq!(chats.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_audio_upload_may_be_a_form_but_never_from_a_page() {
    let (p, _) = proxy(ProxyConfig::default()).await;
    let host = p.to_string();
    let head =
        |extra: &str| format!("POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n{extra}");
    let form = "--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nw\r\n--x--\r\n";
    // A page's form post carries Origin: refused before the route.
    let (status, text) = send(
        p,
        &head("Content-Type: multipart/form-data; boundary=x\r\nOrigin: https://evil.example"),
        form,
    )
    .await;
    assert_eq!(status, 403, "{text}");
    // A simple text post to the upload route: 415, as on chat.
    let (status, text) = send(p, &head("Content-Type: text/plain"), "x").await;
    assert_eq!(status, 415, "{text}");
    // A program's form (no Origin) passes the check and reaches the route (no fleet here:
    // whatever the SDK answers, it is not a refusal of the caller).
    let (status, text) =
        send(p, &head("Content-Type: multipart/form-data; boundary=x"), form).await;
    assert!(![403, 415, 421].contains(&status), "{text}");
}

#[tokio::test]
async fn the_loopback_json_caller_without_origin_is_served() {
    let cfg =
        ProxyConfig { allowed_hosts: vec!["proxy.internal".into()], ..ProxyConfig::default() };
    let (p, chats) = proxy(cfg).await;
    let port = p.port();
    let hosts = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_owned(),
        format!("PROXY.internal:{port}"),
    ];
    for (i, host) in hosts.iter().enumerate() {
        let ct = ["application/json", "application/json; charset=utf-8"][i % 2];
        let (status, text) =
            send(p, &post(host, &format!("Content-Type: {ct}\r\nSec-Fetch-Site: none")), CHAT)
                .await;
        assert_eq!(status, 200, "{host}: {text}");
        assert!(text.contains("hi from the fleet"), "{text}");
    }
    assert_eq!(chats.load(Ordering::SeqCst), hosts.len());
    let (status, _) = send(p, &format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}"), "").await;
    assert_eq!(status, 200);
}

#[test]
fn the_token_comes_from_a_file_and_never_shows_in_errors_or_debug() {
    let dir = std::env::temp_dir().join(format!("edgeroute-proxy-token-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    assert_eq!(edgeroute_proxy::read_token_file(&path).unwrap(), TOKEN, "the newline is trimmed");
    std::fs::write(&path, "  \n").unwrap();
    let e = edgeroute_proxy::read_token_file(&path).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    std::fs::write(&path, format!("{TOKEN}\nsecond line\n")).unwrap();
    let e = edgeroute_proxy::read_token_file(&path).unwrap_err();
    assert!(!format!("{e} {e:?}").contains(TOKEN), "the error quotes the token: {e}");
    let e = edgeroute_proxy::read_token_file(&dir.join("missing")).unwrap_err();
    assert!(e.to_string().contains("missing"), "the error names the file: {e}");
    std::fs::remove_dir_all(&dir).unwrap();
    // The config holding the token prints it redacted.
    let cfg = ClientConfig { token: Some(TOKEN.into()), ..ClientConfig::default() };
    assert!(!format!("{cfg:?}").contains(TOKEN));
}
