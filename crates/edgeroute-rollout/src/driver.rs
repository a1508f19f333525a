//! The rollout driver: performs the [`Rollout`] machine's actions on a fleet, feeds back their
//! results and each step's figures, and keeps the whole state in a store (the bus's KV) after
//! every change, so `edgeroute rollout` can be stopped and started again where it was.
//!
//! The fleet is behind [`Fleet`] (the real one is [`crate::http::HttpFleet`]: discovery's
//! topology, the nodes' admin API and metrics, the policy pushed on the bus) and the store
//! behind [`StateStore`], so the driver runs against a fake in tests.
//!
//! How the machine's actions become fleet changes:
//! - **Load** in a region: the new version goes on `nodes_per_region` nodes — spare nodes
//!   (holding no version of the model) first; when there are not enough, nodes serving the old
//!   version give it up (unloaded through the drain path) and load the new one, but a region
//!   always keeps at least one node on the old version. A node holds one version of a model.
//! - **Weights**: one policy document, the operator's (given at start) with a rule per region
//!   of the plan placed first (`rollout-<region>`: the model, the client's region, the version
//!   split), pushed and applied by every replica. When the rollout finishes, the last
//!   document is the operator's with the new version as the model's default.
//! - **Unload** of the new version (a rollback): off the nodes that loaded it; nodes that gave
//!   up the old version for it load the old one again. **Unload** of the old version (every
//!   wave passed): the final policy first, then each old node is drained and loads the new
//!   version, so the region keeps its capacity.
//! - **Figures** per region and step: each node's `/metrics` counters since the step began
//!   (chat requests, 5xx answers, the TTFT histogram), summed over the nodes of each version
//!   (nodes are taken as serving this model only), and the correctness probes of the plan,
//!   sent to every node of the new version at every poll.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gate::VersionStats;
use crate::machine::{Action, Event, Input, Phase, Rollout};
use crate::plan::Plan;

/// One node as the fleet reports it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FleetNode {
    pub id: String,
    pub region: String,
    pub url: String,
    /// Serving (not draining, not unhealthy).
    pub healthy: bool,
    /// model → (version, state): every model the node holds in any state.
    pub models: BTreeMap<String, (Option<String>, String)>,
}

impl FleetNode {
    fn version_of(&self, model: &str) -> Option<&str> {
        self.models.get(model).and_then(|(v, _)| v.as_deref())
    }

    fn holds(&self, model: &str) -> bool {
        self.models.contains_key(model)
    }
}

/// A node's cumulative counters (`/metrics`): chat requests answered, of which 5xx, and the
/// TTFT histogram (upper bound in seconds, cumulative count); and the TTFT p99 of its recent
/// window (`/health`, exact over its samples), which the gate prefers: the histogram's
/// buckets (10, 25, 50, 100 ms…) are too coarse to tell 10 % apart.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub requests: u64,
    pub errors: u64,
    pub ttft_buckets: Vec<(f64, u64)>,
    #[serde(default)]
    pub recent_ttft_p99_ms: Option<f64>,
}

impl Counters {
    /// What happened since `before` (a restarted node's counters start again: all of now).
    pub fn since(&self, before: &Counters) -> Counters {
        if self.requests < before.requests {
            return self.clone();
        }
        let buckets = self
            .ttft_buckets
            .iter()
            .map(|(le, n)| {
                let was = before.ttft_buckets.iter().find(|(b, _)| b == le).map_or(0, |(_, c)| *c);
                (*le, n.saturating_sub(was))
            })
            .collect();
        Counters {
            requests: self.requests - before.requests,
            errors: self.errors.saturating_sub(before.errors),
            ttft_buckets: buckets,
            recent_ttft_p99_ms: self.recent_ttft_p99_ms,
        }
    }

