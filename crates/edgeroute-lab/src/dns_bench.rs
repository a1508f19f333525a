//! The region layer's benchmark (issue 17): `edgeroute dns` against PowerDNS serving the same
//! zone and regions, in one run on loopback.
//!
//! The fleet: three regions (tor, mtl, van) of two discovery replicas each, on 127.0.R.1 and
//! 127.0.R.2, whose `/health` are stubs in this process (a "dead" replica's stub is stopped
//! with its open connections, so probes are refused). Client subnets 192.0.2.0/24 (tor),
//! 198.51.100.0/24 (mtl), 203.0.113.0/24 (van), sent as EDNS Client Subnet.
//!
//! The reference is PowerDNS (Debian's `pdns-server` with the bind backend) with one Lua
//! record: `netmask()` orders the regions by the client's subnet and `ifurlup()` (health
//! checks every second, the shortest interval it takes) answers the healthy replicas of the
//! first region that has one, every replica when none does (`docs/pdns-bench-notes.md`
//! verified the configuration; `enable-lua-records=shared`, ten times the `yes` throughput).
//! Both servers check every answer before load: each region's subnet gets its region's
//! replicas first.
//!
//! Measured: queries/s each server sustains (dnsperf unbounded), latency at fixed offered
//! rates (dnsperf `-Q`, per-response latencies from `-v`: p50/p99 and losses) and the
//! highest of those rates answered with p99 under 1 ms and nothing lost; then failover — tor's
//! replicas are stopped and both servers are asked every 50 ms with tor's subnet until tor's
//! addresses are gone from the answer, then revived until they are first again. It reports;
//! it asserts nothing about the figures.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::gateway_bench::MachineInfo;
use crate::process::ProcessGuard;

/// Regions: name, the second octet of its replicas' addresses (127.0.R.x), its client subnet.
pub const REGIONS: [(&str, u8, &str); 3] =
    [("tor", 1, "192.0.2.0/24"), ("mtl", 2, "198.51.100.0/24"), ("van", 3, "203.0.113.0/24")];
const ZONE: &str = "edge.test";
const NAME: &str = "discovery.edge.test.";

/// What to run.
#[derive(Debug, Clone)]
pub struct DnsBenchOpts {
    /// The `edgeroute` binary (`edgeroute dns`).
    pub edgeroute_bin: PathBuf,
    /// `pdns_server`; `None` leaves PowerDNS out.
    pub pdns_bin: Option<PathBuf>,
    pub dnsperf_bin: PathBuf,
    /// Fixed offered rates, queries/s.
    pub rates: Vec<u32>,
    /// Seconds per dnsperf run.
    pub duration: Duration,
    /// Failover trials.
    pub trials: u32,
    /// Worker threads of `edgeroute dns` (PowerDNS runs its defaults: one receiver thread,
    /// three distributor threads).
    pub threads: usize,
    /// The stubs' `/health` port on every 127.0.R.x.
    pub health_port: u16,
    pub work_dir: Option<PathBuf>,
    /// The command line, for the report.
    pub command: String,
}

impl DnsBenchOpts {
    pub fn new(edgeroute_bin: PathBuf) -> DnsBenchOpts {
        DnsBenchOpts {
            edgeroute_bin,
            pdns_bin: Some(PathBuf::from("/usr/sbin/pdns_server")),
            dnsperf_bin: PathBuf::from("dnsperf"),
            rates: vec![5_000, 10_000, 20_000, 40_000],
            duration: Duration::from_secs(5),
            trials: 5,
            threads: 1,
            health_port: 17070,
            work_dir: None,
            command: String::new(),
        }
    }
}

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Edgeroute,
    PowerDns,
}

impl Server {
    pub fn label(self) -> &'static str {
        match self {
            Server::Edgeroute => "edgeroute dns",
            Server::PowerDns => "PowerDNS 4.7 (Lua ifurlup, shared)",
        }
    }
}

