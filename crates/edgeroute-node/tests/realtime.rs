//! `GET /v1/realtime` on the node (issue 19): who may open a session (and who may not), a turn
//! through the simulator in process and through an upstream's WebSocket, time to first audio
//! in `/metrics`, the migrate event and the close at the drain's deadline, and every limit.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::sync::Arc;
use std::time::Duration;

use edgeroute_auth::Scope;
use edgeroute_sim::{SimConfig, Simulator};
use edgeroute_test_util::{TestNode, get, spawn_router};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};

type Ws = WebSocketStream<TcpStream>;

const SIM: &str = "[backend]\nkind = \"sim\"\n[backend.sim]\nseed = 5\ntokens_per_s = 2000.0\n";

/// Opens `/v1/realtime?{query}` with these extra headers: the socket, or the HTTP status the
/// node refused the upgrade with (and its `x-edgeroute-migrate`, if any).
async fn open(
    node: &TestNode,
    query: &str,
    headers: &[(&str, String)],
) -> Result<(Ws, http::HeaderMap), (u16, Option<String>, String)> {
    let url = format!("ws://{}/v1/realtime?{query}", node.addr);
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    match tokio_tungstenite::client_async(req, tcp).await {
        Ok((ws, res)) => Ok((ws, res.headers().clone())),
        Err(Error::Http(res)) => {
            let hint =
                res.headers().get("x-edgeroute-migrate").map(|v| v.to_str().unwrap().to_owned());
            let body = res.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
            Err((res.status().as_u16(), hint, body.unwrap_or_default()))
        }
        Err(e) => panic!("handshake: {e}"),
    }
}

