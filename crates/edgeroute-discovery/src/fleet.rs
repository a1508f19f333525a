//! The registry: every node discovery knows, what each source last said of it, and the health
//! verdict that follows. Pure: no I/O, every input carries its time (`now`, since the replica
//! started), so the whole decision path runs in unit tests.
//!
//! Two sources describe a node and either may be stale:
//! - the **topology bus** pushes placement (models ready, drain, stop) within milliseconds, but
//!   goes quiet when NATS is down;
//! - the **probe** (`GET /health`) is pulled every second and carries telemetry (queue, TTFT,
//!   error rate, pipelines) and placement too.
//!
//! For placement, the newer wins: the bus state if it changed after the last answered probe was
//! *sent*, else the probe's report. A probe sent before a bus change can never undo it, and a
//! bus that went quiet is overruled by the next probe. Telemetry always comes from the probe.
//!
//! The bus authenticates nobody, so what it says is checked before it is believed
//! ([`AnnouncePolicy`], counted in [`Refusals`]):
//! - a configured node's URL is the truth: a bus snapshot naming another URL for its id (an
//!   empty one included, as after a lone `Heartbeat`) is ignored whole, URL and state;
//! - a node only the bus knows is taken only at an `https://` URL when a fleet CA is
//!   configured (or `http://` under the lab's explicit `allow_plaintext`), and only up to
//!   `max_nodes` of them;
//! - a node is served only once a probe of its current URL answered with its own `node_id`:
//!   an answer naming another id is a failed probe that unverifies it, and an announced node
//!   whose URL changes is unverified until the new URL answers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use edgeroute_core::health::{HealthParams, HealthTracker, Report, Verdict};
use edgeroute_core::score::{Health, NodeView};
use edgeroute_proto::health::{NodeHealth, NodeStatus};
use edgeroute_proto::models::ModelState;
use edgeroute_proto::topology::{NodeLiveness, NodeSnapshot};
use serde::Serialize;

use crate::config::StaticNode;

/// Where a node's current placement came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Bus,
    Probe,
    /// Neither has spoken yet.
    None,
}

#[derive(Debug, Clone)]
struct BusState {
    snapshot: NodeSnapshot,
    /// When the bus state last changed (heartbeats do not count).
    changed: Duration,
    expired: bool,
}

#[derive(Debug, Clone)]
struct Reported {
    health: NodeHealth,
    /// When the probe that brought it was sent.
    sent: Duration,
}

/// What the bus may make the registry believe about nodes it does not configure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnouncePolicy {
    /// `http://` announced URLs are accepted (a lab on loopback or an in-memory network).
    pub allow_plaintext: bool,
    /// A fleet CA is configured, so an `https://` announced node can be verified (its
    /// certificate chains to it and names the node id); without one they are refused.
    pub fleet_ca: bool,
    /// Announced nodes held at once.
    pub max_nodes: usize,
}

impl Default for AnnouncePolicy {
    /// Strict: no plaintext, no fleet CA (so no announced node at all), 1024 at most.
    fn default() -> Self {
        AnnouncePolicy { allow_plaintext: false, fleet_ca: false, max_nodes: 1024 }
    }
}

/// Why a bus snapshot was not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A configured node's snapshot named another URL: ignored, URL and state.
    UrlMismatch,
    /// An announced node at an `http://` URL without `allow_plaintext`.
    Plaintext,
    /// An announced `https://` node with no fleet CA to verify it under.
    NoFleetCa,
    /// An announced node with no probeable URL (empty, as after a lone heartbeat, or not
    /// `http(s)://`).
    BadUrl,
    /// A new announced node beyond `max_nodes`.
    OverCap,
}

impl Refusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::UrlMismatch => "url_mismatch",
            Refusal::Plaintext => "plaintext",
            Refusal::NoFleetCa => "no_fleet_ca",
            Refusal::BadUrl => "bad_url",
            Refusal::OverCap => "over_cap",
        }
    }

    pub const ALL: [Refusal; 5] = [
        Refusal::UrlMismatch,
        Refusal::Plaintext,
        Refusal::NoFleetCa,
        Refusal::BadUrl,
        Refusal::OverCap,
    ];
}

/// Bus snapshots not believed, by reason, since the registry started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refusals([u64; 5]);

impl Refusals {
    pub fn get(&self, r: Refusal) -> u64 {
        self.0[r as usize]
    }

    fn note(&mut self, r: Refusal) {
        self.0[r as usize] += 1;
    }
}

/// The same URL, give or take a trailing `/`.
fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Whether an announced node at `url` may be probed under `policy`.
fn check_announced(url: &str, policy: &AnnouncePolicy) -> Result<(), Refusal> {
    let Some(uri) = crate::probe::health_uri(url) else { return Err(Refusal::BadUrl) };
    match uri.scheme_str() {
        Some("https") if policy.fleet_ca => Ok(()),
        Some("https") => Err(Refusal::NoFleetCa),
        Some("http") if policy.allow_plaintext => Ok(()),
        _ => Err(Refusal::Plaintext),
    }
}

/// Probe bookkeeping, shown in `/v1/nodes`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProbeStats {
    pub ok: u64,
    pub failed: u64,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip)]
    last_ok: Option<Duration>,
    /// The correctness probes' state per model (issue 16, `crate::correctness`); a model
    /// `ejected` or `recovering` here is left out of the node's `models`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub correctness: BTreeMap<String, crate::correctness::Status>,
}

