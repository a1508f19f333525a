//! `edgeroute-lab bench discover` and `edgeroute-lab bench freshness`: the discovery service's
//! figures for BENCHMARKS.md.
//!
//! - **Load**: a discovery process serving a synthetic fleet (its own process and threads:
//!   this binary again, as `bench discover --synthetic-nodes N`, see [`serve_synthetic`]),
//!   driven by the open-loop load generator on loopback. The reference row in each run is
//!   the same server answering for a model no node holds (parse, one hash lookup, a short
//!   JSON answer): the floor of the HTTP path, against which the real lookups are compared.
//! - **Freshness**: a simulator node and a discovery replica in this process, on the embedded
//!   bus or on NATS (separate connections, as across machines). Each round loads a model on
//!   the node over HTTP and times from the load being accepted (202; the simulator loads in
//!   0 ms) to a discovery snapshot listing the node for that model. An upper bound of
//!   "ready → listed".

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use edgeroute_core::score::{Query, Strategy};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::loadgen::{self, LoadSpec, Mode};
use crate::process::ProcessGuard;

#[derive(Debug, Clone)]
pub struct LoadOpts {
    /// This binary: started again as the discovery server (`bench discover --synthetic-nodes`).
    pub bin: PathBuf,
    pub nodes: Vec<usize>,
    pub rates: Vec<f64>,
    pub duration: Duration,
    pub connections: usize,
    pub server_threads: usize,
    /// Rules of the routing policy the server applies (0: none).
    pub policy_rules: usize,
    pub command: String,
}

const QUERIES: [(&str, &str); 3] = [
    ("reference: unknown model", "model=none-such&k=3"),
    ("top 3, any region", "model=llama-3.1-8b&k=3"),
    ("top 3, two regions", "model=llama-3.1-8b&k=3&region=toronto,montreal"),
];

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

