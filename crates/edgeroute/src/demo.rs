//! `edgeroute demo`: a three-region fleet on loopback, in this process, and a short story.
//!
//! Six simulator nodes (two each in Vancouver, Toronto and Montreal, with different speeds),
//! one discovery replica per region on the embedded bus, and clients in every region using the
//! SDK over emulated WAN links (`edgeroute_lab::wan`, real-geography RTTs): each session
//! discovers once, probes, pins, then streams its turns straight to its node.
//! The story, phase by phase: steady traffic; a node drained (sessions move between turns); a
//! node killed mid-stream (answers continued on another node); the whole control plane stopped
//! (new sessions start from the persisted candidate lists). Nothing outside the machine is
//! contacted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgeroute_client::{Client, ClientConfig, Stats};
use edgeroute_lab::relay::Relay;
use edgeroute_lab::wan::{LinkSpec, Wan, geo_rtt_ms};
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};

const NODES: [(&str, &str, u64); 6] = [
    ("van-1", "vancouver", 45),
    ("van-2", "vancouver", 60),
    ("tor-1", "toronto", 15),
    ("tor-2", "toronto", 30),
    ("mtl-1", "montreal", 25),
    ("mtl-2", "montreal", 40),
];
const REGIONS: [&str; 3] = ["vancouver", "toronto", "montreal"];
const PROMPTS: [&str; 4] = [
    "What's the weather like in Vancouver this afternoon?",
    "Book me a table for two in Toronto tomorrow at seven.",
    "Translate 'good morning' into French for my Montreal trip.",
    "How long is the drive from Toronto to Montreal?",
];

/// The demo's size.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// Sessions per phase.
    pub sessions: usize,
    /// Turns per session.
    pub turns: usize,
    pub seed: u64,
    /// A NATS server for the topology bus (every node and replica connects on its own, as on
    /// separate machines); default: the embedded bus.
    pub nats: Option<String>,
    /// Where to write the report (markdown); default: none.
    pub report: Option<std::path::PathBuf>,
}

struct Fleet {
    relays: Arc<std::sync::Mutex<Vec<Relay>>>,
    /// Every client region's delayed links to every node (real geography).
    wan: Wan,
    node_stops: Vec<tokio::sync::oneshot::Sender<()>>,
    discovery: Vec<edgeroute_discovery::Spawned>,
    secret: Vec<u8>,
    dir: std::path::PathBuf,
    /// What happened when, for the report: (seconds since start, what).
    timeline: Timeline,
    started: Instant,
}

type Timeline = Arc<std::sync::Mutex<Vec<(f64, String)>>>;

/// Something done to the fleet while a phase runs, given the turns served so far.
type During = Box<dyn FnOnce(&PhaseResult) + Send>;

#[derive(Debug, Default)]
struct PhaseResult {
    turns: usize,
    failed: usize,
    ttft_ms: Vec<f64>,
    nodes: std::collections::BTreeMap<String, usize>,
}

