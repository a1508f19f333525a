//! The edgeroute client SDK: decide once, talk direct.
//!
//! A [`Client`] asks discovery once per session for candidates, probes the top few in parallel
//! from the client's own network position, pins the session to the best measured node (random
//! among near-ties, so clients starting together spread out) and keeps the runner-up as a warm
//! standby. Every request then goes straight to the pinned node. The failover ladder:
//!
//! - connection refused, reset, timeout or a 5xx before any byte → the same request goes to the
//!   standby at once, and the session moves there;
//! - 429 / 503 (the node is full, not broken) → counted as slowness: this request moves if
//!   another node can take it, the node is not ejected and stays pinned;
//! - 4xx client errors → returned as they are: never retried elsewhere, never held against the
//!   node;
//! - a migrate hint on a response → the session moves before its next request (between turns);
//! - repeated hard failures → the node is ejected with an exponential, jittered backoff; if
//!   every candidate is ejected the client fails open to the best of them.
//!
//! Retries are budgeted (a share of recent requests plus a floor per second) so a fleet outage
//! never becomes a retry storm. Discovery answers are cached with their `ttl` and `stale_ok`, and
//! persisted to a file: a client that starts while discovery is down uses the last list.
//!
//! Streams ([`Session::chat_stream`]) keep the commit point on the client: before the first
//! content chunk the request moves like a JSON one (a first-token deadline bounds the wait);
//! after it, a cut, malformed or stalled stream is continued on the next node from the partial
//! answer (`continue_final_message`), so the caller sees one stream with no token lost or
//! repeated.
//!
//! A first token later than the TTFT deadline (mean + 4 × deviation of observed first tokens,
//! clamped) is hedged: the standby is raced against the pinned node, the first to commit wins
//! and the other request is dropped (cancelling its work on the node).
//!
//! Between turns the pinned node and the standby are re-probed now and then; a standby that
//! predicts a better first token by a margin on several consecutive re-probes (Peak-EWMA
//! smoothed) takes the session — planned moves have hysteresis and never happen mid-turn.
//!
//! The SDK never creates a runtime; it runs on the caller's tokio runtime.
//!
//! ```no_run
//! use edgeroute_client::{Client, ClientConfig};
//! use edgeroute_proto::{ChatCompletionRequest, ChatMessage, Role};
//!
//! # async fn voice_turns() -> Result<(), edgeroute_client::ClientError> {
//! let client = Client::new(ClientConfig {
//!     discovery: vec!["https://disc-tor.example:7070".into(), "https://disc-mtl.example:7070".into()],
//!     token: Some(std::env::var("EDGEROUTE_TOKEN").unwrap_or_default()),
//!     regions: vec!["toronto".into(), "montreal".into()], // data residency
//!     cache_file: Some("/var/cache/app/edgeroute-lists.json".into()),
//!     ..ClientConfig::default()
//! })?;
//! let mut session = client.session("llama-3.1-8b").await?; // discover, probe, pin
//! let req = ChatCompletionRequest::new(
//!     "llama-3.1-8b",
//!     vec![ChatMessage::new(Role::User, "What's the weather in Toronto?")],
//! );
//! let mut stream = session.chat_stream(&req).await?; // straight to the pinned node
//! while let Some(chunk) = stream.next().await {
//!     let chunk = chunk?;
//!     // speak chunk.choices[0].delta.content ...
//! #   let _ = chunk;
//! }
//! # Ok(())
//! # }
//! ```

pub mod cache;
mod stream;
mod tls;
pub mod transport;

pub use tls::tls_config;

pub use stream::ChatStream;
pub use transport::{BoxIo, ConnectFuture, Transport};

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use edgeroute_core::steer::{self, Backoff, PeakEwma, Probed, RetryBudget, TieMargin};
use edgeroute_proto::discovery::{Candidate, DiscoverResponse};
use edgeroute_proto::headers::{LOAD_HEADER, MIGRATE_HEADER, MigrateHint, SESSION_HEADER};
use edgeroute_proto::{ChatCompletion, ChatCompletionRequest, LoadReport};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};

use crate::cache::{Freshness, ListCache};

/// Everything a client is told; every field has a default.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Discovery base URLs, tried in order.
    pub discovery: Vec<String>,
    /// Bearer token for discovery and nodes.
    pub token: Option<String>,
    /// Data residency: only nodes in these regions (empty = any).
    pub regions: Vec<String>,
    /// Where this client is. Discovery ranks nodes by what it sees of them, not by this
    /// client's path to them: with a home region, discovery adds that region's best node
    /// (`near=`) and it is always among the probes, so a near node competes on its measured
    /// round trip. Default: none.
    pub home_region: Option<String>,
    /// Candidates probed at session start. Default 3.
    pub probe_k: usize,
    /// Probes not answered within this are ignored. Default 150 ms.
    pub probe_deadline: Duration,
    /// A session starting within this of the last probes of all its candidates reuses them
    /// instead of probing again. Default 2 s.
    pub probe_ttl: Duration,
    /// A session starting within this of the last probes of all its candidates (but after
    /// `probe_ttl`) does not wait for new ones: a measured round trip holds for minutes, so
    /// the pick uses it with discovery's fresh load figures, and the probes are refreshed in
    /// the background for the next session. Only a client's first sessions (or one after a
    /// long quiet) pay for probing. Default 30 s; zero always probes.
    pub path_ttl: Duration,
    /// A candidate list up to this far past its `ttl` is still used at once while discovery is
    /// asked again in the background (`stale-while-revalidate`): a session's start waits for
    /// discovery only when no recent list exists. Default 10 s; zero always waits.
    pub discovery_revalidate: Duration,
    /// One discovery request. Default 500 ms.
    pub discovery_timeout: Duration,
    /// TCP connect to a node. Default 300 ms (never the OS's two minutes).
    pub connect_timeout: Duration,
    /// A whole JSON answer. Default 60 s.
    pub request_timeout: Duration,
    /// A stream's first content chunk must arrive within this, or the request moves to the
    /// next node (nothing has reached the caller yet). Default 3 s.
    pub first_token_timeout: Duration,
    /// After the first token, a gap longer than this between chunks is a stall: the answer is
    /// continued on the next node. Default 2 s.
    pub stall_timeout: Duration,
    /// The hedge deadline before any first token was observed. Default 1 s. After that it is
    /// mean + 4 × deviation of observed first tokens, at least `hedge_min` and at most
    /// `first_token_timeout`.
    pub hedge_initial: Duration,
    /// Default 100 ms.
    pub hedge_min: Duration,
    /// Between turns, the pinned node and the standby are re-probed at most this often, to
    /// notice a persistently better standby. Default 5 s.
    pub reprobe_interval: Duration,
    /// The standby must predict a first token better by `max(abs_ms, rel × pinned)` ...
    pub move_margin: TieMargin,
    /// ... on this many consecutive re-probes before the session moves to it. Default 3.
    pub move_after: u32,
    /// Largest answer read, bytes. Default 8 MiB.
    pub max_response_bytes: usize,
    /// Where discovery answers are persisted. Default: not persisted.
    pub cache_file: Option<PathBuf>,
    /// PEM roots for `https://` nodes and discovery (a private fleet CA). Default: the Mozilla
    /// roots compiled in.
    pub ca_file: Option<PathBuf>,
    /// Seed for near-tie breaking and jitter. Default: from the OS.
    pub seed: Option<u64>,
    /// Retries as a share of requests over 10 s, plus a floor per second. Default 0.1 and 1.
    pub retry_ratio: f64,
    pub retry_floor_per_s: f64,
    /// Consecutive hard failures before a node is ejected. Default 2.
    pub eject_after: u32,
    pub eject_backoff: Backoff,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            discovery: vec![],
            token: None,
            regions: vec![],
            home_region: None,
            probe_k: 3,
            probe_deadline: Duration::from_millis(150),
            probe_ttl: Duration::from_secs(2),
            path_ttl: Duration::from_secs(30),
            discovery_revalidate: Duration::from_secs(10),
            discovery_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(300),
            request_timeout: Duration::from_secs(60),
            first_token_timeout: Duration::from_secs(3),
            stall_timeout: Duration::from_secs(2),
            hedge_initial: Duration::from_secs(1),
            hedge_min: Duration::from_millis(100),
            reprobe_interval: Duration::from_secs(5),
            move_margin: TieMargin { abs_ms: 10.0, rel: 0.2 },
            move_after: 3,
            max_response_bytes: 8 << 20,
            cache_file: None,
            ca_file: None,
            seed: None,
            retry_ratio: 0.1,
            retry_floor_per_s: 1.0,
            eject_after: 2,
            eject_backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(30),
                jitter: 0.5,
            },
        }
    }
}

