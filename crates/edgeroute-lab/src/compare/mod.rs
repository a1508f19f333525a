//! Routing architectures compared on one emulated network, workload and seed
//! (`edgeroute bench fleet`): DNS-style global load balancing, a central proxy, edgeroute,
//! and an oracle that knows every true latency and queue.
//!
//! Every run starts a fresh [`world::World`] (six simulator nodes behind their real gateways,
//! three discovery replicas, all on an in-memory network with real-geography path delays) and
//! plays the same [`workload`] — voice-agent sessions from several sites — through one
//! [`Strategy`]. A [`Scenario`] adds a node dying (black-holed mid-run) or a congested ISP
//! (Toronto callers whose nearest nodes are not their fastest). The report
//! ([`report::Table`]) gives, per strategy: TTFT p50/p99, routing overhead per request, share
//! of turns on the truly best node, failed requests, dead air, and load balance.
//!
//! The network runs on tokio's clock: tests run it paused (every run of a seed the same run,
//! in a fraction of the time); the CLI runs it in real time.

pub mod dns_route;
pub mod report;
pub mod strategy;
pub mod workload;
pub mod world;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
use tokio::time::Instant;

use strategy::{Central, Ear, Gslb, Limits, ROUTER_HOST, attempt, best_node, oracle_pick};
use workload::{SessionPlan, WorkloadSpec};
use world::{NODES, SITES, Site, World, discovery_host, node_index};

/// The model every node serves.
pub const MODEL: &str = "sim-llama";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Callers from Vancouver, Toronto and Montreal; nothing fails.
    Steady,
    /// As steady; 40 % into the run, the node that has served the strategy the most requests
    /// is black-holed (each strategy loses its own busiest node).
    NodeDeath,
    /// Half the Toronto callers are on a congested ISP (Toronto 53 ms away, Montreal 9 ms).
    CongestedIsp,
    /// As steady; 40 % into the run, the node that has served the strategy the most requests
    /// unloads the LLM (an operator frees its memory): the node stays up, the model is gone.
    ModelUnload,
}

