//! Open-loop, constant-rate HTTP/1.1 load generator for `POST /v1/chat/completions` (or any
//! other POST endpoint: [`LoadSpec::path`], [`LoadSpec::content_type`]).
//!
//! Request `i` is *intended* at `t0 + i / rate`, and every latency is measured from that
//! intended time, not from when a connection happened to be free. A server that stalls
//! therefore shows up as high latency on every request scheduled during the stall, rather
//! than as fewer, fast samples (coordinated omission). The schedule is paced by a plain OS
//! thread with `nanosleep` precision, because tokio's timer has millisecond granularity and
//! would add up to 1 ms of bias to latencies measured in microseconds.
//!
//! Each connection is a worker task that owns one keep-alive HTTP/1.1 connection (hyper's
//! connection-level client, so the pool size is exact). A worker takes the next due request
//! as soon as it is free; a request that finds every connection busy at its intended time
//! starts late and is counted as a *late start*: the rate was not sustained.
//!
//! What it does not do: TLS, HTTP/2, retries of requests the server saw, or any target that
//! is not loopback (this machine's policy: load goes to loopback only).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgeroute_proto::chat::{ChatCompletionRequest, ChatMessage, Role};
use hdrhistogram::Histogram;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, TryAcquireError};
use tokio::task::JoinHandle;

/// The path every request goes to, appended to the target's base URL.
pub const CHAT_PATH: &str = "/v1/chat/completions";

/// Histogram range: 1 µs to 10 minutes, 3 significant digits.
const HIST_MAX_US: u64 = 600_000_000;
const HIST_SIGFIG: u8 = 3;

/// A request that found every connection busy is a late start once it is this far behind.
pub const DEFAULT_LATE_THRESHOLD: Duration = Duration::from_millis(1);

/// An SSE line longer than this is treated as a broken stream rather than buffered forever.
const MAX_SSE_LINE: usize = 1 << 20;

/// The longest the pacer sleeps at once, so that a cancelled run stops it promptly.
const PACER_MAX_NAP: Duration = Duration::from_millis(10);

/// Errors that stop a run before or while it starts. Per-request failures are not errors
/// of the run: they are counted in [`ErrorCounts`].
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("invalid target URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error(
        "refusing to send load to {host:?}: only loopback targets (127.0.0.0/8, ::1, localhost) are allowed"
    )]
    NotLoopback { host: String },
    #[error("invalid load spec: {0}")]
    InvalidSpec(String),
    #[error("probe of {url} failed ({kind}): {detail}")]
    Probe { url: String, kind: ErrorKind, detail: String },
    #[error("load generator internal error: {0}")]
    Internal(String),
}

/// How responses are read and timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// `"stream": false`: latency is the time to the end of the JSON body.
    Json,
    /// `"stream": true` (SSE): time to first content frame (TTFT) and to `data: [DONE]`.
    Stream,
    /// `GET` of the URL's own path and query (no body): time to the end of the answer. For
    /// servers other than the gateway, e.g. discovery's `/v1/discover?...`.
    Get,
    /// A streamed answer of any type (speech audio): time to its first body byte (recorded
    /// as the TTFT) and to its end. An empty answer is truncated.
    Bytes,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Json => "json",
            Mode::Stream => "stream",
            Mode::Get => "get",
            Mode::Bytes => "bytes",
        })
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Mode::Json),
            "stream" => Ok(Mode::Stream),
            "get" => Ok(Mode::Get),
            "bytes" => Ok(Mode::Bytes),
            other => Err(format!("unknown mode {other:?} (expected json or stream)")),
        }
    }
}

/// Why a request did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connection could not be (re)established.
    Connect,
    /// The server answered with a non-2xx status.
    Status,
    /// The connection failed before a response head arrived.
    Io,
    /// No complete answer within the request timeout of the send.
    Timeout,
    /// The body ended or broke early; for SSE, the stream ended without `data: [DONE]`.
    Truncated,
    /// The SSE stream carried an error event, an error object or an unparseable frame.
    StreamError,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Status => "status",
            ErrorKind::Io => "io",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Truncated => "truncated",
            ErrorKind::StreamError => "stream-error",
        })
    }
}

/// Failed requests by kind, measured window only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorCounts {
    pub connect: u64,
    pub status: u64,
    pub io: u64,
    pub timeout: u64,
    pub truncated: u64,
    pub stream_error: u64,
    /// Requests still queued when the run's deadline passed: never sent, and a failure all
    /// the same (dropping them silently would hide a stalled server).
    pub unsent: u64,
    /// The non-2xx statuses behind `status`.
    pub statuses: BTreeMap<u16, u64>,
}

impl ErrorCounts {
    pub fn total(&self) -> u64 {
        self.connect
            + self.status
            + self.io
            + self.timeout
            + self.truncated
            + self.stream_error
            + self.unsent
    }

