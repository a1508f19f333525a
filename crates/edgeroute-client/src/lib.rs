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
//! - `404 model_not_found` from a node discovery listed for the model → a placement miss (the
//!   fleet changed, not the caller's mistake): the next candidate at once, the node left out of
//!   that model's list in this client, the cached list revalidated; a caller sees a 404 only
//!   when discovery, asked again, knows no node with the model;
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
//! A first token (or a JSON answer) later than the node's own deadline — a multiple of what
//! this client learnt of that node, floored — is hedged: the next node is raced against it,
//! the first to commit wins and the other request is dropped (cancelling its work there).
//!
//! Every decision is made by a sans-IO state machine ([`machine`]); this crate's async code
//! only performs its steps.
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

pub mod cache;
pub mod dns;
mod error;
pub mod machine;
mod realtime;
mod session;
mod stream;
pub mod transport;
pub mod trust;

pub use edgeroute_http::client::tls_config;
pub use error::{AttemptReport, Attempts, ClientError, Side};
pub use realtime::Realtime;
pub use session::{RawAnswer, RawRequest, RawStream, Served, Session};
pub use stream::{ChatStream, StreamItem};
pub use transport::{BoxIo, ConnectFuture, DnsFuture, Transport};

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use edgeroute_core::steer::{self, Backoff, Probed, TieMargin};
use edgeroute_proto::discovery::{Candidate, DiscoverResponse};
use edgeroute_proto::headers::{
    LOAD_HEADER, MIGRATE_HEADER, MODEL_VERSION_HEADER, MigrateHint, SESSION_HEADER,
};
use edgeroute_proto::health::NodeHealth;
use edgeroute_proto::models::ModelState;
use edgeroute_proto::{ErrorBody, Fault, LoadReport};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client as HttpClient;

use crate::cache::{Freshness, ListCache};
use crate::machine::{Machine, Outcome, Policy};

/// Everything a client is told; every field has a default. `Debug` shows the token redacted.
#[derive(Clone)]
pub struct ClientConfig {
    /// Discovery base URLs, tried in order. An entry `dns:NAME[:PORT]` (e.g.
    /// `dns:discovery.example.net`) stands for the replicas the fleet's GeoDNS names for
    /// this client, nearest first ([`dns`]): SRV `_edgeroute._tcp.NAME`, else NAME's A/AAAA
    /// on PORT (default 7070), over `https://` (`dns+http:` for plaintext, under the same
    /// token rules as any `http://` URL). A resolution is used for its TTL, then
    /// used while it is resolved again in the background; a failed resolution keeps the last
    /// one (persisted with `cache_file`).
    pub discovery: Vec<String>,
    /// Nameservers for `dns:` entries. Default: `/etc/resolv.conf`'s.
    pub dns_servers: Vec<std::net::SocketAddr>,
    /// Bearer token for discovery and nodes. It is sent only over TLS (`https://`) or to a
    /// loopback host (127.0.0.0/8, `::1`, `localhost`), never on `/health` probes, and shown
    /// redacted by `Debug`.
    pub token: Option<String>,
    /// Also send the token over plaintext `http://` to hosts that are not loopback: for a
    /// private network you trust end to end. Default false: such a discovery URL is refused
    /// ([`ClientError::PlaintextToken`]) and such a node is no candidate.
    pub allow_plaintext: bool,
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
    /// the background for the next session. Default 30 s; zero always probes.
    pub path_ttl: Duration,
    /// A candidate list up to this far past its `ttl` is still used at once while discovery is
    /// asked again in the background (`stale-while-revalidate`). Default 10 s; zero always
    /// waits.
    pub discovery_revalidate: Duration,
    /// One discovery request. Default 500 ms.
    pub discovery_timeout: Duration,
    /// TCP connect to a node. Default 300 ms (never the OS's two minutes).
    pub connect_timeout: Duration,
    /// A whole JSON answer, at most. Default 60 s.
    pub request_timeout: Duration,
    /// A stream's first content chunk must arrive within this, or the request moves to the
    /// next node (nothing has reached the caller yet). Default 3 s.
    pub first_token_timeout: Duration,
    /// After the first token, a gap longer than this between chunks is a stall: the answer is
    /// continued on the next node. Default 2 s.
    pub stall_timeout: Duration,
    /// A node's first-token hedge deadline before anything is known of it (no answer, no
    /// probe). Default 1 s.
    pub hedge_initial: Duration,
    /// The floor of every hedge deadline. Default 40 ms.
    pub hedge_min: Duration,
    /// A first token (or JSON answer) later than this multiple of the node's own expected
    /// time is hedged on the next node. Default 2.
    pub hedge_multiple: f64,
    /// A JSON answer's hedge deadline on a node whose answers were never timed. Default 5 s.
    pub json_hedge_initial: Duration,
    /// How long a node that answered `model_not_found` for a model it was listed for stays
    /// out of that model's candidates in this client. Default 30 s.
    pub miss_ttl: Duration,
    /// After placement misses, how long a turn keeps asking discovery again for a node that
    /// serves the model (or a policy's cascade) before it fails. Default 2 s.
    pub miss_wait: Duration,
    /// Between turns, the pinned node and the standby are re-probed at most this often, to
    /// notice a persistently better standby. Default 5 s.
    pub reprobe_interval: Duration,
    /// The standby must predict a first token better by `max(abs_ms, rel × pinned)` ...
    pub move_margin: TieMargin,
    /// ... on this many consecutive re-probes before the session moves to it. Default 3.
    pub move_after: u32,
    /// Largest answer read, bytes. Default 8 MiB.
    pub max_response_bytes: usize,
    /// Idle connections to nodes are kept this long (pinned and standby stay warm across the
    /// gaps between voice turns). Default 90 s.
    pub pool_idle_timeout: Duration,
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
    /// API keys for a routing policy's cloud pools, by pool name. A pool is sent its own key
    /// (or nothing); the fleet's `token` never goes to a pool. Shown redacted by `Debug`.
    pub pool_keys: BTreeMap<String, String>,
    /// What a routing policy's canary split keeps on one version (`session=` on discovery
    /// requests). Default: a random id per client, so each client process stays on the
    /// version it was given and the split spreads clients; set it (a tenant's user, a device)
    /// to split by that instead.
    pub routing_key: Option<String>,
    /// Never have more requests in flight from this client to a node than the node's capacity
    /// (its slots: discovery's `capacity`, updated by each answer's load report): a full node
    /// is passed over for the next candidate (first try, failover, hedge); when every
    /// candidate is full a request waits for a slot, up to `first_token_timeout` from its
    /// start, then fails with [`ClientError::FleetSaturated`] (503 with `Retry-After` through
    /// a proxy). A slot is held until the answer is read, or the stream ends or is dropped; a
    /// hedge's loser returns its slot when it is cancelled. Nodes that advertise no capacity
    /// (0, cloud pools) are not capped. Default false (the SDK on one device); the regional
    /// router, one client for many tenants, turns it on.
    pub respect_node_capacity: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let p = Policy::default();
        ClientConfig {
            discovery: vec![],
            dns_servers: vec![],
            token: None,
            allow_plaintext: false,
            regions: vec![],
            home_region: None,
            probe_k: 3,
            probe_deadline: Duration::from_millis(150),
            probe_ttl: Duration::from_secs(2),
            path_ttl: Duration::from_secs(30),
            discovery_revalidate: Duration::from_secs(10),
            discovery_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(300),
            request_timeout: p.request_timeout,
            first_token_timeout: p.first_token_timeout,
            stall_timeout: Duration::from_secs(2),
            hedge_initial: p.hedge_initial,
            hedge_min: p.hedge_min,
            hedge_multiple: p.hedge_multiple,
            json_hedge_initial: p.json_hedge_initial,
            miss_ttl: p.miss_ttl,
            miss_wait: p.miss_wait,
            reprobe_interval: p.reprobe_interval,
            move_margin: p.move_margin,
            move_after: p.move_after,
            max_response_bytes: 8 << 20,
            pool_idle_timeout: Duration::from_secs(90),
            cache_file: None,
            ca_file: None,
            seed: None,
            retry_ratio: p.retry_ratio,
            retry_floor_per_s: p.retry_floor_per_s,
            eject_after: p.eject_after,
            eject_backoff: p.eject_backoff,
            pool_keys: BTreeMap::new(),
            routing_key: None,
            respect_node_capacity: p.respect_capacity,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field by name, so a new one cannot be forgotten (or print a secret unseen).
        let ClientConfig {
            discovery,
            dns_servers,
            token,
            allow_plaintext,
            regions,
            home_region,
            probe_k,
            probe_deadline,
            probe_ttl,
            path_ttl,
            discovery_revalidate,
            discovery_timeout,
            connect_timeout,
            request_timeout,
            first_token_timeout,
            stall_timeout,
            hedge_initial,
            hedge_min,
            hedge_multiple,
            json_hedge_initial,
            miss_ttl,
            miss_wait,
            reprobe_interval,
            move_margin,
            move_after,
            max_response_bytes,
            pool_idle_timeout,
            cache_file,
            ca_file,
            seed,
            retry_ratio,
            retry_floor_per_s,
            eject_after,
            eject_backoff,
            pool_keys,
            routing_key,
            respect_node_capacity,
        } = self;
        f.debug_struct("ClientConfig")
            .field("discovery", discovery)
            .field("dns_servers", dns_servers)
            .field("token", &token.as_ref().map(|_| "<redacted>"))
            .field("allow_plaintext", allow_plaintext)
            .field("regions", regions)
            .field("home_region", home_region)
            .field("probe_k", probe_k)
            .field("probe_deadline", probe_deadline)
            .field("probe_ttl", probe_ttl)
            .field("path_ttl", path_ttl)
            .field("discovery_revalidate", discovery_revalidate)
            .field("discovery_timeout", discovery_timeout)
            .field("connect_timeout", connect_timeout)
            .field("request_timeout", request_timeout)
            .field("first_token_timeout", first_token_timeout)
            .field("stall_timeout", stall_timeout)
            .field("hedge_initial", hedge_initial)
            .field("hedge_min", hedge_min)
            .field("hedge_multiple", hedge_multiple)
            .field("json_hedge_initial", json_hedge_initial)
            .field("miss_ttl", miss_ttl)
            .field("miss_wait", miss_wait)
            .field("reprobe_interval", reprobe_interval)
            .field("move_margin", move_margin)
            .field("move_after", move_after)
            .field("max_response_bytes", max_response_bytes)
            .field("pool_idle_timeout", pool_idle_timeout)
            .field("cache_file", cache_file)
            .field("ca_file", ca_file)
            .field("seed", seed)
            .field("retry_ratio", retry_ratio)
            .field("retry_floor_per_s", retry_floor_per_s)
            .field("eject_after", eject_after)
            .field("eject_backoff", eject_backoff)
            .field("pool_keys", &pool_keys.keys().map(|k| (k, "<redacted>")).collect::<Vec<_>>())
            .field("routing_key", routing_key)
            .field("respect_node_capacity", respect_node_capacity)
            .finish()
    }
}

