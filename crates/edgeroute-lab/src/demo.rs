//! `edgeroute-lab demo`: a three-region fleet on loopback, in this process, and a short story.
//!
//! Six nodes (two each in Vancouver, Toronto and Montreal, with different speeds and different
//! models: every node serves the LLM, speech-to-text and text-to-speech sit on some, and
//! `van-1` holds the three-GPU voice pipeline), one discovery replica per region on the
//! embedded bus (or NATS), and voice-agent clients in every region using the SDK over emulated
//! WAN links ([`crate::wan`], real-geography RTTs). Each turn is a real voice turn: a WAV clip
//! uploaded to `/v1/audio/transcriptions`, its transcript streamed through the LLM, the answer
//! sent to `/v1/audio/speech` — each model on the session its client pinned for it
//! (discovery once, probes, pin, then straight to the node), the audio calls through
//! `Session::call`'s failover ladder.
//! The story, phase by phase: steady traffic; a model loaded on a node at run time and
//! traffic finding it; a node drained (sessions move between turns); a node killed mid-stream
//! (answers continued on another node); the whole control plane stopped (new sessions start
//! from the persisted candidate lists). Nothing outside the machine is contacted, unless real
//! upstreams are put behind the nodes (`--backend openai --upstream URL`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgeroute_client::{Client, ClientConfig, RawRequest, Session, Stats};
use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};

use crate::compare::report::BUCKETS;
use crate::fleet::{FleetAuth, FleetBackend, FleetSpec, LLM, STT, TTS};
use crate::relay::Relay;
use crate::voice::{self, RouteFigures};
use crate::wan::{LinkSpec, Wan, geo_rtt_ms};

/// The model loaded at run time, and where.
const LOADED: &str = "sim-qwen";
const LOAD_ON: usize = 5;

/// The voice the answers are spoken in.
const VOICE: &str = "alloy";

/// What callers say: the prompts of LLM-only turns; in voice turns, a clip per prompt (its
/// transcript, the simulator's, is what the LLM is asked).
const PROMPTS: [&str; 4] = [
    "What's the weather like in Vancouver this afternoon?",
    "Book me a table for two in Toronto tomorrow at seven.",
    "Translate 'good morning' into French for my Montreal trip.",
    "How long is the drive from Toronto to Montreal?",
];

/// What the nodes serve with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoBackend {
    /// The built-in simulator, with the demo's placement of models.
    Sim,
    /// A real OpenAI-compatible upstream (llama.cpp, vLLM…) behind every node; `model` is the
    /// upstream's. Turns are then LLM only (no speech models), and nothing is loaded at run
    /// time.
    OpenAi { upstream: String, model: String },
}

impl DemoBackend {
    /// The backend the command line names: `--backend sim` (no `--upstream`), or `--backend
    /// openai --upstream URL [--model NAME]` (default model: the first the upstream lists).
    pub async fn from_flags(
        backend: &str,
        upstream: Option<String>,
        model: Option<String>,
    ) -> Result<DemoBackend> {
        match (backend, upstream) {
            ("sim", None) => Ok(DemoBackend::Sim),
            ("sim", Some(_)) => anyhow::bail!("--upstream needs --backend openai"),
            ("openai", Some(upstream)) => {
                let upstream = upstream.trim_end_matches('/').to_owned();
                let model = match model {
                    Some(m) => m,
                    None => upstream_model(&upstream).await?,
                };
                Ok(DemoBackend::OpenAi { upstream, model })
            }
            ("openai", None) => anyhow::bail!("--backend openai needs --upstream URL"),
            (other, _) => anyhow::bail!("--backend: `{other}` is not sim or openai"),
        }
    }
}

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
    /// How long the story's traffic lasts: each phase's sessions arrive spread over its share
    /// of it. Default (`None`): a session every 40 ms.
    pub duration: Option<Duration>,
    pub backend: DemoBackend,
}

impl DemoOpts {
    /// The story's phases (the load phase needs the simulator).
    fn phases(&self) -> u32 {
        if self.backend == DemoBackend::Sim { 5 } else { 4 }
    }

    /// The gap between two sessions' arrivals in a phase.
    fn spacing(&self) -> Duration {
        match self.duration {
            Some(d) => d / self.phases() / self.sessions.max(1) as u32,
            None => Duration::from_millis(40),
        }
    }

    fn llm(&self) -> &str {
        match &self.backend {
            DemoBackend::Sim => LLM,
            DemoBackend::OpenAi { model, .. } => model,
        }
    }

    fn voice(&self) -> bool {
        self.backend == DemoBackend::Sim
    }
}

struct Fleet {
    spec: FleetSpec,
    relays: Arc<std::sync::Mutex<Vec<Relay>>>,
    /// Each node's own listener (behind its relay): the operator's view of `/metrics`, which
    /// a cut relay (a node "killed" for its clients) leaves readable.
    node_addrs: Vec<SocketAddr>,
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
    /// Failed turns by the step that failed (`stt`, `llm`, `tts`) and why, first words only.
    failures: std::collections::BTreeMap<String, usize>,
    /// The transcription answered, from the turn's start (voice turns).
    stt_ms: Vec<f64>,
    /// The LLM answer's first token, from the LLM request (after STT).
    ttft_ms: Vec<f64>,
    /// Time to first audio: from the turn's start (its audio sent) to the speech answer's
    /// first byte in the caller's hands (voice turns).
    ttfa_ms: Vec<f64>,
    /// Voice turns: from the turn's start to the speech answer's last byte. LLM-only turns: to
    /// the LLM's last token.
    done_ms: Vec<f64>,
    /// Speech streams cut after their first audio and asked again, whole (see [`speak`]).
    speech_restarts: usize,
    /// The node that spoke each voice turn's answer.
    tts_nodes: std::collections::BTreeMap<String, usize>,
    /// The LLM's node per turn.
    nodes: std::collections::BTreeMap<String, usize>,
    /// What the nodes' `/metrics` counted during the phase, over every node.
    stt_node: RouteFigures,
    tts_node: RouteFigures,
}