/// Counts of the client's decisions since it was built (see [`Client::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub discoveries: u64,
    /// Lists served from the cache without asking discovery (fresh) or because it was
    /// unreachable (stale).
    pub cached_lists: u64,
    /// Lists served from the cache while discovery was unreachable.
    pub stale_lists: u64,
    pub discovery_failures: u64,
    pub probes: u64,
    pub probe_failures: u64,
    pub sessions: u64,
    /// Requests moved to another node after a failure (before or after the first token).
    pub failovers: u64,
    pub hedges: u64,
    /// Planned moves: migrate hints and persistently better standbys.
    pub migrations: u64,
    pub ejections: u64,
    /// Attempts beyond a request's first (retries, continuations, hedges) the retry budget
    /// allowed, whether they succeeded or not.
    pub retries: u64,
    /// Attempts the retry budget refused: what a fleet outage did not turn into a storm.
    pub retries_denied: u64,
}

impl std::ops::Add for Stats {
    type Output = Stats;

    /// Counts of several clients together.
    fn add(self, o: Stats) -> Stats {
        Stats {
            discoveries: self.discoveries + o.discoveries,
            cached_lists: self.cached_lists + o.cached_lists,
            stale_lists: self.stale_lists + o.stale_lists,
            discovery_failures: self.discovery_failures + o.discovery_failures,
            probes: self.probes + o.probes,
            probe_failures: self.probe_failures + o.probe_failures,
            sessions: self.sessions + o.sessions,
            failovers: self.failovers + o.failovers,
            hedges: self.hedges + o.hedges,
            migrations: self.migrations + o.migrations,
            ejections: self.ejections + o.ejections,
            retries: self.retries + o.retries,
            retries_denied: self.retries_denied + o.retries_denied,
        }
    }
}

#[derive(Debug, Default)]
struct Counters([std::sync::atomic::AtomicU64; 13]);

const RETRIES: usize = 11;
const RETRIES_DENIED: usize = 12;

impl Counters {
    fn count(&self, e: &Event) {
        if matches!(e, Event::Discovered { cached: Some(_), .. }) {
            self.0[10].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let i = match e {
            Event::Discovered { cached: Some("stale"), .. } => 1,
            Event::Discovered { .. } => 0,
            Event::DiscoveryFailed { .. } => 2,
            Event::Probed { .. } => 3,
            Event::ProbeFailed { .. } => 4,
            Event::Pinned { .. } => 5,
            Event::Failover { .. } => 6,
            Event::Hedged { .. } => 7,
            Event::Migrated { .. } => 8,
            Event::Ejected { .. } => 9,
        };
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn snapshot(&self) -> Stats {
        let v = |i: usize| self.0[i].load(std::sync::atomic::Ordering::Relaxed);
        Stats {
            discoveries: v(0) + v(1),
            cached_lists: v(10),
            stale_lists: v(1),
            discovery_failures: v(2),
            probes: v(3),
            probe_failures: v(4),
            sessions: v(5),
            failovers: v(6),
            hedges: v(7),
            migrations: v(8),
            ejections: v(9),
            retries: v(RETRIES),
            retries_denied: v(RETRIES_DENIED),
        }
    }

    fn bump(&self, i: usize) {
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the client decided, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Discovered {
        model: String,
        candidates: usize,
        /// `None`: discovery answered; `fresh`: the cached list within its ttl;
        /// `revalidating`: just past it, used while discovery is asked again behind; `stale`:
        /// discovery unreachable, the list within `stale_ok`.
        cached: Option<&'static str>,
    },
    DiscoveryFailed {
        endpoint: String,
        error: String,
    },
    Probed {
        node: String,
        rtt_ms: f64,
        predicted_ttft_ms: f64,
    },
    ProbeFailed {
        node: String,
        error: String,
    },
    Pinned {
        node: String,
        standby: Option<String>,
    },
    Failover {
        from: String,
        to: String,
        reason: String,
    },
    /// No first token within the TTFT deadline: the standby was raced against the pinned node.
    Hedged {
        from: String,
        to: String,
        after_ms: u64,
    },
    Migrated {
        from: String,
        to: String,
        reason: String,
    },
    Ejected {
        node: String,
        for_ms: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("discovery unreachable and no usable cached list: {0}")]
    Discovery(String),
    #[error("no candidate for model `{model}`: {reason}")]
    NoCandidates { model: String, reason: String },
    /// The node refused the request itself (a client error): returned as is, never retried.
    #[error("node `{node}` answered {status}: {body}")]
    Api { node: String, status: u16, body: String },
    #[error("every candidate failed: {0}")]
    Exhausted(String),
    #[error("retry budget spent; last failure: {0}")]
    BudgetSpent(String),
    /// A stream failed after tokens were delivered and no node could continue it.
    #[error("stream cut and not continued: {0}")]
    StreamCut(String),
    #[error("invalid request: {0}")]
    Invalid(String),
}

type Http = HttpClient<transport::Connector, Full<Bytes>>;
/// Called with every decision the client makes.
pub type Listener = Arc<dyn Fn(&Event) + Send + Sync>;

#[derive(Debug)]
struct NodeState {
    ewma: PeakEwma,
    failures: u32,
    ejected_until: Option<Instant>,
    /// A 429/503 said `Retry-After`: other nodes go first until then (not an ejection).
    cooling_until: Option<Instant>,
}

/// `Retry-After` in seconds (the HTTP-date form is not used by nodes), capped at a minute.
pub(crate) fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let s: u64 = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(s.min(60)))
}

struct Inner {
    cfg: ClientConfig,
    http: Http,
    cache: Mutex<ListCache>,
    budget: Mutex<RetryBudget>,
    nodes: Mutex<HashMap<String, NodeState>>,
    rng: Mutex<rand::rngs::StdRng>,
    ttft: Mutex<steer::TtftDeadline>,
    stats: Counters,
    /// When this client last pinned sessions to each node: pins younger than `probe_ttl`
    /// (the age at which probes are reused, so the node's own load report may not show them
    /// yet) count in that node's cost.
    pins: Mutex<HashMap<String, Vec<Instant>>>,
    /// The last answered probe of each node, and when.
    probes: Mutex<HashMap<String, (Probed, Instant)>>,
    listener: Option<Listener>,
    /// A background refresh of probes is under way.
    refreshing: std::sync::atomic::AtomicBool,
    /// Candidate lists being revalidated in the background, by cache key.
    revalidating: Mutex<std::collections::HashSet<String>>,
    origin: Instant,
    /// Wall-clock ms at `origin`: list ages are measured on the monotonic clock from there
    /// (so they follow tokio's clock, paused in simulations) and persisted as wall time.
    origin_unix_ms: u64,
}

/// The SDK handle; cheap to clone, shared by every session.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("discovery", &self.inner.cfg.discovery).finish()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How an attempt on one node ended.
pub(crate) enum Outcome<T> {
    Done(T, Option<MigrateHint>),
    /// A client error: stop, return it.
    Refused {
        status: u16,
        body: String,
    },
    /// Full or leaving: try elsewhere, do not hold it against the node. With a migrate hint,
    /// the session moves to whichever node answers.
    Busy(String, Option<MigrateHint>),
    /// Broken before any byte of an answer reached the caller: fail over, count it.
    Failed(String),
}

type Attempt = Outcome<ChatCompletion>;

/// The candidates probed at session start: discovery's first `k`, except that the best of
/// the client's home region takes the last place when none of the first `k` is in it.
fn probe_set<'a>(usable: &'a [Candidate], k: usize, home: Option<&str>) -> Vec<&'a Candidate> {
    let mut set: Vec<&Candidate> = usable.iter().take(k).collect();
    if let Some(home) = home
        && !set.iter().any(|c| c.region == home)
        && let Some(local) = usable.iter().skip(k).find(|c| c.region == home)
    {
        set.truncate(k.saturating_sub(1));
        set.push(local);
    }
    set
}

