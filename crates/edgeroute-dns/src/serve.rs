//! The sockets: UDP and TCP (RFC 1035 §4.2, RFC 7766) in front of [`Answerer::respond`],
//! answering from the [`View`] the probes keep current.
//!
//! UDP: one datagram in, at most one out, answered inline (no task per query). TCP: each
//! connection reads length-prefixed queries in turn (pipelined queries are answered in
//! order), is closed after `tcp_idle_timeout` without a query, and at most
//! `max_tcp_connections` are open at once (a connection past that is closed at accept).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::decide::View;
use crate::wire::Answerer;

/// What the listeners share: the answerer and the current view of the fleet.
#[derive(Debug)]
pub struct Shared {
    pub answerer: Answerer,
    pub view: ArcSwap<View>,
    pub counters: Counters,
}

/// What the server did (for `/metrics` and tests).
#[derive(Debug, Default)]
pub struct Counters {
    pub udp_queries: AtomicU64,
    pub tcp_queries: AtomicU64,
    pub dropped: AtomicU64,
    pub tcp_refused: AtomicU64,
}

/// TCP limits.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// A connection with no query for this long is closed. Default 5 s.
    pub idle_timeout: Duration,
    /// Connections open at once. Default 256.
    pub max_connections: usize,
}

impl Default for TcpLimits {
    fn default() -> Self {
        TcpLimits { idle_timeout: Duration::from_secs(5), max_connections: 256 }
    }
}

/// Answers UDP queries on `socket` until the task is dropped.
pub async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            // An ICMP error from an earlier send, surfaced on this socket: not fatal.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
            Err(e) => return Err(e),
        };
        shared.counters.udp_queries.fetch_add(1, Ordering::Relaxed);
        let view = shared.view.load();
        match shared.answerer.respond(&buf[..n], from.ip(), true, &view) {
            Some(out) => {
                let _ = socket.send_to(&out, from).await;
            }
            None => {
                shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Answers TCP connections on `listener` until the task is dropped.
pub async fn serve_tcp(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: TcpLimits,
) -> std::io::Result<()> {
    let room = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let (stream, from) = listener.accept().await?;
        let Ok(permit) = room.clone().try_acquire_owned() else {
            shared.counters.tcp_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = connection(stream, from, &shared, limits.idle_timeout).await;
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    from: SocketAddr,
    shared: &Shared,
    idle: Duration,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(idle, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            // Idle past the limit, closed, or reset: done.
            _ => return Ok(()),
        }
        let len = usize::from(u16::from_be_bytes(len));
        buf.resize(len, 0);
        match tokio::time::timeout(idle, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        shared.counters.tcp_queries.fetch_add(1, Ordering::Relaxed);
        let view = shared.view.load();
        let Some(out) = shared.answerer.respond(&buf, from.ip(), false, &view) else {
            shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let Ok(n) = u16::try_from(out.len()) else { return Ok(()) };
        let mut framed = Vec::with_capacity(out.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&out);
        stream.write_all(&framed).await?;
    }
}

/// Binds UDP and TCP on the same address (port 0: a free port both can take).
/// Asks the kernel for a UDP receive buffer of `bytes` (it grants at most
/// `net.core.rmem_max`, and reports double what it keeps for bookkeeping); the size it granted.
/// A burst of queries larger than the buffer is dropped by the kernel before the server sees
/// it (`RcvbufErrors` in /proc/net/snmp), as authoritative servers' `so-rcvbuf` settings guard
/// against.
pub fn set_udp_recv_buffer(udp: &UdpSocket, bytes: usize) -> std::io::Result<usize> {
    let sock = socket2::SockRef::from(udp);
    sock.set_recv_buffer_size(bytes)?;
    sock.recv_buffer_size()
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    for _ in 0..20 {
        let udp = UdpSocket::bind(addr).await?;
        let at = udp.local_addr()?;
        match TcpListener::bind(at).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() != 0 => return Err(e),
            Err(_) => continue,
        }
    }
    Err(std::io::Error::other("no port free for both UDP and TCP"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    #[tokio::test]
    async fn the_udp_receive_buffer_grows_as_far_as_the_kernel_allows() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let before = socket2::SockRef::from(&udp).recv_buffer_size().unwrap();
        let granted = set_udp_recv_buffer(&udp, 1 << 20).unwrap();
        // Linux keeps up to `rmem_max` (and reports double that for its bookkeeping).
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        assert!(granted >= (1 << 20).min(cap), "asked 1 MiB, granted {granted} (cap {cap})");
        assert!(granted >= before);
    }
}
