//! The node's upstream client against raw TCP peers that behave as upstreams do: keep-alive,
//! closing idle connections, streaming, refusing.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use edgeroute_http::upstream::{Upstream, UpstreamBody, UpstreamOptions};
use http::Request;
use http_body_util::BodyExt;
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

fn post(url: &str) -> Request<Bytes> {
    Request::post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Bytes::from_static(b"{\"model\":\"m\"}"))
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

/// An upstream whose `i`-th connection (from 0) is served by `script(i, stream)`; counts the
/// requests that reached it whole.
async fn scripted<F, Fut>(script: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(usize, TcpStream, Arc<AtomicUsize>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        let mut i = 0;
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(script(i, s, seen.clone()));
            i += 1;
        }
    });
    (url, requests)
}

#[tokio::test]
async fn a_reused_connection_closed_as_the_request_went_out_is_retried_once_on_a_fresh_one() {
    // Connection 0 answers once, then takes the next request and closes without a byte of
    // answer (an upstream's keep-alive timeout firing as the request arrives).
    let (url, requests) = scripted(|i, mut s, seen| async move {
        while read_request(&mut s).await {
            seen.fetch_add(1, Ordering::SeqCst);
            if i == 0 && seen.load(Ordering::SeqCst) == 2 {
                return;
            }
            s.write_all(ANSWER).await.unwrap();
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    assert_eq!(&call(&client, &url).await[..], b"{\"ok\":true}");
    assert_eq!(&call(&client, &url).await[..], b"{\"ok\":true}", "retried, no error");
    assert_eq!(client.connections_opened(), 2);
    assert_eq!(requests.load(Ordering::SeqCst), 3);

    // A fresh connection that ends without an answer is an error, and the request went once.
    let (url, requests) = scripted(|_, mut s, seen| async move {
        if read_request(&mut s).await {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let err = client.send(post(&url)).await.unwrap_err();
    assert!(matches!(err, edgeroute_http::upstream::UpstreamError::Closed), "{err}");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_one_retry_goes_to_a_fresh_connection_not_to_another_stale_one() {
    // Every connection answers its first request (slowly, so two calls need two connections)
    // and closes on its second without answering.
    let (url, requests) = scripted(|_, mut s, seen| async move {
        let mut served = 0;
        while read_request(&mut s).await {
            seen.fetch_add(1, Ordering::SeqCst);
            if served == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.write_all(ANSWER).await.unwrap();
            served += 1;
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let (a, b) = tokio::join!(call(&client, &url), call(&client, &url));
    assert_eq!((&a[..], &b[..]), (&b"{\"ok\":true}"[..], &b"{\"ok\":true}"[..]));
    assert_eq!(client.idle(), 2, "two pooled connections, both about to fail");
    assert_eq!(&call(&client, &url).await[..], b"{\"ok\":true}");
    assert_eq!(requests.load(Ordering::SeqCst), 4, "one stale attempt, then one fresh one");
    assert_eq!(client.connections_opened(), 3);
}

/// An upstream answering every request with "hello world", chunked, written in pieces split
/// inside the chunk framing, 5 ms apart.
async fn chunked_in_pieces() -> String {
    let (url, _) = scripted(|_, mut s, _| async move {
        while read_request(&mut s).await {
            for piece in [
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r"[..],
                b"\nhel",
                b"lo\r\n6\r\n world\r\n0\r\n",
                b"x-trailer: 1\r\n\r\n",
            ] {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
    .await;
    url
}

#[tokio::test]
async fn a_chunked_answer_written_in_pieces_arrives_whole_and_its_connection_is_reused() {
    let url = chunked_in_pieces().await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    for _ in 0..3 {
        assert_eq!(&call(&client, &url).await[..], b"hello world");
    }
    assert_eq!(client.connections_opened(), 1);
}

/// A body read with `poll_read_into` (as the SSE path reads one): the bytes joined, how many
/// calls appended bytes, and the error that ended it, if one did.
async fn read_into(mut body: UpstreamBody) -> (Vec<u8>, usize, Option<std::io::Error>) {
    let (mut out, mut calls) = (BytesMut::new(), 0);
    loop {
        match std::future::poll_fn(|cx| body.poll_read_into(cx, &mut out, 1 << 20)).await {
            Ok(true) => calls += 1,
            Ok(false) => return (out.to_vec(), calls, None),
            Err(e) => return (out.to_vec(), calls, Some(e)),
        }
    }
}

#[tokio::test]
async fn a_body_read_into_one_buffer_is_joined_delivered_before_its_failure_and_pooled() {
    // A chunked answer in pieces with pauses: joined without its framing, the connection
    // reused after its end.
    let url = chunked_in_pieces().await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    for _ in 0..3 {
        let (body, calls, err) =
            read_into(client.send(post(&url)).await.unwrap().into_body()).await;
        assert_eq!((&body[..], err.is_none()), (&b"hello world"[..], true));
        assert!((1..=3).contains(&calls), "a call per arrival with data: {calls}");
    }
    assert_eq!(client.connections_opened(), 1);

    // Everything sent at once is taken in one call.
    let (url, _) = scripted(|_, mut s, _| async move {
        if read_request(&mut s).await {
            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n2\r\nbc\r\n3\r\ndef\r\n0\r\n\r\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let res = client.send(post(&url)).await.unwrap();
    assert_eq!(read_into(res.into_body()).await.0, b"abcdef");
    assert_eq!(client.idle(), 1);

    // Short of its content-length, then the close: the bytes that came, then the error.
    let (url, _) = scripted(|_, mut s, _| async move {
        if read_request(&mut s).await {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\nonly ten b").await.unwrap();
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let (body, _, err) = read_into(client.send(post(&url)).await.unwrap().into_body()).await;
    assert_eq!(&body[..], b"only ten b");
    assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::UnexpectedEof));
    assert_eq!(client.idle(), 0);

    // Broken chunk framing after some data: the data, then an invalid-data error.
    let (url, _) = scripted(|_, mut s, _| async move {
        if read_request(&mut s).await {
            let _ = s
                .write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
                )
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let (body, _, err) = read_into(client.send(post(&url)).await.unwrap().into_body()).await;
    assert_eq!(&body[..], b"abc");
    assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::InvalidData));
    assert_eq!(client.idle(), 0);

    // Delimited by the close: everything, then the end, and the connection is not kept.
    let (url, _) = scripted(|_, mut s, _| async move {
        if read_request(&mut s).await {
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\nuntil the close").await.unwrap();
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let (body, _, err) = read_into(client.send(post(&url)).await.unwrap().into_body()).await;
    assert_eq!((&body[..], err.is_none()), (&b"until the close"[..], true));
    assert_eq!(client.idle(), 0);
}

#[tokio::test]
async fn answers_delimited_by_the_close_or_broken_are_never_pooled() {
    // HTTP/1.0, no length: the body is everything until the close.
    let (url, _) = scripted(|_, mut s, _| async move {
        if read_request(&mut s).await {
            s.write_all(b"HTTP/1.0 503 Service Unavailable\r\nretry-after: 2\r\n\r\nbusy, later")
                .await
                .unwrap();
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let res = client.send(post(&url)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "2");
    assert_eq!(&res.into_body().collect().await.unwrap().to_bytes()[..], b"busy, later");
    assert_eq!(client.idle(), 0);

    // Fewer bytes than the content-length, then the close: an error, not a short answer.
    let (url, _) = scripted(|_, mut s, _| async move {
        if read_request(&mut s).await {
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\nonly ten b").await.unwrap();
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let res = client.send(post(&url)).await.unwrap();
    assert!(res.into_body().collect().await.is_err());
    assert_eq!(client.idle(), 0);

    // Smuggling-shaped framing is refused before any body is read.
    let (url, _) = scripted(|_, mut s, _| async move {
        if read_request(&mut s).await {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 30\r\n\r\nabc")
                .await;
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let err = client.send(post(&url)).await.unwrap_err();
    assert!(matches!(err, edgeroute_http::upstream::UpstreamError::Protocol(_)), "{err}");
}

#[tokio::test]
async fn a_large_request_body_arrives_intact() {
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(Some(tx));
    let (url, _) = scripted(move |_, mut s, _| {
        let tx = tx.lock().unwrap().take();
        async move {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            let text = String::from_utf8(head).unwrap();
            assert!(
                text.starts_with("POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:"),
                "{text}"
            );
            let len: usize = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            let mut body = vec![0; len];
            s.read_exact(&mut body).await.unwrap();
            s.write_all(ANSWER).await.unwrap();
            if let Some(tx) = tx {
                tx.send(body).unwrap();
            }
        }
    })
    .await;
    let client = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let req =
        Request::post(format!("{url}/v1/chat/completions")).body(Bytes::from(big.clone())).unwrap();
    let res = client.send(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(rx.await.unwrap(), big);
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
fn only_http_and_https_origins_are_taken() {
    let opts = UpstreamOptions::default;
    assert!(Upstream::new(&"ftp://x:1".parse().unwrap(), opts()).is_err());
    assert!(Upstream::new(&"https://x:1".parse().unwrap(), opts()).is_ok());
    assert!(Upstream::new(&"/v1".parse().unwrap(), opts()).is_err());
    assert!(Upstream::new(&"http://[::1]:8000/v1".parse().unwrap(), opts()).is_ok());
}

/// A private CA, and certificates it signs, written as PEM files under a scratch directory.
struct Pki {
    dir: std::path::PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("edgeroute-upstream-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{tag} CA"));
        std::fs::write(dir.join("ca.pem"), params.self_signed(&key).unwrap().pem()).unwrap();
        Pki { dir, issuer: rcgen::Issuer::new(params, key) }
    }

    /// (certificate, key) paths of a leaf for `names`.
    fn leaf(&self, name: &str, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = rcgen::CertificateParams::new(names).unwrap().signed_by(&key, &self.issuer);
        let (c, k) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.unwrap().pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// An https upstream whose certificate `pki` signed for `localhost`; with `client_ca`, it
/// requires a client certificate from that CA (mutual TLS). Answers every request.
async fn tls_upstream(pki: &Pki, client_ca: Option<&Pki>) -> String {
    use rustls_pki_types::pem::PemObject;
    let (cert, key) = pki.leaf("server", &["localhost"]);
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pki_types::CertificateDer::pem_file_iter(ca.dir.join("ca.pem")).unwrap()
            {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let cfg = builder.with_single_cert(chain, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}", l.local_addr().unwrap().port());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if !matches!(s.read(&mut byte).await, Ok(1)) {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = s.write_all(ANSWER).await;
                let _ = s.flush().await;
                let mut rest = [0u8; 64];
                let _ = s.read(&mut rest).await;
            });
        }
    });
    url
}

fn get(url: &str) -> Request<Bytes> {
    Request::get(format!("{url}/v1/models")).body(Bytes::new()).unwrap()
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_ca() {
    let pki = Pki::new("tls");
    let url = tls_upstream(&pki, None).await;
    let tls = edgeroute_http::upstream::UpstreamTls {
        ca_file: Some(pki.dir.join("ca.pem")),
        ..Default::default()
    };
    let opts = UpstreamOptions { tls: Some(tls.client_config().unwrap()), ..Default::default() };
    let client = Upstream::new(&url.parse().unwrap(), opts).unwrap();
    let res = client.send(get(&url)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(&res.into_body().collect().await.unwrap().to_bytes()[..], b"{\"ok\":true}");

    // Another CA's roots (or the public ones) do not trust it: nothing is sent.
    let stranger = Pki::new("tls-stranger");
    let tls = edgeroute_http::upstream::UpstreamTls {
        ca_file: Some(stranger.dir.join("ca.pem")),
        ..Default::default()
    };
    let opts = UpstreamOptions { tls: Some(tls.client_config().unwrap()), ..Default::default() };
    let untrusting = Upstream::new(&url.parse().unwrap(), opts).unwrap();
    let err = untrusting.send(get(&url)).await.unwrap_err();
    assert!(matches!(err, edgeroute_http::upstream::UpstreamError::Tls { .. }), "{err:?}");
    let public = Upstream::new(&url.parse().unwrap(), UpstreamOptions::default()).unwrap();
    assert!(public.send(get(&url)).await.is_err());
}

#[tokio::test]
async fn a_mutual_tls_upstream_serves_only_the_gateway_holding_its_certificate() {
    let pki = Pki::new("mtls");
    let url = tls_upstream(&pki, Some(&pki)).await;
    let ca = Some(pki.dir.join("ca.pem"));
    let (cert, key) = pki.leaf("gateway", &["gateway.edgeroute"]);
    let with_cert = edgeroute_http::upstream::UpstreamTls {
        ca_file: ca.clone(),
        cert_file: Some(cert),
        key_file: Some(key),
    };
    let opts =
        UpstreamOptions { tls: Some(with_cert.client_config().unwrap()), ..Default::default() };
    let client = Upstream::new(&url.parse().unwrap(), opts).unwrap();
    assert_eq!(client.send(get(&url)).await.unwrap().status(), 200);

    // Without a client certificate, or with one from another CA, the upstream answers nothing.
    let bare = edgeroute_http::upstream::UpstreamTls { ca_file: ca.clone(), ..Default::default() };
    let opts = UpstreamOptions { tls: Some(bare.client_config().unwrap()), ..Default::default() };
    let anonymous = Upstream::new(&url.parse().unwrap(), opts).unwrap();
    assert!(anonymous.send(get(&url)).await.is_err());
    let stranger = Pki::new("mtls-stranger");
    let (cert, key) = stranger.leaf("intruder", &["gateway.edgeroute"]);
    let forged = edgeroute_http::upstream::UpstreamTls {
        ca_file: ca,
        cert_file: Some(cert),
        key_file: Some(key),
    };
    let opts = UpstreamOptions { tls: Some(forged.client_config().unwrap()), ..Default::default() };
    let intruder = Upstream::new(&url.parse().unwrap(), opts).unwrap();
    assert!(intruder.send(get(&url)).await.is_err());

    let half = edgeroute_http::upstream::UpstreamTls {
        cert_file: Some(pki.dir.join("gateway.pem")),
        ..Default::default()
    };
    assert!(half.client_config().is_err(), "a certificate without its key is a config error");
}
