//! The load generator against tiny in-test servers: counts, coordinated omission, SSE
//! timing, broken streams, timeouts, and the loopback-only policy.

// Helpers outside #[test] bodies unwrap too: clippy.toml's allow-unwrap-in-tests only
// covers the test functions themselves, and a panic here is still a failed test.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use edgeroute_lab::loadgen::{self, LoadSpec, LoadgenError, Mode, chat_body};

async fn spawn_server(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .await
            .unwrap();
    });
    addr
}

fn spec(addr: SocketAddr, mode: Mode, rate: f64, duration_ms: u64) -> LoadSpec {
    let body = chat_body("sim-llama", "hi", 4, mode).unwrap();
    let mut s = LoadSpec::new(format!("http://{addr}"), body, mode, rate);
    s.duration = Duration::from_millis(duration_ms);
    s.warmup = Duration::ZERO;
    s.connections = 4;
    s.request_timeout = Duration::from_secs(5);
    s
}

const JSON_ANSWER: &str = r#"{"id":"c","object":"chat.completion","created":0,"model":"sim-llama","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;

fn json_ok() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], JSON_ANSWER).into_response()
}

fn chunk(content: &str) -> String {
    format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{content:?}}},\"finish_reason\":null}}]}}\n\n"
    )
}

/// An SSE body: each frame after its delay; optionally a transport error at the end.
fn sse(frames: Vec<(u64, String)>, break_at_end: bool) -> Response {
    let mut items: Vec<(u64, Result<Bytes, std::io::Error>)> =
        frames.into_iter().map(|(d, f)| (d, Ok(Bytes::from(f)))).collect();
    if break_at_end {
        // After a pause, so that the head and the frames are on the wire before the reset.
        items.push((30, Err(std::io::Error::other("connection reset"))));
    }
    let stream = futures_util::stream::unfold(items.into_iter(), |mut it| async move {
        let (delay, item) = it.next()?;
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        Some((item, it))
    });
    ([(header::CONTENT_TYPE, "text/event-stream")], Body::from_stream(stream)).into_response()
}

#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    peers: Mutex<HashSet<SocketAddr>>,
    auth: Mutex<Vec<String>>,
    bodies_ok: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_requests_and_reuses_a_fixed_pool_of_connections() {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(
                |State(seen): State<Arc<Seen>>,
                 ConnectInfo(peer): ConnectInfo<SocketAddr>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    seen.requests.fetch_add(1, Ordering::Relaxed);
                    seen.peers.lock().unwrap().insert(peer);
                    if let Some(a) = headers.get(header::AUTHORIZATION) {
                        seen.auth.lock().unwrap().push(a.to_str().unwrap().to_owned());
                    }
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    if v["model"] == "sim-llama" {
                        seen.bodies_ok.fetch_add(1, Ordering::Relaxed);
                    }
                    json_ok()
                },
            ),
        )
        .with_state(seen.clone());
    let addr = spawn_server(app).await;

    let mut s = spec(addr, Mode::Json, 200.0, 500);
    s.warmup = Duration::from_millis(100);
    s.bearer = Some("tok123".into());
    // This test is about counting and connection reuse, not timer precision: on 2 cores
    // shared with the rest of the suite a start may slip a few ms; 50 ms still catches a
    // scheduler that falls behind (5 ms between intended starts at 200 req/s).
    s.late_threshold = Duration::from_millis(50);
    let report = loadgen::run(&s).await.unwrap();

    // 20 warm-up requests (excluded) and 100 measured ones, all served.
    assert_eq!(seen.requests.load(Ordering::Relaxed), 120);
    assert_eq!(seen.bodies_ok.load(Ordering::Relaxed), 120);
    assert_eq!(report.scheduled, 100);
    assert_eq!(report.ok, 100, "{report:?}");
    assert_eq!(report.errors.total(), 0);
    assert_eq!(report.late_starts, 0);
    assert_eq!(report.latency.len(), 100);
    assert!(report.ttft_percentiles().is_none());
    assert!(report.sustained());
    let achieved = report.achieved_rate();
    assert!((150.0..=230.0).contains(&achieved), "achieved {achieved}");
    assert!(seen.peers.lock().unwrap().len() <= 4, "more connections than the pool");
    let auth = seen.auth.lock().unwrap();
    assert_eq!(auth.len(), 120);
    assert!(auth.iter().all(|a| a == "Bearer tok123"));
}

