//! `edgeroute-lab bench policy-push`: how long a pushed routing policy takes to be in force on
//! every discovery replica (issue 15's bar: three replicas over NATS, p99 < 1 s).
//!
//! It starts its own `nats-server` (JetStream) from the shipped `deploy/nats/nats-server.conf`
//! on a free loopback port, with a policy admin user and one discovery user per replica (each
//! with the permissions `edgeroute_bus::credentials` gives its role, so the figures are those
//! of the authenticated bus); three discovery replicas in this process, each on its own NATS
//! connection with `[policy] source = "bus"`, over a synthetic fleet (`--nodes`, answered by a
//! probe double, so each text is checked and compiled against a real snapshot); then pushes
//! `--pushes` policies of `--rules` rules one after another as the admin. Each push is timed
//! from just before the put to the last of the three replicas' acknowledgements (a replica
//! acknowledges after the new policy is compiled and in force), closed loop; after each, every
//! replica's `/health` is checked to report that version (not timed). Server, replicas and
//! pusher share this machine's cores.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgeroute_bus::credentials::{self, Role, UserKey};
use edgeroute_bus::{Bus, BusConfig, PolicyResult};
use edgeroute_discovery::probe::{Probe, ProbeError, ProbeFuture};
use edgeroute_discovery::{Discovery, DiscoveryConfig, Spawned};
use edgeroute_proto::health::NodeHealth;
use tokio::time::Instant;

use crate::process::ProcessGuard;

/// The server configuration shipped for the fleet.
const SHIPPED_CONFIG: &str = include_str!("../../../deploy/nats/nats-server.conf");
/// The JetStream store directory it names (moved to a scratch directory here).
const SHIPPED_STORE: &str = "/var/lib/nats/jetstream";
/// How long one push may take before the run fails.
const PUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// The replicas' names (their `[discovery] id` and bus users).
pub const REPLICAS: [&str; 3] = ["disc-a", "disc-b", "disc-c"];

/// What a run measured, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushReport {
    pub pushes: usize,
    pub replicas: usize,
    pub nodes: usize,
    pub rules: usize,
    pub policy_bytes: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl std::fmt::Display for PushReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "policy push → applied on all {} replicas (NATS, authenticated; {} nodes, {} rules, \
             {} bytes): n={} p50={}us p99={}us max={}us",
            self.replicas,
            self.nodes,
            self.rules,
            self.policy_bytes,
            self.pushes,
            self.p50_us,
            self.p99_us,
            self.max_us
        )
    }
}

/// The nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Answers each synthetic node's `/health` (hosts `<id>.bench`).
#[derive(Debug)]
struct SyntheticProbe(Vec<(String, NodeHealth)>);

impl Probe for SyntheticProbe {
    fn probe(&self, uri: http::Uri) -> ProbeFuture {
        let host = uri.host().unwrap_or_default();
        let h = self
            .0
            .iter()
            .find(|(id, _)| host.strip_suffix(".bench") == Some(id.as_str()))
            .map(|(_, h)| h.clone());
        Box::pin(async move { h.ok_or_else(|| ProbeError::Connect("no such node".into())) })
    }
}

/// A `nats-server` from the shipped configuration with an admin user `ops` and a discovery
/// user per replica; stopped when dropped.
struct Server {
    url: String,
    dir: tempfile::TempDir,
    _guard: ProcessGuard,
}

