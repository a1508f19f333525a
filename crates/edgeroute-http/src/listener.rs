//! The accept seam: anything that yields byte streams can be served.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

/// A source of incoming connections.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Addr: std::fmt::Debug + Send + 'static;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;

    /// The source address of a connection, for the per-source connection cap; `None` (the
    /// default) exempts the listener's connections from it.
    fn source(_addr: &Self::Addr) -> Option<std::net::IpAddr> {
        None
    }

    /// The address clients reach, when the listener knows it.
    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        None
    }
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> io::Result<(Self::Io, Self::Addr)> {
        let (stream, addr) = tokio::net::TcpListener::accept(self).await?;
        // Token streams are many small writes: Nagle would add up to 40 ms per chunk.
        stream.set_nodelay(true)?;
        Ok((stream, addr))
    }

    fn source(addr: &Self::Addr) -> Option<std::net::IpAddr> {
        Some(addr.ip())
    }

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        tokio::net::TcpListener::local_addr(self).ok()
    }
}
