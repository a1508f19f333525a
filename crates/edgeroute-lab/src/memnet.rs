//! An in-memory network for deterministic runs: hosts by name, connections as in-memory
//! pipes, per-host faults and one-way latency, and per-path latency and jitter between a
//! source (a client site, a region) and a host ([`MemNet::from`], [`MemNet::set_path`]), all
//! timed on tokio's clock. Under a paused
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
    /// The host is gone from the network (a machine or its uplink lost): bytes on open
    /// connections vanish in both directions — no reset, no close — and new connections never
    /// complete (only a caller's connect timeout ends them).
    Blackhole,
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
    blackholed: Mutex<bool>,
}

impl Link {
    fn new() -> Arc<Link> {
        Arc::new(Link {
            delay: Mutex::new(Duration::ZERO),
            cut: watch::channel(0).0,
            blackholed: Mutex::new(false),
        })
    }

    fn delay(&self) -> Duration {
        *self.delay.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The one-way delay of a path from a source to a host, and its jitter (each chunk's delay is
/// drawn uniformly in `one_way ± jitter`; jitter stretches gaps, never reorders).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathSpec {
    pub one_way: Duration,
    pub jitter: Duration,
}

impl PathSpec {
    /// Half of `rtt_ms` each way, with `jitter_ms` of jitter.
    pub fn rtt_ms(rtt_ms: f64, jitter_ms: f64) -> PathSpec {
        PathSpec {
            one_way: Duration::from_secs_f64(rtt_ms.max(0.0) / 2000.0),
            jitter: Duration::from_secs_f64(jitter_ms.max(0.0) / 1000.0),
        }
    }
}

#[derive(Debug, Default)]
struct Shared {
    hosts: Mutex<HashMap<String, Host>>,
    /// (source, host) → path; a missing path takes the host's own delay.
    paths: Mutex<HashMap<(String, String), PathSpec>>,
    /// Connections opened so far: each one's jitter is seeded by its number.
    opened: std::sync::atomic::AtomicU64,
    seed: u64,
}

/// The network: cheap to clone, shared by every host and client on it. A clone made with
/// [`MemNet::from`] is the same network seen from one source.
#[derive(Debug, Clone, Default)]
pub struct MemNet {
    shared: Arc<Shared>,
    source: Option<Arc<str>>,
}

impl MemNet {
    pub fn new() -> MemNet {
        MemNet::default()
    }

    /// A network whose jitter draws follow `seed` (same seed, same order of connections:
    /// same delays).
    pub fn seeded(seed: u64) -> MemNet {
        MemNet { shared: Arc::new(Shared { seed, ..Shared::default() }), source: None }
    }

    /// The same network, seen from `source`: connections opened through the returned handle
    /// take the `(source, host)` path set with [`MemNet::set_path`], if any.
    pub fn from(&self, source: &str) -> MemNet {
        MemNet { shared: self.shared.clone(), source: Some(source.into()) }
    }

    /// Sets the path from `source` to `host`, for open connections too (bytes already in
    /// flight keep the delay they were sent with). It wins over the host's own delay.
    pub fn set_path(&self, source: &str, host: &str, spec: PathSpec) {
        self.shared
            .paths
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((source.to_owned(), host.to_owned()), spec);
    }

    fn path(&self, host: &str) -> Option<PathSpec> {
        let source = self.source.as_deref()?;
        let paths = self.shared.paths.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        paths.get(&(source.to_owned(), host.to_owned())).copied()
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
    /// host's would be — except under [`Fault::Blackhole`], which leaves them open and silent
    /// (and lifting a black hole lets them carry bytes again); new ones meet the fault.
    pub fn set_fault(&self, host: &str, fault: Fault) {
        if let Some(h) = self.lock().get_mut(host) {
            let was = std::mem::replace(&mut h.fault, fault);
            *h.link.blackholed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                fault == Fault::Blackhole;
            if fault != Fault::Blackhole && was != Fault::Blackhole {
                h.link.cut.send_modify(|n| *n += 1);
            }
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
        self.shared.hosts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `host` is black-holed.
    pub fn is_blackholed(&self, host: &str) -> bool {
        self.lock().get(host).is_some_and(|h| h.fault == Fault::Blackhole)
    }

    /// The delay of each chunk on a new connection to `host`: the path's (with its jitter,
    /// seeded by the connection's number), else the host's; `None` (dropped) while the host is
    /// black-holed.
    fn delays(
        &self,
        host: &str,
        link: Arc<Link>,
    ) -> impl FnMut() -> Option<Duration> + Send + 'static {
        use rand::{Rng as _, SeedableRng as _};
        let n = self.shared.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(
            self.shared.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let (net, host) = (self.clone(), host.to_owned());
        move || {
            if *link.blackholed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) {
                return None;
            }
            Some(match net.path(&host) {
                Some(p) if !p.jitter.is_zero() => {
                    let (d, j) = (p.one_way.as_secs_f64(), p.jitter.as_secs_f64());
                    Duration::from_secs_f64((d + rng.random_range(-j..=j)).max(0.0))
                }
                Some(p) => p.one_way,
                None => link.delay(),
            })
        }
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
            Fault::Blackhole => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{host}: no answer (black hole)"),
                ));
            }
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
                let (up, down) =
                    (self.delays(host, h.link.clone()), self.delays(host, h.link.clone()));
                tokio::spawn(carry(nr, fw, h.link.cut.subscribe(), up));
                tokio::spawn(carry(fr, nw, h.link.cut.subscribe(), down));
            }
        }
        Ok(client)
    }
}