    fn count(&mut self, failure: &Failure) {
        match failure {
            Failure::Connect => self.connect += 1,
            Failure::Status(code) => {
                self.status += 1;
                *self.statuses.entry(*code).or_default() += 1;
            }
            Failure::Io => self.io += 1,
            Failure::Timeout => self.timeout += 1,
            Failure::Truncated => self.truncated += 1,
            Failure::StreamError => self.stream_error += 1,
        }
    }

    fn add(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.status += other.status;
        self.io += other.io;
        self.timeout += other.timeout;
        self.truncated += other.truncated;
        self.stream_error += other.stream_error;
        self.unsent += other.unsent;
        for (code, n) in &other.statuses {
            *self.statuses.entry(*code).or_default() += n;
        }
    }

    /// A short human summary, e.g. `status 503×3, timeout×1`; empty when there were none.
    pub fn breakdown(&self) -> String {
        let mut parts = Vec::new();
        for (code, n) in &self.statuses {
            parts.push(format!("status {code}×{n}"));
        }
        for (name, n) in [
            ("connect", self.connect),
            ("io", self.io),
            ("timeout", self.timeout),
            ("truncated", self.truncated),
            ("stream-error", self.stream_error),
            ("unsent", self.unsent),
        ] {
            if n > 0 {
                parts.push(format!("{name}×{n}"));
            }
        }
        parts.join(", ")
    }
}

/// One load run against one target.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Base URL of the target, e.g. `http://127.0.0.1:8080`; [`CHAT_PATH`] is appended
    /// unless the URL already ends with it (or `path` says otherwise). Must be loopback.
    pub url: String,
    /// The request's path (origin form, e.g. `/v1/embeddings`) instead of the URL's path and
    /// [`CHAT_PATH`]. `None`: chat.
    pub path: Option<String>,
    /// The body's `Content-Type` (a multipart upload's with its boundary). `None`:
    /// `application/json`.
    pub content_type: Option<String>,
    /// Request body, sent as is (see [`chat_body`]).
    pub body: Bytes,
    pub mode: Mode,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub bearer: Option<String>,
    /// Intended requests per second.
    pub rate: f64,
    /// Length of the measured schedule.
    pub duration: Duration,
    /// Schedule run before the measured part and excluded from the results.
    pub warmup: Duration,
    /// Number of keep-alive connections (= the most requests in flight).
    pub connections: usize,
    /// Per-request limit, from the moment the request is sent.
    pub request_timeout: Duration,
    /// A request that found every connection busy counts as a late start once it starts
    /// more than this after its intended time.
    pub late_threshold: Duration,
}

impl LoadSpec {
    /// A spec with the defaults used by the benchmarks: 10 s measured after 2 s of warm-up,
    /// 32 connections, 10 s request timeout, 1 ms late threshold.
    pub fn new(url: impl Into<String>, body: Bytes, mode: Mode, rate: f64) -> Self {
        LoadSpec {
            url: url.into(),
            path: None,
            content_type: None,
            body,
            mode,
            bearer: None,
            rate,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            connections: 32,
            request_timeout: Duration::from_secs(10),
            late_threshold: DEFAULT_LATE_THRESHOLD,
        }
    }
}

/// A chat completion request body for `model` with one user message.
pub fn chat_body(
    model: &str,
    prompt: &str,
    max_tokens: u32,
    mode: Mode,
) -> Result<Bytes, serde_json::Error> {
    let mut req = ChatCompletionRequest::new(model, vec![ChatMessage::new(Role::User, prompt)]);
    req.max_tokens = Some(max_tokens);
    req.stream = mode == Mode::Stream;
    serde_json::to_vec(&req).map(Bytes::from)
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// The outcome of one run (or of several runs merged), measured window only.
#[derive(Clone)]
pub struct LoadReport {
    pub url: String,
    pub mode: Mode,
    /// Intended requests per second.
    pub rate: f64,
    pub connections: usize,
    /// Requests scheduled in the measured window(s).
    pub scheduled: u64,
    pub ok: u64,
    pub errors: ErrorCounts,
    /// Requests that started more than `late_threshold` after their intended time because
    /// every connection was busy. Non-zero means the rate was not sustained.
    pub late_starts: u64,
    /// Time from the first measured intended send to the last measured completion, summed
    /// over merged runs.
    pub active: Duration,
    /// Full-response latency from the intended send time (µs); for SSE, to `data: [DONE]`.
    pub latency: Histogram<u64>,
    /// SSE only: time from the intended send to the first frame with content (µs).
    pub ttft: Histogram<u64>,
    /// How far behind schedule requests started (µs): pacing jitter plus queueing for a
    /// connection. This is the generator's own contribution to `latency`.
    pub start_delay: Histogram<u64>,
}

impl fmt::Debug for LoadReport {
    /// Percentiles instead of the histograms' thousands of buckets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadReport")
            .field("url", &self.url)
            .field("mode", &self.mode)
            .field("rate", &self.rate)
            .field("connections", &self.connections)
            .field("scheduled", &self.scheduled)
            .field("ok", &self.ok)
            .field("errors", &self.errors)
            .field("late_starts", &self.late_starts)
            .field("active", &self.active)
            .field("latency_us", &Percentiles::of(&self.latency))
            .field("ttft_us", &Percentiles::of(&self.ttft))
            .field("start_delay_us", &Percentiles::of(&self.start_delay))
            .finish()
    }
}

