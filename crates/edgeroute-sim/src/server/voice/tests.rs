//! The voice routes through the router, without sockets.

use super::*;
use crate::audio::{parse_wav, wav_file};
use crate::config::{Faults, SimConfig};
use crate::engine::Simulator;
use crate::server::router_with_clock;
use crate::{expected_embedding, expected_speech, expected_transcript};
use axum::Router;
use axum::http::Request;
use serde_json::json;
use std::sync::Arc;
use tower::ServiceExt;

const M: &str = "sim-llama";
const BOUNDARY: &str = "----edgeroute-test-boundary";

fn app(cfg: SimConfig) -> (Arc<Simulator>, Router) {
    let sim = Arc::new(Simulator::new(cfg).unwrap());
    (Arc::clone(&sim), router_with_clock(sim, edgeroute_core::clock::fixed(1_700_000_000_000)))
}

fn faulty(f: Faults) -> (Arc<Simulator>, Router) {
    app(SimConfig { faults: f, ..SimConfig::zero_latency() })
}

/// A `multipart/form-data` request: `(name, filename, bytes)` per part.
fn form(uri: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Request<Body> {
    let mut body = Vec::new();
    for (name, filename, bytes) in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: audio/wav\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    Request::builder()
        .method("POST")
        .uri(uri)
        .header(CONTENT_TYPE, format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(Body::from(body))
        .unwrap()
}

fn json_post(uri: &str, body: &Value) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(uri)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (parts.status, parts.headers, bytes.to_vec())
}

async fn send_json(app: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let (status, headers, body) = send(app, req).await;
    assert_eq!(headers[CONTENT_TYPE], "application/json", "{status}");
    (status, serde_json::from_slice(&body).unwrap())
}

/// Asserts OpenAI's error shape; returns `(type, param, code)`.
fn error_of(v: &Value) -> (String, Value, Value) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    (e["type"].as_str().unwrap().to_owned(), e["param"].clone(), e["code"].clone())
}

/// Ten seconds of 16 kHz WAV.
fn wav10() -> Vec<u8> {
    wav_file(16_000, &(0..160_000).map(|i| (i % 300) as i16).collect::<Vec<_>>())
}

fn speech_body(extra: Value) -> Value {
    let mut b = json!({"model": M, "input": "Hello, voice agent.", "voice": "alloy"});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    b
}