    fn add(&mut self, other: &Counters) {
        // A version's p99 over several nodes: the slowest node's (conservative on both sides).
        self.recent_ttft_p99_ms = match (self.recent_ttft_p99_ms, other.recent_ttft_p99_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.requests += other.requests;
        self.errors += other.errors;
        for (le, n) in &other.ttft_buckets {
            match self.ttft_buckets.iter_mut().find(|(b, _)| b == le) {
                Some((_, c)) => *c += n,
                None => self.ttft_buckets.push((*le, *n)),
            }
        }
        self.ttft_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// The TTFT p99 in ms, interpolated inside its bucket as Prometheus's
    /// `histogram_quantile` does; `None` without samples.
    pub fn ttft_p99_ms(&self) -> Option<f64> {
        let total = self.ttft_buckets.iter().map(|(_, n)| *n).max()?;
        if total == 0 {
            return None;
        }
        let rank = 0.99 * total as f64;
        let mut lower = (0.0, 0u64);
        for (le, n) in &self.ttft_buckets {
            if (*n as f64) >= rank {
                if *le >= f64::MAX {
                    return Some(lower.0 * 1000.0);
                }
                let span = (*n - lower.1) as f64;
                let frac = if span > 0.0 { (rank - lower.1 as f64) / span } else { 1.0 };
                return Some((lower.0 + (le - lower.0) * frac) * 1000.0);
            }
            lower = (*le, *n);
        }
        Some(lower.0 * 1000.0)
    }
}

/// Parses the counters the driver needs from a node's Prometheus/OpenMetrics text.
pub fn parse_metrics(text: &str) -> Counters {
    let mut c = Counters::default();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name_labels, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.trim().parse::<f64>() else { continue };
        let (name, labels) = match name_labels.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (name_labels, ""),
        };
        let label = |key: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        match name {
            "edgeroute_node_requests_total" if label("route").as_deref() == Some("chat") => {
                let n = value as u64;
                c.requests += n;
                if label("status").and_then(|s| s.parse::<u16>().ok()).is_some_and(|s| s >= 500) {
                    c.errors += n;
                }
            }
            // `+Inf` kept as f64::MAX: the state is JSON, which has no infinity.
            "edgeroute_node_ttft_seconds_bucket" => {
                if let Some(le) = label("le") {
                    let le = if le == "+Inf" { f64::MAX } else { le.parse().unwrap_or(f64::NAN) };
                    if !le.is_nan() {
                        c.ttft_buckets.push((le, value as u64));
                    }
                }
            }
            _ => {}
        }
    }
    c.ttft_buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    c
}

