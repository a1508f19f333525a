//! The routing policy inside discovery (`[policy]`): from a file (loaded at start, hot
//! reloaded) or from the topology bus (pushed by an admin, watched), and compiled against each
//! snapshot so a request only decides. A shadow policy (`[policy] shadow_file`) can decide
//! every request beside the live one, compared and counted, never answering.
//!
//! What is pure here: [`Jurisdictions::of`], [`facts`] (snapshot → `NodeFacts`), [`served`]
//! and [`Routing::offer`] (a new text, from the file or the bus → applied or refused; the same
//! path, the same refusal semantics), [`Routing::offer_shadow`], [`DecisionKey`] (what a
//! shadow comparison looks at). The file is read and the bus watched by the caller ([`read`]
//! at start, the tasks in `lib.rs` afterwards).
//!
//! `RoutingState` (round-robin and weighted counters) needs `&mut`: it lives behind one
//! `Mutex` per loaded policy, held only for the `decide` call (microseconds, no I/O, no
//! await). A reload starts a fresh state: the counters are indexed by the old policy's rules.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::{ArcSwap, ArcSwapOption};
use edgeroute_policy::{
    Decision, Fleet, Hardware, NodeFacts, Policy, PolicyError, Price, Registry, Request,
    RoutingState, Served, Warning,
};

use crate::snapshot::Snapshot;

/// Largest policy document read, bytes: a policy is a page of TOML, not a data set.
pub const MAX_POLICY_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("policy file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("policy file {path}: {len} bytes, over the {MAX_POLICY_BYTES}-byte limit")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("policy file {path}: {source}")]
    Parse { path: PathBuf, source: PolicyError },
}

/// What identifies one text of the file without reading it: a new mtime or length is a new
/// text to consider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub modified: Option<SystemTime>,
    pub len: u64,
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp { modified: meta.modified().ok(), len: meta.len() }
    }
}

/// Reads and parses the policy at start (blocking I/O: called once, before serving).
pub fn read(path: &Path) -> Result<(Policy, Stamp), LoadError> {
    let read_err = |source| LoadError::Read { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    let stamp = Stamp::of(&meta);
    if stamp.len > MAX_POLICY_BYTES {
        return Err(LoadError::TooLarge { path: path.to_owned(), len: stamp.len });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let policy = Policy::parse(&text)
        .map_err(|source| LoadError::Parse { path: path.to_owned(), source })?;
    Ok((policy, stamp))
}

/// Where each node's data is processed, from configuration (see `DiscoveryConfig::jurisdictions`).
#[derive(Debug, Clone, Default)]
pub struct Jurisdictions {
    pub regions: BTreeMap<String, String>,
    pub nodes: BTreeMap<String, String>,
}

impl Jurisdictions {
    /// The node's own entry, else its region's, else the policy's map of its region. `None`:
    /// unknown, which no jurisdiction claim allows.
    pub fn of<'a>(
        &'a self,
        node: &str,
        region: &str,
        policy: Option<&'a Policy>,
    ) -> Option<&'a str> {
        self.nodes
            .get(node)
            .or_else(|| self.regions.get(region))
            .map(String::as_str)
            .or_else(|| policy?.jurisdiction_of(region))
    }
}

/// A ready model id as the registry names it. The version the node reported for it (its
/// load's `version`, on the bus or in `/health`) wins; without one, `name:version` is that
/// version of a registered model and a registered `name` alone is its default version.
pub fn served(registry: &Registry, id: &str, reported: Option<&str>) -> Served {
    if let Some(v) = reported {
        // A version the registry does not list is kept as reported: no decision picks it.
        return Served::new(id, v);
    }
    if let Some(m) = registry.model(id) {
        let v = m.versions.get(m.default_version).map_or("", |v| &*v.id);
        return Served::new(id, v);
    }
    match id.rsplit_once(':') {
        Some((name, v)) if registry.model(name).is_some_and(|m| m.version_index(v).is_some()) => {
            Served::new(name, v)
        }
        // Unknown to the registry: kept as is, a decision never matches it.
        _ => Served::new(id, ""),
    }
}

