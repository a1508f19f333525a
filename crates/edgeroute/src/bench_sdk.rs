//! `edgeroute bench sdk`: the client SDK's own costs, in one process on loopback.
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
use edgeroute_client::{Client, ClientConfig};
use edgeroute_lab::relay::Relay;
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;

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
    let mut static_nodes = String::new();
    for (id, region) in [("tor-1", "toronto"), ("mtl-1", "montreal"), ("van-1", "vancouver")] {
        let toml = format!(
            "[node]\nid = \"{id}\"\nregion = \"{region}\"\nlisten = \"127.0.0.1:0\"\nallow_unauthenticated = true\n\
             [limits]\nrate_limit_per_s = 1000000\nrate_limit_burst = 1000000\n\
             [backend]\nkind = \"sim\"\n[backend.sim]\nttft_base_ms = 0\nprefill_us_per_token = 0\ntokens_per_s = 0.0\n"
        );
        let node =
            edgeroute_node::Node::build(edgeroute_node::NodeConfig::parse(&toml, |_| None)?)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(node.serve(listener, async {
            let _ = rx.await;
        }));
        stops.push(tx);
        let relay = Relay::start(addr).await?;
        static_nodes.push_str(&format!(
            "[[nodes]]\nid = \"{id}\"\nurl = \"http://{}\"\nregion = \"{region}\"\n",
            relay.addr()
        ));
        nodes.push(addr);
        relays.push(relay);
    }
    let toml = format!("[probe]\ninterval_ms = 200\ntimeout_ms = 150\n{static_nodes}");
    let d = edgeroute_discovery::Discovery::build(
        edgeroute_discovery::DiscoveryConfig::from_toml(&toml, |_| None)?,
    )?;
    let running = d.spawn(std::net::SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let disc = running.addr();
    let cfg = ClientConfig { discovery: vec![format!("http://{disc}")], ..Default::default() };
    let t = Instant::now();
    loop {
        let probe = Client::new(cfg.clone())?;
        if probe.discover("sim-llama").await.is_ok_and(|c| c.len() == 3) {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "discovery never verified the nodes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
    let mut session = client.session("sim-llama").await?;
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
        let mut s = client.session("sim-llama").await?;
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
    Ok(md)
}