/// Why a turn failed: the step, and the error's first words.
#[derive(Debug)]
struct TurnError {
    step: &'static str,
    what: String,
}

impl TurnError {
    fn at(step: &'static str) -> impl Fn(anyhow::Error) -> TurnError {
        move |e| TurnError { step, what: format!("{e:#}") }
    }

    /// `stt: every candidate failed` — the key failures are counted under.
    fn key(&self) -> String {
        let short: String = self.what.chars().take(60).collect();
        format!("{}: {short}", self.step)
    }
}

/// One transcription through the session's failover ladder: the clip uploaded as
/// `multipart/form-data` (a `model` field, a `file` part), the transcript's text back.
async fn transcribe(stt: &Session, audio: &[u8], turn: usize) -> Result<String> {
    let (content_type, body) = voice::transcription_form(STT, &format!("turn-{turn}.wav"), audio);
    let req = RawRequest {
        model: STT.into(),
        path: voice::TRANSCRIPTIONS_PATH.into(),
        content_type,
        body,
    };
    let (answer, served) = stt.call(&req).await?;
    anyhow::ensure!(
        (200..300).contains(&answer.status),
        "{} answered {}: {}",
        served.node.id,
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    let text = voice::transcript_text(&answer.body)
        .with_context(|| format!("{}: no transcript in the answer", served.node.id))?;
    anyhow::ensure!(!text.trim().is_empty(), "{}: an empty transcript", served.node.id);
    Ok(text)
}

/// How a turn's answer was spoken.
#[derive(Debug, Clone)]
struct Spoken {
    /// The speech answer's first audio byte in the caller's hands.
    first_audio: Instant,
    /// Its last byte.
    done: Instant,
    /// The stream was cut after its first audio and the answer asked again, whole.
    restarted: bool,
    /// The node that spoke it (the last one, after a restart).
    node: String,
}

/// The answer spoken: `/v1/audio/speech` asked for WAV through `Session::call_stream`, taken
/// (as a player would) from its first byte. Until that byte the session's failover ladder
/// runs (the request sent whole to the next node); a stream cut after it cannot be un-played,
/// so the turn asks again with `Session::call`, which restarts the audio whole on the
/// standby — a restart, counted, the turn's first audio still the first attempt's.
async fn speak(tts: &Session, text: &str) -> Result<Spoken> {
    let req = RawRequest {
        model: TTS.into(),
        path: voice::SPEECH_PATH.into(),
        content_type: "application/json".into(),
        body: voice::speech_body(TTS, text, VOICE),
    };
    let (mut stream, served) = tts.call_stream(&req).await?;
    let node = served.node.id;
    anyhow::ensure!((200..300).contains(&stream.status), "{node} answered {}", stream.status);
    let (mut first_audio, mut audio) = (None, Vec::new());
    while let Some(chunk) = stream.chunk().await {
        match chunk {
            Ok(b) => {
                first_audio.get_or_insert_with(Instant::now);
                audio.extend_from_slice(&b);
            }
            Err(cut) => {
                let Some(first_audio) = first_audio else { return Err(cut.into()) };
                let (answer, served) =
                    tts.call(&req).await.context("asking again for speech cut mid-audio")?;
                anyhow::ensure!(
                    (200..300).contains(&answer.status) && voice::is_wav(&answer.body),
                    "{} answered {} with no audio",
                    served.node.id,
                    answer.status
                );
                let node = served.node.id;
                return Ok(Spoken { first_audio, done: Instant::now(), restarted: true, node });
            }
        }
    }
    let done = Instant::now();
    anyhow::ensure!(voice::is_wav(&audio), "{node}: the answer is not WAV audio");
    let first_audio = first_audio.unwrap_or(done);
    Ok(Spoken { first_audio, done, restarted: false, node })
}

/// The demo's fleet ([`FleetSpec::canada`]) with the demo's secret and backend.
fn fleet_spec(secret_file: &std::path::Path, backend: &DemoBackend) -> FleetSpec {
    FleetSpec {
        auth: FleetAuth::Hs256File(secret_file.to_owned()),
        seed_per_node: true,
        backend: match backend {
            // A spare GPU per node, for the model loaded at run time.
            DemoBackend::Sim => FleetBackend::Sim {
                tokens_per_s: 400.0,
                prefill_us_per_token: 200,
                spare_gpu: true,
            },
            DemoBackend::OpenAi { upstream, model } => {
                FleetBackend::OpenAi { upstream: upstream.clone(), model: model.clone() }
            }
        },
        ..FleetSpec::canada()
    }
}

async fn start_fleet(
    dir: &std::path::Path,
    nats: Option<&str>,
    backend: &DemoBackend,
) -> Result<Fleet> {
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
    let mut node_addrs = Vec::new();
    let mut node_stops = Vec::new();
    let models_root = dir.join("models");
    std::fs::create_dir_all(models_root.join(LOADED))?;
    let spec = fleet_spec(&secret_file, backend);
    for i in 0..spec.nodes.len() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        node_addrs.push(listener.local_addr()?);
        // Clients reach the node through a relay the demo can cut (a node dying).
        let relay = Relay::start(listener.local_addr()?).await?;
        let mut cfg = spec.node_config(i, Some(format!("http://{}", relay.addr())));
        cfg.models.allowed_local_roots = vec![models_root.clone()];
        cfg.models.sim_load_time_ms = 800;
        let node = edgeroute_node::Node::build(cfg)?.with_bus(bus().await?);
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
        relays.iter().zip(&spec.nodes).map(|(r, n)| (r.addr(), n.region.as_str())).collect();
    let regions: Vec<&str> = spec.regions.iter().map(String::as_str).collect();
    let wan =
        Wan::build(&regions, &targets, |c, n| LinkSpec::rtt_ms(geo_rtt_ms(c, n), 1.0), 7).await?;
    let mut discovery = Vec::new();
    for region in &spec.regions {
        let d = edgeroute_discovery::Discovery::build(spec.discovery_config(region))?
            .with_bus(bus().await?);
        discovery.push(d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await?);
    }
    Ok(Fleet {
        spec,
        relays: Arc::new(std::sync::Mutex::new(relays)),
        node_addrs,
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
                // An admin token names where it is valid: the demo's operator runs the fleet.
                aud: (scope == edgeroute_auth::Scope::Admin)
                    .then(|| edgeroute_auth::admin::FLEET_AUDIENCE.to_owned()),
                iss: None,
                ttl_s: 3600,
                now_unix_s: edgeroute_core::clock::unix_ms() / 1000,
                kid: None,
                nbf: None,
                residency: None,
                claims: Default::default(),
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
        for k in 0..self.discovery.len() {
            discovery.push(format!(
                "http://{}",
                self.discovery[(region + k) % self.discovery.len()].addr()
            ));
        }
        let cfg = ClientConfig {
            discovery,
            token: Some(self.token()?),
            cache_file: Some(self.dir.join(format!("lists-{}.json", self.spec.regions[region]))),
            seed: Some(seed),
            stall_timeout: Duration::from_millis(500),
            home_region: Some(self.spec.regions[region].to_owned()),
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
        Ok(Client::with_transport(
            cfg,
            Some(listener),
            self.wan.transport(&self.spec.regions[region]),
        )?)
    }

    /// Serves a few answers on every node and model, as a fleet in service would have: the
    /// nodes' telemetry then holds real first-token times when the story starts.
    async fn warm_up(&self, backend: &DemoBackend) -> Result<()> {
        let token = self.token()?;
        let addrs: Vec<SocketAddr> = self
            .relays
            .lock()
            .map_err(|_| anyhow::anyhow!("relays"))?
            .iter()
            .map(Relay::addr)
            .collect();
        for (node, addr) in self.spec.nodes.iter().zip(addrs) {
            let models: Vec<&str> = match backend {
                DemoBackend::Sim => node.models.iter().map(String::as_str).collect(),
                DemoBackend::OpenAi { model, .. } => vec![model.as_str()],
            };
            for model in models {
                for _ in 0..6 {
                    let body = serde_json::json!({
                        "model": model,
                        "messages": [{"role": "user", "content": "warm up"}],
                        "max_tokens": 4,
                    });
                    post_json(addr, "/v1/chat/completions", &token, body.to_string())
                        .await
                        .with_context(|| format!("warming {} up", node.id))?;
                }
            }
        }
        Ok(())
    }

    /// Every node's `/metrics` (read on its own listener, behind the relay) for the voice
    /// routes: transcriptions and speech, summed over the nodes.
    async fn voice_figures(&self) -> Result<(RouteFigures, RouteFigures)> {
        let (mut stt, mut tts) = (RouteFigures::default(), RouteFigures::default());
        for addr in &self.node_addrs {
            let uri: http::Uri = format!("http://{addr}/metrics").parse()?;
            let res = tokio::time::timeout(Duration::from_secs(5), http_client().get(uri))
                .await
                .with_context(|| format!("{addr}/metrics did not answer in 5 s"))??;
            let body = http_body_util::BodyExt::collect(res.into_body()).await?.to_bytes();
            let text = String::from_utf8_lossy(&body);
            stt = stt.plus(RouteFigures::of(&text, "transcriptions"));
            tts = tts.plus(RouteFigures::of(&text, "speech"));
        }
        Ok((stt, tts))
    }

    /// [`phase`], with what the nodes counted on the voice routes meanwhile.
    async fn phase(
        &self,
        opts: &DemoOpts,
        salt: u64,
        clients: &[Client],
        llm: &str,
        during: Option<During>,
    ) -> Result<PhaseResult> {
        if !opts.voice() {
            return Ok(phase(opts, salt, clients, llm, during).await);
        }
        let before = self.voice_figures().await.context("reading the nodes' metrics")?;
        let mut r = phase(opts, salt, clients, llm, during).await;
        let after = self.voice_figures().await.context("reading the nodes' metrics")?;
        r.stt_node = after.0.since(before.0);
        r.tts_node = after.1.since(before.1);
        Ok(r)
    }

    /// An operator's call to a node's admin API; the answer's status must be a success.
    async fn admin_post(&self, node: usize, path: &str, body: String) -> Result<()> {
        let token = self.mint("operator", edgeroute_auth::Scope::Admin)?;
        let addr = self.relays.lock().map_err(|_| anyhow::anyhow!("relays"))?[node].addr();
        post_json(addr, path, &token, body).await
    }
}

/// Runs `opts.sessions` sessions of `opts.turns` streamed turns, from clients spread over the
/// regions; `during` runs once the first turns are under way (a fault, a drain).
async fn phase(
    opts: &DemoOpts,
    salt: u64,
    clients: &[Client],
    llm: &str,
    during: Option<During>,
) -> PhaseResult {
    let results = Arc::new(std::sync::Mutex::new(PhaseResult::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.sessions {
        let client = clients[i % clients.len()].clone();
        let results = results.clone();
        let (turns, spacing, voiced, llm) =
            (opts.turns, opts.spacing(), opts.voice(), llm.to_owned());
        tasks.spawn(async move {
            // Sessions arrive over time, as callers do, not all in the same millisecond.
            tokio::time::sleep(spacing * i as u32).await;
            let fail_all = |results: &std::sync::Mutex<PhaseResult>,
                            e: edgeroute_client::ClientError| {
                if let Ok(mut r) = results.lock() {
                    r.turns += turns;
                    r.failed += turns;
                    let e = TurnError { step: "session", what: e.to_string() };
                    *r.failures.entry(e.key()).or_default() += turns;
                }
            };
            // One session per model, each pinned to the best node serving it.
            let s = match client.session(&llm).await {
                Ok(s) => s,
                Err(e) => return fail_all(&results, e),
            };
            let mut speech = None;
            if voiced {
                match tokio::try_join!(client.session(STT), client.session(TTS)) {
                    Ok(pair) => speech = Some(pair),
                    Err(e) => return fail_all(&results, e),
                }
            }
            for t in 0..turns {
                let k = i + t + salt as usize;
                let prompt = PROMPTS[k % PROMPTS.len()];
                // The caller's words as audio: 2 to 3 s, a clip per prompt and session.
                let clip = speech
                    .as_ref()
                    .map(|_| voice::clip(k as u64, 2.0 + (k % 3) as f64 * 0.5, voice::CLIP_RATE));
                let start = Instant::now();
                let mut node = String::new();
                let (mut ttft, mut heard_at, mut spoken) = (None, None, None);
                let outcome = async {
                    // STT: the caller's audio in, its transcript out.
                    let heard = match (&speech, &clip) {
                        (Some((stt, _)), Some(audio)) => {
                            let text =
                                transcribe(stt, audio, t).await.map_err(TurnError::at("stt"))?;
                            heard_at = Some(start.elapsed());
                            text
                        }
                        _ => prompt.to_owned(),
                    };
                    let mut req = ChatCompletionRequest::new(
                        llm.as_str(),
                        vec![ChatMessage::new(Role::User, heard)],
                    );
                    req.max_tokens = Some(24);
                    let llm_start = Instant::now();
                    let llm_failed =
                        |e: edgeroute_client::ClientError| TurnError::at("llm")(e.into());
                    let mut stream = s.chat_stream(&req).await.map_err(llm_failed)?;
                    node = stream.node().to_owned();
                    let mut answer = String::new();
                    while let Some(c) = stream.next().await {
                        let c = c.map_err(llm_failed)?;
                        ttft.get_or_insert_with(|| llm_start.elapsed());
                        for choice in &c.choices {
                            answer.push_str(choice.delta.content.as_deref().unwrap_or_default());
                        }
                    }
                    // TTS: the answer in, audio out.
                    if let Some((_, tts)) = &speech {
                        let input = if answer.trim().is_empty() { "…" } else { answer.as_str() };
                        spoken = Some(speak(tts, input).await.map_err(TurnError::at("tts"))?);
                    }
                    Ok::<_, TurnError>(())
                }
                .await;
                if let Ok(mut r) = results.lock() {
                    r.turns += 1;
                    match outcome {
                        Ok(()) => {
                            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                            r.ttft_ms.push(ms(ttft.unwrap_or_default()));
                            if let Some(h) = heard_at {
                                r.stt_ms.push(ms(h));
                            }
                            match spoken {
                                Some(sp) => {
                                    r.ttfa_ms.push(ms(sp.first_audio - start));
                                    r.done_ms.push(ms(sp.done - start));
                                    r.speech_restarts += usize::from(sp.restarted);
                                    *r.tts_nodes.entry(sp.node).or_default() += 1;
                                }
                                None => r.done_ms.push(ms(start.elapsed())),
                            }
                            *r.nodes.entry(node).or_default() += 1;
                        }
                        Err(e) => {
                            r.failed += 1;
                            *r.failures.entry(e.key()).or_default() += 1;
                        }
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
        tokio::time::sleep(opts.spacing() * (opts.sessions as u32 * 2 / 3)).await;
        // And once turns have been served (so there is a busiest node), while others run.
        let give_up = Instant::now() + Duration::from_secs(10);
        while results.lock().is_ok_and(|r| r.nodes.is_empty()) && Instant::now() < give_up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

/// The summary table's header: voice turns get the audio columns, LLM-only turns the turn time.
fn table_header(voiced: bool) -> &'static str {
    if voiced {
        "| phase | turns | failed | STT p50 (ms) | TTFT p50 (ms) | TTFT p99 (ms) | TTFA p50 (ms) | TTFA p99 (ms) | speech done p50 (ms) | node first audio (ms) | node STT / TTS answers | speech restarted | failovers | moves | lists from cache | LLM nodes used |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    } else {
        "| phase | turns | failed | TTFT p50 (ms) | TTFT p99 (ms) | turn p50 (ms) | failovers | moves | lists from cache | LLM nodes used |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    }
}

/// What the table's columns mean, under it (voice turns).
const VOICE_NOTES: &str = "STT: the turn's start (its audio sent) to the transcript in hand. TTFT: the LLM request to its \
first token. TTFA (time to first audio): the turn's start to the speech answer's first byte in the caller's hands \
(`Session::call_stream`: STT, the LLM's whole answer, then the speech until its first audio). Speech done: the turn's start to \
the speech answer's last byte; the simulated TTS (the simulator's defaults) speaks at 10× real time after its first audio, \
so a spoken answer of several seconds ends most of a second after it starts. Node first audio: the nodes' own time to the \
speech answer's first byte (`edgeroute_node_first_byte_seconds{route=\"speech\"}`, mean over the phase). Node STT / TTS \
answers: 200s on `/v1/audio/transcriptions` and `/v1/audio/speech`, every node's `/metrics` (a failed-over call counts once \
per node that answered it). Speech restarted: a speech stream cut after its first audio (its node killed mid-answer) and \
asked again whole on the standby with `Session::call` — the turn is served, its first audio the first attempt's.";

/// One phase's row of the summary table; `clients` is the clients' stats over the phase.
fn summary_row(name: &str, r: &PhaseResult, clients: &Stats, voiced: bool) -> String {
    let nodes: Vec<String> = r.nodes.iter().map(|(n, c)| format!("{n}×{c}")).collect();
    let (p50, p99) = (pct(&r.ttft_ms, 0.5), pct(&r.ttft_ms, 0.99));
    let tail = format!(
        "{} | {} | {} | {} |",
        clients.failovers,
        clients.migrations,
        clients.cached_lists,
        nodes.join(" ")
    );
    if !voiced {
        let turn_p50 = pct(&r.done_ms, 0.5);
        return format!(
            "| {name} | {} | {} | {p50:.0} | {p99:.0} | {turn_p50:.0} | {tail}\n",
            r.turns, r.failed
        );
    }
    let first_audio =
        r.tts_node.mean_first_byte_ms().map_or("—".to_owned(), |m| format!("{m:.0}"));
    format!(
        "| {name} | {} | {} | {:.0} | {p50:.0} | {p99:.0} | {:.0} | {:.0} | {:.0} | {first_audio} | {:.0} / {:.0} | {} | {tail}\n",
        r.turns,
        r.failed,
        pct(&r.stt_ms, 0.5),
        pct(&r.ttfa_ms, 0.5),
        pct(&r.ttfa_ms, 0.99),
        pct(&r.done_ms, 0.5),
        r.stt_node.ok,
        r.tts_node.ok,
        r.speech_restarts,
    )
}

fn record(
    name: &str,
    r: &PhaseResult,
    clients: &[Client],
    before: &mut Stats,
    voiced: bool,
    md: &mut String,
) {
    let now = total(clients);
    let delta = Stats {
        failovers: now.failovers - before.failovers,
        migrations: now.migrations - before.migrations,
        cached_lists: now.cached_lists - before.cached_lists,
        ..Stats::default()
    };
    let (p50, p99) = (pct(&r.ttft_ms, 0.5), pct(&r.ttft_ms, 0.99));
    let audio = if voiced {
        format!(", TTFA p50 {:.0} ms p99 {:.0} ms", pct(&r.ttfa_ms, 0.5), pct(&r.ttfa_ms, 0.99))
    } else {
        String::new()
    };
    println!(
        "   {} turns, {} failed, TTFT p50 {p50:.0} ms p99 {p99:.0} ms{audio}, failovers {}, moves {}",
        r.turns, r.failed, delta.failovers, delta.migrations
    );
    if !r.tts_nodes.is_empty() {
        let spoken: Vec<String> = r.tts_nodes.iter().map(|(n, c)| format!("{n}×{c}")).collect();
        println!("   answers spoken by {}", spoken.join(" "));
    }
    for (why, n) in &r.failures {
        println!("     failed ×{n}: {why}");
    }
    md.push_str(&summary_row(name, r, &delta, voiced));
    *before = now;
}

pub async fn run(opts: DemoOpts) -> Result<String> {
    // One directory per run: two demos in one process (the tests) must not share (and remove)
    // each other's secret and persisted lists.
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("edgeroute-demo-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut fleet = start_fleet(&dir, opts.nats.as_deref(), &opts.backend)
        .await
        .context("starting the fleet")?;
    match &opts.backend {
        DemoBackend::Sim => println!(
            "edgeroute demo: 6 simulator nodes in 3 regions (every node serves the LLM; speech-to-text and\n\
             text-to-speech on some; van-1 holds the three-GPU voice pipeline), a discovery replica per region,\n\
             voice-agent clients in every region over emulated WAN links (same region 3 ms RTT, Toronto-Montreal\n\
             9 ms, to Vancouver 60-66 ms); each turn: a WAV clip to /v1/audio/transcriptions, the transcript\n\
             streamed through the LLM, the answer to /v1/audio/speech\n"
        ),
        DemoBackend::OpenAi { upstream, model } => println!(
            "edgeroute demo: 6 nodes in 3 regions in front of {upstream} ({model}), a discovery replica per region,\n\
             clients in every region over emulated WAN links (turns are LLM only: the upstream has no speech models)\n"
        ),
    }
    // Until every replica has verified the fleet.
    let probe = fleet.client(0, opts.seed)?;
    let t = Instant::now();
    while probe.discover(opts.llm()).await.map_or(0, |c| c.len()) < 5 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(10),
            "discovery never verified the fleet"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.warm_up(&opts.backend).await.context("warming the fleet up")?;
    let clients: Vec<Client> =
        (0..3).map(|r| fleet.client(r, opts.seed + r as u64)).collect::<Result<_>>()?;

    let voiced = opts.voice();
    let mut md = String::from(table_header(voiced));
    let mut before = total(&clients);

    let mut phases: Vec<(String, PhaseResult)> = Vec::new();
    println!("1. steady traffic: each session pins the node that answers its region fastest");
    fleet.mark("phase 1: steady traffic");
    let r = fleet.phase(&opts, 0, &clients, opts.llm(), None).await?;
    record("steady", &r, &clients, &mut before, voiced, &mut md);
    phases.push(("steady".into(), r));

    let mut n = 2;
    if opts.backend == DemoBackend::Sim {
        let node = fleet.spec.nodes[LOAD_ON].id.clone();
        println!(
            "{n}. {LOADED} is loaded on {node} at run time: new sessions for it find it there"
        );
        fleet.mark(format!("phase {n}: {LOADED} loaded on {node}"));
        let path = dir.join("models").join(LOADED);
        let body = serde_json::json!({ "path": path, "id": LOADED }).to_string();
        let asked = Instant::now();
        fleet.admin_post(LOAD_ON, "/v1/models/load", body).await?;
        while probe.discover(LOADED).await.map_or(0, |c| c.len()) == 0 {
            anyhow::ensure!(
                asked.elapsed() < Duration::from_secs(15),
                "discovery never listed {LOADED}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listed = asked.elapsed().as_millis();
        println!(
            "   listed by discovery {listed} ms after the load call (the simulator takes 800 ms to load)"
        );
        fleet.mark(format!("{LOADED} listed ({listed} ms after the load call)"));
        let r = fleet.phase(&opts, 4, &clients, LOADED, None).await?;
        record(&format!("{LOADED} loaded on {node}"), &r, &clients, &mut before, voiced, &mut md);
        phases.push((format!("{LOADED} loaded on {node}"), r));
        n += 1;
    }

    println!("{n}. tor-1 is drained: its sessions finish the turn, then move");
    fleet.mark(format!("phase {n}: tor-1 drained"));
    fleet.admin_post(2, "/admin/drain", "{\"deadline_ms\": 60000}".into()).await?;
    let r = fleet.phase(&opts, 1, &clients, opts.llm(), None).await?;
    record("tor-1 drained", &r, &clients, &mut before, voiced, &mut md);
    phases.push(("tor-1 drained".into(), r));

    n += 1;
    println!("{n}. the busiest node dies mid-stream: answers are continued on another node");
    fleet.mark(format!("phase {n}: the busiest node will be killed"));
    let victim = Arc::new(std::sync::Mutex::new(String::new()));
    let kill = {
        let (relays, victim) = (fleet.relays.clone(), victim.clone());
        let ids: Vec<String> = fleet.spec.nodes.iter().map(|n| n.id.clone()).collect();
        let (timeline, started) = (fleet.timeline.clone(), fleet.started);
        Box::new(move |so_far: &PhaseResult| {
            // The node serving the most turns so far.
            let Some((name, _)) = so_far.nodes.iter().max_by_key(|(_, c)| **c) else { return };
            if let (Some(i), Ok(mut relays)) = (ids.iter().position(|id| id == name), relays.lock())
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
    let r = fleet.phase(&opts, 2, &clients, opts.llm(), Some(kill)).await?;
    let victim = victim.lock().map(|v| v.clone()).unwrap_or_default();
    println!("   ({victim} was killed)");
    record(&format!("{victim} killed mid-stream"), &r, &clients, &mut before, voiced, &mut md);
    phases.push((format!("{victim} killed mid-stream"), r));

    n += 1;
    println!("{n}. the whole control plane stops: new clients start from persisted lists");
    fleet.mark(format!("phase {n}: every discovery replica stopped"));
    // Stopped, but their addresses stay in the clients' configuration: unreachable.
    for d in &mut fleet.discovery {
        d.stop();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cold: Vec<Client> =
        (0..3).map(|r| fleet.client(r, opts.seed + 10 + r as u64)).collect::<Result<_>>()?;
    before = total(&cold);
    let r = fleet.phase(&opts, 3, &cold, opts.llm(), None).await?;
    record("discovery down, new clients", &r, &cold, &mut before, voiced, &mut md);
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
    if voiced {
        println!("{VOICE_NOTES}\n");
    }
    Ok(md)
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// A plain HTTP/1 client for the demo's own calls (warm-up, operator calls, the upstream's
/// model list).
fn http_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// POSTs JSON with a bearer token to `addr`; an answer that is not a success is an error that
/// carries its body.
async fn post_json(addr: SocketAddr, path: &str, token: &str, body: String) -> Result<()> {
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
    let res = http_client().request(req).await?;
    let status = res.status();
    let text = http_body_util::BodyExt::collect(res.into_body()).await?.to_bytes();
    anyhow::ensure!(
        status.is_success(),
        "{path} answered {status}: {}",
        String::from_utf8_lossy(&text)
    );
    Ok(())
}

/// The first model an OpenAI-compatible upstream lists at `GET /v1/models`.
pub async fn upstream_model(upstream: &str) -> Result<String> {
    let uri: http::Uri = format!("{upstream}/v1/models")
        .parse()
        .with_context(|| format!("--upstream `{upstream}` is not a URL"))?;
    let res = tokio::time::timeout(Duration::from_secs(10), http_client().get(uri))
        .await
        .with_context(|| format!("{upstream}/v1/models did not answer in 10 s"))?
        .with_context(|| format!("asking {upstream}/v1/models"))?;
    anyhow::ensure!(res.status().is_success(), "{upstream}/v1/models answered {}", res.status());
    let body = http_body_util::BodyExt::collect(res.into_body()).await?.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("{upstream}/v1/models is not JSON"))?;
    v["data"][0]["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{upstream}/v1/models lists no model (use --model)"))
}

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
        "# edgeroute demo report\n\nSix nodes ({}) in Vancouver, Toronto and Montreal; a discovery replica per \
         region on the {} bus; clients in every region over emulated WAN links. {} sessions × {} turns ({}) per \
         phase, seed {}.\n\n## Summary\n\n{summary}\n{}## Time to first token, per phase (turns per bucket)\n\n",
        match &opts.backend {
            DemoBackend::Sim => "simulators; the voice pipeline on van-1".to_owned(),
            DemoBackend::OpenAi { upstream, model } => format!("in front of {upstream}, {model}"),
        },
        if opts.nats.is_some() { "NATS" } else { "embedded" },
        opts.sessions,
        opts.turns,
        if opts.voice() {
            "a WAV clip to `/v1/audio/transcriptions` → the transcript through the LLM, streamed → the answer to `/v1/audio/speech`"
        } else {
            "LLM stream"
        },
        opts.seed,
        if opts.voice() { format!("{VOICE_NOTES}\n\n") } else { String::new() },
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
    // The distributions as percentile curves, a line per phase.
    let series: Vec<crate::chart::Series> = phases
        .iter()
        .map(|(name, r)| crate::chart::Series { name: name.clone(), ttft_ms: r.ttft_ms.clone() })
        .collect();
    crate::chart::ttft_percentiles("Time to first token, per phase", &series)?
        .save(&dir.join("ttft.png"))?;
    md.push_str(
        "\n![TTFT per phase](ttft.png)\n\n*Share of turns (y, as a percentile, the tail \
         stretched) whose LLM answer began within a time to first token (x, ms, log scale), a \
         line per phase.*\n",
    );
    if opts.voice() {
        let series: Vec<crate::chart::Series> = phases
            .iter()
            .map(|(name, r)| crate::chart::Series {
                name: name.clone(),
                ttft_ms: r.ttfa_ms.clone(),
            })
            .collect();
        crate::chart::latency_percentiles(
            "Time to first audio, per phase",
            "turn start (audio sent) to the answer's first audio (ms, log scale)",
            &series,
        )?
        .save(&dir.join("ttfa.png"))?;
        md.push_str(
            "\n![TTFA per phase](ttfa.png)\n\n*Share of voice turns (y, as a percentile) whose \
             spoken answer's first audio reached the caller within a time from the turn's start \
             (x, ms, log scale: transcription, the LLM's answer, the speech's first audio), a \
             line per phase.*\n",
        );
    }
    // The timeline as a chart: phases as bands, faults as red lines, a lane per kind of
    // client decision.
    let mut chart = crate::chart::Timeline {
        title: "What happened when: phases, faults and the clients' decisions".into(),
        end_s: timeline.iter().map(|(t, _)| *t).fold(0.0, f64::max) + 0.5,
        ..Default::default()
    };
    // A lane per kind of decision, known by the client listener's wording.
    let lane_of = |what: &str| match what {
        w if w.starts_with("failover ") => Some(0),
        w if w.starts_with("move ") => Some(1),
        w if w.starts_with("hedge ") => Some(2),
        w if w.contains(" ejected for ") => Some(3),
        _ => None,
    };
    chart.lanes = ["failover", "session moved", "hedged", "node ejected"]
        .map(|name| crate::chart::Lane { name: name.into(), times_s: Vec::new() })
        .into();
    for (t, what) in timeline {
        if let Some(rest) = what.strip_prefix("phase ") {
            let name = rest.split_once(": ").map_or(rest, |(_, name)| name);
            chart.phases.push((*t, name.to_owned()));
            if name.contains("discovery replica stopped") {
                chart.faults.push((*t, "discovery stopped".into()));
            }
        } else if what.ends_with(" killed") {
            chart.faults.push((*t, what.clone()));
        } else if let Some(k) = lane_of(what) {
            chart.lanes[k].times_s.push(*t);
        }
    }
    crate::chart::timeline(&chart)?.save(&dir.join("timeline.png"))?;
    md.push_str(
        "\n## Timeline (seconds since the fleet started)\n\n![timeline](timeline.png)\n\n*Phases \
         as shaded bands (numbered, named under the chart), faults as red lines, and a lane per \
         kind of client decision (failovers, session moves, hedges, ejections), a tick each.*\n\n\
         | t (s) | what |\n|---:|---|\n",
    );
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
        let opts = DemoOpts {
            sessions: 6,
            turns: 3,
            seed: 1,
            nats: None,
            report: Some(report.clone()),
            duration: None,
            backend: DemoBackend::Sim,
        };
        let md = run(opts).await.expect("demo");
        assert!(md.starts_with(table_header(true)), "{md}");
        for line in md.lines().skip(2) {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(cols[2], "18", "turns in: {line}");
            assert_eq!(cols[3], "0", "failed turns in: {line}");
            // Every turn went through the audio endpoints: the nodes answered at least one
            // transcription and one speech request per turn (a failed-over call counts on
            // each node that answered it).
            let (stt, tts) = cols[11].split_once(" / ").expect("STT / TTS answers");
            let (stt, tts): (u32, u32) = (stt.parse().expect("stt"), tts.parse().expect("tts"));
            assert!(stt >= 18 && tts >= 18, "the audio routes' answers, on the nodes: {line}");
            // And the times are the audio's. Each turn's first audio comes after its
            // transcript and the simulated TTS's own 80 ms, its last byte a paced stream later
            // (per turn, so at every percentile too).
            let ms = |c: usize| cols[c].parse::<f64>().unwrap_or_else(|_| panic!("{c}: {line}"));
            let (stt_p50, ttfa_p50, ttfa_p99, done_p50, node_first_audio) =
                (ms(4), ms(7), ms(8), ms(9), ms(10));
            assert!(stt_p50 >= 50.0, "transcription is not free: {line}");
            assert!(node_first_audio >= 80.0, "the simulated TTS's own first audio: {line}");
            assert!(ttfa_p50 >= stt_p50 + 80.0 && ttfa_p99 >= ttfa_p50, "{line}");
            assert!(done_p50 > ttfa_p50 + 200.0, "{line}");
        }
        assert_eq!(md.lines().count(), 7, "{md}");
        let loaded =
            md.lines().find(|l| l.contains("sim-qwen loaded on mtl-2")).expect("load phase");
        assert!(
            loaded.trim_end().ends_with("| mtl-2×18 |"),
            "traffic found the loaded model: {loaded}"
        );
        let written = std::fs::read_to_string(report.join("report.md")).expect("report.md");
        assert!(written.contains("## Time to first token, per phase"), "{written}");
        assert!(written.contains("TTFA (time to first audio): the turn's start"), "{written}");
        let victim = FleetSpec::canada()
            .nodes
            .into_iter()
            .find(|n| md.contains(&format!("| {} killed mid-stream", n.id)));
        assert!(victim.is_some(), "a node was killed: {md}");
        assert!(
            written
                .contains(&format!("| {} killed |", victim.as_ref().map_or("", |n| n.id.as_str()))),
            "on the timeline: {written}"
        );
        assert!(written.contains("failover "), "the failovers are on the timeline: {written}");
        for png in ["ttft.png", "ttfa.png", "timeline.png"] {
            let bytes = std::fs::read(report.join(png)).expect(png);
            assert_eq!(&bytes[..4], b"\x89PNG", "{png}");
        }
    }

    #[test]
    fn a_summary_row_has_a_cell_per_column() {
        let r = PhaseResult {
            turns: 4,
            failed: 1,
            stt_ms: vec![100.0, 120.0, 140.0],
            ttft_ms: vec![20.0, 30.0, 40.0],
            ttfa_ms: vec![300.0, 350.0, 400.0],
            done_ms: vec![900.0, 1000.0, 1100.0],
            speech_restarts: 1,
            nodes: [("tor-1".to_owned(), 3)].into(),
            stt_node: RouteFigures { ok: 3.0, first_bytes: 3.0, first_byte_s: 0.3 },
            tts_node: RouteFigures { ok: 4.0, first_bytes: 4.0, first_byte_s: 0.36 },
            ..PhaseResult::default()
        };
        let stats = Stats { failovers: 1, migrations: 2, cached_lists: 3, ..Stats::default() };
        let row = summary_row("steady", &r, &stats, true);
        assert_eq!(
            row,
            "| steady | 4 | 1 | 120 | 30 | 40 | 350 | 400 | 1000 | 90 | 3 / 4 | 1 | 1 | 2 | 3 | tor-1×3 |\n"
        );
        let columns = |s: &str| s.lines().next().map_or(0, |l| l.matches('|').count());
        assert_eq!(columns(&row), columns(table_header(true)));
        let plain = summary_row("steady", &r, &stats, false);
        assert_eq!(plain, "| steady | 4 | 1 | 30 | 40 | 1000 | 1 | 2 | 3 | tor-1×3 |\n");
        assert_eq!(columns(&plain), columns(table_header(false)));
        // No speech answered in the phase: no mean to show.
        let none = PhaseResult::default();
        assert!(summary_row("x", &none, &Stats::default(), true).contains("| — | 0 / 0 | 0 |"));
    }

    /// `--backend openai --upstream URL`: every node in front of one OpenAI-compatible server
    /// (here the simulator's own HTTP server standing in for llama.cpp); the model is found at
    /// the upstream's `/v1/models`, turns are LLM only, and there is no load phase.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_demo_runs_in_front_of_a_real_openai_upstream() {
        let sim = Arc::new(
            edgeroute_sim::Simulator::new(edgeroute_sim::SimConfig {
                ttft_base_ms: 10,
                tokens_per_s: 500.0,
                ..edgeroute_sim::SimConfig::default()
            })
            .expect("sim"),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let upstream = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(edgeroute_http::serve(
            listener,
            edgeroute_sim::server::router(sim),
            edgeroute_http::ServerLimits::default(),
            None,
            std::future::pending(),
        ));
        let model = upstream_model(&upstream).await.expect("the upstream's model");
        assert_eq!(model, "sim-llama");
        let opts = DemoOpts {
            sessions: 6,
            turns: 2,
            seed: 3,
            nats: None,
            report: None,
            duration: Some(Duration::from_secs(2)),
            backend: DemoBackend::OpenAi { upstream, model },
        };
        let md = run(opts).await.expect("demo");
        assert!(md.starts_with(table_header(false)), "no audio columns: {md}");
        assert_eq!(md.lines().count(), 6, "four phases, no load phase: {md}");
        for line in md.lines().skip(2) {
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(cols[3], "0", "failed turns in: {line}");
        }
        assert!(!md.contains("sim-qwen"), "{md}");
    }
}