/// One dnsperf run.
#[derive(Debug, Clone, Default)]
pub struct PerfRun {
    /// Offered rate; 0 = unbounded.
    pub offered: u32,
    pub sent: u64,
    pub lost: u64,
    pub qps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Average response size, bytes (a free check that answers were the real ones).
    pub response_bytes: u32,
}

/// One server's figures.
#[derive(Debug, Clone)]
pub struct ServerReport {
    pub server: Server,
    pub unbounded: PerfRun,
    pub fixed: Vec<PerfRun>,
    /// Seconds from tor's replicas stopping to an answer without them, per trial.
    pub withdrawn_s: Vec<f64>,
    /// Seconds from their revival to an answer with them first, per trial.
    pub returned_s: Vec<f64>,
}

impl ServerReport {
    /// The highest offered rate answered with p99 under 1 ms, nothing lost, and at least 99%
    /// of it achieved.
    pub fn qps_at_p99_under_1ms(&self) -> Option<u32> {
        self.fixed
            .iter()
            .filter(|r| r.lost == 0 && r.p99_us < 1000.0 && r.qps >= 0.99 * f64::from(r.offered))
            .map(|r| r.offered)
            .max()
    }
}

#[derive(Debug, Clone)]
pub struct DnsBenchReport {
    pub machine: MachineInfo,
    pub command: String,
    pub duration: Duration,
    pub threads: usize,
    pub servers: Vec<ServerReport>,
}

/// The `/health` stubs, one per replica, stoppable.
struct Stubs {
    port: u16,
    tasks: Vec<(IpAddr, tokio::task::JoinHandle<()>)>,
}

impl Stubs {
    async fn start(port: u16) -> anyhow::Result<Stubs> {
        let mut s = Stubs { port, tasks: Vec::new() };
        for (_, r, _) in REGIONS {
            for i in 1..=2 {
                s.start_one(IpAddr::V4(Ipv4Addr::new(127, 0, r, i))).await?;
            }
        }
        Ok(s)
    }

    async fn start_one(&mut self, ip: IpAddr) -> anyhow::Result<()> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(SocketAddr::new(ip, self.port))
            .with_context(|| format!("binding a /health stub on {ip}:{}", self.port))?;
        let listener = socket.listen(256)?;
        self.tasks.push((ip, tokio::spawn(health_stub(listener))));
        Ok(())
    }

    /// Stops the stubs of region `r` (127.0.r.x): their listeners and open connections.
    fn stop_region(&mut self, r: u8) {
        self.tasks.retain(|(ip, task)| {
            let hit = matches!(ip, IpAddr::V4(a) if a.octets()[2] == r);
            if hit {
                task.abort();
            }
            !hit
        });
    }

    async fn start_region(&mut self, r: u8) -> anyhow::Result<()> {
        for i in 1..=2 {
            self.start_one(IpAddr::V4(Ipv4Addr::new(127, 0, r, i))).await?;
        }
        Ok(())
    }
}

impl Drop for Stubs {
    fn drop(&mut self) {
        for (_, t) in &self.tasks {
            t.abort();
        }
    }
}

