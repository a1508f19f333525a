//! WAN emulation in user space (`tc netem` is not available here): a TCP relay per link — one
//! per (client region, node) pair — that delays every byte by a one-way latency plus jitter in
//! each direction, and can black-hole or reset the link on command.
//!
//! Delivery keeps TCP's order: a chunk is never delivered before the one read before it, so
//! jitter stretches gaps but never reorders (what a real path looks like to a TCP reader).
//! Timers tick in whole milliseconds (tokio's resolution): delays are accurate to ±0.5 ms on
//! average zero, and a zero delay uses no timer. The relay's own cost is measured by
//! `edgeroute bench wan`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const HALF_TICK: Duration = Duration::from_micros(500);

/// One direction's delay: `one_way` ± up to `jitter` (uniform), never below zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkSpec {
    pub one_way: Duration,
    pub jitter: Duration,
}

impl LinkSpec {
    pub fn rtt_ms(rtt: f64, jitter_ms: f64) -> LinkSpec {
        LinkSpec {
            one_way: Duration::from_secs_f64(rtt / 2000.0),
            jitter: Duration::from_secs_f64(jitter_ms / 1000.0),
        }
    }
}

/// What the link does to traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    /// Connections are accepted and bytes are read, but nothing is delivered either way
    /// (a route that silently drops packets).
    Blackhole,
    /// Open connections are reset and new ones refused (a path that is gone).
    Reset,
}

#[derive(Debug)]
struct Control {
    spec: Mutex<LinkSpec>,
    state: watch::Sender<LinkState>,
    seed: u64,
}

