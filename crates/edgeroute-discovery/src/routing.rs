//! The routing policy inside discovery (`[policy] file`): loaded at start, hot reloaded, and
//! compiled against each snapshot so a request only decides.
//!
//! What is pure here: [`Jurisdictions::of`], [`facts`] (snapshot → `NodeFacts`), [`served`]
//! and [`Routing::offer`] (a new text → applied or refused). The file is read by the caller
//! ([`read`] at start, the reload task in `lib.rs` afterwards).
//!
//! `RoutingState` (round-robin and weighted counters) needs `&mut`: it lives behind one
//! `Mutex` per loaded policy, held only for the `decide` call (microseconds, no I/O, no
//! await). A reload starts a fresh state: the counters are indexed by the old policy's rules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
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

/// A ready model id as the registry names it. A node reports plain ids: `name:version` is
/// that version of a registered model; a registered `name` alone is its default version.
pub fn served(registry: &Registry, id: &str) -> Served {
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

/// What the policy knows of each node, from the snapshot. Discovery does not see a node's
/// hardware class, its GPU utilisation or whether its price is configured: hardware is taken
/// as `gpu` (the fleet's class), utilisation as 0, and a price of 0 as unknown (a price bound
/// then drops the node, as the policy does for any unknown figure).
pub fn facts(snap: &Snapshot, policy: &Policy, j: &Jurisdictions) -> Vec<NodeFacts> {
    snap.infos()
        .map(|n| NodeFacts {
            id: n.id.clone(),
            region: n.region.clone(),
            jurisdiction: j.of(&n.id, &n.region, None).map(str::to_owned),
            hardware: Hardware::Gpu,
            available: !matches!(n.health, "unhealthy" | "draining"),
            models: n.models.iter().map(|m| served(policy.registry(), m)).collect(),
            ttft_p50_ms: n.ttft_p50_ms,
            ttft_p99_ms: n.ttft_p99_ms,
            queue: n.queue_depth,
            in_flight: n.in_flight,
            capacity: n.capacity,
            gpu_util: 0.0,
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

/// The policy compiled against one snapshot: what a request reads (one atomic load).
#[derive(Debug)]
pub struct Compiled {
    pub loaded: Arc<Loaded>,
    pub fleet: Fleet,
    /// The snapshot `fleet` was built from: a decision's nodes are looked up here.
    pub snapshot: Arc<Snapshot>,
}

impl Compiled {
    pub fn decide(&self, req: &Request<'_>, explain: bool) -> Decision {
        // The counters are plain integers: a panic elsewhere cannot leave them inconsistent.
        let mut state = self.loaded.state.lock().unwrap_or_else(|e| e.into_inner());
        self.loaded.policy.decide(req, &self.fleet, &mut state, explain)
    }
}

/// What `/health` reports of the policy.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub version: String,
    pub applied_at_ms: u64,
    /// Why the last text was refused, until a newer text is applied.
    pub last_refusal: Option<String>,
    pub applied: u64,
    pub refused: u64,
    /// The text last considered (applied or refused): it is not considered again.
    pub stamp: Option<Stamp>,
}

/// What became of a new text.
#[derive(Debug)]
pub enum Offer {
    Applied { version: String, previous: String, warnings: Vec<Warning> },
    Refused(String),
}

/// The policy runtime: the loaded policy, its compilation against the current snapshot.
#[derive(Debug)]
pub struct Routing {
    pub file: PathBuf,
    pub reload_interval_ms: u64,
    loaded: ArcSwap<Loaded>,
    compiled: ArcSwap<Compiled>,
    /// Serialises compilations, so the last one stored saw the latest policy and snapshot.
    compile: Mutex<()>,
    status: Mutex<Status>,
}

impl Routing {
    pub fn new(
        file: PathBuf,
        reload_interval_ms: u64,
        policy: Policy,
        stamp: Stamp,
        snapshot: Arc<Snapshot>,
        j: &Jurisdictions,
        now_ms: u64,
    ) -> Routing {
        let status = Status {
            version: policy.version().to_owned(),
            applied_at_ms: now_ms,
            applied: 1,
            stamp: Some(stamp),
            ..Status::default()
        };
        let loaded = Arc::new(Loaded::new(policy));
        let fleet = Fleet::new(&loaded.policy, facts(&snapshot, &loaded.policy, j));
        let compiled = Compiled { loaded: loaded.clone(), fleet, snapshot };
        Routing {
            file,
            reload_interval_ms,
            loaded: ArcSwap::new(loaded),
            compiled: ArcSwap::from_pointee(compiled),
            compile: Mutex::new(()),
            status: Mutex::new(status),
        }
    }

    pub fn compiled(&self) -> Arc<Compiled> {
        self.compiled.load_full()
    }

    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Compiles the loaded policy against the snapshot `current` holds now (called after a
    /// snapshot or a policy is stored: whichever runs last sees both).
    pub fn recompile(&self, current: &ArcSwap<Snapshot>, j: &Jurisdictions) {
        let _guard = self.compile.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = self.loaded.load_full();
        let snapshot = current.load_full();
        let fleet = Fleet::new(&loaded.policy, facts(&snapshot, &loaded.policy, j));
        self.compiled.store(Arc::new(Compiled { loaded, fleet, snapshot }));
    }

    /// Whether `stamp` names a text not yet considered.
    pub fn is_new(&self, stamp: Option<Stamp>) -> bool {
        self.status.lock().map(|s| s.stamp != stamp).unwrap_or(true)
    }

    /// Considers a new text of the file (`text`: what reading it gave): parsed, checked
    /// against the current fleet (warnings are returned, not fatal) and swapped in whole, or
    /// refused with the reason, the policy in force unchanged.
    pub fn offer(
        &self,
        text: Result<String, String>,
        stamp: Option<Stamp>,
        current: &ArcSwap<Snapshot>,
        j: &Jurisdictions,
        now_ms: u64,
    ) -> Offer {
        let parsed = text.and_then(|t| Policy::parse(&t).map_err(|e| e.to_string()));
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        status.stamp = stamp;
        let policy = match parsed {
            Ok(p) => p,
            Err(why) => {
                let why = format!("{}: {why}", self.file.display());
                status.refused += 1;
                status.last_refusal = Some(why.clone());
                return Offer::Refused(why);
            }
        };
        let warnings = policy.validate_against(&facts(&current.load(), &policy, j));
        let previous = std::mem::replace(&mut status.version, policy.version().to_owned());
        status.applied += 1;
        status.applied_at_ms = now_ms;
        status.last_refusal = None;
        let version = status.version.clone();
        drop(status);
        self.loaded.store(Arc::new(Loaded::new(policy)));
        self.recompile(current, j);
        Offer::Applied { version, previous, warnings }
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
        assert_eq!(served(r, "llama"), Served::new("llama", "v1"));
        assert_eq!(served(r, "llama:v2"), Served::new("llama", "v2"));
        assert_eq!(served(r, "llama:v9"), Served::new("llama:v9", ""));
        assert_eq!(served(r, "other"), Served::new("other", ""));
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
        let snap = ArcSwap::from_pointee(Snapshot::default());
        let j = Jurisdictions::default();
        let p = Policy::parse(CANARY).unwrap();
        let stamp = Stamp { modified: None, len: 1 };
        let r = Routing::new("p.toml".into(), 1000, p, stamp, snap.load_full(), &j, 0);
        let bad = Some(Stamp { modified: None, len: 2 });
        assert!(r.is_new(bad));
        let o = r.offer(Ok("version = 3".into()), bad, &snap, &j, 5);
        assert!(matches!(o, Offer::Refused(ref w) if w.contains("p.toml")), "{o:?}");
        assert!(!r.is_new(bad), "a refused text is not considered again");
        let s = r.status();
        assert_eq!((s.version.as_str(), s.applied, s.refused), ("p1", 1, 1));
        assert_eq!(r.compiled().loaded.policy.version(), "p1");
        let good = Some(Stamp { modified: None, len: 3 });
        let o = r.offer(Ok(CANARY.replace("p1", "p2")), good, &snap, &j, 9);
        assert!(matches!(o, Offer::Applied { ref version, .. } if version == "p2"), "{o:?}");
        assert_eq!(r.compiled().loaded.policy.version(), "p2");
        let s = r.status();
        assert_eq!((s.applied, s.last_refusal, s.applied_at_ms), (2, None, 9));
    }
}
