//! The `openai` backend: the gateway in front of a real OpenAI-compatible server (the
//! simulator's own HTTP server) and in front of upstreams that fail in every way we know.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use edgeroute_sim::{SimConfig, Simulator, expected_completion};
use edgeroute_test_util::fake_upstream::{Behaviour, FakeUpstream};
use edgeroute_test_util::{TestNode, get, spawn_router, stream};

fn sim_cfg() -> SimConfig {
    SimConfig {
        seed: 5,
        ttft_base_ms: 2,
        prefill_us_per_token: 0,
        tokens_per_s: 2000.0,
        ..SimConfig::default()
    }
}

fn openai_backend(url: &str, extra: &str) -> String {
    format!(
        "[backend]\nkind = \"openai\"\nurl = \"{url}\"\nfirst_byte_timeout_ms = 400\nrequest_timeout_ms = 2000\n{extra}[[backend.models]]\nid = \"my-llama\"\nupstream_name = \"sim-llama\"\n"
    )
}

fn request(stream: bool) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new(
        "my-llama",
        vec![ChatMessage::new(Role::User, "Route me to Montreal.")],
    );
    r.stream = stream;
    r
}

fn body(r: &ChatCompletionRequest) -> Vec<u8> {
    serde_json::to_vec(r).unwrap()
}

/// What the upstream sees: the upstream's own model name.
fn as_upstream(mut r: ChatCompletionRequest) -> ChatCompletionRequest {
    r.model = "sim-llama".into();
    r
}

#[tokio::test]
async fn passes_answers_through_unchanged_json_and_stream() {
    let sim = Arc::new(Simulator::new(sim_cfg()).unwrap());
    let up = spawn_router(edgeroute_sim::server::router(sim.clone())).await;
    let node = TestNode::start(&openai_backend(&up.url(), "")).await;

    let req = request(false);
    let r = node.chat(body(&req)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let want = expected_completion(&sim_cfg(), &as_upstream(req));
    assert_eq!(r.json()["choices"][0]["message"]["content"], want.text());
    assert_eq!(r.header("x-edgeroute-node"), Some("test-1"));

    let mut req = request(true);
    req.stream_options = Some(edgeroute_proto::StreamOptions { include_usage: true });
    let s = stream(node.addr, Some(&node.token()), &[], body(&req)).await;
    assert_eq!(s.status, 200);
    assert!(s.done());
    assert_eq!(s.text(), expected_completion(&sim_cfg(), &as_upstream(req)).text());
    assert_eq!(
        s.chunks().last().unwrap()["usage"]["completion_tokens"],
        want.usage.completion_tokens
    );

    let m = get(node.addr, "/v1/models", Some(&node.token())).await.json();
    assert_eq!(m["data"][0]["id"], "my-llama");
    let h = get(node.addr, "/health", None).await.json();
    assert_eq!(h["requests_in_window"], 2);
    assert_eq!(h["error_rate"], 0.0);
}

#[tokio::test]
async fn unreachable_upstream_is_a_fast_502() {
    // A port nothing listens on.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let node = TestNode::start(&openai_backend(&url, "")).await;
    let t = Instant::now();
    let r = node.chat(body(&request(true))).await;
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
    assert_eq!((r.status.as_u16(), r.error_code()), (502, "backend_unavailable".to_owned()));
}

async fn node_before(
    b: Behaviour,
    extra: &str,
) -> (TestNode, FakeUpstream, edgeroute_test_util::ServerGuard) {
    let fake = FakeUpstream::new(b);
    let up = spawn_router(fake.router()).await;
    let node = TestNode::start(&format!(
        "[limits]\nstream_idle_timeout_ms = 300\n{}",
        openai_backend(&up.url(), extra)
    ))
    .await;
    (node, fake, up)
}

#[tokio::test]
async fn client_errors_pass_through_and_never_count_against_the_node() {
    let ctx = r#"{"error":{"message":"This model's maximum context length is 2048 tokens","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
    let (node, _f, _u) = node_before(Behaviour::Status(400, ctx, None), "").await;
    let r = node.chat(body(&request(false))).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "context_length_exceeded");
    assert_eq!(r.json()["error"]["param"], "messages");
    assert_eq!(r.header("x-edgeroute-error"), Some("side=caller; retry=no"), "the request's fault");
    let h = get(node.addr, "/health", None).await.json();
    assert_eq!(h["error_rate"], 0.0, "a client error is not the node's fault");

    let (node, _f, _u) = node_before(Behaviour::Status(429, "slow down", Some("3")), "").await;
    let r = node.chat(body(&request(false))).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("3"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(
        r.header("x-edgeroute-error"),
        Some("side=backend; retry=yes"),
        "the backend is full"
    );
}

#[tokio::test]
async fn upstream_server_errors_become_502_and_503() {
    let (node, _f, _u) = node_before(
        Behaviour::Status(500, r#"{"error":{"message":"CUDA out of memory"}}"#, None),
        "",
    )
    .await;
    let r = node.chat(body(&request(false))).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (502, "backend_error".to_owned()));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("CUDA out of memory"));
    assert_eq!(r.header("x-edgeroute-error"), Some("side=backend; retry=yes"));
    assert_eq!(get(node.addr, "/health", None).await.json()["error_rate"], 1.0);

    let (node, _f, _u) = node_before(Behaviour::Status(503, "busy", None), "").await;
    let r = node.chat(body(&request(true))).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (503, "backend_overloaded".to_owned()));
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.header("x-edgeroute-error"), Some("side=backend; retry=yes"));
}