async fn start_fleet(dir: &std::path::Path, nats: Option<&str>) -> Result<Fleet> {
    let secret: [u8; 32] = rand::random();
    let secret_hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let secret_file = dir.join("hs256.secret");
    std::fs::write(&secret_file, &secret_hex)?;
    let embedded = edgeroute_bus::Bus::embedded(&edgeroute_bus::BusConfig::embedded())?;
    let bus_cfg = nats.map(|url| {
        // A bucket and subjects of this run's own, so earlier runs' nodes are not in view.
        let run = format!("demo_{}_{}", std::process::id(), rand::random::<u32>());
        edgeroute_bus::BusConfig {
            bucket: run.clone(),
            subject_prefix: format!("edgeroute.{run}"),
            ..edgeroute_bus::BusConfig::nats(url)
        }
    });
    let bus = async || -> Result<edgeroute_bus::Bus> {
        Ok(match &bus_cfg {
            Some(cfg) => edgeroute_bus::Bus::connect(cfg).await?,
            None => embedded.clone(),
        })
    };
    let mut relays = Vec::new();
    let mut node_stops = Vec::new();
    for (i, (id, region, ttft)) in NODES.iter().enumerate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        // Clients reach the node through a relay the demo can cut (a node dying).
        let relay = Relay::start(listener.local_addr()?).await?;
        let toml = format!(
            "[node]\nid = \"{id}\"\nregion = \"{region}\"\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://{}\"\n\
             [auth]\nhs256_secret_file = \"{}\"\n\
             [limits]\nrate_limit_per_s = 100000\nrate_limit_burst = 100000\n\
             [backend]\nkind = \"sim\"\n[backend.sim]\nseed = {i}\nttft_base_ms = {ttft}\ntokens_per_s = 400.0\n",
            relay.addr(),
            secret_file.display()
        );
        let node =
            edgeroute_node::Node::build(edgeroute_node::NodeConfig::parse(&toml, |_| None)?)?
                .with_bus(bus().await?);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(node.serve(listener, async {
            let _ = rx.await;
        }));
        relays.push(relay);
        node_stops.push(tx);
    }
    // Clients in each region reach each node over a link with that pair's real RTT and 1 ms
    // of jitter: nearest is not always fastest (a Montreal client's best is Toronto's fast node).
    let targets: Vec<(SocketAddr, &str)> =
        relays.iter().zip(NODES).map(|(r, (_, region, _))| (r.addr(), region)).collect();
    let wan =
        Wan::build(&REGIONS, &targets, |c, n| LinkSpec::rtt_ms(geo_rtt_ms(c, n), 1.0), 7).await?;
    let mut discovery = Vec::new();
    for region in REGIONS {
        let toml = format!(
            "[discovery]\nid = \"disc-{}\"\nregion = \"{region}\"\n[auth]\nhs256_secret_file = \"{}\"\n\
             [probe]\ninterval_ms = 250\ntimeout_ms = 200\n",
            &region[..3],
            secret_file.display()
        );
        let d = edgeroute_discovery::Discovery::build(
            edgeroute_discovery::DiscoveryConfig::from_toml(&toml, |_| None)?,
        )?
        .with_bus(bus().await?);
        discovery.push(d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
    }
    Ok(Fleet {
        relays: Arc::new(std::sync::Mutex::new(relays)),
        wan,
        node_stops,
        discovery,
        secret: secret_hex.into_bytes(),
        dir: dir.to_owned(),
        timeline: Arc::default(),
        started: Instant::now(),
    })
}

impl Fleet {
    fn mark(&self, what: impl Into<String>) {
        if let Ok(mut t) = self.timeline.lock() {
            t.push((self.started.elapsed().as_secs_f64(), what.into()));
        }
    }

    fn mint(&self, sub: &str, scope: edgeroute_auth::Scope) -> Result<String> {
        Ok(edgeroute_auth::mint(
            &edgeroute_auth::SigningKey::Hs256(self.secret.clone()),
            &edgeroute_auth::MintOptions {
                sub: sub.into(),
                scopes: scope.into(),
                aud: None,
                iss: None,
                ttl_s: 3600,
                now_unix_s: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs(),
                kid: None,
                nbf: None,
            },
        )?)
    }

    fn token(&self) -> Result<String> {
        self.mint("demo-tenant", edgeroute_auth::Scope::Inference)
    }

    /// A client in `region`: its own region's replica first, the others as fallbacks; the
    /// candidate list persisted per region.
    fn client(&self, region: usize, seed: u64) -> Result<Client> {
        let mut discovery: Vec<String> = Vec::new();
        for k in 0..REGIONS.len() {
            discovery
                .push(format!("http://{}", self.discovery[(region + k) % REGIONS.len()].addr()));
        }
        let cfg = ClientConfig {
            discovery,
            token: Some(self.token()?),
            cache_file: Some(self.dir.join(format!("lists-{}.json", REGIONS[region]))),
            seed: Some(seed),
            stall_timeout: Duration::from_millis(500),
            home_region: Some(REGIONS[region].to_owned()),
            ..ClientConfig::default()
        };
        let (timeline, started) = (self.timeline.clone(), self.started);
        let listener: edgeroute_client::Listener = Arc::new(move |e: &edgeroute_client::Event| {
            use edgeroute_client::Event as E;
            let what = match e {
                E::Failover { from, to, reason } => format!("failover {from} → {to}: {reason}"),
                E::Hedged { from, to, after_ms } => {
                    format!("hedge {from} → {to} after {after_ms} ms")
                }
                E::Migrated { from, to, reason } => format!("move {from} → {to}: {reason}"),
                E::Ejected { node, for_ms } => format!("{node} ejected for {for_ms} ms"),
                _ => return,
            };
            if let Ok(mut t) = timeline.lock() {
                t.push((started.elapsed().as_secs_f64(), what));
            }
        });
        Ok(Client::with_transport(cfg, Some(listener), self.wan.transport(REGIONS[region]))?)
    }

    async fn admin_drain(&self, node: usize) -> Result<()> {
        let token = self.mint("operator", edgeroute_auth::Scope::Admin)?;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let addr = self.relays.lock().map_err(|_| anyhow::anyhow!("relays"))?[node].addr();
        let req = http::Request::post(format!("http://{addr}/admin/drain"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"{\"deadline_ms\": 60000}",
            )))?;
        let res = client.request(req).await?;
        anyhow::ensure!(res.status().is_success(), "drain answered {}", res.status());
        Ok(())
    }
}

