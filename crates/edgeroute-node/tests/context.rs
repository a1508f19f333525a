//! A prompt beyond the model's context window, through a real node over loopback HTTP with
//! the in-process simulator: a 400 `context_length_exceeded` at once (no queue, no prefill),
//! the caller's fault, never the node's.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::{Duration, Instant};

use edgeroute_test_util::{TestNode, get};
use serde_json::json;

/// A 512-token window; otherwise the default, realistic timing (200 µs of prefill a token),
/// under which the big prompt below would be prefilled for over two minutes.
const SMALL_WINDOW: &str = "[backend]\nkind = \"sim\"\n[backend.sim]\ncontext_window = 512\n";

/// A ~3.4 MB prompt of 680,000 words: under the node's 4 MiB body limit, far beyond 512.
fn huge_prompt() -> String {
    "word ".repeat(680_000)
}

fn chat_body(content: &str, stream: bool, max_tokens: Option<u32>) -> Vec<u8> {
    let mut b = json!({
        "model": "sim-llama",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    });
    if let Some(m) = max_tokens {
        b["max_tokens"] = json!(m);
    }
    serde_json::to_vec(&b).unwrap()
}

#[tokio::test]
async fn a_prompt_beyond_the_context_window_is_a_400_at_once_and_not_the_node_s_fault() {
    let node = TestNode::start(SMALL_WINDOW).await;
    let prompt = huge_prompt();
    for stream in [false, true] {
        let body = chat_body(&prompt, stream, None);
        assert!((3_000_000..4 << 20).contains(&body.len()), "{} bytes", body.len());
        let t = Instant::now();
        let r = node.chat(body).await;
        let took = t.elapsed();
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(&r.body));
        // Reading and parsing 3.4 MB takes some milliseconds; prefilling it would take minutes.
        assert!(took < Duration::from_secs(1), "took {took:?}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.error_code(), "context_length_exceeded");
        let e = &r.json()["error"];
        assert_eq!(e["type"], "invalid_request_error");
        assert_eq!(e["param"], "messages");
        assert_eq!(
            e["message"],
            "This model's maximum context length is 512 tokens. However, your messages resulted \
             in 680004 tokens. Please reduce the length of the messages."
        );
        assert_eq!(r.header("x-edgeroute-error"), Some("side=caller; retry=no"));
    }
    // The completion budget counts too: 6 prompt tokens + 507 = 513 > 512; 506 fits.
    let r = node.chat(chat_body("a b", false, Some(507))).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (400, "context_length_exceeded"));
    assert!(
        r.json()["error"]["message"].as_str().unwrap().contains(
            "However, you requested 513 tokens (6 in the messages, 507 in the completion)."
        ),
        "{:?}",
        r.json()
    );
    let r = node.chat(chat_body("a b", false, Some(506))).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));

    // None of it was the node's failure, nothing is left in flight.
    let h = get(node.addr, "/health", None).await.json();
    assert_eq!(h["error_rate"], 0.0, "{h}");
    assert_eq!(node.state.telemetry.in_flight(), 0);
}