impl ClientConfig {
    /// Whether a request to `url` may carry this client's token ([`trust::token_may_go`]);
    /// always, when there is no token.
    fn token_may_go(&self, url: &str) -> bool {
        self.token.is_none() || trust::token_may_go(url, self.allow_plaintext)
    }

    fn http_options(&self) -> edgeroute_http::client::ClientOptions {
        edgeroute_http::client::ClientOptions {
            connect_timeout: self.connect_timeout,
            pool_idle_timeout: self.pool_idle_timeout,
            ..Default::default()
        }
    }

    fn policy(&self) -> Policy {
        Policy {
            hedge_initial: self.hedge_initial,
            hedge_min: self.hedge_min,
            hedge_multiple: self.hedge_multiple,
            first_token_timeout: self.first_token_timeout.max(self.hedge_min),
            json_hedge_initial: self.json_hedge_initial,
            request_timeout: self.request_timeout.max(self.hedge_min),
            retry_ratio: self.retry_ratio,
            retry_floor_per_s: self.retry_floor_per_s,
            eject_after: self.eject_after,
            eject_backoff: self.eject_backoff,
            miss_ttl: self.miss_ttl,
            miss_wait: self.miss_wait,
            move_margin: self.move_margin,
            move_after: self.move_after,
            reprobe_interval: self.reprobe_interval,
            respect_capacity: self.respect_node_capacity,
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
    /// Planned moves: migrate hints, persistently better standbys, models that left a node,
    /// nodes another client ejected ([`Client::apply_remote_ejection`]).
    pub migrations: u64,
    pub ejections: u64,
    /// Nodes that answered `model_not_found` for a model they were listed for.
    pub placement_misses: u64,
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
            placement_misses: self.placement_misses + o.placement_misses,
            retries: self.retries + o.retries,
            retries_denied: self.retries_denied + o.retries_denied,
        }
    }
}

/// Event counters; the retry counts live in the machine.
#[derive(Debug, Default)]
struct Counters([AtomicU64; 12]);

impl Counters {
    fn count(&self, e: &Event) {
        if matches!(e, Event::Discovered { cached: Some(_), .. }) {
            self.0[10].fetch_add(1, Ordering::Relaxed);
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
            Event::PlacementMiss { .. } => 11,
        };
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self, retries: u64, retries_denied: u64) -> Stats {
        let v = |i: usize| self.0[i].load(Ordering::Relaxed);
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
            placement_misses: v(11),
            retries,
            retries_denied,
        }
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
    /// No first answer within the node's deadline: the next node was raced against it.
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
    /// A node listed for `model` answered that it does not have it.
    PlacementMiss {
        node: String,
        model: String,
    },
}

/// A node this client ejected, for sharing with other clients (router replicas): see
/// [`Client::ejections`] and [`Client::apply_remote_ejection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    pub node_id: String,
    /// Until when (Unix ms, this machine's wall clock) the node is ejected.
    pub until_unix_ms: u64,
    pub reason: String,
}