/// The point of an open-loop generator: when the server is slower than the offered rate,
/// the queueing shows up as latency measured from the intended send time, and every
/// scheduled request is still accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_shows_up_as_latency_not_as_fewer_samples() {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            json_ok()
        }),
    );
    let addr = spawn_server(app).await;
    // 2 connections × 20 req/s each = 40 req/s of capacity, offered 100 req/s.
    let mut s = spec(addr, Mode::Json, 100.0, 300);
    s.connections = 2;
    let started = Instant::now();
    let report = loadgen::run(&s).await.unwrap();
    let elapsed = started.elapsed();

    assert_eq!(report.scheduled, 30);
    assert_eq!(report.ok, 30, "{report:?}");
    let p = report.latency_percentiles();
    let min = report.latency.min();
    assert!(min >= 50_000, "min latency {min} µs is below the server's 50 ms");
    // The last request is intended at 290 ms and served at about 750 ms.
    assert!(p.max >= 350_000, "max latency {} µs hides the queue", p.max);
    assert!(p.p50 >= 150_000, "p50 {} µs hides the queue", p.p50);
    assert!(report.late_starts > 10, "late starts {}", report.late_starts);
    assert!(!report.sustained());
    assert!(report.achieved_rate() < 60.0, "achieved {}", report.achieved_rate());
    assert!(elapsed >= Duration::from_millis(700), "ran {elapsed:?}");
    // Queueing for a connection is the generator's start delay too.
    assert!(report.start_delay.max() >= 300_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_time_to_first_token_and_to_done() {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
            sse(
                vec![
                    (0, role.to_owned()),
                    (30, chunk("Hel")),
                    (30, chunk("lo")),
                    (30, "data: [DONE]\n\n".to_owned()),
                ],
                false,
            )
        }),
    );
    let addr = spawn_server(app).await;
    let report = loadgen::run(&spec(addr, Mode::Stream, 20.0, 500)).await.unwrap();
    assert_eq!(report.ok, 10, "{report:?}");
    let ttft = report.ttft_percentiles().unwrap();
    let total = report.latency_percentiles();
    assert_eq!(ttft.count, 10);
    // The role frame has empty content and must not count as the first token.
    assert!(ttft.p50 >= 30_000 && ttft.p50 < 80_000, "ttft p50 {} µs", ttft.p50);
    assert!(total.p50 >= 90_000, "total p50 {} µs", total.p50);
    assert!(total.p50 >= ttft.p50 + 50_000);
}