fn bearer(t: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {t}"))
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an event within 10 s")
            .expect("the session is open")
            .expect("a frame");
        if let Message::Text(t) = m {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

async fn until(ws: &mut Ws, kind: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let v = next(ws).await;
        let done = v["type"] == kind;
        seen.push(v);
        if done {
            return seen;
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// A text turn: the answer's transcript and every event of it.
async fn turn(ws: &mut Ws, text: &str) -> (String, Vec<Value>) {
    send(
        ws,
        json!({"type": "conversation.item.create", "item": {"type": "message",
        "role": "user", "content": [{"type": "input_text", "text": text}]}}),
    )
    .await;
    send(ws, json!({"type": "response.create"})).await;
    let events = until(ws, "response.done").await;
    let done = events.last().unwrap();
    assert_eq!(done["response"]["status"], "completed", "{done}");
    let said = done["response"]["output"][0]["content"][0]["transcript"].as_str().unwrap();
    (said.to_owned(), events)
}

/// How the node closed the session.
async fn closed_with(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => return (f.code, f.reason.to_string()),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn the_upgrade_takes_an_inference_token_and_refuses_everyone_else() {
    let node = TestNode::start(SIM).await;
    let q = "model=sim-llama";
    assert_eq!(open(&node, q, &[]).await.unwrap_err().0, 401, "no token");
    let forged = bearer("eyJhbGciOiJub25lIn0.e30.");
    assert_eq!(open(&node, q, &[forged]).await.unwrap_err().0, 401, "a forged token");
    let admin_only = node.token_for("ops", &[Scope::Admin], 600);
    let wrong = open(&node, q, &[bearer(&admin_only)]).await.unwrap_err();
    assert_eq!(wrong.0, 403, "an admin token has no inference scope");
    let expired = node.token_for("tenant-a", &[Scope::Inference], -60);
    assert_eq!(open(&node, q, &[bearer(&expired)]).await.unwrap_err().0, 401, "expired");
    // In a subprotocol, as a browser sends it: forged refused, real accepted.
    let sub =
        |t: &str| ("sec-websocket-protocol", format!("realtime, openai-insecure-api-key.{t}"));
    assert_eq!(open(&node, q, &[sub("x.y.z")]).await.unwrap_err().0, 401);
    let (mut ws, h) = open(&node, q, &[sub(&node.token())]).await.unwrap();
    assert_eq!(h["sec-websocket-protocol"], "realtime");
    assert_eq!(h["x-edgeroute-node"], "test-1");
    assert_eq!(next(&mut ws).await["type"], "session.created");
    // The request itself: no model, an unknown one, not an upgrade.
    let token = node.token();
    let (status, _, body) = open(&node, "", &[bearer(&token)]).await.unwrap_err();
    assert_eq!(status, 400);
    assert!(body.contains("\"param\":\"model\""), "{body}");
    let (status, _, body) = open(&node, "model=nope", &[bearer(&token)]).await.unwrap_err();
    assert_eq!(status, 404);
    assert!(body.contains("model_not_found"), "{body}");
    let plain = get(node.addr, "/v1/realtime?model=sim-llama", Some(&token)).await;
    assert_eq!(plain.status, 400);
    assert_eq!(plain.json()["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn a_turn_through_the_node_and_its_time_to_first_audio() {
    let node = TestNode::start(SIM).await;
    let (mut ws, _) = open(&node, "model=sim-llama", &[bearer(&node.token())]).await.unwrap();
    let created = next(&mut ws).await;
    assert_eq!(created["session"]["model"], "sim-llama");
    let (said, events) = turn(&mut ws, "Hello, node.").await;
    assert!(!said.is_empty());
    assert!(events.iter().any(|e| e["type"] == "response.audio.delta"), "audio came back");
    // A binary frame is refused with an event; the session goes on.
    ws.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert_eq!(next(&mut ws).await["error"]["code"], "invalid_frame");
    let (again, _) = turn(&mut ws, "Once more.").await;
    assert!(!again.is_empty());
    let m = String::from_utf8(get(node.addr, "/metrics", None).await.body.to_vec()).unwrap();
    let ttfa = "edgeroute_node_first_byte_seconds_count{route=\"realtime\"} 2";
    assert!(m.contains(ttfa), "{ttfa} in\n{m}");
    let opened = "edgeroute_node_requests_total{route=\"realtime\",status=\"101\"} 1";
    assert!(m.contains(opened), "{opened}");
}

#[tokio::test]
async fn a_draining_node_sends_one_migrate_event_then_closes_at_its_deadline() {
    let node = TestNode::start(SIM).await;
    let token = node.token();
    let (mut ws, _) = open(&node, "model=sim-llama", &[bearer(&token)]).await.unwrap();
    next(&mut ws).await;
    let r = node.admin_post("/admin/drain", r#"{"deadline_ms": 800, "to": "tor-2"}"#).await;
    assert!(r.status.is_success());
    let hint = until(&mut ws, "edgeroute.migrate").await.pop().unwrap();
    assert_eq!(hint["reason"], "drain");
    assert_eq!(hint["to"], "tor-2");
    assert!(hint["deadline_ms"].as_u64().unwrap() <= 800);
    // New sessions are refused, with the hint, while the open one is served to its deadline.
    let (status, migrate, _) = open(&node, "model=sim-llama", &[bearer(&token)]).await.unwrap_err();
    assert_eq!(status, 503);
    assert!(migrate.unwrap().contains("reason=drain"));
    let (said, _) = turn(&mut ws, "Still there?").await;
    assert!(!said.is_empty());
    let (code, reason) = closed_with(&mut ws).await;
    assert_eq!(u16::from(code), 1012, "{reason}");
}

#[tokio::test]
async fn an_unloaded_model_asks_its_sessions_to_move() {
    let node = TestNode::start(&format!("{SIM}[models]\nunload_drain_ms = 600\n")).await;
    let (mut ws, _) = open(&node, "model=sim-llama", &[bearer(&node.token())]).await.unwrap();
    next(&mut ws).await;
    let r = node.admin_post("/v1/models/unload", r#"{"model": "sim-llama"}"#).await;
    assert!(r.status.is_success(), "{}", String::from_utf8_lossy(&r.body));
    let hint = until(&mut ws, "edgeroute.migrate").await.pop().unwrap();
    assert_eq!(hint["reason"], "unload");
    assert_eq!(hint["model"], "sim-llama");
    // The session holds the model until its deadline, then is closed to move.
    assert_eq!(u16::from(closed_with(&mut ws).await.0), 1012);
}

#[tokio::test]
async fn sessions_events_and_silence_are_bounded() {
    let limits = "[limits]\nmax_realtime_sessions = 2\ntenant_max_share = 0.5\n\
        max_realtime_event_bytes = 65536\nrealtime_idle_timeout_ms = 600\n";
    let node = TestNode::start(&format!("{SIM}{limits}")).await;
    let a = node.token();
    let b = node.token_for("tenant-b", &[Scope::Inference], 600);
    let c = node.token_for("tenant-c", &[Scope::Inference], 600);
    let (mut first, _) = open(&node, "model=sim-llama", &[bearer(&a)]).await.unwrap();
    // One tenant holds at most its share (one of two).
    let (status, _, body) = open(&node, "model=sim-llama", &[bearer(&a)]).await.unwrap_err();
    assert_eq!(status, 429);
    assert!(body.contains("tenant_realtime_sessions_exceeded"), "{body}");
    let (_second, _) = open(&node, "model=sim-llama", &[bearer(&b)]).await.unwrap();
    // The node is full: another tenant is told to go elsewhere.
    let (status, migrate, _) = open(&node, "model=sim-llama", &[bearer(&c)]).await.unwrap_err();
    assert_eq!(status, 503);
    assert!(migrate.unwrap().contains("reason=overload"));
    // An event over the limit closes the session with 1009; its seat is free again.
    next(&mut first).await;
    let big = json!({"type": "input_audio_buffer.append", "audio": "A".repeat(70_000)});
    send(&mut first, big).await;
    assert_eq!(u16::from(closed_with(&mut first).await.0), 1009);
    drop(first);
    let t = std::time::Instant::now();
    let mut third = loop {
        match open(&node, "model=sim-llama", &[bearer(&c)]).await {
            Ok((ws, _)) => break ws,
            Err(_) if t.elapsed() < Duration::from_secs(3) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the seat was never given back: {e:?}"),
        }
    };
    // Silence: closed after the idle timeout.
    next(&mut third).await;
    let (code, reason) = closed_with(&mut third).await;
    assert_eq!(u16::from(code), 1000);
    assert!(reason.contains("idle"), "{reason}");
    let m = String::from_utf8(get(node.addr, "/metrics", None).await.body.to_vec()).unwrap();
    for reason in ["realtime_full", "tenant_concurrency", "realtime_event_too_large"] {
        assert!(m.contains(&format!("reason=\"{reason}\"")), "{reason} counted");
    }
}

#[tokio::test]
async fn an_upstream_that_speaks_realtime_is_proxied_under_its_own_model_name() {
    let cfg = SimConfig { seed: 5, tokens_per_s: 2000.0, ..SimConfig::default() };
    let sim = Arc::new(Simulator::new(cfg).unwrap());
    let up = spawn_router(edgeroute_sim::server::router(sim.clone())).await;
    let backend = format!(
        "[backend]\nkind = \"openai\"\nurl = \"{}\"\nfirst_byte_timeout_ms = 2000\n\
         [[backend.models]]\nid = \"my-voice\"\nupstream_name = \"sim-llama\"\n",
        up.url()
    );
    let node = TestNode::start(&backend).await;
    let (mut ws, _) = open(&node, "model=my-voice", &[bearer(&node.token())]).await.unwrap();
    let created = next(&mut ws).await;
    assert_eq!(created["session"]["model"], "sim-llama", "the upstream's own name");
    let (said, _) = turn(&mut ws, "Through the upstream.").await;
    assert!(!said.is_empty());
    // The upstream gone: a new session is a 502 the client fails over on, not a hang.
    drop(ws);
    drop(up);
    let (status, _, _) = open(&node, "model=my-voice", &[bearer(&node.token())]).await.unwrap_err();
    assert!(status == 502 || status == 503, "{status}");
}