#[tokio::test]
async fn a_transcription_in_each_response_format() {
    let (sim, app) = app(SimConfig::zero_latency());
    let audio = wav10();
    let want = expected_transcript(sim.config(), M, &audio, None).unwrap();
    let req = |format: Option<&str>| {
        let mut parts: Vec<(&str, Option<&str>, &[u8])> = vec![
            ("model", None, M.as_bytes()),
            ("file", Some("a.wav"), &audio),
            ("prompt", None, b"ignored"),
            ("temperature", None, b"0.2"),
        ];
        if let Some(f) = format {
            parts.push(("response_format", None, f.as_bytes()));
        }
        form("/v1/audio/transcriptions", &parts)
    };

    let (status, v) = send_json(&app, req(None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({"text": want.text}));

    let (status, headers, body) = send(&app, req(Some("text"))).await;
    assert_eq!((status, &headers[CONTENT_TYPE]), (StatusCode::OK, &TEXT));
    assert_eq!(String::from_utf8(body).unwrap(), want.text);

    let (status, v) = send_json(&app, req(Some("verbose_json"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&v["task"], &v["language"], &v["duration"]),
        (&json!("transcribe"), &json!("en"), &json!(10.0))
    );
    assert_eq!(v["text"], want.text);
    let segments = v["segments"].as_array().unwrap();
    assert_eq!(segments.len(), 2);
    assert_eq!(
        segments[1],
        json!({"id":1,"seek":500,"start":5.0,"end":10.0,"text":want.segments[1].text,"tokens":[],
            "temperature":0.0,"avg_logprob":-0.25,"compression_ratio":1.5,"no_speech_prob":0.01})
    );

    let (status, _, body) = send(&app, req(Some("srt"))).await;
    assert_eq!(status, StatusCode::OK);
    let srt = String::from_utf8(body).unwrap();
    assert_eq!(
        srt,
        format!(
            "1\n00:00:00,000 --> 00:00:05,000\n{}\n\n2\n00:00:05,000 --> 00:00:10,000\n{}\n\n",
            want.segments[0].text, want.segments[1].text
        )
    );
    let (status, _, body) = send(&app, req(Some("vtt"))).await;
    assert_eq!(status, StatusCode::OK);
    let vtt = String::from_utf8(body).unwrap();
    assert!(vtt.starts_with("WEBVTT\n\n00:00:00.000 --> 00:00:05.000\n"), "{vtt}");
    assert_eq!(sim.in_flight(), 0);
}

#[tokio::test]
async fn a_language_hint_and_a_translation() {
    let (sim, app) = app(SimConfig::zero_latency());
    let audio = vec![9u8; 64_000];
    let (status, v) = send_json(
        &app,
        form(
            "/v1/audio/transcriptions",
            &[
                ("file", Some("a.raw"), &audio),
                ("model", None, M.as_bytes()),
                ("language", None, b"de"),
                ("response_format", None, b"verbose_json"),
            ],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((&v["language"], &v["duration"]), (&json!("de"), &json!(2.0)));
    let (status, v) = send_json(
        &app,
        form(
            "/v1/audio/translations",
            &[
                ("file", Some("a.raw"), &audio),
                ("model", None, M.as_bytes()),
                ("response_format", None, b"verbose_json"),
            ],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((&v["task"], &v["language"]), (&json!("translate"), &json!("en")));
    assert_eq!(v["text"], expected_transcript(sim.config(), M, &audio, None).unwrap().text);
}

#[tokio::test]
async fn transcription_errors_are_openai_shaped_and_name_the_field() {
    let (_, app) = app(SimConfig::zero_latency());
    let audio = wav10();
    let cases: Vec<(Request<Body>, StatusCode, Value, Value)> = vec![
        (
            form("/v1/audio/transcriptions", &[("model", None, M.as_bytes())]),
            StatusCode::BAD_REQUEST,
            json!("file"),
            Value::Null,
        ),
        (
            form("/v1/audio/transcriptions", &[("file", Some("a.wav"), &audio)]),
            StatusCode::BAD_REQUEST,
            json!("model"),
            Value::Null,
        ),
        (
            form(
                "/v1/audio/transcriptions",
                &[
                    ("file", Some("a.wav"), &audio),
                    ("model", None, M.as_bytes()),
                    ("response_format", None, b"xml"),
                ],
            ),
            StatusCode::BAD_REQUEST,
            json!("response_format"),
            Value::Null,
        ),
        (
            form(
                "/v1/audio/transcriptions",
                &[("file", Some("a.wav"), &audio), ("model", None, b"nope")],
            ),
            StatusCode::NOT_FOUND,
            json!("model"),
            json!("model_not_found"),
        ),
        (
            form(
                "/v1/audio/transcriptions",
                &[("file", Some("a.wav"), b"RIFF\x04\0\0\0WAVE"), ("model", None, M.as_bytes())],
            ),
            StatusCode::BAD_REQUEST,
            json!("file"),
            json!("invalid_audio"),
        ),
        (
            form(
                "/v1/audio/transcriptions",
                &[("file", Some("a.wav"), b""), ("model", None, M.as_bytes())],
            ),
            StatusCode::BAD_REQUEST,
            json!("file"),
            json!("invalid_audio"),
        ),
        (
            form(
                "/v1/audio/transcriptions",
                &[("file", Some("a.raw"), &vec![0u8; 32_000 * 601]), ("model", None, M.as_bytes())],
            ),
            StatusCode::BAD_REQUEST,
            json!("file"),
            json!("audio_too_long"),
        ),
        (
            form(
                "/v1/audio/transcriptions",
                &[
                    ("file", Some("a.wav"), &audio),
                    ("model", None, M.as_bytes()),
                    ("language", None, b"english"),
                ],
            ),
            StatusCode::BAD_REQUEST,
            json!("language"),
            json!("invalid_language"),
        ),
        (
            json_post("/v1/audio/transcriptions", &json!({"model": M})),
            StatusCode::BAD_REQUEST,
            Value::Null,
            Value::Null,
        ),
    ];
    for (i, (req, status, param, code)) in cases.into_iter().enumerate() {
        let (got, v) = send_json(&app, req).await;
        assert_eq!(got, status, "case {i}: {v}");
        let (kind, got_param, got_code) = error_of(&v);
        assert_eq!(
            (kind.as_str(), got_param, got_code),
            ("invalid_request_error", param, code),
            "case {i}"
        );
    }
}

#[tokio::test]
async fn backend_faults_on_the_audio_routes_are_5xx() {
    let audio = wav10();
    let parts: &[(&str, Option<&str>, &[u8])] =
        &[("file", Some("a.wav"), &audio), ("model", None, M.as_bytes())];
    for (f, status, code) in [
        (
            Faults { error_rate: 1.0, ..Faults::default() },
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected_error",
        ),
        (
            Faults { crash: true, ..Faults::default() },
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_crashed",
        ),
        (
            Faults { refuse_connections: true, ..Faults::default() },
            StatusCode::SERVICE_UNAVAILABLE,
            "backend_refused",
        ),
    ] {
        let (_, app) = faulty(f);
        let (got, v) = send_json(&app, form("/v1/audio/transcriptions", parts)).await;
        assert_eq!(got, status);
        assert_eq!(error_of(&v), ("server_error".into(), Value::Null, json!(code)));
        let (got, v) =
            send_json(&app, json_post("/v1/audio/speech", &speech_body(json!({})))).await;
        assert_eq!((got, error_of(&v).2), (status, json!(code)));
        let (got, v) =
            send_json(&app, json_post("/v1/embeddings", &json!({"model": M, "input": "x"}))).await;
        assert_eq!((got, error_of(&v).2), (status, json!(code)));
    }
}

#[tokio::test]
async fn speech_streams_a_valid_wav_in_several_chunks() {
    let cfg =
        SimConfig { speech_ttfa_ms: 1, speech_realtime_factor: 0.0, ..SimConfig::zero_latency() };
    let (sim, app) = app(cfg);
    let resp = app
        .clone()
        .oneshot(json_post(
            "/v1/audio/speech",
            &speech_body(json!({"speed": 1.5, "instructions": "calm"})),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "audio/wav");
    let mut frames = resp.into_body().into_data_stream();
    let mut body = Vec::new();
    let mut count = 0;
    while let Some(frame) = frames.next().await {
        body.extend_from_slice(&frame.unwrap());
        count += 1;
    }
    // 19 characters: 30400 samples, 13 chunks of (at most) 100 ms, each its own frame.
    assert_eq!(count, 13);
    let want =
        expected_speech(sim.config(), M, "Hello, voice agent.", "alloy", AudioFormat::Wav).unwrap();
    assert_eq!(body, want);
    let info = parse_wav(&body).unwrap();
    assert_eq!((info.riff_size as usize, info.data_len), (body.len() - 8, body.len() - 44));
    assert_eq!(sim.in_flight(), 0);

    let (status, headers, body) =
        send(&app, json_post("/v1/audio/speech", &speech_body(json!({"response_format": "pcm"}))))
            .await;
    assert_eq!(
        (status, &headers[CONTENT_TYPE]),
        (StatusCode::OK, &HeaderValue::from_static("audio/pcm"))
    );
    assert_eq!(body, want[44..]);
}

#[tokio::test]
async fn a_speech_stream_cut_midway_aborts_the_body() {
    let (sim, app) = faulty(Faults { cut_after_tokens: Some(2), ..Faults::default() });
    let resp = app.oneshot(json_post("/v1/audio/speech", &speech_body(json!({})))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut frames = resp.into_body().into_data_stream();
    assert_eq!(frames.next().await.unwrap().unwrap().len(), 44 + 4800);
    assert_eq!(frames.next().await.unwrap().unwrap().len(), 4800);
    let err = frames.next().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("cut after 2"), "{err}");
    assert_eq!(sim.in_flight(), 0);
}

#[tokio::test]
async fn speech_errors_name_the_field() {
    let (sim, app) = faulty(Faults::default());
    let long = "x".repeat(4097);
    for (body, status, param, code) in [
        (
            speech_body(json!({"response_format": "mp3"})),
            StatusCode::BAD_REQUEST,
            json!("response_format"),
            Value::Null,
        ),
        (speech_body(json!({"speed": 5.0})), StatusCode::BAD_REQUEST, json!("speed"), Value::Null),
        (
            speech_body(json!({"stream_format": "sse"})),
            StatusCode::BAD_REQUEST,
            json!("stream_format"),
            Value::Null,
        ),
        (
            speech_body(json!({"input": long})),
            StatusCode::BAD_REQUEST,
            json!("input"),
            json!("input_too_long"),
        ),
        (
            speech_body(json!({"input": ""})),
            StatusCode::BAD_REQUEST,
            json!("input"),
            json!("empty_input"),
        ),
        (json!({"model": M, "input": "hi"}), StatusCode::BAD_REQUEST, json!("voice"), Value::Null),
        (
            speech_body(json!({"model": "nope"})),
            StatusCode::NOT_FOUND,
            json!("model"),
            json!("model_not_found"),
        ),
    ] {
        let (got, v) = send_json(&app, json_post("/v1/audio/speech", &body)).await;
        assert_eq!(got, status, "{body}: {v}");
        let (kind, got_param, got_code) = error_of(&v);
        assert_eq!(
            (kind.as_str(), got_param, got_code),
            ("invalid_request_error", param, code),
            "{body}"
        );
    }
    assert_eq!(sim.in_flight(), 0);
}

#[tokio::test]
async fn an_overloaded_gpu_answers_503_with_retry_after() {
    let (sim, app) = app(SimConfig {
        max_queue: 0,
        gpus: vec![crate::config::GpuConfig { slots: 1, ..crate::config::GpuConfig::new("gpu0") }],
        ..SimConfig::zero_latency()
    });
    let _holding = sim.speech(M, "hello", "v", AudioFormat::Pcm).unwrap();
    let (status, headers, body) =
        send(&app, json_post("/v1/audio/speech", &speech_body(json!({})))).await;
    assert_eq!(
        (status, &headers["retry-after"]),
        (StatusCode::SERVICE_UNAVAILABLE, &HeaderValue::from(1))
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error_of(&v).2, json!("overloaded"));
}

#[tokio::test]
async fn embeddings_have_openais_shape_and_usage() {
    let (sim, app) = app(SimConfig::zero_latency());
    let (status, v) = send_json(
        &app,
        json_post(
            "/v1/embeddings",
            &json!({"model": M, "input": ["hello", "world!"], "dimensions": 8, "user": "u"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((&v["object"], &v["model"]), (&json!("list"), &json!(M)));
    assert_eq!(v["usage"], json!({"prompt_tokens": 4, "total_tokens": 4}));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, text) in ["hello", "world!"].into_iter().enumerate() {
        assert_eq!((&data[i]["object"], &data[i]["index"]), (&json!("embedding"), &json!(i)));
        let got: Vec<f32> = serde_json::from_value(data[i]["embedding"].clone()).unwrap();
        let want = expected_embedding(sim.config(), M, text, Some(8)).unwrap();
        assert_eq!(got.len(), 8);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-7);
        }
    }

    // A single string, the default 384 dimensions, as base64 of little-endian f32s.
    let (status, v) = send_json(
        &app,
        json_post(
            "/v1/embeddings",
            &json!({"model": M, "input": "hello", "encoding_format": "base64"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let want = expected_embedding(sim.config(), M, "hello", None).unwrap();
    let bytes: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(v["data"][0]["embedding"], json!(base64_encode(&bytes)));
    // 1536 bytes: 512 groups of three, 2048 characters without padding.
    assert_eq!(v["data"][0]["embedding"].as_str().unwrap().len(), 2048);
    assert_eq!(v["usage"]["total_tokens"], 2);
}

#[tokio::test]
async fn embedding_errors_name_the_field() {
    let (_, app) = app(SimConfig::zero_latency());
    for (body, status, param, code) in [
        (
            json!({"model": M, "input": [[1, 2, 3]]}),
            StatusCode::BAD_REQUEST,
            json!("input"),
            Value::Null,
        ),
        (
            json!({"model": M, "input": [1, 2, 3]}),
            StatusCode::BAD_REQUEST,
            json!("input"),
            Value::Null,
        ),
        (
            json!({"model": M, "input": {"text": "x"}}),
            StatusCode::BAD_REQUEST,
            json!("input"),
            Value::Null,
        ),
        (
            json!({"model": M, "input": []}),
            StatusCode::BAD_REQUEST,
            json!("input"),
            json!("empty_input"),
        ),
        (
            json!({"model": M, "input": vec!["x"; 2049]}),
            StatusCode::BAD_REQUEST,
            json!("input"),
            json!("too_many_inputs"),
        ),
        (
            json!({"model": M, "input": "x", "dimensions": 0}),
            StatusCode::BAD_REQUEST,
            json!("dimensions"),
            json!("invalid_dimensions"),
        ),
        (
            json!({"model": M, "input": "x", "dimensions": -1}),
            StatusCode::BAD_REQUEST,
            json!("dimensions"),
            Value::Null,
        ),
        (
            json!({"model": M, "input": "x", "encoding_format": "hex"}),
            StatusCode::BAD_REQUEST,
            json!("encoding_format"),
            Value::Null,
        ),
        (json!({"model": M}), StatusCode::BAD_REQUEST, json!("input"), Value::Null),
        (
            json!({"model": "nope", "input": "x"}),
            StatusCode::NOT_FOUND,
            json!("model"),
            json!("model_not_found"),
        ),
    ] {
        let (got, v) = send_json(&app, json_post("/v1/embeddings", &body)).await;
        assert_eq!(got, status, "{body}: {v}");
        let (kind, got_param, got_code) = error_of(&v);
        assert_eq!(
            (kind.as_str(), got_param, got_code),
            ("invalid_request_error", param, code),
            "{body}"
        );
    }
}

#[test]
fn base64_matches_rfc_4648_vectors() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_encode(plain.as_bytes()), encoded);
    }
    assert_eq!(base64_encode(&[0xFF, 0xFE, 0xFD]), "//79");
}

#[test]
fn timestamps_are_srt_and_vtt_shaped() {
    assert_eq!(timestamp(0.0, ','), "00:00:00,000");
    assert_eq!(timestamp(3725.0456, '.'), "01:02:05.046");
}

#[tokio::test]
async fn an_audio_form_beyond_32_mib_is_an_openai_413() {
    let (_, app) = app(SimConfig::zero_latency());
    let big = vec![0u8; MAX_BODY_BYTES + 1];
    let (status, v) = send_json(
        &app,
        form(
            "/v1/audio/transcriptions",
            &[("model", None, M.as_bytes()), ("file", Some("a"), &big)],
        ),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        error_of(&v),
        ("invalid_request_error".into(), Value::Null, json!("request_too_large"))
    );
}