impl Server {
    async fn start() -> anyhow::Result<Server> {
        let dir = tempfile::tempdir()?;
        let base = BusConfig::default();
        let mut blocks = Vec::new();
        let roles = std::iter::once(("ops", Role::Admin))
            .chain(REPLICAS.iter().map(|r| (*r, Role::Discovery)));
        for (label, role) in roles {
            let key = UserKey::generate()?;
            let mut file = std::fs::OpenOptions::new();
            std::os::unix::fs::OpenOptionsExt::mode(file.write(true).create_new(true), 0o600);
            let seed_file = dir.path().join(format!("{label}.nk"));
            std::io::Write::write_all(&mut file.open(&seed_file)?, key.seed().as_bytes())?;
            let perms = credentials::permissions(&base, &role)?;
            blocks.push(credentials::user_block(label, &key.public_key, &perms));
        }
        std::fs::write(dir.path().join("users.conf"), credentials::users_file(&blocks))?;
        let store = dir.path().join("store");
        let config = SHIPPED_CONFIG.replace(SHIPPED_STORE, &store.display().to_string());
        anyhow::ensure!(
            config != SHIPPED_CONFIG,
            "the shipped config no longer names {SHIPPED_STORE}"
        );
        let config_file = dir.path().join("nats-server.conf");
        std::fs::write(&config_file, config)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let sbin = Path::new("/usr/sbin/nats-server");
        let binary = if sbin.exists() { sbin.to_owned() } else { "nats-server".into() };
        let mut command = Command::new(binary);
        command.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-c"]).arg(&config_file);
        let mut guard = ProcessGuard::new();
        guard.spawn("nats-server", command, &dir.path().join("server.log"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if Instant::now() > deadline || guard.exited("nats-server").is_some() {
                anyhow::bail!("nats-server did not start: {}", guard.log_tail("nats-server"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Server { url: format!("nats://127.0.0.1:{port}"), dir, _guard: guard })
    }

    fn seed(&self, label: &str) -> std::path::PathBuf {
        self.dir.path().join(format!("{label}.nk"))
    }
}

/// The policy text of push `i`: the synthetic policy of `rules` rules, version `push-<i>`.
pub fn text(i: usize, rules: usize) -> String {
    crate::synthetic::policy(rules).replacen(
        "version = \"bench-1\"",
        &format!("version = \"push-{i}\""),
        1,
    )
}

/// A replica following the bus as discovery user `id`, over `nodes` synthetic nodes.
async fn replica(
    server: &Server,
    id: &str,
    nodes: &[(String, NodeHealth)],
) -> anyhow::Result<Spawned> {
    use std::fmt::Write as _;
    let mut toml = format!(
        "[discovery]\nid = \"{id}\"\nallow_unauthenticated = true\n\
         [policy]\nsource = \"bus\"\n\
         [bus]\nkind = \"nats\"\nnats_url = \"{}\"\nnkey_seed_file = \"{}\"\nreconnect_max_ms = 200\n",
        server.url,
        server.seed(id).display()
    );
    for (node, h) in nodes {
        let _ = write!(
            toml,
            "[[nodes]]\nid = \"{node}\"\nurl = \"http://{node}.bench:8080\"\nregion = \"{}\"\n",
            h.region
        );
    }
    let cfg = DiscoveryConfig::from_toml(&toml, |_| None)?;
    let d = Discovery::build(cfg)?.with_probe(Arc::new(SyntheticProbe(nodes.to_vec())));
    Ok(d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await?)
}

/// The `policy.version` a replica's `/health` reports.
async fn version_of(addr: SocketAddr) -> anyhow::Result<Option<String>> {
    let url = format!("http://{addr}/health");
    let mode = crate::loadgen::Mode::Get;
    let r = crate::loadgen::probe(&url, None, bytes::Bytes::new(), mode, Duration::from_secs(2))
        .await?;
    let h: serde_json::Value = serde_json::from_slice(&r.body)?;
    Ok(h["policy"]["version"].as_str().map(str::to_owned))
}

/// Runs the benchmark: `pushes` policies of `rules` rules to three replicas over `nodes`
/// synthetic nodes.
pub async fn run(pushes: usize, rules: usize, nodes: usize) -> anyhow::Result<PushReport> {
    let server = Server::start().await?;
    let fleet: Vec<(String, NodeHealth)> = crate::synthetic::fleet(nodes, 1)
        .iter()
        .map(|e| (e.view.id.clone(), crate::synthetic::report(e)))
        .collect();
    let mut replicas = Vec::new();
    for id in REPLICAS {
        replicas.push(replica(&server, id, &fleet).await.with_context(|| format!("replica {id}"))?);
    }
    let admin = Bus::connect(&BusConfig {
        nkey_seed_file: Some(server.seed("ops")),
        ..BusConfig::nats(server.url.clone())
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin.is_connected() {
        anyhow::ensure!(Instant::now() < deadline, "the admin never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut acks = admin.policy_statuses().await?;
    // Warm-up, not timed: creates the bucket, and waits until every replica watches it.
    let warm = admin.put_policy(&text(0, rules)).await?;
    let got = acks.collect(warm, REPLICAS.len(), Duration::from_secs(20)).await;
    anyhow::ensure!(got.len() == REPLICAS.len(), "warm-up: only {got:?} acknowledged");
    let mut samples = Vec::with_capacity(pushes);
    let mut policy_bytes = 0;
    for i in 1..=pushes {
        let t = text(i, rules);
        policy_bytes = t.len();
        let t0 = Instant::now();
        let rev = admin.put_policy(&t).await?;
        let got = acks.collect(rev, REPLICAS.len(), PUSH_TIMEOUT).await;
        let took = t0.elapsed();
        anyhow::ensure!(
            got.len() == REPLICAS.len() && got.iter().all(|s| s.result == PolicyResult::Applied),
            "push {i} (revision {rev}): {got:?}"
        );
        samples.push(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
        // Cross-check, not timed: each replica says it is in force.
        let want = format!("push-{i}");
        for r in &replicas {
            let v = version_of(r.addr()).await?;
            anyhow::ensure!(
                v.as_deref() == Some(want.as_str()),
                "{}: /health has {v:?}, not {want}",
                r.addr()
            );
        }
    }
    samples.sort_unstable();
    Ok(PushReport {
        pushes,
        replicas: REPLICAS.len(),
        nodes,
        rules,
        policy_bytes,
        p50_us: percentile(&samples, 50.0),
        p99_us: percentile(&samples, 99.0),
        max_us: samples.last().copied().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_push_is_a_valid_policy_of_its_own_version() {
        for i in [0, 1, 200] {
            let p = edgeroute_policy::Policy::parse(&text(i, 50)).unwrap();
            assert_eq!(p.version(), format!("push-{i}"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_run_applies_every_push_on_three_replicas() {
        let r = run(5, 10, 20).await.unwrap();
        assert_eq!((r.pushes, r.replicas), (5, 3));
        assert!(r.p50_us > 0 && r.p50_us <= r.p99_us && r.p99_us <= r.max_us, "{r:?}");
    }
}
