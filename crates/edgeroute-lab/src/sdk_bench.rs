//! `edgeroute-lab bench sdk`: the client SDK's own costs, in one process on loopback.
//!
//! - **Session start** with K = 3 probes: cold (a new client: discovery request + three probes
//!   on new connections) and warm (the same client again: cached list, pooled connections).
//! - **Per-request overhead once pinned**: the same JSON request through `Session::chat` and
//!   through a bare pooled hyper client to the same node, interleaved; the difference of the
//!   medians is what the SDK adds.
//! - **Failover**: a streamed turn right after the pinned node dies (connections refused), timed
//!   to the first token, which comes from another node.
//!
//! Three simulator nodes with zero latency (so the figures are the SDK's and the network's),
//! each behind a relay the benchmark can cut, and a discovery replica, all in this process.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use edgeroute_client::{Client, ClientConfig, Stats};
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

use crate::fleet::FleetSpec;
use crate::relay::Relay;

fn pct(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0)
}

fn request(text: &str) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new("sim-llama", vec![ChatMessage::new(Role::User, text)]);
    r.max_tokens = Some(8);
    r
}

pub async fn run(rounds: usize, command: String) -> Result<String> {
    let mut nodes = Vec::new();
    let mut relays = Vec::new();
    let mut stops = Vec::new();
    let mut urls = Vec::new();
    let mut fleet = FleetSpec::zero_latency_trio();
    fleet.probe_ms = (200, 150);
    for i in 0..fleet.nodes.len() {
        let node = edgeroute_node::Node::build(fleet.node_config(i, None))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(node.serve(listener, async {
            let _ = rx.await;
        }));
        stops.push(tx);
        let relay = Relay::start(addr).await?;
        urls.push(format!("http://{}", relay.addr()));
        nodes.push(addr);
        relays.push(relay);
    }
    let d = edgeroute_discovery::Discovery::build(fleet.static_discovery_config("toronto", &urls))?;
    let running = d.spawn(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let disc = running.addr();
    let cfg = ClientConfig { discovery: vec![format!("http://{disc}")], ..Default::default() };
    wait_for_fleet(&cfg, 3).await?;

    // 1. Session start.
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..rounds.min(200) {
        let client = Client::new(cfg.clone())?;
        let t = Instant::now();
        client.session("sim-llama").await?;
        cold.push(t.elapsed().as_micros() as u64);
        let t = Instant::now();
        client.session("sim-llama").await?;
        warm.push(t.elapsed().as_micros() as u64);
    }

    // 2. Per-request overhead once pinned.
    let client = Client::new(cfg.clone())?;
    let session = client.session("sim-llama").await?;
    let pinned = session.pinned().url.clone();
    let bare: HttpClient<_, Full<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    let body = Bytes::from(serde_json::to_vec(&request("hello"))?);
    let (mut via_sdk, mut direct) = (Vec::new(), Vec::new());
    for i in 0..rounds + 100 {
        let t = Instant::now();
        session.chat(&request("hello")).await?;
        let a = t.elapsed().as_micros() as u64;
        let req = http::Request::post(format!("{pinned}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(body.clone()))?;
        let t = Instant::now();
        let res = bare.request(req).await?;
        let bytes = res.into_body().collect().await?.to_bytes();
        let _: edgeroute_proto::ChatCompletion = serde_json::from_slice(&bytes)?;
        let b = t.elapsed().as_micros() as u64;
        if i >= 100 {
            via_sdk.push(a);
            direct.push(b);
        }
    }

    // 3. Failover: the pinned node dies; the next streamed turn's first token.
    let mut failover = Vec::new();
    for _ in 0..rounds.min(50) {
        let client = Client::new(cfg.clone())?;
        let s = client.session("sim-llama").await?;
        s.chat(&request("hello")).await?;
        let i = ["tor-1", "mtl-1", "van-1"]
            .iter()
            .position(|n| *n == s.pinned().id)
            .context("pinned node")?;
        relays[i].cut();
        let t = Instant::now();
        let mut stream = s.chat_stream(&request("are you there?")).await?;
        let first = stream.next().await;
        failover.push(t.elapsed().as_micros() as u64);
        anyhow::ensure!(first.is_some_and(|c| c.is_ok()), "no first token after failover");
        while stream.next().await.is_some() {}
        // Back on the same address: discovery readmits it after its good probes.
        relays[i].restore().await?;
    }
    // 4. Fleet outage: every node down; how many attempts the clients make.
    let mut outage = Vec::new();
    for (label, ratio) in
        [("retry budget (default: 10 % + 1/s)", None), ("no budget (reference)", Some(1e9))]
    {
        wait_for_fleet(&cfg, 3).await?;
        let cfg = ClientConfig { retry_ratio: ratio.unwrap_or(cfg.retry_ratio), ..cfg.clone() };
        let mut sessions = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..OUTAGE_CLIENTS {
            let c = Client::new(cfg.clone())?;
            sessions.push(c.session("sim-llama").await?);
            clients.push(c);
        }
        let before = clients.iter().map(Client::stats).fold(Stats::default(), |a, b| a + b);
        for r in &mut relays {
            r.cut();
        }
        let (mut took, mut failed) = (Vec::new(), 0usize);
        let t0 = Instant::now();
        for turn in 0..OUTAGE_TURNS {
            for s in &mut sessions {
                let t = Instant::now();
                failed += usize::from(s.chat(&request(&format!("turn {turn}"))).await.is_err());
                took.push(t.elapsed().as_micros() as u64);
            }
        }
        let wall = t0.elapsed();
        let after = clients.iter().map(Client::stats).fold(Stats::default(), |a, b| a + b);
        let requests = took.len();
        let retries = after.retries - before.retries;
        let denied = after.retries_denied - before.retries_denied;
        outage.push((
            label,
            requests,
            failed,
            retries,
            denied,
            wall,
            pct(&mut took, 0.5),
            pct(&mut took, 0.99),
        ));
        for r in &mut relays {
            r.restore().await?;
        }
    }
    drop(running);
    for s in stops {
        let _ = s.send(());
    }

    let mut md = String::new();
    let _ = writeln!(md, "## Client SDK (`{command}`)\n");
    let _ = writeln!(
        md,
        "Three zero-latency simulator nodes behind relays and a discovery replica, in one process on loopback (2 cores shared).\n"
    );
    let _ = writeln!(md, "| what | n | p50 (µs) | p99 (µs) |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    let n = cold.len();
    let _ = writeln!(
        md,
        "| session start, cold (discovery + 3 probes on new connections) | {n} | {} | {} |",
        pct(&mut cold, 0.5),
        pct(&mut cold, 0.99)
    );
    let _ = writeln!(
        md,
        "| session start, warm (cached list, pooled connections) | {n} | {} | {} |",
        pct(&mut warm, 0.5),
        pct(&mut warm, 0.99)
    );
    let n = via_sdk.len();
    let (s50, s99, d50, d99) = (
        pct(&mut via_sdk, 0.5),
        pct(&mut via_sdk, 0.99),
        pct(&mut direct, 0.5),
        pct(&mut direct, 0.99),
    );
    let _ = writeln!(md, "| JSON request through `Session::chat` | {n} | {s50} | {s99} |");
    let _ = writeln!(
        md,
        "| the same request, bare pooled hyper client (reference) | {n} | {d50} | {d99} |"
    );
    let _ = writeln!(
        md,
        "| **SDK overhead per request (difference of medians)** | | **{}** | |",
        s50 as i64 - d50 as i64
    );
    let n = failover.len();
    let _ = writeln!(
        md,
        "| failover: pinned node dead (refused) → first token from another node | {n} | {} | {} |",
        pct(&mut failover, 0.5),
        pct(&mut failover, 0.99)
    );
    let _ = writeln!(
        md,
        "\nEvery node down ({OUTAGE_CLIENTS} clients with a session each, {OUTAGE_TURNS} turns each, all relays cut): \
         every request fails with a clear error; attempts beyond the first are what a fleet outage costs.\n"
    );
    let _ = writeln!(
        md,
        "| clients | requests | failed | extra attempts | per request | budget allows | refused by the budget | over (s) | time to error p50 (µs) | p99 (µs) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let d = ClientConfig::default();
    // Each client's budget over its 10 s window: ratio × its requests + floor × 10 s.
    let per_client = (d.retry_ratio * OUTAGE_TURNS as f64 + d.retry_floor_per_s * 10.0).floor();
    for (label, requests, failed, retries, denied, wall, p50, p99) in outage {
        let allows = if label.starts_with("no budget") {
            "∞".to_owned()
        } else {
            format!("{}", OUTAGE_CLIENTS as f64 * per_client)
        };
        let _ = writeln!(
            md,
            "| {label} | {requests} | {failed} | {retries} | {:.2} | {allows} | {denied} | {:.2} | {p50} | {p99} |",
            retries as f64 / requests as f64,
            wall.as_secs_f64()
        );
    }
    Ok(md)
}

const OUTAGE_CLIENTS: usize = 20;
const OUTAGE_TURNS: usize = 25;

/// Waits until discovery lists `n` nodes again.
async fn wait_for_fleet(cfg: &ClientConfig, n: usize) -> Result<()> {
    let t = Instant::now();
    loop {
        let probe = Client::new(cfg.clone())?;
        if probe.discover("sim-llama").await.is_ok_and(|c| c.len() == n) {
            return Ok(());
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "discovery never verified the nodes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