#[derive(Debug, Clone)]
struct NodeRecord {
    region: String,
    /// From configuration; a bus-announced URL overrides it.
    configured_url: Option<String>,
    configured: bool,
    /// From configuration; overrides what the node reports.
    cost_per_1k: Option<f64>,
    bus: Option<BusState>,
    report: Option<Reported>,
    tracker: HealthTracker,
    probes: ProbeStats,
    /// When the node was last seen alive by either source.
    last_alive: Duration,
    /// The entry built at the last change, reused while nothing it shows has changed.
    cached: Option<Arc<NodeEntry>>,
    dirty: bool,
    /// The last first-token figures the node reported with samples behind them (p50, p99,
    /// samples): a node whose window emptied (no traffic lately) is predicted by what it last
    /// showed, not by the fleet's median — an idle slow node is still slow.
    last_ttft: Option<(f64, f64, u64)>,
    /// The last probe was answered by another node (its `/health` named another id).
    identity_error: Option<String>,
    /// What the correctness probes decided, per model (`crate::correctness`): a model the
    /// node is ejected for is no placement of it.
    correctness: BTreeMap<String, crate::correctness::Status>,
}

impl NodeRecord {
    fn new(region: String, params: HealthParams, now: Duration) -> Self {
        NodeRecord {
            last_ttft: None,
            region,
            configured_url: None,
            configured: false,
            cost_per_1k: None,
            bus: None,
            report: None,
            tracker: HealthTracker::new(params),
            probes: ProbeStats::default(),
            last_alive: now,
            cached: None,
            dirty: true,
            identity_error: None,
            correctness: BTreeMap::new(),
        }
    }

    /// Where the node is probed and served: the configured URL when there is one (the bus
    /// never overrides it), else the announced one.
    fn url(&self) -> Option<&str> {
        match &self.configured_url {
            Some(u) => Some(u.as_str()),
            None => self.bus.as_ref().map(|b| b.snapshot.url.as_str()).filter(|u| !u.is_empty()),
        }
    }

    /// Forgets every verification: the node is served again only after a probe of its
    /// current URL answers as it.
    fn unverify(&mut self, params: HealthParams) {
        self.report = None;
        self.tracker = HealthTracker::new(params);
        self.probes = ProbeStats::default();
        self.last_ttft = None;
        self.identity_error = None;
        self.dirty = true;
    }

    /// Whether the bus state is newer than the last report.
    fn bus_wins(&self) -> bool {
        match (&self.bus, &self.report) {
            (Some(b), Some(r)) => b.changed >= r.sent,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

/// The node as the fleet sees it now: its ranking inputs and what the API reports.
#[derive(Debug, Clone)]
pub struct NodeEntry {
    pub view: NodeView,
    pub info: NodeInfo,
}

/// A node as `/v1/discover` and `/v1/nodes` report it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub region: String,
    pub url: String,
    pub health: &'static str,
    /// Why the node is not `ready`, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// Models ready on the node.
    pub models: Vec<String>,
    pub queue_depth: u32,
    pub in_flight: u32,
    pub capacity: u32,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// The TTFT figures are the fleet's prior, not the node's own (too few samples).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ttft_estimated: bool,
    pub error_rate: f64,
    pub cost_per_1k: f64,
    /// Pipelines servable on the node and their availability.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pipelines: BTreeMap<String, f64>,
    pub detail: NodeDetail,
}

/// What only `/v1/nodes` shows: where the figures came from and how fresh they are.
#[derive(Debug, Clone, Serialize)]
pub struct NodeDetail {
    pub placement_source: Source,
    pub configured: bool,
    /// Every model the node holds, in any state.
    pub model_states: BTreeMap<String, ModelState>,
    /// The model registry's version of each model held, when the node named one (its load's
    /// `version`, reported on the bus and in `/health`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub model_versions: BTreeMap<String, String>,
    /// The node's hardware class (`gpu`, `npu`, `cpu`) as it reports it; unknown before its
    /// first answered probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
    /// The busiest GPU's utilisation (busy slots / slots) at the last probe, in [0, 1].
    pub gpu_util: f64,
    pub phi: f64,
    /// Milliseconds since the last answered probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_probe_age_ms: Option<u64>,
    pub probes: ProbeStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus_liveness: Option<NodeLiveness>,
}

impl NodeInfo {
    /// Why the node is no candidate for `model` by its answers, when it is ejected for it.
    pub fn wrong_answers(&self, model: &str) -> Option<&str> {
        self.detail
            .probes
            .correctness
            .get(model)
            .filter(|s| s.ejected())
            .map(|s| s.reason.as_deref().unwrap_or("ejected by correctness probes"))
    }
}

pub fn health_name(h: Health) -> &'static str {
    match h {
        Health::Ready => "ready",
        Health::Degraded => "degraded",
        Health::Saturated => "saturated",
        Health::Draining => "draining",
        Health::Unhealthy => "unhealthy",
    }
}

/// Inputs to building views that are not per node.
#[derive(Debug, Clone, Copy)]
pub struct ViewParams {
    /// TTFT assumed when neither the node nor the fleet has enough samples.
    pub unknown_ttft_ms: f64,
    pub min_ttft_samples: u64,
}

/// What a change did to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing a ranking depends on.
    None,
    /// Placement or health changed: rebuild the rankings promptly.
    Changed,
    /// Only telemetry (queue, TTFT, error rate) moved: a rebuild may wait to fold in more.
    Telemetry,
    /// A node appeared or its URL changed: (re)start probing it. `announced`: known only
    /// from the bus (its probes are rate-bounded and its certificate must name it).
    Target { id: String, url: String, announced: bool },
}

/// Every node discovery knows.
#[derive(Debug, Clone)]
pub struct Fleet {
    nodes: BTreeMap<String, NodeRecord>,
    params: HealthParams,
    forget_after: Duration,
    policy: AnnouncePolicy,
    refusals: Refusals,
}

impl Fleet {
    /// A registry with the strict [`AnnouncePolicy::default`].
    pub fn new(params: HealthParams, forget_after: Duration) -> Self {
        Fleet {
            nodes: BTreeMap::new(),
            params,
            forget_after,
            policy: AnnouncePolicy::default(),
            refusals: Refusals::default(),
        }
    }