/// Runs `opts.sessions` sessions of `opts.turns` streamed turns, from clients spread over the
/// regions; `during` runs once the first turns are under way (a fault, a drain).
async fn phase(
    opts: &DemoOpts,
    salt: u64,
    clients: &[Client],
    during: Option<During>,
) -> PhaseResult {
    let results = Arc::new(std::sync::Mutex::new(PhaseResult::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.sessions {
        let client = clients[i % clients.len()].clone();
        let results = results.clone();
        let turns = opts.turns;
        tasks.spawn(async move {
            // Sessions arrive over time, as callers do, not all in the same millisecond.
            tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
            let mut s = match client.session("sim-llama").await {
                Ok(s) => s,
                Err(_) => {
                    if let Ok(mut r) = results.lock() {
                        r.turns += turns;
                        r.failed += turns;
                    }
                    return;
                }
            };
            for t in 0..turns {
                let prompt = PROMPTS[(i + t + salt as usize) % PROMPTS.len()];
                let mut req = ChatCompletionRequest::new(
                    "sim-llama",
                    vec![ChatMessage::new(Role::User, prompt)],
                );
                req.max_tokens = Some(24);
                let start = Instant::now();
                let mut node = String::new();
                let outcome = async {
                    let mut stream = s.chat_stream(&req).await?;
                    node = stream.node().to_owned();
                    let mut ttft = None;
                    while let Some(c) = stream.next().await {
                        c?;
                        ttft.get_or_insert_with(|| start.elapsed());
                    }
                    Ok::<_, edgeroute_client::ClientError>(ttft)
                }
                .await;
                if let Ok(mut r) = results.lock() {
                    r.turns += 1;
                    match outcome {
                        Ok(ttft) => {
                            r.ttft_ms.push(ttft.unwrap_or_default().as_secs_f64() * 1000.0);
                            *r.nodes.entry(node).or_default() += 1;
                        }
                        Err(_) => r.failed += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });
    }
    // On a terminal: one progress line, rewritten in place (never a log flood).
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let (results, clients) = (results.clone(), clients.to_vec());
        let (want, base) = (opts.sessions * opts.turns, total(&clients));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(r) = results.lock().map(|r| {
                    let s = total(&clients);
                    format!(
                        "\r   {}/{want} turns, {} failed, TTFT p50 {:.0} ms p99 {:.0} ms, failovers {}, moves {}   ",
                        r.turns,
                        r.failed,
                        pct(&r.ttft_ms, 0.5),
                        pct(&r.ttft_ms, 0.99),
                        s.failovers - base.failovers,
                        s.migrations - base.migrations
                    )
                }) else {
                    return;
                };
                eprint!("{r}");
            }
        })
    });
    if let Some(f) = during {
        // Once most sessions are under way.
        tokio::time::sleep(Duration::from_millis(40 * opts.sessions as u64 * 2 / 3)).await;
        if let Ok(r) = results.lock() {
            f(&r);
        }
    }
    while tasks.join_next().await.is_some() {}
    if let Some(p) = progress {
        p.abort();
        eprint!("\r{:100}\r", "");
    }
    results.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default()
}

fn pct(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0)
}

fn total(clients: &[Client]) -> Stats {
    clients.iter().map(Client::stats).fold(Stats::default(), |a, b| a + b)
}

fn record(name: &str, r: &PhaseResult, clients: &[Client], before: &mut Stats, md: &mut String) {
    let now = total(clients);
    let (p50, p99) = (pct(&r.ttft_ms, 0.5), pct(&r.ttft_ms, 0.99));
    let (failovers, moves) = (now.failovers - before.failovers, now.migrations - before.migrations);
    let nodes: Vec<String> = r.nodes.iter().map(|(n, c)| format!("{n}×{c}")).collect();
    println!(
        "   {} turns, {} failed, TTFT p50 {p50:.0} ms p99 {p99:.0} ms, failovers {failovers}, moves {moves}",
        r.turns, r.failed
    );
    md.push_str(&format!(
        "| {name} | {} | {} | {p50:.0} | {p99:.0} | {failovers} | {moves} | {} | {} |\n",
        r.turns,
        r.failed,
        now.cached_lists - before.cached_lists,
        nodes.join(" ")
    ));
    *before = now;
}

