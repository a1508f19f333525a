//! A stand-in for the `edgeroute` binary with the same command line, for testing the gateway
//! benchmark's orchestration without the real node:
//!
//! - `sim --listen ADDR --zero-latency`: `GET /health` and an OpenAI-compatible
//!   `POST /v1/chat/completions` (JSON, or SSE when `"stream": true`); the voice surface's
//!   shapes: `/v1/embeddings`, `/v1/completions`, `/v1/audio/transcriptions` (a multipart
//!   body with a `file` part) and `/v1/audio/speech` (a WAV in two chunks).
//! - `node --config FILE`: reads the benchmark's gateway config, checks the bearer token and
//!   forwards to `[backend].url`, streaming the answer through.
//! - `token mint --secret-file FILE --sub S --scope SC`: prints a token `node` accepts.
//!
//! It is a test double, not a reference: no JWT, no limits, no routing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use bytes::Bytes;
use edgeroute_proto::chat::{ChatCompletionRequest, ChunkBuilder, FinishReason, Usage};
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Deserialize;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, hyper::Error>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn flag(args: &[String], name: &str) -> anyhow::Result<String> {
    let i = args.iter().position(|a| a == name).with_context(|| format!("missing {name}"))?;
    args.get(i + 1).cloned().with_context(|| format!("{name} needs a value"))
}

fn token_for(secret_file: &Path) -> anyhow::Result<String> {
    let secret =
        std::fs::read(secret_file).with_context(|| format!("reading {}", secret_file.display()))?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("fake.{hex}"))
}

async fn serve<F, Fut>(listen: SocketAddr, handler: F) -> anyhow::Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind(listen).await.with_context(|| format!("bind {listen}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn sim(req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == "/health" {
        return full(StatusCode::OK, "text/plain", "ok");
    }
    match req.uri().path() {
        "/v1/chat/completions" => {}
        "/v1/embeddings" | "/v1/completions" | "/v1/audio/transcriptions" | "/v1/audio/speech" => {
            return surface(req).await;
        }
        _ => {
            return full(
                StatusCode::NOT_FOUND,
                "application/json",
                r#"{"error":{"message":"no route"}}"#,
            );
        }
    }
    let Ok(body) = req.into_body().collect().await else {
        return full(
            StatusCode::BAD_REQUEST,
            "application/json",
            r#"{"error":{"message":"body"}}"#,
        );
    };
    let chat: ChatCompletionRequest = match serde_json::from_slice(&body.to_bytes()) {
        Ok(c) => c,
        Err(e) => {
            let msg = serde_json::json!({"error": {"message": e.to_string()}});
            return full(StatusCode::BAD_REQUEST, "application/json", msg.to_string());
        }
    };
    let n = chat.token_limit().unwrap_or(16);
    let b = ChunkBuilder {
        id: "chatcmpl-fake".into(),
        created: 0,
        model: chat.model.clone(),
        include_usage: chat.include_usage(),
    };
    let usage = Usage::new(8, n);
    if !chat.stream {
        let text = "tok ".repeat(n as usize);
        let json = serde_json::to_vec(&b.completion(text, FinishReason::Length, usage));
        return match json {
            Ok(j) => full(StatusCode::OK, "application/json", j),
            Err(_) => full(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", "encode"),
        };
    }
    // Zero latency: the whole stream in one body, as fast as it can be written.
    let mut out = String::new();
    let mut chunks = vec![b.role()];
    chunks.extend((0..n).map(|_| b.content("tok ")));
    chunks.push(b.finish(FinishReason::Length));
    chunks.extend(b.usage(usage));
    for c in chunks {
        if let Ok(j) = serde_json::to_string(&c) {
            out.push_str("data: ");
            out.push_str(&j);
            out.push_str("\n\n");
        }
    }
    out.push_str("data: [DONE]\n\n");
    full(StatusCode::OK, "text/event-stream", out)
}

/// The endpoints beside chat, in OpenAI's shapes, at once.
async fn surface(req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Ok(body) = req.into_body().collect().await else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "body");
    };
    let body = body.to_bytes();
    let bad = |m: &str| {
        let msg = serde_json::json!({"error": {"message": m}});
        full(StatusCode::BAD_REQUEST, "application/json", msg.to_string())
    };
    if path == "/v1/audio/transcriptions" {
        let has_file = body.windows(11).any(|w| w == b"name=\"file\"");
        if !ct.starts_with("multipart/form-data; boundary=") || !has_file {
            return bad("a multipart form with a file part");
        }
        return full(StatusCode::OK, "application/json", r#"{"text":"Fake words heard."}"#);
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return bad("not JSON");
    };
    match path.as_str() {
        "/v1/embeddings" => {
            let out = serde_json::json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}], "model": v["model"]});
            full(StatusCode::OK, "application/json", out.to_string())
        }
        "/v1/completions" => {
            let out = serde_json::json!({"object": "text_completion", "choices": [{"index": 0, "text": "tok tok", "finish_reason": "length"}], "model": v["model"]});
            full(StatusCode::OK, "application/json", out.to_string())
        }
        _ => {
            // A WAV header and 100 ms of silence at 24 kHz, in two chunks.
            let mut wav = b"RIFF".to_vec();
            wav.extend_from_slice(&(36u32 + 4800).to_le_bytes());
            wav.extend_from_slice(b"WAVEfmt ");
            for x in [
                16u32.to_le_bytes(),
                [1, 0, 1, 0],
                24_000u32.to_le_bytes(),
                48_000u32.to_le_bytes(),
                [2, 0, 16, 0],
            ] {
                wav.extend_from_slice(&x);
            }
            wav.extend_from_slice(b"data");
            wav.extend_from_slice(&4800u32.to_le_bytes());
            let chunks = [Bytes::from(wav), Bytes::from(vec![0u8; 4800])];
            let stream = futures_util::stream::iter(
                chunks.map(|c| Ok::<_, hyper::Error>(hyper::body::Frame::data(c))),
            );
            let mut resp = Response::new(BodyExt::boxed(http_body_util::StreamBody::new(stream)));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("audio/wav"));
            resp
        }
    }
}