impl edgeroute_client::Transport for MemNet {
    fn connect(&self, uri: &http::Uri) -> edgeroute_client::ConnectFuture {
        let Some(host) = uri.host() else {
            let e = io::Error::new(io::ErrorKind::InvalidInput, "no host in the URI");
            return Box::pin(std::future::ready(Err(e)));
        };
        // A black hole answers no SYN: the connect hangs until the caller gives up.
        if self.is_blackholed(host) {
            return Box::pin(std::future::pending());
        }
        let res = self.connect_to(host).map(|s| Box::new(s) as edgeroute_client::BoxIo);
        Box::pin(std::future::ready(res))
    }
}

/// Carries one direction of a connection: each chunk is delivered `delay()` after it was
/// read, in order (dropped on `None`); everything stops when the link is cut.
async fn carry(
    from: ReadHalf<DuplexStream>,
    mut to: WriteHalf<DuplexStream>,
    mut cut: watch::Receiver<u64>,
    delay: impl FnMut() -> Option<Duration> + Send,
) {
    tokio::select! {
        _ = cut.changed() => {}
        () = crate::pipe::delayed_copy(from, &mut to, delay, Duration::ZERO) => {}
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

    /// An echo server on `host`, one task per connection.
    fn echo(net: &MemNet, host: &str) {
        let mut l = net.bind(host);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 64];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    async fn round_trip(c: &mut DuplexStream) -> Duration {
        let t = tokio::time::Instant::now();
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        t.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn paths_are_per_source_with_seeded_jitter() {
        let net = MemNet::seeded(7);
        echo(&net, "n");
        net.set_delay("n", Duration::from_millis(5));
        net.set_path("far", "n", PathSpec::rtt_ms(100.0, 0.0));
        let mut near = net.from("near").connect_to("n").unwrap();
        let mut far = net.from("far").connect_to("n").unwrap();
        assert_eq!(
            round_trip(&mut near).await,
            Duration::from_millis(10),
            "no path: the host's delay"
        );
        assert_eq!(round_trip(&mut far).await, Duration::from_millis(100), "the path's");
        // Changed on the open connection.
        net.set_path("far", "n", PathSpec::rtt_ms(40.0, 0.0));
        assert_eq!(round_trip(&mut far).await, Duration::from_millis(40));

        // Jitter: within bounds, not constant, and the same draws for the same seed.
        let draws = |seed| async move {
            let net = MemNet::seeded(seed);
            echo(&net, "n");
            net.set_path("j", "n", PathSpec::rtt_ms(100.0, 10.0));
            let mut c = net.from("j").connect_to("n").unwrap();
            let mut out = Vec::new();
            for _ in 0..20 {
                out.push(round_trip(&mut c).await);
            }
            out
        };
        let a = draws(3).await;
        assert!(
            a.iter().all(|d| *d >= Duration::from_millis(80) && *d <= Duration::from_millis(121)),
            "{a:?}"
        );
        assert!(a.iter().any(|d| *d != a[0]), "jitter varies: {a:?}");
        assert_eq!(a, draws(3).await, "same seed, same delays");
    }

    #[tokio::test(start_paused = true)]
    async fn a_black_hole_swallows_bytes_without_closing_and_hangs_connects() {
        use edgeroute_client::Transport as _;
        let net = MemNet::new();
        echo(&net, "n");
        let mut c = net.connect_to("n").unwrap();
        assert_eq!(round_trip(&mut c).await, Duration::ZERO);
        net.set_fault("n", Fault::Blackhole);
        assert!(net.is_blackholed("n"));
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(30), c.read(&mut b)).await;
        assert!(r.is_err(), "no answer and no close: {r:?}");
        let uri: http::Uri = "http://n/health".parse().unwrap();
        let connect = tokio::time::timeout(Duration::from_secs(30), net.connect(&uri)).await;
        assert!(connect.is_err(), "the connect never completes");
        // Lifted: the open connection carries bytes again (what was swallowed stays lost).
        net.set_fault("n", Fault::None);
        assert_eq!(round_trip(&mut c).await, Duration::ZERO);
    }
}
