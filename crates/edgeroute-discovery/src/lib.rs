//! The discovery service: which nodes, in which order, for this model and this client.
//!
//! Off the hot path by design: a client asks once per session, then talks to nodes directly,
//! and a dead replica costs nothing but routing refreshes. One replica per region; each is
//! stateless apart from caches, and replicas agree because they follow the same topology bus
//! and probe the same nodes.
//!
//! How a decision is made, from the edges in:
//! - [`fleet`] (pure): the registry. Nodes come from `[[nodes]]` and from the topology bus;
//!   placement from whichever source is newer; telemetry from the node's `/health`; health
//!   verdicts from `edgeroute_core::health` (phi-accrual on probe arrivals, Wilson bounds on
//!   error rates, eject/readmit hysteresis).
//! - [`snapshot`] (pure): every node's view, ranked for every model, pipeline, strategy and
//!   region by `edgeroute_core::score`, held immutable behind an `ArcSwap`.
//! - [`probe`]: the `/health` puller (the network seam is the [`probe::Probe`] trait).
//! - [`correctness`] (pure) and [`answer_probe`]: health that checks answers, not only status
//!   (`[correctness]`, on by default). Each node is asked a short fixed prompt at temperature 0
//!   for each ready model every `correctness.interval_ms`; the fingerprint of its answer is
//!   compared with the one learnt for that model version (a strict majority of the fleet's
//!   first answers) or pinned in configuration. A node is ejected for the model when the
//!   Wilson lower bound of its bad-answer rate crosses `eject_above` (never on one sample),
//!   is then no candidate for it (`explain`: `wrong_answers`), and rejoins only after
//!   `recover_after` consecutive correct answers. `/v1/nodes` shows each model's state and
//!   probe latency p50; `/metrics` counts probes by judgement and the pairs ejected.
//! - [`api`]: `/v1/discover`, `/v1/nodes`, `/v1/topology`, `/health`, `/metrics`.
//! - [`routing`]: the routing policy (`[policy] file`), hot reloaded and compiled against each
//!   snapshot; node jurisdictions for residency.
//!
//! Background tasks (started by [`Discovery::start`]): the bus follower, the policy's (file
//! poller or bus watcher, which acknowledges each text on the bus), the probe tasks, and
//! the rebuilder, which folds bursts of changes into one new snapshot every
//! `scoring.rebuild_interval_ms` at most.
//!
//! What it trusts: its own configuration (`[[nodes]]` URLs are never overridden by the bus)
//! and what a probe verified (a `/health` answer naming the node's own id, from the node's
//! current URL; for a node only the bus announced, an `https://` URL whose certificate chains
//! to the fleet CA and names the node id). The bus's word alone never puts a URL in an answer.
//! Callers: `[auth]` is required unless `discovery.allow_unauthenticated` says otherwise;
//! `explain`, `/v1/nodes` and `/v1/topology` need the admin scope (see [`api`]).

pub mod answer_probe;
pub mod api;
pub mod config;
pub mod correctness;
pub mod fleet;
pub mod metrics;
pub mod policy_check;
pub mod probe;
pub mod routing;
pub mod snapshot;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use edgeroute_bus::{Bus, FleetUpdate};
use edgeroute_core::score::{Strategy, Weights};
use edgeroute_http::Listener;
use futures_util::StreamExt;
use http::HeaderValue;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use config::DiscoveryConfig;
pub use snapshot::Snapshot;