impl LoadReport {
    fn empty(spec: &LoadSpec) -> Result<LoadReport, LoadgenError> {
        Ok(LoadReport {
            url: spec.url.clone(),
            mode: spec.mode,
            rate: spec.rate,
            connections: spec.connections,
            scheduled: 0,
            ok: 0,
            errors: ErrorCounts::default(),
            late_starts: 0,
            active: Duration::ZERO,
            latency: new_histogram()?,
            ttft: new_histogram()?,
            start_delay: new_histogram()?,
        })
    }

    /// Successful measured requests per second of measured activity.
    pub fn achieved_rate(&self) -> f64 {
        let secs = self.active.as_secs_f64();
        if secs > 0.0 { self.ok as f64 / secs } else { 0.0 }
    }

    pub fn latency_percentiles(&self) -> Percentiles {
        Percentiles::of(&self.latency)
    }

    /// `None` for JSON runs and for streams that never carried content.
    pub fn ttft_percentiles(&self) -> Option<Percentiles> {
        (!self.ttft.is_empty()).then(|| Percentiles::of(&self.ttft))
    }

    /// True when every scheduled request started on time and succeeded.
    pub fn sustained(&self) -> bool {
        self.late_starts == 0 && self.errors.total() == 0
    }

    /// Folds another run of the same target, mode and rate into this one.
    pub fn merge(&mut self, other: &LoadReport) -> Result<(), LoadgenError> {
        let add = |a: &mut Histogram<u64>, b: &Histogram<u64>| {
            a.add(b).map_err(|e| LoadgenError::Internal(format!("histogram merge: {e:?}")))
        };
        add(&mut self.latency, &other.latency)?;
        add(&mut self.ttft, &other.ttft)?;
        add(&mut self.start_delay, &other.start_delay)?;
        self.scheduled += other.scheduled;
        self.ok += other.ok;
        self.errors.add(&other.errors);
        self.late_starts += other.late_starts;
        self.active += other.active;
        Ok(())
    }

    /// Records a synthetic success; for building reports in tests of report formatting.
    #[doc(hidden)]
    pub fn record_for_test(&mut self, latency_us: u64, ttft_us: Option<u64>) {
        self.scheduled += 1;
        self.ok += 1;
        self.latency.saturating_record(latency_us);
        if let Some(t) = ttft_us {
            self.ttft.saturating_record(t);
        }
    }

    /// An empty report for `spec`; for tests of report formatting.
    #[doc(hidden)]
    pub fn empty_for_test(spec: &LoadSpec) -> Result<LoadReport, LoadgenError> {
        LoadReport::empty(spec)
    }
}

fn new_histogram() -> Result<Histogram<u64>, LoadgenError> {
    Histogram::new_with_bounds(1, HIST_MAX_US, HIST_SIGFIG)
        .map_err(|e| LoadgenError::Internal(format!("histogram: {e:?}")))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Where requests go, checked to be loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddr,
    /// Value of the `Host` header.
    pub host_header: String,
    /// Origin-form request path.
    pub path: String,
}

/// Parses a base URL and refuses anything that is not plain HTTP to a loopback host.
pub fn parse_target(url: &str) -> Result<Target, LoadgenError> {
    let invalid =
        |reason: &str| LoadgenError::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
    let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => return Err(invalid("only http:// is supported")),
        None => return Err(invalid("missing http:// scheme")),
    }
    let host = uri.host().ok_or_else(|| invalid("missing host"))?;
    let ip =
        loopback_ip(host).ok_or_else(|| LoadgenError::NotLoopback { host: host.to_owned() })?;
    let port = uri.port_u16().unwrap_or(80);
    let base = uri.path().trim_end_matches('/');
    let path =
        if base.ends_with(CHAT_PATH) { base.to_owned() } else { format!("{base}{CHAT_PATH}") };
    let host_header = match uri.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    };
    Ok(Target { addr: SocketAddr::new(ip, port), host_header, path })
}

/// The address to connect to when `host` is loopback. `localhost` maps to 127.0.0.1 without
/// a resolver, so that no name lookup can redirect load elsewhere.
fn loopback_ip(host: &str) -> Option<IpAddr> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if bare.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    match bare.parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) if v4.is_loopback() => Some(IpAddr::V4(v4)),
        IpAddr::V6(v6) if v6 == Ipv6Addr::LOCALHOST => Some(IpAddr::V6(v6)),
        _ => None,
    }
}

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    Connect,
    Status(u16),
    Io,
    Timeout,
    Truncated,
    StreamError,
}