    /// What the bus may announce.
    pub fn with_policy(mut self, policy: AnnouncePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Bus snapshots not believed so far.
    pub fn refusals(&self) -> Refusals {
        self.refusals
    }

    /// Nodes known only from the bus.
    pub fn announced(&self) -> usize {
        self.nodes.values().filter(|r| !r.configured).count()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Adds a node from configuration.
    pub fn add_static(&mut self, n: &StaticNode, now: Duration) -> Change {
        let params = self.params;
        let rec = self
            .nodes
            .entry(n.id.clone())
            .or_insert_with(|| NodeRecord::new(n.region.clone(), params, now));
        let old_url = rec.url().map(str::to_owned);
        rec.configured = true;
        rec.configured_url = Some(n.url.clone());
        rec.cost_per_1k = n.cost_per_1k;
        rec.dirty = true;
        if old_url.as_deref().is_some_and(|u| !same_url(u, &n.url)) {
            rec.unverify(params);
        }
        Change::Target { id: n.id.clone(), url: n.url.clone(), announced: false }
    }

    /// Folds in a node's state as the bus holds it (after any snapshot or event), unless the
    /// registry's rules refuse it (see the module's doc): then nothing changes and the refusal
    /// is counted.
    pub fn apply_bus(&mut self, snap: &NodeSnapshot, now: Duration) -> Change {
        match self.check_bus(snap) {
            Ok(()) => self.fold_bus(snap, now),
            Err(r) => {
                self.refusals.note(r);
                Change::None
            }
        }
    }

    fn check_bus(&self, snap: &NodeSnapshot) -> Result<(), Refusal> {
        match self.nodes.get(&snap.node_id) {
            Some(rec) if rec.configured => match &rec.configured_url {
                Some(url) if same_url(url, &snap.url) => Ok(()),
                _ => Err(Refusal::UrlMismatch),
            },
            held => {
                check_announced(&snap.url, &self.policy)?;
                if held.is_none() && self.announced() >= self.policy.max_nodes {
                    return Err(Refusal::OverCap);
                }
                Ok(())
            }
        }
    }

    fn fold_bus(&mut self, snap: &NodeSnapshot, now: Duration) -> Change {
        let params = self.params;
        let rec = self
            .nodes
            .entry(snap.node_id.clone())
            .or_insert_with(|| NodeRecord::new(snap.region.clone(), params, now));
        let old_url = rec.url().map(str::to_owned);
        let same = rec.bus.as_ref().is_some_and(|b| {
            !b.expired
                && b.snapshot.url == snap.url
                && b.snapshot.liveness == snap.liveness
                && b.snapshot.models == snap.models
                && b.snapshot.drain_deadline_ms == snap.drain_deadline_ms
                && b.snapshot.region == snap.region
        });
        if snap.liveness != NodeLiveness::Down {
            rec.last_alive = now;
        }
        if same {
            if let Some(b) = rec.bus.as_mut() {
                b.snapshot.seq = snap.seq;
                b.snapshot.epoch = snap.epoch;
            }
            return Change::None;
        }
        if !rec.configured {
            rec.region = snap.region.clone();
        }
        rec.dirty = true;
        rec.bus = Some(BusState { snapshot: snap.clone(), changed: now, expired: false });
        match rec.url().map(str::to_owned) {
            Some(url) if old_url.as_deref() != Some(url.as_str()) => {
                if old_url.is_some() {
                    // Moved: what was verified at the old URL says nothing about the new one.
                    rec.unverify(params);
                }
                Change::Target { id: snap.node_id.clone(), url, announced: !rec.configured }
            }
            _ => Change::Changed,
        }
    }

    /// The bus heard nothing from the node for its expiry time.
    pub fn bus_expired(&mut self, id: &str, now: Duration) -> Change {
        match self.nodes.get_mut(id).and_then(|r| r.bus.as_mut()) {
            Some(b) if !b.expired => {
                b.expired = true;
                b.changed = now;
                if let Some(r) = self.nodes.get_mut(id) {
                    r.dirty = true;
                }
                Change::Changed
            }
            _ => Change::None,
        }
    }

    /// A probe of `url`, sent at `sent`, ended at `now` with `outcome`. A probe of a URL the
    /// node no longer has is ignored.
    pub fn probe_result(
        &mut self,
        id: &str,
        url: &str,
        sent: Duration,
        now: Duration,
        outcome: Result<NodeHealth, String>,
    ) -> Change {
        if self.nodes.get(id).and_then(NodeRecord::url) != Some(url) {
            return Change::None;
        }
        match outcome {
            Ok(h) => self.probe_ok(id, sent, now, h),
            Err(e) => {
                self.probe_failed(id, now, e);
                Change::Telemetry
            }
        }
    }

    /// A probe sent at `sent` was answered at `now` with `health`. An answer naming another
    /// node id is a failed probe, and the node is unverified until its own answer comes back.
    pub fn probe_ok(
        &mut self,
        id: &str,
        sent: Duration,
        now: Duration,
        health: NodeHealth,
    ) -> Change {
        let Some(rec) = self.nodes.get_mut(id) else { return Change::None };
        if health.node_id != id {
            let named: String = health.node_id.chars().take(64).collect();
            let error = format!("identity: the node at this URL answered as {named:?}, not {id:?}");
            rec.report = None;
            rec.tracker.probe_failed(now);
            rec.probes.failed += 1;
            rec.probes.consecutive_failures = rec.probes.consecutive_failures.saturating_add(1);
            rec.probes.last_error = Some(error.clone());
            rec.identity_error = Some(error);
            rec.dirty = true;
            return Change::Changed;
        }
        rec.identity_error = None;
        let change = match &rec.report {
            Some(old)
                if placement(&old.health) == placement(&health)
                    && rec.probes.consecutive_failures == 0 =>
            {
                Change::Telemetry
            }
            _ => Change::Changed,
        };
        let requests = health.requests_in_window;
        let failures = (health.error_rate.clamp(0.0, 1.0) * requests as f64).round() as u64;
        rec.tracker.probe_ok(
            now,
            Report {
                requests,
                failures,
                // Drain is placement: it comes from whichever source is newer (below).
                draining: false,
                saturated: health.status == NodeStatus::Saturated,
            },
        );
        rec.probes.ok += 1;
        rec.probes.consecutive_failures = 0;
        rec.probes.last_ok = Some(now);
        rec.last_alive = now;
        // A window thinning out (few samples) does not replace a well-sampled figure.
        let n = health.ttft_ms.samples;
        let thinner = rec.last_ttft.is_some_and(|(_, _, old)| n < old.min(5));
        if n > 0 && health.ttft_ms.p50.is_finite() && !thinner {
            rec.last_ttft = Some((health.ttft_ms.p50, health.ttft_ms.p99, n));
        }
        rec.report = Some(Reported { health, sent });
        rec.dirty = true;
        change
    }

    /// A probe failed (refused, timed out, bad answer) at `now`.
    pub fn probe_failed(&mut self, id: &str, now: Duration, error: String) {
        let Some(rec) = self.nodes.get_mut(id) else { return };
        rec.tracker.probe_failed(now);
        rec.probes.failed += 1;
        rec.probes.consecutive_failures = rec.probes.consecutive_failures.saturating_add(1);
        rec.probes.last_error = Some(error);
        rec.dirty = true;
    }

    /// Replaces what the correctness probes decided of node `id`; true when it changed.
    pub fn set_correctness(
        &mut self,
        id: &str,
        statuses: BTreeMap<String, crate::correctness::Status>,
    ) -> bool {
        let Some(rec) = self.nodes.get_mut(id) else { return false };
        if rec.correctness == statuses {
            return false;
        }
        rec.correctness = statuses;
        rec.dirty = true;
        true
    }

    /// Nodes to probe: id, URL, and whether the node is known only from the bus.
    pub fn targets(&self) -> Vec<(String, String, bool)> {
        self.nodes
            .iter()
            .filter_map(|(id, r)| Some((id.clone(), r.url()?.to_owned(), !r.configured)))
            .collect()
    }

    /// Forgets nodes known only from the bus that have been down or silent for
    /// `forget_after`. Returns their ids.
    pub fn forget(&mut self, now: Duration) -> Vec<String> {
        let gone: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, r)| !r.configured && now.saturating_sub(r.last_alive) > self.forget_after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.nodes.remove(id);
        }
        gone
    }