use crate::config::ms;
use crate::fleet::{Change, Fleet, ViewParams};
use crate::metrics::{HealthLabels, Metrics, OutcomeLabels, ReasonLabels};
use crate::probe::{HttpProbe, Probe, Scheduler};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("topology bus: {0}")]
    Bus(#[from] edgeroute_bus::BusError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("TLS: {0}")]
    ServerTls(#[from] edgeroute_http::tls::TlsError),
    #[error("auth keys: {0}")]
    Auth(#[from] edgeroute_auth::AuthError),
    #[error(transparent)]
    Policy(#[from] routing::LoadError),
}

pub(crate) use edgeroute_core::clock::unix_ms;

/// The bus as the replica last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStatus {
    pub configured: bool,
    pub connected: bool,
    pub synced: bool,
    pub updates: u64,
}

/// State shared by the handlers and the background tasks.
pub struct Shared {
    pub cfg: DiscoveryConfig,
    pub(crate) default_strategy: Strategy,
    weights: [Weights; 3],
    view_params: ViewParams,
    pub(crate) snapshot: ArcSwap<Snapshot>,
    fleet: Mutex<Fleet>,
    scheduler: Mutex<Option<Scheduler>>,
    /// Placement or health changed: rebuild promptly.
    dirty: Notify,
    /// Only telemetry changed: rebuild within `scoring.telemetry_delay_ms`.
    telemetry: Notify,
    pub(crate) started: Instant,
    pub(crate) metrics: Metrics,
    generation: AtomicU64,
    generations: watch::Sender<u64>,
    bus_configured: AtomicBool,
    bus_connected: AtomicBool,
    bus_synced: AtomicBool,
    bus_updates: AtomicU64,
    pub(crate) replica_header: HeaderValue,
    pub(crate) auth: Option<Arc<edgeroute_auth::KeyStore>>,
    pub(crate) cache_control: HeaderValue,
    /// Where each node's data is processed: residency holds on every answer, policy or not.
    pub(crate) jurisdictions: routing::Jurisdictions,
    /// The routing policy, when `[policy]` names one.
    pub(crate) routing: Option<routing::Routing>,
    /// What the correctness probes decided (`[correctness]`).
    pub(crate) correctness: Mutex<correctness::Machine>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("replica", &self.cfg.discovery.id).finish_non_exhaustive()
    }
}

impl Shared {
    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn bus_status(&self) -> BusStatus {
        BusStatus {
            configured: self.bus_configured.load(Ordering::Relaxed),
            connected: self.bus_connected.load(Ordering::Relaxed),
            synced: self.bus_synced.load(Ordering::Relaxed),
            updates: self.bus_updates.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn refresh_gauges(&self) {
        let snap = self.snapshot.load();
        for h in ["ready", "degraded", "saturated", "draining", "unhealthy"] {
            let n = snap.infos().filter(|i| i.health == h).count();
            self.metrics.nodes.get_or_create(&HealthLabels { health: h }).set(n as i64);
        }
        self.metrics.bus_connected.set(i64::from(self.bus_connected.load(Ordering::Relaxed)));
    }

    fn apply(&self, change: Change) {
        match change {
            Change::None => {}
            Change::Changed => self.dirty.notify_one(),
            Change::Telemetry => self.telemetry.notify_one(),
            Change::Target { id, url, announced } => {
                if let Ok(mut s) = self.scheduler.lock()
                    && let Some(s) = s.as_mut()
                {
                    s.ensure(&id, &url, announced);
                }
                self.dirty.notify_one();
            }
        }
    }

    /// Rebuilds the snapshot from the registry now.
    fn rebuild(&self) {
        let t0 = std::time::Instant::now();
        let now = self.now();
        let (entries, forgotten) = {
            let Ok(mut fleet) = self.fleet.lock() else { return };
            let forgotten = fleet.forget(now);
            (fleet.entries(now, self.view_params), forgotten)
        };
        if !forgotten.is_empty()
            && let Ok(mut s) = self.scheduler.lock()
            && let Some(s) = s.as_mut()
        {
            for id in &forgotten {
                s.remove(id);
            }
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let snap = Snapshot::build(entries, self.weights, generation, unix_ms());
        self.snapshot.store(Arc::new(snap));
        if let Some(r) = &self.routing {
            r.recompile(&self.snapshot, &self.jurisdictions);
        }
        self.generations.send_replace(generation);
        self.metrics.rebuilds.inc();
        self.metrics.generation.set(generation as i64);
        self.metrics.rebuild_seconds.observe(t0.elapsed().as_secs_f64());
    }
}

/// Builds a replica from `cfg` and serves it on `listener` until `shutdown` resolves (probes,
/// bus follower and rebuilder included): all that `edgeroute discovery` runs.
pub async fn serve<L: Listener>(
    cfg: DiscoveryConfig,
    listener: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DiscoveryError> {
    Discovery::build(cfg)?.serve(listener, shutdown).await
}

/// A discovery replica, built and ready to start.
#[derive(Debug, Clone)]
pub struct Discovery {
    shared: Arc<Shared>,
    bus: Option<Bus>,
    probe: Option<Arc<dyn Probe>>,
    answer_probe: Option<Arc<dyn answer_probe::AnswerProbe>>,
}

/// The running background tasks; dropping it does not stop them, [`Running::stop`] does.
#[derive(Debug)]
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        if let Ok(mut s) = self.shared.scheduler.lock() {
            *s = None;
        }
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Discovery {
    pub fn build(cfg: DiscoveryConfig) -> Result<Discovery, DiscoveryError> {
        cfg.validate()?;
        let started = Instant::now();
        let policy = cfg.announced.policy(cfg.probe.ca_file.is_some());
        let mut fleet =
            Fleet::new(cfg.health.params(), ms(cfg.health.forget_after_ms)).with_policy(policy);
        for n in &cfg.nodes {
            fleet.add_static(n, Duration::ZERO);
        }
        let replica_header =
            HeaderValue::from_str(&cfg.discovery.id).map_err(|_| config::ConfigError::Invalid {
                key: "discovery.id".into(),
                message: "not a valid header value".into(),
            })?;
        let cache_control = HeaderValue::from_str(&format!(
            "max-age={}, stale-if-error={}",
            cfg.serving.ttl_ms / 1000,
            cfg.serving.stale_ok_ms / 1000
        ))
        .unwrap_or(HeaderValue::from_static("no-cache"));
        let auth = match &cfg.auth {
            Some(a) => Some(Arc::new(edgeroute_auth::KeyStore::from_config(a)?)),
            None => {
                // validate() refused this unless the operator opted out explicitly.
                tracing::warn!(replica = %cfg.discovery.id, "discovery.allow_unauthenticated: every route is open, fleet views included (loopback labs only)");
                None
            }
        };
        if cfg.announced.allow_plaintext {
            tracing::warn!(replica = %cfg.discovery.id, "announced.allow_plaintext: http:// nodes announced on the bus are probed and served unverified by any certificate (labs only)");
        }
        let (generations, _) = watch::channel(0);
        let mut nodes = cfg.node_jurisdictions.clone();
        for n in &cfg.nodes {
            if let Some(j) = &n.jurisdiction {
                nodes.entry(n.id.clone()).or_insert_with(|| j.clone());
            }
        }
        let jurisdictions = routing::Jurisdictions { regions: cfg.jurisdictions.clone(), nodes };
        let routing = match &cfg.policy {
            Some(p) => {
                let initial = match (&p.source, &p.file) {
                    (routing::Source::File, Some(file)) => {
                        let (policy, stamp) = routing::read(file)?;
                        tracing::info!(file = %file.display(), version = policy.version(), "routing policy loaded");
                        Some((policy, stamp))
                    }
                    _ => {
                        tracing::info!(
                            "routing policy: following the bus; scoring without a policy until the first text arrives"
                        );
                        None
                    }
                };
                let r = routing::Routing::new(
                    p.source,
                    p.file.clone(),
                    p.reload_interval_ms,
                    initial,
                    Arc::new(Snapshot::default()),
                    &jurisdictions,
                    unix_ms(),
                )
                .map_err(|source| routing::LoadError::Parse {
                    path: "(no policy yet)".into(),
                    source,
                })?;
                Some(match &p.shadow_file {
                    Some(f) => r.with_shadow(f.clone(), p.shadow_max_examples),
                    None => r,
                })
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            default_strategy: cfg.scoring.default_strategy(),
            weights: cfg.scoring.weights(),
            view_params: ViewParams {
                unknown_ttft_ms: cfg.scoring.unknown_ttft_ms,
                min_ttft_samples: cfg.scoring.min_ttft_samples,
            },
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            fleet: Mutex::new(fleet),
            scheduler: Mutex::new(None),
            dirty: Notify::new(),
            telemetry: Notify::new(),
            started,
            metrics: Metrics::default(),
            generation: AtomicU64::new(0),
            generations,
            bus_configured: AtomicBool::new(cfg.bus.is_some()),
            bus_connected: AtomicBool::new(false),
            bus_synced: AtomicBool::new(false),
            bus_updates: AtomicU64::new(0),
            replica_header,
            auth,
            cache_control,
            jurisdictions,
            routing,
            correctness: Mutex::new(correctness_machine(&cfg.correctness)),
            cfg,
        });
        if let Some(r) = &shared.routing {
            if r.has_policy() {
                shared.metrics.policy_applied(None, &r.status().version);
            }
            if let Some(totals) = r.shadow_totals() {
                shared.metrics.watch_shadow(totals);
            }
        }
        shared.rebuild();
        Ok(Discovery { shared, bus: None, probe: None, answer_probe: None })
    }

    /// Follows `bus` (instead of the one `[bus]` configures): the embedded bus shared with
    /// nodes in one process.
    pub fn with_bus(mut self, bus: Bus) -> Self {
        self.shared.bus_configured.store(true, Ordering::Relaxed);
        self.bus = Some(bus);
        self
    }

    /// Probes through `probe` instead of HTTP. (Correctness probes then run only through
    /// [`Discovery::with_answer_probe`]: a replica on a network of its own is not asked over
    /// HTTP.)
    pub fn with_probe(mut self, probe: Arc<dyn Probe>) -> Self {
        self.probe = Some(probe);
        self
    }

    /// Sends correctness probes through `probe` instead of HTTP.
    pub fn with_answer_probe(mut self, probe: Arc<dyn answer_probe::AnswerProbe>) -> Self {
        self.answer_probe = Some(probe);
        self
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.shared.clone())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// Replaces the served snapshot (benchmarks and tests serving a synthetic fleet; a running
    /// rebuilder would overwrite it).
    pub fn replace_snapshot(&self, snapshot: Snapshot) {
        self.shared.snapshot.store(Arc::new(snapshot));
        if let Some(r) = &self.shared.routing {
            r.recompile(&self.shared.snapshot, &self.shared.jurisdictions);
        }
    }

    /// Each strategy's weights, in [`Strategy::ALL`] order.
    pub fn weights(&self) -> [Weights; 3] {
        self.shared.weights
    }

    /// Changes each time a new snapshot is published.
    pub fn generations(&self) -> watch::Receiver<u64> {
        self.shared.generations.subscribe()
    }

    /// Starts the probe tasks, the bus follower and the rebuilder.
    pub async fn start(&self) -> Result<Running, DiscoveryError> {
        let sh = self.shared.clone();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let probe: Arc<dyn Probe> = match &self.probe {
            Some(p) => p.clone(),
            None => Arc::new(http_probe(&sh)?),
        };
        let c = &sh.cfg.correctness;
        let answers: Option<Arc<dyn answer_probe::AnswerProbe>> = match &self.answer_probe {
            _ if !c.enabled => None,
            Some(p) => Some(p.clone()),
            // A replica given a network of its own for /health is not asked over HTTP.
            None if self.probe.is_some() => None,
            None => {
                let token = match &c.token_file {
                    Some(f) => {
                        Some(std::fs::read_to_string(f).map(|t| t.trim().to_owned()).map_err(
                            |e| config::ConfigError::Invalid {
                                key: "correctness.token_file".into(),
                                message: format!("{}: {e}", f.display()),
                            },
                        )?)
                    }
                    None => None,
                };
                let mut h = http_probe(&sh)?;
                h.answers = Some(Arc::new(answer_probe::AnswerSpec {
                    prompt: c.prompt.clone(),
                    max_tokens: c.max_tokens,
                    timeout: ms(c.timeout_ms),
                    token: token.filter(|t| !t.is_empty()),
                }));
                Some(Arc::new(h))
            }
        };
        let sink_shared = Arc::downgrade(&sh);
        let sink: probe::Sink = Arc::new(move |id, url, sent, now, outcome| {
            let Some(sh) = sink_shared.upgrade() else { return };
            let label = match &outcome {
                Ok(h) if h.node_id != id => "identity",
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            sh.metrics.probes.get_or_create(&OutcomeLabels { outcome: label }).inc();
            if label == "identity" {
                tracing::warn!(node = %id, url = %url, "probe answered by another node id: not served");
            }
            if let Ok(mut fleet) = sh.fleet.lock() {
                let change =
                    fleet.probe_result(id, url, sent, now, outcome.map_err(|e| e.to_string()));
                drop(fleet);
                sh.apply(change);
            }
        });
        let targets = sh.fleet.lock().map(|f| f.targets()).unwrap_or_default();
        {
            let mut scheduler = Scheduler::new(
                probe,
                ms(sh.cfg.probe.interval_ms),
                sh.started,
                sink,
                sh.cfg.announced.max_probes_per_s,
            );
            sh.metrics.watch_probe_counts(scheduler.counts());
            for (id, url, announced) in targets {
                scheduler.ensure(&id, &url, announced);
            }
            if let Ok(mut s) = sh.scheduler.lock() {
                *s = Some(scheduler);
            }
        }

        let bus = match (&self.bus, &sh.cfg.bus) {
            (Some(b), _) => Some(b.clone()),
            (None, Some(cfg)) => Some(Bus::connect(cfg).await?),
            (None, None) => None,
        };
        let policy_from_bus = sh.routing.as_ref().is_some_and(|r| r.source == routing::Source::Bus);
        if let Some(bus) = bus {
            sh.bus_connected.store(bus.is_connected(), Ordering::Relaxed);
            if policy_from_bus {
                tasks.push(tokio::spawn(follow_policy(sh.clone(), bus.clone(), stop_rx.clone())));
            }
            tasks.push(tokio::spawn(follow_bus(sh.clone(), bus, stop_rx.clone())));
        } else if policy_from_bus {
            // validate() requires [bus] with source = "bus"; a replica built without one and
            // given none (with_bus) has nowhere to hear a policy from.
            return Err(DiscoveryError::Config(config::ConfigError::Invalid {
                key: "policy.source".into(),
                message: "\"bus\" needs a bus to follow".into(),
            }));
        }
        if let (Some(store), Some(a)) = (&sh.auth, &sh.cfg.auth)
            && a.reload_interval_ms > 0
        {
            let mut stopped = stop_rx.clone();
            tasks.push(edgeroute_auth::spawn_reloader(
                store.clone(),
                a.reload_interval(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            ));
        }
        if sh.routing.as_ref().is_some_and(|r| r.file.is_some() || r.shadow_file().is_some()) {
            tasks.push(tokio::spawn(reload_policy_loop(sh.clone(), stop_rx.clone())));
        }
        if let Some(a) = answers {
            tasks.push(tokio::spawn(answer_probe::run(sh.clone(), a, stop_rx.clone())));
        }
        tasks.push(tokio::spawn(rebuild_loop(sh.clone(), stop_rx)));
        Ok(Running { stop, tasks, shared: sh })
    }

    /// Starts the background tasks and serves on `listener` until `shutdown` resolves.
    pub async fn serve<L: Listener>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), DiscoveryError> {
        let tls = match &self.shared.cfg.tls {
            Some(t) => Some(t.acceptor()?),
            None => None,
        };
        let running = self.start().await?;
        tracing::info!(replica = %self.shared.cfg.discovery.id, region = %self.shared.cfg.discovery.region, "discovery serving");
        edgeroute_http::serve(
            listener,
            self.router(),
            self.shared.cfg.limits.server_limits(),
            tls,
            shutdown,
        )
        .await;
        running.stop().await;
        Ok(())
    }
}

/// A replica serving on its own task (see [`Discovery::spawn`]); stops when dropped.
#[derive(Debug)]
pub struct Spawned {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Spawned {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Begins the replica's graceful shutdown.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Discovery {
    /// Serves on a new task, on a TCP listener bound at `addr` (port 0: any free port).
    pub async fn spawn(self, addr: std::net::SocketAddr) -> std::io::Result<Spawned> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let stopped = async {
                let _ = rx.await;
            };
            if let Err(e) = self.serve(listener, stopped).await {
                tracing::error!(error = %e, "discovery stopped");
            }
        });
        Ok(Spawned { addr, stop: Some(tx) })
    }
}

/// The correctness machine of `[correctness]`, its pinned answers in.
fn correctness_machine(c: &config::CorrectnessConfig) -> correctness::Machine {
    let mut m = correctness::Machine::new(c.params());
    for e in &c.expected {
        m.expect(&e.model, e.version.as_deref().unwrap_or(""), correctness::fingerprint(&e.answer));
    }
    m
}

/// The HTTP prober of `[probe]` (the fleet CA, announced nodes' identities).
fn http_probe(sh: &Shared) -> Result<HttpProbe, DiscoveryError> {
    let tls = probe::tls_config(sh.cfg.probe.ca_file.as_deref()).map_err(DiscoveryError::Tls)?;
    let mut p = HttpProbe::new(ms(sh.cfg.probe.timeout_ms), sh.cfg.probe.max_body_bytes, tls);
    if let Some(ca) = &sh.cfg.probe.ca_file {
        p = p.with_announced(probe::AnnouncedTls {
            fleet: probe::fleet_verifier(ca).map_err(DiscoveryError::Tls)?,
            identity_suffix: sh.cfg.announced.identity_suffix.clone(),
            max_clients: sh.cfg.announced.max_nodes,
        });
    }
    Ok(p)
}

async fn rebuild_loop(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let min_gap = ms(sh.cfg.scoring.rebuild_interval_ms);
    let telemetry_delay = ms(sh.cfg.scoring.telemetry_delay_ms);
    // Even with no change, verdicts move with time (a silent node's φ grows): re-evaluate a
    // few times per probe interval.
    let idle = ms((sh.cfg.probe.interval_ms / 4).max(10));
    loop {
        tokio::select! {
            () = sh.dirty.notified() => {}
            () = sh.telemetry.notified() => {
                // Fold the telemetry of many probes into one rebuild; a placement or health
                // change cuts the wait short.
                tokio::select! {
                    () = tokio::time::sleep(telemetry_delay) => {}
                    () = sh.dirty.notified() => {}
                    _ = stop.changed() => return,
                }
            }
            () = tokio::time::sleep(idle) => {}
            _ = stop.changed() => return,
        }
        sh.rebuild();
        tokio::select! {
            () = tokio::time::sleep(min_gap) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Reads a policy file for the reload loop: its stamp and text (or why it cannot be read).
async fn read_text(file: &std::path::Path) -> (Option<routing::Stamp>, Result<String, String>) {
    let meta = tokio::fs::metadata(file).await;
    let stamp = meta.as_ref().ok().map(routing::Stamp::of);
    let text = match meta {
        Err(e) => Err(format!("cannot read: {e}")),
        Ok(m) if m.len() > routing::MAX_POLICY_BYTES => {
            Err(format!("{} bytes, over the {}-byte limit", m.len(), routing::MAX_POLICY_BYTES))
        }
        Ok(_) => tokio::fs::read_to_string(file).await.map_err(|e| format!("cannot read: {e}")),
    };
    (stamp, text)
}

/// Logs and counts what became of a text offered to the runtime (from the file or the bus).
fn report_offer(sh: &Shared, offer: &routing::Offer, from: routing::Source) {
    match offer {
        routing::Offer::Applied { version, previous, warnings } => {
            for w in warnings {
                tracing::warn!(version = %version, warning = ?w, "routing policy: check against the fleet");
            }
            tracing::info!(version = %version, previous = %previous, from = from.as_str(), warnings = warnings.len(), "routing policy applied");
            sh.metrics.policy_applied(Some(previous), version);
        }
        routing::Offer::Refused(why) => {
            tracing::warn!(reason = %why, from = from.as_str(), "routing policy refused; the last good one stays in force");
            sh.metrics.policy_refused();
        }
        routing::Offer::Seen => {}
    }
}

/// Polls the policy file (with `source = "file"`) and the shadow file, if any, every
/// `policy.reload_interval_ms`: a new text (mtime or length) is offered to the runtime,
/// applied or refused, logged and counted. An unreadable or missing file is a refusal too;
/// the policy in force stays until a good text replaces it. The shadow file is read at once.
async fn reload_policy_loop(sh: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(rt) = &sh.routing else { return };
    let every = ms(rt.reload_interval_ms);
    loop {
        if let Some(file) = rt.file.as_deref().filter(|_| rt.source == routing::Source::File) {
            let stamp = tokio::fs::metadata(file).await.ok().map(|m| routing::Stamp::of(&m));
            if rt.is_new(stamp) {
                let (stamp, text) = read_text(file).await;
                let offer = rt.offer(
                    text,
                    routing::Origin::File(stamp),
                    &sh.snapshot,
                    &sh.jurisdictions,
                    unix_ms(),
                );
                report_offer(&sh, &offer, routing::Source::File);
            }
        }
        if let Some(file) = rt.shadow_file() {
            let stamp = tokio::fs::metadata(file).await.ok().map(|m| routing::Stamp::of(&m));
            if rt.is_new_shadow(stamp) {
                let (stamp, text) = read_text(file).await;
                match rt.offer_shadow(text, stamp, &sh.snapshot, &sh.jurisdictions) {
                    routing::Offer::Applied { version, .. } => {
                        tracing::info!(version = %version, "shadow routing policy loaded: compared beside the live one")
                    }
                    routing::Offer::Refused(why) => {
                        tracing::warn!(reason = %why, "shadow routing policy refused")
                    }
                    routing::Offer::Seen => {}
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Follows the policy on the bus (`[policy] source = "bus"`): the current text first (a
/// replica that starts late or reconnects gets it at once), then each new one, through the
/// same [`routing::Routing::offer`] as a file's; each text considered is acknowledged on the
/// bus (`edgeroute.policy.status.<replica>`) with the version in force after it. Until the
/// first push creates the policy's bucket, and whenever the watch breaks, it retries with a
/// capped backoff.
async fn follow_policy(sh: Arc<Shared>, bus: Bus, mut stop: watch::Receiver<bool>) {
    let Some(rt) = &sh.routing else { return };
    let mut delay = Duration::from_millis(100);
    loop {
        match bus.watch_policy().await {
            Ok(mut w) => {
                delay = Duration::from_millis(100);
                loop {
                    let update = tokio::select! {
                        u = w.next() => u,
                        _ = stop.changed() => return,
                    };
                    let Some(update) = update else { break };
                    let revision = update.revision;
                    let offer = rt.offer(
                        update.text,
                        routing::Origin::Bus(revision),
                        &sh.snapshot,
                        &sh.jurisdictions,
                        unix_ms(),
                    );
                    report_offer(&sh, &offer, routing::Source::Bus);
                    let (result, reason) = match offer {
                        routing::Offer::Applied { .. } => {
                            (edgeroute_bus::PolicyResult::Applied, None)
                        }
                        routing::Offer::Refused(why) => {
                            (edgeroute_bus::PolicyResult::Refused, Some(why))
                        }
                        routing::Offer::Seen => continue,
                    };
                    let status = edgeroute_bus::PolicyStatus {
                        replica: sh.cfg.discovery.id.clone(),
                        revision,
                        version: rt.status().version,
                        result,
                        reason,
                    };
                    if let Err(e) = bus.publish_policy_status(&status).await {
                        tracing::warn!(error = %e, revision, "routing policy: acknowledgement not sent (/health still reports it)");
                    }
                }
                tracing::warn!("routing policy: the bus watch ended; watching again");
            }
            Err(e) => {
                tracing::debug!(error = %e, "routing policy: cannot watch the bus yet (no push so far, or the bus is down); retrying");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Follows the topology bus into the registry. With the bus unreachable the replica serves
/// its last-known placement and keeps probing; the subscription resyncs when it returns.
async fn follow_bus(sh: Arc<Shared>, bus: Bus, mut stop: watch::Receiver<bool>) {
    let mut delay = Duration::from_millis(100);
    let mut sub = loop {
        match bus.subscribe().await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "topology bus: subscribe failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    let mut status = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            update = sub.next() => {
                let Some(update) = update else {
                    tracing::warn!("topology bus: subscription ended");
                    return;
                };
                sh.bus_updates.fetch_add(1, Ordering::Relaxed);
                sh.metrics.bus_updates.inc();
                let now = sh.now();
                let (change, refused) = match sh.fleet.lock() {
                    Ok(mut fleet) => {
                        let before = fleet.refusals();
                        let change = match &update {
                            FleetUpdate::Snapshot(s) => fleet.apply_bus(s, now),
                            FleetUpdate::Event(ev) => match sub.view().node(&ev.node_id) {
                                Some(s) => fleet.apply_bus(s, now),
                                None => Change::None,
                            },
                            FleetUpdate::Expired(id) => fleet.bus_expired(id, now),
                        };
                        let after = fleet.refusals();
                        let refused = fleet::Refusal::ALL
                            .into_iter()
                            .find(|r| after.get(*r) > before.get(*r))
                            .map(|r| (r, after.get(r)));
                        (change, refused)
                    }
                    Err(_) => (Change::None, None),
                };
                if let Some((why, total)) = refused {
                    sh.metrics.bus_refused.get_or_create(&ReasonLabels { reason: why.label() }).inc();
                    // Logged at the 1st, 2nd, 4th, 8th... of a kind: a flood cannot flood the log.
                    if total.is_power_of_two() {
                        let node = match &update {
                            FleetUpdate::Snapshot(s) => s.node_id.as_str(),
                            FleetUpdate::Event(ev) => ev.node_id.as_str(),
                            FleetUpdate::Expired(id) => id.as_str(),
                        };
                        tracing::warn!(node = %node, reason = why.label(), total, "topology bus: announcement not believed");
                    }
                }
                sh.apply(change);
                sh.bus_synced.store(sub.is_synced(), Ordering::Relaxed);
            }
            _ = status.tick() => {
                sh.bus_connected.store(bus.is_connected(), Ordering::Relaxed);
                sh.bus_synced.store(sub.is_synced(), Ordering::Relaxed);
            }
            _ = stop.changed() => return,
        }
    }
}
