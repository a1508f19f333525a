//! The node's model table: which models this node serves, in which state, on which GPU — and
//! the load/unload orchestration behind `POST /v1/models/load` and `/v1/models/unload`.
//!
//! A load runs in the background: fetch (download and install from a hub, or a local path),
//! then apply to the backend (the simulator after its configured load time; Triton through
//! its repository API; any other OpenAI-compatible upstream by waiting for the model to appear
//! in its `GET /v1/models`). Every state change is published to the topology bus so routing
//! learns of it within milliseconds. The table is the routing truth: `ready` models are served,
//! and so are `draining` ones (an unload waiting for the model's requests in flight, or its
//! deadline, while routing already sends new sessions elsewhere); nothing else is.
//!
//! An unload is a drain for one model: `ready → draining → unloading → gone`. While draining,
//! every answer for the model carries a migrate hint (`reason=unload; model=<id>`) so pinned
//! sessions move between turns; the backend unload starts when the model's last request in
//! flight ends or at the drain deadline, whichever comes first.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use edgeroute_proto::MigrateHint;
use edgeroute_proto::models::ModelState;
use edgeroute_proto::topology::EventKind;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

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
    /// The Triton repository entry written for it (a hub model on a Triton backend), which a
    /// purge deletes with the install.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triton_entry: Option<PathBuf>,
    /// The Triton model name the `edgeroute watch` sidecar was ordered to load it as
    /// (`models.downloads = "sidecar"`), which an unload orders unloaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordered_as: Option<String>,
    /// Unix seconds of the last state change.
    pub updated: u64,
    /// While `draining`: when the backend unload starts even if requests are still in flight.
    #[serde(skip)]
    pub drain_until: Option<Instant>,
    /// The registry version loaded under this id (the load's `version`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `version` as the header value every answer of this model carries, made once.
    #[serde(skip)]
    pub version_header: Option<http::HeaderValue>,
}

impl Record {
    /// This record, serving `version` (a registry version; its header made once here).
    fn with_version(mut self, version: Option<String>) -> Record {
        self.version_header = version.as_deref().and_then(|v| http::HeaderValue::from_str(v).ok());
        self.version = version;
        self
    }
}

/// Requests in flight for one model, and a wake-up for a drain waiting for the last to end.
#[derive(Debug, Default)]
struct Usage {
    in_flight: AtomicUsize,
    idle: Notify,
}

/// A request's hold on a model, taken by [`ModelTable::acquire`] before it is served and
/// released (dropped) when its answer has ended: a drain waits for every hold.
#[derive(Debug)]
pub struct ModelUse {
    usage: Arc<Usage>,
    /// The version serving this request, for the answer's `x-edgeroute-model-version`.
    pub version: Option<http::HeaderValue>,
}

impl Drop for ModelUse {
    fn drop(&mut self) {
        if self.usage.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.usage.idle.notify_waiters();
        }
    }
}

/// What `POST /v1/models/unload` started.
#[derive(Debug, Clone, PartialEq)]
pub enum Unload {
    /// The model is served to what is in flight until it ends or `until`; the caller waits
    /// with [`ModelTable::wait_drained`], then finishes the unload. `started` is false when a
    /// drain was already running.
    Draining { record: Record, until: Instant, in_flight: usize, started: bool },
    /// Nothing to wait for (idle, not served, or no drain time): the model is `unloading`
    /// now and the caller finishes the unload at once.
    Now(Record),
    /// Another unload is already unloading it.
    InProgress(Record),
}

/// Publishes a topology change (the bus publisher, or nothing).
pub type EventSink = Arc<dyn Fn(EventKind) + Send + Sync>;

pub fn no_events() -> EventSink {
    Arc::new(|_| {})
}

/// The table. Every request takes a hold on its model ([`ModelTable::acquire`]): a read lock
/// on a small map and a counter.
pub struct ModelTable {
    records: RwLock<BTreeMap<String, Record>>,
    /// Requests in flight per model. Taken under the records' read lock and checked under
    /// their write lock, so a drain never ends while a request is being admitted.
    usage: Mutex<HashMap<String, Arc<Usage>>>,
    tasks: Mutex<HashMap<String, tokio::task::AbortHandle>>,
    sink: RwLock<EventSink>,
    clock: crate::WallClock,
}

impl std::fmt::Debug for ModelTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTable").field("models", &self.list().len()).finish_non_exhaustive()
    }
}

