//! An in-memory network for deterministic runs: hosts by name, connections as in-memory
//! pipes, and per-host faults and one-way latency, all timed on tokio's clock. Under a paused
//! clock (`#[tokio::test(start_paused = true)]`) a whole fleet — nodes, discovery, clients —
//! runs with no sockets and no real waiting, and every run of a seed is the same run.
//!
//! Servers accept through [`MemListener`] (an `edgeroute_http::Listener`, so production
//! serving code runs unchanged); the SDK connects through [`MemNet`] (an
//! `edgeroute_client::Transport`).

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};

/// Bytes in flight per direction of a connection.
const PIPE_BYTES: usize = 256 * 1024;

/// What a host does to new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Connections are refused, as by a closed port.
    Refuse,
    /// The connection is accepted and the request read, then it is closed with no answer.
    ResetBeforeHeaders,
    /// The connection is accepted and the request read; nothing ever comes back.
    Silence,
}

#[derive(Debug)]
struct Host {
    accept: mpsc::UnboundedSender<DuplexStream>,
    fault: Fault,
    link: Arc<Link>,
}

/// What every open connection to a host shares: its current one-way delay, and a signal that
/// cuts them all.
#[derive(Debug)]
struct Link {
    delay: Mutex<Duration>,
    cut: watch::Sender<u64>,
}

impl Link {
    fn new() -> Arc<Link> {
        Arc::new(Link { delay: Mutex::new(Duration::ZERO), cut: watch::channel(0).0 })
    }

    fn delay(&self) -> Duration {
        *self.delay.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The network: cheap to clone, shared by every host and client on it.
#[derive(Debug, Clone, Default)]
pub struct MemNet {
    hosts: Arc<Mutex<HashMap<String, Host>>>,
}

impl MemNet {
    pub fn new() -> MemNet {
        MemNet::default()
    }

    /// Starts listening as `host` (a name like `tor-1`; ports are ignored). Binding a name
    /// again replaces the old listener, as a restarted server would.
    pub fn bind(&self, host: &str) -> MemListener {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut hosts = self.lock();
        let (fault, link) = match hosts.remove(host) {
            Some(h) => (h.fault, h.link),
            None => (Fault::None, Link::new()),
        };
        hosts.insert(host.to_owned(), Host { accept: tx, fault, link });
        MemListener { rx, host: host.to_owned() }
    }

    /// Applies `fault` to `host`. Its open connections are cut, as a failing or restarted
    /// host's would be; new ones meet the fault.
    pub fn set_fault(&self, host: &str, fault: Fault) {
        if let Some(h) = self.lock().get_mut(host) {
            h.fault = fault;
            h.link.cut.send_modify(|n| *n += 1);
        }
    }

    /// Sets the one-way delay between clients and `host`, for open connections too (bytes
    /// already in flight keep the delay they were sent with).
    pub fn set_delay(&self, host: &str, delay: Duration) {
        if let Some(h) = self.lock().get(host) {
            *h.link.delay.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = delay;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Host>> {
        self.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens a connection to `host`, or fails as a refused TCP connect would.
    pub fn connect_to(&self, host: &str) -> io::Result<DuplexStream> {
        let hosts = self.lock();
        let refused = || {
            io::Error::new(io::ErrorKind::ConnectionRefused, format!("{host}: connection refused"))
        };
        let h = hosts.get(host).ok_or_else(refused)?;
        let (client, near) = tokio::io::duplex(PIPE_BYTES);
        match h.fault {
            Fault::Refuse => return Err(refused()),
            Fault::ResetBeforeHeaders => {
                tokio::spawn(async move {
                    let mut near = near;
                    let mut buf = [0u8; 4096];
                    let _ = near.read(&mut buf).await;
                });
            }
            Fault::Silence => {
                let mut cut = h.link.cut.subscribe();
                tokio::spawn(async move {
                    let mut near = near;
                    let mut buf = [0u8; 4096];
                    loop {
                        tokio::select! {
                            _ = cut.changed() => return,
                            r = near.read(&mut buf) => if !r.is_ok_and(|n| n > 0) { return },
                        }
                    }
                });
            }
            Fault::None => {
                let (far, server) = tokio::io::duplex(PIPE_BYTES);
                h.accept.send(server).map_err(|_| refused())?;
                let (nr, nw) = tokio::io::split(near);
                let (fr, fw) = tokio::io::split(far);
                tokio::spawn(carry(nr, fw, h.link.clone()));
                tokio::spawn(carry(fr, nw, h.link.clone()));
            }
        }
        Ok(client)
    }
}

impl edgeroute_client::Transport for MemNet {
    fn connect(&self, uri: &http::Uri) -> edgeroute_client::ConnectFuture {
        let res = uri
            .host()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host in the URI"))
            .and_then(|h| self.connect_to(h))
            .map(|s| Box::new(s) as edgeroute_client::BoxIo);
        Box::pin(std::future::ready(res))
    }
}

/// Carries one direction of a connection: each chunk is delivered the link's delay after it
/// was read, in order; everything stops when the link is cut.
async fn carry(from: ReadHalf<DuplexStream>, mut to: WriteHalf<DuplexStream>, link: Arc<Link>) {
    let mut cut = link.cut.subscribe();
    tokio::select! {
        _ = cut.changed() => {}
        () = crate::pipe::delayed_copy(from, &mut to, || Some(link.delay()), Duration::ZERO) => {}
    }
}

/// Accepts the connections made to one host.
#[derive(Debug)]
pub struct MemListener {
    rx: mpsc::UnboundedReceiver<DuplexStream>,
    host: String,
}

impl edgeroute_http::Listener for MemListener {
    type Io = DuplexStream;
    type Addr = String;

    async fn accept(&mut self) -> io::Result<(DuplexStream, String)> {
        match self.rx.recv().await {
            Some(s) => Ok((s, self.host.clone())),
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeroute_http::Listener as _;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn connections_carry_bytes_with_the_hosts_delay_and_faults() {
        let net = MemNet::new();
        let mut l = net.bind("tor-1");
        net.set_delay("tor-1", Duration::from_millis(30));
        let server = tokio::spawn(async move {
            let (mut s, host) = l.accept().await.unwrap();
            assert_eq!(host, "tor-1");
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(b"pong").await.unwrap();
            l
        });
        let mut c = net.connect_to("tor-1").unwrap();
        let t = tokio::time::Instant::now();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"pong");
        assert_eq!(t.elapsed(), Duration::from_millis(60), "one round trip: 2 × 30 ms");
        let _l = server.await.unwrap();

        // A fault cuts open connections.
        net.set_fault("tor-1", Fault::None);
        let mut n = 0;
        let r = tokio::time::timeout(Duration::from_secs(1), c.read(&mut b)).await;
        if let Ok(Ok(k)) = r {
            n = k;
        }
        assert_eq!(n, 0, "the open connection was cut");

        assert_eq!(net.connect_to("nowhere").unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        net.set_fault("tor-1", Fault::Refuse);
        assert_eq!(net.connect_to("tor-1").unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
        net.set_fault("tor-1", Fault::ResetBeforeHeaders);
        let mut c = net.connect_to("tor-1").unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(c.read(&mut b).await.unwrap(), 0, "closed with no answer");
        net.set_fault("tor-1", Fault::Silence);
        let mut c = net.connect_to("tor-1").unwrap();
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let silent = tokio::time::timeout(Duration::from_secs(60), c.read(&mut b)).await;
        assert!(silent.is_err(), "nothing comes back");
    }
}