    /// Every node's view at `now`, sorted by id. Verdicts advance here (a silent node is
    /// ejected when its φ crosses the threshold at `now`). Entries of nodes whose inputs and
    /// verdict are unchanged are reused, so the cost follows what changed, not the fleet.
    /// (Their `phi` and `last_probe_age_ms` are as of their last change: at most a probe
    /// interval old for a live node.)
    pub fn entries(&mut self, now: Duration, p: ViewParams) -> Vec<Arc<NodeEntry>> {
        let prior = fleet_median_ttft(self.nodes.values(), p);
        self.nodes
            .iter_mut()
            .map(|(id, rec)| {
                // Unchanged inputs: only time can move the verdict, and only by φ crossing the
                // ejection threshold.
                if let Some(c) = &rec.cached
                    && !rec.dirty
                    && rec.tracker.phi(now) <= rec.tracker.params().phi_eject
                    && (!c.info.ttft_estimated || c.view.ttft_p50_ms == prior)
                {
                    return c.clone();
                }
                let (health, reason) = judge(rec, now);
                if let Some(c) = &rec.cached
                    && !rec.dirty
                    && c.view.health == health
                    && c.info.health_reason == reason
                    && (!c.info.ttft_estimated || c.view.ttft_p50_ms == prior)
                {
                    return c.clone();
                }
                let e = Arc::new(entry(id, rec, now, p, prior, health, reason));
                rec.cached = Some(e.clone());
                rec.dirty = false;
                e
            })
            .collect()
    }
}

/// What of a report decides placement and health (anything else is telemetry).
fn placement(h: &NodeHealth) -> (NodeStatus, Vec<&str>, Vec<(&str, bool)>) {
    let ready =
        h.models.iter().filter(|m| m.state == ModelState::Ready).map(|m| m.id.as_str()).collect();
    let pipelines = h.pipelines.iter().map(|p| (p.id.as_str(), p.servable)).collect();
    (h.status, ready, pipelines)
}

/// Median p50 of the nodes with enough samples, else the configured prior.
fn fleet_median_ttft<'a>(nodes: impl Iterator<Item = &'a NodeRecord>, p: ViewParams) -> f64 {
    let mut p50s: Vec<f64> = nodes
        .filter_map(|r| r.report.as_ref())
        .filter(|r| r.health.ttft_ms.samples >= p.min_ttft_samples)
        .map(|r| r.health.ttft_ms.p50)
        .filter(|v| v.is_finite())
        .collect();
    if p50s.is_empty() {
        return p.unknown_ttft_ms;
    }
    let mid = p50s.len() / 2;
    *p50s.select_nth_unstable_by(mid, f64::total_cmp).1
}

/// Where placement comes from and the node's liveness by it.
fn liveness(rec: &NodeRecord) -> (Source, NodeLiveness) {
    match (&rec.bus, &rec.report) {
        (Some(b), _) if rec.bus_wins() => {
            (Source::Bus, if b.expired { NodeLiveness::Down } else { b.snapshot.liveness })
        }
        (_, Some(r)) => (
            Source::Probe,
            match r.health.status {
                NodeStatus::Draining | NodeStatus::ShuttingDown => NodeLiveness::Draining,
                _ => NodeLiveness::Up,
            },
        ),
        _ => (Source::None, NodeLiveness::Up),
    }
}

