//! The voice surface on the node (issue 19): who may call each endpoint, the answers' shapes on
//! the simulator, the first byte per route in `/metrics`, a model being unloaded saying so on
//! every answer, and bad input as precise 400s.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use edgeroute_auth::Scope;
use edgeroute_test_util::client::method;
use edgeroute_test_util::{TestNode, get, post_json};

const VOICE: &str = "[backend]\nkind = \"sim\"\n[backend.sim]\nseed = 5\n\
    [[backend.sim.gpus]]\nid = \"gpu0\"\n[[backend.sim.gpus]]\nid = \"gpu1\"\n\
    [[backend.sim.models]]\nid = \"whisper\"\ngpu = \"gpu0\"\n\
    [[backend.sim.models]]\nid = \"tts\"\ngpu = \"gpu1\"\n";

/// A one-second 16 kHz mono WAV.
fn wav() -> Vec<u8> {
    let samples = 16_000u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + samples * 2).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&16_000u32.to_le_bytes());
    b.extend_from_slice(&32_000u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(samples * 2).to_le_bytes());
    b.extend((0..samples).flat_map(|i| ((i % 200) as i16 * 50).to_le_bytes()));
    b
}

fn upload(model: &str) -> (String, Vec<u8>) {
    let mut b = Vec::new();
    b.extend_from_slice(b"--B0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n");
    b.extend_from_slice(&wav());
    b.extend_from_slice(
        b"\r\n--B0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n",
    );
    b.extend_from_slice(model.as_bytes());
    b.extend_from_slice(b"\r\n--B0undary--\r\n");
    ("multipart/form-data; boundary=B0undary".into(), b)
}

/// `(path, content type, body)` of one valid request per endpoint.
fn requests() -> Vec<(&'static str, String, Vec<u8>)> {
    let (ct, form) = upload("whisper");
    vec![
        ("/v1/audio/transcriptions", ct.clone(), form.clone()),
        ("/v1/audio/translations", ct, form),
        (
            "/v1/audio/speech",
            "application/json".into(),
            br#"{"model":"tts","input":"Hello there. How are you?","voice":"alloy","response_format":"wav"}"#.to_vec(),
        ),
        (
            "/v1/embeddings",
            "application/json".into(),
            br#"{"model":"tts","input":["a","b"]}"#.to_vec(),
        ),
        (
            "/v1/completions",
            "application/json".into(),
            br#"{"model":"whisper","prompt":"Once upon a time","max_tokens":5}"#.to_vec(),
        ),
    ]
}

async fn send(
    node: &TestNode,
    path: &str,
    ct: &str,
    body: &[u8],
    token: Option<&str>,
) -> edgeroute_test_util::Reply {
    post_json(node.addr, path, token, &[("content-type", ct)], body.to_vec()).await
}

#[tokio::test]
async fn each_endpoint_answers_an_inference_token_and_refuses_the_rest() {
    let node = TestNode::start(VOICE).await;
    let admin_only = node.token_for("ops", &[Scope::Admin], 600);
    let inference = node.token();
    for (path, ct, body) in requests() {
        let none = send(&node, path, &ct, &body, None).await;
        assert_eq!(none.status, 401, "{path}: no token");
        let forged = send(&node, path, &ct, &body, Some("eyJhbGciOiJub25lIn0.e30.")).await;
        assert_eq!(forged.status, 401, "{path}: a forged token");
        let wrong = send(&node, path, &ct, &body, Some(&admin_only)).await;
        assert_eq!(wrong.status, 403, "{path}: an admin token has no inference scope");
        let ok = send(&node, path, &ct, &body, Some(&inference)).await;
        assert_eq!(ok.status, 200, "{path}: {}", String::from_utf8_lossy(&ok.body));
        assert_eq!(ok.headers["x-edgeroute-node"], node.state.id.as_str(), "{path}");
        assert!(ok.headers.contains_key("x-edgeroute-load"), "{path}: the load report");
        match path {
            "/v1/audio/speech" => {
                assert_eq!(ok.headers["content-type"], "audio/wav");
                assert_eq!(&ok.body[..4], b"RIFF");
                let declared = u32::from_le_bytes(ok.body[4..8].try_into().unwrap()) as usize;
                assert_eq!(declared + 8, ok.body.len(), "the WAV's size is its length");
            }
            "/v1/embeddings" => {
                let v = ok.json();
                assert_eq!(v["data"].as_array().unwrap().len(), 2);
                assert_eq!(v["object"], "list");
            }
            "/v1/completions" => {
                let v = ok.json();
                assert_eq!(v["object"], "text_completion");
                assert_eq!(v["usage"]["completion_tokens"], 5);
                assert!(!v["choices"][0]["text"].as_str().unwrap().is_empty());
            }
            _ => assert!(!ok.json()["text"].as_str().unwrap().trim().is_empty(), "{path}"),
        }
    }
    // Time to first byte per route.
    let m = String::from_utf8(get(node.addr, "/metrics", None).await.body.to_vec()).unwrap();
    for route in ["transcriptions", "translations", "speech", "embeddings", "completions"] {
        let series = format!("edgeroute_node_first_byte_seconds_count{{route=\"{route}\"}} 1");
        assert!(m.contains(&series), "{series} in\n{m}");
        let ok = format!("edgeroute_node_requests_total{{route=\"{route}\",status=\"200\"}} 1");
        assert!(m.contains(&ok), "{ok}");
    }
}