/// A reported hardware class; a node that has not said (an older node, or not yet probed) is
/// taken as `gpu`, the fleet's class.
pub fn hardware(reported: Option<&str>) -> Hardware {
    match reported {
        Some("npu") => Hardware::Npu,
        Some("cpu") => Hardware::Cpu,
        _ => Hardware::Gpu,
    }
}

/// What the policy knows of each node, from the snapshot: the versions and hardware class the
/// node reported, its busiest GPU's utilisation at the last probe. Whether a price is
/// configured is not known: a price of 0 is taken as unknown (a price bound then drops the
/// node, as the policy does for any unknown figure).
pub fn facts(snap: &Snapshot, policy: &Policy, j: &Jurisdictions) -> Vec<NodeFacts> {
    snap.infos()
        .map(|n| NodeFacts {
            id: n.id.clone(),
            region: n.region.clone(),
            jurisdiction: j.of(&n.id, &n.region, None).map(str::to_owned),
            hardware: hardware(n.detail.hardware.as_deref()),
            available: !matches!(n.health, "unhealthy" | "draining"),
            models: n
                .models
                .iter()
                .map(|m| {
                    served(policy.registry(), m, n.detail.model_versions.get(m).map(String::as_str))
                })
                .collect(),
            ttft_p50_ms: n.ttft_p50_ms,
            ttft_p99_ms: n.ttft_p99_ms,
            queue: n.queue_depth,
            in_flight: n.in_flight,
            capacity: n.capacity,
            gpu_util: n.detail.gpu_util,
            error_rate: n.error_rate,
            price: (n.cost_per_1k > 0.0)
                .then_some(Price { input_per_1k: n.cost_per_1k, output_per_1k: n.cost_per_1k }),
        })
        .collect()
}

/// A policy in force, with its own routing counters.
#[derive(Debug)]
pub struct Loaded {
    pub policy: Policy,
    state: Mutex<RoutingState>,
}

impl Loaded {
    fn new(policy: Policy) -> Loaded {
        let state = Mutex::new(policy.new_state());
        Loaded { policy, state }
    }
}

/// The placeholder in force while a replica following the bus waits for its first policy: it
/// registers no model, so every request is scored as without a policy, and its version is not
/// reported (`Status::version` stays empty).
fn placeholder() -> Result<Policy, PolicyError> {
    Policy::parse("version = \"none\"")
}

/// The policy compiled against one snapshot: what a request reads (one atomic load).
#[derive(Debug)]
pub struct Compiled {
    pub loaded: Arc<Loaded>,
    pub fleet: Fleet,
    /// The snapshot `fleet` was built from: a decision's nodes are looked up here.
    pub snapshot: Arc<Snapshot>,
    /// The shadow policy compiled against the same snapshot, when one is loaded.
    shadow: Option<ShadowCompiled>,
}

impl Compiled {
    /// The live policy's decision, which is the answer. With a shadow policy loaded, the
    /// shadow decides the same request too (its own counters, no explain) and the two are
    /// compared and counted; nothing of the shadow's reaches the answer, and a shadow that
    /// panics is counted and never fails it.
    pub fn decide(&self, req: &Request<'_>, explain: bool) -> Decision {
        let d = {
            // The counters are plain integers: a panic elsewhere cannot leave them inconsistent.
            let mut state = self.loaded.state.lock().unwrap_or_else(|e| e.into_inner());
            self.loaded.policy.decide(req, &self.fleet, &mut state, explain)
        };
        if let Some(s) = &self.shadow {
            s.compare(req, &d, &self.fleet);
        }
        d
    }
}

/// A shadow policy compiled against a snapshot, and where its comparisons are counted.
#[derive(Debug)]
struct ShadowCompiled {
    loaded: Arc<Loaded>,
    fleet: Fleet,
    stats: Arc<ShadowStats>,
}

