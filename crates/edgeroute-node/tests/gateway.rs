//! The node gateway over real loopback HTTP with the in-process simulator: every answer is
//! checked token by token against the simulator's deterministic output.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_proto::sse::SseEvent;
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, LoadReport, MigrateHint, Role};
use edgeroute_sim::{SimConfig, expected_completion};
use edgeroute_test_util::client::{self, method};
use edgeroute_test_util::{TestNode, get, post_json, stream};
use serde_json::json;

/// A fast simulator: answers in a few ms so tests are quick, still realistic in shape.
const FAST: &str = "[backend]\nkind = \"sim\"\n[backend.sim]\nseed = 11\nttft_base_ms = 5\nprefill_us_per_token = 0\ntokens_per_s = 2000.0\n";

fn sim_cfg() -> SimConfig {
    SimConfig {
        seed: 11,
        ttft_base_ms: 5,
        prefill_us_per_token: 0,
        tokens_per_s: 2000.0,
        ..SimConfig::default()
    }
}

fn request(stream: bool, max_tokens: Option<u32>) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new(
        "sim-llama",
        vec![ChatMessage::new(Role::User, "Where is the nearest node?")],
    );
    r.stream = stream;
    r.max_tokens = max_tokens;
    r
}

fn body(r: &ChatCompletionRequest) -> Vec<u8> {
    serde_json::to_vec(r).unwrap()
}

#[tokio::test]
async fn json_completion_matches_the_simulator_exactly() {
    let node = TestNode::start(FAST).await;
    let req = request(false, None);
    let r = node.chat(body(&req)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v = r.json();
    let want = expected_completion(&sim_cfg(), &req);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "sim-llama");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.text());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], want.usage.completion_tokens);
    assert_eq!(v["usage"]["total_tokens"], want.usage.total_tokens);
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-test-1-"));
    assert_eq!(r.header("x-edgeroute-node"), Some("test-1"));
    let load: LoadReport = r.header("x-edgeroute-load").unwrap().parse().unwrap();
    assert_eq!(load.capacity, 256);
}

#[tokio::test]
async fn sse_stream_is_framed_exactly_as_openai() {
    let node = TestNode::start(FAST).await;
    let mut req = request(true, Some(5));
    req.stream_options = Some(edgeroute_proto::StreamOptions { include_usage: true });
    let s = stream(node.addr, Some(&node.token()), &[], body(&req)).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.headers["content-type"], "text/event-stream");
    let want = expected_completion(&sim_cfg(), &req);
    assert_eq!(want.tokens.len(), 5);
    assert_eq!(s.text(), want.text());
    // Every frame is `data: ...\n\n` and the stream ends with [DONE].
    let raw = String::from_utf8(s.raw.clone()).unwrap();
    assert!(raw.ends_with("data: [DONE]\n\n"), "{raw}");
    for frame in raw.trim_end().split("\n\n") {
        assert!(frame.starts_with("data: "), "bad frame {frame:?}");
    }
    let chunks = s.chunks();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant", "role chunk first");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    // With include_usage: usage null on every chunk, then a final usage chunk with no choices.
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert!(finish["usage"].is_null() && finish.as_object().unwrap().contains_key("usage"));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 5);
    assert!(s.done());

    // Without include_usage there is no usage key at all.
    let req = request(true, Some(3));
    let s = stream(node.addr, Some(&node.token()), &[], body(&req)).await;
    assert!(s.chunks().iter().all(|c| !c.as_object().unwrap().contains_key("usage")));
    assert_eq!(s.text(), expected_completion(&sim_cfg(), &req).text());
}

