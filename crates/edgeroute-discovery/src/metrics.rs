//! Prometheus metrics, named `edgeroute_discovery_*`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub health: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// `/v1/discover` answers by outcome: `ok`, `empty`, `bad_request`.
    pub discover: Family<OutcomeLabels, Counter>,
    /// Probes by outcome: `ok` or the failure kind.
    pub probes: Family<OutcomeLabels, Counter>,
    pub bus_updates: Counter,
    pub rebuilds: Counter,
    pub rebuild_seconds: Histogram,
    pub generation: Gauge,
    pub nodes: Family<HealthLabels, Gauge>,
    pub bus_connected: Gauge,
    /// Bus snapshots not believed, by reason (`crate::fleet::Refusal::label`).
    pub bus_refused: Family<ReasonLabels, Counter>,
    /// Probes of announced nodes skipped over `announced.max_probes_per_s`.
    pub probes_skipped: Counter,
    /// 1 for the routing policy version in force (no series without `[policy]`).
    pub policy_info: Family<VersionLabels, Gauge>,
    /// Policy texts considered after start, by result: `applied` or `refused`.
    pub policy_reloads: Family<ResultLabels, Counter>,
    /// Decisions the shadow policy (`[policy] shadow_file`) made alike (`same`) or not
    /// (`differs`), mirrored from the runtime's totals at each render.
    pub policy_shadow: Family<ResultLabels, Counter>,
    /// Correctness probes by judgement (`crate::correctness::Judgement::label`): `correct`,
    /// `wrong`, `error`, `unjudged`, `unavailable`.
    pub correctness_probes: Family<OutcomeLabels, Counter>,
    /// (node, model) pairs ejected by correctness probes now.
    pub correctness_ejected: Gauge,
    /// Round trip of answered correctness probes.
    pub correctness_seconds: Histogram,
    /// Correctness probes skipped over `correctness.max_probes_per_s`.
    pub correctness_skipped: Counter,
    shadow_totals: std::sync::Mutex<Option<std::sync::Arc<crate::routing::ShadowTotals>>>,
    probe_counts: std::sync::Mutex<Option<std::sync::Arc<crate::probe::ProbeCounts>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("edgeroute_discovery");
        let m = Metrics {
            discover: Family::default(),
            probes: Family::default(),
            bus_updates: Counter::default(),
            rebuilds: Counter::default(),
            rebuild_seconds: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
            generation: Gauge::default(),
            nodes: Family::default(),
            bus_connected: Gauge::default(),
            bus_refused: Family::default(),
            probes_skipped: Counter::default(),
            policy_info: Family::default(),
            policy_reloads: Family::default(),
            policy_shadow: Family::default(),
            correctness_probes: Family::default(),
            correctness_ejected: Gauge::default(),
            correctness_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            correctness_skipped: Counter::default(),
            shadow_totals: std::sync::Mutex::new(None),
            probe_counts: std::sync::Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register("discover_requests", "Discover answers by outcome", m.discover.clone());
        registry.register("probes", "Health probes by outcome", m.probes.clone());
        registry.register("bus_updates", "Topology bus updates applied", m.bus_updates.clone());
        registry.register("rebuilds", "Snapshot rebuilds", m.rebuilds.clone());
        registry.register(
            "rebuild_seconds",
            "Time to rebuild the ranked snapshot",
            m.rebuild_seconds.clone(),
        );
        registry.register("generation", "Current snapshot generation", m.generation.clone());
        registry.register("nodes", "Known nodes by health", m.nodes.clone());
        registry.register(
            "bus_connected",
            "1 when the topology bus is reachable",
            m.bus_connected.clone(),
        );
        registry.register(
            "bus_refused",
            "Topology bus snapshots not believed, by reason",
            m.bus_refused.clone(),
        );
        registry.register(
            "announced_probes_skipped",
            "Probes of announced nodes skipped over announced.max_probes_per_s",
            m.probes_skipped.clone(),
        );
        registry.register(
            "policy_info",
            "The routing policy version in force",
            m.policy_info.clone(),
        );
        registry.register(
            "policy_reloads",
            "Routing policy texts considered, by result",
            m.policy_reloads.clone(),
        );
        registry.register(
            "policy_shadow",
            "Decisions of the shadow policy compared with the live one, by result: same or differs",
            m.policy_shadow.clone(),
        );
        for j in crate::correctness::Judgement::ALL {
            let _ = m.correctness_probes.get_or_create(&OutcomeLabels { outcome: j.label() });
        }
        registry.register(
            "correctness_probes",
            "Correctness probes (a fixed prompt's answer checked) by judgement",
            m.correctness_probes.clone(),
        );
        registry.register(
            "correctness_ejected",
            "Node and model pairs ejected for wrong answers",
            m.correctness_ejected.clone(),
        );
        registry.register(
            "correctness_probe_seconds",
            "Round trip of answered correctness probes",
            m.correctness_seconds.clone(),
        );
        registry.register(
            "correctness_probes_skipped",
            "Correctness probes skipped over correctness.max_probes_per_s",
            m.correctness_skipped.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// `version` is in force (replacing `previous`, after start).
    pub fn policy_applied(&self, previous: Option<&str>, version: &str) {
        if let Some(p) = previous {
            self.policy_info.remove(&VersionLabels { version: p.to_owned() });
            self.policy_reloads.get_or_create(&ResultLabels { result: "applied" }).inc();
        }
        self.policy_info.get_or_create(&VersionLabels { version: version.to_owned() }).set(1);
    }

    pub fn policy_refused(&self) {
        self.policy_reloads.get_or_create(&ResultLabels { result: "refused" }).inc();
    }

    /// Mirrors the scheduler's skipped-probe count into `probes_skipped` at each render.
    pub fn watch_probe_counts(&self, counts: std::sync::Arc<crate::probe::ProbeCounts>) {
        if let Ok(mut c) = self.probe_counts.lock() {
            *c = Some(counts);
        }
    }

    /// Mirrors the shadow policy's comparison totals into `policy_shadow` at each render.
    pub fn watch_shadow(&self, totals: std::sync::Arc<crate::routing::ShadowTotals>) {
        for result in ["same", "differs"] {
            let _ = self.policy_shadow.get_or_create(&ResultLabels { result });
        }
        if let Ok(mut t) = self.shadow_totals.lock() {
            *t = Some(totals);
        }
    }

    pub fn render(&self) -> String {
        if let Ok(t) = self.shadow_totals.lock()
            && let Some(t) = t.as_ref()
        {
            use std::sync::atomic::Ordering::Relaxed;
            for (result, total) in
                [("same", t.same.load(Relaxed)), ("differs", t.differs.load(Relaxed))]
            {
                let c = self.policy_shadow.get_or_create(&ResultLabels { result });
                let shown = c.get();
                if total > shown {
                    c.inc_by(total - shown);
                }
            }
        }
        if let Ok(c) = self.probe_counts.lock()
            && let Some(c) = c.as_ref()
        {
            let skipped = c.skipped.load(std::sync::atomic::Ordering::Relaxed);
            let shown = self.probes_skipped.get();
            if skipped > shown {
                self.probes_skipped.inc_by(skipped - shown);
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
