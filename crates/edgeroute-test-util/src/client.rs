//! A minimal HTTP client for tests: one fresh connection per call, so a test controls exactly
//! when a connection goes away.

use std::net::SocketAddr;

use bytes::Bytes;
use edgeroute_proto::sse::{SseDecoder, SseEvent};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The OpenAI error `code`, for error replies.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or_default().to_owned()
    }
}

/// Sends one request on a new connection and returns the response head with a live body.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> hyper::Response<Incoming> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    sender.send_request(req).await.expect("send request")
}

fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("host", addr.to_string());
    if !body.is_empty() && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        b = b.header("content-type", "application/json");
    }
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body)).expect("request")
}

pub async fn collect(res: hyper::Response<Incoming>) -> Reply {
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    Reply { status, headers, body }
}

pub async fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    collect(send(addr, request("GET", addr, path, token, &[], Bytes::new())).await).await
}

pub async fn post_json(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    collect(send(addr, request("POST", addr, path, token, headers, body.into())).await).await
}

pub async fn method(
    addr: SocketAddr,
    m: &str,
    path: &str,
    token: Option<&str>,
    body: impl Into<Bytes>,
) -> Reply {
    collect(send(addr, request(m, addr, path, token, &[], body.into())).await).await
}

/// A streamed answer: the raw bytes as received and the decoded events.
#[derive(Debug)]
pub struct StreamReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub raw: Vec<u8>,
    pub events: Vec<SseEvent>,
}

impl StreamReply {
    /// The JSON payloads (everything but `[DONE]`).
    pub fn chunks(&self) -> Vec<serde_json::Value> {
        self.events
            .iter()
            .filter_map(|e| match e {
                SseEvent::Data(d) => Some(serde_json::from_slice(d).expect("chunk is JSON")),
                SseEvent::Done => None,
            })
            .collect()
    }

    /// The answer's text: every `delta.content` concatenated.
    pub fn text(&self) -> String {
        self.chunks()
            .iter()
            .filter_map(|c| {
                c.pointer("/choices/0/delta/content").and_then(|v| v.as_str()).map(str::to_owned)
            })
            .collect()
    }

    pub fn done(&self) -> bool {
        self.events.last() == Some(&SseEvent::Done)
    }

    /// The error event, if the stream ended with one.
    pub fn error(&self) -> Option<serde_json::Value> {
        self.chunks().into_iter().find(|c| c.get("error").is_some())
    }
}

/// Posts a streaming request and reads the whole stream.
pub async fn stream(
    addr: SocketAddr,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> StreamReply {
    let res =
        send(addr, request("POST", addr, "/v1/chat/completions", token, headers, body.into()))
            .await;
    read_stream(res).await
}

pub async fn read_stream(res: hyper::Response<Incoming>) -> StreamReply {
    let status = res.status();
    let headers = res.headers().clone();
    let mut body = res.into_body();
    let mut raw = Vec::new();
    let mut dec = SseDecoder::new(1 << 20);
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(d) = frame.into_data() {
            raw.extend_from_slice(&d);
            dec.push(&d);
            while let Ok(Some(e)) = dec.next_event() {
                events.push(e);
            }
        }
    }
    StreamReply { status, headers, raw, events }
}