pub async fn run(opts: DemoOpts) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("edgeroute-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut fleet = start_fleet(&dir, opts.nats.as_deref()).await.context("starting the fleet")?;
    println!(
        "edgeroute demo: 6 simulator nodes in 3 regions, a discovery replica per region, clients in every region\n\
         over emulated WAN links (same region 3 ms RTT, Toronto-Montreal 9 ms, to Vancouver 60-66 ms)\n"
    );
    // Until every replica has verified the fleet.
    let probe = fleet.client(0, opts.seed)?;
    let t = Instant::now();
    while probe.discover("sim-llama").await.map_or(0, |c| c.len()) < 5 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "discovery never verified the fleet"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let clients: Vec<Client> =
        (0..3).map(|r| fleet.client(r, opts.seed + r as u64)).collect::<Result<_>>()?;

    let mut md = String::from(
        "| phase | turns | failed | TTFT p50 (ms) | TTFT p99 (ms) | failovers | moves | lists from cache | nodes used |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let mut before = total(&clients);

    let mut phases: Vec<(String, PhaseResult)> = Vec::new();
    println!("1. steady traffic: each session pins the node that answers its region fastest");
    fleet.mark("phase 1: steady traffic");
    let r = phase(&opts, 0, &clients, None).await;
    record("steady", &r, &clients, &mut before, &mut md);
    phases.push(("steady".into(), r));

    println!("2. tor-1 is drained: its sessions finish the turn, then move");
    fleet.mark("phase 2: tor-1 drained");
    fleet.admin_drain(2).await?;
    let r = phase(&opts, 1, &clients, None).await;
    record("tor-1 drained", &r, &clients, &mut before, &mut md);
    phases.push(("tor-1 drained".into(), r));

    println!("3. the busiest node dies mid-stream: answers are continued on another node");
    fleet.mark("phase 3: the busiest node will be killed");
    let victim = Arc::new(std::sync::Mutex::new(String::new()));
    let kill = {
        let (relays, victim) = (fleet.relays.clone(), victim.clone());
        let (timeline, started) = (fleet.timeline.clone(), fleet.started);
        Box::new(move |so_far: &PhaseResult| {
            // The node serving the most turns so far.
            let Some((name, _)) = so_far.nodes.iter().max_by_key(|(_, c)| **c) else { return };
            if let (Some(i), Ok(mut relays)) =
                (NODES.iter().position(|(id, _, _)| id == name), relays.lock())
            {
                relays[i].cut();
                if let Ok(mut v) = victim.lock() {
                    v.clone_from(name);
                }
                if let Ok(mut t) = timeline.lock() {
                    t.push((started.elapsed().as_secs_f64(), format!("{name} killed")));
                }
            }
        }) as During
    };
    let r = phase(&opts, 2, &clients, Some(kill)).await;
    let victim = victim.lock().map(|v| v.clone()).unwrap_or_default();
    println!("   ({victim} was killed)");
    record(&format!("{victim} killed mid-stream"), &r, &clients, &mut before, &mut md);
    phases.push((format!("{victim} killed mid-stream"), r));

    println!("4. the whole control plane stops: new clients start from persisted lists");
    fleet.mark("phase 4: every discovery replica stopped");
    // Stopped, but their addresses stay in the clients' configuration: unreachable.
    for d in &mut fleet.discovery {
        d.stop();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cold: Vec<Client> =
        (0..3).map(|r| fleet.client(r, opts.seed + 10 + r as u64)).collect::<Result<_>>()?;
    before = total(&cold);
    let r = phase(&opts, 3, &cold, None).await;
    record("discovery down, new clients", &r, &cold, &mut before, &mut md);
    phases.push(("discovery down, new clients".into(), r));
    if let Some(dir) = &opts.report {
        let timeline = fleet.timeline.lock().map(|t| t.clone()).unwrap_or_default();
        write_report(dir, &opts, &md, &phases, &timeline)?;
        println!("report written to {}", dir.display());
    }

    for s in fleet.node_stops.drain(..) {
        let _ = s.send(());
    }
    std::fs::remove_dir_all(&dir).ok();
    println!("\n{md}");
    Ok(md)
}

/// TTFT buckets of the report, ms.
const BUCKETS: [(f64, f64); 6] = [
    (0.0, 25.0),
    (25.0, 50.0),
    (50.0, 100.0),
    (100.0, 200.0),
    (200.0, 400.0),
    (400.0, f64::INFINITY),
];

/// The report: the summary, each phase's TTFT distribution, and the timeline of faults and
/// the clients' decisions, as markdown in `dir/report.md` with PNG charts beside it.
fn write_report(
    dir: &std::path::Path,
    opts: &DemoOpts,
    summary: &str,
    phases: &[(String, PhaseResult)],
    timeline: &[(f64, String)],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut md = format!(
        "# edgeroute demo report\n\nSix simulator nodes in Vancouver, Toronto and Montreal; a discovery replica per \
         region on the {} bus; clients in every region over emulated WAN links. {} sessions × {} streamed \
         turns per phase, seed {}.\n\n## Summary\n\n{summary}\n## Time to first token, per phase (turns per bucket)\n\n",
        if opts.nats.is_some() { "NATS" } else { "embedded" },
        opts.sessions,
        opts.turns,
        opts.seed
    );
    md.push_str("| phase |");
    for (lo, hi) in BUCKETS {
        if hi.is_finite() {
            md.push_str(&format!(" {lo:.0}–{hi:.0} ms |"));
        } else {
            md.push_str(&format!(" ≥ {lo:.0} ms |"));
        }
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(BUCKETS.len()));
    md.push('\n');
    for (name, r) in phases {
        md.push_str(&format!("| {name} |"));
        for (lo, hi) in BUCKETS {
            let n = r.ttft_ms.iter().filter(|t| **t >= lo && **t < hi).count();
            md.push_str(&format!(" {n} |"));
        }
        md.push('\n');
    }
    // The same distribution as a chart: groups are the buckets, bars the phases.
    let series: Vec<Vec<f64>> = phases
        .iter()
        .map(|(_, r)| {
            BUCKETS
                .iter()
                .map(|(lo, hi)| r.ttft_ms.iter().filter(|t| **t >= *lo && **t < *hi).count() as f64)
                .collect()
        })
        .collect();
    edgeroute_lab::chart::grouped_bars(&series).save(&dir.join("ttft.png"))?;
    let legend: Vec<String> = phases
        .iter()
        .zip(edgeroute_lab::chart::PALETTE)
        .map(|((name, _), (colour, _))| format!("{colour} = {name}"))
        .collect();
    md.push_str(&format!(
        "\n![TTFT per phase](ttft.png)\n\n*Turns per TTFT bucket (1 = 0–25 ms … 6 = ≥ 400 ms); {}.*\n",
        legend.join(", ")
    ));
    // The timeline as a chart: one lane per kind of event.
    let lanes: [(&str, &str, usize); 6] = [
        ("phase", "grey", 5),
        ("killed", "red", 3),
        ("failover", "orange", 1),
        ("move", "blue", 0),
        ("hedge", "purple", 4),
        ("ejected", "green", 2),
    ];
    let marks: Vec<(f64, usize, edgeroute_lab::chart::Rgb)> = timeline
        .iter()
        .filter_map(|(t, what)| {
            let lane = lanes.iter().position(|(key, _, _)| what.contains(key))?;
            Some((*t, lane, edgeroute_lab::chart::PALETTE[lanes[lane].2].1))
        })
        .collect();
    let end = timeline.iter().map(|(t, _)| *t).fold(0.0, f64::max) + 0.5;
    edgeroute_lab::chart::timeline(end, lanes.len(), &marks).save(&dir.join("timeline.png"))?;
    let lane_names: Vec<String> =
        lanes.iter().enumerate().map(|(i, (k, c, _))| format!("{} {k} ({c})", i + 1)).collect();
    md.push_str(&format!(
        "\n## Timeline (seconds since the fleet started)\n\n![timeline](timeline.png)\n\n*Lanes, top to bottom: {}.*\n\n| t (s) | what |\n|---:|---|\n",
        lane_names.join(", ")
    ));
    for (t, what) in timeline {
        md.push_str(&format!("| {t:.2} | {} |\n", what.replace('|', "/")));
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A short demo as a smoke test: every phase completes with no failed turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_story_runs_without_a_failed_turn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = dir.path().join("report");
        let opts =
            DemoOpts { sessions: 6, turns: 3, seed: 1, nats: None, report: Some(report.clone()) };
        let md = run(opts).await.expect("demo");
        for line in md.lines().skip(2) {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(cols[3], "0", "failed turns in: {line}");
        }
        assert_eq!(md.lines().count(), 6, "{md}");
        let written = std::fs::read_to_string(report.join("report.md")).expect("report.md");
        assert!(written.contains("## Time to first token, per phase"), "{written}");
        assert!(written.contains(" killed"), "the kill is on the timeline: {written}");
        assert!(written.contains("failover "), "the failovers are on the timeline: {written}");
        for png in ["ttft.png", "timeline.png"] {
            let bytes = std::fs::read(report.join(png)).expect(png);
            assert_eq!(&bytes[..4], b"\x89PNG", "{png}");
        }
    }
}