#[tokio::test]
async fn max_completion_tokens_wins_and_extra_fields_pass() {
    let node = TestNode::start(FAST).await;
    let raw = json!({"model":"sim-llama","messages":[{"role":"user","content":"hi"}],
        "max_tokens": 9, "max_completion_tokens": 2, "temperature": 0.3, "top_p": 0.9, "user": "u1"});
    let r = node.chat(raw.to_string()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn bad_input_gets_precise_openai_errors() {
    let node = TestNode::start(&format!("[limits]\nmax_body_bytes = 2048\n{FAST}")).await;
    let t = node.token();
    let post = |b: String| {
        let t = t.clone();
        async move { post_json(node.addr, "/v1/chat/completions", Some(&t), &[], b).await }
    };
    let r = post("{\"model\": ".into()).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let e = r.json()["error"].clone();
    assert!(
        e.get("message").is_some() && e.get("param").is_some() && e.get("code").is_some(),
        "{e}"
    );

    let r =
        post(json!({"model":"sim-llama","messages":[{"role":"robot","content":"x"}]}).to_string())
            .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "messages[0].role");

    let r = post(json!({"model":"sim-llama","messages":"hello"}).to_string()).await;
    assert_eq!((r.status.as_u16(), r.json()["error"]["param"].as_str()), (400, Some("messages")));

    let r = post(json!({"model":"sim-llama","messages":[]}).to_string()).await;
    assert_eq!((r.status.as_u16(), r.json()["error"]["param"].as_str()), (400, Some("messages")));

    let r = post(
        json!({"model":"sim-llama","messages":[{"role":"user","content":"x"}],"max_tokens":0})
            .to_string(),
    )
    .await;
    assert_eq!(r.json()["error"]["param"], "max_tokens");

    let r =
        post(json!({"model":"gpt-9","messages":[{"role":"user","content":"x"}]}).to_string()).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "model_not_found");
    assert_eq!(r.json()["error"]["param"], "model");

    let big = json!({"model":"sim-llama","messages":[{"role":"user","content":"x".repeat(5000)}]})
        .to_string();
    let r = post(big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.error_code(), "request_too_large");

    let r = post(String::new()).await;
    assert_eq!(r.status, 400);

    let r = post_json(
        node.addr,
        "/v1/chat/completions",
        Some(&t),
        &[("x-edgeroute-session", "../../etc")],
        body(&request(false, None)),
    )
    .await;
    assert_eq!(r.status, 400);

    let r = get(node.addr, "/v1/nope", Some(&t)).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (404, "unknown_url".to_owned()));
    assert_eq!(
        r.header("x-edgeroute-node"),
        Some("test-1"),
        "error responses carry the node id too"
    );
    let r = method(node.addr, "DELETE", "/v1/chat/completions", Some(&t), "").await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn auth_rejects_missing_invalid_expired_and_wrong_scope() {
    let node = TestNode::start(FAST).await;
    let b = body(&request(false, Some(2)));
    let r = post_json(node.addr, "/v1/chat/completions", None, &[], b.clone()).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (401, "missing_token".to_owned()));
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));

    let expired = node.token_for("tenant-a", &[Scope::Inference], -120);
    let r = post_json(node.addr, "/v1/chat/completions", Some(&expired), &[], b.clone()).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (401, "token_expired".to_owned()));

    // Change a character in the middle of the signature (the last base64url character of an
    // HS256 signature carries only 2 bits, so changing it may not change the signature).
    let token = node.token();
    let sig_start = token.rfind('.').unwrap() + 1;
    let mut forged: Vec<char> = token.chars().collect();
    let i = sig_start + 10;
    forged[i] = if forged[i] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    assert_ne!(forged, token);
    let r = post_json(node.addr, "/v1/chat/completions", Some(&forged), &[], b.clone()).await;
    assert_eq!(r.status, 401);

    // alg=none: header {"alg":"none"} with the same claims and no signature.
    let claims = node.token().split('.').nth(1).unwrap().to_owned();
    let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{claims}.");
    let r = post_json(node.addr, "/v1/chat/completions", Some(&none), &[], b.clone()).await;
    assert_eq!(r.status, 401);

    // Scopes: inference cannot drain; admin cannot chat.
    let r = post_json(node.addr, "/admin/drain", Some(&node.token()), &[], "").await;
    assert_eq!((r.status.as_u16(), r.error_code()), (403, "insufficient_scope".to_owned()));
    let r = post_json(node.addr, "/v1/chat/completions", Some(&node.admin_token()), &[], b.clone())
        .await;
    assert_eq!(r.status, 403);
    let r = get(node.addr, "/v1/models", Some(&node.token())).await;
    assert_eq!(r.status, 200);
    // Health and metrics are open (discovery and Prometheus scrape them).
    assert_eq!(get(node.addr, "/health", None).await.status, 200);
}

