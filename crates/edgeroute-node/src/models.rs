//! The node's model table: which models this node serves, in which state, on which GPU — and
//! the load/unload orchestration behind `POST /v1/models/load` and `/v1/models/unload`.
//!
//! A load runs in the background: fetch (download and install from a hub, or a local path),
//! then apply to the backend (the simulator after its configured load time; Triton through
//! its repository API; any other OpenAI-compatible upstream by waiting for the model to appear
//! in its `GET /v1/models`). Every state change is published to the topology bus so routing
//! learns of it within milliseconds. The table is the routing truth: only `ready` models are
//! served.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use edgeroute_proto::models::ModelState;
use edgeroute_proto::topology::EventKind;
use serde::{Deserialize, Serialize};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// Listed in the node's config at start.
    Config,
    /// A directory on the node.
    Path { path: PathBuf },
    /// A Hugging Face hub repository.
    Hub { repo: String, revision: String },
}

/// Download progress of a load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
}

/// One model as the node knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub id: String,
    pub state: ModelState,
    pub gpu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub source: Source,
    pub memory_mb: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Where the files were installed, for hub and path sources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Unix seconds of the last state change.
    pub updated: u64,
}

/// Publishes a topology change (the bus publisher, or nothing).
pub type EventSink = Arc<dyn Fn(EventKind) + Send + Sync>;

pub fn no_events() -> EventSink {
    Arc::new(|_| {})
}

/// The table. Reads (every request checks `is_ready`) take a read lock on a small map.
pub struct ModelTable {
    records: RwLock<BTreeMap<String, Record>>,
    tasks: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    sink: RwLock<EventSink>,
    clock: crate::UnixClock,
}

impl std::fmt::Debug for ModelTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTable").field("models", &self.list().len()).finish_non_exhaustive()
    }
}

impl ModelTable {
    pub fn new(clock: crate::UnixClock) -> Self {
        ModelTable {
            records: RwLock::default(),
            tasks: Mutex::default(),
            sink: RwLock::new(no_events()),
            clock,
        }
    }

    pub fn set_sink(&self, sink: EventSink) {
        if let Ok(mut s) = self.sink.write() {
            *s = sink;
        }
    }

    /// Publishes a change of this node (models use it; drain does too).
    pub fn emit(&self, kind: EventKind) {
        let sink = self.sink.read().map(|s| s.clone());
        if let Ok(sink) = sink {
            sink(kind);
        }
    }

    pub fn is_ready(&self, id: &str) -> bool {
        self.records.read().is_ok_and(|m| m.get(id).is_some_and(|r| r.state == ModelState::Ready))
    }

    pub fn get(&self, id: &str) -> Option<Record> {
        self.records.read().ok()?.get(id).cloned()
    }