async fn start(guard: &mut ProcessGuard, opts: &LoadOpts, n: usize) -> Result<SocketAddr> {
    let dir = std::env::temp_dir();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let mut c = Command::new(&opts.bin);
    c.args(["bench", "discover", "--synthetic-nodes"])
        .arg(n.to_string())
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--server-threads")
        .arg(opts.server_threads.to_string())
        .arg("--policy-rules")
        .arg(opts.policy_rules.to_string());
    let name = format!("discovery-{n}");
    guard.spawn(
        &name,
        c,
        &dir.join(format!("edgeroute-bench-{name}-{}.log", std::process::id())),
    )?;
    let url = format!("http://{addr}/health");
    let t = Instant::now();
    loop {
        if loadgen::probe(&url, None, Bytes::new(), Mode::Get, Duration::from_secs(1)).await.is_ok()
        {
            return Ok(addr);
        }
        if let Some(status) = guard.exited(&name) {
            bail!("discovery exited ({status}): {}", guard.log_tail(&name));
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("discovery did not start: {}", guard.log_tail(&name));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves a synthetic fleet of `nodes` nodes (`crate::synthetic::fleet`, seed 7) on `listener`
/// until `shutdown` resolves: `/v1/discover` and the rest of discovery's API over a snapshot
/// built once, with no probes and no bus; with a routing policy of `policy_rules` rules
/// (`crate::synthetic::policy`) when not 0. The load benchmark's server process.
pub async fn serve_synthetic(
    nodes: usize,
    policy_rules: usize,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    // A load benchmark's private server: no [auth] (an explicit opt-out).
    let mut text = String::from("[discovery]\nallow_unauthenticated = true\n");
    if policy_rules > 0 {
        let file = std::env::temp_dir()
            .join(format!("edgeroute-bench-policy-{}.toml", std::process::id()));
        std::fs::write(&file, crate::synthetic::policy(policy_rules))
            .with_context(|| format!("writing {}", file.display()))?;
        text.push_str(&format!("[policy]\nfile = \"{}\"\n", file.display()));
    }
    let cfg = edgeroute_discovery::DiscoveryConfig::from_toml(&text, |_| None)?;
    let limits = cfg.limits.server_limits();
    let d = edgeroute_discovery::Discovery::build(cfg)?;
    d.replace_snapshot(edgeroute_discovery::Snapshot::build(
        crate::synthetic::fleet(nodes, 7),
        d.weights(),
        1,
        edgeroute_core::clock::unix_ms(),
    ));
    edgeroute_http::serve(listener, d.router(), limits, None, shutdown).await;
    Ok(())
}

pub async fn load(opts: LoadOpts) -> Result<String> {
    let mut guard = ProcessGuard::new();
    let result = load_with(&opts, &mut guard).await;
    tokio::task::spawn_blocking(move || drop(guard)).await.context("stopping the servers")?;
    result
}

async fn load_with(opts: &LoadOpts, guard: &mut ProcessGuard) -> Result<String> {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut md = String::new();
    let _ = writeln!(md, "## Discovery under load: `/v1/discover` on loopback\n");
    let _ = writeln!(
        md,
        "Command: `{}`. {nproc} cores shared by the server ({} worker thread(s)) and the load \
         generator; open loop at a fixed rate, latency from each request's intended send time \
         (coordinated-omission safe), {} keep-alive connections, {:?} measured after 2 s of \
         warm-up. Routing policy: {}.\n",
        opts.command,
        opts.server_threads,
        opts.connections,
        opts.duration,
        match opts.policy_rules {
            0 => "none".to_owned(),
            n => format!("{n} rules (`synthetic::policy`; the last matches the llama queries)"),
        }
    );
    let _ = writeln!(
        md,
        "| fleet | query | rate (req/s) | achieved | p50 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | p99 / reference p99 | late | errors |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &opts.nodes {
        let addr = start(guard, opts, n).await?;
        for &rate in &opts.rates {
            let mut reference_p99 = None;
            for (label, query) in QUERIES {
                let url = format!("http://{addr}/v1/discover?{query}");
                // One request first: a broken target fails here with its answer, not as a table
                // of errors.
                loadgen::probe(&url, None, Bytes::new(), Mode::Get, Duration::from_secs(2))
                    .await
                    .with_context(|| format!("first request to {url}"))?;
                let mut spec = LoadSpec::new(url, Bytes::new(), Mode::Get, rate);
                spec.duration = opts.duration;
                spec.connections = opts.connections;
                let r = loadgen::run(&spec).await?;
                let p = r.latency_percentiles();
                let reference = *reference_p99.get_or_insert(p.p99);
                let _ = writeln!(
                    md,
                    "| {n} | {label} | {rate:.0} | {:.0} | {} | {} | {} | {} | {:.2} | {} | {} |",
                    r.achieved_rate(),
                    p.p50,
                    p.p99,
                    p.p999,
                    p.max,
                    p.p99 as f64 / reference.max(1) as f64,
                    r.late_starts,
                    r.errors.total(),
                );
            }
        }
        guard.stop(&format!("discovery-{n}"));
    }
    Ok(md)
}

/// Times `changes` model loads from acceptance to being listed by discovery.
pub async fn freshness(bus_cfg: edgeroute_bus::BusConfig, changes: usize) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("edgeroute-freshness-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("model"))?;
    let mut fleet = crate::fleet::FleetSpec::open();
    fleet.nodes.push(crate::fleet::NodeSpec::new("fresh-1", "local", 40));
    let mut node_cfg = fleet.node_config(0, None);
    node_cfg.models.allowed_local_roots = vec![dir.clone()];
    node_cfg.models.sim_load_time_ms = 0;
    let node_bus = edgeroute_bus::Bus::connect(&bus_cfg).await?;
    // Over NATS, discovery has its own connection, as it would on another machine.
    let disc_bus = match bus_cfg.kind {
        edgeroute_bus::BusKind::Nats => edgeroute_bus::Bus::connect(&bus_cfg).await?,
        edgeroute_bus::BusKind::Embedded => node_bus.clone(),
    };
    // No [auth]: the loads go to the node's loopback admin listener (the public one serves no
    // admin route without auth).
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let node_addr = admin.local_addr()?;
    node_cfg.admin.listen = Some(node_addr);
    let node = edgeroute_node::Node::build(node_cfg)?.with_bus(node_bus);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(node.serve_planes(listener, Some(admin), async {
        let _ = stop_rx.await;
    }));

    // A loopback lab: no [auth], and the node announces an http:// URL (explicit opt-ins).
    let mut disc_cfg = edgeroute_discovery::DiscoveryConfig::default();
    disc_cfg.discovery.allow_unauthenticated = true;
    disc_cfg.announced.allow_plaintext = true;
    let disc = edgeroute_discovery::Discovery::build(disc_cfg)?.with_bus(disc_bus);
    let running = disc.start().await?;
    let mut generations = disc.generations();
    let listed = |model: &str| {
        let q = Query { model: model.into(), pipeline: None, allowed_regions: vec![], k: 1 };
        let snap = disc.snapshot();
        snap.top_k(&q, Strategy::LatencyFirst).iter().any(|c| snap.info(*c).id == "fresh-1")
    };
    let t = Instant::now();
    while !listed("sim-llama") {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("discovery never verified the node");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut samples_us = Vec::with_capacity(changes);
    for i in 0..changes {
        let id = format!("fresh-{i}");
        let body = serde_json::json!({"path": dir.join("model"), "id": id}).to_string();
        let req = http::Request::post(format!("http://{node_addr}/v1/models/load"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        generations.borrow_and_update();
        let res = client.request(req).await?;
        let t0 = Instant::now();
        let status = res.status();
        let _ = res.into_body().collect().await;
        if status.as_u16() != 202 {
            bail!("load answered {status}");
        }
        loop {
            if listed(&id) {
                break;
            }
            match tokio::time::timeout_at(
                tokio::time::Instant::from_std(t0 + Duration::from_secs(5)),
                generations.changed(),
            )
            .await
            {
                Ok(Ok(())) => {}
                _ => bail!("model {id} not listed within 5 s"),
            }
        }
        samples_us.push(t0.elapsed().as_micros() as u64);
        let unload = serde_json::json!({"model": id}).to_string();
        let req = http::Request::post(format!("http://{node_addr}/v1/models/unload"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(unload)))?;
        let _ = client.request(req).await?.into_body().collect().await;
    }
    running.stop().await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    std::fs::remove_dir_all(&dir).ok();

    samples_us.sort_unstable();
    let pct = |q: f64| {
        samples_us
            .get(((samples_us.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0)
    };
    let via = match bus_cfg.kind {
        edgeroute_bus::BusKind::Nats => format!("NATS ({})", bus_cfg.nats_url),
        edgeroute_bus::BusKind::Embedded => "the embedded bus".to_owned(),
    };
    Ok(format!(
        "topology freshness over {via}: {} model loads, accepted → listed by discovery: p50 {} µs, p99 {} µs, max {} µs",
        samples_us.len(),
        pct(0.50),
        pct(0.99),
        samples_us.last().copied().unwrap_or(0)
    ))
}
