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
        }
    }

    fn url(&self) -> Option<&str> {
        self.bus.as_ref().map(|b| b.snapshot.url.as_str()).or(self.configured_url.as_deref())
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
    pub phi: f64,
    /// Milliseconds since the last answered probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_probe_age_ms: Option<u64>,
    pub probes: ProbeStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus_liveness: Option<NodeLiveness>,
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
    /// A node appeared or its URL changed: (re)start probing it.
    Target { id: String, url: String },
}

/// Every node discovery knows.
#[derive(Debug, Clone)]
pub struct Fleet {
    nodes: BTreeMap<String, NodeRecord>,
    params: HealthParams,
    forget_after: Duration,
}

impl Fleet {
    pub fn new(params: HealthParams, forget_after: Duration) -> Self {
        Fleet { nodes: BTreeMap::new(), params, forget_after }
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
        rec.configured = true;
        rec.configured_url = Some(n.url.clone());
        rec.cost_per_1k = n.cost_per_1k;
        rec.dirty = true;
        match rec.url() {
            Some(url) => Change::Target { id: n.id.clone(), url: url.to_owned() },
            None => Change::Changed,
        }
    }

    /// Folds in a node's state as the bus holds it (after any snapshot or event).
    pub fn apply_bus(&mut self, snap: &NodeSnapshot, now: Duration) -> Change {
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
        match rec.url() {
            Some(url) if old_url.as_deref() != Some(url) => {
                Change::Target { id: snap.node_id.clone(), url: url.to_owned() }
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

    /// A probe sent at `sent` was answered at `now` with `health`.
    pub fn probe_ok(
        &mut self,
        id: &str,
        sent: Duration,
        now: Duration,
        health: NodeHealth,
    ) -> Change {
        let Some(rec) = self.nodes.get_mut(id) else { return Change::None };
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

    /// Nodes to probe: id and URL.
    pub fn targets(&self) -> Vec<(String, String)> {
        self.nodes.iter().filter_map(|(id, r)| Some((id.clone(), r.url()?.to_owned()))).collect()
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
    let models: BTreeSet<String> = model_states
        .iter()
        .filter(|(_, s)| **s == ModelState::Ready)
        .map(|(m, _)| m.clone())
        .collect();

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
            phi: if phi.is_finite() { phi } else { f64::MAX },
            last_probe_age_ms: rec.probes.last_ok.map(|t| now.saturating_sub(t).as_millis() as u64),
            probes: rec.probes.clone(),
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
                .map(|m| ModelHealth { id: (*m).into(), state: ModelState::Ready, gpu: None })
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
        }
    }

    /// A node from configuration at a placeholder URL.
    fn static_node(id: &str) -> StaticNode {
        StaticNode {
            id: id.into(),
            url: "http://127.0.0.1:1".into(),
            region: "tor".into(),
            cost_per_1k: None,
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

    #[test]
    fn bus_only_nodes_are_forgotten_after_long_silence() {
        let mut f = Fleet::new(HealthParams::default(), s(60_000));
        let c = f.apply_bus(&snap("x", &[], NodeLiveness::Up), s(0));
        assert!(matches!(c, Change::Target { .. }));
        f.apply_bus(&snap("x", &[], NodeLiveness::Down), s(1000));
        assert!(f.forget(s(30_000)).is_empty());
        assert_eq!(f.forget(s(61_001)), vec!["x".to_owned()]);
        assert!(f.is_empty());
    }
}
