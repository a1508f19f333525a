//! An HTTP/1.1 client for one upstream origin (a node's inference backend): a connection is a
//! plain value driven by the request that uses it, and the protocol is ours, on `httparse`.
//!
//! hyper-util's pooled client runs every connection as a task of its own: the request, each
//! chunk of the answer and the connection's return to the pool cross from that task to the
//! caller's through channels, a wake-up and a scheduler pass each. hyper's own connection
//! driven inline (this module's first form) still passed the request and the answer through
//! its dispatch channels and state machine: about a quarter of the instructions the gateway
//! spends per request (issue 13). Here the request head is written in one `write` with a small
//! body, the answer's head is parsed from the connection's buffer, and the body is split off
//! that buffer as it arrives — as nginx's upstream module reads its upstream socket in the
//! worker's one event loop. The wire format itself ([`wire`]) is plain functions over bytes,
//! unit-tested and fuzzed (`upstream_answer`).
//!
//! `https://` origins are verified against a CA file (a private fleet CA) or the compiled-in
//! roots, and the node can present a client certificate (mutual TLS): the backend then needs
//! to trust nothing but the gateway's certificate ([`UpstreamTls`]).
//!
//! What it keeps from a pool: idle connections reused last-in first-out, an idle timeout and
//! a cap on idle connections, a check before reuse that the upstream has not closed the
//! connection, a request sent once more on a fresh connection when a reused one fails before a
//! byte of answer (the write fails, or the connection ends or is reset: the upstream closed it
//! idle as the request went out — a keep-alive timeout, a routine event the caller must never
//! see), and a connection closed when its answer is abandoned mid-body (the upstream stops
//! generating for a caller who left). A fresh connection's request is never sent twice.

pub mod wire;

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

pub use wire::AnswerHeaders;
use wire::{Framing, Step, WireError};

/// Room made in a connection's buffer when it runs low.
const READ_CHUNK: usize = 16 * 1024;
/// Less room than this left in the buffer, and it grows by `READ_CHUNK` before a read.
const MIN_ROOM: usize = 4 * 1024;
/// A request body at most this large is copied behind its head, for one write.
const COALESCE_BODY: usize = 16 * 1024;

/// TLS to an `https://` upstream, from a config file's `[backend.openai.tls]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM bundle of the CA(s) the upstream's certificate must chain to (a private CA).
    /// Default: the Mozilla roots compiled in.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain the node presents when the upstream asks (mutual TLS); with
    /// `key_file`. Default: none.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl UpstreamTls {
    /// The rustls client configuration these files describe.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => return Err("tls: cert_file and key_file go together".into()),
        };
        let mut cfg = crate::client::tls_config_with_identity(self.ca_file.as_deref(), identity)?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// A connection's byte stream: plain TCP, or TLS over it (boxed once per connection).
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}
type Io = Box<dyn ByteStream>;

/// How the client connects and keeps connections. Every field has a default.
#[derive(Debug, Clone)]
pub struct UpstreamOptions {
    /// One TCP connect, at most. Default 1 s.
    pub connect_timeout: Duration,
    /// An idle connection older than this is closed instead of reused. Default 90 s.
    pub idle_timeout: Duration,
    /// Idle connections kept; more are closed when their answer ends. Default 256.
    pub max_idle: usize,
    /// For `https://` origins: how the upstream is verified and what the node presents.
    /// Default (`None`): the compiled-in roots, no client certificate.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Which of an answer's headers the caller gets. Default: all of them.
    pub answer_headers: AnswerHeaders,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(90),
            max_idle: 256,
            tls: None,
            answer_headers: AnswerHeaders::All,
        }
    }
}

/// Why a request to the upstream failed, before any of its answer's body arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The OS's reason is the error's `source`.
    #[error("cannot connect to {authority}")]
    Connect { authority: String, source: io::Error },
    #[error("connecting to {authority} took over {ms} ms")]
    ConnectTimeout { authority: String, ms: u128 },
    /// The TLS handshake failed (an untrusted certificate, a refused client certificate).
    #[error("TLS with {authority} failed")]
    Tls { authority: String, source: io::Error },
    /// Writing the request or reading the answer's head failed.
    #[error("the connection to the upstream failed")]
    Io(#[source] io::Error),
    /// The upstream closed the connection before its answer's head was complete.
    #[error("the upstream closed the connection without an answer")]
    Closed,
    /// The answer's bytes are not HTTP/1.1 this client accepts.
    #[error(transparent)]
    Protocol(#[from] WireError),
    #[error("the request cannot be sent: {0}")]
    Request(String),
}

impl UpstreamError {
    /// No connection could be made: nothing reached the upstream.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Tls { .. }
        )
    }
}