/// What two decisions are compared on: outcome, logical model, version, tier, pool, first node.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionKey {
    pub outcome: edgeroute_policy::Outcome,
    pub rule: Option<Arc<str>>,
    pub model: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
    pub tier: Option<Arc<str>>,
    pub pool: Option<Arc<str>>,
    pub first_node: Option<String>,
}

impl DecisionKey {
    pub fn of(d: &Decision, fleet: &Fleet) -> DecisionKey {
        DecisionKey {
            outcome: d.outcome,
            rule: d.rule.clone(),
            model: d.model.clone(),
            version: d.version.clone(),
            tier: d.tier.clone(),
            pool: d.pool.as_ref().map(|p| p.name.clone()),
            first_node: d.nodes.first().and_then(|p| fleet.node(p.node)).map(|n| n.id.clone()),
        }
    }

    /// Which of the compared fields differ (the rule alone is not a difference: two policies
    /// may name the same route differently).
    pub fn differences(&self, other: &DecisionKey) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.outcome != other.outcome {
            out.push("outcome");
        }
        if self.model != other.model {
            out.push("model");
        }
        if self.version != other.version {
            out.push("version");
        }
        if self.tier != other.tier || self.pool != other.pool {
            out.push("tier");
        }
        if self.first_node != other.first_node {
            out.push("first_node");
        }
        out
    }
}

/// One request the shadow decided differently, as `/health` shows it: the policy-level
/// route of each side (no tenant, session or node id: `/health` is open).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShadowExample {
    pub model: String,
    pub client_region: Option<String>,
    pub differs_in: Vec<&'static str>,
    pub live: String,
    pub shadow: String,
}

fn route_text(k: &DecisionKey) -> String {
    let s = |v: &Option<Arc<str>>| v.as_deref().unwrap_or("-").to_owned();
    format!(
        "{:?} rule={} {}:{} tier={}",
        k.outcome,
        s(&k.rule),
        s(&k.model),
        s(&k.version),
        k.pool.as_deref().or(k.tier.as_deref()).unwrap_or("-")
    )
}

/// The comparisons of one shadow text (reset when a new shadow text is loaded).
#[derive(Debug)]
pub struct ShadowStats {
    pub version: String,
    compared: AtomicU64,
    differed: AtomicU64,
    panicked: AtomicU64,
    max_examples: usize,
    examples: Mutex<VecDeque<ShadowExample>>,
    totals: Arc<ShadowTotals>,
}

/// Comparisons over every shadow text since start (what `/metrics` counts).
#[derive(Debug, Default)]
pub struct ShadowTotals {
    pub same: AtomicU64,
    pub differs: AtomicU64,
}

/// What `/health` reports of the shadow policy.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ShadowReport {
    pub file: String,
    pub version: String,
    pub compared: u64,
    pub differed: u64,
    /// Shadow decisions that failed (panicked): counted, never the answer's concern.
    pub failed: u64,
    pub last_refusal: Option<String>,
    pub examples: Vec<ShadowExample>,
}

impl ShadowStats {
    fn new(version: &str, max_examples: usize, totals: Arc<ShadowTotals>) -> ShadowStats {
        ShadowStats {
            version: version.to_owned(),
            compared: AtomicU64::new(0),
            differed: AtomicU64::new(0),
            panicked: AtomicU64::new(0),
            max_examples,
            examples: Mutex::new(VecDeque::with_capacity(max_examples)),
            totals,
        }
    }