/// The fleet as the driver sees it.
pub trait Fleet {
    /// Every node, with the models it holds.
    fn topology(&self) -> impl Future<Output = Result<Vec<FleetNode>, String>> + Send;
    /// `POST /v1/models/load` with `body`, then waits (at most `timeout`) until the model is
    /// ready on the node; `Err` says why not (refused, failed, too slow).
    fn load(
        &self,
        node: &FleetNode,
        body: serde_json::Value,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// `POST /v1/models/unload` (a drain), then waits until the node no longer holds it.
    fn unload(
        &self,
        node: &FleetNode,
        model: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Puts a policy document in force: `Ok` once every replica applied it.
    fn push_policy(&self, text: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// The node's counters.
    fn counters(&self, node: &FleetNode) -> impl Future<Output = Result<Counters, String>> + Send;
    /// A chat completion of `prompt` at temperature 0 on the node: the answer's text.
    fn ask(
        &self,
        node: &FleetNode,
        model: &str,
        prompt: &str,
        max_tokens: u32,
    ) -> impl Future<Output = Result<String, String>> + Send;
}

/// Why a state could not be saved.
#[derive(Debug, Clone, PartialEq)]
pub enum SaveError {
    /// The stored revision moved: another driver runs this rollout.
    Conflict(String),
    /// The store cannot be reached now (tried again).
    Unavailable(String),
}

/// Where the driver keeps its state, compare-and-set on a revision.
pub trait StateStore {
    fn load(&self) -> impl Future<Output = Result<Option<(u64, Vec<u8>)>, String>> + Send;
    /// Writes if the stored revision is still `expected`.
    fn save(
        &self,
        bytes: &[u8],
        expected: Option<u64>,
    ) -> impl Future<Output = Result<u64, SaveError>> + Send;
    /// The latest abort request (`edgeroute rollout abort`): its revision and reason.
    fn abort_requested(&self) -> impl Future<Output = Option<(u64, String)>> + Send;
}

/// Everything the driver keeps: the machine and what it did to the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub machine: Rollout,
    /// The operator's policy document the rollout's rules are added to.
    pub base_policy: String,
    /// Policy documents pushed so far (names each one's version).
    pub pushes: u64,
    /// Per region, the nodes the rollout put the new version on.
    pub new_nodes: BTreeMap<String, BTreeSet<String>>,
    /// Of those, the nodes that gave up the old version for it (a rollback restores them).
    pub converted: BTreeMap<String, BTreeSet<String>>,
    /// Each node's counters when the current step began.
    pub baseline: BTreeMap<String, Counters>,
    /// The (wave, step) `baseline` belongs to.
    pub baseline_of: Option<(usize, usize)>,
    /// Correctness-probe failures per region in the current step.
    pub probe_failures: BTreeMap<String, u64>,
    /// Abort requests up to this revision are not for this rollout (older, or handled).
    pub abort_floor: u64,
    /// Wall clock (Unix ms) of the last save, for `edgeroute rollout status`.
    pub updated_unix_ms: u64,
}

impl State {
    pub fn new(plan: Plan, base_policy: String) -> State {
        State {
            machine: Rollout::new(plan),
            base_policy,
            pushes: 0,
            new_nodes: BTreeMap::new(),
            converted: BTreeMap::new(),
            baseline: BTreeMap::new(),
            baseline_of: None,
            probe_failures: BTreeMap::new(),
            abort_floor: 0,
            updated_unix_ms: 0,
        }
    }

    /// A one-screen account for `edgeroute rollout status`.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let m = &self.machine;
        let p = m.plan();
        let mut out = format!("rollout of {} {} → {}: {}\n", p.model, p.from, p.to, phase_name(m));
        for (i, wave) in p.waves.iter().enumerate() {
            let mark = if m.is_over() || i != m.wave() { " " } else { ">" };
            let regions: Vec<String> = wave
                .iter()
                .map(|r| {
                    let share = m.new_share().get(r).copied().unwrap_or(0);
                    let nodes = self.new_nodes.get(r).map_or(0, BTreeSet::len);
                    format!("{r} {} {share} % ({nodes} node(s) on {})", p.to, p.to)
                })
                .collect();
            let _ = writeln!(out, "{mark} wave {}: {}", i + 1, regions.join("; "));
        }
        let _ = writeln!(out, "validated: {}", m.validated());
        for e in m.log().iter().rev().take(12).collect::<Vec<_>>().into_iter().rev() {
            let _ = writeln!(out, "  [{}] {}", e.at_ms, e.text);
        }
        out
    }
}

/// The phase in a word or three.
pub fn phase_name(m: &Rollout) -> String {
    match m.phase() {
        Phase::Ready => "not started".into(),
        Phase::Loading { .. } => format!("wave {}: loading", m.wave() + 1),
        Phase::Applying { step, .. } => {
            format!("wave {} step {}: applying", m.wave() + 1, step + 1)
        }
        Phase::Soaking { step, .. } => format!("wave {} step {}: soaking", m.wave() + 1, step + 1),
        Phase::Finishing { .. } => "finishing: retiring the old version".into(),
        Phase::RollingBack { reason, .. } => format!("rolling back ({reason})"),
        Phase::Finished => "finished".into(),
        Phase::RolledBack { reason } => format!("rolled back: {reason}"),
    }
}

/// The policy document that gives each region of the plan its share of the new version
/// (`shares`), built on the operator's `base`; `finished`: the operator's with the new version
/// as the model's default, and no rollout rules. Checked by the policy parser (a registry that
/// does not list both versions is refused here, before anything is pushed).
pub fn compose_policy(
    base: &str,
    plan: &Plan,
    shares: &BTreeMap<String, u8>,
    seq: u64,
    finished: bool,
) -> Result<String, String> {
    use toml::Value;
    let mut doc: toml::Table =
        toml::from_str(base).map_err(|e| format!("the base policy is not TOML: {e}"))?;
    let version = doc.get("version").and_then(Value::as_str).unwrap_or("policy").to_owned();
    doc.insert("version".into(), Value::String(format!("{version}.rollout{seq}")));
    if finished {
        let models = doc.get_mut("models").and_then(Value::as_array_mut);
        let entry = models.and_then(|ms| {
            ms.iter_mut().find(|m| m.get("name").and_then(Value::as_str) == Some(&plan.model))
        });
        let Some(Value::Table(entry)) = entry else {
            return Err(format!("the base policy's registry has no model `{}`", plan.model));
        };
        entry.insert("default_version".into(), Value::String(plan.to.clone()));
    } else {
        let mut rules: Vec<Value> = Vec::new();
        for region in plan.regions() {
            let share = shares.get(region).copied().unwrap_or(0);
            let mut versions = toml::Table::new();
            if share < 100 {
                versions.insert(plan.from.clone(), Value::Integer(i64::from(100 - share)));
            }
            if share > 0 {
                versions.insert(plan.to.clone(), Value::Integer(i64::from(share)));
            }
            let mut matcher = toml::Table::new();
            matcher.insert("models".into(), Value::Array(vec![Value::String(plan.model.clone())]));
            matcher.insert(
                "client_regions".into(),
                Value::Array(vec![Value::String(region.to_owned())]),
            );
            let mut rule = toml::Table::new();
            rule.insert("id".into(), Value::String(format!("rollout-{region}")));
            rule.insert("match".into(), Value::Table(matcher));
            rule.insert("versions".into(), Value::Table(versions));
            rule.insert("sticky".into(), Value::String("session".into()));
            rules.push(Value::Table(rule));
        }
        if let Some(Value::Array(existing)) = doc.remove("rules") {
            rules.extend(existing);
        }
        doc.insert("rules".into(), Value::Array(rules));
    }
    let text = toml::to_string(&doc).map_err(|e| format!("writing the policy: {e}"))?;
    let policy = edgeroute_policy::Policy::parse(&text)
        .map_err(|e| format!("the rollout's policy would be refused: {e}"))?;
    let Some(model) = policy.registry().model(&plan.model) else {
        return Err(format!("the policy's registry has no model `{}`", plan.model));
    };
    for v in [&plan.from, &plan.to] {
        if model.version_index(v).is_none() {
            return Err(format!(
                "the policy's registry does not list version `{v}` of `{}` ([[models.versions]])",
                plan.model
            ));
        }
    }
    Ok(text)
}

/// Saves tried before the driver gives up on an unreachable store.
const SAVE_TRIES: u32 = 60;

/// How the driver runs.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Figures, probes, timeouts and abort requests are looked at this often.
    pub poll: Duration,
    /// A load or an unload on one node may take this long.
    pub node_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions { poll: Duration::from_secs(5), node_timeout: Duration::from_secs(600) }
    }
}