/// A pooled HTTP/1.1 client for one `http://` or `https://` origin. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    port: u16,
    authority: String,
    host_header: HeaderValue,
    /// `Some` for `https://`: the connector and the name the certificate must hold.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    opts: UpstreamOptions,
    idle: Mutex<Vec<Conn>>,
    opened: AtomicU64,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("authority", &self.inner.authority)
            .field("opened", &self.connections_opened())
            .finish_non_exhaustive()
    }
}

/// One connection and the bytes read from it that no answer has taken yet.
struct Conn {
    io: Io,
    buf: BytesMut,
    /// When it last went idle.
    since: Instant,
}

impl Conn {
    /// Whether it can take a request now: not expired, nothing unasked-for in its buffer, and
    /// not closed by the upstream (one read attempt, which sees an end of stream or a reset;
    /// tokio answers it from its readiness state, without a system call, when nothing came).
    fn usable(&mut self, idle_timeout: Duration) -> bool {
        if self.since.elapsed() >= idle_timeout || !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        Pin::new(&mut self.io).poll_read(&mut cx, &mut rb).is_pending()
    }

    /// Reads what the socket holds onto the buffer (into its spare room, never zeroed first):
    /// the bytes read, 0 at the end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < MIN_ROOM {
            self.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

impl Upstream {
    /// A client for the origin of `base` (`http[s]://host[:port]`; any path is ignored).
    pub fn new(base: &Uri, opts: UpstreamOptions) -> Result<Upstream, String> {
        let https = match base.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(format!(
                    "`{base}`: scheme `{other}` is not supported (use http:// or https://)"
                ));
            }
            None => return Err(format!("`{base}`: no scheme (use http://host:port)")),
        };
        let host = base.host().ok_or_else(|| format!("`{base}`: no host"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = base.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let cfg = match &opts.tls {
                Some(c) => Arc::clone(c),
                None => {
                    let mut c = crate::client::tls_config(None)?;
                    c.alpn_protocols = vec![b"http/1.1".to_vec()];
                    Arc::new(c)
                }
            };
            let name = ServerName::try_from(bare.to_owned())
                .map_err(|e| format!("`{base}`: `{bare}` is not a TLS server name: {e}"))?;
            Some((TlsConnector::from(cfg), name))
        } else {
            None
        };
        let authority = base
            .authority()
            .map(|a| a.as_str().to_owned())
            .ok_or_else(|| format!("`{base}`: no host"))?;
        let host_header =
            HeaderValue::from_str(&authority).map_err(|e| format!("`{base}`: {e}"))?;
        Ok(Upstream {
            inner: Arc::new(Inner {
                host: bare.to_owned(),
                port,
                authority,
                host_header,
                tls,
                opts,
                idle: Mutex::new(Vec::new()),
                opened: AtomicU64::new(0),
            }),
        })
    }

    /// Connections opened so far (a test and metrics figure: reuse keeps it flat).
    pub fn connections_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Idle connections held right now.
    pub fn idle(&self) -> usize {
        self.inner.idle.lock().map_or(0, |v| v.len())
    }