    /// Counts one comparison of `live` against `shadow` for `req`.
    pub fn record(&self, req: &Request<'_>, live: &DecisionKey, shadow: &DecisionKey) {
        self.compared.fetch_add(1, Ordering::Relaxed);
        let differs_in = live.differences(shadow);
        if differs_in.is_empty() {
            self.totals.same.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.differed.fetch_add(1, Ordering::Relaxed);
        self.totals.differs.fetch_add(1, Ordering::Relaxed);
        if self.max_examples == 0 {
            return;
        }
        let example = ShadowExample {
            model: req.model.to_owned(),
            client_region: req.client_region.map(str::to_owned),
            differs_in,
            live: route_text(live),
            shadow: route_text(shadow),
        };
        let mut ex = self.examples.lock().unwrap_or_else(|e| e.into_inner());
        if ex.len() >= self.max_examples {
            ex.pop_front();
        }
        ex.push_back(example);
    }
}

impl ShadowCompiled {
    fn compare(&self, req: &Request<'_>, live: &Decision, live_fleet: &Fleet) {
        let decided = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut state = self.loaded.state.lock().unwrap_or_else(|e| e.into_inner());
            self.loaded.policy.decide(req, &self.fleet, &mut state, false)
        }));
        match decided {
            Ok(d) => self.stats.record(
                req,
                &DecisionKey::of(live, live_fleet),
                &DecisionKey::of(&d, &self.fleet),
            ),
            Err(_) => {
                self.stats.panicked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Where the policy in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `[policy] file`, polled.
    #[default]
    File,
    /// The topology bus: pushed by an admin (`edgeroute policy push`), watched.
    Bus,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Bus => "bus",
        }
    }
}

/// Which text is offered: a text of the file (its stamp) or of the bus (its revision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    File(Option<Stamp>),
    Bus(u64),
}

/// What `/health` reports of the policy.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The version in force; empty while a replica following the bus has none yet.
    pub version: String,
    /// Where the text in force came from (`None`: no policy yet).
    pub applied_from: Option<Source>,
    /// The bus revision of the text in force, when it came from the bus.
    pub revision: Option<u64>,
    pub applied_at_ms: u64,
    /// Why the last text was refused, until a newer text is applied.
    pub last_refusal: Option<String>,
    pub applied: u64,
    pub refused: u64,
    /// The file text last considered (applied or refused): it is not considered again.
    pub stamp: Option<Stamp>,
    /// The last bus revision considered: older or equal ones are not considered again.
    pub bus_revision: u64,
}

/// What became of a new text.
#[derive(Debug)]
pub enum Offer {
    Applied {
        version: String,
        previous: String,
        warnings: Vec<Warning>,
    },
    Refused(String),
    /// The text was considered already (a watch resuming with the current revision).
    Seen,
}

/// The shadow policy's file and its state.
#[derive(Debug)]
struct ShadowSlot {
    file: PathBuf,
    max_examples: usize,
    loaded: ArcSwapOption<Loaded>,
    stats: ArcSwapOption<ShadowStats>,
    totals: Arc<ShadowTotals>,
    stamp: Mutex<Option<Option<Stamp>>>,
    last_refusal: Mutex<Option<String>>,
}

/// The policy runtime: the loaded policy, its compilation against the current snapshot.
#[derive(Debug)]
pub struct Routing {
    /// Where texts come from (`[policy] source`).
    pub source: Source,
    /// The polled file (`source = "file"`).
    pub file: Option<PathBuf>,
    pub reload_interval_ms: u64,
    loaded: ArcSwap<Loaded>,
    compiled: ArcSwap<Compiled>,
    /// Serialises compilations, so the last one stored saw the latest policy and snapshot.
    compile: Mutex<()>,
    status: Mutex<Status>,
    shadow: Option<ShadowSlot>,
}

impl Routing {
    /// The runtime with `initial` in force (a file read at start), or none yet (a replica
    /// following the bus: requests are scored as without a policy until the first text).
    pub fn new(
        source: Source,
        file: Option<PathBuf>,
        reload_interval_ms: u64,
        initial: Option<(Policy, Stamp)>,
        snapshot: Arc<Snapshot>,
        j: &Jurisdictions,
        now_ms: u64,
    ) -> Result<Routing, PolicyError> {
        let (policy, status) = match initial {
            Some((policy, stamp)) => {
                let status = Status {
                    version: policy.version().to_owned(),
                    applied_from: Some(Source::File),
                    applied_at_ms: now_ms,
                    applied: 1,
                    stamp: Some(stamp),
                    ..Status::default()
                };
                (policy, status)
            }
            None => (placeholder()?, Status::default()),
        };
        let loaded = Arc::new(Loaded::new(policy));
        let fleet = Fleet::new(&loaded.policy, facts(&snapshot, &loaded.policy, j));
        let compiled = Compiled { loaded: loaded.clone(), fleet, snapshot, shadow: None };
        Ok(Routing {
            source,
            file,
            reload_interval_ms,
            loaded: ArcSwap::new(loaded),
            compiled: ArcSwap::from_pointee(compiled),
            compile: Mutex::new(()),
            status: Mutex::new(status),
            shadow: None,
        })
    }