#[tokio::test]
async fn stream_cut_or_error_after_tokens_ends_with_an_error_event() {
    for b in [Behaviour::CutAfter(3), Behaviour::ErrorEventAfter(3)] {
        let (node, _f, _u) = node_before(b.clone(), "").await;
        let s = stream(node.addr, Some(&node.token()), &[], body(&request(true))).await;
        assert_eq!(s.status, 200, "{b:?}");
        assert_eq!(s.text(), "t0 t1 t2 ", "{b:?}");
        assert!(!s.done(), "{b:?}: truncated answer ended with [DONE]");
        assert_eq!(s.error().unwrap()["error"]["type"], "upstream_error", "{b:?}");
    }
}

#[tokio::test]
async fn stall_mid_stream_is_cut_at_the_idle_deadline() {
    let (node, _f, _u) = node_before(Behaviour::StallAfter(2), "").await;
    let t = Instant::now();
    let s = stream(node.addr, Some(&node.token()), &[], body(&request(true))).await;
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(s.text(), "t0 t1 ");
    assert!(s.error().is_some() && !s.done());
}

#[tokio::test]
async fn silence_before_first_token_is_a_504_within_the_deadline() {
    // A stream has `first_byte_timeout_ms` (400) to its first event, a JSON answer
    // `request_timeout_ms` (2,000) to its whole body; the message says which part was late.
    for (b, stream, at_least_ms, says) in [
        (Behaviour::HeadersThenSilence, true, 390, "sent no token within 400 ms"),
        (Behaviour::NoResponse, true, 390, "sent no response within 400 ms"),
        (Behaviour::HeadersThenSilence, false, 1990, "did not finish its answer within 2000 ms"),
        (Behaviour::NoResponse, false, 1990, "sent no response within 2000 ms"),
    ] {
        let (node, _f, _u) = node_before(b.clone(), "").await;
        let t = Instant::now();
        let r = node.chat(body(&request(stream))).await;
        let took = t.elapsed();
        assert_eq!(
            (r.status.as_u16(), r.error_code()),
            (504, "backend_timeout".to_owned()),
            "{b:?}, stream {stream}"
        );
        let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(says), "{b:?}, stream {stream}: {message}");
        assert!(
            took >= Duration::from_millis(at_least_ms)
                && took < Duration::from_millis(at_least_ms + 1100),
            "{b:?}, stream {stream}: {took:?}"
        );
    }
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let (node, fake, _u) = node_before(Behaviour::StallAfter(2), "").await;
    let req = http::Request::post(format!("http://{}/v1/chat/completions", node.addr))
        .header("authorization", format!("Bearer {}", node.token()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body(&request(true)))))
        .unwrap();
    let res = edgeroute_test_util::client::send(node.addr, req).await;
    use http_body_util::BodyExt;
    let mut b = res.into_body();
    let _ = b.frame().await;
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1);
    drop(b);
    let t = Instant::now();
    while fake.cancelled.load(Ordering::SeqCst) == 0 && t.elapsed() < Duration::from_millis(250) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        fake.cancelled.load(Ordering::SeqCst),
        1,
        "upstream stream still open after the client left"
    );
    assert_eq!(node.state.telemetry.in_flight(), 0);
}