/// Answers `GET /health` with 200 `{"status":"ok"}`. Connections live in a `JoinSet` owned by
/// this task: aborting it closes them too (a dead replica answers nothing).
async fn health_stub(listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                        let (status, body) = if req.uri().path() == "/health" {
                            (200, r#"{"status":"ok"}"#)
                        } else {
                            (404, "no")
                        };
                        http::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn free_udp_tcp_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port for both UDP and TCP")
}

fn edgeroute_config(health_port: u16) -> String {
    let mut t = format!(
        "zone = \"{ZONE}\"\ndefault_region = \"tor\"\n\
         [distance.tor]\nmtl = 6\nvan = 60\n[distance.mtl]\nvan = 65\n"
    );
    for (name, r, net) in REGIONS {
        let targets: Vec<String> = (1..=2)
            .map(|i| {
                format!(
                    "{{ id = \"disc-{name}-{i}\", addr = \"127.0.{r}.{i}\", port = 7070, health = \"http://127.0.{r}.{i}:{health_port}/health\" }}"
                )
            })
            .collect();
        let _ = write!(
            t,
            "[[regions]]\nname = \"{name}\"\nclient_cidrs = [\"{net}\"]\ndiscovery = [{}]\n",
            targets.join(", ")
        );
    }
    t
}

/// `pdns.conf`, `named.conf` and the zone file (PowerDNS's bind backend with one Lua record).
fn pdns_files(dir: &Path, port: u16, health_port: u16) -> Vec<(PathBuf, String)> {
    let conf = format!(
        "launch=bind\nbind-config={dir}/named.conf\nlocal-address=127.0.0.1\nlocal-port={port}\n\
         edns-subnet-processing=yes\nenable-lua-records=shared\nlua-health-checks-interval=1\n\
         security-poll-suffix=\n",
        dir = dir.display()
    );
    let named =
        format!("zone \"{ZONE}\" {{ type master; file \"{}/{ZONE}.zone\"; }};\n", dir.display());
    let zone = format!(
        "$ORIGIN {ZONE}.\n$TTL 30\n\
         @ IN SOA ns1.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 30\n@ IN NS ns1.{ZONE}.\n\
         ns1 IN A 127.0.0.1\n\
         discovery IN LUA ( A \";local tor={{'127.0.1.1','127.0.1.2'}} \"\n\
         \"local mtl={{'127.0.2.1','127.0.2.2'}} \"\n\
         \"local van={{'127.0.3.1','127.0.3.2'}} \"\n\
         \"local order \"\n\
         \"if netmask({{'198.51.100.0/24'}}) then order={{mtl,tor,van}} \"\n\
         \"elseif netmask({{'203.0.113.0/24'}}) then order={{van,mtl,tor}} \"\n\
         \"else order={{tor,mtl,van}} end \"\n\
         \"return ifurlup('http://discovery.{ZONE}:{health_port}/health', order, \"\n\
         \"{{selector='all', backupSelector='all', timeout='1', stringmatch='ok'}})\" )\n"
    );
    vec![
        (dir.join("pdns.conf"), conf),
        (dir.join("named.conf"), named),
        (dir.join(format!("{ZONE}.zone")), zone),
    ]
}

/// Asks `server` for `discovery.edge.test A` as a client of `subnet`; the answer's addresses.
pub async fn ask(server: SocketAddr, subnet: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut q = Message::query();
    q.metadata.id = rand::random();
    q.add_query(Query::query(Name::from_ascii(NAME)?, RecordType::A));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    let ecs: ClientSubnet = subnet.parse().map_err(|e| anyhow::anyhow!("{subnet}: {e:?}"))?;
    e.options_mut().insert(EdnsOption::Subnet(ecs));
    q.set_edns(e);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    sock.connect(server).await?;
    sock.send(&q.to_vec()?).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf))
        .await
        .context("no answer within 500 ms")??;
    let m = Message::from_vec(&buf[..n])?;
    Ok(m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect())
}

fn in_region(a: &Ipv4Addr, r: u8) -> bool {
    a.octets()[..3] == [127, 0, r]
}

