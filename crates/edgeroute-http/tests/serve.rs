//! The accept loop against real loopback sockets: every limit is exercised by a client that
//! breaks it, next to one that behaves.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use edgeroute_http::{ServerLimits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

fn app() -> Router {
    Router::new().route("/", get(|| async { "ok" })).route(
        "/slow-stream",
        get(|| async {
            // Three chunks, 100 ms apart: a response still in flight when shutdown starts.
            let s = futures_util::stream::unfold(0, |i| async move {
                if i == 3 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Ok::<_, std::io::Error>(format!("chunk{i};")), i + 1))
            });
            Body::from_stream(s)
        }),
    )
}

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(limits: ServerLimits) -> Server {
    start_tls(limits, None).await
}

async fn start_tls(limits: ServerLimits, tls: Option<tokio_rustls::TlsAcceptor>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, app(), limits, tls, async {
        let _ = rx.await;
    }));
    Server { addr, stop: Some(tx), task }
}

async fn get_ok(addr: std::net::SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// Reads until EOF or error; returns how long that took.
async fn time_to_close(s: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn slowloris_is_closed_at_header_timeout_while_normal_traffic_flows() {
    let limits =
        ServerLimits { header_read_timeout: Duration::from_millis(400), ..Default::default() };
    let srv = start(limits).await;

    let mut slow = TcpStream::connect(srv.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a").await.unwrap();
    let slow_task = tokio::spawn(async move {
        // Keep trickling header bytes, as a slowloris does, well past the timeout.
        let t = Instant::now();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b"a").await.is_err() {
                break;
            }
        }
        time_to_close(&mut slow, Duration::from_secs(5)).await;
        t.elapsed()
    });

    // Normal requests keep being served while the slow client hangs on.
    for _ in 0..5 {
        let r = get_ok(srv.addr).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed_after = slow_task.await.unwrap();
    assert!(closed_after >= Duration::from_millis(350), "closed too early: {closed_after:?}");
    assert!(
        closed_after < Duration::from_secs(3),
        "slowloris held the connection for {closed_after:?}"
    );
}

#[tokio::test]
async fn idle_keepalive_connection_is_closed() {
    let limits = ServerLimits { idle_timeout: Duration::from_millis(300), ..Default::default() };
    let srv = start(limits).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("HTTP/1.1 200"));
    let t = time_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(
        t >= Duration::from_millis(200) && t < Duration::from_secs(3),
        "idle close after {t:?}"
    );
}

/// Reads one `200 ok` answer from a keep-alive connection (the app's `/` answers `ok`).
async fn read_ok(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while !out.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("no answer within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(out).unwrap()
}

/// Short real timeouts with wide margins: the header timeout is 200 ms and the gaps between
/// requests are three times that.
fn keepalive_limits() -> ServerLimits {
    ServerLimits {
        header_read_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

#[tokio::test]
async fn idle_keepalive_connection_outlives_the_header_timeout_between_requests() {
    let srv = start(keepalive_limits()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for turn in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let r = read_ok(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "turn {turn}: {r}");
        // Idle between turns for three header timeouts: the connection must stay open.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

#[tokio::test]
async fn idle_h2_connection_outlives_the_header_timeout_between_requests() {
    let srv = start(keepalive_limits()).await;
    let tcp = TcpStream::connect(srv.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    for turn in 0..3 {
        let req = http::Request::get(format!("http://{}/", srv.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let res = send.send_request(req).await.unwrap_or_else(|e| panic!("turn {turn}: {e}"));
        assert_eq!(res.status(), 200, "turn {turn}");
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert!(!conn.is_finished(), "the HTTP/2 connection was closed while idle");
}

#[tokio::test]
async fn half_a_head_on_a_kept_alive_connection_is_closed_at_the_header_timeout() {
    let srv = start(keepalive_limits()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_ok(&mut s).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The next request starts and stalls: its head deadline runs from its first byte.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: a").await.unwrap();
    let t = time_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(t >= Duration::from_millis(150), "closed too early: {t:?}");
    assert!(t < Duration::from_secs(3), "half a head held the connection for {t:?}");
}

#[tokio::test]
async fn half_a_head_right_after_requests_is_closed_at_its_own_deadline() {
    // The watchdog is still asleep towards the deadline armed at accept when the stalled head
    // starts: it must take up the new deadline when it wakes, neither miss it nor fire early.
    let srv = start(keepalive_limits()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for turn in 0..5 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let r = read_ok(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "turn {turn}: {r}");
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: a").await.unwrap();
    let t = time_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(t >= Duration::from_millis(150), "closed at the earlier deadline: {t:?}");
    assert!(t < Duration::from_secs(3), "half a head held the connection for {t:?}");
}
#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
    let limits = keepalive_limits();
    let srv = start(limits).await;
    let mut silent = TcpStream::connect(srv.addr).await.unwrap();
    let t = time_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(t >= Duration::from_millis(150), "closed too early: {t:?}");
    assert!(t < Duration::from_secs(3), "a silent connection was held for {t:?}");
    // The same for one that sends the HTTP/2 preface and then no request.
    let mut preface_only = TcpStream::connect(srv.addr).await.unwrap();
    preface_only.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let t = time_to_close(&mut preface_only, Duration::from_secs(5)).await;
    assert!(t < Duration::from_secs(3), "a preface-only connection was held for {t:?}");
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let limits = ServerLimits { max_header_bytes: 8192, ..Default::default() };
    let srv = start(limits).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let big = "a".repeat(20_000);
    let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
}

/// A request with `n` headers (Host among them); the status line of the answer.
async fn status_with_headers(addr: std::net::SocketAddr, n: usize) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 1..n {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn more_headers_than_the_limit_get_431_at_the_default_and_at_a_set_count() {
    // The default (100) is hyper's own count; any other is passed to hyper.
    let srv = start(ServerLimits::default()).await;
    assert_eq!(status_with_headers(srv.addr, 99).await, "HTTP/1.1 200 OK");
    assert!(status_with_headers(srv.addr, 101).await.starts_with("HTTP/1.1 431"));
    let srv = start(ServerLimits { max_headers: 10, ..Default::default() }).await;
    assert_eq!(status_with_headers(srv.addr, 9).await, "HTTP/1.1 200 OK");
    assert!(status_with_headers(srv.addr, 11).await.starts_with("HTTP/1.1 431"));
    let srv = start(ServerLimits { max_headers: 150, ..Default::default() }).await;
    assert_eq!(status_with_headers(srv.addr, 140).await, "HTTP/1.1 200 OK");
    assert!(status_with_headers(srv.addr, 151).await.starts_with("HTTP/1.1 431"));
}

#[tokio::test]
async fn connection_cap_applies_backpressure() {
    let limits = ServerLimits {
        max_connections: 1,
        idle_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let srv = start(limits).await;
    // The first connection holds the only slot (keep-alive, idle).
    let mut first = TcpStream::connect(srv.addr).await.unwrap();
    first.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 512];
    let _ = first.read(&mut buf).await.unwrap();
    // The second is accepted by the kernel but not served until the first closes.
    let t = Instant::now();
    let second = tokio::spawn(async move { get_ok(srv.addr).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!second.is_finished(), "second connection was served beyond the cap");
    drop(first);
    let r = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap();
    assert!(r.starts_with("HTTP/1.1 200"));
    assert!(t.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn graceful_shutdown_finishes_inflight_stream_and_stops_accepting() {
    let limits = ServerLimits { shutdown_grace: Duration::from_secs(5), ..Default::default() };
    let mut srv = start(limits).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /slow-stream HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    srv.stop.take().unwrap().send(()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("chunk0;") && out.contains("chunk2;"), "stream cut: {out}");
    tokio::time::timeout(Duration::from_secs(5), srv.task).await.unwrap().unwrap();
    assert!(TcpStream::connect(srv.addr).await.is_err(), "still accepting after shutdown");
}

#[tokio::test]
async fn shutdown_grace_cuts_what_does_not_finish() {
    let limits = ServerLimits { shutdown_grace: Duration::from_millis(120), ..Default::default() };
    let mut srv = start(limits).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET /slow-stream HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let t = Instant::now();
    srv.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), srv.task).await.unwrap().unwrap();
    assert!(t.elapsed() < Duration::from_millis(290), "grace not enforced: {:?}", t.elapsed());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    assert!(!String::from_utf8_lossy(&out).contains("chunk2;"));
}

#[tokio::test]
async fn tls_serves_http1_and_h2_by_alpn() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("edgeroute-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cp, kp) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cp, cert.cert.pem()).unwrap();
    std::fs::write(&kp, cert.signing_key.serialize_pem()).unwrap();
    let acceptor = edgeroute_http::tls::acceptor_from_pem_files(&cp, &kp).unwrap();
    let srv = start_tls(ServerLimits::default(), Some(acceptor)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    for alpn in [b"h2".to_vec(), b"http/1.1".to_vec()] {
        let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn.clone()];
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
        let tcp = TcpStream::connect(srv.addr).await.unwrap();
        let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&alpn[..]));
        let io = hyper_util::rt::TokioIo::new(tls);
        let req = http::Request::get("https://localhost/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let res = if alpn == b"h2" {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        };
        assert_eq!(res.status(), 200);
    }
    // A plain-text client gets no response from a TLS port.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("200"));
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test]
async fn one_source_cannot_hold_more_than_its_share_of_connections() {
    let limits = ServerLimits { max_connections_per_source: 2, ..Default::default() };
    let srv = start(limits).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).await.unwrap() > 0, "served within the cap");
        held.push(s);
    }
    // A third from the same address is closed at accept, at once.
    let mut third = TcpStream::connect(srv.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(time_to_close(&mut third, Duration::from_secs(2)).await < Duration::from_secs(1));
    // A slot freed is a slot for the next connection (the table forgets closed ones).
    drop(held.pop());
    let t = Instant::now();
    loop {
        let mut s = TcpStream::connect(srv.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        if out.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