impl Failure {
    fn kind(&self) -> ErrorKind {
        match self {
            Failure::Connect => ErrorKind::Connect,
            Failure::Status(_) => ErrorKind::Status,
            Failure::Io => ErrorKind::Io,
            Failure::Timeout => ErrorKind::Timeout,
            Failure::Truncated => ErrorKind::Truncated,
            Failure::StreamError => ErrorKind::StreamError,
        }
    }
}

struct Success {
    first_content: Option<Instant>,
    done: Instant,
}

/// One keep-alive connection: the request handle and the task driving the socket.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The driver owns the socket; aborting it closes the connection now rather than
        // whenever the server gives up on it.
        self.driver.abort();
    }
}

async fn connect(addr: SocketAddr) -> Option<Conn> {
    let stream = TcpStream::connect(addr).await.ok()?;
    // Requests are small and latency is what we measure: never wait for Nagle.
    stream.set_nodelay(true).ok()?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    let driver = tokio::spawn(async move {
        // A connection error surfaces on the next request through `sender`.
        let _ = conn.await;
    });
    Some(Conn { sender, driver })
}

/// Everything needed to build the same request over and over.
struct RequestTemplate {
    target: Target,
    body: Bytes,
    bearer: Option<http::HeaderValue>,
    content_type: http::HeaderValue,
    mode: Mode,
}

impl RequestTemplate {
    fn new(spec: &LoadSpec, mut target: Target) -> Result<Self, LoadgenError> {
        if spec.mode == Mode::Get {
            let uri: Uri = spec
                .url
                .parse()
                .map_err(|_| LoadgenError::InvalidSpec("target URL does not parse".into()))?;
            target.path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        }
        if let Some(path) = &spec.path {
            if !path.starts_with('/') {
                return Err(LoadgenError::InvalidSpec(format!("path {path:?} is not absolute")));
            }
            target.path.clone_from(path);
        }
        let content_type =
            http::HeaderValue::from_str(spec.content_type.as_deref().unwrap_or("application/json"))
                .map_err(|_| {
                    LoadgenError::InvalidSpec("content type is not a valid header".into())
                })?;
        let bearer = spec
            .bearer
            .as_deref()
            .map(|t| http::HeaderValue::from_str(&format!("Bearer {t}")))
            .transpose()
            .map_err(|_| LoadgenError::InvalidSpec("bearer token is not a valid header".into()))?;
        Ok(RequestTemplate {
            target,
            body: spec.body.clone(),
            bearer,
            content_type,
            mode: spec.mode,
        })
    }

    fn build(&self) -> Result<Request<Full<Bytes>>, http::Error> {
        if self.mode == Mode::Get {
            return Request::builder()
                .method(Method::GET)
                .uri(self.target.path.as_str())
                .header(HOST, self.target.host_header.as_str())
                .body(Full::new(Bytes::new()));
        }
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(self.target.path.as_str())
            .header(HOST, self.target.host_header.as_str())
            .header(CONTENT_TYPE, self.content_type.clone());
        if let Some(v) = &self.bearer {
            b = b.header(AUTHORIZATION, v.clone());
        }
        b.body(Full::new(self.body.clone()))
    }
}

/// Sends one request on `conn` (connecting first if needed) and reads the whole answer.
/// Leaves `conn` as `None` whenever the connection cannot be trusted for another request.
async fn exchange(
    conn: &mut Option<Conn>,
    tpl: &RequestTemplate,
    capture: Option<&mut Vec<u8>>,
) -> Result<Success, Failure> {
    let mut req = tpl.build().map_err(|_| Failure::Io)?;
    // One retry, only when hyper hands the request back unsent: the server closed an idle
    // keep-alive connection (e.g. nginx's keepalive_requests), which is not a request failure.
    let resp = loop {
        let usable = match conn.as_mut() {
            Some(c) => c.sender.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            *conn = None;
            *conn = Some(connect(tpl.target.addr).await.ok_or(Failure::Connect)?);
        }
        let Some(c) = conn.as_mut() else { return Err(Failure::Connect) };
        match c.sender.try_send_request(req).await {
            Ok(resp) => break resp,
            Err(mut e) => {
                *conn = None;
                match e.take_message() {
                    Some(unsent) if usable => req = unsent,
                    _ => return Err(Failure::Io),
                }
            }
        }
    };
    let (outcome, reusable) = read_response(resp, tpl.mode, capture).await;
    if !reusable {
        *conn = None;
    }
    outcome
}

