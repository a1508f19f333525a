//! An HTTP/1.1 client for one upstream origin (a node's inference backend) whose connections
//! are driven by the request that uses them.
//!
//! hyper-util's pooled client runs every connection as a task of its own: the request, each
//! chunk of the answer and the connection's return to the pool cross from that task to the
//! caller's through channels, a wake-up and a scheduler pass each. A gateway does little else
//! per request, so on a loaded single-threaded node those hops are a visible share of the time
//! it adds (issue 13). Here a pooled connection is a plain value: the request's future and then
//! the answer's body poll the connection themselves, so the bytes the socket holds reach the
//! caller in the same poll, with no task, channel hop or timer per request — as nginx's
//! upstream module reads its upstream socket in the worker's one event loop.
//!
//! `https://` origins are verified against a CA file (a private fleet CA) or the compiled-in
//! roots, and the node can present a client certificate (mutual TLS): the backend then needs
//! to trust nothing but the gateway's certificate ([`UpstreamTls`]).
//!
//! What it keeps from a pool: idle connections reused last-in first-out, an idle timeout and
//! a cap on idle connections, a request that was never written retried once on a fresh
//! connection (the upstream may close an idle connection at any moment — hyper hands such a
//! request back), and a connection closed when its answer is abandoned mid-body (the upstream
//! stops generating for a caller who left).

use std::future::{Future, poll_fn};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

type Conn = Pin<Box<http1::Connection<TokioIo<Io>, Full<Bytes>>>>;

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
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(90),
            max_idle: 256,
            tls: None,
        }
    }
}

/// Why a request to the upstream failed, before any of its answer arrived.
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
    #[error(transparent)]
    Http(#[from] hyper::Error),
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
    idle: Mutex<Vec<Idle>>,
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

/// A connection waiting for its next request.
struct Idle {
    sender: http1::SendRequest<Full<Bytes>>,
    conn: Conn,
    since: Instant,
}

impl Idle {
    /// Whether it can take a request now: not expired, not closed by the upstream (the
    /// connection is polled once, which notices an end of stream or a reset).
    fn usable(&mut self, idle_timeout: Duration) -> bool {
        if self.since.elapsed() >= idle_timeout || self.sender.is_closed() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        self.conn.as_mut().poll(&mut cx).is_pending() && self.sender.is_ready()
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

    /// Sends `req` (its URI's path and query are used; `Host` is set to the origin's) and
    /// waits for the answer's head. The answer's body drives the connection from then on.
    pub async fn send(
        &self,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() =
                Uri::try_from(pq).map_err(|e| UpstreamError::Request(e.to_string()))?;
        }
        req.headers_mut().insert(header::HOST, self.inner.host_header.clone());
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            let sent = conn.sender.try_send_request(req);
            let mut sent = std::pin::pin!(sent);
            let mut alive = true;
            let answer = poll_fn(|cx| {
                // The connection first: it writes the request and reads whatever answer the
                // socket holds, so the response is usually ready on the same poll.
                if alive && conn.conn.as_mut().poll(cx).is_ready() {
                    alive = false;
                }
                sent.as_mut().poll(cx)
            })
            .await;
            match answer {
                Ok(res) => {
                    let held = alive.then_some(conn);
                    return Ok(res.map(|body| UpstreamBody {
                        body,
                        conn: held,
                        pool: Arc::clone(&self.inner),
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the upstream had closed this idle connection. Once more,
                    // on a connection of its own.
                    Some(back) if reused => req = back,
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }

    fn checkout(&self) -> Option<Idle> {
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

    async fn connect(&self) -> Result<Idle, UpstreamError> {
        let io = self.open_stream().await?;
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        Ok(Idle { sender, conn: Box::pin(conn), since: Instant::now() })
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
    fn checkin(&self, mut c: Idle) {
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

/// An answer's body. Polling it drives its connection; once the body has ended the
/// connection goes back to the pool, and dropping it earlier closes the connection.
pub struct UpstreamBody {
    body: Incoming,
    conn: Option<Idle>,
    pool: Arc<Inner>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody").finish_non_exhaustive()
    }
}

impl UpstreamBody {
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(c) = &mut self.conn
            && c.conn.as_mut().poll(cx).is_ready()
        {
            self.conn = None;
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        this.drive(cx);
        let mut frame = Pin::new(&mut this.body).poll_frame(cx);
        if frame.is_pending() {
            // Asking for the body may have let the connection read on: once more, so the
            // bytes already in the socket come out now rather than after a self wake-up.
            this.drive(cx);
            frame = Pin::new(&mut this.body).poll_frame(cx);
        }
        if let Poll::Ready(None) = frame
            && let Some(mut c) = this.conn.take()
        {
            // The answer is complete: let the connection settle into keep-alive and keep it
            // if it did.
            if c.conn.as_mut().poll(cx).is_pending() && c.sender.is_ready() {
                this.pool.checkin(c);
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        // While the connection is held, one more poll is needed to return it.
        self.conn.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