/// What this client itself concluded about a node, or learnt of the routing policy (never
/// what it was told by another client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EjectionEvent {
    /// Ejected after failures seen by this client.
    Ejected(Ejection),
    /// Served this client again after an ejection (its own, or one it was told of).
    Rejoined { node_id: String },
    /// Discovery's answers now come from routing policy `version` (this client's own answer
    /// said so first, or said another version before).
    PolicyVersion { version: String },
}

/// How many of this client's own ejection events a slow subscriber may fall behind by before
/// it misses some (it is told how many: `RecvError::Lagged`).
pub const EJECTION_EVENTS_BUFFER: usize = 256;

/// One of a node's slots, held by an attempt and then by the stream it became: returned to
/// the machine when dropped (answer read, stream ended or dropped, hedge loser cancelled),
/// and any request waiting for a slot woken.
pub(crate) struct SlotPermit {
    client: Client,
    node: String,
}

impl SlotPermit {
    /// Owns the slot the machine just took for `node` (a `Step::Send`).
    pub(crate) fn new(client: &Client, node: &str) -> SlotPermit {
        SlotPermit { client: client.clone(), node: node.to_owned() }
    }
}

impl Drop for SlotPermit {
    fn drop(&mut self) {
        self.client.with(|st, _| st.m.release_slot(&self.node));
        self.client.inner.slot_freed.notify_waiters();
    }
}

impl std::fmt::Debug for SlotPermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotPermit").field("node", &self.node).finish()
    }
}

type Http = HttpClient<transport::Connector, Full<Bytes>>;
/// Called with every decision the client makes.
pub type Listener = Arc<dyn Fn(&Event) + Send + Sync>;

/// `Retry-After` in seconds (the HTTP-date form is not used by nodes), capped at a minute.
pub(crate) fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let s: u64 = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(s.min(60)))
}

/// The model version a node's answer names (`x-edgeroute-model-version`), if any.
pub(crate) fn model_version(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(MODEL_VERSION_HEADER)?.to_str().ok()?.trim();
    (!v.is_empty() && v.len() <= 128).then(|| v.to_owned())
}

/// What the driver keeps under its one lock: the machine, the candidate lists, the session
/// plans. Never held across an `.await`.
struct State {
    m: Machine,
    cache: ListCache,
    plans: std::collections::HashMap<String, machine::Plan>,
    /// Candidate lists being revalidated in the background, by cache key.
    revalidating: HashSet<String>,
    /// A background refresh of probes is under way.
    refreshing: bool,
    /// The routing policy version of the newest discovery answer that named one.
    policy_version: Option<String>,
}

struct Inner {
    cfg: ClientConfig,
    http: Http,
    state: Mutex<State>,
    stats: Counters,
    listener: Option<Listener>,
    origin: Instant,
    /// Wall-clock ms at `origin`: list ages are measured on the monotonic clock from there
    /// (so they follow tokio's clock, paused in simulations) and persisted as wall time.
    origin_unix_ms: u64,
    /// `cfg.routing_key`, or this client's random one.
    routing_key: String,
    /// Woken whenever a node's slot is returned (requests waiting for one look again).
    slot_freed: tokio::sync::Notify,
    /// This client's own ejections and recoveries ([`Client::ejections`]).
    ejections: tokio::sync::broadcast::Sender<EjectionEvent>,
    /// Addresses `dns:` resolutions named, for the connector.
    pins: dns::Pins,
    /// Where `dns:` entries are resolved: `cfg.dns_servers`, else `/etc/resolv.conf`'s.
    nameservers: Vec<std::net::SocketAddr>,
    /// The application's transport, which may carry DNS too ([`Transport::dns`]).
    dns_via: Option<Arc<dyn Transport>>,
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

/// What a session asks discovery for: a model, or a model within a pipeline (every node in
/// the answer holds the whole pipeline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    pub model: String,
    pub pipeline: Option<String>,
    /// A caller's own token, sent instead of the client's to discovery and the nodes (a
    /// shared router acting for many tenants: each tenant's residency and limits hold).
    pub bearer: Option<Arc<str>>,
}

impl Query {
    pub(crate) fn new(model: &str, pipeline: Option<&str>) -> Query {
        Query { model: model.into(), pipeline: pipeline.map(Into::into), bearer: None }
    }

    fn auth(&self) -> Auth<'_> {
        match &self.bearer {
            Some(t) => Auth::Caller(t),
            None => Auth::Fleet,
        }
    }
}

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

/// The node's own TTFT and the wait its queue implies, from its load report, ms. A node that
/// served nothing lately reports a TTFT of 0 (no samples, not an instant answer): discovery's
/// figure for it (`prior_ms`) stands in.
fn queue_wait(l: &LoadReport, prior_ms: f64) -> f64 {
    let p50 = if l.ttft_ms == 0 { prior_ms } else { f64::from(l.ttft_ms) };
    p50 + f64::from(l.queue_depth) * p50 / f64::from(l.capacity).max(1.0)
}

/// What a non-2xx answer means for the ladder, given the node's classification of it
/// ([`Fault`], from its `x-edgeroute-error` header, or its status's for a peer that does not
/// say). 429 and 503 are "busy" whatever the side: `Retry-After` is honoured as a cool-down.
pub(crate) fn classify(
    status: StatusCode,
    fault: Fault,
    text: String,
    hint: Option<MigrateHint>,
    retry: Option<Duration>,
) -> Outcome {
    let what = || format!("HTTP {status}: {}", text.chars().take(300).collect::<String>());
    match status.as_u16() {
        429 | 503 => Outcome::Busy { what: what(), retry_after: retry, hint },
        404 if is_model_not_found(&text) => Outcome::Missing { what: what() },
        _ if !fault.retry => Outcome::Refused { status: status.as_u16(), body: text },
        _ => Outcome::Failed { side: fault.side, what: what() },
    }
}

/// The answer's classification: the server's own word, else its status's.
pub(crate) fn fault_of(status: StatusCode, headers: &http::HeaderMap) -> Fault {
    let said = headers.get(edgeroute_proto::ERROR_HEADER).and_then(|v| v.to_str().ok());
    Fault::of_answer(status.as_u16(), said)
}

fn is_model_not_found(body: &str) -> bool {
    serde_json::from_str::<ErrorBody>(body)
        .is_ok_and(|b| b.error.code.as_deref() == Some("model_not_found"))
}