impl Scenario {
    pub const ALL: [Scenario; 4] =
        [Scenario::Steady, Scenario::NodeDeath, Scenario::CongestedIsp, Scenario::ModelUnload];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::NodeDeath => "node death",
            Scenario::CongestedIsp => "congested ISP",
            Scenario::ModelUnload => "model unload",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        match s {
            "steady" => Some(Scenario::Steady),
            "death" | "node-death" => Some(Scenario::NodeDeath),
            "congested" | "congested-isp" => Some(Scenario::CongestedIsp),
            "unload" | "model-unload" => Some(Scenario::ModelUnload),
            _ => None,
        }
    }

    fn sites(self) -> Vec<(&'static str, f64)> {
        match self {
            Scenario::Steady | Scenario::NodeDeath | Scenario::ModelUnload => {
                vec![("vancouver", 0.3), ("toronto", 0.4), ("montreal", 0.3)]
            }
            Scenario::CongestedIsp => vec![
                ("vancouver", 0.3),
                ("toronto", 0.2),
                ("toronto-congested", 0.2),
                ("montreal", 0.3),
            ],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Strategy {
    Dns,
    Central,
    Edgeroute,
    /// edgeroute's SDK told only the zone name: the fleet's GeoDNS says where to ask.
    EdgerouteDns,
    Oracle,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::Dns,
        Strategy::Central,
        Strategy::Edgeroute,
        Strategy::EdgerouteDns,
        Strategy::Oracle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Dns => "DNS-style (geo map, 30 s TTL)",
            Strategy::Central => "central proxy (Toronto)",
            Strategy::Edgeroute => "edgeroute",
            Strategy::EdgerouteDns => "edgeroute (DNS bootstrap)",
            Strategy::Oracle => "oracle",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        match s {
            "dns" => Some(Strategy::Dns),
            "central" => Some(Strategy::Central),
            "edgeroute" => Some(Strategy::Edgeroute),
            "edgeroute-dns" => Some(Strategy::EdgerouteDns),
            "oracle" => Some(Strategy::Oracle),
            _ => None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct CompareOpts {
    pub seed: u64,
    /// Sessions arrive during this long (each run lasts until its last session ends).
    pub duration: Duration,
    pub sessions_per_s: f64,
    pub turns: usize,
    pub think: (Duration, Duration),
    pub max_tokens: u32,
    pub scenarios: Vec<Scenario>,
    pub strategies: Vec<Strategy>,
}

impl Default for CompareOpts {
    fn default() -> Self {
        CompareOpts {
            seed: 1,
            duration: Duration::from_secs(30),
            sessions_per_s: 4.0,
            turns: 6,
            // As people speak: 2-12 s between a caller's turns.
            think: (Duration::from_secs(2), Duration::from_secs(12)),
            max_tokens: 24,
            scenarios: Scenario::ALL.to_vec(),
            strategies: Strategy::ALL.to_vec(),
        }
    }
}

impl CompareOpts {
    pub fn workload(&self, scenario: Scenario) -> WorkloadSpec {
        WorkloadSpec {
            sessions_per_s: self.sessions_per_s,
            duration: self.duration,
            turns: self.turns,
            think: self.think,
            sites: scenario.sites(),
            max_tokens: self.max_tokens,
        }
    }

    /// When the victim dies (or unloads the model), since the run started.
    pub fn death_at(&self, scenario: Scenario) -> Option<Duration> {
        matches!(scenario, Scenario::NodeDeath | Scenario::ModelUnload)
            .then(|| self.duration.mul_f64(0.4))
    }
}

/// One turn as the caller lived it.
#[derive(Debug, Clone)]
pub struct TurnRecord {
    pub session: usize,
    pub turn: usize,
    pub site: &'static str,
    /// Since the run started.
    pub start: Duration,
    pub ttft_ms: Option<f64>,
    /// The node that served it (the first attempt's, for a continued answer).
    pub node: Option<usize>,
    /// Attempts that failed as the caller's code saw them (a broken stream, an error).
    pub failed_attempts: u32,
    /// The caller got a whole answer (after retries, if any).
    pub ok: bool,
    pub longest_silence_ms: f64,
    /// Time to first token beyond the node's own and the direct path's, for a turn served
    /// cleanly by one request.
    pub overhead_ms: Option<f64>,
    /// The best live node for the site on an idle fleet, when the turn started.
    pub best: Option<usize>,
}

/// Runs every scenario × strategy of `opts`, each on a fresh world; `progress` hears each
/// finished run.
pub async fn run(opts: &CompareOpts, progress: &dyn Fn(&report::Row)) -> Result<Vec<report::Row>> {
    let mut rows = Vec::new();
    for &scenario in &opts.scenarios {
        for &strategy in &opts.strategies {
            let run = run_one(opts, scenario, strategy)
                .await
                .with_context(|| format!("{} / {}", scenario.name(), strategy.name()))?;
            let row = report::Row::new(scenario, strategy, &run);
            progress(&row);
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Attempts per turn before the caller gives up.
const ATTEMPTS: u32 = 4;

/// One scenario through one strategy.
pub async fn run_one(opts: &CompareOpts, scenario: Scenario, strategy: Strategy) -> Result<Run> {
    let world = Arc::new(World::start(opts.seed).await?);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let limits = Limits::default();
    // Until discovery has verified the whole fleet (every strategy starts on a ready fleet).
    let probe = sdk_client(&world, SITES[1], opts.seed)?;
    let t = Instant::now();
    loop {
        let seen = probe.discover(MODEL).await;
        // (Discovery answers its top 5.)
        if seen.as_ref().is_ok_and(|c| c.len() >= 5) {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(20),
            "discovery never saw the whole fleet: {:?}",
            seen.map(|c| c.into_iter().map(|c| c.id).collect::<Vec<_>>())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    world.warm_up(8).await?;
    let route = Arc::new(match strategy {
        Strategy::Dns => Route::Dns(Gslb::start(world.liveness(), stopped.clone())),
        Strategy::Central => {
            // Serves on its own task until `stop`.
            Central::start(&world.net, limits, stopped.clone());
            Route::Central
        }
        Strategy::Edgeroute | Strategy::EdgerouteDns => {
            let mut clients = Vec::new();
            for (k, site) in SITES.iter().enumerate() {
                let seed = opts.seed + 100 + k as u64;
                let c = match strategy {
                    Strategy::EdgerouteDns => sdk_client_dns(&world, k, seed)?,
                    _ => sdk_client(&world, *site, seed)?,
                };
                // As a voice-agent server does at start-up, before calls arrive.
                c.prepare(MODEL).await?;
                clients.push((site.name, c));
            }
            Route::Edgeroute(clients)
        }
        Strategy::Oracle => Route::Oracle,
    });
    let plans = opts.workload(scenario).generate(opts.seed);
    let t0 = Instant::now();
    let death_at = opts.death_at(scenario);
    let victim: Arc<std::sync::OnceLock<usize>> = Arc::default();
    if let Some(at) = death_at {
        let (w, v) = (world.clone(), victim.clone());
        let before = world.served();
        tokio::spawn(async move {
            tokio::time::sleep_until(t0 + at).await;
            let now = w.served();
            let busiest = (0..NODES.len()).max_by_key(|i| (now[*i] - before[*i], usize::MAX - i));
            if let Some(i) = busiest {
                let _ = v.set(i);
                if scenario == Scenario::ModelUnload {
                    if let Err(e) = w.unload(i).await {
                        eprintln!("unloading the model failed: {e}");
                    }
                } else {
                    w.kill(i);
                }
            }
        });
    }
    let mut tasks = tokio::task::JoinSet::new();
    for plan in plans {
        let (world, route, victim) = (world.clone(), route.clone(), victim.clone());
        let max_tokens = opts.max_tokens;
        tasks.spawn(async move {
            tokio::time::sleep_until(t0 + plan.start).await;
            let death = death_at.map(|at| (at, victim));
            session(&world, &route, &plan, t0, death, max_tokens, limits).await
        });
    }
    let mut records = Vec::new();
    while let Some(r) = tasks.join_next().await {
        records.extend(r.context("a session task panicked")?);
    }
    let _ = stop.send(true);
    // Overheads, from what the nodes saw.
    for r in &mut records {
        if !r.ok || r.failed_attempts > 0 {
            continue;
        }
        let seen = world.tap.requests(&turn_id(r.session, r.turn));
        let (Some(ttft), [one]) = (r.ttft_ms, seen.as_slice()) else { continue };
        let (Some(first), Some(site)) = (one.first_token, Site::by_name(r.site)) else { continue };
        let node_ms = (first - one.arrived).as_secs_f64() * 1000.0;
        r.overhead_ms = Some(ttft - node_ms - site.rtt_ms(NODES[one.node].region));
    }
    records.sort_by_key(|r| (r.session, r.turn));
    Ok(Run { records, victim: victim.get().copied() })
}

/// One scenario through one strategy: every turn, and the node that died (if one did).
#[derive(Debug, Clone)]
pub struct Run {
    pub records: Vec<TurnRecord>,
    pub victim: Option<usize>,
}

enum Route {
    Dns(Arc<Gslb>),
    Central,
    Edgeroute(Vec<(&'static str, edgeroute_client::Client)>),
    Oracle,
}

fn turn_id(session: usize, turn: usize) -> String {
    format!("s{session}-t{turn}")
}

/// An SDK client at `site`, configured as a voice agent would be: its region's discovery
/// replica first, the others as fallbacks, the baselines' limits.
fn sdk_client(world: &World, site: Site, seed: u64) -> Result<edgeroute_client::Client> {
    let home = world::REGIONS.iter().position(|r| *r == site.region).unwrap_or(0);
    let discovery = (0..world::REGIONS.len())
        .map(|k| format!("http://{}", discovery_host(world::REGIONS[(home + k) % 3])))
        .collect();
    let cfg = edgeroute_client::ClientConfig { discovery, ..sdk_config(site, seed) };
    Ok(edgeroute_client::Client::with_transport(cfg, None, Arc::new(world.net.from(site.name)))?)
}

/// Site `k`'s SDK told only the zone name (see [`dns_route`]).
fn sdk_client_dns(world: &World, k: usize, seed: u64) -> Result<edgeroute_client::Client> {
    let site = SITES[k];
    let cfg = edgeroute_client::ClientConfig {
        discovery: vec![dns_route::ENTRY.to_owned()],
        dns_servers: vec![dns_route::NAMESERVER],
        ..sdk_config(site, seed)
    };
    let transport = dns_route::DnsTransport::new(world.net.from(site.name), k)?;
    Ok(edgeroute_client::Client::with_transport(cfg, None, Arc::new(transport))?)
}

/// What every site's SDK shares: its home region, the seed, the baselines' limits.
fn sdk_config(site: Site, seed: u64) -> edgeroute_client::ClientConfig {
    let limits = Limits::default();
    edgeroute_client::ClientConfig {
        home_region: Some(site.region.to_owned()),
        seed: Some(seed),
        connect_timeout: limits.connect,
        first_token_timeout: limits.first_token,
        stall_timeout: limits.stall,
        ..edgeroute_client::ClientConfig::default()
    }
}

/// Plays one session's turns through `route`.
async fn session(
    world: &World,
    route: &Route,
    plan: &SessionPlan,
    t0: Instant,
    death: Option<(Duration, Arc<std::sync::OnceLock<usize>>)>,
    max_tokens: u32,
    limits: Limits,
) -> Vec<TurnRecord> {
    let site = Site::by_name(plan.site).unwrap_or(SITES[1]);
    let net = world.net.from(site.name);
    let mut dns: Option<(Instant, Vec<usize>)> = None;
    let mut sdk: Option<edgeroute_client::Session> = None;
    let mut out = Vec::new();
    for (k, turn) in plan.turns.iter().enumerate() {
        tokio::time::sleep(turn.think).await;
        let mut req =
            ChatCompletionRequest::new(MODEL, vec![ChatMessage::new(Role::User, turn.prompt)]);
        req.max_tokens = Some(max_tokens);
        req.stream = true;
        req.extra.insert("user".into(), turn_id(plan.id, k).into());
        let start = t0.elapsed();
        let mut ear = Ear::starting_now();
        let mut failed = 0u32;
        let mut node = None;
        let mut ok = false;
        let mut tried: Vec<usize> = Vec::new();
        let body = Bytes::from(serde_json::to_vec(&req).unwrap_or_default());
        while failed < ATTEMPTS && !ok {
            let result = match route {
                Route::Edgeroute(clients) => {
                    let client = clients.iter().find(|(n, _)| *n == site.name).map(|(_, c)| c);
                    match client {
                        Some(c) => sdk_turn(c, &mut sdk, &req, &mut ear).await,
                        None => Err("no client for the site".into()),
                    }
                }
                _ => match baseline_target(route, world, &site, &mut dns, &mut tried, max_tokens)
                    .await
                {
                    Some(h) => attempt(&net, &h, body.clone(), limits, &mut ear)
                        .await
                        .map(|n| node_index(&n))
                        .map_err(|e| e.to_string()),
                    None => Err("no address".into()),
                },
            };
            match result {
                Ok(n) => {
                    ok = true;
                    node = node.or(n);
                }
                Err(_) => failed += 1,
            }
        }
        if !ok {
            ear.gave_up();
        }
        // The best node among those alive when the turn started.
        let dead =
            death.as_ref().filter(|(at, _)| start >= *at).and_then(|(_, v)| v.get().copied());
        let alive = |i: usize| Some(i) != dead;
        out.push(TurnRecord {
            session: plan.id,
            turn: k,
            site: plan.site,
            start,
            ttft_ms: ear.first_token.map(|t| (t - ear.start).as_secs_f64() * 1000.0),
            node,
            failed_attempts: failed,
            ok,
            longest_silence_ms: ear.longest_silence.as_secs_f64() * 1000.0,
            overhead_ms: None,
            best: best_node(&site, &alive),
        });
    }
    out
}

/// Where a baseline sends its next attempt: the router, or a node — DNS's next address, the
/// oracle's pick — which is noted in `tried`.
async fn baseline_target(
    route: &Route,
    world: &World,
    site: &Site,
    dns: &mut Option<(Instant, Vec<usize>)>,
    tried: &mut Vec<usize>,
    max_tokens: u32,
) -> Option<String> {
    let i = match route {
        Route::Central => return Some(ROUTER_HOST.to_owned()),
        Route::Edgeroute(_) => return None,
        Route::Dns(gslb) => {
            if dns.as_ref().is_none_or(|(expires, _)| *expires <= Instant::now()) {
                *dns = Some(gslb.resolve(site).await);
            }
            let answer = dns.as_ref().map(|(_, a)| a.as_slice()).unwrap_or_default();
            answer.iter().find(|i| !tried.contains(i)).or(answer.first()).copied()?
        }
        Route::Oracle => oracle_pick(site, &|i| world.serves(i), &world.tap, max_tokens, tried)?,
    };
    tried.push(i);
    Some(NODES[i].id.to_owned())
}

/// One attempt through the SDK: the session is opened on the first turn (discovery and
/// probes count in that turn's time to first token).
async fn sdk_turn(
    client: &edgeroute_client::Client,
    session: &mut Option<edgeroute_client::Session>,
    req: &ChatCompletionRequest,
    ear: &mut Ear,
) -> Result<Option<usize>, String> {
    if session.is_none() {
        *session = Some(client.session(MODEL).await.map_err(|e| e.to_string())?);
    }
    let Some(s) = session.as_mut() else { return Err("no session".into()) };
    let mut stream = s.chat_stream(req).await.map_err(|e| e.to_string())?;
    let node = node_index(stream.node());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if chunk.choices.iter().any(|c| c.delta.content.as_deref().is_some_and(|t| !t.is_empty())) {
            ear.heard();
        }
    }
    Ok(node)
}