/// Why the driver stopped without the rollout being over.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("rollout state: {0}")]
    Store(String),
    #[error("another driver holds this rollout (its state changed under us): {0}")]
    Lost(String),
    #[error("{0}")]
    Fleet(String),
}

/// The driver.
pub struct Driver<F, S> {
    fleet: F,
    store: S,
    state: State,
    revision: Option<u64>,
    opts: DriverOptions,
    /// Events already reported through `on_event`.
    reported: usize,
}

impl<F: Fleet + Sync, S: StateStore + Sync> Driver<F, S> {
    /// Resumes the stored rollout, or starts `fresh` when none is stored. A stored rollout of
    /// another plan is refused (the operator must finish or abort it first).
    pub async fn open(
        fleet: F,
        store: S,
        fresh: Option<State>,
        opts: DriverOptions,
    ) -> Result<Self, DriverError> {
        let stored = store.load().await.map_err(DriverError::Store)?;
        let (state, revision) = match (stored, fresh) {
            (Some((rev, bytes)), fresh) => {
                let state: State = serde_json::from_slice(&bytes)
                    .map_err(|e| DriverError::Store(format!("stored state unreadable: {e}")))?;
                if let Some(f) = fresh
                    && f.machine.plan() != state.machine.plan()
                    && !state.machine.is_over()
                {
                    return Err(DriverError::Store(format!(
                        "a rollout of {} ({} → {}) is in progress with another plan: \
                         let it finish or abort it first",
                        state.machine.plan().model,
                        state.machine.plan().from,
                        state.machine.plan().to
                    )));
                }
                (state, Some(rev))
            }
            (None, Some(f)) => (f, None),
            (None, None) => return Err(DriverError::Store("no rollout stored".into())),
        };
        let reported = state.machine.log().len();
        Ok(Driver { fleet, store, state, revision, opts, reported })
    }