#[derive(Deserialize)]
struct NodeConfig {
    node: NodeSection,
    backend: BackendSection,
    auth: AuthSection,
}

#[derive(Deserialize)]
struct NodeSection {
    listen: SocketAddr,
}

#[derive(Deserialize)]
struct BackendSection {
    kind: String,
    url: String,
    models: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

#[derive(Deserialize)]
struct AuthSection {
    hs256_secret_file: PathBuf,
}

struct Proxy {
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: String,
    expected: String,
}

async fn proxy(p: Arc<Proxy>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
    if path != "/health" {
        let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if auth != Some(p.expected.as_str()) {
            return full(
                StatusCode::UNAUTHORIZED,
                "application/json",
                r#"{"error":{"message":"bad token"}}"#,
            );
        }
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "body");
    };
    let mut up = Request::builder().method(parts.method).uri(format!("{}{path}", p.upstream));
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        up = up.header(header::CONTENT_TYPE, ct);
    }
    let Ok(up) = up.body(Full::new(body.to_bytes())) else {
        return full(StatusCode::BAD_REQUEST, "text/plain", "request");
    };
    match p.client.request(up).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => full(StatusCode::BAD_GATEWAY, "text/plain", e.to_string()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("sim") => {
            if !args.iter().any(|a| a == "--zero-latency") {
                bail!("the fake sim only supports --zero-latency");
            }
            let listen: SocketAddr = flag(&args, "--listen")?.parse()?;
            serve(listen, sim).await
        }
        Some("node") => {
            let path = flag(&args, "--config")?;
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            let cfg: NodeConfig = toml::from_str(&text).context("parsing the node config")?;
            if cfg.backend.kind != "openai" || cfg.backend.models.iter().all(|m| m.id.is_empty()) {
                bail!("the fake node needs an openai backend with at least one model");
            }
            let p = Arc::new(Proxy {
                client: Client::builder(TokioExecutor::new()).build_http(),
                upstream: cfg.backend.url.trim_end_matches('/').to_owned(),
                expected: format!("Bearer {}", token_for(&cfg.auth.hs256_secret_file)?),
            });
            serve(cfg.node.listen, move |req| proxy(p.clone(), req)).await
        }
        Some("token") if args.get(1).map(String::as_str) == Some("mint") => {
            let secret = flag(&args, "--secret-file")?;
            let sub = flag(&args, "--sub")?;
            let scope = flag(&args, "--scope")?;
            if sub.is_empty() || scope != "inference" {
                bail!("unexpected --sub {sub:?} / --scope {scope:?}");
            }
            println!("{}", token_for(Path::new(&secret))?);
            Ok(())
        }
        _ => bail!("usage: fake-edgeroute sim|node|token mint ..."),
    }
}