/// The node's health and, when not ready, why. Cheap: run for every node at every rebuild.
fn judge(rec: &mut NodeRecord, now: Duration) -> (Health, Option<String>) {
    let verdict = rec.tracker.verdict(now);
    let (_, liveness) = liveness(rec);
    if rec.url().is_none() {
        (Health::Unhealthy, Some("no URL known for the node".to_owned()))
    } else if let (None, Some(e)) = (&rec.report, &rec.identity_error) {
        (Health::Unhealthy, Some(format!("not verified: {e}")))
    } else if rec.report.is_none() {
        (Health::Unhealthy, Some("not yet verified: no probe answered".to_owned()))
    } else if liveness == NodeLiveness::Down {
        let why = match &rec.bus {
            Some(b) if b.expired => "silent on the topology bus past its expiry",
            _ => "announced its shutdown on the topology bus",
        };
        (Health::Unhealthy, Some(why.to_owned()))
    } else {
        match verdict {
            Verdict::Unhealthy => {
                let why = if rec.tracker.phi(now) > rec.tracker.params().phi_eject {
                    format!(
                        "ejected: probes stopped answering (phi above {})",
                        rec.tracker.params().phi_eject
                    )
                } else if rec.probes.consecutive_failures > 0 {
                    "ejected; probes still failing".to_owned()
                } else {
                    "ejected; recovery not yet verified by consecutive good probes".to_owned()
                };
                (Health::Unhealthy, Some(why))
            }
            _ if liveness == NodeLiveness::Draining => {
                (Health::Draining, Some("draining: refuses new sessions".to_owned()))
            }
            Verdict::Degraded => (
                Health::Degraded,
                Some("server-side error rate above the degrade threshold".to_owned()),
            ),
            Verdict::Saturated => (Health::Saturated, Some("full: new work queues".to_owned())),
            Verdict::Draining | Verdict::Ready => (Health::Ready, None),
        }
    }
}