    pub fn list(&self) -> Vec<Record> {
        self.records.read().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// `model → gpu` for ready models.
    pub fn ready_placement(&self) -> BTreeMap<String, String> {
        self.records
            .read()
            .map(|m| {
                m.values()
                    .filter(|r| r.state == ModelState::Ready)
                    .filter_map(|r| r.gpu.clone().map(|g| (r.id.clone(), g)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Registers a model that is ready from the start (listed in the config). No event: the
    /// node's up-event snapshot carries it.
    pub fn insert_ready(&self, id: &str, gpu: Option<String>, memory_mb: u64) {
        let r = Record {
            id: id.to_owned(),
            state: ModelState::Ready,
            gpu,
            reason: None,
            source: Source::Config,
            memory_mb,
            progress: None,
            path: None,
            updated: (self.clock)(),
        };
        if let Ok(mut m) = self.records.write() {
            m.insert(id.to_owned(), r);
        }
    }

    /// Starts a load: records it as `loading` unless the id is taken. Returns the new record,
    /// or the existing one with `false` when the same source is already loading or loaded.
    pub fn begin_load(
        &self,
        id: &str,
        gpu: Option<String>,
        memory_mb: u64,
        source: Source,
    ) -> Result<(Record, bool), Record> {
        let Ok(mut m) = self.records.write() else { return Err(self.placeholder(id)) };
        if let Some(cur) = m.get(id) {
            let same = cur.source == source;
            return match cur.state {
                ModelState::Loading | ModelState::Ready if same => Ok((cur.clone(), false)),
                ModelState::Failed => {
                    let r = self.fresh(id, gpu, memory_mb, source);
                    m.insert(id.to_owned(), r.clone());
                    drop(m);
                    self.emit(EventKind::ModelLoading { model: id.to_owned(), gpu: r.gpu.clone() });
                    Ok((r, true))
                }
                _ => Err(cur.clone()),
            };
        }
        let r = self.fresh(id, gpu, memory_mb, source);
        m.insert(id.to_owned(), r.clone());
        drop(m);
        self.emit(EventKind::ModelLoading { model: id.to_owned(), gpu: r.gpu.clone() });
        Ok((r, true))
    }

    fn placeholder(&self, id: &str) -> Record {
        self.fresh(id, None, 0, Source::Config)
    }

    fn fresh(&self, id: &str, gpu: Option<String>, memory_mb: u64, source: Source) -> Record {
        Record {
            id: id.to_owned(),
            state: ModelState::Loading,
            gpu,
            reason: None,
            source,
            memory_mb,
            progress: Some(Progress::default()),
            path: None,
            updated: (self.clock)(),
        }
    }

    pub fn set_task(&self, id: &str, task: tokio::task::AbortHandle) {
        if let Ok(mut t) = self.tasks.lock() {
            t.insert(id.to_owned(), task);
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Record)) -> Option<Record> {
        let mut m = self.records.write().ok()?;
        let r = m.get_mut(id)?;
        f(r);
        r.updated = (self.clock)();
        Some(r.clone())
    }

    pub fn progress(&self, id: &str, p: Progress) {
        self.update(id, |r| r.progress = Some(p));
    }

    pub fn set_path(&self, id: &str, path: PathBuf, memory_mb: u64) {
        self.update(id, |r| {
            r.path = Some(path);
            r.memory_mb = memory_mb;
        });
    }

    pub fn mark_ready(&self, id: &str) {
        if let Some(r) = self.update(id, |r| {
            r.state = ModelState::Ready;
            r.reason = None;
        }) {
            self.finish_task(id);
            self.emit(EventKind::ModelReady { model: id.to_owned(), gpu: r.gpu });
        }
    }

    pub fn mark_failed(&self, id: &str, reason: String) {
        tracing::warn!(model = %id, %reason, "model load failed");
        if let Some(r) = self.update(id, |r| {
            r.state = ModelState::Failed;
            r.reason = Some(reason.clone());
        }) {
            self.finish_task(id);
            self.emit(EventKind::ModelFailed { model: id.to_owned(), gpu: r.gpu, reason });
        }
    }

    fn finish_task(&self, id: &str) {
        if let Ok(mut t) = self.tasks.lock() {
            t.remove(id);
        }
    }

    /// Marks a model `unloading` (no longer routed) and cancels its load if one is running.
    pub fn begin_unload(&self, id: &str) -> Option<Record> {
        if let Ok(mut t) = self.tasks.lock()
            && let Some(task) = t.remove(id)
        {
            task.abort();
        }
        self.update(id, |r| r.state = ModelState::Unloading)
    }

    pub fn remove(&self, id: &str) -> Option<Record> {
        let r = self.records.write().ok()?.remove(id)?;
        self.emit(EventKind::ModelUnloaded { model: id.to_owned(), gpu: r.gpu.clone() });
        Some(r)
    }
}

/// The body of `POST /v1/models/load`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// A Hugging Face repository id (`HuggingFaceTB/SmolLM2-135M-Instruct`). Either this or
    /// `path`.
    #[serde(default)]
    pub model: Option<String>,
    /// Branch, tag or commit of `model`. Default `main`.
    #[serde(default)]
    pub revision: Option<String>,
    /// A directory on the node, under one of `models.allowed_local_roots`.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The id clients will request. Default: the repository's name (after the `/`), or the
    /// directory's name.
    #[serde(default)]
    pub id: Option<String>,
    /// The GPU to pin the model to. Default: the first GPU.
    #[serde(default)]
    pub gpu: Option<String>,
    /// VRAM the model needs. Default: estimated from its files (size × 1.2).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Which files of the repository to fetch (names or `*` globs). Default: weights in
    /// safetensors or GGUF plus config and tokenizer files.
    #[serde(default)]
    pub files: Option<Vec<String>>,
    /// Backend options: `load_time_ms` for the simulator; `upstream_name` (the name Triton or
    /// the upstream knows the model by).
    #[serde(default)]
    pub options: BackendOptions,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendOptions {
    #[serde(default)]
    pub load_time_ms: Option<u64>,
    #[serde(default)]
    pub upstream_name: Option<String>,
}

/// The body of `POST /v1/models/unload`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnloadRequest {
    pub model: String,
    /// Also delete the installed files. Default false.
    #[serde(default)]
    pub purge: bool,
}

/// How long to wait between polls of an upstream's model list during a load.
pub const UPSTREAM_POLL: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    fn table() -> (ModelTable, Arc<StdMutex<Vec<EventKind>>>) {
        let t = ModelTable::new(Arc::new(|| 7));
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let s2 = seen.clone();
        t.set_sink(Arc::new(move |k| s2.lock().unwrap().push(k)));
        (t, seen)
    }

    #[test]
    fn load_lifecycle_publishes_every_change() {
        let (t, seen) = table();
        let src = Source::Hub { repo: "a/b".into(), revision: "main".into() };
        let (r, started) = t.begin_load("b", Some("gpu0".into()), 10, src.clone()).unwrap();
        assert!(started && r.state == ModelState::Loading);
        assert!(!t.is_ready("b"));
        // Same source again: shares the running load.
        let (_, started) = t.begin_load("b", None, 10, src.clone()).unwrap();
        assert!(!started);
        // Another source under the same id: conflict.
        assert!(t.begin_load("b", None, 10, Source::Path { path: "/x".into() }).is_err());
        t.mark_ready("b");
        assert!(t.is_ready("b"));
        assert_eq!(t.ready_placement().get("b").map(String::as_str), Some("gpu0"));
        t.begin_unload("b");
        assert!(!t.is_ready("b"), "an unloading model is not routed");
        t.remove("b");
        assert!(t.get("b").is_none());
        let kinds: Vec<&'static str> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|k| match k {
                EventKind::ModelLoading { .. } => "loading",
                EventKind::ModelReady { .. } => "ready",
                EventKind::ModelUnloaded { .. } => "unloaded",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, vec!["loading", "ready", "unloaded"]);
    }

    #[test]
    fn a_failed_load_can_be_retried() {
        let (t, seen) = table();
        t.begin_load("m", None, 0, Source::Config).unwrap();
        t.mark_failed("m", "disk full".into());
        assert_eq!(t.get("m").unwrap().reason.as_deref(), Some("disk full"));
        let (_, started) = t.begin_load("m", None, 0, Source::Path { path: "/p".into() }).unwrap();
        assert!(started);
        assert_eq!(seen.lock().unwrap().len(), 3);
    }
}
