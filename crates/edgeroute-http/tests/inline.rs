//! The inline HTTP/1.1 path against real loopback sockets: keep-alive, pipelining, framing,
//! cancellation, the hand-over to hyper, and the same answers as hyper's.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::{get, post};
use edgeroute_http::{ServerLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Set when the `/hang` handler's future is dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn app(dropped: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/echo",
            post(|body: Bytes| async move {
                format!("{}:{}", body.len(), String::from_utf8_lossy(&body))
            }),
        )
        .route(
            "/hang",
            get(move || {
                let flag = DropFlag(dropped.clone());
                async move {
                    let _flag = flag;
                    std::future::pending::<()>().await;
                    "never"
                }
            }),
        )
        .route(
            "/stream",
            get(|| async {
                let s = futures_util::stream::iter(["a", "bb", "", "ccc"]).then(|c| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, std::io::Error>(c)
                });
                Body::from_stream(s)
            }),
        )
        .route("/big", get(|| async { vec![b'x'; 100_000] }))
        .route(
            "/big-stream",
            get(|| async {
                let s = futures_util::stream::iter([vec![b'y'; 40_000], b"tail".to_vec()])
                    .map(Ok::<_, std::io::Error>);
                Body::from_stream(s)
            }),
        )
        .route("/empty", get(|| async { http::StatusCode::NO_CONTENT }))
        .route(
            // The body read by a task of its own, after a pause.
            "/echo-spawned",
            post(|body: Body| async move {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    axum::body::to_bytes(body, 1 << 20).await.unwrap().len().to_string()
                })
                .await
                .unwrap()
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                "done"
            }),
        )
}

use futures_util::StreamExt;

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    dropped: Arc<AtomicBool>,
    limits: ServerLimits,
}

async fn start(limits: ServerLimits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let dropped = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(serve(listener, app(dropped.clone()), limits.clone(), None, async {
        let _ = rx.await;
    }));
    Server { addr, stop: Some(tx), task, dropped, limits }
}