#[tokio::test]
async fn bad_input_is_a_400_naming_the_field_and_a_missing_model_a_404() {
    let node = TestNode::start(VOICE).await;
    let t = node.token();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/audio/speech",
            "application/json",
            br#"{"model":"tts","voice":"a"}"#.to_vec(),
            400,
            "input",
        ),
        (
            "/v1/audio/speech",
            "application/json",
            br#"{"model":"tts","input":"x","voice":"a","response_format":"mp3"}"#.to_vec(),
            400,
            "response_format",
        ),
        (
            "/v1/embeddings",
            "application/json",
            br#"{"model":"tts","input":[]}"#.to_vec(),
            400,
            "input",
        ),
        ("/v1/embeddings", "application/json", b"{not json".to_vec(), 400, ""),
        (
            "/v1/audio/transcriptions",
            "application/json",
            br#"{"model":"whisper"}"#.to_vec(),
            400,
            "",
        ),
        (
            "/v1/embeddings",
            "application/json",
            br#"{"model":"nope","input":"x"}"#.to_vec(),
            404,
            "",
        ),
    ];
    for (path, ct, body, status, param) in cases {
        let r = send(&node, path, ct, &body, Some(&t)).await;
        assert_eq!(r.status, status, "{path} {}", String::from_utf8_lossy(&r.body));
        let e = &r.json()["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "OpenAI's shape: {e}");
        if !param.is_empty() {
            assert_eq!(e["param"], param, "{path}");
        }
    }
    // An upload over the limit is refused from its Content-Length, before it is read.
    let small = TestNode::start(&format!("{VOICE}[limits]\nmax_audio_bytes = 1000\n")).await;
    let (ct, form) = upload("whisper");
    let r = send(&small, "/v1/audio/transcriptions", &ct, &form, Some(&small.token())).await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test]
async fn a_model_being_unloaded_says_so_on_its_answers() {
    let node = TestNode::start(&format!("[models]\nunload_drain_ms = 30000\n{VOICE}")).await;
    let t = node.token();
    // A long speech keeps `tts` busy, so its unload drains instead of finishing at once.
    let long = format!(
        r#"{{"model":"tts","input":"{}","voice":"a","response_format":"pcm"}}"#,
        "Sentence after sentence. ".repeat(60)
    );
    let n2 = node.addr;
    let t2 = t.clone();
    let busy = tokio::spawn(async move {
        post_json(n2, "/v1/audio/speech", Some(&t2), &[], long.into_bytes()).await
    });
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let r = node.admin_post("/v1/models/unload", r#"{"model":"tts"}"#).await;
    assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
    let body = br#"{"model":"tts","input":["x"]}"#;
    let r = send(&node, "/v1/embeddings", "application/json", body, Some(&t)).await;
    assert_eq!(r.status, 200, "a draining model still answers");
    let hint = r.headers["x-edgeroute-migrate"].to_str().unwrap();
    assert!(hint.contains("reason=unload") && hint.contains("model=tts"), "{hint}");
    let done = busy.await.unwrap();
    assert_eq!(done.status, 200);
    let _ = method(node.addr, "GET", "/health", None, "").await;
}