/// How long a new pin weighs in a node's cost (fading): about one first turn. Herding is
/// sessions starting in the same instant, before their requests show in any load report;
/// counting a voice session (idle between turns) for longer pushes callers off their best
/// node for nothing.
const PIN_FADE: Duration = Duration::from_millis(500);

/// The node's own TTFT and the wait its queue implies, from its load report, ms. A node that
/// served nothing lately reports a TTFT of 0 (no samples, not an instant answer): discovery's
/// figure for it (`prior_ms`: its longer view, or the fleet's median) stands in.
fn queue_wait(l: &LoadReport, prior_ms: f64) -> f64 {
    let p50 = if l.ttft_ms == 0 { prior_ms } else { f64::from(l.ttft_ms) };
    p50 + f64::from(l.queue_depth) * p50 / f64::from(l.capacity).max(1.0)
}

/// The same, from discovery's (seconds-old) figures for a candidate.
fn discovery_wait(c: &Candidate) -> f64 {
    c.ttft_p50_ms + f64::from(c.queue_depth) * c.ttft_p50_ms / f64::from(c.capacity).max(1.0)
}

/// What a non-2xx answer means for the ladder.
pub(crate) fn refusal<T>(
    status: StatusCode,
    text: String,
    hint: Option<MigrateHint>,
) -> Outcome<T> {
    match status.as_u16() {
        429 | 503 => Outcome::Busy(format!("HTTP {status}: {text}"), hint),
        400..=499 => Outcome::Refused { status: status.as_u16(), body: text },
        _ => Outcome::Failed(format!("HTTP {status}: {text}")),
    }
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Result<Client, ClientError> {
        Self::with_listener(cfg, None)
    }

    /// As [`Client::new`], calling `listener` with every decision.
    pub fn with_listener(
        cfg: ClientConfig,
        listener: Option<Listener>,
    ) -> Result<Client, ClientError> {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(cfg.connect_timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let tls = tls::tls_config(cfg.ca_file.as_deref()).map_err(ClientError::Invalid)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        Self::build(cfg, listener, transport::Connector::Net(connector))
    }

    /// As [`Client::with_listener`], reaching discovery and nodes through `transport` (plain
    /// HTTP over its streams) instead of TCP: how the SDK runs on an in-memory network under
    /// a paused clock, deterministically.
    pub fn with_transport(
        cfg: ClientConfig,
        listener: Option<Listener>,
        transport: Arc<dyn Transport>,
    ) -> Result<Client, ClientError> {
        let connect_timeout = cfg.connect_timeout;
        Self::build(cfg, listener, transport::Connector::Custom { transport, connect_timeout })
    }

    fn build(
        cfg: ClientConfig,
        listener: Option<Listener>,
        connector: transport::Connector,
    ) -> Result<Client, ClientError> {
        if cfg.probe_k == 0 {
            return Err(ClientError::Invalid("probe_k must be at least 1".into()));
        }
        let http = HttpClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        let cache = cfg.cache_file.as_deref().map(ListCache::load).unwrap_or_default();
        let rng = match cfg.seed {
            Some(s) => rand::rngs::StdRng::seed_from_u64(s),
            None => rand::rngs::StdRng::from_os_rng(),
        };
        let ttft = steer::TtftDeadline::new(
            cfg.hedge_initial,
            cfg.hedge_min,
            cfg.first_token_timeout.max(cfg.hedge_min),
        );
        Ok(Client {
            inner: Arc::new(Inner {
                budget: Mutex::new(RetryBudget::new(
                    cfg.retry_ratio,
                    cfg.retry_floor_per_s,
                    Duration::from_secs(10),
                )),
                cfg,
                http,
                cache: Mutex::new(cache),
                nodes: Mutex::new(HashMap::new()),
                rng: Mutex::new(rng),
                ttft: Mutex::new(ttft),
                probes: Mutex::new(HashMap::new()),
                pins: Mutex::new(HashMap::new()),
                stats: Counters::default(),
                listener,
                refreshing: std::sync::atomic::AtomicBool::new(false),
                revalidating: Mutex::new(std::collections::HashSet::new()),
                origin: Instant::now(),
                origin_unix_ms: unix_ms(),
            }),
        })
    }

    /// Wall-clock now, ms: the wall time at start plus monotonic time since.
    fn wall_ms(&self) -> u64 {
        self.inner.origin_unix_ms + self.inner.origin.elapsed().as_millis() as u64
    }

    fn emit(&self, e: Event) {
        tracing::debug!(event = ?e, "edgeroute client");
        self.inner.stats.count(&e);
        if let Some(l) = &self.inner.listener {
            l(&e);
        }
    }

    /// Sessions this client pinned to `id` lately, each weighing 1 when just pinned and
    /// nothing after [`PIN_FADE`] (by then its first request is on the node, and in the load
    /// report every answer carries).
    fn recent_pins(&self, id: &str) -> f64 {
        let ttl = PIN_FADE.as_secs_f64();
        let Ok(mut pins) = self.inner.pins.lock() else { return 0.0 };
        let Some(v) = pins.get_mut(id) else { return 0.0 };
        v.retain(|t| t.elapsed().as_secs_f64() < ttl);
        if ttl <= 0.0 {
            return 0.0;
        }
        v.iter().map(|t| 1.0 - t.elapsed().as_secs_f64() / ttl).sum()
    }

    fn note_pin(&self, id: &str) {
        if let Ok(mut pins) = self.inner.pins.lock() {
            pins.entry(id.to_owned()).or_default().push(Instant::now());
        }
    }

    /// Counts of every decision so far (for an application's metrics).
    pub fn stats(&self) -> Stats {
        self.inner.stats.snapshot()
    }

    fn draw(&self) -> f64 {
        self.inner.rng.lock().map_or(0.5, |mut r| r.random::<f64>())
    }

    fn request(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, String> {
        let mut b = Request::builder().method(method).uri(url);
        if let Some(t) = &self.inner.cfg.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if !body.is_empty() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(body)).map_err(|e| e.to_string())
    }

    /// Candidates for `model`: a fresh cached answer, else discovery (endpoints in order), else
    /// a stale cached answer within `stale_ok`.
    pub async fn discover(&self, model: &str) -> Result<Vec<Candidate>, ClientError> {
        let cfg = &self.inner.cfg;
        let key = cache::key(model, None, &cfg.regions);
        let now = self.wall_ms();
        let revalidate = cfg.discovery_revalidate.as_millis() as u64;
        let cached =
            self.inner.cache.lock().ok().and_then(|c| {
                c.get_revalidating(&key, now, revalidate).map(|(a, f)| (a.clone(), f))
            });
        match &cached {
            Some((a, Freshness::Fresh)) => {
                self.emit(Event::Discovered {
                    model: model.into(),
                    candidates: a.candidates.len(),
                    cached: Some("fresh"),
                });
                return Ok(a.candidates.clone());
            }
            Some((a, Freshness::Revalidate)) => {
                self.revalidate(model, &key);
                self.emit(Event::Discovered {
                    model: model.into(),
                    candidates: a.candidates.len(),
                    cached: Some("revalidating"),
                });
                return Ok(a.candidates.clone());
            }
            _ => {}
        }
        match self.query_discovery(model, &key).await {
            Ok(candidates) => Ok(candidates),
            Err(e @ ClientError::NoCandidates { .. }) => Err(e),
            Err(e) => match cached {
                Some((a, _)) => {
                    self.emit(Event::Discovered {
                        model: model.into(),
                        candidates: a.candidates.len(),
                        cached: Some("stale"),
                    });
                    Ok(a.candidates)
                }
                None => Err(e),
            },
        }
    }

    /// Asks discovery again for `model` on a task of its own (one at a time per list).
    fn revalidate(&self, model: &str, key: &str) {
        let fresh = self.inner.revalidating.lock().is_ok_and(|mut r| r.insert(key.to_owned()));
        if !fresh {
            return;
        }
        let (this, model, key) = (self.clone(), model.to_owned(), key.to_owned());
        tokio::spawn(async move {
            let _ = this.query_discovery(&model, &key).await;
            if let Ok(mut r) = this.inner.revalidating.lock() {
                r.remove(&key);
            }
        });
    }

    /// Asks the discovery endpoints in order; the first answer is cached (and persisted).
    async fn query_discovery(&self, model: &str, key: &str) -> Result<Vec<Candidate>, ClientError> {
        let cfg = &self.inner.cfg;
        let mut query = format!("model={}&k={}", encode(model), (cfg.probe_k + 2).min(32));
        if !cfg.regions.is_empty() {
            query.push_str(&format!("&region={}", encode(&cfg.regions.join(","))));
        }
        if let Some(home) = &cfg.home_region {
            query.push_str(&format!("&near={}", encode(home)));
        }
        let mut last_error = String::from("no discovery endpoint configured");
        for endpoint in &cfg.discovery {
            let url = format!("{}/v1/discover?{query}", endpoint.trim_end_matches('/'));
            match self.fetch_json::<DiscoverResponse>(&url, cfg.discovery_timeout).await {
                Ok(answer) => {
                    let candidates = answer.candidates.clone();
                    if candidates.is_empty() {
                        let reason = answer
                            .reason
                            .as_ref()
                            .map_or("no candidates".to_owned(), |r| r.message.clone());
                        return Err(ClientError::NoCandidates { model: model.into(), reason });
                    }
                    if let Ok(mut c) = self.inner.cache.lock() {
                        c.put(key.to_owned(), answer, self.wall_ms());
                        c.prune(self.wall_ms());
                        if let Some(path) = &cfg.cache_file
                            && let Err(e) = c.save(path)
                        {
                            tracing::warn!(error = %e, path = %path.display(), "could not persist the candidate list");
                        }
                    }
                    self.emit(Event::Discovered {
                        model: model.into(),
                        candidates: candidates.len(),
                        cached: None,
                    });
                    return Ok(candidates);
                }
                Err(e) => {
                    self.emit(Event::DiscoveryFailed {
                        endpoint: endpoint.clone(),
                        error: e.clone(),
                    });
                    last_error = e;
                }
            }
        }
        Err(ClientError::Discovery(last_error))
    }

    async fn fetch_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
    ) -> Result<T, String> {
        let req = self.request(Method::GET, url, Bytes::new())?;
        let work = async {
            let res = self.inner.http.request(req).await.map_err(|e| e.to_string())?;
            let status = res.status();
            let body = Limited::new(res.into_body(), self.inner.cfg.max_response_bytes)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
            }
            serde_json::from_slice(&body).map_err(|e| format!("bad answer: {e}"))
        };
        tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| Err("timed out".into()))
    }

    /// One probe: a small request on a (new or pooled) connection, which then stays warm.
    async fn probe(&self, c: &Candidate) -> Result<Probed, String> {
        let url = format!("{}/health", c.url.trim_end_matches('/'));
        let req = self.request(Method::GET, &url, Bytes::new())?;
        let t = Instant::now();
        let res = self.inner.http.request(req).await.map_err(|e| e.to_string())?;
        let load: Option<LoadReport> = res
            .headers()
            .get(LOAD_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let status = res.status();
        // A node that is leaving says so on every answer: not a candidate for a new session.
        let leaving = res.headers().get(MIGRATE_HEADER).is_some();
        let _ = res.into_body().collect().await;
        let rtt = t.elapsed();
        if leaving {
            return Err("draining (migrate hint on its answer)".into());
        }
        if !(status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE) {
            return Err(format!("HTTP {status}"));
        }
        // The node's own TTFT and the wait its queue implies; discovery's figures if the
        // node sent no load report.
        let wait = match load {
            Some(l) => queue_wait(&l, c.ttft_p50_ms),
            None => discovery_wait(c),
        };
        Ok(Probed { id: c.id.clone(), rtt, queue_wait_ms: wait })
    }

    /// Discovers `model` and probes its candidates now, ahead of any session (at start-up,
    /// before calls arrive), so the first sessions start warm instead of waiting for probes.
    /// Returns how many candidates answered.
    pub async fn prepare(&self, model: &str) -> Result<usize, ClientError> {
        let candidates = self.discover(model).await?;
        let set =
            probe_set(&candidates, self.inner.cfg.probe_k, self.inner.cfg.home_region.as_deref());
        Ok(self.probe_all(&set).await.len())
    }

    /// Starts a session for `model`: discover, probe the top candidates in parallel, pin the
    /// best, keep the runner-up as standby.
    pub async fn session(&self, model: &str) -> Result<Session, ClientError> {
        let candidates = self.discover(model).await?;
        let now = Instant::now();
        let usable: Vec<Candidate> = {
            let nodes = self.inner.nodes.lock().ok();
            let ejected = |id: &str| {
                nodes
                    .as_ref()
                    .and_then(|n| n.get(id))
                    .and_then(|s| s.ejected_until)
                    .is_some_and(|t| t > now)
            };
            let fine: Vec<Candidate> =
                candidates.iter().filter(|c| !ejected(&c.id)).cloned().collect();
            // Every candidate ejected: fail open to the list as discovery ranked it.
            if fine.is_empty() { candidates.clone() } else { fine }
        };
        let probe_set =
            probe_set(&usable, self.inner.cfg.probe_k, self.inner.cfg.home_region.as_deref());
        // Probed moments ago (a session just started, or a re-probe): reuse, so a warm start
        // adds nothing but the pick.
        let mut results = match self.recent_probes(&probe_set) {
            Some(r) => r,
            None => match self.known_paths(&probe_set) {
                Some(r) => {
                    self.refresh_probes(&probe_set);
                    r
                }
                None => self.probe_all(&probe_set).await,
            },
        };
        // Fewer than two answered (nodes gone or draining since the list was made): probe the
        // next candidates too, so there is a choice and a standby.
        let k = self.inner.cfg.probe_k;
        let mut next = k;
        while results.len() < 2 && next < usable.len() {
            let more: Vec<&Candidate> = usable.iter().skip(next).take(k).collect();
            next += k;
            results.extend(self.probe_all(&more).await);
        }
        let mut order: Vec<Candidate> = Vec::new();
        if !results.is_empty() {
            // Each session this client pinned to a node lately counts as one more request in
            // its queue (a node's wait grows by 1/capacity of its TTFT per queued request),
            // fading out over `PIN_FADE`:
            // sessions starting together spread out instead of herding onto the node that
            // looked best a moment ago. Older sessions are in the node's own load report (a
            // voice session is idle between turns: counting it for its whole life, or as a
            // whole outstanding request, overstates it and pushes callers off their best node).
            let probed: Vec<Probed> = results
                .iter()
                .map(|(p, c)| {
                    let mut p = p.clone();
                    let pins = self.recent_pins(&p.id);
                    p.queue_wait_ms *= 1.0 + pins / f64::from(c.capacity).max(1.0);
                    p
                })
                .collect();
            if let Some(i) = steer::pick(&probed, TieMargin::default(), self.draw()) {
                order.push(results[i].1.clone());
                // The standby and the rest by the same adjusted cost.
                let mut rest: Vec<usize> = (0..results.len()).filter(|j| *j != i).collect();
                rest.sort_by(|a, b| {
                    probed[*a].predicted_ttft_ms().total_cmp(&probed[*b].predicted_ttft_ms())
                });
                order.extend(rest.into_iter().map(|j| results[j].1.clone()));
            }
        }
        // Then the unprobed (or unanswered) candidates, in discovery's order.
        for c in &usable {
            if !order.iter().any(|o| o.id == c.id) {
                order.push(c.clone());
            }
        }
        self.emit(Event::Pinned {
            node: order[0].id.clone(),
            standby: order.get(1).map(|c| c.id.clone()),
        });
        let id = format!("s-{:016x}", self.inner.rng.lock().map_or(0, |mut r| r.random::<u64>()));
        self.note_pin(&order[0].id);
        let counted = order[0].id.clone();
        Ok(Session {
            client: self.clone(),
            id,
            model: model.into(),
            order,
            pending_move: None,
            moved: Arc::new(Mutex::new(None)),
            watch: None,
            last_reprobe: Instant::now(),
            reprobe: None,
            better_streak: 0,
            counted,
        })
    }

    /// Every candidate of `set` probed within `probe_ttl`, if all were.
    fn recent_probes(&self, set: &[&Candidate]) -> Option<Vec<(Probed, Candidate)>> {
        let ttl = self.inner.cfg.probe_ttl;
        let probes = self.inner.probes.lock().ok()?;
        set.iter()
            .map(|c| {
                probes
                    .get(&c.id)
                    .filter(|(_, at)| at.elapsed() < ttl)
                    .map(|(p, _)| (p.clone(), (*c).clone()))
            })
            .collect()
    }

    /// The candidates of `set` probed within `path_ttl` — their measured round trips, with
    /// the node's TTFT and queue from discovery's (fresher) figures — if at least two are (a
    /// pin and a standby). A candidate missing lost its last probe race (an early decision
    /// left it unanswered: it could not win) or is new; the background refresh probes it.
    fn known_paths(&self, set: &[&Candidate]) -> Option<Vec<(Probed, Candidate)>> {
        let ttl = self.inner.cfg.path_ttl;
        let probes = self.inner.probes.lock().ok()?;
        let known: Vec<(Probed, Candidate)> = set
            .iter()
            .filter_map(|c| {
                let (p, _) = probes.get(&c.id).filter(|(_, at)| at.elapsed() < ttl)?;
                let wait = discovery_wait(c);
                Some((Probed { id: c.id.clone(), rtt: p.rtt, queue_wait_ms: wait }, (*c).clone()))
            })
            .collect();
        (known.len() >= 2.min(set.len()) && !known.is_empty()).then_some(known)
    }

    /// Probes `set` on a task of its own (one refresh at a time), for the sessions to come.
    fn refresh_probes(&self, set: &[&Candidate]) {
        use std::sync::atomic::Ordering;
        if self.inner.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let set: Vec<Candidate> = set.iter().map(|c| (*c).clone()).collect();
        tokio::spawn(async move {
            this.probe_all(&set.iter().collect::<Vec<_>>()).await;
            this.inner.refreshing.store(false, Ordering::Release);
        });
    }

    async fn probe_all(&self, set: &[&Candidate]) -> Vec<(Probed, Candidate)> {
        let limit = self.inner.cfg.probe_deadline;
        let mut tasks = tokio::task::JoinSet::new();
        for c in set {
            let this = self.clone();
            let c = (*c).clone();
            tasks.spawn(async move {
                // Bounded on its own: a probe outlives an early decision, and then only warms
                // its connection and the cache for the sessions to come.
                let r = tokio::time::timeout(limit, this.probe(&c))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {} ms", limit.as_millis())));
                this.record_probe(&c, &r);
                (c, r)
            });
        }
        let start = Instant::now();
        let mut out: Vec<(Probed, Candidate)> = Vec::new();
        let mut failed: Vec<String> = Vec::new();
        while let Some(next) = tasks.join_next().await {
            match next {
                Ok((c, Ok(p))) => out.push((p, c)),
                Ok((c, Err(_))) => failed.push(c.id.clone()),
                Err(_) => {}
            }
            // Decide early: nothing still outstanding can beat the best answer so far. An
            // outstanding node's prediction is at least the time waited plus its own first-token
            // time (discovery's figure): a far node is given up on sooner than a near one.
            let floor_ms = set
                .iter()
                .filter(|c| !failed.contains(&c.id) && !out.iter().any(|(_, o)| o.id == c.id))
                .map(|c| c.ttft_p50_ms.max(0.0))
                .min_by(f64::total_cmp)
                .unwrap_or(0.0);
            if let Some(best) =
                out.iter().map(|(p, _)| p.predicted_ttft_ms()).min_by(f64::total_cmp)
                && !steer::can_still_win(
                    best,
                    start.elapsed() + Duration::from_secs_f64(floor_ms / 1000.0),
                    TieMargin::default(),
                )
            {
                break;
            }
        }
        tasks.detach_all();
        out
    }

    /// A finished probe: its answer cached (a failed one forgets the path) and announced.
    fn record_probe(&self, c: &Candidate, r: &Result<Probed, String>) {
        match r {
            Ok(p) => {
                if let Ok(mut probes) = self.inner.probes.lock() {
                    probes.insert(c.id.clone(), (p.clone(), Instant::now()));
                }
                self.emit(Event::Probed {
                    node: c.id.clone(),
                    rtt_ms: ms(p.rtt),
                    predicted_ttft_ms: p.predicted_ttft_ms(),
                });
            }
            Err(e) => {
                if let Ok(mut probes) = self.inner.probes.lock() {
                    probes.remove(&c.id);
                }
                self.emit(Event::ProbeFailed { node: c.id.clone(), error: e.clone() });
            }
        }
    }

    fn node_ok(&self, id: &str, latency: Duration) {
        if let Ok(mut nodes) = self.inner.nodes.lock() {
            let now = self.inner.origin.elapsed();
            let s = nodes.entry(id.to_owned()).or_insert_with(|| NodeState {
                ewma: PeakEwma::new(Duration::from_secs(10), latency),
                failures: 0,
                ejected_until: None,
                cooling_until: None,
            });
            s.ewma.observe(latency, now);
            s.failures = 0;
            s.ejected_until = None;
        }
    }

    fn node_failed(&self, id: &str) {
        self.count_failure(id, 0);
    }

    /// A node that lost a hedge is probed at once, on a task of its own: if it does not
    /// answer that either, it is dead rather than slow, and is ejected — so this client's
    /// other sessions pinned to it leave before their next turn instead of each waiting out a
    /// first-token deadline there.
    fn suspect(&self, node: &Candidate) {
        let (this, node) = (self.clone(), node.clone());
        tokio::spawn(async move {
            let limit = this.inner.cfg.probe_deadline;
            let r = tokio::time::timeout(limit, this.probe(&node))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} ms", limit.as_millis())));
            this.record_probe(&node, &r);
            if r.is_err() {
                this.count_failure(&node.id, this.inner.cfg.eject_after);
            }
        });
    }

    /// One more failure of `id`, counted as at least `at_least` (to eject at once).
    fn count_failure(&self, id: &str, at_least: u32) {
        let draw = self.draw();
        let mut ejected = None;
        if let Ok(mut nodes) = self.inner.nodes.lock() {
            let s = nodes.entry(id.to_owned()).or_insert_with(|| NodeState {
                ewma: PeakEwma::new(Duration::from_secs(10), Duration::from_millis(100)),
                failures: 0,
                ejected_until: None,
                cooling_until: None,
            });
            s.failures = s.failures.saturating_add(1).max(at_least);
            if s.failures >= self.inner.cfg.eject_after {
                let d = self
                    .inner
                    .cfg
                    .eject_backoff
                    .delay(s.failures - self.inner.cfg.eject_after + 1, draw);
                s.ejected_until = Some(Instant::now() + d);
                ejected = Some(d);
            }
        }
        if let Some(d) = ejected {
            self.emit(Event::Ejected { node: id.into(), for_ms: d.as_millis() as u64 });
        }
    }

    /// The node asked for a pause (`Retry-After`): other nodes go first until it passes.
    pub(crate) fn cool_down(&self, id: &str, d: Duration) {
        if let Ok(mut nodes) = self.inner.nodes.lock() {
            let s = nodes.entry(id.to_owned()).or_insert_with(|| NodeState {
                ewma: PeakEwma::new(Duration::from_secs(10), Duration::from_millis(100)),
                failures: 0,
                ejected_until: None,
                cooling_until: None,
            });
            s.cooling_until = Some(Instant::now() + d);
        }
    }

    fn is_ejected(&self, id: &str) -> bool {
        self.until_later(id, |s| s.ejected_until)
    }

    fn cooling(&self, id: &str) -> bool {
        self.until_later(id, |s| s.cooling_until)
    }

    /// Whether the deadline `field` picks from `id`'s state is still ahead.
    fn until_later(&self, id: &str, field: impl Fn(&NodeState) -> Option<Instant>) -> bool {
        let now = Instant::now();
        self.inner.nodes.lock().is_ok_and(|n| n.get(id).and_then(field).is_some_and(|t| t > now))
    }

    fn observe_ttft(&self, ttft: Duration) {
        if let Ok(mut t) = self.inner.ttft.lock() {
            t.observe(ttft);
        }
    }

    fn ttft_deadline(&self) -> Duration {
        self.inner.ttft.lock().map_or(self.inner.cfg.first_token_timeout, |t| t.deadline())
    }

    fn try_retry(&self) -> bool {
        let now = self.inner.origin.elapsed();
        let granted = self.inner.budget.lock().is_ok_and(|mut b| b.try_retry(now));
        self.inner.stats.bump(if granted { RETRIES } else { RETRIES_DENIED });
        granted
    }

    /// Sends a chat request to `node`: the answer's head and its migrate hint, with any
    /// `Retry-After` already noted.
    pub(crate) async fn send_chat(
        &self,
        node: &Candidate,
        body: &Bytes,
        session: &str,
    ) -> Result<(http::Response<hyper::body::Incoming>, Option<MigrateHint>), String> {
        let url = format!("{}/v1/chat/completions", node.url.trim_end_matches('/'));
        let mut req = self.request(Method::POST, &url, body.clone())?;
        if let Ok(v) = http::HeaderValue::from_str(session) {
            req.headers_mut().insert(SESSION_HEADER, v);
        }
        let res = self.inner.http.request(req).await.map_err(|e| format!("connect/send: {e}"))?;
        let hint: Option<MigrateHint> = res
            .headers()
            .get(MIGRATE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if matches!(res.status().as_u16(), 429 | 503)
            && let Some(d) = retry_after(res.headers())
        {
            self.cool_down(&node.id, d);
        }
        // A node that is leaving is no candidate for new sessions: forget its last probe.
        if hint.is_some()
            && let Ok(mut probes) = self.inner.probes.lock()
        {
            probes.remove(&node.id);
        }
        // Every answer carries the node's load: reused probes are refreshed with it.
        if let Some(l) = res
            .headers()
            .get(LOAD_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<LoadReport>().ok())
            && let Ok(mut probes) = self.inner.probes.lock()
            && let Some((p, _)) = probes.get_mut(&node.id)
        {
            p.queue_wait_ms = queue_wait(&l, node.ttft_p50_ms);
        }
        Ok((res, hint))
    }

    async fn attempt(&self, node: &Candidate, body: &Bytes, session: &str) -> Attempt {
        let t = Instant::now();
        let work = async {
            let (res, hint) = match self.send_chat(node, body, session).await {
                Ok(r) => r,
                Err(e) => return Outcome::Failed(e),
            };
            let status = res.status();
            let body = match Limited::new(res.into_body(), self.inner.cfg.max_response_bytes)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(e) => return Outcome::Failed(format!("reading the answer: {e}")),
            };
            if !status.is_success() {
                return refusal(status, String::from_utf8_lossy(&body).into_owned(), hint);
            }
            match serde_json::from_slice::<ChatCompletion>(&body) {
                Ok(c) => Outcome::Done(c, hint),
                Err(e) => Outcome::Failed(format!("malformed answer: {e}")),
            }
        };
        let out = tokio::time::timeout(self.inner.cfg.request_timeout, work)
            .await
            .unwrap_or_else(|_| Outcome::Failed("no answer within the request timeout".into()));
        if let Outcome::Done(..) = out {
            self.node_ok(&node.id, t.elapsed());
        }
        out
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b',' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where a failover ladder stands.
#[derive(Debug, Default)]
struct Ladder {
    tried: Vec<String>,
    failures: Vec<String>,
    /// Why the pinned node cannot keep the session, and whether it was a planned move.
    pinned_broken: Option<(String, bool)>,
}

/// A conversation pinned to one node, with the others ranked behind it.
#[derive(Debug)]
pub struct Session {
    client: Client,
    /// Sent as `x-edgeroute-session`: a draining node keeps serving known sessions until its
    /// deadline, with a migrate hint.
    id: String,
    model: String,
    /// Pinned first, then the standby, then the rest.
    order: Vec<Candidate>,
    /// A move requested by a migrate hint, carried out before the next request.
    pending_move: Option<String>,
    /// A move made by a stream's continuation (on its own task): (node, reason).
    moved: Arc<Mutex<Option<(String, String)>>>,
    /// Smoothed predictions from re-probes between turns: pinned, standby (by node id).
    watch: Option<Watch>,
    last_reprobe: Instant,
    /// A re-probe of (pinned, standby) running on its own task; its answers when done.
    reprobe: Option<ReprobeSlot>,
    /// Consecutive re-probes on which the standby was better by the margin.
    better_streak: u32,
    /// The node this session was last pinned to (a move to another is a new pin there).
    counted: String,
}

/// The pinned node and the standby re-probed, and what each probe gave (filled when both
/// are done).
type ReprobeSlot = (String, String, Arc<Mutex<Option<(ProbeResult, ProbeResult)>>>);
type ProbeResult = Result<Probed, String>;

/// Peak-EWMA of the predicted first-token time of the pinned node and the standby.
#[derive(Debug)]
struct Watch {
    pinned: String,
    standby: String,
    pinned_ms: PeakEwma,
    standby_ms: PeakEwma,
}

impl Session {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// The node the session is pinned to.
    pub fn pinned(&self) -> &Candidate {
        &self.order[0]
    }

    pub fn standby(&self) -> Option<&Candidate> {
        self.order.get(1)
    }

    /// A move to another node pins the session there.
    fn recount(&mut self) {
        if self.order[0].id != self.counted {
            self.counted = self.order[0].id.clone();
            self.client.note_pin(&self.counted);
        }
    }

    fn move_to(&mut self, i: usize, reason: String, migrated: bool) {
        if i == 0 || i >= self.order.len() {
            return;
        }
        let from = self.order[0].id.clone();
        let node = self.order.remove(i);
        let to = node.id.clone();
        self.order.insert(0, node);
        self.recount();
        let e = if migrated {
            Event::Migrated { from, to, reason }
        } else {
            Event::Failover { from, to, reason }
        };
        self.client.emit(e);
    }

    /// One chat completion (JSON), with the failover ladder.
    /// Carries out moves decided since the last request: a migrate hint (to the standby) or a
    /// mid-stream failover (to the node that continued the stream).
    fn apply_moves(&mut self) {
        let moved = self.moved.lock().ok().and_then(|mut m| m.take());
        if let Some((node, _)) = moved
            && let Some(i) = self.order.iter().position(|c| c.id == node)
        {
            // Already announced as a failover by the stream; only the order changes.
            let n = self.order.remove(i);
            self.order.insert(0, n);
            self.recount();
        }
        if let Some(reason) = self.pending_move.take() {
            // Between turns: the standby is already connected.
            self.move_to(1, reason, true);
        }
    }

    /// Between turns, never in a turn's path: re-probes the pinned node and the standby on a
    /// task of their own (at most every `reprobe_interval`) and, once they answered, moves the
    /// session when the standby has predicted a first token better by the margin on
    /// `move_after` consecutive re-probes (hysteresis: one good probe never moves a
    /// conversation) — or at once when the pinned node no longer answers while the standby
    /// does. A pinned node this client has ejected (other sessions failed there) is left
    /// before the turn, too.
    fn reconsider(&mut self) {
        if self.order.len() < 2 {
            return;
        }
        if self.client.is_ejected(&self.order[0].id)
            && let Some(i) =
                (1..self.order.len()).find(|i| !self.client.is_ejected(&self.order[*i].id))
        {
            let reason = format!("{} ejected after failures seen by this client", self.order[0].id);
            self.move_to(i, reason, false);
            self.demote_old_pin();
            return;
        }
        let done = match &self.reprobe {
            Some((a, b, slot)) => {
                let taken = slot.lock().ok().and_then(|mut s| s.take());
                taken.map(|r| (a.clone(), b.clone(), r))
            }
            None => None,
        };
        if let Some((a, b, (pa, pb))) = done {
            self.reprobe = None;
            if self.order[0].id == a && self.order[1].id == b {
                self.weigh(pa, pb);
            }
        }
        let cfg = &self.client.inner.cfg;
        if self.reprobe.is_some() || self.last_reprobe.elapsed() < cfg.reprobe_interval {
            return;
        }
        self.last_reprobe = Instant::now();
        let (a, b) = (self.order[0].clone(), self.order[1].clone());
        let slot = Arc::new(Mutex::new(None));
        self.reprobe = Some((a.id.clone(), b.id.clone(), slot.clone()));
        let (client, deadline) = (self.client.clone(), cfg.probe_deadline);
        tokio::spawn(async move {
            let probe = |c: Candidate| {
                let client = client.clone();
                async move {
                    tokio::time::timeout(deadline, client.probe(&c)).await.unwrap_or_else(|_| {
                        Err(format!("no answer within {} ms", deadline.as_millis()))
                    })
                }
            };
            let both = tokio::join!(probe(a), probe(b));
            if let Ok(mut s) = slot.lock() {
                *s = Some(both);
            }
        });
    }

    /// After a move away from a failing node (now second): it goes last, so it is not the
    /// standby a hedge would race.
    fn demote_old_pin(&mut self) {
        if self.order.len() > 2 {
            let old = self.order.remove(1);
            self.order.push(old);
        }
    }

    /// Weighs a finished re-probe of the pinned node (`pa`) and the standby (`pb`).
    fn weigh(&mut self, pa: ProbeResult, pb: ProbeResult) {
        let cfg = &self.client.inner.cfg;
        let (pa, pb) = match (pa, pb) {
            (Ok(pa), Ok(pb)) => (pa, pb),
            (Err(e), Ok(_)) => {
                self.better_streak = 0;
                self.watch = None;
                let reason = format!("{} did not answer its re-probe: {e}", self.order[0].id);
                self.move_to(1, reason, false);
                self.demote_old_pin();
                return;
            }
            _ => {
                self.better_streak = 0;
                return;
            }
        };
        let (a, b) = (self.order[0].clone(), self.order[1].clone());
        let now = self.client.inner.origin.elapsed();
        let tau = cfg.reprobe_interval * 4;
        let w = match self.watch.take() {
            Some(w) if w.pinned == a.id && w.standby == b.id => w,
            _ => Watch {
                pinned: a.id.clone(),
                standby: b.id.clone(),
                pinned_ms: PeakEwma::new(
                    tau,
                    Duration::from_secs_f64(pa.predicted_ttft_ms() / 1000.0),
                ),
                standby_ms: PeakEwma::new(
                    tau,
                    Duration::from_secs_f64(pb.predicted_ttft_ms() / 1000.0),
                ),
            },
        };
        let mut w = w;
        w.pinned_ms.observe(Duration::from_secs_f64(pa.predicted_ttft_ms() / 1000.0), now);
        w.standby_ms.observe(Duration::from_secs_f64(pb.predicted_ttft_ms() / 1000.0), now);
        let (p, s) = (w.pinned_ms.latency_ms(), w.standby_ms.latency_ms());
        let margin = cfg.move_margin.abs_ms.max(cfg.move_margin.rel * p);
        self.better_streak = if s + margin < p { self.better_streak + 1 } else { 0 };
        self.watch = Some(w);
        if self.better_streak >= cfg.move_after {
            self.better_streak = 0;
            self.watch = None;
            self.move_to(
                1,
                format!(
                    "standby predicted {s:.1} ms against {p:.1} ms for {} re-probes",
                    cfg.move_after
                ),
                true,
            );
        }
    }

    /// Tries the nodes in order until one answers (the failover ladder); returns the answer
    /// and the index of the node that gave it.
    async fn ladder<T, F, Fut>(&mut self, attempt: F) -> Result<(T, usize), ClientError>
    where
        F: FnMut(Candidate) -> Fut,
        Fut: std::future::Future<Output = Outcome<T>>,
    {
        self.record_request();
        self.ladder_from(Ladder::default(), attempt).await
    }

    fn record_request(&self) {
        let now = self.client.inner.origin.elapsed();
        if let Ok(mut b) = self.client.inner.budget.lock() {
            b.record_request(now);
        }
    }

    /// The ladder, continuing from nodes already tried.
    async fn ladder_from<T, F, Fut>(
        &mut self,
        state: Ladder,
        mut attempt: F,
    ) -> Result<(T, usize), ClientError>
    where
        F: FnMut(Candidate) -> Fut,
        Fut: std::future::Future<Output = Outcome<T>>,
    {
        let Ladder { mut tried, mut failures, mut pinned_broken } = state;
        // Untried nodes, those not cooling down (after a `Retry-After`) first.
        let next = |order: &[Candidate], tried: &[String]| {
            order
                .iter()
                .position(|c| !tried.contains(&c.id) && !self.client.cooling(&c.id))
                .or_else(|| order.iter().position(|c| !tried.contains(&c.id)))
        };
        while let Some(i) = next(&self.order, &tried) {
            if !tried.is_empty() && !self.client.try_retry() {
                return Err(ClientError::BudgetSpent(failures.join("; ")));
            }
            let node = self.order[i].clone();
            tried.push(node.id.clone());
            match attempt(node.clone()).await {
                Outcome::Done(answer, hint) => {
                    // The pinned node is broken: the session moves to the node that answered.
                    // (A busy pinned node keeps the session; only this request went elsewhere.)
                    let mut at = i;
                    if let Some((why, planned)) = pinned_broken {
                        self.move_to(i, why, planned);
                        at = 0;
                    }
                    if let Some(h) = hint {
                        self.pending_move = Some(format!("migrate hint: {}", h.reason));
                    }
                    return Ok((answer, at));
                }
                Outcome::Refused { status, body } => {
                    return Err(ClientError::Api { node: node.id, status, body });
                }
                Outcome::Busy(why, hint) => {
                    if i == 0
                        && let Some(h) = hint
                    {
                        // Refused with a migrate hint (draining): a planned move, not a fault.
                        pinned_broken = Some((format!("migrate hint: {}", h.reason), true));
                    }
                    failures.push(format!("{}: {why}", node.id));
                }
                Outcome::Failed(why) => {
                    self.client.node_failed(&node.id);
                    if i == 0 {
                        pinned_broken = Some((why.clone(), false));
                    }
                    failures.push(format!("{}: {why}", node.id));
                }
            }
        }
        Err(ClientError::Exhausted(failures.join("; ")))
    }

    /// One chat completion (JSON), with the failover ladder.
    pub async fn chat(
        &mut self,
        req: &ChatCompletionRequest,
    ) -> Result<ChatCompletion, ClientError> {
        if req.stream {
            return Err(ClientError::Invalid("use Session::chat_stream for streaming".into()));
        }
        self.apply_moves();
        self.reconsider();
        let body =
            Bytes::from(serde_json::to_vec(req).map_err(|e| ClientError::Invalid(e.to_string()))?);
        let client = self.client.clone();
        let id = self.id.clone();
        let (answer, _) = self
            .ladder(|node| {
                let (client, body, id) = (client.clone(), body.clone(), id.clone());
                async move { client.attempt(&node, &body, &id).await }
            })
            .await?;
        Ok(answer)
    }

    /// A streamed chat completion. Before the first token it fails over like [`Session::chat`];
    /// after it, a cut or stalled stream is continued on the next node and the caller sees one
    /// seamless stream.
    pub async fn chat_stream(
        &mut self,
        req: &ChatCompletionRequest,
    ) -> Result<ChatStream, ClientError> {
        self.apply_moves();
        self.reconsider();
        let mut req = req.clone();
        req.stream = true;
        let body =
            Bytes::from(serde_json::to_vec(&req).map_err(|e| ClientError::Invalid(e.to_string()))?);
        let (committed, at) = self.start_hedged(&body).await?;
        let current = self.order[at].clone();
        let node = current.id.clone();
        let next: Vec<Candidate> =
            self.order.iter().filter(|c| c.id != current.id).cloned().collect();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(
            stream::Forward {
                client: self.client.clone(),
                session: self.id.clone(),
                req,
                next,
                current,
                committed: *committed,
                tx,
                moved: self.moved.clone(),
            }
            .run(),
        );
        Ok(ChatStream::new(rx, node))
    }

    /// A stream up to its commit point. The pinned node goes first; if its first token is later
    /// than the TTFT deadline (learnt from observed first tokens), the standby is raced against
    /// it (budget permitting): the first to commit wins and the other is dropped, which closes
    /// its connection and cancels its work on the node. Anything else falls to the ladder.
    async fn start_hedged(
        &mut self,
        body: &Bytes,
    ) -> Result<(Box<stream::Committed>, usize), ClientError> {
        self.record_request();
        let client = self.client.clone();
        let id = self.id.clone();
        let first_token = client.inner.cfg.first_token_timeout;
        let start = |node: Candidate| {
            let (client, body, id) = (client.clone(), body.clone(), id.clone());
            async move {
                let out = client.start_stream(&node, &body, &id, first_token).await;
                if let Outcome::Done(c, _) = &out {
                    client.observe_ttft(c.ttft);
                }
                out
            }
        };
        let mut state = Ladder::default();
        if self.order.len() >= 2 && !client.cooling(&self.order[0].id) {
            let (a, b) = (self.order[0].clone(), self.order[1].clone());
            let hedge_after = client.ttft_deadline();
            let primary = start(a.clone());
            tokio::pin!(primary);
            let early = tokio::select! {
                r = &mut primary => Some(r),
                () = tokio::time::sleep(hedge_after) => None,
            };
            let (ra, rb) = match early {
                Some(r) => (r, None),
                None if client.try_retry() => {
                    client.emit(Event::Hedged {
                        from: a.id.clone(),
                        to: b.id.clone(),
                        after_ms: hedge_after.as_millis() as u64,
                    });
                    let hedge = start(b.clone());
                    tokio::pin!(hedge);
                    // First commit wins; a failure waits for the other.
                    tokio::select! {
                        r = &mut primary => match r {
                            Outcome::Done(..) | Outcome::Refused { .. } => (r, None),
                            other => (other, Some(hedge.await)),
                        },
                        r = &mut hedge => match r {
                            Outcome::Done(c, hint) => {
                                self.move_to(1, format!("hedge won: no first token from {} within {} ms", a.id, hedge_after.as_millis()), false);
                                client.suspect(&a);
                                return Ok(self.committed(c, hint, 0));
                            }
                            Outcome::Refused { status, body } => {
                                return Err(ClientError::Api { node: b.id, status, body });
                            }
                            other => (primary.await, Some(other)),
                        },
                    }
                }
                None => (primary.await, None),
            };
            match ra {
                Outcome::Done(c, hint) => return Ok(self.committed(c, hint, 0)),
                Outcome::Refused { status, body } => {
                    return Err(ClientError::Api { node: a.id, status, body });
                }
                Outcome::Busy(why, hint) => {
                    if let Some(h) = hint {
                        state.pinned_broken = Some((format!("migrate hint: {}", h.reason), true));
                    }
                    state.failures.push(format!("{}: {why}", a.id));
                }
                Outcome::Failed(why) => {
                    client.node_failed(&a.id);
                    state.failures.push(format!("{}: {why}", a.id));
                    state.pinned_broken = Some((why, false));
                }
            }
            state.tried.push(a.id.clone());
            if let Some(rb) = rb {
                state.tried.push(b.id.clone());
                match rb {
                    Outcome::Done(c, hint) => {
                        self.move_to(
                            1,
                            "the pinned node failed while the hedge answered".into(),
                            false,
                        );
                        return Ok(self.committed(c, hint, 0));
                    }
                    Outcome::Refused { status, body } => {
                        return Err(ClientError::Api { node: b.id, status, body });
                    }
                    Outcome::Busy(why, _) => state.failures.push(format!("{}: {why}", b.id)),
                    Outcome::Failed(why) => {
                        client.node_failed(&b.id);
                        state.failures.push(format!("{}: {why}", b.id));
                    }
                }
            }
        }
        self.ladder_from(state, start).await
    }

    fn committed(
        &mut self,
        c: Box<stream::Committed>,
        hint: Option<MigrateHint>,
        at: usize,
    ) -> (Box<stream::Committed>, usize) {
        if let Some(h) = hint {
            self.pending_move = Some(format!("migrate hint: {}", h.reason));
        }
        (c, at)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_node_with_no_recent_first_token_is_not_taken_for_an_instant_one() {
        let report =
            |ttft_ms, queue_depth| LoadReport { queue_depth, in_flight: 4, capacity: 4, ttft_ms };
        assert_eq!(queue_wait(&report(20, 0), 250.0), 20.0);
        assert_eq!(queue_wait(&report(20, 4), 250.0), 40.0, "a full queue: one more p50");
        assert_eq!(queue_wait(&report(0, 0), 30.0), 30.0, "no samples: discovery's figure");
        assert_eq!(queue_wait(&report(0, 2), 30.0), 45.0);
    }

    use super::*;

    fn cand(id: &str, region: &str) -> Candidate {
        Candidate {
            id: id.into(),
            region: region.into(),
            url: format!("http://{id}"),
            health: "ready".into(),
            models: vec![],
            queue_depth: 0,
            in_flight: 0,
            capacity: 1,
            ttft_p50_ms: 0.0,
            ttft_p99_ms: 0.0,
            error_rate: 0.0,
            cost_per_1k: 0.0,
            score_ms: 0.0,
        }
    }

    #[test]
    fn the_home_regions_best_is_always_probed() {
        let list = [
            cand("tor-1", "toronto"),
            cand("mtl-1", "montreal"),
            cand("tor-2", "toronto"),
            cand("van-1", "vancouver"),
            cand("van-2", "vancouver"),
        ];
        let ids = |home| probe_set(&list, 3, home).iter().map(|c| c.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(None), ["tor-1", "mtl-1", "tor-2"]);
        assert_eq!(ids(Some("montreal")), ["tor-1", "mtl-1", "tor-2"], "already probed");
        assert_eq!(ids(Some("vancouver")), ["tor-1", "mtl-1", "van-1"]);
        assert_eq!(ids(Some("calgary")), ["tor-1", "mtl-1", "tor-2"], "no node there");
    }
}
