//! The node's upstream client against raw TCP peers that behave as upstreams do: keep-alive,
//! closing idle connections, streaming, refusing.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use edgeroute_http::upstream::{Upstream, UpstreamOptions};
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

/// Reads one request head and its content-length body; false at end of stream.
async fn read_request(s: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return false,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0usize);
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.is_ok()
}

/// A keep-alive upstream answering every request; counts connections. With `close_after`,
/// it closes each connection after that many answers (an upstream's idle or request limit).
async fn upstream(close_after: Option<usize>) -> (String, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut served = 0;
                while read_request(&mut s).await {
                    if s.write_all(ANSWER).await.is_err() {
                        return;
                    }
                    served += 1;
                    if close_after == Some(served) {
                        return;
                    }
                }
            });
        }
    });
    (url, conns)
}

fn post(url: &str) -> Request<Full<Bytes>> {
    Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
        .unwrap()
}

async fn call(client: &Upstream, url: &str) -> Bytes {
    let res = client.send(post(url)).await.unwrap();
    assert_eq!(res.status(), 200);
    res.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let (url, conns) = upstream(None).await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    for _ in 0..20 {
        assert_eq!(&call(&client, &url).await[..], b"{\"ok\":true}");
    }
    assert_eq!(client.connections_opened(), 1);
    assert_eq!(conns.load(Ordering::SeqCst), 1);
    assert_eq!(client.idle(), 1);
}

#[tokio::test]
async fn concurrent_requests_each_get_a_connection_and_all_return() {
    let (url, _) = upstream(None).await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let calls = (0..8).map(|_| {
        let (c, u) = (client.clone(), url.clone());
        tokio::spawn(async move { call(&c, &u).await })
    });
    for c in calls {
        c.await.unwrap();
    }
    let opened = client.connections_opened();
    assert!((1..=8).contains(&opened), "{opened}");
    assert_eq!(client.idle() as u64, opened);
    call(&client, &url).await;
    assert_eq!(client.connections_opened(), opened, "the pooled ones are reused");
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_replaced_without_an_error() {
    let (url, conns) = upstream(Some(1)).await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    for i in 0..10 {
        call(&client, &url).await;
        if i % 2 == 0 {
            // Sometimes the close has arrived before the next request, sometimes not: both
            // must end in a fresh connection, never in an error.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(conns.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn idle_connections_expire_and_are_capped() {
    let (url, _) = upstream(None).await;
    let opts = UpstreamOptions { idle_timeout: Duration::from_millis(50), ..Default::default() };
    let client = Upstream::new(&url.parse().unwrap(), opts).unwrap();
    call(&client, &url).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    call(&client, &url).await;
    assert_eq!(client.connections_opened(), 2, "the expired one was not reused");

    let capped =
        Upstream::new(&url.parse().unwrap(), UpstreamOptions { max_idle: 2, ..Default::default() })
            .unwrap();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (c, u) = (capped.clone(), url.clone());
            tokio::spawn(async move { call(&c, &u).await })
        })
        .collect();
    for c in calls {
        c.await.unwrap();
    }
    assert!(capped.idle() <= 2, "{}", capped.idle());
}

#[tokio::test]
async fn an_abandoned_stream_closes_its_connection() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        read_request(&mut s).await;
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        s.write_all(b"d\r\ndata: token\n\n\r\n").await.unwrap();
        // The client goes away: the next read sees the end of the connection.
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        closed_tx.send(matches!(n, Ok(Ok(0)) | Ok(Err(_)))).ok();
    });
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let mut body = client.send(post(&url)).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: token\n\n");
    drop(body);
    assert!(closed_rx.await.unwrap(), "the upstream saw the connection close");
    assert_eq!(client.idle(), 0);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let err = client.send(post(&url)).await.unwrap_err();
    assert!(err.is_connect(), "{err}");
}

#[test]
fn only_plain_http_origins_are_taken() {
    let opts = UpstreamOptions::default;
    assert!(Upstream::new(&"https://x:1".parse().unwrap(), opts()).is_err());
    assert!(Upstream::new(&"/v1".parse().unwrap(), opts()).is_err());
    assert!(Upstream::new(&"http://[::1]:8000/v1".parse().unwrap(), opts()).is_ok());
}