/// Reads a response to the end. Returns the outcome and whether the connection may carry
/// another request.
async fn read_response(
    resp: http::Response<Incoming>,
    mode: Mode,
    mut capture: Option<&mut Vec<u8>>,
) -> (Result<Success, Failure>, bool) {
    let status = resp.status();
    let mut body = resp.into_body();
    let mut sse = SseScanner::default();
    let mut first_content = None;
    let mut done = None;
    let mut stream_error = false;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(_)) => {
                let outcome = match done {
                    _ if !status.is_success() => Err(Failure::Status(status.as_u16())),
                    // The answer was complete; only the connection is suspect.
                    Some(done) if !stream_error => Ok(Success { first_content, done }),
                    _ if stream_error => Err(Failure::StreamError),
                    _ => Err(Failure::Truncated),
                };
                return (outcome, false);
            }
            Some(Ok(frame)) => {
                let Some(data) = frame.data_ref() else { continue };
                if let Some(buf) = capture.as_deref_mut() {
                    buf.extend_from_slice(data);
                }
                if mode == Mode::Bytes && status.is_success() && !data.is_empty() {
                    first_content.get_or_insert_with(Instant::now);
                }
                if mode != Mode::Stream || !status.is_success() {
                    continue;
                }
                let now = Instant::now();
                sse.feed(data, |ev| match ev {
                    SseEvent::Content => {
                        first_content.get_or_insert(now);
                    }
                    SseEvent::Done => {
                        done.get_or_insert(now);
                    }
                    SseEvent::Error => stream_error = true,
                });
            }
        }
    }
    let outcome = if !status.is_success() {
        Err(Failure::Status(status.as_u16()))
    } else if stream_error {
        Err(Failure::StreamError)
    } else {
        match mode {
            Mode::Json | Mode::Get => Ok(Success { first_content: None, done: Instant::now() }),
            Mode::Bytes => match first_content {
                Some(_) => Ok(Success { first_content, done: Instant::now() }),
                None => Err(Failure::Truncated),
            },
            Mode::Stream => match done {
                Some(done) => Ok(Success { first_content, done }),
                None => Err(Failure::Truncated),
            },
        }
    };
    (outcome, true)
}

/// What an SSE line means for the measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SseEvent {
    /// A `data:` frame whose delta carries non-empty content.
    Content,
    /// `data: [DONE]`.
    Done,
    /// `event: error`, a data frame with an `error` object, or a frame that is not JSON.
    Error,
}

/// Incremental line scanner for OpenAI-style SSE. It classifies each `data:` line as it
/// arrives (without waiting for the blank line) so TTFT is stamped on the frame's arrival.
///
/// Frames are parsed as JSON only until the first content frame; after that only frames
/// that mention `"error"` are. The generator shares the cores with the servers it measures,
/// and parsing every token frame of every stream would be most of its work.
#[derive(Debug, Default)]
struct SseScanner {
    line: Vec<u8>,
    overflowed: bool,
    content_seen: bool,
}

#[derive(Deserialize)]
struct FrameProbe {
    #[serde(default)]
    error: Option<IgnoredAny>,
    #[serde(default)]
    choices: Vec<ChoiceProbe>,
}

#[derive(Deserialize)]
struct ChoiceProbe {
    #[serde(default)]
    delta: Option<DeltaProbe>,
    /// Legacy completions put the token here.
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct DeltaProbe {
    #[serde(default)]
    content: Option<String>,
}

impl SseScanner {
    fn feed(&mut self, chunk: &[u8], mut on: impl FnMut(SseEvent)) {
        let mut rest = chunk;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(pos);
            rest = &tail[1..];
            if self.overflowed {
                self.overflowed = false;
                self.line.clear();
                on(SseEvent::Error);
                continue;
            }
            if self.line.is_empty() {
                self.classify(head, &mut on);
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                self.classify(&line, &mut on);
            }
        }
        if self.line.len() + rest.len() > MAX_SSE_LINE {
            self.overflowed = true;
            self.line.clear();
        } else if !self.overflowed {
            self.line.extend_from_slice(rest);
        }
    }

    fn classify(&mut self, line: &[u8], on: &mut impl FnMut(SseEvent)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let field =
            |name: &[u8]| line.strip_prefix(name).map(|v| v.strip_prefix(b" ").unwrap_or(v));
        if let Some(event) = field(b"event:") {
            if event.trim_ascii() == b"error" {
                on(SseEvent::Error);
            }
            return;
        }
        let Some(data) = field(b"data:") else { return };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            on(SseEvent::Done);
            return;
        }
        if self.content_seen && !data.windows(7).any(|w| w == b"\"error\"") {
            return;
        }
        match serde_json::from_slice::<FrameProbe>(data) {
            Ok(probe) if probe.error.is_some() => on(SseEvent::Error),
            Ok(probe) => {
                let has_content = probe.choices.iter().any(|c| {
                    c.delta
                        .as_ref()
                        .and_then(|d| d.content.as_deref())
                        .is_some_and(|s| !s.is_empty())
                        || c.text.as_deref().is_some_and(|s| !s.is_empty())
                });
                if has_content {
                    self.content_seen = true;
                    on(SseEvent::Content);
                }
            }
            Err(_) => on(SseEvent::Error),
        }
    }
}