    /// Sends `req` (its URI's path and query are used; `Host` is the origin's, and the body's
    /// length is this client's to state) and waits for the answer's head. The answer's body
    /// drives the connection from then on.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        if !pq.starts_with('/') {
            return Err(UpstreamError::Request(format!("`{pq}` is not a path")));
        }
        let split = body.len() > COALESCE_BODY;
        let mut head = wire::request_head(
            &parts.method,
            pq,
            &self.inner.host_header,
            &parts.headers,
            body.len(),
            if split { 0 } else { body.len() },
        );
        if !split {
            head.extend_from_slice(&body);
        }
        let head_request = parts.method == Method::HEAD;
        // After a reused connection failed, the one retry goes to a fresh connection: the
        // others idle as long are likely closed as well.
        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only { None } else { self.checkout() };
            let (mut conn, reused) = match pooled {
                Some(c) => (c, true),
                // Boxed: the rare path's state (a TLS handshake's) would otherwise size the
                // future every request moves.
                None => (Box::pin(self.connect()).await?, false),
            };
            let written = async {
                conn.io.write_all(&head).await?;
                if split {
                    conn.io.write_all(&body).await?;
                }
                conn.io.flush().await
            }
            .await;
            match written {
                Ok(()) => {}
                // The upstream had closed this idle connection: nothing of the request was
                // taken. Once more, on a connection of its own.
                Err(_) if reused => {
                    fresh_only = true;
                    continue;
                }
                Err(e) => return Err(UpstreamError::Io(e)),
            }
            let mut got_any = false;
            let answer = std::future::poll_fn(|cx| {
                read_head(
                    &mut conn,
                    cx,
                    head_request,
                    &self.inner.opts.answer_headers,
                    &mut got_any,
                )
            })
            .await;
            let answer = match answer {
                Ok(a) => a,
                // Closed or reset with not a byte of answer: the upstream closed this idle
                // connection as the request went out (its keep-alive timeout), it did not
                // take the request. Once more, on a connection of its own.
                Err(UpstreamError::Closed | UpstreamError::Io(_)) if reused && !got_any => {
                    fresh_only = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut res = Response::new(UpstreamBody {
                conn: Some(conn),
                framing: answer.framing,
                reusable: answer.reusable,
                pool: Arc::clone(&self.inner),
                failed: None,
            });
            *res.status_mut() = answer.status;
            *res.version_mut() = answer.version;
            *res.headers_mut() = answer.headers;
            res.body_mut().settle();
            return Ok(res);
        }
    }

    fn checkout(&self) -> Option<Conn> {
        loop {
            let mut c = self.inner.idle.lock().ok()?.pop()?;
            if c.usable(self.inner.opts.idle_timeout) {
                return Some(c);
            }
        }
    }

    /// A fresh connection to the origin — TCP, then TLS for `https://` — for a protocol of the
    /// caller's own over it (a WebSocket): never pooled, never reused.
    pub async fn open_stream(&self) -> Result<Box<dyn ByteStream>, UpstreamError> {
        let i = &self.inner;
        let timeout = i.opts.connect_timeout;
        let stream = match tokio::time::timeout(timeout, connect_any(&i.host, i.port)).await {
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    authority: i.authority.clone(),
                    ms: timeout.as_millis(),
                });
            }
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect { authority: i.authority.clone(), source });
            }
            Ok(Ok(s)) => s,
        };
        stream.set_nodelay(true).ok();
        let io: Io = match &i.tls {
            None => Box::new(stream),
            Some((connector, name)) => {
                let handshake = connector.connect(name.clone(), stream);
                match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(source)) => {
                        return Err(UpstreamError::Tls { authority: i.authority.clone(), source });
                    }
                    Err(_) => {
                        return Err(UpstreamError::ConnectTimeout {
                            authority: i.authority.clone(),
                            ms: timeout.as_millis(),
                        });
                    }
                }
            }
        };
        i.opened.fetch_add(1, Ordering::Relaxed);
        Ok(io)
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let io = self.open_stream().await?;
        Ok(Conn { io, buf: BytesMut::with_capacity(READ_CHUNK), since: Instant::now() })
    }
}

/// Reads until the answer's head is complete (interim answers skipped); `got_any` says
/// whether any byte of an answer arrived.
fn read_head(
    conn: &mut Conn,
    cx: &mut Context<'_>,
    head_request: bool,
    keep: &AnswerHeaders,
    got_any: &mut bool,
) -> Poll<Result<wire::Head, UpstreamError>> {
    loop {
        if !conn.buf.is_empty()
            && let Some(head) = wire::parse_head(&mut conn.buf, head_request, keep)?
        {
            return Poll::Ready(Ok(head));
        }
        match conn.poll_fill(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(UpstreamError::Io(e))),
            Poll::Ready(Ok(0)) if *got_any => {
                return Poll::Ready(Err(WireError::Truncated("inside the answer's head").into()));
            }
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(UpstreamError::Closed)),
            Poll::Ready(Ok(_)) => *got_any = true,
        }
    }
}

