//! Router tests without sockets: `tower::ServiceExt::oneshot` on the router.

use super::*;
use crate::config::SimConfig;
use crate::text::expected_completion;
use axum::http::Request;
use edgeroute_proto::{ChatCompletion, ChatMessage, Role};
use serde_json::{Value, json};
use tokio::time::Duration;
use tower::ServiceExt;

const CREATED: u64 = 1_700_000_000;

fn app(cfg: SimConfig) -> (Arc<Simulator>, Router) {
    let sim = Arc::new(Simulator::new(cfg).unwrap());
    (Arc::clone(&sim), router_with_clock(sim, edgeroute_core::clock::fixed(CREATED * 1000)))
}

fn post(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::builder().method("POST").uri(uri).body(body.into()).unwrap()
}

fn chat(body: &Value) -> Request<Body> {
    post("/v1/chat/completions", body.to_string())
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (parts.status, parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
}

fn user(text: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new("sim-llama", vec![ChatMessage::new(Role::User, text)])
}

fn frame<T: Serialize>(v: &T) -> String {
    format!("data: {}\n\n", serde_json::to_string(v).unwrap())
}

#[tokio::test]
async fn non_streaming_answer_is_an_openai_completion() {
    let (sim, app) = app(SimConfig::zero_latency());
    let (status, headers, body) = send(
        &app,
        chat(&json!({"model":"sim-llama","messages":[{"role":"user","content":"hi there"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[CONTENT_TYPE], "application/json");
    let c: ChatCompletion = serde_json::from_str(&body).unwrap();
    let want = expected_completion(sim.config(), &user("hi there"));
    assert_eq!(
        (c.id.as_str(), c.object.as_str(), c.created),
        ("chatcmpl-sim-0", "chat.completion", CREATED)
    );
    assert_eq!(c.choices[0].message.content.as_deref(), Some(want.text().as_str()));
    assert_eq!(c.choices[0].finish_reason, Some(want.finish_reason));
    assert_eq!(c.usage, Some(want.usage));
    assert_eq!(sim.in_flight(), 0);
}

#[tokio::test]
async fn sse_stream_has_openai_framing_usage_and_done() {
    let (sim, app) = app(SimConfig::zero_latency());
    let (status, headers, body) = send(
        &app,
        chat(&json!({"model":"sim-llama","messages":[{"role":"user","content":"hi"}],
            "stream":true,"stream_options":{"include_usage":true},"max_tokens":3})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[CONTENT_TYPE], "text/event-stream");
    assert_eq!(headers[CACHE_CONTROL], "no-cache");

    let mut r = user("hi");
    r.max_tokens = Some(3);
    let want = expected_completion(sim.config(), &r);
    let b = ChunkBuilder {
        id: "chatcmpl-sim-0".into(),
        created: CREATED,
        model: "sim-llama".into(),
        include_usage: true,
    };
    let mut expected = frame(&b.role());
    for t in &want.tokens {
        expected.push_str(&frame(&b.content(t.as_str())));
    }
    expected.push_str(&frame(&b.finish(FinishReason::Length)));
    expected.push_str(&frame(&b.usage(want.usage).unwrap()));
    expected.push_str("data: [DONE]\n\n");
    assert_eq!(body, expected);
    // Spot-check the shape itself, not just agreement with ChunkBuilder.
    assert!(body.starts_with(
        r#"data: {"id":"chatcmpl-sim-0","object":"chat.completion.chunk","created":1700000000,"model":"sim-llama","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null,"logprobs":null}],"usage":null}"#
    ));
    assert!(body.contains(
        r#""choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#
    ));
}

#[tokio::test]
async fn sse_without_include_usage_has_no_usage_key() {
    let (sim, app) = app(SimConfig::zero_latency());
    let (_, _, body) = send(
        &app,
        chat(
            &json!({"model":"sim-llama","messages":[{"role":"user","content":"yo"}],"stream":true}),
        ),
    )
    .await;
    assert!(!body.contains("usage"));
    let events: Vec<&str> = body.split_terminator("\n\n").collect();
    let tokens = expected_completion(sim.config(), &user("yo")).tokens;
    // Role, one chunk per token, finish, [DONE].
    assert_eq!(events.len(), tokens.len() + 3);
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let text: String = events[1..=tokens.len()]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
            v["choices"][0]["delta"]["content"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, tokens.concat());
}

#[test]
fn content_frames_are_byte_identical_to_serialized_chunks() {
    for include_usage in [false, true] {
        let b = ChunkBuilder { id: "x\"1".into(), created: 7, model: "m/ü".into(), include_usage };
        let frames = SseFrames::new(b.clone());
        assert!(!frames.content_prefix.is_empty());
        for token in [" word", "", "quote \" back\\slash\nnewline \u{1} ü 😀"] {
            assert_eq!(frames.content(token), frame(&b.content(token)).into_bytes());
        }
    }
}

#[tokio::test]
async fn a_mid_stream_failure_is_an_error_event_without_done() {
    let (sim, app) = app(SimConfig {
        faults: Faults { cut_after_tokens: Some(2), ..Faults::default() },
        ..SimConfig::zero_latency()
    });
    let (status, _, body) = send(
        &app,
        chat(
            &json!({"model":"sim-llama","messages":[{"role":"user","content":"hi"}],"stream":true}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("[DONE]"));
    let events: Vec<&str> = body.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 4, "{body}");
    assert_eq!(
        events[3],
        r#"data: {"error":{"message":"stream cut after 2 tokens","type":"server_error","param":null,"code":"stream_cut"}}"#
    );
    assert_eq!(sim.in_flight(), 0);

    // Without streaming nothing was sent yet: a clean 500.
    let (status, _, body) =
        send(&app, chat(&json!({"model":"sim-llama","messages":[{"role":"user","content":"hi"}]})))
            .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "stream_cut");
}

#[tokio::test]
async fn a_client_hanging_up_frees_the_slot() {
    let (sim, app) = app(SimConfig {
        faults: Faults { stall_after_tokens: Some(1), ..Faults::default() },
        ..SimConfig::zero_latency()
    });
    let resp = app
        .oneshot(chat(
            &json!({"model":"sim-llama","messages":[{"role":"user","content":"hi"}],"stream":true}),
        ))
        .await
        .unwrap();
    let mut data = resp.into_body().into_data_stream();
    let role = data.next().await.unwrap().unwrap();
    assert!(role.starts_with(b"data: {") && role.ends_with(b"\n\n"));
    let token = data.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&token).unwrap().contains(r#""delta":{"content":"#));
    assert_eq!(sim.in_flight(), 1);
    drop(data);
    assert_eq!(sim.in_flight(), 0);
}

async fn error_of(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let (status, headers, body) = send(app, req).await;
    assert_eq!(headers[CONTENT_TYPE], "application/json", "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let e = v["error"].as_object().unwrap();
    for key in ["message", "type", "param", "code"] {
        assert!(e.contains_key(key), "{key} missing in {body}");
    }
    (status, headers, v["error"].clone())
}

#[tokio::test]
async fn bad_requests_are_400_naming_the_parameter() {
    let (_, app) = app(SimConfig::zero_latency());
    let cases = [
        ("{", Value::Null),
        (r#"{"messages":[]}"#, json!("model")),
        (r#"{"model":"sim-llama","messages":[],"max_tokens":"x"}"#, json!("max_tokens")),
        (
            r#"{"model":"sim-llama","messages":[{"role":"robot","content":"x"}]}"#,
            json!("messages[0].role"),
        ),
        (r#"{"model":"sim-llama","messages":[{"content":"x"}]}"#, json!("messages[0].role")),
        (r#"{"model":"sim-llama","messages":[]}"#, json!("messages")),
        (
            r#"{"model":"sim-llama","messages":[{"role":"user","content":"x"}]} trailing"#,
            Value::Null,
        ),
        (
            r#"{"model":"sim-llama","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
            json!("temperature"),
        ),
    ];
    for (body, param) in cases {
        let (status, _, e) = error_of(&app, post("/v1/chat/completions", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert_eq!(e["param"], param, "{body}");
    }
}

#[tokio::test]
async fn backend_failures_map_to_openai_errors() {
    let (sim, app) = app(SimConfig::zero_latency());
    let req =
        |model: &str| chat(&json!({"model":model,"messages":[{"role":"user","content":"hi"}]}));

    let (status, _, e) = error_of(&app, req("nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("model_not_found"), Some("model")));

    let cases = [
        (
            Faults { error_rate: 1.0, ..Faults::default() },
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected_error",
        ),
        (
            Faults { refuse_connections: true, ..Faults::default() },
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_refused",
        ),
        (
            Faults { crash: true, ..Faults::default() },
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_crashed",
        ),
    ];
    for (faults, want_status, code) in cases {
        sim.set_faults(faults).unwrap();
        let (status, headers, e) = error_of(&app, req("sim-llama")).await;
        assert_eq!((status, e["code"].as_str()), (want_status, Some(code)));
        assert_eq!(e["type"], "server_error");
        assert!(headers.get(RETRY_AFTER).is_none());
    }
}

#[tokio::test]
async fn overload_is_503_with_retry_after() {
    let (sim, app) = app(SimConfig {
        max_queue: 0,
        gpus: vec![crate::GpuConfig { slots: 1, ..crate::GpuConfig::new("gpu0") }],
        ..SimConfig::zero_latency()
    });
    let _held = sim.generate(&user("hold")).await.unwrap();
    let (status, headers, e) = error_of(
        &app,
        chat(&json!({"model":"sim-llama","messages":[{"role":"user","content":"hi"}]})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[RETRY_AFTER], "1");
    assert_eq!(e["code"], "overloaded");
}

#[tokio::test]
async fn a_prompt_beyond_the_context_window_is_a_400_at_once() {
    // Realistic prefill (200 µs a token): had the 3.4 MB prompt been prefilled, it would take
    // two minutes. The only slot is busy and nothing may queue, so the 400 also shows the
    // check comes before the queue.
    let (sim, app) = app(SimConfig {
        context_window: 512,
        max_queue: 0,
        gpus: vec![crate::GpuConfig { slots: 1, ..crate::GpuConfig::new("gpu0") }],
        ..SimConfig::default()
    });
    let _held = sim.generate(&user("hold")).await.unwrap();
    let big = "word ".repeat(680_000);
    for stream in [false, true] {
        let started = std::time::Instant::now();
        let (status, headers, e) = error_of(
            &app,
            chat(&json!({"model":"sim-llama","messages":[{"role":"user","content":big}],
                "stream":stream})),
        )
        .await;
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(headers.get(RETRY_AFTER).is_none());
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["code"], "context_length_exceeded");
        assert_eq!(e["param"], "messages");
        assert_eq!(
            e["message"],
            "This model's maximum context length is 512 tokens. However, your messages \
             resulted in 680004 tokens. Please reduce the length of the messages."
        );
    }
    // The completion budget counts too: 6 prompt tokens + 507 > 512.
    let (status, _, e) = error_of(
        &app,
        chat(&json!({"model":"sim-llama","messages":[{"role":"user","content":"a b"}],
            "max_tokens":507})),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("context_length_exceeded"))
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("you requested 513 tokens (6 in the messages, 507 in the completion)"),
        "{e}"
    );
    assert_eq!((sim.in_flight(), sim.queue_depth()), (1, 0));
}

#[tokio::test]
async fn a_body_beyond_32_mib_is_an_openai_413() {
    let (_, app) = app(SimConfig::zero_latency());
    let (status, _, e) =
        error_of(&app, post("/v1/chat/completions", vec![b' '; (32 << 20) + 1])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("invalid_request_error"), Some("request_too_large"))
    );
}

#[tokio::test]
async fn models_lists_the_loaded_models() {
    let (_, app) = app(SimConfig::default());
    let req = Request::builder().uri("/v1/models").body(Body::empty()).unwrap();
    let (status, _, body) = send(&app, req).await;
    assert_eq!(status, StatusCode::OK);
    let list: ModelList = serde_json::from_str(&body).unwrap();
    assert_eq!(list.object, "list");
    assert_eq!(list.data.len(), 1);
    let m = &list.data[0];
    assert_eq!((m.id.as_str(), m.object.as_str(), m.created), ("sim-llama", "model", CREATED));
    assert_eq!((m.state, m.gpu.as_deref()), (ModelState::Ready, Some("gpu0")));
}

#[tokio::test]
async fn health_reports_gpus_and_turns_503_when_crashed() {
    let (sim, app) = app(SimConfig::default());
    let get = || Request::builder().uri("/health").body(Body::empty()).unwrap();
    let (status, _, body) = send(&app, get()).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!((v["in_flight"].as_u64(), v["capacity"].as_u64()), (Some(0), Some(4)));
    assert_eq!(v["gpus"][0]["id"], "gpu0");
    assert_eq!(v["gpus"][0]["memory_used_mb"], 4096);

    sim.set_faults(Faults { crash: true, ..Faults::default() }).unwrap();
    let (status, _, body) = send(&app, get()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "crashed");
}

#[tokio::test]
async fn faults_admin_reads_writes_and_validates() {
    let (sim, app) = app(SimConfig::zero_latency());
    let get = || Request::builder().uri("/admin/faults").body(Body::empty()).unwrap();
    let put = |body: &str| {
        Request::builder()
            .method("PUT")
            .uri("/admin/faults")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let (status, _, body) = send(&app, get()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Faults>(&body).unwrap(), Faults::default());

    let (status, _, body) = send(&app, put(r#"{"error_rate":1.0,"slow_token_ms":5}"#)).await;
    assert_eq!(status, StatusCode::OK);
    let want = Faults { error_rate: 1.0, slow_token_ms: 5, ..Faults::default() };
    assert_eq!(serde_json::from_str::<Faults>(&body).unwrap(), want);
    assert_eq!(sim.faults(), want);
    let (status, _, _) =
        send(&app, chat(&json!({"model":"sim-llama","messages":[{"role":"user","content":"hi"}]})))
            .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);

    let (status, _, e) = error_of(&app, put(r#"{"eror_rate":1}"#)).await;
    assert_eq!(
        (status, e["type"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request_error"))
    );
    let (status, _, e) = error_of(&app, put(r#"{"error_rate":2}"#)).await;
    assert_eq!((status, e["param"].as_str()), (StatusCode::BAD_REQUEST, Some("error_rate")));
    assert_eq!(sim.faults(), want);

    let (status, _, body) = send(&app, put("{}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Faults>(&body).unwrap(), Faults::default());
}

#[tokio::test]
async fn unknown_routes_get_an_openai_404() {
    let (_, app) = app(SimConfig::default());
    let (status, _, e) = error_of(&app, post("/v1/nothing", "")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "unknown_url");
}

#[tokio::test(start_paused = true)]
async fn streamed_tokens_arrive_on_the_simulated_schedule() {
    let (_, app) =
        app(SimConfig { min_answer_tokens: 3, max_answer_tokens: 3, ..SimConfig::default() });
    let t0 = tokio::time::Instant::now();
    let resp = app
        .oneshot(chat(
            &json!({"model":"sim-llama","messages":[{"role":"user","content":"hi"}],"stream":true}),
        ))
        .await
        .unwrap();
    // Headers are sent at the commit point: 40 ms + 200 us × 5 prompt tokens.
    assert_eq!(t0.elapsed(), Duration::from_millis(41));
    let mut data = resp.into_body().into_data_stream();
    let mut at = Vec::new();
    while let Some(chunk) = data.next().await {
        chunk.unwrap();
        at.push(t0.elapsed().as_millis());
    }
    // Role, token 1, token 2 (+20 ms), token 3 (+20 ms), finish + [DONE].
    assert_eq!(at, vec![41, 41, 61, 81, 81]);
}