/// Per-worker tallies, merged at the end so that recording needs no locks.
struct Tally {
    report: LoadReport,
    last_done: Option<Instant>,
}

/// State shared by the workers of one run.
struct Schedule {
    permits: Semaphore,
    next: AtomicU64,
    total: u64,
    warmup_tickets: u64,
    t0: Instant,
    rate: f64,
    deadline: Instant,
    late_threshold: Duration,
    request_timeout: Duration,
}

impl Schedule {
    fn intended(&self, ticket: u64) -> Instant {
        self.t0 + Duration::from_secs_f64(ticket as f64 / self.rate)
    }

    /// How many tickets are due at `now` (ticket `i` is due at `t0 + i / rate`).
    fn due(&self, now: Instant) -> u64 {
        match now.checked_duration_since(self.t0) {
            None => 0,
            Some(elapsed) => {
                let n = (elapsed.as_secs_f64() * self.rate).floor() as u64;
                n.saturating_add(1).min(self.total)
            }
        }
    }
}

/// Stops the pacer thread when the run ends or is cancelled.
struct PacerGuard(Arc<AtomicBool>);

impl Drop for PacerGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Aborts the workers if the run is cancelled, so a dropped run sends nothing more.
struct AbortOnDrop(Vec<JoinHandle<Result<Tally, LoadgenError>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Releases one permit per ticket at its intended time, from an OS thread so that pacing
/// precision is `nanosleep`'s (microseconds, see the timer slack below) rather than tokio's
/// timer wheel (1 ms).
fn pace(schedule: Arc<Schedule>, workers: usize, stop: Arc<AtomicBool>) {
    // Linux lets a sleeping thread wake up to 50 µs late by default ("timer slack") to batch
    // wake-ups; the pacer asks for 1 µs. Failing that, pacing is merely coarser.
    let _ = nix::sys::prctl::set_timerslack(1_000);
    let mut released = 0u64;
    while released < schedule.total {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let due = schedule.due(now);
        if due > released {
            // When the pacer falls behind it releases the backlog at once; the intended times
            // stay on the schedule, so the lag shows up in the latencies.
            let n = usize::try_from(due - released).unwrap_or(usize::MAX);
            schedule.permits.add_permits(n);
            released = due;
            continue;
        }
        let next_at = schedule.intended(released);
        std::thread::sleep(next_at.saturating_duration_since(now).min(PACER_MAX_NAP));
    }
    // Wake every worker so each one sees the schedule is exhausted.
    schedule.permits.add_permits(workers);
}

async fn worker(
    schedule: Arc<Schedule>,
    tpl: Arc<RequestTemplate>,
    mut conn: Option<Conn>,
    spec_for_report: Arc<LoadSpec>,
) -> Result<Tally, LoadgenError> {
    let mut tally = Tally { report: LoadReport::empty(&spec_for_report)?, last_done: None };
    loop {
        // `waited` tells whether this worker was idle when the permit came: if it was not,
        // the permit had been waiting for a free connection.
        let waited = match schedule.permits.try_acquire() {
            Ok(p) => {
                p.forget();
                false
            }
            Err(TryAcquireError::NoPermits) => match schedule.permits.acquire().await {
                Ok(p) => {
                    p.forget();
                    true
                }
                Err(_) => break,
            },
            Err(TryAcquireError::Closed) => break,
        };
        let ticket = schedule.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        if ticket >= schedule.total || now >= schedule.deadline {
            break;
        }
        let intended = schedule.intended(ticket);
        let measured = ticket >= schedule.warmup_tickets;
        let delay = now.saturating_duration_since(intended);
        if measured {
            tally.report.start_delay.saturating_record(micros(delay));
            if !waited && delay > schedule.late_threshold {
                tally.report.late_starts += 1;
            }
        }
        let outcome =
            match tokio::time::timeout(schedule.request_timeout, exchange(&mut conn, &tpl, None))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => {
                    conn = None;
                    Err(Failure::Timeout)
                }
            };
        if !measured {
            continue;
        }
        match outcome {
            Ok(s) => {
                tally.report.ok += 1;
                tally
                    .report
                    .latency
                    .saturating_record(micros(s.done.saturating_duration_since(intended)));
                if let Some(fc) = s.first_content {
                    tally
                        .report
                        .ttft
                        .saturating_record(micros(fc.saturating_duration_since(intended)));
                }
                tally.last_done = Some(tally.last_done.map_or(s.done, |d| d.max(s.done)));
            }
            Err(f) => tally.report.errors.count(&f),
        }
    }
    Ok(tally)
}