    /// Evaluates the policy of `file` beside the live one (see [`Routing::offer_shadow`]);
    /// nothing is loaded until a text is offered. Keeps at most `max_examples` differences.
    pub fn with_shadow(mut self, file: PathBuf, max_examples: usize) -> Routing {
        self.shadow = Some(ShadowSlot {
            file,
            max_examples,
            loaded: ArcSwapOption::empty(),
            stats: ArcSwapOption::empty(),
            totals: Arc::new(ShadowTotals::default()),
            stamp: Mutex::new(None),
            last_refusal: Mutex::new(None),
        });
        self
    }

    pub fn compiled(&self) -> Arc<Compiled> {
        self.compiled.load_full()
    }

    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Whether a policy is in force (a replica following the bus may have none yet).
    pub fn has_policy(&self) -> bool {
        self.status.lock().map(|s| s.applied_from.is_some()).unwrap_or(false)
    }

    /// The shadow policy's file, when one is configured.
    pub fn shadow_file(&self) -> Option<&Path> {
        self.shadow.as_ref().map(|s| s.file.as_path())
    }

    /// Comparisons since start, over every shadow text (for `/metrics`).
    pub fn shadow_totals(&self) -> Option<Arc<ShadowTotals>> {
        self.shadow.as_ref().map(|s| s.totals.clone())
    }

    /// What `/health` shows of the shadow policy.
    pub fn shadow_report(&self) -> Option<ShadowReport> {
        let slot = self.shadow.as_ref()?;
        let stats = slot.stats.load_full();
        let last_refusal = slot.last_refusal.lock().map(|r| r.clone()).unwrap_or_default();
        let (version, compared, differed, failed, examples) = match &stats {
            Some(s) => (
                s.version.clone(),
                s.compared.load(Ordering::Relaxed),
                s.differed.load(Ordering::Relaxed),
                s.panicked.load(Ordering::Relaxed),
                s.examples.lock().map(|e| e.iter().cloned().collect()).unwrap_or_default(),
            ),
            None => (String::new(), 0, 0, 0, Vec::new()),
        };
        Some(ShadowReport {
            file: slot.file.display().to_string(),
            version,
            compared,
            differed,
            failed,
            last_refusal,
            examples,
        })
    }

    /// Compiles the loaded policy (and the shadow, if any) against the snapshot `current`
    /// holds now (called after a snapshot or a policy is stored: whichever runs last sees
    /// both).
    pub fn recompile(&self, current: &ArcSwap<Snapshot>, j: &Jurisdictions) {
        let _guard = self.compile.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = self.loaded.load_full();
        let snapshot = current.load_full();
        let fleet = Fleet::new(&loaded.policy, facts(&snapshot, &loaded.policy, j));
        let shadow = self.shadow.as_ref().and_then(|slot| {
            let loaded = slot.loaded.load_full()?;
            let stats = slot.stats.load_full()?;
            let fleet = Fleet::new(&loaded.policy, facts(&snapshot, &loaded.policy, j));
            Some(ShadowCompiled { loaded, fleet, stats })
        });
        self.compiled.store(Arc::new(Compiled { loaded, fleet, snapshot, shadow }));
    }

    /// Whether `stamp` names a file text not yet considered.
    pub fn is_new(&self, stamp: Option<Stamp>) -> bool {
        self.status.lock().map(|s| s.stamp != stamp).unwrap_or(true)
    }