fn entry(
    id: &str,
    rec: &NodeRecord,
    now: Duration,
    p: ViewParams,
    prior: f64,
    health: Health,
    reason: Option<String>,
) -> NodeEntry {
    let phi = rec.tracker.phi(now);
    let url = rec.url().unwrap_or_default().to_owned();
    let (source, _) = liveness(rec);
    let model_states: BTreeMap<String, ModelState> = match (&rec.bus, &rec.report) {
        (Some(b), _) if source == Source::Bus => {
            b.snapshot.models.iter().map(|m| (m.model.clone(), m.state)).collect()
        }
        (_, Some(r)) => r.health.models.iter().map(|m| (m.id.clone(), m.state)).collect(),
        _ => BTreeMap::new(),
    };
    // A model the correctness probes ejected the node for is no placement of it.
    let models: BTreeSet<String> = model_states
        .iter()
        .filter(|(m, s)| {
            **s == ModelState::Ready && !rec.correctness.get(*m).is_some_and(|c| c.ejected())
        })
        .map(|(m, _)| m.clone())
        .collect();
    // The registry version of each model held: the bus's word when it is the placement source
    // and names one, else the last report's.
    let mut model_versions: BTreeMap<String, String> = BTreeMap::new();
    if let Some(r) = &rec.report {
        for m in &r.health.models {
            if let Some(v) = &m.version
                && model_states.contains_key(&m.id)
            {
                model_versions.insert(m.id.clone(), v.clone());
            }
        }
    }
    if let Some(b) = rec.bus.as_ref().filter(|_| source == Source::Bus) {
        for m in &b.snapshot.models {
            if let Some(v) = &m.version {
                model_versions.insert(m.model.clone(), v.clone());
            }
        }
    }

    let report = rec.report.as_ref().map(|r| &r.health);
    let samples = report.map_or(0, |h| h.ttft_ms.samples);
    let estimated = samples < p.min_ttft_samples;
    let (p50, p99) = match (report, rec.last_ttft) {
        (Some(h), _) if !estimated => (h.ttft_ms.p50, h.ttft_ms.p99),
        // Idle lately: what it showed last, when that had enough samples behind it.
        (_, Some((p50, p99, n))) if n >= p.min_ttft_samples => (p50, p99),
        _ => (prior, prior),
    };
    let pipelines: BTreeMap<String, f64> = report
        .map(|h| {
            h.pipelines
                .iter()
                .filter(|pl| !pl.models.is_empty() && pl.models.iter().all(|m| models.contains(m)))
                // Servable now but not when probed (the bus brought the last model): no load
                // figure yet, and a freshly loaded GPU is idle.
                .map(|pl| (pl.id.clone(), if pl.servable { pl.availability } else { 1.0 }))
                .collect()
        })
        .unwrap_or_default();
    let view = NodeView {
        id: id.to_owned(),
        region: rec.region.clone(),
        health,
        models: models.clone(),
        pipelines: pipelines.clone(),
        queue_depth: report.map_or(0, |h| h.queue_depth),
        in_flight: report.map_or(0, |h| h.in_flight),
        capacity: report.map_or(1, |h| h.capacity.max(1)),
        ttft_p50_ms: p50,
        ttft_p99_ms: p99,
        error_rate: report.map_or(0.0, |h| h.error_rate),
        cost_per_1k: rec
            .cost_per_1k
            .or(report.and_then(|h| h.cost_per_1k))
            .filter(|c| c.is_finite() && *c >= 0.0)
            .unwrap_or(0.0),
    };
    let info = NodeInfo {
        id: id.to_owned(),
        region: rec.region.clone(),
        url,
        health: health_name(health),
        health_reason: reason,
        models: models.into_iter().collect(),
        queue_depth: view.queue_depth,
        in_flight: view.in_flight,
        capacity: view.capacity,
        ttft_p50_ms: p50,
        ttft_p99_ms: p99,
        ttft_estimated: estimated,
        error_rate: view.error_rate,
        cost_per_1k: view.cost_per_1k,
        pipelines,
        detail: NodeDetail {
            placement_source: source,
            configured: rec.configured,
            model_states,
            model_versions,
            hardware: report.and_then(|h| h.hardware.clone()),
            gpu_util: report
                .map_or(0.0, |h| h.gpus.iter().map(|g| g.utilization).fold(0.0, f64::max)),
            phi: if phi.is_finite() { phi } else { f64::MAX },
            last_probe_age_ms: rec.probes.last_ok.map(|t| now.saturating_sub(t).as_millis() as u64),
            probes: ProbeStats { correctness: rec.correctness.clone(), ..rec.probes.clone() },
            bus_liveness: rec.bus.as_ref().map(|b| b.snapshot.liveness),
        },
    };
    NodeEntry { view, info }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeroute_proto::health::{ModelHealth, Percentiles, PipelineHealth};
    use edgeroute_proto::topology::ModelPlacement;

    const P: ViewParams = ViewParams { unknown_ttft_ms: 250.0, min_ttft_samples: 5 };

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// A healthy node's `/health` report with `models` ready.
    fn report(id: &str, models: &[&str]) -> NodeHealth {
        NodeHealth {
            status: NodeStatus::Ready,
            ready: true,
            node_id: id.into(),
            region: "tor".into(),
            version: "test".into(),
            uptime_s: 1,
            models: models
                .iter()
                .map(|m| ModelHealth {
                    id: (*m).into(),
                    state: ModelState::Ready,
                    gpu: None,
                    version: None,
                })
                .collect(),
            gpus: vec![],
            pipelines: vec![],
            queue_depth: 0,
            in_flight: 0,
            capacity: 8,
            window_s: 60,
            ttft_ms: Percentiles { p50: 40.0, p99: 90.0, samples: 100 },
            latency_ms: Percentiles::default(),
            error_rate: 0.0,
            requests_in_window: 100,
            drain: None,
            cost_per_1k: None,
            hardware: None,
        }
    }

    /// A node from configuration at a placeholder URL.
    fn static_node(id: &str) -> StaticNode {
        StaticNode {
            id: id.into(),
            url: "http://127.0.0.1:1".into(),
            region: "tor".into(),
            cost_per_1k: None,
            jurisdiction: None,
        }
    }

    fn fleet_with(id: &str) -> Fleet {
        let mut f = Fleet::new(HealthParams::default(), s(600_000));
        f.add_static(&static_node(id), s(0));
        f
    }

    fn snap(id: &str, models: &[(&str, ModelState)], liveness: NodeLiveness) -> NodeSnapshot {
        let mut s = NodeSnapshot::new(id, "tor", "http://127.0.0.1:1", 1);
        s.liveness = liveness;
        s.models = models
            .iter()
            .map(|(m, st)| ModelPlacement {
                model: (*m).into(),
                gpu: None,
                state: *st,
                reason: None,
                version: None,
            })
            .collect();
        s
    }

    #[test]
    fn a_node_is_unhealthy_until_a_probe_verifies_it() {
        let mut f = fleet_with("a");
        let e = &f.entries(s(0), P)[0];
        assert_eq!(e.view.health, Health::Unhealthy);
        assert!(e.info.health_reason.as_deref().unwrap().contains("not yet verified"));
        f.probe_ok("a", s(900), s(1000), report("a", &["llm"]));
        let e = &f.entries(s(1000), P)[0];
        assert_eq!(e.view.health, Health::Ready);
        assert!(e.view.models.contains("llm"));
    }

    #[test]
    fn the_newer_source_wins_for_placement() {
        let mut f = fleet_with("a");
        f.probe_ok("a", s(900), s(1000), report("a", &["llm"]));
        // The bus says a second model became ready after that probe was sent.
        let ready = ModelState::Ready;
        f.apply_bus(&snap("a", &[("llm", ready), ("tts", ready)], NodeLiveness::Up), s(1200));
        let e = &f.entries(s(1200), P)[0];
        assert!(e.view.models.contains("tts"));
        assert_eq!(e.info.detail.placement_source, Source::Bus);
        // A probe sent before the bus change answers late: it must not undo it.
        f.probe_ok("a", s(1100), s(1300), report("a", &["llm"]));
        assert!(f.entries(s(1300), P)[0].view.models.contains("tts"));
        // A later probe (the bus went quiet and the model was unloaded meanwhile) wins.
        f.probe_ok("a", s(2000), s(2010), report("a", &["llm"]));
        let e = &f.entries(s(2010), P)[0];
        assert!(!e.view.models.contains("tts"));
        assert_eq!(e.info.detail.placement_source, Source::Probe);
        // A heartbeat-only bus update (same state) changes nothing.
        let same = snap("a", &[("llm", ready), ("tts", ready)], NodeLiveness::Up);
        assert_eq!(f.apply_bus(&same, s(2500)), Change::None);
    }

    #[test]
    fn draining_unloading_and_failed_models_are_not_candidates_for_that_model() {
        let mut f = fleet_with("a");
        let mut r = report("a", &["llm", "tts", "stt", "asr"]);
        for m in &mut r.models {
            m.state = match m.id.as_str() {
                "tts" => ModelState::Draining,
                "stt" => ModelState::Unloading,
                "asr" => ModelState::Failed,
                _ => ModelState::Ready,
            };
        }
        f.probe_ok("a", s(900), s(1000), r);
        let e = &f.entries(s(1000), P)[0];
        assert_eq!(e.view.models, BTreeSet::from(["llm".to_owned()]));
        assert_eq!(e.info.models, ["llm"]);
        assert_eq!(e.info.detail.model_states.get("tts"), Some(&ModelState::Draining));
        assert_eq!(e.view.health, Health::Ready, "the node still serves its other models");
        // The bus says `llm` started draining after that probe was sent: it leaves at once,
        // and a probe sent before the change does not bring it back.
        let draining = [("llm", ModelState::Draining)];
        assert_eq!(f.apply_bus(&snap("a", &draining, NodeLiveness::Up), s(1100)), Change::Changed);
        assert!(f.entries(s(1100), P)[0].view.models.is_empty());
        f.probe_ok("a", s(1050), s(1200), report("a", &["llm"]));
        assert!(f.entries(s(1200), P)[0].view.models.is_empty());
    }

    #[test]
    fn drain_and_stop_from_the_bus_apply_at_once() {
        let mut f = fleet_with("a");
        f.probe_ok("a", s(900), s(1000), report("a", &["llm"]));
        let ready = [("llm", ModelState::Ready)];
        f.apply_bus(&snap("a", &ready, NodeLiveness::Draining), s(1100));
        assert_eq!(f.entries(s(1100), P)[0].view.health, Health::Draining);
        f.apply_bus(&snap("a", &ready, NodeLiveness::Down), s(1200));
        assert_eq!(f.entries(s(1200), P)[0].view.health, Health::Unhealthy);
        // Alive again (probe sent after the stop): trusted.
        f.probe_ok("a", s(1300), s(1310), report("a", &["llm"]));
        assert_eq!(f.entries(s(1310), P)[0].view.health, Health::Ready);
        // Bus expiry with no newer probe: down.
        f.apply_bus(&snap("a", &ready, NodeLiveness::Up), s(1400));
        f.bus_expired("a", s(1500));
        assert_eq!(f.entries(s(1500), P)[0].view.health, Health::Unhealthy);
    }

    #[test]
    fn ttft_prior_is_the_fleet_median_and_pipelines_follow_placement() {
        let mut f = fleet_with("a");
        for (id, p50) in [("b", 30.0), ("c", 50.0), ("d", 70.0)] {
            f.add_static(&static_node(id), s(0));
            let mut r = report(id, &["llm"]);
            r.ttft_ms.p50 = p50;
            f.probe_ok(id, s(0), s(10), r);
        }
        let mut fresh = report("a", &["stt", "llm"]);
        fresh.ttft_ms.samples = 0;
        fresh.pipelines = vec![
            PipelineHealth {
                id: "voice".into(),
                models: vec!["stt".into(), "llm".into()],
                servable: true,
                availability: 0.25,
                bottleneck_gpu: None,
                missing: vec![],
            },
            PipelineHealth {
                id: "voice-tts".into(),
                models: vec!["stt".into(), "llm".into(), "tts".into()],
                servable: false,
                availability: 0.0,
                bottleneck_gpu: None,
                missing: vec!["tts".into()],
            },
        ];
        f.probe_ok("a", s(0), s(10), fresh);
        let a = f.entries(s(10), P).into_iter().find(|e| e.view.id == "a").unwrap();
        assert_eq!(a.view.ttft_p50_ms, 50.0, "the fleet median");
        assert!(a.info.ttft_estimated);
        assert_eq!(a.view.pipelines.get("voice"), Some(&0.25));
        assert!(!a.view.pipelines.contains_key("voice-tts"));
        // tts arrives on the bus: the pipeline becomes servable before the next probe.
        let ready = ModelState::Ready;
        let all = [("stt", ready), ("llm", ready), ("tts", ready)];
        f.apply_bus(&snap("a", &all, NodeLiveness::Up), s(20));
        let a = f.entries(s(20), P).into_iter().find(|e| e.view.id == "a").unwrap();
        assert_eq!(a.view.pipelines.get("voice-tts"), Some(&1.0));
    }

    #[test]
    fn a_configured_price_overrides_the_one_the_node_reports() {
        let mut f = fleet_with("a");
        f.add_static(&static_node("b"), s(0));
        for id in ["a", "b"] {
            let mut r = report(id, &["llm"]);
            r.cost_per_1k = Some(0.3);
            f.probe_ok(id, s(0), s(10), r);
        }
        let mut priced = static_node("b");
        priced.cost_per_1k = Some(0.1);
        f.add_static(&priced, s(20));
        let e = f.entries(s(20), P);
        assert_eq!((e[0].view.cost_per_1k, e[1].view.cost_per_1k), (0.3, 0.1));
    }

    const LAB: AnnouncePolicy =
        AnnouncePolicy { allow_plaintext: true, fleet_ca: false, max_nodes: 1024 };
    const FLEET_CA: AnnouncePolicy =
        AnnouncePolicy { allow_plaintext: false, fleet_ca: true, max_nodes: 1024 };

    fn at(mut snap: NodeSnapshot, url: &str) -> NodeSnapshot {
        snap.url = url.into();
        snap
    }

    fn ready_llm() -> [(&'static str, ModelState); 1] {
        [("llm", ModelState::Ready)]
    }

    #[test]
    fn a_bus_snapshot_never_overrides_a_configured_url() {
        let mut f = fleet_with("a");
        f.probe_ok("a", s(900), s(1000), report("a", &["llm"]));
        // A rogue announces `a` at its own URL, with a newer state (epoch u64::MAX, no models,
        // draining): ignored whole, and counted.
        let mut rogue = at(snap("a", &[], NodeLiveness::Draining), "https://evil.example:443");
        rogue.epoch = u64::MAX;
        assert_eq!(f.apply_bus(&rogue, s(1100)), Change::None);
        assert_eq!(f.refusals().get(Refusal::UrlMismatch), 1);
        let e = &f.entries(s(1100), P)[0];
        assert_eq!(e.info.url, "http://127.0.0.1:1");
        assert_eq!((e.view.health, e.view.models.contains("llm")), (Health::Ready, true));
        assert_eq!(f.targets(), [("a".to_owned(), "http://127.0.0.1:1".to_owned(), false)]);
        // The node itself, naming its configured URL, is believed.
        let own = snap("a", &ready_llm(), NodeLiveness::Draining);
        assert_eq!(f.apply_bus(&own, s(1200)), Change::Changed);
        assert_eq!(f.entries(s(1200), P)[0].view.health, Health::Draining);
    }

    #[test]
    fn a_lone_heartbeat_neither_empties_a_configured_url_nor_creates_a_node() {
        let mut f = fleet_with("a");
        f.probe_ok("a", s(900), s(1000), report("a", &["llm"]));
        // What the bus view makes of a first event that is a `Heartbeat`: no URL, no models.
        assert_eq!(f.apply_bus(&at(snap("a", &[], NodeLiveness::Up), ""), s(1100)), Change::None);
        let e = &f.entries(s(1100), P)[0];
        assert_eq!((e.info.url.as_str(), e.view.models.len()), ("http://127.0.0.1:1", 1));
        let mut lab = Fleet::new(HealthParams::default(), s(600_000)).with_policy(LAB);
        assert_eq!(
            lab.apply_bus(&at(snap("ghost", &[], NodeLiveness::Up), ""), s(0)),
            Change::None
        );
        assert!(lab.is_empty());
        assert_eq!(lab.refusals().get(Refusal::BadUrl), 1);
    }

    #[test]
    fn a_probe_answered_by_another_node_id_fails_and_unverifies() {
        let mut f = fleet_with("a");
        assert_eq!(f.probe_ok("a", s(900), s(1000), report("rogue", &["llm"])), Change::Changed);
        let e = &f.entries(s(1000), P)[0];
        assert_eq!(e.view.health, Health::Unhealthy);
        let why = e.info.health_reason.clone().unwrap();
        assert!(why.contains("identity") && why.contains("rogue"), "{why}");
        assert_eq!(e.info.detail.probes.failed, 1);
        // Verified, then the URL answers as someone else: out at once, not after φ.
        f.probe_ok("a", s(1900), s(2000), report("a", &["llm"]));
        assert_eq!(f.entries(s(2000), P)[0].view.health, Health::Ready);
        f.probe_ok("a", s(2900), s(3000), report("rogue", &["llm"]));
        assert_eq!(f.entries(s(3000), P)[0].view.health, Health::Unhealthy);
    }

    #[test]
    fn announced_nodes_need_https_under_a_fleet_ca_unless_the_lab_says_so() {
        let plain = at(snap("x", &ready_llm(), NodeLiveness::Up), "http://10.0.0.9:8080");
        let tls = at(snap("y", &ready_llm(), NodeLiveness::Up), "https://10.0.0.9:8443");
        let mut strict = Fleet::new(HealthParams::default(), s(600_000));
        assert_eq!(strict.apply_bus(&plain, s(0)), Change::None);
        assert_eq!(strict.apply_bus(&tls, s(0)), Change::None);
        assert!(strict.is_empty());
        assert_eq!(strict.refusals().get(Refusal::Plaintext), 1);
        assert_eq!(strict.refusals().get(Refusal::NoFleetCa), 1);
        let mut ca = Fleet::new(HealthParams::default(), s(600_000)).with_policy(FLEET_CA);
        assert_eq!(ca.apply_bus(&plain, s(0)), Change::None);
        assert!(matches!(ca.apply_bus(&tls, s(0)), Change::Target { announced: true, .. }));
        let mut lab = Fleet::new(HealthParams::default(), s(600_000)).with_policy(LAB);
        assert!(matches!(lab.apply_bus(&plain, s(0)), Change::Target { announced: true, .. }));
    }

    #[test]
    fn an_announced_node_that_moves_is_unverified_until_its_new_url_answers() {
        let mut f = Fleet::new(HealthParams::default(), s(600_000)).with_policy(FLEET_CA);
        let first = at(snap("x", &ready_llm(), NodeLiveness::Up), "https://10.0.0.9:8443");
        f.apply_bus(&first, s(0));
        let c =
            f.probe_result("x", "https://10.0.0.9:8443", s(0), s(10), Ok(report("x", &["llm"])));
        assert_eq!(c, Change::Changed);
        assert_eq!(f.entries(s(10), P)[0].view.health, Health::Ready);
        let moved = at(first.clone(), "https://203.0.113.7:443");
        assert!(matches!(f.apply_bus(&moved, s(20)), Change::Target { .. }));
        let e = &f.entries(s(20), P)[0];
        assert_eq!(e.view.health, Health::Unhealthy, "served at a URL nobody verified");
        // A late answer from the old URL does not verify the new one.
        let late = f.probe_result("x", "https://10.0.0.9:8443", s(5), s(30), Ok(report("x", &[])));
        assert_eq!(late, Change::None);
        assert_eq!(f.entries(s(30), P)[0].view.health, Health::Unhealthy);
    }

    #[test]
    fn announced_nodes_are_capped() {
        let policy = AnnouncePolicy { max_nodes: 3, ..LAB };
        let mut f = fleet_with("a").with_policy(policy);
        for i in 0..10 {
            let n = at(snap(&format!("n{i}"), &[], NodeLiveness::Up), "http://10.0.0.1:1");
            f.apply_bus(&n, s(i));
        }
        assert_eq!((f.len(), f.announced()), (4, 3), "the configured node and three announced");
        assert_eq!(f.refusals().get(Refusal::OverCap), 7);
        // A held one still updates.
        let n0 = at(snap("n0", &ready_llm(), NodeLiveness::Up), "http://10.0.0.1:1");
        assert_eq!(f.apply_bus(&n0, s(20)), Change::Changed);
    }

    #[test]
    fn bus_only_nodes_are_forgotten_after_long_silence() {
        let mut f = Fleet::new(HealthParams::default(), s(60_000)).with_policy(LAB);
        let c = f.apply_bus(&snap("x", &[], NodeLiveness::Up), s(0));
        assert!(matches!(c, Change::Target { .. }));
        f.apply_bus(&snap("x", &[], NodeLiveness::Down), s(1000));
        assert!(f.forget(s(30_000)).is_empty());
        assert_eq!(f.forget(s(61_001)), vec!["x".to_owned()]);
        assert!(f.is_empty());
    }
}