/// Sends `raw` in one write and reads until the server closes (each script ends with a
/// `connection: close` request), or until `limit`.
async fn exchange(addr: std::net::SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The answers without their `date` lines, which differ by the second.
fn undated(s: &str) -> String {
    s.split("\r\n").filter(|l| !l.starts_with("date: ")).collect::<Vec<_>>().join("\r\n")
}

const SCRIPT: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /stream HTTP/1.1\r\nHost: x\r\n\r\n\
GET /big-stream HTTP/1.1\r\nHost: x\r\n\r\n\
GET /empty HTTP/1.1\r\nHost: x\r\n\r\n\
GET /missing?q=1 HTTP/1.1\r\nHost: x\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n\
GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_as_hyper_answers_them() {
    let inline = start(ServerLimits::default()).await;
    let hyper = start(ServerLimits { http1_inline: false, ..Default::default() }).await;
    let a = exchange(inline.addr, SCRIPT).await;
    let b = exchange(hyper.addr, SCRIPT).await;
    assert_eq!(a.matches("HTTP/1.1 ").count(), 8, "{a}");
    assert!(a.contains("\r\n\r\n5:hello"), "{a}");
    assert!(a.contains("transfer-encoding: chunked\r\n"), "{a}");
    assert!(a.contains("1\r\na\r\n2\r\nbb\r\n3\r\nccc\r\n0\r\n\r\n"), "{a}");
    assert!(a.contains("9C40\r\n"), "a 40,000-byte chunk: {a:.300}");
    assert!(a.contains("HTTP/1.1 204 No Content\r\n"), "{a}");
    assert!(a.contains("HTTP/1.1 404 Not Found\r\n"), "{a}");
    assert!(a.contains("\r\n\r\n0:HTTP/1.1 200 OK"), "{a}");
    assert!(a.contains("date: "), "{a}");
    let (a, b) = (undated(&a), undated(&b));
    if a != b {
        let at = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
        let from = at.saturating_sub(80);
        panic!(
            "inline and hyper differ at byte {at}:\n inline: {:?}\n hyper:  {:?}",
            &a[from..(at + 80).min(a.len())],
            &b[from..(at + 80).min(b.len())]
        );
    }
}

#[tokio::test]
async fn a_large_answer_arrives_whole() {
    let srv = start(ServerLimits::default()).await;
    let out =
        exchange(srv.addr, b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(out.contains("content-length: 100000\r\n"), "{out:.300}");
    assert!(out.contains("connection: close\r\n"), "{out:.300}");
    assert_eq!(out.split("\r\n\r\n").nth(1).unwrap().len(), 100_000);
}

#[tokio::test]
async fn requests_the_inline_path_does_not_take_go_to_hyper_mid_connection() {
    let srv = start(ServerLimits::default()).await;
    // Served inline, then a chunked body (hyper's from here on), then a plain request.
    let out = exchange(
        srv.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi\
GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 4, "{out}");
    assert!(out.contains("3:abc") && out.contains("2:hi"), "{out}");
    // Both framings: hyper decides (the body is never read by its content-length).
    let out = exchange(
        srv.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\
POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(!out.contains("4:0\r\n"), "the body was read by its content-length: {out}");
}

#[tokio::test]
async fn a_body_that_arrives_in_pieces_is_read_whole() {
    let srv = start(ServerLimits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"cd").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"efGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.contains("6:abcdef"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
}

#[tokio::test]
async fn a_slow_body_reaches_the_service_as_it_comes_whatever_the_head_deadline() {
    let limits =
        ServerLimits { header_read_timeout: Duration::from_millis(200), ..Default::default() };
    let srv = start(limits).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab").await.unwrap();
    // The head came in time; the body is the service's to wait for (its own deadline).
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(b"cd").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&buf[..n]);
    assert!(out.contains("4:abcd"), "{out}");
    assert!(!out.contains("connection: close"), "{out}");
    assert_eq!(srv.limits.counters.head_timeout.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_body_larger_than_the_read_buffer_is_streamed_and_the_connection_kept() {
    let srv = start(ServerLimits::default()).await;
    let mut raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".to_vec();
    raw.extend(std::iter::repeat_n(b'z', 100_000));
    raw.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let out = exchange(srv.addr, &raw).await;
    assert!(out.contains("\r\n\r\n100000:zzz"), "{out:.300}");
    assert!(
        out.ends_with("\r\n\r\nok"),
        "the next request on the connection: {}",
        &out[out.len() - 200..]
    );
}

#[tokio::test]
async fn a_body_read_by_another_task_is_handed_over_when_it_asks() {
    let srv = start(ServerLimits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    // The head alone first, so the body is streamed; then all of it, before the task asks.
    s.write_all(b"POST /echo-spawned HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 30000\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    s.write_all(&[b'q'; 30_000]).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.ends_with("\r\n\r\n30000"), "{out}");
}

#[tokio::test]
async fn an_answer_given_before_the_body_was_read_closes_the_connection() {
    let srv = start(ServerLimits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    // `/` reads no body: the rest of this one would be taken for the next request.
    s.write_all(
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nGET /big HTTP/1.1\r\n\r\n",
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_ends_its_request() {
    let srv = start(ServerLimits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(s);
    // The server is still there for the next client.
    let out = exchange(srv.addr, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(out.ends_with("ok"), "{out}");
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_request() {
    let srv = start(ServerLimits::default()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!srv.dropped.load(Ordering::SeqCst));
    drop(s);
    for _ in 0..100 {
        if srv.dropped.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the handler of a closed connection still runs");
}

#[tokio::test]
async fn at_shutdown_a_busy_connection_closes_after_its_answer_and_says_so() {
    let limits = ServerLimits { shutdown_grace: Duration::from_secs(5), ..Default::default() };
    let mut srv = start(limits).await;
    let mut idle = TcpStream::connect(srv.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut busy = TcpStream::connect(srv.addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    srv.stop.take().unwrap().send(()).unwrap();
    // The idle connection closes at once.
    let n = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), busy.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\ndone"), "{out}");
    tokio::time::timeout(Duration::from_secs(5), srv.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn an_oversized_head_still_gets_hypers_431_and_is_counted() {
    let srv = start(ServerLimits::default()).await;
    let mut raw = b"GET / HTTP/1.1\r\nHost: x\r\nx-big: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 20_000));
    raw.extend_from_slice(b"\r\n\r\n");
    let out = exchange(srv.addr, &raw).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out:.200}");
    assert_eq!(srv.limits.counters.head_too_large.load(Ordering::Relaxed), 1);
    let out = exchange(srv.addr, b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out:.200}");
    assert_eq!(srv.limits.counters.malformed_head.load(Ordering::Relaxed), 1);
}