    /// Restarts a stored rollout that is over with `fresh` (a new plan).
    pub fn replace_finished(&mut self, fresh: State) -> bool {
        if self.state.machine.is_over() {
            self.state = fresh;
            self.reported = 0;
            true
        } else {
            false
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Runs until the rollout is over; `now_ms` is the clock; `on_event` sees each new line
    /// of the history. Returns the final state.
    pub async fn run(
        &mut self,
        now_ms: impl Fn() -> u64,
        on_event: &mut (dyn FnMut(&Event) + Send),
    ) -> Result<State, DriverError> {
        if self.state.machine.phase() == &Phase::Ready {
            self.state.abort_floor = self.store.abort_requested().await.map_or(0, |(r, _)| r);
            let first = self.state.machine.start(now_ms());
            self.save(&now_ms, on_event).await?;
            self.perform(first, &now_ms, on_event).await?;
        }
        loop {
            if self.state.machine.is_over() {
                self.save(&now_ms, on_event).await?;
                return Ok(self.state.clone());
            }
            if let Some((rev, reason)) = self.store.abort_requested().await
                && rev > self.state.abort_floor
            {
                self.state.abort_floor = rev;
                let out = self.state.machine.handle(Input::Abort { reason }, now_ms());
                self.perform(out, &now_ms, on_event).await?;
            }
            // Whatever the phase still waits on (after a restart, or a push that failed).
            let pending = self.state.machine.pending_actions();
            self.perform(pending, &now_ms, on_event).await?;
            if matches!(self.state.machine.phase(), Phase::Soaking { .. }) {
                self.figures(&now_ms, on_event).await?;
            }
            let out = self.state.machine.tick(now_ms());
            self.perform(out, &now_ms, on_event).await?;
            self.save(&now_ms, on_event).await?;
            if !self.state.machine.is_over() {
                tokio::time::sleep(self.opts.poll).await;
            }
        }
    }

    async fn save(
        &mut self,
        now_ms: &impl Fn() -> u64,
        on_event: &mut (dyn FnMut(&Event) + Send),
    ) -> Result<(), DriverError> {
        let log = self.state.machine.log();
        for e in &log[self.reported.min(log.len())..] {
            tracing::info!(model = %self.state.machine.plan().model, "{}", e.text);
            on_event(e);
        }
        self.reported = log.len();
        self.state.updated_unix_ms = now_ms();
        let bytes = serde_json::to_vec(&self.state)
            .map_err(|e| DriverError::Store(format!("encoding the state: {e}")))?;
        // The store unreachable (the bus restarting): the rollout waits, for a while.
        let mut tries = 0;
        loop {
            match self.store.save(&bytes, self.revision).await {
                Ok(rev) => {
                    self.revision = Some(rev);
                    return Ok(());
                }
                Err(SaveError::Conflict(e)) => return Err(DriverError::Lost(e)),
                Err(SaveError::Unavailable(e)) if tries < SAVE_TRIES => {
                    tries += 1;
                    tracing::warn!("saving the rollout state failed (try {tries}): {e}");
                    tokio::time::sleep(self.opts.poll.max(Duration::from_millis(200))).await;
                }
                Err(SaveError::Unavailable(e)) => return Err(DriverError::Store(e)),
            }
        }
    }

    /// Performs `actions` and everything they lead to, saving after each batch.
    async fn perform(
        &mut self,
        actions: Vec<Action>,
        now_ms: &impl Fn() -> u64,
        on_event: &mut (dyn FnMut(&Event) + Send),
    ) -> Result<(), DriverError> {
        let mut queue = actions;
        while !queue.is_empty() {
            let batch = std::mem::take(&mut queue);
            let mut inputs = Vec::new();
            let mut weights_for = Vec::new();
            for action in batch {
                match action {
                    Action::Weights { region, .. } => weights_for.push(region),
                    Action::Load { region, .. } => {
                        let result = self.load_region(&region).await;
                        if let Err(e) = &result {
                            tracing::warn!(%region, "load failed: {e}");
                        }
                        inputs.push(Input::Loaded { region, result });
                    }
                    Action::Unload { region, version } => {
                        match self.unload_region(&region, &version).await {
                            Ok(()) => inputs.push(Input::Unloaded { region }),
                            // Tried again at the next poll (the phase still waits on it).
                            Err(e) => tracing::warn!(%region, "unloading {version} failed: {e}"),
                        }
                    }
                }
            }
            if !weights_for.is_empty() {
                match self.push_weights(false).await {
                    Ok(()) => inputs.extend(
                        weights_for.into_iter().map(|region| Input::WeightsApplied { region }),
                    ),
                    Err(e) => tracing::warn!("pushing the policy failed (tried again): {e}"),
                }
            }
            for input in inputs {
                let out = self.state.machine.handle(input, now_ms());
                queue.extend(out);
            }
            self.begin_step_if_new().await;
            self.save(now_ms, on_event).await?;
        }
        Ok(())
    }

    async fn push_weights(&mut self, finished: bool) -> Result<(), String> {
        let s = &self.state;
        let text = compose_policy(
            &s.base_policy,
            s.machine.plan(),
            s.machine.new_share(),
            s.pushes + 1,
            finished,
        )?;
        self.fleet.push_policy(&text).await?;
        self.state.pushes += 1;
        Ok(())
    }

    fn load_body(&self, version: &str) -> Result<serde_json::Value, String> {
        let plan = self.state.machine.plan();
        let table = plan.load.get(version).ok_or_else(|| {
            format!("the plan has no [load.{version}]: cannot load {version} on a node")
        })?;
        let mut body = serde_json::to_value(table).map_err(|e| e.to_string())?;
        body["id"] = plan.model.clone().into();
        body["version"] = version.into();
        Ok(body)
    }

    fn region_nodes(topology: &[FleetNode], region: &str) -> Vec<FleetNode> {
        topology.iter().filter(|n| n.region == region).cloned().collect()
    }

    /// Puts the new version on the region's share of nodes (see the module's doc).
    async fn load_region(&mut self, region: &str) -> Result<(), String> {
        let plan = self.state.machine.plan().clone();
        let topology = self.fleet.topology().await?;
        let nodes = Self::region_nodes(&topology, region);
        let mut have: BTreeSet<String> =
            self.state.new_nodes.get(region).cloned().unwrap_or_default();
        have.extend(
            nodes
                .iter()
                .filter(|n| n.version_of(&plan.model) == Some(&plan.to))
                .map(|n| n.id.clone()),
        );
        let want = plan.nodes_per_region as usize;
        let spare: Vec<&FleetNode> = nodes
            .iter()
            .filter(|n| n.healthy && !n.holds(&plan.model) && !have.contains(&n.id))
            .collect();
        let old: Vec<&FleetNode> = nodes
            .iter()
            .filter(|n| n.healthy && n.version_of(&plan.model) == Some(&plan.from))
            .collect();
        let missing = want.saturating_sub(have.len());
        let from_spare = missing.min(spare.len());
        let from_old = missing - from_spare;
        if from_old > 0 && old.len() <= from_old {
            return Err(format!(
                "{region}: {} node(s) needed for {}, {} spare, {} on {} (one must keep it)",
                want,
                plan.to,
                spare.len(),
                old.len(),
                plan.from
            ));
        }
        let body_to = self.load_body(&plan.to)?;
        let timeout = self.opts.node_timeout;
        // Nodes loaded before (a resumed rollout): make sure they finished.
        for id in have.clone() {
            if let Some(n) = nodes.iter().find(|n| n.id == id) {
                self.fleet.load(n, body_to.clone(), timeout).await?;
            }
        }
        for n in spare.into_iter().take(from_spare) {
            self.state.new_nodes.entry(region.to_owned()).or_default().insert(n.id.clone());
            self.fleet.load(n, body_to.clone(), timeout).await?;
        }
        for n in old.into_iter().take(from_old) {
            self.state.converted.entry(region.to_owned()).or_default().insert(n.id.clone());
            self.state.new_nodes.entry(region.to_owned()).or_default().insert(n.id.clone());
            self.fleet.unload(n, &plan.model, timeout).await?;
            self.fleet.load(n, body_to.clone(), timeout).await?;
        }
        Ok(())
    }

    /// Unloads `version` in the region (see the module's doc).
    async fn unload_region(&mut self, region: &str, version: &str) -> Result<(), String> {
        let plan = self.state.machine.plan().clone();
        let topology = self.fleet.topology().await?;
        let nodes = Self::region_nodes(&topology, region);
        let timeout = self.opts.node_timeout;
        if version == plan.to {
            // A rollback: the new version off its nodes, the old one back where it was.
            let ours = self.state.new_nodes.get(region).cloned().unwrap_or_default();
            for id in ours {
                let Some(n) = nodes.iter().find(|n| n.id == id) else {
                    // The node is gone from the fleet: nothing to unload there.
                    self.forget(region, &id);
                    continue;
                };
                if n.version_of(&plan.model) == Some(&plan.to) {
                    self.fleet.unload(n, &plan.model, timeout).await?;
                }
                if self.state.converted.get(region).is_some_and(|c| c.contains(&id)) {
                    let body = self.load_body(&plan.from)?;
                    self.fleet.load(n, body, timeout).await?;
                }
                self.forget(region, &id);
            }
            return Ok(());
        }
        // Every wave passed: the final policy (the new version the default, no split) first,
        // then each old node drains and takes the new version.
        if self.state.machine.phase() != &Phase::Finished {
            self.push_weights(true).await?;
        }
        let body_to = self.load_body(&plan.to)?;
        for n in nodes.iter().filter(|n| n.version_of(&plan.model) == Some(&plan.from)) {
            self.fleet.unload(n, &plan.model, timeout).await?;
            self.state.new_nodes.entry(region.to_owned()).or_default().insert(n.id.clone());
            self.fleet.load(n, body_to.clone(), timeout).await?;
        }
        Ok(())
    }

    fn forget(&mut self, region: &str, id: &str) {
        if let Some(s) = self.state.new_nodes.get_mut(region) {
            s.remove(id);
        }
        if let Some(s) = self.state.converted.get_mut(region) {
            s.remove(id);
        }
    }

    /// When a step's soak has just begun: every node's counters now, probe failures zeroed.
    async fn begin_step_if_new(&mut self) {
        let Phase::Soaking { step, .. } = self.state.machine.phase() else { return };
        let key = (self.state.machine.wave(), *step);
        if self.state.baseline_of == Some(key) {
            return;
        }
        self.state.baseline_of = Some(key);
        self.state.baseline.clear();
        self.state.probe_failures.clear();
        let Ok(topology) = self.fleet.topology().await else { return };
        let model = self.state.machine.plan().model.clone();
        for n in topology.iter().filter(|n| n.holds(&model)) {
            if let Ok(c) = self.fleet.counters(n).await {
                self.state.baseline.insert(n.id.clone(), c);
            }
        }
    }

    /// Each region of the wave: both versions' figures since the step began, probes included.
    async fn figures(
        &mut self,
        now_ms: &impl Fn() -> u64,
        on_event: &mut (dyn FnMut(&Event) + Send),
    ) -> Result<(), DriverError> {
        let plan = self.state.machine.plan().clone();
        let Some(wave) = plan.waves.get(self.state.machine.wave()) else { return Ok(()) };
        let topology = match self.fleet.topology().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("topology unavailable: {e}");
                return Ok(());
            }
        };
        for region in wave {
            let nodes = Self::region_nodes(&topology, region);
            let new_ids = self.state.new_nodes.get(region).cloned().unwrap_or_default();
            let new_nodes: Vec<&FleetNode> =
                nodes.iter().filter(|n| new_ids.contains(&n.id)).collect();
            let old_nodes: Vec<&FleetNode> = nodes
                .iter()
                .filter(|n| {
                    !new_ids.contains(&n.id) && n.version_of(&plan.model) == Some(&plan.from)
                })
                .collect();
            let mut sums = [Counters::default(), Counters::default()];
            for (i, group) in [&old_nodes, &new_nodes].into_iter().enumerate() {
                for n in group {
                    let Ok(now) = self.fleet.counters(n).await else { continue };
                    let delta = match self.state.baseline.get(&n.id) {
                        Some(b) => now.since(b),
                        None => {
                            self.state.baseline.insert(n.id.clone(), now.clone());
                            Counters::default()
                        }
                    };
                    sums[i].add(&delta);
                }
            }
            let failures = self.probe(&plan, &old_nodes, &new_nodes).await;
            *self.state.probe_failures.entry(region.clone()).or_default() += failures;
            let stats = |c: &Counters, correctness_failures: u64| VersionStats {
                requests: c.requests,
                errors: c.errors,
                ttft_p99_ms: c.recent_ttft_p99_ms.or_else(|| c.ttft_p99_ms()),
                correctness_failures,
            };
            let probe_failures = self.state.probe_failures.get(region).copied().unwrap_or(0);
            let input = Input::Figures {
                region: region.clone(),
                old: stats(&sums[0], 0),
                new: stats(&sums[1], probe_failures),
            };
            let out = self.state.machine.handle(input, now_ms());
            self.perform(out, now_ms, on_event).await?;
            if !matches!(self.state.machine.phase(), Phase::Soaking { .. }) {
                break; // the step passed or failed: the next poll starts afresh
            }
        }
        Ok(())
    }