/// Whether a node's `/health` says it serves `q` now (`model`, what the node is asked for,
/// ready; the pipeline servable). A body that is not a node's health report says nothing
/// against it.
fn serves(body: &[u8], q: &Query, model: &str) -> Result<(), String> {
    let Ok(h) = serde_json::from_slice::<NodeHealth>(body) else { return Ok(()) };
    if !h.models.iter().any(|m| m.id == model && m.state == ModelState::Ready) {
        return Err(format!("{model} is not ready there"));
    }
    if let Some(p) = &q.pipeline
        && !h.pipelines.iter().any(|x| x.id == *p && x.servable)
    {
        return Err(format!("pipeline {p} is not servable there"));
    }
    Ok(())
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
        let tls = tls_config(cfg.ca_file.as_deref()).map_err(ClientError::Invalid)?;
        let pins = dns::Pins::default();
        let resolver = transport::PinnedResolver {
            pins: pins.clone(),
            system: hyper_util::client::legacy::connect::dns::GaiResolver::new(),
        };
        let tcp = edgeroute_http::client::tcp_with_resolver(&cfg.http_options(), resolver);
        let connector = edgeroute_http::client::https_over(tcp, tls);
        Self::build(cfg, listener, transport::Connector::Net(connector), pins, None)
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
        let via = Some(transport.clone());
        let connector = transport::Connector::Custom { transport, connect_timeout };
        Self::build(cfg, listener, connector, dns::Pins::default(), via)
    }

    fn build(
        cfg: ClientConfig,
        listener: Option<Listener>,
        connector: transport::Connector,
        pins: dns::Pins,
        dns_via: Option<Arc<dyn Transport>>,
    ) -> Result<Client, ClientError> {
        if cfg.probe_k == 0 {
            return Err(ClientError::Invalid("probe_k must be at least 1".into()));
        }
        if !(cfg.hedge_multiple.is_finite() && cfg.hedge_multiple >= 1.0) {
            return Err(ClientError::Invalid("hedge_multiple must be at least 1".into()));
        }
        // `dns:` entries resolve to `https://` endpoints; their names must parse.
        for entry in &cfg.discovery {
            if let Some(Err(e)) = dns::DnsTarget::parse(entry) {
                return Err(ClientError::Invalid(format!("discovery {e}")));
            }
        }
        // Refused as it is built, before any connection: discovery would receive the token.
        if let Some(url) = cfg
            .discovery
            .iter()
            .find(|u| dns::DnsTarget::parse(u).is_none() && !cfg.token_may_go(u))
        {
            return Err(ClientError::PlaintextToken { url: url.clone() });
        }
        let nameservers = if cfg.dns_servers.is_empty() {
            std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| dns::nameservers_from_resolv_conf(&t))
                .unwrap_or_default()
        } else {
            cfg.dns_servers.clone()
        };
        let http = edgeroute_http::client::builder(&cfg.http_options()).build(connector);
        let mut cache = cfg.cache_file.as_deref().map(ListCache::load).unwrap_or_default();
        // A persisted list (written without a token, or by an older version) is held to the
        // same rule as discovery's answers.
        if cfg.token.is_some() {
            cache.retain_candidates(|c| {
                trust::retain(c, cfg.allow_plaintext);
            });
        }
        // Names resolved by an earlier run: their addresses until they are resolved again.
        for r in cache.resolutions() {
            pins.set(&r.endpoints);
        }
        let origin = Instant::now();
        let mut m = Machine::new(cfg.policy(), cfg.seed, origin.into_std());
        let routing_key = cfg.routing_key.clone().unwrap_or_else(|| m.session_id());
        let state = State {
            m,
            cache,
            plans: std::collections::HashMap::new(),
            revalidating: HashSet::new(),
            refreshing: false,
            policy_version: None,
        };
        Ok(Client {
            inner: Arc::new(Inner {
                cfg,
                http,
                state: Mutex::new(state),
                stats: Counters::default(),
                listener,
                origin,
                origin_unix_ms: edgeroute_core::clock::unix_ms(),
                routing_key,
                slot_freed: tokio::sync::Notify::new(),
                ejections: tokio::sync::broadcast::channel(EJECTION_EVENTS_BUFFER).0,
                pins,
                nameservers,
                dns_via,
            }),
        })
    }

    /// Runs `f` under the client's one lock, then announces what the machine decided. The
    /// lock is never held across an `.await`; a panic elsewhere cannot leave it unusable.
    fn with<R>(&self, f: impl FnOnce(&mut State, std::time::Instant) -> R) -> R {
        let now = Instant::now().into_std();
        let (r, events, verdicts) = {
            let mut st = self.inner.state.lock().unwrap_or_else(PoisonError::into_inner);
            let r = f(&mut st, now);
            (r, st.m.take_events(), st.m.take_verdicts())
        };
        for e in events {
            self.emit(e);
        }
        if !verdicts.is_empty() {
            let wall = self.wall_ms();
            for v in verdicts {
                let e = match v {
                    machine::Verdict::Ejected { node, for_, reason } => {
                        EjectionEvent::Ejected(Ejection {
                            node_id: node,
                            until_unix_ms: wall.saturating_add(for_.as_millis() as u64),
                            reason,
                        })
                    }
                    machine::Verdict::Rejoined { node } => {
                        EjectionEvent::Rejoined { node_id: node }
                    }
                };
                // No subscriber: nobody to tell.
                let _ = self.inner.ejections.send(e);
            }
        }
        r
    }

    /// This client's own ejections (after failures it saw) and recoveries (a node it or
    /// another client had ejected served it again) from now on, to share with other clients:
    /// the regional router's replicas carry them over the bus. What this client is told by
    /// [`Client::apply_remote_ejection`] is never repeated here.
    pub fn ejections(&self) -> tokio::sync::broadcast::Receiver<EjectionEvent> {
        self.inner.ejections.subscribe()
    }

    /// Another client (a router replica) ejected `node_id` until `until_unix_ms` (Unix ms):
    /// this client treats it as ejected until then — not tried first unless every candidate
    /// is ejected (the same fail-open rule as its own ejections), sessions pinned there leave
    /// before their next turn (a planned move, [`Event::Migrated`]: no failover is counted,
    /// nothing failed here). Bounded: never longer than this client's own longest backoff
    /// (`eject_backoff.max`); this client's failure counts and its own ejection are left as
    /// they are, and a request it sees the node serve ends the remote ejection. False (nothing
    /// done) when `until_unix_ms` has already passed.
    /// The routing policy version of the newest discovery answer this client took in that
    /// named one.
    pub fn policy_version(&self) -> Option<String> {
        self.with(|st, _| st.policy_version.clone())
    }

    /// Another client (a router replica) took in discovery answers decided under routing
    /// policy `version`: every cached list decided under another version, or under none, is
    /// asked for again at its next use (behind that turn, which goes on with the list it
    /// has: stale-while-revalidate), so a new policy reaches this client's sessions within a
    /// request rather than within a list's TTL. The version this client reports is only what
    /// its own answers say. Returns how many lists were marked.
    pub fn apply_remote_policy_version(&self, version: &str) -> usize {
        self.with(|st, _| st.cache.expire_unless_policy(version))
    }

    pub fn apply_remote_ejection(&self, node_id: &str, until_unix_ms: u64) -> bool {
        let left = until_unix_ms.saturating_sub(self.wall_ms());
        if left == 0 {
            return false;
        }
        self.with(|st, now| st.m.apply_remote_ejection(node_id, Duration::from_millis(left), now))
    }

    /// Another client saw `node_id` serve again: the remote ejection ends (an ejection after
    /// this client's own failures stays).
    pub fn clear_remote_ejection(&self, node_id: &str) {
        self.with(|st, _| st.m.clear_remote_ejection(node_id));
    }

    /// Whether this client treats `node_id` as ejected now (its own ejection or another's).
    pub fn is_ejected(&self, node_id: &str) -> bool {
        self.with(|st, now| st.m.is_ejected(node_id, now))
    }

    /// Requests (attempts, streams) from this client in flight to `node_id` now.
    pub fn in_flight(&self, node_id: &str) -> u32 {
        self.with(|st, _| st.m.in_flight(node_id))
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

    /// Counts of every decision so far (for an application's metrics).
    pub fn stats(&self) -> Stats {
        let (r, d) = self.with(|st, _| (st.m.retries, st.m.retries_denied));
        self.inner.stats.snapshot(r, d)
    }

    /// A request to `url`, carrying the token when `authenticated` (never over plaintext to a
    /// host that is not loopback: refused here, before anything is sent).
    fn request(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
        auth: Auth<'_>,
    ) -> Result<Request<Full<Bytes>>, String> {
        let mut b = Request::builder().method(method).uri(url);
        let cfg = &self.inner.cfg;
        let bearer = match auth {
            Auth::Fleet => cfg.token.as_deref(),
            Auth::Caller(t) => Some(t),
            Auth::Pool(name) => cfg.pool_keys.get(name).map(String::as_str),
            Auth::None => None,
        };
        if let Some(t) = bearer {
            if !trust::token_may_go(url, cfg.allow_plaintext) {
                return Err(ClientError::PlaintextToken { url: url.to_owned() }.to_string());
            }
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if !body.is_empty() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(body)).map_err(|e| e.to_string())
    }

    fn key(&self, q: &Query) -> String {
        let key = cache::key(&q.model, q.pipeline.as_deref(), &self.inner.cfg.regions);
        match &q.bearer {
            // Another caller's answer may differ (residency, rules): cached apart, under a
            // digest rather than the token itself.
            Some(t) => {
                use std::hash::{Hash, Hasher};
                let mut h = std::hash::DefaultHasher::new();
                t.hash(&mut h);
                format!("{key}|caller={:016x}", h.finish())
            }
            None => key,
        }
    }

    /// Candidates for `model`: a fresh cached answer, else discovery (endpoints in order), else
    /// a stale cached answer within `stale_ok`.
    pub async fn discover(&self, model: &str) -> Result<Vec<Candidate>, ClientError> {
        self.discover_query(&Query::new(model, None)).await
    }

    pub(crate) async fn discover_query(&self, q: &Query) -> Result<Vec<Candidate>, ClientError> {
        let cfg = &self.inner.cfg;
        let key = self.key(q);
        let (now, revalidate) = (self.wall_ms(), cfg.discovery_revalidate.as_millis() as u64);
        let cached = self.with(|st, _| {
            st.cache.get_revalidating(&key, now, revalidate).map(|(a, f)| (a.candidates.clone(), f))
        });
        let announce = |n: usize, how: &'static str| {
            self.emit(Event::Discovered {
                model: q.model.clone(),
                candidates: n,
                cached: Some(how),
            })
        };
        match cached {
            Some((list, Freshness::Fresh)) => {
                announce(list.len(), "fresh");
                return Ok(list);
            }
            Some((list, Freshness::Revalidate)) => {
                self.revalidate(q);
                announce(list.len(), "revalidating");
                return Ok(list);
            }
            _ => {}
        }
        match self.query_discovery(q).await {
            Ok(candidates) => Ok(candidates),
            Err(e @ ClientError::NoCandidates { .. }) => Err(e),
            Err(e) => match cached {
                Some((list, _)) => {
                    announce(list.len(), "stale");
                    Ok(list)
                }
                None => Err(e),
            },
        }
    }

    /// The cached list for `q` is no longer fresh (a placement miss, every node failed): it is
    /// asked for again behind the caller.
    pub(crate) fn expire(&self, q: &Query) {
        let key = self.key(q);
        self.with(|st, _| st.cache.expire(&key));
        self.revalidate(q);
    }

    /// Asks discovery again for `q` on a task of its own (one at a time per list).
    fn revalidate(&self, q: &Query) {
        let key = self.key(q);
        if !self.with(|st, _| st.revalidating.insert(key.clone())) {
            return;
        }
        let (this, q) = (self.clone(), q.clone());
        tokio::spawn(async move {
            let _ = this.query_discovery(&q).await;
            this.with(|st, _| st.revalidating.remove(&key));
        });
    }

    /// Asks the discovery endpoints in order; the first answer is cached (and persisted).
    pub(crate) async fn query_discovery(&self, q: &Query) -> Result<Vec<Candidate>, ClientError> {
        let cfg = &self.inner.cfg;
        let mut query = format!("model={}&k={}", encode(&q.model), (cfg.probe_k + 2).min(32));
        if let Some(p) = &q.pipeline {
            query.push_str(&format!("&pipeline={}", encode(p)));
        }
        if !cfg.regions.is_empty() {
            query.push_str(&format!("&region={}", encode(&cfg.regions.join(","))));
        }
        if let Some(home) = &cfg.home_region {
            query.push_str(&format!("&near={}", encode(home)));
        }
        query.push_str(&format!("&session={}", encode(&self.inner.routing_key)));
        let (endpoints, dns_error) = self.discovery_endpoints().await;
        let mut last_error =
            dns_error.unwrap_or_else(|| String::from("no discovery endpoint configured"));
        for endpoint in &endpoints {
            let url = format!("{}/v1/discover?{query}", endpoint.trim_end_matches('/'));
            match self.fetch_json::<DiscoverResponse>(&url, cfg.discovery_timeout, q.auth()).await {
                Ok(mut answer) => {
                    // Nodes the token may not go to are no candidates: the next one serves.
                    let refused = if cfg.token.is_some() || q.bearer.is_some() {
                        trust::retain(&mut answer.candidates, cfg.allow_plaintext)
                    } else {
                        0
                    };
                    let candidates = answer.candidates.clone();
                    if candidates.is_empty() {
                        let reason = match &answer.reason {
                            _ if refused > 0 => format!(
                                "discovery listed only nodes on plaintext http:// at hosts that \
                                 are not loopback ({refused}); the token is not sent there: \
                                 serve them over https, or set allow_plaintext for a private \
                                 network"
                            ),
                            Some(r) => r.message.clone(),
                            None => "no candidates".to_owned(),
                        };
                        return Err(ClientError::NoCandidates { model: q.model.clone(), reason });
                    }
                    let (key, now) = (self.key(q), self.wall_ms());
                    let version = answer.policy.as_ref().map(|p| p.version.clone());
                    let (saved, new_policy) = self.with(|st, _| {
                        for c in &candidates {
                            st.m.note_capacity(&c.id, c.capacity);
                        }
                        let new_policy = version.filter(|v| st.policy_version.as_ref() != Some(v));
                        if let Some(v) = &new_policy {
                            st.policy_version = Some(v.clone());
                        }
                        st.cache.put(key, answer, now);
                        st.cache.prune(now);
                        let saved =
                            cfg.cache_file.as_ref().map(|path| (path.clone(), st.cache.clone()));
                        (saved, new_policy)
                    });
                    if let Some(version) = new_policy {
                        // No subscriber: nobody to tell.
                        let _ = self.inner.ejections.send(EjectionEvent::PolicyVersion { version });
                    }
                    if let Some((path, cache)) = saved
                        && let Err(e) = cache.save(&path)
                    {
                        tracing::warn!(error = %e, path = %path.display(), "could not persist the candidate list");
                    }
                    self.emit(Event::Discovered {
                        model: q.model.clone(),
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

    /// The discovery base URLs to try, in order: configured URLs as they are, `dns:` entries
    /// as their resolution (see [`ClientConfig::discovery`]).
    /// The discovery URLs this client asks, in order, with its `dns:` entries resolved (see
    /// [`ClientConfig::discovery`]): what DNS handed it, for operators and tests.
    pub async fn discovery_urls(&self) -> Result<Vec<String>, ClientError> {
        match self.discovery_endpoints().await {
            (urls, Some(e)) if urls.is_empty() => Err(ClientError::Discovery(e)),
            (urls, _) => Ok(urls),
        }
    }

    /// The error: the last `dns:` entry that resolved to nothing, with nothing held.
    async fn discovery_endpoints(&self) -> (Vec<String>, Option<String>) {
        let (mut out, mut error) = (Vec::new(), None);
        for entry in &self.inner.cfg.discovery {
            match dns::DnsTarget::parse(entry) {
                None => out.push(entry.clone()),
                Some(Err(_)) => {} // refused when the client was built
                Some(Ok(target)) => match self.resolved(entry, &target).await {
                    Ok(eps) => out.extend(eps.into_iter().map(|e| e.url)),
                    Err(e) => error = Some(format!("resolving {entry}: {e}")),
                },
            }
        }
        (out, error)
    }

    /// The endpoints `entry` stands for: a fresh resolution as held; a stale one as held while
    /// it is resolved again in the background; none held, resolved now. A failed resolution
    /// keeps what is held.
    async fn resolved(
        &self,
        entry: &str,
        target: &dns::DnsTarget,
    ) -> Result<Vec<dns::Endpoint>, String> {
        let now = self.wall_ms();
        let held = self.with(|st, _| st.cache.resolution(entry).cloned());
        let held_endpoints =
            |h: Option<dns::Resolution>| h.map(|r| r.endpoints).unwrap_or_default();
        match dns::freshness(held.as_ref(), now) {
            dns::Use::Fresh => Ok(held_endpoints(held)),
            dns::Use::Stale => {
                let key = format!("dns|{entry}");
                if self.with(|st, _| st.revalidating.insert(key.clone())) {
                    let (this, entry, target) = (self.clone(), entry.to_owned(), target.clone());
                    tokio::spawn(async move {
                        let _ = this.resolve_now(&entry, &target).await;
                        this.with(|st, _| st.revalidating.remove(&key));
                    });
                }
                Ok(held_endpoints(held))
            }
            dns::Use::Resolve => self.resolve_now(entry, target).await.map(|r| r.endpoints),
        }
    }

    /// Resolves `target` and holds the answer (its addresses pinned for the connector).
    async fn resolve_now(
        &self,
        entry: &str,
        target: &dns::DnsTarget,
    ) -> Result<dns::Resolution, String> {
        let timeout = self.inner.cfg.discovery_timeout;
        let at = self.wall_ms();
        let via = self.inner.dns_via.as_deref();
        match dns::resolve(&self.inner.nameservers, target, timeout, at, via).await {
            Ok(r) => {
                self.inner.pins.set(&r.endpoints);
                self.with(|st, _| st.cache.put_resolution(entry, r.clone()));
                Ok(r)
            }
            Err(e) => {
                self.emit(Event::DiscoveryFailed { endpoint: entry.to_owned(), error: e.clone() });
                Err(e)
            }
        }
    }

    async fn fetch_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        timeout: Duration,
        auth: Auth<'_>,
    ) -> Result<T, String> {
        let req = self.request(Method::GET, url, Bytes::new(), auth)?;
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

    /// One probe: a small request on a (new or pooled) connection, which then stays warm. A
    /// node that no longer serves the query's model (or pipeline) fails it.
    async fn probe(&self, c: &Candidate, q: &Query) -> Result<Probed, String> {
        if let Some(pool) = &c.pool {
            return self.probe_pool(c, pool).await;
        }
        // Probes are unauthenticated: the token goes only where a request needs it.
        let url = format!("{}/health", c.url.trim_end_matches('/'));
        let req = self.request(Method::GET, &url, Bytes::new(), Auth::None)?;
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
        let body = Limited::new(res.into_body(), 1 << 20).collect().await.map(|b| b.to_bytes());
        let rtt = t.elapsed();
        if leaving {
            return Err("draining (migrate hint on its answer)".into());
        }
        if !(status.is_success() || status == StatusCode::SERVICE_UNAVAILABLE) {
            return Err(format!("HTTP {status}"));
        }
        if let Ok(body) = &body
            && let Err(e) = serves(body, q, c.model_for(&q.model))
        {
            self.with(|st, now| st.m.note_miss(&q.model, &c.id, now));
            return Err(e);
        }
        let wait = match load {
            Some(l) => {
                self.with(|st, _| st.m.note_capacity(&c.id, l.capacity));
                queue_wait(&l, c.ttft_p50_ms)
            }
            None => machine::discovery_wait(c),
        };
        Ok(Probed { id: c.id.clone(), rtt, queue_wait_ms: wait })
    }

    /// A cloud pool's probe: its OpenAI model list (`GET {base}/models`), with the pool's own
    /// key. It measures the round trip; a pool has no queue figure to read.
    async fn probe_pool(&self, c: &Candidate, pool: &str) -> Result<Probed, String> {
        let url = format!("{}/models", c.url.trim_end_matches('/'));
        let req = self.request(Method::GET, &url, Bytes::new(), Auth::Pool(pool))?;
        let t = Instant::now();
        let res = self.inner.http.request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let _ = Limited::new(res.into_body(), 1 << 20).collect().await;
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        Ok(Probed { id: c.id.clone(), rtt: t.elapsed(), queue_wait_ms: 0.0 })
    }

    /// A probe bounded by the probe deadline, its result recorded.
    async fn probe_recorded(&self, c: &Candidate, q: &Query) -> Result<Probed, String> {
        let limit = self.inner.cfg.probe_deadline;
        let r = tokio::time::timeout(limit, self.probe(c, q))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", limit.as_millis())));
        self.with(|st, now| st.m.record_probe(&c.id, r.as_ref().map_err(String::as_str), now));
        r
    }

    /// Discovers `model` and probes its candidates now, ahead of any session (at start-up,
    /// before calls arrive), so the first sessions start warm instead of waiting for probes.
    /// Returns how many candidates answered.
    pub async fn prepare(&self, model: &str) -> Result<usize, ClientError> {
        let q = Query::new(model, None);
        let candidates = self.discover_query(&q).await?;
        let set =
            probe_set(&candidates, self.inner.cfg.probe_k, self.inner.cfg.home_region.as_deref());
        Ok(self.probe_all(&set, &q).await.len())
    }

    /// Starts a session for `model`: discover, probe the top candidates in parallel, pin the
    /// best, keep the runner-up as standby.
    pub async fn session(&self, model: &str) -> Result<Session, ClientError> {
        self.start_session(Query::new(model, None)).await
    }

    /// Starts a session for a voice pipeline (e.g. STT → LLM → TTS): every candidate holds the
    /// whole pipeline, so each of its models is served by the one pinned node. Requests of the
    /// session may name any model of the pipeline; `model` is the one discovery ranks by.
    pub async fn pipeline_session(
        &self,
        pipeline: &str,
        model: &str,
    ) -> Result<Session, ClientError> {
        self.start_session(Query::new(model, Some(pipeline))).await
    }

    /// As [`Client::session`], acting for a caller with its own token (`bearer`): discovery
    /// answers for that token (its residency, its policy rules), the nodes see it (its limits,
    /// its residency), and the list is cached apart from other callers'. What the client
    /// learns of the nodes (failures, ejections, first-token times) is shared. For a service
    /// acting for many tenants, as the regional router does.
    pub async fn session_as(&self, model: &str, bearer: &str) -> Result<Session, ClientError> {
        let q = Query { bearer: Some(Arc::from(bearer)), ..Query::new(model, None) };
        self.start_session(q).await
    }

    /// As [`Client::pipeline_session`], acting for a caller with its own token (see
    /// [`Client::session_as`]).
    pub async fn pipeline_session_as(
        &self,
        pipeline: &str,
        model: &str,
        bearer: &str,
    ) -> Result<Session, ClientError> {
        let q = Query { bearer: Some(Arc::from(bearer)), ..Query::new(model, Some(pipeline)) };
        self.start_session(q).await
    }

    async fn start_session(&self, q: Query) -> Result<Session, ClientError> {
        let candidates = self.discover_query(&q).await?;
        let stamp = self.with(|st, _| st.cache.fetched_at(&self.key(&q)).unwrap_or(0));
        let usable = self.with(|st, now| st.m.usable(&q.model, &candidates, now));
        let set = probe_set(&usable, self.inner.cfg.probe_k, self.inner.cfg.home_region.as_deref());
        // Probed moments ago (a session just started, or a re-probe): reuse, so a warm start
        // adds nothing but the pick; measured round trips within `path_ttl` are used at once
        // and refreshed behind.
        let (probe_ttl, path_ttl) = (self.inner.cfg.probe_ttl, self.inner.cfg.path_ttl);
        let (recent, known) = self.with(|st, now| {
            (st.m.recent_probes(&set, probe_ttl, now), st.m.known_paths(&set, path_ttl, now))
        });
        let mut results = match (recent, known) {
            (Some(r), _) => r,
            (None, Some(k)) => {
                self.refresh_probes(&set, &q);
                k
            }
            (None, None) => self.probe_all(&set, &q).await,
        };
        // Fewer than two answered (nodes gone or draining since the list was made): probe the
        // next candidates too, so there is a choice and a standby.
        let k = self.inner.cfg.probe_k;
        let mut next = k;
        while results.len() < 2 && next < usable.len() {
            let more: Vec<&Candidate> = usable.iter().skip(next).take(k).collect();
            next += k;
            results.extend(self.probe_all(&more, &q).await);
        }
        // Candidates whose probe found the model gone are left out now.
        let (order, id) = self.with(|st, now| {
            let usable = st.m.usable(&q.model, &usable, now);
            let order = st.m.rank(&results, &usable, now);
            (order, st.m.session_id())
        });
        if order.is_empty() {
            return Err(ClientError::NoCandidates {
                model: q.model,
                reason: "no listed node serves it".into(),
            });
        }
        self.emit(Event::Pinned {
            node: order[0].id.clone(),
            standby: order.get(1).map(|c| c.id.clone()),
        });
        Ok(Session::new(self.clone(), id, q, order, stamp))
    }

    /// Probes `set` on a task of its own (one refresh at a time), for the sessions to come.
    fn refresh_probes(&self, set: &[&Candidate], q: &Query) {
        if self.with(|st, _| std::mem::replace(&mut st.refreshing, true)) {
            return;
        }
        let (this, q) = (self.clone(), q.clone());
        let set: Vec<Candidate> = set.iter().map(|c| (*c).clone()).collect();
        tokio::spawn(async move {
            this.probe_all(&set.iter().collect::<Vec<_>>(), &q).await;
            this.with(|st, _| st.refreshing = false);
        });
    }

    async fn probe_all(&self, set: &[&Candidate], q: &Query) -> Vec<(Probed, Candidate)> {
        let mut tasks = tokio::task::JoinSet::new();
        for c in set {
            let (this, c, q) = (self.clone(), (*c).clone(), q.clone());
            // Bounded on its own: a probe outlives an early decision, and then only warms its
            // connection and the cache for the sessions to come.
            tasks.spawn(async move {
                let r = this.probe_recorded(&c, &q).await;
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

    /// A node that lost a hedge is probed at once, on a task of its own: if it does not
    /// answer that either, it is dead rather than slow, and is ejected — so this client's
    /// other sessions pinned to it leave before their next turn instead of each waiting out a
    /// first-token deadline there.
    fn suspect(&self, node: Candidate, q: Query) {
        let this = self.clone();
        tokio::spawn(async move {
            if this.probe_recorded(&node, &q).await.is_err() {
                let n = this.inner.cfg.eject_after;
                this.with(|st, now| st.m.note_failure(&node.id, n, now));
            }
        });
    }

    /// Sends a chat request to `node`: the answer's head and its migrate hint. The node's load
    /// report refreshes what this client knows of it.
    pub(crate) async fn send_chat(
        &self,
        node: &Candidate,
        body: &Bytes,
        session: &str,
        bearer: Option<&str>,
    ) -> Result<(http::Response<hyper::body::Incoming>, Option<MigrateHint>), String> {
        self.send_to(node, None, body, session, bearer).await
    }

    /// [`Client::send_chat`] to another endpoint: `raw` is its path (`/v1/embeddings`) and
    /// its body's content type (a JSON body has its model renamed for a cascade's node; an
    /// upload goes as it is).
    pub(crate) async fn send_to(
        &self,
        node: &Candidate,
        raw: Option<(&str, &str)>,
        body: &Bytes,
        session: &str,
        bearer: Option<&str>,
    ) -> Result<(http::Response<hyper::body::Incoming>, Option<MigrateHint>), String> {
        let url = match raw {
            None => node.chat_url(),
            Some((path, _)) => {
                let base = node.url.trim_end_matches('/');
                match node.pool {
                    // A pool's URL is its OpenAI base (`…/v1`).
                    Some(_) => format!("{base}{}", path.strip_prefix("/v1").unwrap_or(path)),
                    None => format!("{base}{path}"),
                }
            }
        };
        let json = raw.is_none_or(|(_, ct)| ct.starts_with("application/json"));
        let auth = match (&node.pool, bearer) {
            (Some(p), _) => Auth::Pool(p),
            (None, Some(t)) => Auth::Caller(t),
            (None, None) => Auth::Fleet,
        };
        // A cascade's node (or a pool) serves another model id: the request names it.
        let body = match &node.serve_as {
            Some(m) if json => rename_model(body, m)?,
            _ => body.clone(),
        };
        let mut req = self.request(Method::POST, &url, body, auth)?;
        if let Some((_, ct)) = raw {
            let ct = http::HeaderValue::from_str(ct).map_err(|e| format!("content type: {e}"))?;
            req.headers_mut().insert(header::CONTENT_TYPE, ct);
        }
        if let Ok(v) = http::HeaderValue::from_str(session) {
            req.headers_mut().insert(SESSION_HEADER, v);
        }
        let res = self.inner.http.request(req).await.map_err(|e| format!("connect/send: {e}"))?;
        let hint: Option<MigrateHint> = res
            .headers()
            .get(MIGRATE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let load = res
            .headers()
            .get(LOAD_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<LoadReport>().ok());
        if hint.is_some() || load.is_some() {
            self.with(|st, _| {
                // A node that is leaving is no candidate for new sessions: forget its probe.
                if hint.as_ref().is_some_and(|h| h.model.is_none()) {
                    st.m.forget_probe(&node.id);
                }
                if let Some(l) = &load {
                    st.m.refresh_load(&node.id, queue_wait(l, node.ttft_p50_ms));
                    st.m.note_capacity(&node.id, l.capacity);
                }
            });
        }
        Ok((res, hint))
    }
}

/// Who a request authenticates as.
#[derive(Debug, Clone, Copy)]
enum Auth<'a> {
    /// The fleet's token (discovery, nodes).
    Fleet,
    /// A caller's own token, in place of the fleet's ([`Client::session_as`]).
    Caller(&'a str),
    /// A cloud pool's own key, if this client has one.
    Pool(&'a str),
    None,
}

/// `body` (a chat request) naming `model` instead.
fn rename_model(body: &Bytes, model: &str) -> Result<Bytes, String> {
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("request body: {e}"))?;
    match v.get_mut("model") {
        Some(m) => *m = serde_json::Value::String(model.to_owned()),
        None => return Err("request body has no model".into()),
    }
    serde_json::to_vec(&v).map(Bytes::from).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_with_no_recent_first_token_is_not_taken_for_an_instant_one() {
        let report =
            |ttft_ms, queue_depth| LoadReport { queue_depth, in_flight: 4, capacity: 4, ttft_ms };
        assert_eq!(queue_wait(&report(20, 0), 250.0), 20.0);
        assert_eq!(queue_wait(&report(20, 4), 250.0), 40.0, "a full queue: one more p50");
        assert_eq!(queue_wait(&report(0, 0), 30.0), 30.0, "no samples: discovery's figure");
        assert_eq!(queue_wait(&report(0, 2), 30.0), 45.0);
    }

    use crate::machine::tests::cand;

    #[test]
    fn a_cascade_candidate_is_asked_for_the_model_it_serves_and_nothing_else_changes() {
        let body = Bytes::from(
            r#"{"model":"nemotron","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        );
        let out: serde_json::Value =
            serde_json::from_slice(&rename_model(&body, "llama").unwrap()).unwrap();
        assert_eq!(out["model"], "llama");
        assert_eq!(out["stream"], true);
        assert_eq!(out["messages"][0]["content"], "hi");
        assert!(rename_model(&Bytes::from_static(b"{}"), "llama").is_err());
        let mut c = cand("tor-1", "toronto");
        assert_eq!(c.model_for("nemotron"), "nemotron");
        c.serve_as = Some("llama".into());
        assert_eq!(c.model_for("nemotron"), "llama");
    }

    #[test]
    fn a_pool_gets_its_own_key_or_none_never_the_fleets_token() {
        let cfg = ClientConfig {
            token: Some("fleet-token".into()),
            pool_keys: BTreeMap::from([("eu-cloud".to_owned(), "pool-key".to_owned())]),
            ..ClientConfig::default()
        };
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("pool-key") && !debug.contains("fleet-token"), "{debug}");
        let client = Client::new(cfg).unwrap();
        let bearer = |auth| {
            let r =
                client.request(Method::GET, "https://pool.example/v1/models", Bytes::new(), auth);
            r.unwrap().headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(bearer(Auth::Pool("eu-cloud")).as_deref(), Some("Bearer pool-key"));
        assert_eq!(bearer(Auth::Pool("us-cloud")), None, "no key: nothing, not the token");
        assert_eq!(bearer(Auth::Fleet).as_deref(), Some("Bearer fleet-token"));
        assert_eq!(bearer(Auth::None), None);
        // A key is held to the token's rule: never over plaintext to a remote host.
        let plain = client.request(
            Method::GET,
            "http://pool.example/v1",
            Bytes::new(),
            Auth::Pool("eu-cloud"),
        );
        assert!(plain.is_err());
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

    #[test]
    fn a_404_is_a_placement_miss_only_when_the_node_says_model_not_found() {
        let c = |s: StatusCode, body: &str| {
            classify(s, Fault::of_status(s.as_u16()), body.into(), None, None)
        };
        let nf = r#"{"error":{"message":"no model x","type":"invalid_request_error","param":"model","code":"model_not_found"}}"#;
        assert!(matches!(c(StatusCode::NOT_FOUND, nf), Outcome::Missing { .. }));
        assert!(matches!(c(StatusCode::NOT_FOUND, "{}"), Outcome::Refused { status: 404, .. }));
        assert!(matches!(
            c(StatusCode::BAD_GATEWAY, ""),
            Outcome::Failed { side: Side::Backend, .. }
        ));
        assert!(matches!(c(StatusCode::TOO_MANY_REQUESTS, ""), Outcome::Busy { .. }));
    }

    #[test]
    fn the_nodes_own_classification_wins_over_its_status() {
        let headers = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert(edgeroute_proto::ERROR_HEADER, http::HeaderValue::from_str(v).unwrap());
            h
        };
        let c = |s: StatusCode, h: &http::HeaderMap| {
            classify(s, fault_of(s, h), String::new(), None, None)
        };
        // A 502 the node's gateway produced itself is the node's, not its backend's.
        assert!(matches!(
            c(StatusCode::BAD_GATEWAY, &headers("side=node; retry=yes")),
            Outcome::Failed { side: Side::Node, .. }
        ));
        // A 500 the node says no other node can help with is returned, not retried.
        assert!(matches!(
            c(StatusCode::INTERNAL_SERVER_ERROR, &headers("side=caller; retry=no")),
            Outcome::Refused { status: 500, .. }
        ));
        // A header this version cannot read leaves the status's reading.
        assert!(matches!(
            c(StatusCode::GATEWAY_TIMEOUT, &headers("side=moon; retry=yes")),
            Outcome::Failed { side: Side::Backend, .. }
        ));
    }
}