#[tokio::test]
async fn rate_limit_per_tenant_with_retry_after() {
    let node =
        TestNode::start(&format!("[limits]\nrate_limit_per_s = 1\nrate_limit_burst = 2\n{FAST}"))
            .await;
    let a = node.token();
    let b = node.token_for("tenant-b", &[Scope::Inference], 600);
    let req = body(&request(false, Some(1)));
    let r1 = post_json(node.addr, "/v1/chat/completions", Some(&a), &[], req.clone()).await;
    assert_eq!(r1.status, 200);
    assert_eq!(r1.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(r1.header("x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(
        post_json(node.addr, "/v1/chat/completions", Some(&a), &[], req.clone()).await.status,
        200
    );
    let r3 = post_json(node.addr, "/v1/chat/completions", Some(&a), &[], req.clone()).await;
    assert_eq!(r3.status, 429);
    assert_eq!(r3.error_code(), "rate_limit_exceeded");
    let retry: u64 = r3.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry));
    assert_eq!(r3.header("x-ratelimit-remaining-requests"), Some("0"));
    // Another tenant has its own quota.
    assert_eq!(
        post_json(node.addr, "/v1/chat/completions", Some(&b), &[], req.clone()).await.status,
        200
    );
}

#[tokio::test]
async fn concurrency_limit_sheds_with_503_and_migrate_hint() {
    // One slot, all of it for one tenant; a slow answer occupies it.
    let slow = "[limits]\nmax_concurrency = 1\ntenant_max_share = 1.0\n[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 5\ntokens_per_s = 20.0\nmin_answer_tokens = 10\nmax_answer_tokens = 10\n";
    let node = TestNode::start(slow).await;
    let t = node.token();
    let addr = node.addr;
    let busy = tokio::spawn({
        let t = t.clone();
        async move { stream(addr, Some(&t), &[], body(&request(true, None))).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let r =
        post_json(addr, "/v1/chat/completions", Some(&t), &[], body(&request(false, None))).await;
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "shedding must be immediate, not queueing"
    );
    assert_eq!((r.status.as_u16(), r.error_code()), (503, "node_overloaded".to_owned()));
    assert_eq!(r.header("retry-after"), Some("1"));
    let hint: MigrateHint = r.header("x-edgeroute-migrate").unwrap().parse().unwrap();
    assert_eq!(hint.reason, "overload");
    let health = get(addr, "/health", None).await.json();
    assert_eq!(health["status"], "saturated");
    assert!(busy.await.unwrap().done());
    assert_eq!(node.state.telemetry.in_flight(), 0);
}

#[tokio::test]
async fn drain_refuses_new_sessions_serves_known_ones_and_finishes_inflight() {
    let slow = "[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 5\ntokens_per_s = 40.0\nmin_answer_tokens = 12\nmax_answer_tokens = 12\n";
    let node = TestNode::start(slow).await;
    let (t, addr) = (node.token(), node.addr);
    let session = [("x-edgeroute-session", "sess-1")];
    // A known session and an in-flight stream before the drain.
    assert_eq!(
        post_json(addr, "/v1/chat/completions", Some(&t), &session, body(&request(false, Some(1))))
            .await
            .status,
        200
    );
    let inflight = tokio::spawn({
        let t = t.clone();
        async move { stream(addr, Some(&t), &[], body(&request(true, None))).await }
    });
    tokio::time::sleep(Duration::from_millis(60)).await;

    let r = post_json(
        addr,
        "/admin/drain",
        Some(&node.admin_token()),
        &[],
        r#"{"deadline_ms": 20000, "to": "tor-2"}"#,
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(r.json()["status"], "draining");
    assert_eq!(r.json()["drain"]["drained"], false);

    let fresh = post_json(
        addr,
        "/v1/chat/completions",
        Some(&t),
        &[("x-edgeroute-session", "sess-new")],
        body(&request(false, Some(1))),
    )
    .await;
    assert_eq!((fresh.status.as_u16(), fresh.error_code()), (503, "node_draining".to_owned()));
    let hint: MigrateHint = fresh.header("x-edgeroute-migrate").unwrap().parse().unwrap();
    assert_eq!((hint.reason.as_str(), hint.to.as_deref()), ("drain", Some("tor-2")));
    assert!(hint.deadline_ms > 15_000 && hint.deadline_ms <= 20_000);
    assert!(fresh.header("retry-after").is_some());
    let anon =
        post_json(addr, "/v1/chat/completions", Some(&t), &[], body(&request(false, Some(1))))
            .await;
    assert_eq!(anon.status, 503);

    let known =
        post_json(addr, "/v1/chat/completions", Some(&t), &session, body(&request(false, Some(1))))
            .await;
    assert_eq!(known.status, 200, "a known session is served until the deadline");
    assert!(known.header("x-edgeroute-migrate").unwrap().contains("reason=drain"));

    let s = inflight.await.unwrap();
    assert!(s.done(), "in-flight stream must finish during a drain");
    assert_eq!(s.text().split(' ').filter(|w| !w.is_empty()).count(), 12);
    let h = get(addr, "/health", None).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "draining");
    assert_eq!(h.json()["drain"]["drained"], true);
    assert_eq!(h.json()["ready"], false);

    // Cancelling the drain restores service.
    assert_eq!(
        method(addr, "DELETE", "/admin/drain", Some(&node.admin_token()), "").await.status,
        200
    );
    assert_eq!(
        post_json(addr, "/v1/chat/completions", Some(&t), &[], body(&request(false, Some(1))))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn client_disconnect_mid_stream_frees_the_slot_at_once() {
    let slow = "[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 5\ntokens_per_s = 10.0\nmin_answer_tokens = 50\nmax_answer_tokens = 50\n";
    let node = TestNode::start(slow).await;
    let req = http::Request::post(format!("http://{}/v1/chat/completions", node.addr))
        .header("authorization", format!("Bearer {}", node.token()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body(&request(true, None)))))
        .unwrap();
    let res = client::send(node.addr, req).await;
    assert_eq!(res.status(), 200);
    let mut b = res.into_body();
    use http_body_util::BodyExt;
    let _first = b.frame().await.unwrap().unwrap();
    let sim = node.state.backend.simulator().unwrap().clone();
    assert_eq!(node.state.telemetry.in_flight(), 1);
    assert_eq!(sim.in_flight(), 1);
    drop(b); // the client goes away mid-answer
    let t = Instant::now();
    while (node.state.telemetry.in_flight() > 0 || sim.in_flight() > 0)
        && t.elapsed() < Duration::from_secs(2)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(node.state.telemetry.in_flight(), 0, "gateway slot not freed");
    assert_eq!(sim.in_flight(), 0, "backend generation not cancelled");
    assert!(t.elapsed() < Duration::from_millis(500), "took {:?}", t.elapsed());
    let m = get(node.addr, "/metrics", None).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(text.contains("edgeroute_node_streams_cancelled_total 1"), "{text}");
    // A cancelled stream is not a node failure.
    assert_eq!(get(node.addr, "/health", None).await.json()["error_rate"], 0.0);
}

#[tokio::test]
async fn failure_before_first_token_is_a_fast_5xx() {
    let node = TestNode::start(&format!("{FAST}[backend.sim.faults]\nerror_rate = 1.0\n")).await;
    let t = Instant::now();
    let r = node.chat(body(&request(true, None))).await;
    assert!(t.elapsed() < Duration::from_millis(500));
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["type"], "upstream_error");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let h = get(node.addr, "/health", None).await.json();
    assert_eq!(h["error_rate"], 1.0);
}

#[tokio::test]
async fn failure_after_tokens_is_an_sse_error_never_done() {
    let node =
        TestNode::start(&format!("{FAST}[backend.sim.faults]\ncut_after_tokens = 3\n")).await;
    let req = request(true, None);
    let s = stream(node.addr, Some(&node.token()), &[], body(&req)).await;
    assert_eq!(s.status, 200);
    assert!(!s.done(), "a truncated answer must not end with [DONE]");
    assert!(!s.events.contains(&SseEvent::Done));
    let err = s.error().expect("an error event");
    assert_eq!(err["error"]["type"], "upstream_error");
    let want = expected_completion(&sim_cfg(), &req);
    assert_eq!(s.text(), want.tokens[..3].concat(), "the tokens before the cut are exact");
}

#[tokio::test]
async fn stalled_stream_is_ended_at_the_idle_deadline() {
    let cfg = format!(
        "[limits]\nstream_idle_timeout_ms = 300\n{FAST}[backend.sim.faults]\nstall_after_tokens = 2\n"
    );
    let node = TestNode::start(&cfg).await;
    let t = Instant::now();
    let s = stream(node.addr, Some(&node.token()), &[], body(&request(true, None))).await;
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(290) && took < Duration::from_secs(2), "{took:?}");
    assert!(!s.done());
    assert_eq!(s.error().unwrap()["error"]["code"], "backend_timeout");
    // The same bound applies to a non-streaming request.
    let r = node.chat(body(&request(false, None))).await;
    assert_eq!(r.status, 504);
}

#[tokio::test]
async fn faults_can_be_changed_at_run_time_by_an_admin() {
    let node = TestNode::start(FAST).await;
    let admin = node.admin_token();
    let r =
        method(node.addr, "PUT", "/admin/faults", Some(&admin), r#"{"refuse_connections": true}"#)
            .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = node.chat(body(&request(false, None))).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (502, "backend_unavailable".to_owned()));
    assert_eq!(
        method(node.addr, "PUT", "/admin/faults", Some(&admin), r#"{"bogus": 1}"#).await.status,
        400
    );
    assert_eq!(method(node.addr, "PUT", "/admin/faults", Some(&admin), "{}").await.status, 200);
    assert_eq!(node.chat(body(&request(false, None))).await.status, 200);
}

#[tokio::test]
async fn health_models_and_metrics_report_the_node() {
    let node = TestNode::start(FAST).await;
    for _ in 0..3 {
        node.chat(body(&request(false, Some(2)))).await;
    }
    let h = get(node.addr, "/health", None).await.json();
    assert_eq!(h["status"], "ready");
    assert_eq!(h["ready"], true);
    assert_eq!(h["node_id"], "test-1");
    assert_eq!(h["region"], "local");
    assert_eq!(h["models"][0]["id"], "sim-llama");
    assert_eq!(h["models"][0]["state"], "ready");
    assert_eq!(h["models"][0]["gpu"], "gpu0");
    assert_eq!(h["gpus"][0]["slots"], 4);
    assert!(h["gpus"][0]["memory_total_mb"].as_u64().unwrap() > 0);
    assert_eq!(h["requests_in_window"], 3);
    assert_eq!(h["ttft_ms"]["samples"], 3);
    assert!(h["ttft_ms"]["p50"].as_f64().unwrap() >= 4.0);
    assert!(h["latency_ms"]["p99"].as_f64().unwrap() >= h["ttft_ms"]["p50"].as_f64().unwrap());
    assert_eq!(h["capacity"], 256);
    assert_eq!(h["window_s"], 10);

    let m = get(node.addr, "/v1/models", Some(&node.token())).await.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "sim-llama");
    assert_eq!(m["data"][0]["object"], "model");
    assert_eq!(m["data"][0]["state"], "ready");

    let metrics = get(node.addr, "/metrics", None).await;
    let text = String::from_utf8_lossy(&metrics.body);
    for name in [
        "edgeroute_node_requests_total{route=\"chat\",status=\"200\"} 3",
        "edgeroute_node_ttft_seconds_count 3",
        "edgeroute_node_in_flight",
        "# EOF",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
}

#[tokio::test]
async fn shutdown_turns_health_not_ready_then_finishes_streams() {
    let cfg = "[limits]\nnot_ready_delay_ms = 300\nshutdown_grace_ms = 5000\n[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 5\ntokens_per_s = 30.0\nmin_answer_tokens = 15\nmax_answer_tokens = 15\n";
    let mut node = TestNode::start(cfg).await;
    let (t, addr) = (node.token(), node.addr);
    let inflight = tokio::spawn({
        let t = t.clone();
        async move { stream(addr, Some(&t), &[], body(&request(true, None))).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let server = node.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let h = get(addr, "/health", None).await;
    assert_eq!(h.status, 503);
    assert_eq!(h.json()["status"], "shutting_down");
    assert_eq!(h.json()["ready"], false);
    let r = post_json(addr, "/v1/chat/completions", Some(&t), &[], body(&request(false, Some(1))))
        .await;
    assert_eq!((r.status.as_u16(), r.error_code()), (503, "node_shutting_down".to_owned()));
    assert!(r.header("x-edgeroute-migrate").unwrap().contains("reason=shutdown"));
    let s = inflight.await.unwrap();
    assert!(s.done(), "in-flight stream cut by shutdown");
    tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn tls_node_serves_over_rustls() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("edgeroute-node-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("c.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("k.pem"), cert.signing_key.serialize_pem()).unwrap();
    let cfg = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{FAST}",
        dir.join("c.pem").display(),
        dir.join("k.pem").display()
    );
    let node = TestNode::start(&cfg).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let res = send
        .send_request(
            http::Request::get("https://localhost/health")
                .header("host", "localhost")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    std::fs::remove_dir_all(dir).ok();
}

/// The public listener answers `POST` to the inference routes without the router's layers
/// (`gateway::Gateway`); the router serves the same routes when something wraps it. Both must
/// give the same answer: status, error code, and the headers every response carries, for
/// every kind of caller (a token without the inference scope included).
#[tokio::test]
async fn the_inference_routes_answer_alike_with_and_without_the_router() {
    use edgeroute_node::gateway::{Gateway, Plane, router};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let node = TestNode::start(FAST).await;
    let st = node.state.clone();
    let direct = Gateway::new(st.clone(), router(st.clone(), Plane::Public, false), true);
    let routed = Gateway::new(st.clone(), router(st.clone(), Plane::Public, false), false);
    let token = node.token();
    let admin_only = node.token_for("ops", &[Scope::Admin], 300);
    let chat = body(&request(false, Some(2)));
    let embed = serde_json::to_vec(&json!({"model": "sim-llama", "input": "hi"})).unwrap();
    let cases: Vec<(&str, &str, Option<&str>, Vec<u8>)> = vec![
        ("POST", "/v1/chat/completions", Some(&token), chat.clone()),
        ("POST", "/v1/chat/completions?x=1", Some(&token), chat.clone()),
        ("POST", "/v1/chat/completions", None, chat.clone()),
        ("POST", "/v1/chat/completions", Some(&admin_only), chat.clone()),
        ("POST", "/v1/audio/speech", Some(&admin_only), b"{}".to_vec()),
        ("POST", "/v1/chat/completions", Some(&token), b"{not json".to_vec()),
        ("GET", "/v1/chat/completions", Some(&token), Vec::new()),
        ("POST", "/v1/chat/completions/", Some(&token), chat.clone()),
        ("POST", "/v1/embeddings", Some(&token), embed.clone()),
        ("POST", "/v1/embeddings", None, embed),
        ("POST", "/v1/completions", Some(&token), b"{}".to_vec()),
        ("POST", "/v1/audio/speech", Some(&token), b"{}".to_vec()),
        ("POST", "/v1/audio/transcriptions", Some(&token), Vec::new()),
        ("POST", "/v1/audio/translations", None, Vec::new()),
        ("POST", "/v1/models", Some(&token), Vec::new()),
    ];
    for (m, path, tok, b) in cases {
        let mut answers = Vec::new();
        for svc in [direct.clone(), routed.clone()] {
            let mut req = http::Request::builder()
                .method(m)
                .uri(path)
                .header("content-type", "application/json");
            if let Some(t) = tok {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let res = svc.oneshot(req.body(axum::body::Body::from(b.clone())).unwrap()).await;
            let res = res.unwrap();
            let status = res.status().as_u16();
            // The router sets `content-length` from an exact body length; on the wire hyper
            // writes it from the same length (checked below), so it is not compared here.
            let mut names: Vec<String> = res
                .headers()
                .keys()
                .filter(|k| *k != http::header::CONTENT_LENGTH)
                .map(|k| k.to_string())
                .collect();
            names.sort();
            let bytes = res.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let code = v["error"]["code"].clone();
            answers.push((status, code, names));
        }
        assert_eq!(answers[0], answers[1], "{m} {path} (direct, then routed)");
        if tok == Some(admin_only.as_str()) {
            assert_eq!(answers[0].0, 403, "{m} {path}: a token without the inference scope");
        }
        assert!(answers[0].2.iter().any(|h| h == "x-edgeroute-node"), "{m} {path}: {answers:?}");
    }
    // Over the wire (the node serves the direct path), a JSON answer states its length.
    let r = node.chat(chat).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length").map(str::to_owned), Some(r.body.len().to_string()));
}
