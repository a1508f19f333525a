//! The request path under hostile load: bodies have a deadline and a node-wide budget taken
//! before a byte is read, one tenant cannot hold every slot, requests beyond the ceilings are
//! precise 400s, only known fields reach the backend, and every refusal is counted by reason.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_test_util::fake_upstream::{Behaviour, FakeUpstream};
use edgeroute_test_util::{TestNode, get, post_json, spawn_router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: &str =
    r#"{"model":"sim-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#;

/// Sends a chat request head declaring `len` body bytes and `first` of them; the rest never
/// comes. Returns the connection.
async fn slow_body(node: &TestNode, len: usize, first: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
        node.token()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    s
}

/// Reads the status line and the whole head of an answer.
async fn read_head(s: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn rejected(node: &TestNode, reason: &str) -> u64 {
    let m = String::from_utf8_lossy(&get(node.addr, "/metrics", None).await.body).into_owned();
    let key = format!("edgeroute_node_rejected_total{{reason=\"{reason}\"}} ");
    m.lines().find_map(|l| l.strip_prefix(&key)).map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_trickled_body_is_cut_at_its_deadline_with_a_408_and_others_are_served() {
    let node = TestNode::start("[limits]\nbody_read_timeout_ms = 300\n").await;
    let mut slow = slow_body(&node, 1000, b"{\"model\":").await;
    let t = Instant::now();
    // Meanwhile a well-behaved request is served at once.
    assert_eq!(node.chat(CHAT).await.status, 200);
    let head = read_head(&mut slow, Duration::from_secs(3)).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("x-edgeroute-error: side=network; retry=yes"), "{head}");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(2), "{took:?}");
    assert_eq!(rejected(&node, "body_timeout").await, 1);
}

#[tokio::test]
async fn bodies_need_room_in_their_tenants_share_of_the_budget_and_a_declared_oversize_is_413_unread()
 {
    let node = TestNode::start(
        "[limits]\nmax_body_bytes = 65536\nmax_buffered_body_bytes = 200000\nbody_read_timeout_ms = 600\n",
    )
    .await;
    // The test tenant's slow 60 kB body holds 60 kB of its 100 kB share while it trickles.
    let mut slow = slow_body(&node, 60_000, b"{").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let big = format!(
        r#"{{"model":"sim-llama","messages":[{{"role":"user","content":"{}"}}],"max_tokens":4}}"#,
        "a".repeat(50_000)
    );
    let r = node.chat(big.clone()).await;
    assert_eq!((r.status.as_u16(), r.error_code()), (503, "body_budget_exhausted".to_owned()));
    assert_eq!(r.header("retry-after"), Some("1"));
    // A small body of the same tenant still fits, and another tenant's large one too.
    assert_eq!(node.chat(CHAT).await.status, 200);
    let other = node.token_for("other", &[Scope::Inference], 600);
    let r = post_json(node.addr, "/v1/chat/completions", Some(&other), &[], big.clone()).await;
    assert_eq!(r.status, 200);
    // When the slow one is cut, its room comes back.
    assert!(read_head(&mut slow, Duration::from_secs(3)).await.starts_with("HTTP/1.1 408"));
    assert_eq!(node.chat(big).await.status, 200);
    assert_eq!(rejected(&node, "body_budget").await, 1);

    // A Content-Length over the limit is refused before the body is read.
    let mut s = slow_body(&node, 10_000_000, b"").await;
    let head = read_head(&mut s, Duration::from_secs(2)).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(rejected(&node, "body_too_large").await, 1);
}

#[tokio::test]
async fn one_tenant_cannot_hold_every_slot() {
    // Four slots, half for one tenant; each answer takes a second.
    let node = TestNode::start(
        "[limits]\nmax_concurrency = 4\ntenant_max_share = 0.5\n[backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 1000\n[[backend.sim.gpus]]\nid = \"gpu0\"\nslots = 8\n",
    )
    .await;
    let greedy = node.token_for("greedy", &[Scope::Inference], 600);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (addr, token) = (node.addr, greedy.clone());
            tokio::spawn(async move {
                post_json(addr, "/v1/chat/completions", Some(&token), &[], CHAT).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let r = post_json(node.addr, "/v1/chat/completions", Some(&greedy), &[], CHAT).await;
    assert!(t.elapsed() < Duration::from_millis(300), "refused at once, not queued");
    assert_eq!(
        (r.status.as_u16(), r.error_code()),
        (429, "tenant_concurrency_exceeded".to_owned())
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    // Another tenant is served beside it.
    let other = node.token_for("polite", &[Scope::Inference], 600);
    let r = post_json(node.addr, "/v1/chat/completions", Some(&other), &[], CHAT).await;
    assert_eq!(r.status, 200);
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    // Its slots came back with its answers.
    assert_eq!(
        post_json(node.addr, "/v1/chat/completions", Some(&greedy), &[], CHAT).await.status,
        200
    );
    assert_eq!(rejected(&node, "tenant_concurrency").await, 1);
}

#[tokio::test]
async fn requests_beyond_the_ceilings_are_400s_naming_the_field() {
    let node =
        TestNode::start("[limits]\nmax_n = 2\nmax_output_tokens = 100\nmax_messages = 3\n").await;
    let cases = [
        (r#""n":3"#, "n"),
        (r#""max_tokens":101"#, "max_tokens"),
        (r#""max_completion_tokens":101"#, "max_completion_tokens"),
    ];
    for (field, param) in cases {
        let body = format!(
            r#"{{"model":"sim-llama","messages":[{{"role":"user","content":"hi"}}],{field}}}"#
        );
        let r = node.chat(body).await;
        assert_eq!(r.status, 400, "{field}");
        assert_eq!(r.json()["error"]["param"], param, "{field}");
    }
    let four = r#"{"role":"user","content":"hi"}"#;
    let body = format!(r#"{{"model":"sim-llama","messages":[{four},{four},{four},{four}]}}"#);
    let r = node.chat(body).await;
    assert_eq!((r.status.as_u16(), r.json()["error"]["param"].clone()), (400, "messages".into()));
    assert_eq!(rejected(&node, "over_ceiling").await, 4);
}

#[tokio::test]
async fn only_openai_fields_and_the_operators_extras_reach_an_upstream() {
    let fake = FakeUpstream::new(Behaviour::Echo);
    let up = spawn_router(fake.router()).await;
    let node = TestNode::start(&format!(
        "[backend]\nkind = \"openai\"\nurl = \"{}\"\nextra_fields = [\"top_k\"]\n[[backend.models]]\nid = \"my-llama\"\n",
        up.url()
    ))
    .await;
    let body = r#"{"model":"my-llama","messages":[{"role":"user","content":"hi"}],"user":"u1","top_k":5,"chat_template":"{{ evil }}","guided_grammar":"x"}"#;
    let r = node.chat(body).await;
    assert_eq!(r.status, 200);
    let seen = r.json();
    assert_eq!(seen["user"], "u1");
    assert_eq!(seen["top_k"], 5);
    assert!(seen.get("chat_template").is_none() && seen.get("guided_grammar").is_none(), "{seen}");
    let m = String::from_utf8_lossy(&get(node.addr, "/metrics", None).await.body).into_owned();
    assert!(m.contains("edgeroute_node_request_fields_dropped_total 2"), "{m}");
    // A request with nothing to drop is forwarded byte for byte.
    let clean = r#"{"model":"my-llama",   "messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(node.chat(clean).await.body, clean.as_bytes());
}

#[tokio::test]
async fn the_transports_refusals_count_too() {
    let node =
        TestNode::start("[limits]\nheader_read_timeout_ms = 300\nmax_connections_per_source = 3\n")
            .await;
    // A head over 16 KiB: hyper's 431.
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let big = format!("GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
    let _ = s.write_all(big.as_bytes()).await;
    assert!(read_head(&mut s, Duration::from_secs(2)).await.starts_with("HTTP/1.1 431"));
    // A head that is not HTTP: hyper's 400.
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    assert!(read_head(&mut s, Duration::from_secs(2)).await.starts_with("HTTP/1.1 400"));
    // Silence: closed at the head deadline.
    let mut silent = TcpStream::connect(node.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), silent.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "closed, not answered");
    // Over the per-source cap: closed at accept.
    let held: Vec<TcpStream> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(node.addr).await.unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            assert!(read_head(&mut c, Duration::from_secs(2)).await.starts_with("HTTP/1.1 200"));
            v.push(c);
        }
        v
    };
    let mut over = TcpStream::connect(node.addr).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), over.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    drop(held);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for reason in ["head_too_large", "malformed_head", "head_timeout", "source_cap"] {
        assert!(rejected(&node, reason).await >= 1, "{reason}");
    }
    // A second scrape does not count again.
    assert_eq!(rejected(&node, "head_too_large").await, 1);
}