    /// The plan's probes against every node of the new version: the failures.
    async fn probe(&self, plan: &Plan, old: &[&FleetNode], new: &[&FleetNode]) -> u64 {
        let mut failures = 0;
        for p in &plan.probes {
            let reference = match (p.same_as_old, old.first()) {
                (true, Some(o)) => {
                    match self.fleet.ask(o, &plan.model, &p.prompt, p.max_tokens).await {
                        Ok(text) => Some(text),
                        Err(e) => {
                            // Nothing to compare with: not judged this time.
                            tracing::warn!(node = %o.id, "correctness probe of the old version: {e}");
                            continue;
                        }
                    }
                }
                (true, None) => continue,
                (false, _) => None,
            };
            for n in new {
                let ok = match self.fleet.ask(n, &plan.model, &p.prompt, p.max_tokens).await {
                    Ok(text) => match (&p.contains, &reference) {
                        (Some(needle), _) => text.contains(needle.as_str()),
                        (None, Some(r)) => text.trim() == r.trim(),
                        (None, None) => true,
                    },
                    Err(e) => {
                        tracing::warn!(node = %n.id, "correctness probe failed: {e}");
                        false
                    }
                };
                if !ok {
                    tracing::warn!(node = %n.id, prompt = %p.prompt, "correctness probe: wrong answer");
                    failures += 1;
                }
            }
        }
        failures
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    const METRICS: &str = "\
# TYPE edgeroute_node_requests counter
edgeroute_node_requests_total{route=\"chat\",status=\"200\"} 90
edgeroute_node_requests_total{route=\"chat\",status=\"502\"} 10
edgeroute_node_requests_total{route=\"models\",status=\"200\"} 5
edgeroute_node_ttft_seconds_bucket{le=\"0.05\"} 50
edgeroute_node_ttft_seconds_bucket{le=\"0.1\"} 98
edgeroute_node_ttft_seconds_bucket{le=\"0.2\"} 100
edgeroute_node_ttft_seconds_bucket{le=\"+Inf\"} 100
# EOF
";

    #[test]
    fn metrics_give_chat_requests_errors_and_a_ttft_p99() {
        let c = parse_metrics(METRICS);
        assert_eq!((c.requests, c.errors), (100, 10));
        // 99th of 100 lies halfway through the (0.1, 0.2] bucket.
        let p99 = c.ttft_p99_ms().unwrap();
        assert!((p99 - 150.0).abs() < 1e-6, "{p99}");
        let before = parse_metrics(&METRICS.replace("} 90", "} 40").replace("} 98", "} 48"));
        let d = c.since(&before);
        assert_eq!(d.requests, 50);
        assert!(parse_metrics("").ttft_p99_ms().is_none());
        // A restarted node (counters went back): everything it reports is new.
        assert_eq!(before.since(&c).requests, before.requests);
        // The state is JSON: the +Inf bucket must survive it.
        let back: Counters = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    fn plan() -> Plan {
        Plan::from_toml(
            r#"
model = "llama"
from = "v1"
to = "v2"
waves = [["tor"], ["mtl"], ["van"]]
[load.v2]
path = "/m/llama-v2"
"#,
        )
        .unwrap()
    }

    const BASE: &str = r#"
version = "p1"
[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"
[[rules]]
id = "ops"
match.tenants = ["ops-team"]
"#;

    #[test]
    fn the_rollouts_rules_come_first_with_each_regions_split() {
        let shares = BTreeMap::from([("tor".to_owned(), 25u8), ("mtl".to_owned(), 0)]);
        let text = compose_policy(BASE, &plan(), &shares, 3, false).unwrap();
        let p = edgeroute_policy::Policy::parse(&text).unwrap();
        assert_eq!(p.version(), "p1.rollout3");
        assert_eq!(
            p.rule_ids().collect::<Vec<_>>(),
            ["rollout-tor", "rollout-mtl", "rollout-van", "ops"]
        );
        let doc: toml::Table = toml::from_str(&text).unwrap();
        let rules = doc["rules"].as_array().unwrap();
        assert_eq!(rules[0]["versions"]["v1"].as_integer(), Some(75));
        assert_eq!(rules[0]["versions"]["v2"].as_integer(), Some(25));
        assert!(rules[1]["versions"].get("v2").is_none(), "0 % is no entry");
        // Finished: the operator's rules only, the new version the default.
        let text = compose_policy(BASE, &plan(), &shares, 4, true).unwrap();
        let p = edgeroute_policy::Policy::parse(&text).unwrap();
        assert_eq!(p.rule_ids().collect::<Vec<_>>(), ["ops"]);
        assert!(text.contains("default_version = \"v2\""), "{text}");
        // A registry without the new version is refused before anything is pushed.
        let e =
            compose_policy(&BASE.replace("id = \"v2\"", "id = \"v3\""), &plan(), &shares, 5, false)
                .unwrap_err();
        assert!(e.contains("refused"), "{e}");
        let no_split = BTreeMap::new();
        let e = compose_policy(
            &BASE.replace("id = \"v2\"", "id = \"v3\""),
            &plan(),
            &no_split,
            5,
            false,
        )
        .unwrap_err();
        assert!(e.contains("version `v2`"), "{e}");
    }
}