impl Control {
    fn spec(&self) -> LinkSpec {
        *self.spec.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A delayed TCP link to one target.
#[derive(Debug)]
pub struct WanLink {
    addr: SocketAddr,
    control: Arc<Control>,
    task: JoinHandle<()>,
}

impl WanLink {
    /// A link to `target` on a free loopback port. `seed` makes the jitter reproducible.
    pub async fn start(target: SocketAddr, spec: LinkSpec, seed: u64) -> std::io::Result<WanLink> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let control = Arc::new(Control {
            spec: Mutex::new(spec),
            state: watch::channel(LinkState::Up).0,
            seed,
        });
        let task = tokio::spawn(accept(listener, target, control.clone()));
        Ok(WanLink { addr, control, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the delay; bytes already in flight keep theirs.
    pub fn set_spec(&self, spec: LinkSpec) {
        *self.control.spec.lock().unwrap_or_else(PoisonError::into_inner) = spec;
    }

    pub fn spec(&self) -> LinkSpec {
        self.control.spec()
    }

    pub fn set_state(&self, state: LinkState) {
        self.control.state.send_replace(state);
    }

    pub fn state(&self) -> LinkState {
        *self.control.state.borrow()
    }
}

impl Drop for WanLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: tokio::net::TcpListener, target: SocketAddr, control: Arc<Control>) {
    let mut conns = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while let Ok((inbound, _)) = listener.accept().await {
        n += 1;
        if *control.state.borrow() == LinkState::Reset {
            reset(inbound);
            continue;
        }
        let control = control.clone();
        conns.spawn(async move {
            let _ = inbound.set_nodelay(true);
            let Ok(outbound) = TcpStream::connect(target).await else {
                reset(inbound);
                return;
            };
            let _ = outbound.set_nodelay(true);
            // A second handle on each socket, so a reset can close them with RST after the
            // relaying halves are gone.
            let (Ok((inbound, in_dup)), Ok((outbound, out_dup))) = (dup(inbound), dup(outbound))
            else {
                return;
            };
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            let mut state = control.state.subscribe();
            let rng = |dir: u64| rand::rngs::SmallRng::seed_from_u64(control.seed ^ (n << 1 | dir));
            let up = carry(ir, ow, control.clone(), rng(0));
            let down = carry(or, iw, control.clone(), rng(1));
            let was_reset = tokio::select! {
                _ = state.wait_for(|s| *s == LinkState::Reset) => true,
                _ = async { tokio::join!(up, down) } => false,
            };
            if was_reset {
                reset(in_dup);
                reset(out_dup);
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

fn dup(s: TcpStream) -> std::io::Result<(TcpStream, TcpStream)> {
    let s = s.into_std()?;
    let d = s.try_clone()?;
    Ok((TcpStream::from_std(s)?, TcpStream::from_std(d)?))
}

/// Closes with a reset (RST) rather than a clean FIN.
fn reset(s: TcpStream) {
    #[allow(deprecated)] // linger 0 is exactly the RST this wants, and the close does not block
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

/// One direction: read, stamp with the delivery time, deliver in order when due.
async fn carry(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    control: Arc<Control>,
    mut rng: rand::rngs::SmallRng,
) {
    let mut to = NoFin(Some(to));
    let Some(w) = to.0.as_mut() else { return };
    let state = control.state.subscribe();
    // A black hole reads and drops. tokio's timer fires on the first 1 ms tick at or after a
    // deadline: aiming half a tick early centres the error on zero (±0.5 ms), and a zero-delay
    // link uses no timer at all.
    let delay =
        || (*state.borrow() != LinkState::Blackhole).then(|| sample(control.spec(), &mut rng));
    crate::pipe::delayed_copy(from, w, delay, HALF_TICK).await;
}

/// A write half that sends no FIN when dropped: a relay cancelled by a reset must not look
/// like a clean close (the RST follows when the last handle on the socket goes).
struct NoFin(Option<OwnedWriteHalf>);

impl Drop for NoFin {
    fn drop(&mut self) {
        if let Some(w) = self.0.take() {
            w.forget();
        }
    }
}

fn sample(spec: LinkSpec, rng: &mut impl Rng) -> Duration {
    if spec.jitter.is_zero() {
        return spec.one_way;
    }
    let j = spec.jitter.as_secs_f64();
    let d = spec.one_way.as_secs_f64() + rng.random_range(-j..=j);
    Duration::from_secs_f64(d.max(0.0))
}

/// Round-trip time between two regions, ms: what a Toronto client sees to Toronto (~3 ms),
/// Montreal (~9 ms) and Vancouver (~60 ms), from real geography. Unknown pairs: 80 ms.
pub fn geo_rtt_ms(a: &str, b: &str) -> f64 {
    let pair = if a <= b { (a, b) } else { (b, a) };
    match pair {
        (x, y) if x == y => 3.0,
        ("montreal", "toronto") => 9.0,
        ("toronto", "vancouver") => 60.0,
        ("montreal", "vancouver") => 66.0,
        _ => 80.0,
    }
}

/// Every client region's links to every node: a `Transport` per region makes the SDK reach
/// nodes through its region's links, everything else (discovery) directly.
#[derive(Debug)]
pub struct Wan {
    links: std::collections::HashMap<(String, SocketAddr), WanLink>,
}

impl Wan {
    /// Links from each of `client_regions` to each `(node address, node region)`, with the
    /// delay `spec(client region, node region)`.
    pub async fn build(
        client_regions: &[&str],
        nodes: &[(SocketAddr, &str)],
        spec: impl Fn(&str, &str) -> LinkSpec,
        seed: u64,
    ) -> std::io::Result<Wan> {
        let mut links = std::collections::HashMap::new();
        for (i, region) in client_regions.iter().enumerate() {
            for (j, (addr, node_region)) in nodes.iter().enumerate() {
                let link =
                    WanLink::start(*addr, spec(region, node_region), seed ^ ((i * 64 + j) as u64))
                        .await?;
                links.insert(((*region).to_owned(), *addr), link);
            }
        }
        Ok(Wan { links })
    }

    pub fn link(&self, client_region: &str, node: SocketAddr) -> Option<&WanLink> {
        self.links.get(&(client_region.to_owned(), node))
    }

    /// How a client in `region` reaches the fleet.
    pub fn transport(&self, region: &str) -> std::sync::Arc<RegionTransport> {
        let via = self
            .links
            .iter()
            .filter(|((r, _), _)| r == region)
            .map(|((_, node), link)| (*node, link.addr()))
            .collect();
        std::sync::Arc::new(RegionTransport { via })
    }
}

/// A client region's view of the network: connections to a node go through its link.
#[derive(Debug)]
pub struct RegionTransport {
    via: std::collections::HashMap<SocketAddr, SocketAddr>,
}

impl edgeroute_client::Transport for RegionTransport {
    fn connect(&self, uri: &http::Uri) -> edgeroute_client::ConnectFuture {
        let target = uri.authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let dest = target.map(|t| self.via.get(&t).copied().unwrap_or(t));
        Box::pin(async move {
            let dest = dest.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "the lab's nodes are reached by IP:port",
                )
            })?;
            let s = TcpStream::connect(dest).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s) as edgeroute_client::BoxIo)
        })
    }
}

/// The relay's own cost: round trips of a small message to an echo server on loopback,
/// direct and through links, interleaved so they share the machine's state. Returns a
/// markdown table (µs).
pub async fn overhead(rounds: usize) -> std::io::Result<String> {
    let target = echo_server().await?;
    let specs = [("0 ms", LinkSpec::default()), ("10 ms RTT", LinkSpec::rtt_ms(10.0, 0.0))];
    let mut links = Vec::new();
    for (_, spec) in specs {
        links.push(WanLink::start(target, spec, 1).await?);
    }
    let mut conns = vec![TcpStream::connect(target).await?];
    for l in &links {
        conns.push(TcpStream::connect(l.addr()).await?);
    }
    let mut times: Vec<Vec<u64>> = vec![Vec::new(); conns.len()];
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    for i in 0..rounds + 100 {
        for (c, t) in conns.iter_mut().zip(times.iter_mut()) {
            c.set_nodelay(true)?;
            let start = std::time::Instant::now();
            c.write_all(&msg).await?;
            c.read_exact(&mut buf).await?;
            if i >= 100 {
                t.push(start.elapsed().as_micros() as u64);
            }
        }
    }
    let pct = |v: &mut Vec<u64>, q: f64| {
        v.sort_unstable();
        v[((v.len() as f64 - 1.0) * q).round() as usize]
    };
    let (d50, d99) = (pct(&mut times[0], 0.5), pct(&mut times[0], 0.99));
    let mut md = String::from(
        "| path | n | round trip p50 (µs) | p99 (µs) | added p50 (µs) | added p99 (µs) |\n|---|---:|---:|---:|---:|---:|\n",
    );
    md.push_str(&format!("| direct (reference) | {rounds} | {d50} | {d99} | | |\n"));
    for (i, (name, spec)) in specs.iter().enumerate() {
        let v = &mut times[i + 1];
        let (p50, p99) = (pct(v, 0.5), pct(v, 0.99));
        let nominal = 2 * spec.one_way.as_micros() as u64;
        md.push_str(&format!(
            "| through a link, {name} | {rounds} | {p50} | {p99} | {} | {} |\n",
            p50.saturating_sub(d50 + nominal),
            p99.saturating_sub(d99 + nominal)
        ));
    }
    Ok(md)
}

async fn echo_server() -> std::io::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo() -> SocketAddr {
        echo_server().await.unwrap()
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
        let t = std::time::Instant::now();
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg, "bytes arrive whole and in order");
        t.elapsed()
    }

    #[tokio::test]
    async fn a_link_adds_its_delay_both_ways_and_keeps_order_under_jitter() {
        let target = echo().await;
        let link = WanLink::start(target, LinkSpec::rtt_ms(40.0, 0.0), 1).await.unwrap();
        let mut s = TcpStream::connect(link.addr()).await.unwrap();
        s.set_nodelay(true).unwrap();
        let rtt = round_trip(&mut s, b"hello").await;
        assert!(rtt >= Duration::from_millis(39), "{rtt:?}");
        assert!(rtt < Duration::from_millis(40 + 30), "{rtt:?}");

        link.set_spec(LinkSpec::rtt_ms(10.0, 4.0));
        // Many small writes with jitter: still one ordered byte stream.
        let msg: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
        for chunk in msg.chunks(100) {
            s.write_all(chunk).await.unwrap();
        }
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }

    #[tokio::test]
    async fn a_blackholed_link_delivers_nothing_and_heals() {
        let target = echo().await;
        let link = WanLink::start(target, LinkSpec::default(), 1).await.unwrap();
        let mut s = TcpStream::connect(link.addr()).await.unwrap();
        round_trip(&mut s, b"before").await;
        link.set_state(LinkState::Blackhole);
        s.write_all(b"lost").await.unwrap();
        let mut b = [0u8; 4];
        let silent = tokio::time::timeout(Duration::from_millis(200), s.read(&mut b)).await;
        assert!(silent.is_err(), "nothing comes back through a black hole");
        link.set_state(LinkState::Up);
        round_trip(&mut s, b"after").await;
    }

    #[tokio::test]
    async fn a_reset_link_resets_open_connections_and_refuses_new_ones() {
        let target = echo().await;
        let link = WanLink::start(target, LinkSpec::default(), 1).await.unwrap();
        let mut s = TcpStream::connect(link.addr()).await.unwrap();
        round_trip(&mut s, b"ping").await;
        link.set_state(LinkState::Reset);
        let mut b = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await.unwrap();
        assert!(r.is_err(), "the open connection is reset: {r:?}");
        let mut fresh = TcpStream::connect(link.addr()).await.unwrap();
        let _ = fresh.write_all(b"ping").await;
        let r = tokio::time::timeout(Duration::from_secs(2), fresh.read(&mut b)).await.unwrap();
        assert!(matches!(r, Ok(0) | Err(_)), "a new connection is reset: {r:?}");
        link.set_state(LinkState::Up);
        let mut s = TcpStream::connect(link.addr()).await.unwrap();
        round_trip(&mut s, b"back").await;
    }

    #[tokio::test]
    async fn a_region_reaches_nodes_through_its_own_links() {
        let (a, b) = (echo().await, echo().await);
        let wan = Wan::build(
            &["toronto", "vancouver"],
            &[(a, "toronto"), (b, "vancouver")],
            |c, n| LinkSpec::rtt_ms(geo_rtt_ms(c, n), 0.0),
            1,
        )
        .await
        .unwrap();
        assert_eq!(wan.link("toronto", b).unwrap().spec(), LinkSpec::rtt_ms(60.0, 0.0));
        assert_eq!(wan.link("vancouver", b).unwrap().spec(), LinkSpec::rtt_ms(3.0, 0.0));
        use edgeroute_client::Transport as _;
        let tor = wan.transport("toronto");
        let uri: http::Uri = format!("http://{b}/health").parse().unwrap();
        let mut s = tor.connect(&uri).await.unwrap();
        let t = std::time::Instant::now();
        s.write_all(b"far").await.unwrap();
        let mut got = [0u8; 3];
        s.read_exact(&mut got).await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(59),
            "Toronto → Vancouver is 60 ms: {:?}",
            t.elapsed()
        );
        assert_eq!(geo_rtt_ms("toronto", "montreal"), geo_rtt_ms("montreal", "toronto"));
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_is_seeded() {
        let spec = LinkSpec::rtt_ms(20.0, 3.0);
        let draw = |seed| {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            (0..1000).map(|_| sample(spec, &mut rng)).collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert!(
            a.iter().all(|d| *d >= Duration::from_millis(7) && *d <= Duration::from_millis(13))
        );
        let mean = a.iter().map(Duration::as_secs_f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 0.010).abs() < 0.0005, "{mean}");
    }
}
