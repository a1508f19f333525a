//! The accept seam: anything that yields byte streams can be served.

use std::future::Future;
use std::io;

use tokio::io::{AsyncRead, AsyncWrite};

/// A source of incoming connections.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Addr: std::fmt::Debug + Send + 'static;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Io, Self::Addr)>> + Send;

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

    fn local_addr(&self) -> Option<std::net::SocketAddr> {
        tokio::net::TcpListener::local_addr(self).ok()
    }
}
