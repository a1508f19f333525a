//! How the client reaches discovery and nodes: TCP (with TLS for `https://`) by default, or a
//! [`Transport`] the application supplies — an in-memory network for deterministic tests and
//! simulations (`edgeroute_lab::memnet`), a tunnel, a Unix socket. Everything above the byte
//! stream (HTTP, pooling, the failover ladder) is the same code either way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream a [`Transport`] opens.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;
pub type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send>>;

/// The answer's bytes to one DNS query.
pub type DnsFuture = Pin<Box<dyn Future<Output = io::Result<Vec<u8>>> + Send>>;

/// Opens a byte stream to a URI's authority (plain HTTP is spoken over it).
pub trait Transport: Send + Sync + 'static {
    fn connect(&self, uri: &Uri) -> ConnectFuture;

    /// Carries one DNS query (a `dns:` discovery entry's) to `server` and brings its answer
    /// back. `None` (the default): the SDK asks over UDP and TCP sockets itself.
    fn dns(&self, _server: std::net::SocketAddr, _query: Vec<u8>) -> Option<DnsFuture> {
        None
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Finds a host's addresses: those a `dns:` bootstrap pinned for it (an SRV target's
/// Additional records, in the answer's order), else the system resolver's.
#[derive(Clone)]
pub(crate) struct PinnedResolver {
    pub(crate) pins: crate::dns::Pins,
    pub(crate) system: GaiResolver,
}

type Addrs = std::vec::IntoIter<std::net::SocketAddr>;

impl tower_service::Service<Name> for PinnedResolver {
    type Response = Addrs;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Addrs>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.system.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        if let Some(ips) = self.pins.get(name.as_str()) {
            // The connector puts the URL's port on each address.
            let addrs: Vec<_> =
                ips.into_iter().map(|ip| std::net::SocketAddr::new(ip, 0)).collect();
            return Box::pin(std::future::ready(Ok(addrs.into_iter())));
        }
        let f = self.system.call(name);
        Box::pin(async move { Ok(f.await?.collect::<Vec<_>>().into_iter()) })
    }
}

#[derive(Clone)]
pub(crate) enum Connector {
    Net(HttpsConnector<HttpConnector<PinnedResolver>>),
    Custom { transport: Arc<dyn Transport>, connect_timeout: Duration },
}

impl tower_service::Service<Uri> for Connector {
    type Response = Conn;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Conn, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Net(c) => c.poll_ready(cx),
            Connector::Custom { .. } => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self {
            Connector::Net(c) => {
                let f = c.call(uri);
                Box::pin(async move { f.await.map(Conn::Net) })
            }
            Connector::Custom { transport, connect_timeout } => {
                if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                    return Box::pin(std::future::ready(Err(
                        "https over a custom transport is not supported".into(),
                    )));
                }
                let (f, limit) = (transport.connect(&uri), *connect_timeout);
                Box::pin(async move {
                    match tokio::time::timeout(limit, f).await {
                        Err(_) => {
                            Err(format!("connect timed out after {} ms", limit.as_millis()).into())
                        }
                        Ok(Err(e)) => Err(e.into()),
                        Ok(Ok(io)) => Ok(Conn::Custom(TokioIo::new(io))),
                    }
                })
            }
        }
    }
}

// One value per connection, moved once into hyper's connection task: its size costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Conn {
    Net(MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>),
    Custom(TokioIo<BoxIo>),
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        match self {
            Conn::Net(s) => s.connected(),
            Conn::Custom(_) => Connected::new(),
        }
    }
}

impl Read for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Net(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Custom(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Net(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Custom(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Net(s) => Pin::new(s).poll_flush(cx),
            Conn::Custom(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Net(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Custom(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