#[tokio::test]
async fn streams_are_forwarded_byte_for_byte() {
    // Two identical simulators with a fixed clock: one answers directly, one behind the gateway.
    let direct = spawn_router(edgeroute_sim::server::router_with_clock(
        Arc::new(Simulator::new(sim_cfg()).unwrap()),
        edgeroute_core::clock::fixed(1_700_000_000_000),
    ))
    .await;
    let behind = spawn_router(edgeroute_sim::server::router_with_clock(
        Arc::new(Simulator::new(sim_cfg()).unwrap()),
        edgeroute_core::clock::fixed(1_700_000_000_000),
    ))
    .await;
    let node = TestNode::start(&format!(
        "[backend]\nkind = \"openai\"\nurl = \"{}\"\n[[backend.models]]\nid = \"sim-llama\"\n",
        behind.url()
    ))
    .await;
    let mut req = as_upstream(request(true));
    req.stream_options = Some(edgeroute_proto::StreamOptions { include_usage: true });
    let want = stream(direct.addr, None, &[], body(&req)).await;
    let got = stream(node.addr, Some(&node.token()), &[], body(&req)).await;
    assert!(want.done() && got.done());
    assert_eq!(String::from_utf8(got.raw).unwrap(), String::from_utf8(want.raw).unwrap());
}

#[tokio::test]
async fn request_bodies_pass_untouched_unless_the_model_is_renamed() {
    let fake = FakeUpstream::new(Behaviour::Echo);
    let up = spawn_router(fake.router()).await;
    let cfg = format!(
        "[backend]\nkind = \"openai\"\nurl = \"{}\"\nextra_fields = [\"vendor_knob\"]\n[[backend.models]]\nid = \"same\"\n[[backend.models]]\nid = \"alias\"\nupstream_name = \"real-name\"\n",
        up.url()
    );
    let node = TestNode::start(&cfg).await;
    let raw =
        r#"{"model":"same",   "messages":[{"role":"user","content":"hi"}], "vendor_knob": 1.50}"#;
    let r = node.chat(raw).await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], raw.as_bytes(), "the client's bytes reach the upstream unchanged");

    let raw = r#"{"model":"alias","messages":[{"role":"user","content":"hi"}],"vendor_knob":1.5}"#;
    let r = node.chat(raw).await;
    let sent = r.json();
    assert_eq!(sent["model"], "real-name");
    assert_eq!(sent["vendor_knob"], 1.5);
    assert_eq!(sent["messages"][0]["content"], "hi");
}

/// The upstream's API key (`api_key_env`) goes with every request, chat and the voice
/// surface alike; without one, no `Authorization` reaches the upstream (the caller's token
/// is the node's business, never the backend's).
#[tokio::test]
async fn the_upstream_api_key_goes_with_every_request_and_the_callers_token_never_does() {
    use axum::routing::post;
    let echo = |req: axum::extract::Request| async move {
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok());
        axum::Json(serde_json::json!({ "auth": auth }))
    };
    let up = spawn_router(
        axum::Router::new()
            .route("/v1/chat/completions", post(echo))
            .route("/v1/embeddings", post(echo)),
    )
    .await;
    let embed = serde_json::json!({"model": "my-llama", "input": "hi"}).to_string();
    for (key, want) in [(Some("sk-up"), serde_json::json!("Bearer sk-up")), (None, json_null())] {
        let extra = if key.is_some() { "api_key_env = \"UP_KEY\"\n" } else { "" };
        let env = move |k: &str| (k == "UP_KEY").then(|| key.unwrap_or_default().to_owned());
        let node = TestNode::start_with(&openai_backend(&up.url(), extra), env).await;
        let r = node.chat(body(&request(false))).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["auth"], want, "chat, key {key:?}");
        let r = edgeroute_test_util::post_json(
            node.addr,
            "/v1/embeddings",
            Some(&node.token()),
            &[],
            embed.clone(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["auth"], want, "embeddings, key {key:?}");
    }
}

fn json_null() -> serde_json::Value {
    serde_json::Value::Null
}

/// What the node reads of an upstream's answer head (it keeps only `content-type` and
/// `retry-after`) is enough for the voice surface: the audio's own media type reaches the
/// caller, whatever else the upstream's head carries.
#[tokio::test]
async fn the_upstreams_media_type_reaches_the_caller_of_the_voice_surface() {
    use axum::routing::post;
    let speech = || async {
        (
            [
                ("content-type", "audio/mpeg"),
                ("x-upstream-junk", "\u{e9}t\u{e9}"),
                ("set-cookie", "a=b"),
            ],
            &b"ID3\x04fake-mp3"[..],
        )
    };
    let up = spawn_router(axum::Router::new().route("/v1/audio/speech", post(speech))).await;
    let node = TestNode::start(&openai_backend(&up.url(), "")).await;
    let req = serde_json::json!({"model": "my-llama", "input": "hi", "voice": "alloy"});
    let r = edgeroute_test_util::post_json(
        node.addr,
        "/v1/audio/speech",
        Some(&node.token()),
        &[],
        req.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("audio/mpeg"));
    assert_eq!(&r.body[..], b"ID3\x04fake-mp3");
    assert_eq!(r.header("x-upstream-junk"), None, "the upstream's own headers stay there");
    assert_eq!(r.header("set-cookie"), None);
}