    /// Whether `stamp` names a shadow file text not yet considered.
    pub fn is_new_shadow(&self, stamp: Option<Stamp>) -> bool {
        self.shadow
            .as_ref()
            .is_some_and(|s| s.stamp.lock().map(|held| *held != Some(stamp)).unwrap_or(true))
    }

    /// Considers a new text (`text`: what reading it gave, from the file or the bus): parsed,
    /// checked against the current fleet (warnings are returned, not fatal) and swapped in
    /// whole, or refused with the reason, the policy in force unchanged. A bus revision
    /// already considered is [`Offer::Seen`].
    pub fn offer(
        &self,
        text: Result<String, String>,
        origin: Origin,
        current: &ArcSwap<Snapshot>,
        j: &Jurisdictions,
        now_ms: u64,
    ) -> Offer {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        let (from, label) = match origin {
            Origin::File(stamp) => {
                status.stamp = stamp;
                let name = self.file.as_deref().map(|f| f.display().to_string());
                (Source::File, name.unwrap_or_else(|| "policy file".to_owned()))
            }
            Origin::Bus(revision) => {
                if revision <= status.bus_revision {
                    return Offer::Seen;
                }
                status.bus_revision = revision;
                (Source::Bus, format!("bus revision {revision}"))
            }
        };
        let parsed = text.and_then(|t| Policy::parse(&t).map_err(|e| e.to_string()));
        let policy = match parsed {
            Ok(p) => p,
            Err(why) => {
                let why = format!("{label}: {why}");
                status.refused += 1;
                status.last_refusal = Some(why.clone());
                return Offer::Refused(why);
            }
        };
        let warnings = policy.validate_against(&facts(&current.load(), &policy, j));
        let previous = std::mem::replace(&mut status.version, policy.version().to_owned());
        status.applied += 1;
        status.applied_at_ms = now_ms;
        status.applied_from = Some(from);
        status.revision = match origin {
            Origin::Bus(r) => Some(r),
            Origin::File(_) => None,
        };
        status.last_refusal = None;
        let version = status.version.clone();
        // Swapped and compiled before the status is released: whoever reads the status after
        // this sees the new policy answer.
        self.loaded.store(Arc::new(Loaded::new(policy)));
        self.recompile(current, j);
        drop(status);
        Offer::Applied { version, previous, warnings }
    }

