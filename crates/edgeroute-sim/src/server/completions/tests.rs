//! `/v1/completions` through the router.

use super::*;
use crate::config::{Faults, SimConfig};
use crate::engine::Simulator;
use crate::server::router_with_clock;
use crate::text::expected_completion;
use axum::Router;
use axum::http::Request;
use serde_json::json;
use std::sync::Arc;
use tower::ServiceExt;

const CREATED: u64 = 1_700_000_000;

fn app(cfg: SimConfig) -> (Arc<Simulator>, Router) {
    let sim = Arc::new(Simulator::new(cfg).unwrap());
    (Arc::clone(&sim), router_with_clock(sim, edgeroute_core::clock::fixed(CREATED * 1000)))
}

async fn post(app: &Router, body: &Value) -> (StatusCode, String, String) {
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let ct = resp.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    (status, ct, String::from_utf8(bytes.to_vec()).unwrap())
}

/// The chat request a prompt is answered as.
fn as_chat(prompt: &str, max_tokens: u32, seed: Option<u64>) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new("sim-llama", vec![ChatMessage::new(Role::User, prompt)]);
    r.max_tokens = Some(max_tokens);
    r.seed = seed;
    r
}

#[tokio::test]
async fn a_completion_is_the_chat_answer_to_the_prompt() {
    let (sim, app) = app(SimConfig::zero_latency());
    let (status, ct, body) =
        post(&app, &json!({"model":"sim-llama","prompt":"Once upon a time","echo":false})).await;
    assert_eq!((status, ct.as_str()), (StatusCode::OK, "application/json"));
    let v: Value = serde_json::from_str(&body).unwrap();
    // max_tokens defaults to 16; answers are 16 to 64 tokens, so this one may stop early.
    let want = expected_completion(sim.config(), &as_chat("Once upon a time", 16, None));
    let usage = want.usage;
    assert_eq!(
        v,
        json!({"id":"cmpl-sim-0","object":"text_completion","created":CREATED,"model":"sim-llama",
            "choices":[{"text":want.text(),"index":0,"logprobs":null,
                "finish_reason":serde_json::to_value(want.finish_reason).unwrap()}],
            "usage":{"prompt_tokens":usage.prompt_tokens,"completion_tokens":usage.completion_tokens,
                "total_tokens":usage.total_tokens}})
    );
    assert_eq!(want.tokens.len(), 16);

    // A one-string array, a budget, a seed.
    let (status, _, body) =
        post(&app, &json!({"model":"sim-llama","prompt":["hi"],"max_tokens":100,"seed":4})).await;
    assert_eq!(status, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    let want = expected_completion(sim.config(), &as_chat("hi", 100, Some(4)));
    assert_eq!(v["choices"][0]["text"], want.text());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn a_streamed_completion_is_sse_with_usage_and_done() {
    let (sim, app) = app(SimConfig::zero_latency());
    let (status, ct, body) = post(
        &app,
        &json!({"model":"sim-llama","prompt":"go","max_tokens":3,"stream":true,
            "stream_options":{"include_usage":true}}),
    )
    .await;
    assert_eq!((status, ct.as_str()), (StatusCode::OK, "text/event-stream"));
    let want = expected_completion(sim.config(), &as_chat("go", 3, None));
    let events: Vec<&str> = body.split_terminator("\n\n").collect();
    // A chunk per token, the finish, the usage, [DONE].
    assert_eq!(events.len(), 3 + 3);
    assert_eq!(events[5], "data: [DONE]");
    let parsed: Vec<Value> = events[..5]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    let text: String =
        parsed[..3].iter().map(|v| v["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, want.text());
    assert_eq!(
        parsed[0],
        json!({"id":"cmpl-sim-0","object":"text_completion","created":CREATED,"model":"sim-llama",
            "choices":[{"text":want.tokens[0],"index":0,"logprobs":null,"finish_reason":null}]})
    );
    assert_eq!(parsed[3]["choices"][0]["finish_reason"], "length");
    assert_eq!(parsed[4]["choices"], json!([]));
    assert_eq!(parsed[4]["usage"]["completion_tokens"], 3);
    assert_eq!(sim.in_flight(), 0);
}

#[tokio::test]
async fn completion_errors() {
    let (_, app) = app(SimConfig { context_window: 8, ..SimConfig::zero_latency() });
    for (body, status, param) in [
        (json!({"model":"sim-llama","prompt":["a","b"]}), StatusCode::BAD_REQUEST, json!("prompt")),
        (json!({"model":"sim-llama","prompt":[1,2,3]}), StatusCode::BAD_REQUEST, json!("prompt")),
        (json!({"model":"sim-llama","prompt":[[1,2]]}), StatusCode::BAD_REQUEST, json!("prompt")),
        (json!({"model":"sim-llama","prompt":7}), StatusCode::BAD_REQUEST, json!("prompt")),
        (json!({"model":"sim-llama"}), StatusCode::BAD_REQUEST, json!("prompt")),
        (json!({"model":"nope","prompt":"x"}), StatusCode::NOT_FOUND, json!("model")),
        // 4 + 1 prompt tokens plus the default 16 exceed a window of 8.
        (json!({"model":"sim-llama","prompt":"x"}), StatusCode::BAD_REQUEST, json!("prompt")),
    ] {
        let (got, ct, text) = post(&app, &body).await;
        assert_eq!((got, ct.as_str()), (status, "application/json"), "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], param, "{body}: {text}");
    }
    let (_, app) = self::app(SimConfig {
        faults: Faults { cut_after_tokens: Some(1), ..Faults::default() },
        ..SimConfig::zero_latency()
    });
    let (status, _, body) =
        post(&app, &json!({"model":"sim-llama","prompt":"x","stream":true})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.ends_with("\"code\":\"stream_cut\"}}\n\n"), "{body}");
    assert!(!body.contains("[DONE]"));
}