/// Waits until every region's subnet gets that region's replicas first (the server's checks
/// have run), within 10 s.
async fn wait_correct(server: SocketAddr, label: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let mut ok = true;
        let mut last = Vec::new();
        for (_, r, net) in REGIONS {
            let got = ask(server, net).await.unwrap_or_default();
            ok &= got.first().is_some_and(|a| in_region(a, r)) && got.len() <= 3;
            last.push((net, got));
        }
        if ok {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("{label} never answered each region with its own replicas: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Parses dnsperf's summary and its `-v` lines (`> RCODE QNAME QTYPE LATENCY_S`).
pub fn parse_dnsperf(text: &str, offered: u32) -> PerfRun {
    let field = |key: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let mut lat: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("> ") && !l.starts_with("> T ") && !l.starts_with("> I "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    lat.sort_by(f64::total_cmp);
    let pick = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((p / 100.0 * lat.len() as f64) as usize).min(lat.len() - 1)] * 1e6
    };
    let response_bytes = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Average packet size:"))
        .and_then(|v| v.split("response").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    PerfRun {
        offered,
        sent: field("Queries sent:").unwrap_or(0.0) as u64,
        lost: field("Queries lost:").unwrap_or(0.0) as u64,
        qps: field("Queries per second:").unwrap_or(0.0),
        p50_us: pick(50.0),
        p99_us: pick(99.0),
        max_us: lat.last().map_or(f64::NAN, |m| m * 1e6),
        response_bytes,
    }
}

/// One dnsperf run against `server`, mixed regions (one query file line per region is not
/// possible with `-E`: each run sends one region's subnet, rotating by `turn`).
async fn dnsperf(
    opts: &DnsBenchOpts,
    dir: &Path,
    server: SocketAddr,
    offered: u32,
    turn: usize,
) -> anyhow::Result<PerfRun> {
    let qfile = dir.join("queries.txt");
    std::fs::write(&qfile, format!("{} A\n", NAME.trim_end_matches('.')))?;
    let ecs = ["8:00011800c00002", "8:00011800c63364", "8:00011800cb0071"][turn % 3];
    let mut cmd = tokio::process::Command::new(&opts.dnsperf_bin);
    cmd.arg("-s")
        .arg(server.ip().to_string())
        .arg("-p")
        .arg(server.port().to_string())
        .arg("-d")
        .arg(&qfile)
        .args(["-E", ecs, "-c", "4", "-T", "1", "-q", "200", "-t", "2"])
        .arg("-l")
        .arg(opts.duration.as_secs().max(1).to_string());
    if offered > 0 {
        cmd.arg("-Q").arg(offered.to_string()).arg("-v");
    }
    let out = cmd.output().await.with_context(|| {
        format!("running {} (apt-get install dnsperf)", opts.dnsperf_bin.display())
    })?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("dnsperf failed: {}", text.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
    }
    Ok(parse_dnsperf(&text, offered))
}

/// Until `pred` holds for both servers' answers to tor's subnet; each server's time to it.
async fn until_both(
    servers: &[(Server, SocketAddr)],
    pred: impl Fn(&[Ipv4Addr]) -> bool,
    limit: Duration,
) -> Vec<Option<f64>> {
    let t = Instant::now();
    let mut done: Vec<Option<f64>> = vec![None; servers.len()];
    while done.iter().any(Option::is_none) && t.elapsed() < limit {
        for (i, (_, addr)) in servers.iter().enumerate() {
            if done[i].is_none()
                && let Ok(got) = ask(*addr, REGIONS[0].2).await
                && pred(&got)
            {
                done[i] = Some(t.elapsed().as_secs_f64());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done
}

pub async fn run(opts: DnsBenchOpts) -> anyhow::Result<DnsBenchReport> {
    let machine = MachineInfo::detect().await;
    let tmp = tempfile::tempdir()?;
    let dir = opts.work_dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let mut stubs = Stubs::start(opts.health_port).await?;
    let mut guard = ProcessGuard::new();

    let mut servers: Vec<(Server, SocketAddr)> = Vec::new();
    let port = free_udp_tcp_port()?;
    let cfg = dir.join("dns.toml");
    std::fs::write(&cfg, edgeroute_config(opts.health_port))?;
    let mut cmd = Command::new(&opts.edgeroute_bin);
    cmd.arg("dns")
        .arg("--config")
        .arg(&cfg)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--threads")
        .arg(opts.threads.to_string())
        .env("RUST_LOG", "warn");
    guard.spawn("edgeroute-dns", cmd, &dir.join("edgeroute-dns.log"))?;
    servers.push((Server::Edgeroute, SocketAddr::from(([127, 0, 0, 1], port))));
    if let Some(pdns) = &opts.pdns_bin {
        let port = free_udp_tcp_port()?;
        let pdir = dir.join("pdns");
        std::fs::create_dir_all(&pdir)?;
        for (path, text) in pdns_files(&pdir, port, opts.health_port) {
            std::fs::write(path, text)?;
        }
        let mut cmd = Command::new(pdns);
        cmd.arg(format!("--config-dir={}", pdir.display()))
            .arg(format!("--socket-dir={}", pdir.display()))
            .args(["--daemon=no", "--guardian=no", "--disable-syslog"]);
        guard.spawn("pdns", cmd, &dir.join("pdns.log")).with_context(|| {
            format!("starting {} (scripts/setup-dnsbench.sh installs it)", pdns.display())
        })?;
        servers.push((Server::PowerDns, SocketAddr::from(([127, 0, 0, 1], port))));
    }
    for (s, addr) in &servers {
        wait_correct(*addr, s.label()).await.with_context(|| {
            let log = match s {
                Server::Edgeroute => "edgeroute-dns",
                Server::PowerDns => "pdns",
            };
            format!("its log: {}", guard.log_tail(log))
        })?;
    }
    eprintln!("both servers answer each region with its own replicas");

    let mut reports: Vec<ServerReport> = servers
        .iter()
        .map(|(s, _)| ServerReport {
            server: *s,
            unbounded: PerfRun::default(),
            fixed: Vec::new(),
            withdrawn_s: Vec::new(),
            returned_s: Vec::new(),
        })
        .collect();
    // Throughput: servers alternate run by run (drift spreads evenly).
    for (i, (s, addr)) in servers.iter().enumerate() {
        let r = dnsperf(&opts, &dir, *addr, 0, i).await?;
        eprintln!("{}: unbounded {:.0} q/s, lost {}", s.label(), r.qps, r.lost);
        reports[i].unbounded = r;
    }
    for (k, rate) in opts.rates.iter().enumerate() {
        for (i, (s, addr)) in servers.iter().enumerate() {
            let r = dnsperf(&opts, &dir, *addr, *rate, k + i).await?;
            eprintln!(
                "{} at {rate} q/s: {:.0} q/s, p50 {:.0} µs, p99 {:.0} µs, lost {}",
                s.label(),
                r.qps,
                r.p50_us,
                r.p99_us,
                r.lost
            );
            reports[i].fixed.push(r);
        }
    }

    // Failover: tor's replicas stop; both servers are asked with tor's subnet.
    for trial in 0..opts.trials {
        stubs.stop_region(1);
        let gone = until_both(
            &servers,
            |a| !a.is_empty() && !a.iter().any(|x| in_region(x, 1)),
            Duration::from_secs(15),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        stubs.start_region(1).await?;
        let back = until_both(
            &servers,
            |a| a.first().is_some_and(|x| in_region(x, 1)),
            Duration::from_secs(30),
        )
        .await;
        for (i, r) in reports.iter_mut().enumerate() {
            r.withdrawn_s.push(gone[i].unwrap_or(f64::NAN));
            r.returned_s.push(back[i].unwrap_or(f64::NAN));
        }
        eprintln!("failover trial {}: withdrawn {gone:?} s, back {back:?} s", trial + 1);
        // Let both settle (our changing window, PowerDNS's next check) before the next trial.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    guard.stop_all();
    Ok(DnsBenchReport {
        machine,
        command: opts.command,
        duration: opts.duration,
        threads: opts.threads,
        servers: reports,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    if v.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    v.iter().copied().fold(f64::NAN, f64::max)
}

impl DnsBenchReport {
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let _ = writeln!(md, "## Region layer: `edgeroute dns` and PowerDNS (issue 17)\n");
        let _ = writeln!(
            md,
            "- **Machine**: {} cores, kernel `{}`, CPU: {}. dnsperf shares the cores with the server it loads.",
            m.nproc, m.kernel, m.cpu
        );
        if !self.command.is_empty() {
            let _ = writeln!(md, "- **Command**: `{}`", self.command);
        }
        let _ = writeln!(
            md,
            "- **Zone**: `discovery.edge.test A` from three regions' subnets (EDNS Client Subnet), 2 replicas per region with `/health` stubs. edgeroute dns answers up to 3 (the region's healthy replicas and a standby elsewhere), {} worker thread(s); PowerDNS answers the first region with a healthy replica (`ifurlup`, `selector='all'`), `enable-lua-records=shared`, checks every 1 s, its default threads.",
            self.threads
        );
        let _ = writeln!(
            md,
            "- **Load**: dnsperf, 4 sockets, 1 thread pair, {} s per run; unbounded (`-q 200` outstanding) for throughput, then fixed rates (`-Q`) with per-response latencies (`-v`).\n",
            self.duration.as_secs()
        );
        let _ = writeln!(
            md,
            "| server | unbounded q/s (lost of sent) | q/s at p99 < 1 ms | response bytes | failover: withdrawn, median / max | back after revival, median / max |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for s in &self.servers {
            let _ = writeln!(
                md,
                "| {} | {:.0} ({} of {}) | {} | {} | {:.2} / {:.2} s | {:.2} / {:.2} s |",
                s.server.label(),
                s.unbounded.qps,
                s.unbounded.lost,
                s.unbounded.sent,
                s.qps_at_p99_under_1ms().map_or("none measured".into(), |q| q.to_string()),
                s.unbounded.response_bytes,
                median(&s.withdrawn_s),
                max(&s.withdrawn_s),
                median(&s.returned_s),
                max(&s.returned_s),
            );
        }
        let _ = writeln!(
            md,
            "\n| server | offered q/s | achieved q/s | lost | p50 µs | p99 µs | max µs |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for s in &self.servers {
            for r in &s.fixed {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {} | {:.0} | {:.0} | {:.0} |",
                    s.server.label(),
                    r.offered,
                    r.qps,
                    r.lost,
                    r.p50_us,
                    r.p99_us,
                    r.max_us
                );
            }
        }
        md
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    const SAMPLE: &str = "[Status] Sending queries\n> NOERROR discovery.edge.test A 0.000200\n\
        > NOERROR discovery.edge.test A 0.000100\n> T discovery.edge.test A\n\
        > NOERROR discovery.edge.test A 0.000900\n\nStatistics:\n\n  Queries sent:         4\n\
        Queries completed:    3 (75.00%)\n  Queries lost:         1 (25.00%)\n\n\
        Average packet size:  request 59, response 91\n  Run time (s):         1.000000\n\
        Queries per second:   3.000000\n";

    #[test]
    fn dnsperf_output_gives_rate_losses_percentiles_and_sizes() {
        let r = parse_dnsperf(SAMPLE, 5);
        assert_eq!((r.sent, r.lost, r.response_bytes), (4, 1, 91));
        assert!((r.qps - 3.0).abs() < 1e-9);
        assert!((r.p50_us - 200.0).abs() < 1e-6, "{}", r.p50_us);
        assert!((r.p99_us - 900.0).abs() < 1e-6 && (r.max_us - 900.0).abs() < 1e-6);
        let s = ServerReport {
            server: Server::Edgeroute,
            unbounded: r.clone(),
            fixed: vec![
                PerfRun { offered: 1000, qps: 1000.0, p99_us: 300.0, ..PerfRun::default() },
                PerfRun { offered: 2000, qps: 1995.0, p99_us: 900.0, ..PerfRun::default() },
                PerfRun { offered: 4000, qps: 4000.0, p99_us: 1500.0, ..PerfRun::default() },
                PerfRun { offered: 8000, qps: 8000.0, p99_us: 500.0, lost: 3, ..r },
            ],
            withdrawn_s: vec![],
            returned_s: vec![],
        };
        assert_eq!(s.qps_at_p99_under_1ms(), Some(2000), "p99 and losses both count");
    }

    #[test]
    fn both_servers_get_the_same_zone_and_regions() {
        let ours = edgeroute_config(17070);
        let cfg = edgeroute_dns::DnsConfig::from_toml(&ours).unwrap();
        assert_eq!(cfg.regions.len(), 3);
        let files = pdns_files(Path::new("/tmp/x"), 5302, 17070);
        let zone = &files[2].1;
        for (_, r, net) in REGIONS {
            assert!(
                ours.contains(&format!("127.0.{r}.2")) && zone.contains(&format!("127.0.{r}.2"))
            );
            assert!(ours.contains(net));
        }
        assert!(zone.contains("198.51.100.0/24") && zone.contains(":17070/health"));
    }
}