    /// Considers a new text of the shadow file: parsed and loaded beside the live policy (its
    /// comparisons start from zero), or refused, the previous shadow kept.
    pub fn offer_shadow(
        &self,
        text: Result<String, String>,
        stamp: Option<Stamp>,
        current: &ArcSwap<Snapshot>,
        j: &Jurisdictions,
    ) -> Offer {
        let Some(slot) = &self.shadow else { return Offer::Seen };
        if let Ok(mut s) = slot.stamp.lock() {
            *s = Some(stamp);
        }
        let set_refusal = |why: Option<String>| {
            if let Ok(mut r) = slot.last_refusal.lock() {
                *r = why;
            }
        };
        match text.and_then(|t| Policy::parse(&t).map_err(|e| e.to_string())) {
            Ok(policy) => {
                let warnings = policy.validate_against(&facts(&current.load(), &policy, j));
                let version = policy.version().to_owned();
                let previous = slot.stats.load().as_ref().map(|s| s.version.clone());
                slot.stats.store(Some(Arc::new(ShadowStats::new(
                    &version,
                    slot.max_examples,
                    slot.totals.clone(),
                ))));
                slot.loaded.store(Some(Arc::new(Loaded::new(policy))));
                set_refusal(None);
                self.recompile(current, j);
                Offer::Applied { version, previous: previous.unwrap_or_default(), warnings }
            }
            Err(why) => {
                let why = format!("{}: {why}", slot.file.display());
                set_refusal(Some(why.clone()));
                Offer::Refused(why)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = r#"
version = "p1"
[jurisdictions]
eu = ["fra"]
[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"
"#;

    #[test]
    fn node_model_ids_map_to_registry_versions() {
        let p = Policy::parse(CANARY).unwrap();
        let r = p.registry();
        assert_eq!(served(r, "llama", None), Served::new("llama", "v1"));
        assert_eq!(served(r, "llama:v2", None), Served::new("llama", "v2"));
        assert_eq!(served(r, "llama:v9", None), Served::new("llama:v9", ""));
        assert_eq!(served(r, "other", None), Served::new("other", ""));
        // What the node reported wins over the default.
        assert_eq!(served(r, "llama", Some("v2")), Served::new("llama", "v2"));
        assert_eq!(served(r, "llama", Some("v9")), Served::new("llama", "v9"));
        assert_eq!(hardware(Some("cpu")), Hardware::Cpu);
        assert_eq!(hardware(None), Hardware::Gpu);
    }

    #[test]
    fn a_node_jurisdiction_comes_from_its_entry_its_region_then_the_policy() {
        let p = Policy::parse(CANARY).unwrap();
        let mut j = Jurisdictions::default();
        j.regions.insert("toronto".into(), "ca".into());
        j.nodes.insert("fra-9".into(), "ch".into());
        assert_eq!(j.of("tor-1", "toronto", Some(&p)), Some("ca"));
        assert_eq!(j.of("fra-1", "fra", Some(&p)), Some("eu"));
        assert_eq!(j.of("fra-9", "fra", Some(&p)), Some("ch"));
        assert_eq!(j.of("fra-1", "fra", None), None);
        assert_eq!(j.of("x", "nowhere", Some(&p)), None);
    }

    #[test]
    fn a_refused_text_keeps_the_policy_in_force() {
        let (r, snap, j) = routing(Some(Policy::parse(CANARY).unwrap()));
        let bad = Some(Stamp { modified: None, len: 2 });
        assert!(r.is_new(bad));
        let o = r.offer(Ok("version = 3".into()), Origin::File(bad), &snap, &j, 5);
        assert!(matches!(o, Offer::Refused(ref w) if w.contains("p.toml")), "{o:?}");
        assert!(!r.is_new(bad), "a refused text is not considered again");
        let s = r.status();
        assert_eq!((s.version.as_str(), s.applied, s.refused), ("p1", 1, 1));
        assert_eq!(r.compiled().loaded.policy.version(), "p1");
        let good = Some(Stamp { modified: None, len: 3 });
        let o = r.offer(Ok(CANARY.replace("p1", "p2")), Origin::File(good), &snap, &j, 9);
        assert!(matches!(o, Offer::Applied { ref version, .. } if version == "p2"), "{o:?}");
        assert_eq!(r.compiled().loaded.policy.version(), "p2");
        let s = r.status();
        assert_eq!((s.applied, s.last_refusal, s.applied_at_ms), (2, None, 9));
        assert_eq!((s.applied_from, s.revision), (Some(Source::File), None));
    }

    fn routing(initial: Option<Policy>) -> (Routing, ArcSwap<Snapshot>, Jurisdictions) {
        let snap = ArcSwap::from_pointee(Snapshot::default());
        let j = Jurisdictions::default();
        let (source, file) = match initial {
            Some(_) => (Source::File, Some(PathBuf::from("p.toml"))),
            None => (Source::Bus, None),
        };
        let initial = initial.map(|p| (p, Stamp { modified: None, len: 1 }));
        let r = Routing::new(source, file, 1000, initial, snap.load_full(), &j, 0).unwrap();
        (r, snap, j)
    }

    #[test]
    fn a_bus_replica_has_no_policy_until_a_text_arrives_and_refusals_keep_the_last_good() {
        let (r, snap, j) = routing(None);
        assert!(!r.has_policy());
        assert_eq!(r.status().version, "");
        let claims = edgeroute_policy::Claims::default();
        let req = Request::new(&claims, "llama");
        let d = r.compiled().decide(&req, false);
        assert_eq!(d.outcome, edgeroute_policy::Outcome::UnknownModel, "scored as without");
        let o = r.offer(Ok(CANARY.into()), Origin::Bus(4), &snap, &j, 7);
        assert!(matches!(o, Offer::Applied { ref version, .. } if version == "p1"), "{o:?}");
        let s = r.status();
        assert_eq!((s.applied_from, s.revision, s.applied_at_ms), (Some(Source::Bus), Some(4), 7));
        // The same revision again (a watch resuming) is not considered twice.
        assert!(matches!(r.offer(Ok(CANARY.into()), Origin::Bus(4), &snap, &j, 8), Offer::Seen));
        let o = r.offer(Ok("version = [".into()), Origin::Bus(5), &snap, &j, 9);
        assert!(matches!(o, Offer::Refused(ref w) if w.contains("bus revision 5")), "{o:?}");
        let o = r.offer(Err("over the limit".into()), Origin::Bus(6), &snap, &j, 9);
        assert!(matches!(o, Offer::Refused(ref w) if w.contains("over the limit")), "{o:?}");
        let s = r.status();
        assert_eq!((s.version.as_str(), s.revision, s.refused, s.applied), ("p1", Some(4), 2, 1));
        assert_eq!(r.compiled().loaded.policy.version(), "p1");
    }

    const POOLED: &str = r#"
version = "s1"
[[models]]
name = "llama"
default_version = "v1"
[[models.versions]]
id = "v1"
[[pools]]
name = "cloud"
tier = "cloud"
endpoint = "https://cloud.example.com/v1"
region = "fra"
serves = { "llama" = "v1" }
price_in_per_1k = 0.5
price_out_per_1k = 1.5
[[rules]]
id = "to-cloud"
match.models = ["llama"]
tiers = ["edge", "cloud"]
"#;

    #[test]
    fn a_shadow_policy_is_compared_and_counted_and_never_changes_the_answer() {
        let (r, snap, j) = routing(Some(Policy::parse(CANARY).unwrap()));
        let r = r.with_shadow("candidate.toml".into(), 2);
        let claims = edgeroute_policy::Claims::default();
        let req = Request::new(&claims, "llama");
        let alone = r.compiled().decide(&req, false);
        // Nothing loaded yet: nothing compared.
        assert_eq!(r.shadow_report().unwrap().compared, 0);
        let bad = r.offer_shadow(Ok("version = [".into()), None, &snap, &j);
        assert!(matches!(bad, Offer::Refused(ref w) if w.contains("candidate.toml")), "{bad:?}");
        assert!(r.shadow_report().unwrap().last_refusal.is_some());
        // The candidate sends llama to a cloud pool where the live policy finds no node.
        let o = r.offer_shadow(Ok(POOLED.into()), None, &snap, &j);
        assert!(matches!(o, Offer::Applied { ref version, .. } if version == "s1"), "{o:?}");
        for _ in 0..3 {
            let d = r.compiled().decide(&req, false);
            assert_eq!(
                DecisionKey::of(&d, &r.compiled().fleet),
                DecisionKey::of(&alone, &r.compiled().fleet)
            );
            assert_eq!(d.header(), alone.header());
        }
        let rep = r.shadow_report().unwrap();
        assert_eq!((rep.version.as_str(), rep.compared, rep.differed), ("s1", 3, 3));
        assert_eq!(rep.examples.len(), 2, "bounded by max_examples");
        assert!(rep.examples[0].differs_in.contains(&"tier"), "{:?}", rep.examples);
        assert!(rep.examples[0].shadow.contains("cloud"), "{:?}", rep.examples);
        assert_eq!(rep.last_refusal, None);
        // A request both decide alike (a model neither knows) counts as the same.
        let other = Request::new(&claims, "other");
        r.compiled().decide(&other, false);
        let totals = r.shadow_totals().unwrap();
        assert_eq!(totals.same.load(Ordering::Relaxed), 1);
        assert_eq!(totals.differs.load(Ordering::Relaxed), 3);
        // The same text as the live one: the same decisions.
        r.offer_shadow(Ok(CANARY.into()), None, &snap, &j);
        r.compiled().decide(&req, false);
        let rep = r.shadow_report().unwrap();
        assert_eq!((rep.version.as_str(), rep.compared, rep.differed), ("p1", 1, 0));
    }
}