impl ModelTable {
    pub fn new(clock: crate::WallClock) -> Self {
        ModelTable {
            records: RwLock::default(),
            usage: Mutex::default(),
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

    fn usage(&self, id: &str) -> Arc<Usage> {
        match self.usage.lock() {
            Ok(mut u) => u.entry(id.to_owned()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    fn in_flight(&self, id: &str) -> usize {
        self.usage
            .lock()
            .ok()
            .and_then(|u| u.get(id).map(|u| u.in_flight.load(Ordering::Acquire)))
            .unwrap_or(0)
    }

    /// Admits a request for `id` when the model is served (`ready`, or `draining`: what is in
    /// flight and the turns of pinned sessions are still answered). Hold the result until the
    /// answer has ended.
    pub fn acquire(&self, id: &str) -> Option<ModelUse> {
        let m = self.records.read().ok()?;
        let r = m.get(id)?;
        if !matches!(r.state, ModelState::Ready | ModelState::Draining) {
            return None;
        }
        let usage = self.usage(id);
        usage.in_flight.fetch_add(1, Ordering::AcqRel);
        let version = r.version_header.clone();
        drop(m);
        Some(ModelUse { usage, version })
    }

    /// The hint every answer for a draining model carries: move this model's session, by
    /// `deadline_ms` (what is left of the drain at `now`).
    pub fn drain_hint(&self, id: &str, now: Instant) -> Option<MigrateHint> {
        let m = self.records.read().ok()?;
        let r = m.get(id).filter(|r| r.state == ModelState::Draining)?;
        let until = r.drain_until?;
        Some(MigrateHint {
            reason: "unload".into(),
            deadline_ms: until.saturating_duration_since(now).as_millis() as u64,
            to: None,
            model: Some(id.to_owned()),
        })
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
            triton_entry: None,
            ordered_as: None,
            updated: edgeroute_core::clock::unix_s(&self.clock),
            drain_until: None,
            version: None,
            version_header: None,
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
        version: Option<String>,
    ) -> Result<(Record, bool), Record> {
        let Ok(mut m) = self.records.write() else { return Err(self.placeholder(id)) };
        if let Some(cur) = m.get(id) {
            let same = cur.source == source;
            return match cur.state {
                ModelState::Loading | ModelState::Ready if same => Ok((cur.clone(), false)),
                ModelState::Failed => {
                    let r = self.fresh(id, gpu, memory_mb, source).with_version(version);
                    m.insert(id.to_owned(), r.clone());
                    drop(m);
                    self.emit(EventKind::ModelLoading {
                        model: id.to_owned(),
                        gpu: r.gpu.clone(),
                        version: r.version.clone(),
                    });
                    Ok((r, true))
                }
                _ => Err(cur.clone()),
            };
        }
        let r = self.fresh(id, gpu, memory_mb, source).with_version(version);
        m.insert(id.to_owned(), r.clone());
        drop(m);
        self.emit(EventKind::ModelLoading {
            model: id.to_owned(),
            gpu: r.gpu.clone(),
            version: r.version.clone(),
        });
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
            triton_entry: None,
            ordered_as: None,
            updated: edgeroute_core::clock::unix_s(&self.clock),
            drain_until: None,
            version: None,
            version_header: None,
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
        r.updated = edgeroute_core::clock::unix_s(&self.clock);
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

    pub fn set_ordered_as(&self, id: &str, name: String) {
        self.update(id, |r| r.ordered_as = Some(name));
    }

    pub fn set_triton_entry(&self, id: &str, entry: PathBuf) {
        self.update(id, |r| r.triton_entry = Some(entry));
    }

    pub fn mark_ready(&self, id: &str) {
        if let Some(r) = self.update(id, |r| {
            r.state = ModelState::Ready;
            r.reason = None;
        }) {
            self.finish_task(id);
            self.emit(EventKind::ModelReady {
                model: id.to_owned(),
                gpu: r.gpu,
                version: r.version,
            });
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

    /// Starts unloading `id` (`None`: no such model). A `ready` model with requests in flight
    /// starts draining until they end or `until` (published as `ModelDraining`); an idle one,
    /// one that is not served (loading: its load is cancelled; failed), or any model when
    /// `until` is now, goes straight to `unloading` (published as `ModelUnloading`).
    pub fn begin_unload(&self, id: &str, now: Instant, until: Instant) -> Option<Unload> {
        let mut m = self.records.write().ok()?;
        let r = m.get_mut(id)?;
        let event;
        let out = match r.state {
            ModelState::Draining => {
                let until = r.drain_until.unwrap_or(now);
                return Some(Unload::Draining {
                    record: r.clone(),
                    until,
                    in_flight: self.in_flight(id),
                    started: false,
                });
            }
            ModelState::Unloading => return Some(Unload::InProgress(r.clone())),
            ModelState::Ready if until > now && self.in_flight(id) > 0 => {
                r.state = ModelState::Draining;
                r.drain_until = Some(until);
                r.updated = edgeroute_core::clock::unix_s(&self.clock);
                event = EventKind::ModelDraining {
                    model: id.to_owned(),
                    gpu: r.gpu.clone(),
                    deadline_ms: until.saturating_duration_since(now).as_millis() as u64,
                };
                Unload::Draining {
                    record: r.clone(),
                    until,
                    in_flight: self.in_flight(id),
                    started: true,
                }
            }
            ModelState::Ready | ModelState::Loading | ModelState::Failed => {
                r.state = ModelState::Unloading;
                r.drain_until = None;
                r.updated = edgeroute_core::clock::unix_s(&self.clock);
                event = EventKind::ModelUnloading { model: id.to_owned(), gpu: r.gpu.clone() };
                Unload::Now(r.clone())
            }
        };
        drop(m);
        if matches!(out, Unload::Now(_))
            && let Ok(mut t) = self.tasks.lock()
            && let Some(task) = t.remove(id)
        {
            task.abort();
        }
        self.emit(event);
        Some(out)
    }

    /// Waits until the drain of `id` is over — its last request in flight has ended, or
    /// `until` has passed — and marks it `unloading` (published as `ModelUnloading`). False
    /// when the model is no longer draining (another unload finished it).
    pub async fn wait_drained(&self, id: &str, until: Instant) -> bool {
        let usage = self.usage(id);
        loop {
            let idle = usage.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let forced = Instant::now() >= until;
            match self.end_drain(id, forced) {
                Some(true) => return true,
                None => return false,
                Some(false) => {}
            }
            tokio::select! {
                () = &mut idle => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// Ends a drain when nothing is in flight, or regardless when `force`: `Some(true)` when
    /// it ended, `Some(false)` while requests remain, `None` when `id` is not draining.
    fn end_drain(&self, id: &str, force: bool) -> Option<bool> {
        let mut m = self.records.write().ok()?;
        let r = m.get_mut(id).filter(|r| r.state == ModelState::Draining)?;
        let left = self.in_flight(id);
        if left > 0 && !force {
            return Some(false);
        }
        if left > 0 {
            tracing::warn!(model = %id, in_flight = left, "unload drain deadline passed; unloading with requests in flight");
        }
        r.state = ModelState::Unloading;
        r.drain_until = None;
        r.updated = edgeroute_core::clock::unix_s(&self.clock);
        let gpu = r.gpu.clone();
        drop(m);
        self.emit(EventKind::ModelUnloading { model: id.to_owned(), gpu });
        Some(true)
    }

    pub fn remove(&self, id: &str) -> Option<Record> {
        let r = self.records.write().ok()?.remove(id)?;
        if let Ok(mut u) = self.usage.lock() {
            u.remove(id);
        }
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
    /// The registry version this load provides, when `id` is a model of the fleet's policy
    /// registry (`[policy] file`). Default: the registry's default version.
    #[serde(default)]
    pub version: Option<String>,
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
        let t = ModelTable::new(edgeroute_core::clock::fixed(7_000));
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let s2 = seen.clone();
        t.set_sink(Arc::new(move |k| s2.lock().unwrap().push(k)));
        (t, seen)
    }

    #[test]
    fn load_lifecycle_publishes_every_change() {
        let (t, seen) = table();
        let src = Source::Hub { repo: "a/b".into(), revision: "main".into() };
        let (r, started) = t.begin_load("b", Some("gpu0".into()), 10, src.clone(), None).unwrap();
        assert!(started && r.state == ModelState::Loading);
        assert!(!t.is_ready("b"));
        // Same source again: shares the running load.
        let (_, started) = t.begin_load("b", None, 10, src.clone(), None).unwrap();
        assert!(!started);
        // Another source under the same id: conflict.
        assert!(t.begin_load("b", None, 10, Source::Path { path: "/x".into() }, None).is_err());
        t.mark_ready("b");
        assert!(t.is_ready("b"));
        assert_eq!(t.ready_placement().get("b").map(String::as_str), Some("gpu0"));
        // Nothing in flight: no drain to wait for.
        let now = Instant::now();
        let started = t.begin_unload("b", now, now + Duration::from_secs(30));
        assert!(matches!(started, Some(Unload::Now(_))), "{started:?}");
        assert!(!t.is_ready("b"), "an unloading model is not routed");
        assert!(t.acquire("b").is_none(), "an unloading model is not served");
        t.remove("b");
        assert!(t.get("b").is_none());
        assert_eq!(kinds(&seen), vec!["loading", "ready", "unloading", "unloaded"]);
    }

    #[test]
    fn the_bus_hears_the_registry_version_of_a_load() {
        let (t, seen) = table();
        let src = Source::Path { path: "/m/llama".into() };
        t.begin_load("llama", None, 10, src, Some("v2".into())).unwrap();
        t.mark_ready("llama");
        let v2 = Some("v2".to_owned());
        let seen = seen.lock().unwrap();
        assert!(
            matches!(&seen[..], [
                EventKind::ModelLoading { version: a, .. },
                EventKind::ModelReady { version: b, .. },
            ] if *a == v2 && *b == v2),
            "{seen:?}"
        );
    }

    fn kinds(seen: &StdMutex<Vec<EventKind>>) -> Vec<&'static str> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|k| match k {
                EventKind::ModelLoading { .. } => "loading",
                EventKind::ModelReady { .. } => "ready",
                EventKind::ModelDraining { .. } => "draining",
                EventKind::ModelUnloading { .. } => "unloading",
                EventKind::ModelUnloaded { .. } => "unloaded",
                _ => "other",
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn unload_drains_until_the_last_request_in_flight_ends() {
        let (t, seen) = table();
        t.insert_ready("m", Some("gpu0".into()), 10);
        let first = t.acquire("m").unwrap();
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let Some(Unload::Draining { until: u, in_flight: 1, started: true, .. }) =
            t.begin_unload("m", now, until)
        else {
            panic!("no drain started")
        };
        assert_eq!(u, until);
        assert_eq!(t.get("m").unwrap().state, ModelState::Draining);
        assert!(!t.is_ready("m"), "a draining model takes no new sessions");
        // Still served (a pinned session's turn), with the hint.
        let second = t.acquire("m").expect("a draining model is served");
        let hint = t.drain_hint("m", now + Duration::from_secs(10)).unwrap();
        assert_eq!(hint.to_string(), "reason=unload; deadline_ms=20000; model=m");
        // A second unload call joins the drain.
        assert!(matches!(
            t.begin_unload("m", now, now + Duration::from_secs(99)),
            Some(Unload::Draining { started: false, in_flight: 2, .. })
        ));
        let waiter = {
            let t = Arc::new(t);
            let t2 = t.clone();
            (t, tokio::spawn(async move { t2.wait_drained("m", until).await }))
        };
        let (t, waiter) = waiter;
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "ended with a request still in flight");
        drop(second);
        assert!(waiter.await.unwrap());
        assert_eq!(Instant::now() - now, Duration::from_secs(2), "not waiting for the deadline");
        assert_eq!(t.get("m").unwrap().state, ModelState::Unloading);
        assert!(t.acquire("m").is_none() && t.drain_hint("m", Instant::now()).is_none());
        assert_eq!(kinds(&seen), vec!["draining", "unloading"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_at_its_deadline_when_a_request_hangs() {
        let (t, seen) = table();
        t.insert_ready("m", None, 0);
        let _hung = t.acquire("m").unwrap();
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        assert!(matches!(t.begin_unload("m", now, until), Some(Unload::Draining { .. })));
        assert!(t.wait_drained("m", until).await);
        assert_eq!(Instant::now(), until);
        assert_eq!(t.get("m").unwrap().state, ModelState::Unloading);
        assert_eq!(kinds(&seen), vec!["draining", "unloading"]);
        // Later waiters learn the drain is over.
        assert!(!t.wait_drained("m", until).await);
    }

    #[test]
    fn no_drain_time_or_a_model_not_served_unloads_at_once() {
        let (t, _) = table();
        t.insert_ready("m", None, 0);
        let _busy = t.acquire("m").unwrap();
        let now = Instant::now();
        assert!(matches!(t.begin_unload("m", now, now), Some(Unload::Now(_))));
        assert!(matches!(t.begin_unload("m", now, now), Some(Unload::InProgress(_))));
        t.begin_load("f", None, 0, Source::Config, None).unwrap();
        t.mark_failed("f", "oom".into());
        let later = now + Duration::from_secs(5);
        assert!(matches!(t.begin_unload("f", now, later), Some(Unload::Now(_))));
        assert!(t.begin_unload("nope", now, later).is_none());
    }

    #[test]
    fn a_failed_load_can_be_retried() {
        let (t, seen) = table();
        t.begin_load("m", None, 0, Source::Config, None).unwrap();
        t.mark_failed("m", "disk full".into());
        assert_eq!(t.get("m").unwrap().reason.as_deref(), Some("disk full"));
        let (_, started) =
            t.begin_load("m", None, 0, Source::Path { path: "/p".into() }, None).unwrap();
        assert!(started);
        assert_eq!(seen.lock().unwrap().len(), 3);
    }
}