/// Runs one bounded, open-loop load and returns the measured-window results.
///
/// The run stops by itself: after `warmup + duration` of schedule, plus at most the request
/// timeout for the backlog; requests still queued then are counted as `unsent`.
pub async fn run(spec: &LoadSpec) -> Result<LoadReport, LoadgenError> {
    let target = parse_target(&spec.url)?;
    if !(spec.rate.is_finite() && spec.rate > 0.0) {
        return Err(LoadgenError::InvalidSpec(format!("rate must be positive, got {}", spec.rate)));
    }
    if spec.connections == 0 {
        return Err(LoadgenError::InvalidSpec("connections must be at least 1".into()));
    }
    if spec.duration.is_zero() {
        return Err(LoadgenError::InvalidSpec("duration must be positive".into()));
    }
    let warmup_tickets = (spec.warmup.as_secs_f64() * spec.rate).ceil() as u64;
    let measured_tickets = ((spec.duration.as_secs_f64() * spec.rate).round() as u64).max(1);
    let total = warmup_tickets + measured_tickets;
    let tpl = Arc::new(RequestTemplate::new(spec, target.clone())?);

    // Connect the whole pool before the clock starts so the first requests do not pay for it.
    let mut conns = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        conns.push(connect(target.addr).await);
    }

    let t0 = Instant::now() + Duration::from_millis(1);
    let schedule_len = Duration::from_secs_f64(total as f64 / spec.rate);
    let schedule = Arc::new(Schedule {
        permits: Semaphore::new(0),
        next: AtomicU64::new(0),
        total,
        warmup_tickets,
        t0,
        rate: spec.rate,
        deadline: t0 + schedule_len + spec.request_timeout,
        late_threshold: spec.late_threshold,
        request_timeout: spec.request_timeout,
    });
    let spec_arc = Arc::new(spec.clone());
    let mut workers = AbortOnDrop(Vec::with_capacity(spec.connections));
    for conn in conns {
        workers.0.push(tokio::spawn(worker(schedule.clone(), tpl.clone(), conn, spec_arc.clone())));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _pacer_guard = PacerGuard(stop.clone());
    {
        let schedule = schedule.clone();
        let n = spec.connections;
        std::thread::Builder::new()
            .name("loadgen-pacer".into())
            .spawn(move || pace(schedule, n, stop))
            .map_err(|e| LoadgenError::Internal(format!("spawning the pacer thread: {e}")))?;
    }

    let mut report = LoadReport::empty(spec)?;
    let mut last_done: Option<Instant> = None;
    for handle in workers.0.iter_mut() {
        let tally =
            handle.await.map_err(|e| LoadgenError::Internal(format!("worker failed: {e}")))??;
        report.merge(&tally.report)?;
        last_done = match (last_done, tally.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    report.scheduled = measured_tickets;
    let accounted = report.ok + report.errors.total();
    report.errors.unsent = measured_tickets.saturating_sub(accounted);
    let window_start = schedule.intended(warmup_tickets);
    report.active = last_done.map_or(Duration::ZERO, |d| d.saturating_duration_since(window_start));
    Ok(report)
}

/// What a single request returned; see [`probe`].
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub body: Bytes,
}

/// Sends one request and reads the answer as a run would, returning the body on success
/// and a detailed error (status, start of the body) otherwise. Used to check a target
/// before loading it.
pub async fn probe(
    url: &str,
    bearer: Option<&str>,
    body: Bytes,
    mode: Mode,
    timeout: Duration,
) -> Result<ProbeResult, LoadgenError> {
    let mut spec = LoadSpec::new(url, body, mode, 1.0);
    spec.bearer = bearer.map(str::to_owned);
    probe_spec(&spec, timeout).await
}

/// [`probe`] with the request `spec` describes (its path, content type, body, mode, bearer).
pub async fn probe_spec(spec: &LoadSpec, timeout: Duration) -> Result<ProbeResult, LoadgenError> {
    let url = spec.url.as_str();
    let target = parse_target(url)?;
    let tpl = RequestTemplate::new(spec, target)?;
    let mut conn = None;
    let mut captured = Vec::new();
    let start = Instant::now();
    let outcome =
        tokio::time::timeout(timeout, exchange(&mut conn, &tpl, Some(&mut captured))).await;
    let fail = |kind: ErrorKind, captured: &[u8]| {
        let text = String::from_utf8_lossy(&captured[..captured.len().min(500)]).into_owned();
        LoadgenError::Probe { url: url.to_owned(), kind, detail: text }
    };
    match outcome {
        Err(_) => Err(fail(ErrorKind::Timeout, &captured)),
        Ok(Err(Failure::Status(code))) => Err(LoadgenError::Probe {
            url: url.to_owned(),
            kind: ErrorKind::Status,
            detail: format!(
                "HTTP {code}: {}",
                String::from_utf8_lossy(&captured[..captured.len().min(500)])
            ),
        }),
        Ok(Err(f)) => Err(fail(f.kind(), &captured)),
        Ok(Ok(s)) => Ok(ProbeResult {
            latency: s.done.saturating_duration_since(start),
            ttft: s.first_content.map(|t| t.saturating_duration_since(start)),
            body: Bytes::from(captured),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_accepted() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://127.3.2.1:1/",
            "http://localhost:9000",
            "http://LOCALHOST",
            "http://[::1]:8080",
        ] {
            assert!(parse_target(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:80",
            "http://192.168.1.10",
            "http://0.0.0.0:8080",
            "http://example.com",
            "http://[::ffff:127.0.0.1]:80",
            "http://[2001:db8::1]:80",
        ] {
            assert!(matches!(parse_target(bad), Err(LoadgenError::NotLoopback { .. })), "{bad}");
        }
        assert!(matches!(parse_target("https://127.0.0.1"), Err(LoadgenError::InvalidUrl { .. })));
        assert!(matches!(parse_target("127.0.0.1:80"), Err(LoadgenError::InvalidUrl { .. })));
    }

    #[test]
    fn target_path_and_host_header() {
        let t = parse_target("http://localhost:8080").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.host_header, "localhost:8080");
        assert_eq!(t.path, CHAT_PATH);
        let t = parse_target("http://127.0.0.1:81/prefix/").unwrap();
        assert_eq!(t.path, "/prefix/v1/chat/completions");
        let t = parse_target("http://[::1]:81/v1/chat/completions").unwrap();
        assert_eq!(t.path, CHAT_PATH);
        assert_eq!(t.addr, "[::1]:81".parse().unwrap());
    }

    fn scan(chunks: &[&str]) -> Vec<SseEvent> {
        let mut s = SseScanner::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c.as_bytes(), |e| out.push(e));
        }
        out
    }

    #[test]
    fn sse_scanner_classifies_frames_across_chunk_boundaries() {
        let role = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        let tok = r#"data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#;
        let whole = format!("{role}\n\n{tok}\r\n\r\ndata: [DONE]\n\n");
        assert_eq!(scan(&[&whole]), vec![SseEvent::Content, SseEvent::Done]);
        // Byte-by-byte delivery gives the same events.
        let bytes: Vec<String> = whole.chars().map(String::from).collect();
        let refs: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(scan(&refs), vec![SseEvent::Content, SseEvent::Done]);
        // Comments and unknown fields are ignored.
        assert_eq!(scan(&[": ping\nid: 3\n\n"]), vec![]);
    }

    #[test]
    fn sse_scanner_flags_errors() {
        assert_eq!(scan(&["event: error\ndata: {\"x\":1}\n\n"]), vec![SseEvent::Error]);
        assert_eq!(scan(&["data: {\"error\":{\"message\":\"boom\"}}\n"]), vec![SseEvent::Error]);
        assert_eq!(scan(&["data: not json\n"]), vec![SseEvent::Error]);
        // `"error": null` is not an error.
        assert_eq!(scan(&["data: {\"error\":null,\"choices\":[]}\n"]), vec![]);
        // After the first token only frames mentioning "error" are parsed, and still caught.
        let tok = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n";
        assert_eq!(
            scan(&[tok, tok, "data: {\"error\":{\"message\":\"x\"}}\n", "data: [DONE]\n"]),
            vec![SseEvent::Content, SseEvent::Error, SseEvent::Done]
        );
    }

    #[test]
    fn errors_breakdown_lists_each_kind() {
        let mut e = ErrorCounts::default();
        e.count(&Failure::Status(503));
        e.count(&Failure::Status(503));
        e.count(&Failure::Timeout);
        e.unsent = 2;
        assert_eq!(e.total(), 5);
        assert_eq!(e.breakdown(), "status 503×2, timeout×1, unsent×2");
    }

    #[test]
    fn schedule_due_counts_tickets_at_their_intended_times() {
        let t0 = Instant::now();
        let s = Schedule {
            permits: Semaphore::new(0),
            next: AtomicU64::new(0),
            total: 10,
            warmup_tickets: 0,
            t0,
            rate: 1000.0,
            deadline: t0,
            late_threshold: Duration::ZERO,
            request_timeout: Duration::ZERO,
        };
        assert_eq!(s.due(t0), 1);
        assert_eq!(s.due(t0 + Duration::from_micros(999)), 1);
        assert_eq!(s.due(t0 + Duration::from_micros(3000)), 4);
        assert_eq!(s.due(t0 + Duration::from_secs(1)), 10);
        assert_eq!(s.intended(3), t0 + Duration::from_millis(3));
    }

    #[test]
    fn chat_body_sets_stream_flag() {
        let v: serde_json::Value =
            serde_json::from_slice(&chat_body("sim-llama", "hi", 8, Mode::Stream).unwrap())
                .unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 8);
        let v: serde_json::Value =
            serde_json::from_slice(&chat_body("sim-llama", "hi", 8, Mode::Json).unwrap()).unwrap();
        assert!(v.get("stream").is_none());
    }
}