/// `Mode::Bytes` on another path and content type (speech): time to the first body byte, then
/// to the end; an empty body is truncated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_stream_on_another_path_is_timed_to_its_first_byte_and_its_end() {
    let app = Router::new()
        .route(
            "/v1/audio/speech",
            post(|headers: HeaderMap| async move {
                if headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
                    != Some("application/x-test")
                {
                    return StatusCode::UNSUPPORTED_MEDIA_TYPE.into_response();
                }
                let items = vec![(30, "RIFF....".to_owned()), (40, "audio".to_owned())];
                let stream = futures_util::stream::unfold(items.into_iter(), |mut it| async move {
                    let (delay, item) = it.next()?;
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    Some((Ok::<_, std::io::Error>(Bytes::from(item)), it))
                });
                ([(header::CONTENT_TYPE, "audio/wav")], Body::from_stream(stream)).into_response()
            }),
        )
        .route("/v1/empty", post(|| async { ([(header::CONTENT_TYPE, "audio/wav")], "") }));
    let addr = spawn_server(app).await;
    let mut s = spec(addr, Mode::Bytes, 20.0, 500);
    s.path = Some("/v1/audio/speech".into());
    s.content_type = Some("application/x-test".into());
    let report = loadgen::run(&s).await.unwrap();
    assert_eq!(report.ok, 10, "{report:?}");
    let first = report.ttft_percentiles().unwrap();
    let total = report.latency_percentiles();
    assert!(first.p50 >= 30_000 && first.p50 < 65_000, "first byte p50 {} µs", first.p50);
    assert!(total.p50 >= first.p50 + 35_000, "total p50 {} µs", total.p50);
    let probe = loadgen::probe_spec(&s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(&probe.body[..], b"RIFF....audio");

    s.path = Some("/v1/empty".into());
    let report = loadgen::run(&s).await.unwrap();
    assert_eq!((report.ok, report.errors.truncated), (0, 10), "{report:?}");
    s.path = Some("v1/empty".into());
    assert!(matches!(loadgen::run(&s).await, Err(LoadgenError::InvalidSpec(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_and_bad_statuses_are_errors_by_kind() {
    let app = Router::new()
        .route(
            "/no-done/v1/chat/completions",
            post(|| async { sse(vec![(0, chunk("a")), (0, chunk("b"))], false) }),
        )
        .route("/reset/v1/chat/completions", post(|| async { sse(vec![(0, chunk("a"))], true) }))
        .route(
            "/error-event/v1/chat/completions",
            post(|| async {
                sse(
                    vec![
                        (0, chunk("a")),
                        (
                            0,
                            "event: error\ndata: {\"error\":{\"message\":\"upstream died\"}}\n\n"
                                .into(),
                        ),
                        (0, "data: [DONE]\n\n".into()),
                    ],
                    false,
                )
            }),
        )
        .route(
            "/status/v1/chat/completions",
            post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "busy").into_response() }),
        );
    let addr = spawn_server(app).await;
    let run = |path: &'static str, mode| async move {
        let mut s = spec(addr, mode, 50.0, 200);
        s.url = format!("http://{addr}/{path}");
        loadgen::run(&s).await.unwrap()
    };

    let r = run("no-done", Mode::Stream).await;
    assert_eq!((r.ok, r.errors.truncated, r.errors.total()), (0, 10, 10), "{r:?}");
    let r = run("reset", Mode::Stream).await;
    assert_eq!((r.ok, r.errors.truncated, r.errors.total()), (0, 10, 10), "{r:?}");
    let r = run("error-event", Mode::Stream).await;
    assert_eq!((r.ok, r.errors.stream_error, r.errors.total()), (0, 10, 10), "{r:?}");
    let r = run("status", Mode::Json).await;
    assert_eq!((r.ok, r.errors.status, r.errors.total()), (0, 10, 10), "{r:?}");
    assert_eq!(r.errors.statuses.get(&503), Some(&10));
    assert!(r.latency.is_empty());

    // probe() reports what the server said.
    let body = chat_body("sim-llama", "hi", 4, Mode::Json).unwrap();
    let err = loadgen::probe(
        &format!("http://{addr}/status"),
        None,
        body,
        Mode::Json,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("HTTP 503") && text.contains("busy"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_close_connections_cost_reconnects_not_errors() {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            let mut r = json_ok();
            r.headers_mut().insert(header::CONNECTION, "close".parse().unwrap());
            r
        }),
    );
    let addr = spawn_server(app).await;
    let r = loadgen::run(&spec(addr, Mode::Json, 100.0, 300)).await.unwrap();
    assert_eq!((r.ok, r.errors.total()), (30, 0), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_server_is_bounded_by_timeouts_and_the_deadline() {
    let app = Router::new().route(
        "/v1/chat/completions",
        post(|| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            json_ok()
        }),
    );
    let addr = spawn_server(app).await;
    let mut s = spec(addr, Mode::Json, 50.0, 200);
    s.connections = 1;
    s.request_timeout = Duration::from_millis(200);
    let started = Instant::now();
    let r = loadgen::run(&s).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "ran {:?}", started.elapsed());
    assert_eq!(r.ok, 0);
    assert!(r.errors.timeout >= 1, "{r:?}");
    assert!(r.errors.unsent >= 1, "{r:?}");
    assert_eq!(r.errors.timeout + r.errors.unsent, 10, "every scheduled request is accounted for");
}

#[tokio::test]
async fn refuses_targets_that_are_not_loopback() {
    for url in ["http://192.0.2.10:8080", "http://10.1.2.3", "http://example.com:80"] {
        let s = LoadSpec::new(url, Bytes::new(), Mode::Json, 10.0);
        let err = loadgen::run(&s).await.unwrap_err();
        assert!(matches!(err, LoadgenError::NotLoopback { .. }), "{url}: {err}");
        let err = loadgen::probe(url, None, Bytes::new(), Mode::Json, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, LoadgenError::NotLoopback { .. }), "{url}: {err}");
    }
}

#[tokio::test]
async fn connect_failures_are_counted() {
    // Bind then drop: nothing listens on this port afterwards.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let r = loadgen::run(&spec(addr, Mode::Json, 50.0, 100)).await.unwrap();
    assert_eq!((r.ok, r.errors.connect), (0, 5), "{r:?}");
}