/// Connects to the first address of `host` that accepts.
async fn connect_any(host: &str, port: u16) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
}

impl Inner {
    /// Keeps a connection whose answer ended, for the next request.
    fn checkin(&self, mut c: Conn) {
        c.since = Instant::now();
        let Ok(mut idle) = self.idle.lock() else { return };
        // Oldest first: close the expired ones rather than keep their sockets open.
        let expired = idle.iter().take_while(|c| c.since.elapsed() >= self.opts.idle_timeout);
        let n = expired.count();
        idle.drain(..n);
        if idle.len() < self.opts.max_idle {
            idle.push(c);
        }
    }
}

/// An answer's body. Polling it reads its connection; once the body has ended the connection
/// goes back to the pool (when the answer allows), and dropping it earlier closes the
/// connection.
pub struct UpstreamBody {
    /// `None` once the body has ended or failed.
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
    pool: Arc<Inner>,
    /// A failure met by [`UpstreamBody::poll_read_into`] after it had appended bytes: reported
    /// by the next call, so the bytes before it are delivered first.
    failed: Option<io::Error>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").field("framing", &self.framing).finish_non_exhaustive()
    }
}

impl UpstreamBody {
    /// A body that is empty by its framing ends at once, returning its connection now.
    fn settle(&mut self) {
        if self.framing == Framing::Length(0) {
            self.end();
        }
    }

    /// Appends the body's bytes to `dst`, without their framing (a `chunked` body's chunks
    /// arrive joined): what the connection's buffer holds, then what the socket holds, until a
    /// read would wait or `limit` bytes were appended. The socket is read even when the
    /// buffer had bytes, so what an upstream sent together (an SSE burst) is taken together,
    /// as a byte-forwarding proxy takes a read's bytes. `Ready(Ok(true))` when bytes were
    /// appended, `Ready(Ok(false))` at the end of the body, `Pending` when nothing came yet.
    /// A failure after some bytes were appended is reported by the next call. Beside
    /// [`Body::poll_frame`] (one buffer handle per chunk): one copy for the whole read.
    pub fn poll_read_into(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut BytesMut,
        limit: usize,
    ) -> Poll<io::Result<bool>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        let start = dst.len();
        let fail = |this: &mut Self, dst: &BytesMut, e: io::Error| {
            this.conn = None;
            if dst.len() > start {
                this.failed = Some(e);
                Poll::Ready(Ok(true))
            } else {
                Poll::Ready(Err(e))
            }
        };
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(Ok(dst.len() > start));
            };
            match self.framing.drain_into(&mut conn.buf, dst) {
                Ok(true) => {
                    self.end();
                    return Poll::Ready(Ok(dst.len() > start));
                }
                Ok(false) => {}
                Err(e) => {
                    let e = io::Error::new(io::ErrorKind::InvalidData, e);
                    return fail(self, dst, e);
                }
            }
            if dst.len() - start >= limit {
                return Poll::Ready(Ok(true));
            }
            match conn.poll_fill(cx) {
                Poll::Pending if dst.len() > start => return Poll::Ready(Ok(true)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    return match self.framing.at_eof() {
                        Ok(()) => {
                            self.conn = None;
                            Poll::Ready(Ok(dst.len() > start))
                        }
                        Err(e) => fail(self, dst, io::Error::new(io::ErrorKind::UnexpectedEof, e)),
                    };
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return fail(self, dst, e),
            }
        }
    }

    /// The body is complete: the connection goes back to the pool if nothing follows it.
    fn end(&mut self) {
        if let Some(c) = self.conn.take()
            && self.reusable
            && c.buf.is_empty()
        {
            self.pool.checkin(c);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            match this.framing.next(&mut conn.buf) {
                Ok(Step::Data(b)) => {
                    if this.framing == Framing::Length(0) {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Ok(Step::End) => {
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))));
                }
            }
            match conn.poll_fill(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    this.conn = None;
                    return match this.framing.at_eof() {
                        Ok(()) => Poll::Ready(None),
                        Err(e) => {
                            Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, e))))
                        }
                    };
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() && self.failed.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, self.framing.remaining()) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), Some(n)) => SizeHint::with_exact(n),
            (Some(_), None) => SizeHint::default(),
        }
    }
}
