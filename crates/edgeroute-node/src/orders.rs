//! Load orders: how a gateway that holds no Hugging Face token gets hub models onto Triton.
//!
//! With `models.downloads = "sidecar"`, a `POST /v1/models/load` of a hub model does not
//! download anything on the gateway (internet-facing, no GPU, and so no HF token). It writes an
//! [`Order`] to the shared volume — `<shared>/.orders/<model>.jws`, a compact JWS signed with
//! the node's seal key — and follows the [`Status`] the `edgeroute watch` sidecar writes back
//! to `<shared>/.status/<model>.json`. The sidecar (`--hf-token-file`: the only holder of the
//! token) trusts only orders signed by its `--seal-public-key` keys; it downloads into its own
//! area (never the shared volume, which the gateway can write), converts the snapshot into a
//! Triton entry ([`crate::convert`]) directly in Triton's repository, asks Triton to load it,
//! and reports each step: downloading (with bytes), converting, loading, ready, or failed with
//! the reason. An unload is an order too (Triton's repository API is the sidecar's).
//!
//! An order file is the gateway's latest wish for that model: a newer one replaces it (and
//! stops the sidecar's work on the older one); the sidecar acts on each order once, even
//! across restarts (its status names the order it answers). Statuses are not signed: a writer
//! of the shared volume can make the gateway report a load as failed or slow, never make Triton
//! load anything — and the gateway marks a model ready only once the backend itself lists it.
//!
//! The decisions here are plain functions ([`check_order`], [`should_run`]); the gateway's
//! side is [`place`] and [`follow`]; the sidecar's is [`Sidecar`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::triton::{TritonRepository, valid_model_name};

// For `edgeroute watch --hf-token-file`: the binary reaches the hub's settings through here.
pub use edgeroute_hub::{DEFAULT_ENDPOINT, HubConfig};

/// Where orders are written, under the shared volume.
pub const ORDERS_DIR: &str = ".orders";
/// Where the sidecar answers, under the shared volume.
pub const STATUS_DIR: &str = ".status";
/// The JWS `typ` of an order: a seal is never taken for one, nor one for a seal.
pub const ORDER_TYP: &str = "edgeroute-order+jwt";
/// The one order version this code writes and reads.
pub const ORDER_VERSION: u32 = 1;
/// Largest order or status file read.
pub const MAX_FILE_BYTES: u64 = 64 * 1024;
/// Highest CUDA device index an order may name.
pub const MAX_DEVICE: u32 = 255;
/// Most file patterns an order may carry (as `POST /v1/models/load` accepts).
const MAX_PATTERNS: usize = 64;
/// Longest reason kept in a status.
const MAX_REASON: usize = 2048;
/// The sidecar writes a download's progress at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// What the gateway asks of the sidecar for one Triton model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Download `repo` at `revision` (the files `files` selects, else the hub's default
    /// selection), convert it for Triton pinned to CUDA device `device`, install, load.
    Load { repo: String, revision: String, files: Option<Vec<String>>, device: u32 },
    /// Unload it from Triton; with `purge`, also delete its entry and download.
    Unload { purge: bool },
}

/// A signed order (the claims of `<shared>/.orders/<model>.jws`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    /// [`ORDER_VERSION`].
    pub v: u32,
    /// Unique per order (milliseconds and a counter): a status answers one order.
    pub id: String,
    /// The Triton model name; the order's file must be named after it.
    pub model: String,
    pub action: Action,
    /// Unix seconds when it was signed.
    pub iat: u64,
}

/// Where the sidecar is with an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Downloading,
    Converting,
    Loading,
    Ready,
    Unloaded,
    Failed,
}

impl State {
    /// Whether the sidecar is done with the order (nothing more will change).
    pub fn is_final(self) -> bool {
        matches!(self, State::Ready | State::Unloaded | State::Failed)
    }
}

/// The sidecar's answer to an order (`<shared>/.status/<model>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub v: u32,
    /// The order answered.
    pub order: String,
    pub model: String,
    pub state: State,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: Option<u64>,
    /// Why it failed.
    #[serde(default)]
    pub reason: Option<String>,
    /// What was installed (`org/name@commit`), so a later purge can remove the download.
    #[serde(default)]
    pub installed: Option<String>,
}

/// What an order may ask, beyond its signature: a current version, a valid Triton name, a hub
/// reference and file patterns of the right shape, a device in range. Pure.
pub fn check_order(order: &Order) -> Result<(), String> {
    if order.v != ORDER_VERSION {
        return Err(format!("order version {}, expected {ORDER_VERSION}", order.v));
    }
    if !valid_model_name(&order.model) {
        return Err(format!("`{}` is not a valid model name", order.model.escape_debug()));
    }
    if order.id.is_empty() || order.id.len() > 64 || !order.id.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err("the order id must be 1 to 64 printable ASCII characters".into());
    }
    if let Action::Load { repo, revision, files, device } = &order.action {
        edgeroute_hub::HubModel::parse(repo, Some(revision)).map_err(|e| e.to_string())?;
        if let Some(patterns) = files {
            if patterns.len() > MAX_PATTERNS {
                return Err(format!("more than {MAX_PATTERNS} file patterns"));
            }
            edgeroute_hub::FileFilter::new(patterns.iter()).map_err(|e| e.to_string())?;
        }
        if *device > MAX_DEVICE {
            return Err(format!("device {device} is above {MAX_DEVICE}"));
        }
    }
    Ok(())
}

/// Whether the sidecar should carry out `order`, given the status it last wrote for the model
/// (if any) and the order it is running or ran last in this process (if any). An order is run
/// once: not while it runs, not again once its status is final — so a restart resumes only
/// orders it had not finished. Pure.
pub fn should_run(order: &Order, status: Option<&Status>, current: Option<&str>) -> bool {
    if current == Some(order.id.as_str()) {
        return false;
    }
    !status.is_some_and(|s| s.order == order.id && s.state.is_final())
}

/// `<shared>/.orders/<model>.jws`.
pub fn order_path(shared: &Path, model: &str) -> PathBuf {
    shared.join(ORDERS_DIR).join(format!("{model}.jws"))
}

/// `<shared>/.status/<model>.json`.
pub fn status_path(shared: &Path, model: &str) -> PathBuf {
    shared.join(STATUS_DIR).join(format!("{model}.json"))
}

/// Writes `bytes` to `path` whole or not at all: a temporary file beside it, synced, renamed
/// over it, the directory synced. Blocking.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes).and_then(|()| f.sync_all())?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The first [`MAX_FILE_BYTES`] (+1, to tell an oversized file) of a regular file, `None` if
/// it does not exist. Blocking.
pub fn read_bounded(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
        Ok(m) if !m.is_file() => return Err(std::io::Error::other("not a regular file")),
        Ok(_) => {}
    }
    let mut out = Vec::new();
    std::fs::File::open(path)?.take(MAX_FILE_BYTES + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    Ok(Some(out))
}

/// The status the sidecar last wrote for `model`, if it is readable.
pub fn read_status(shared: &Path, model: &str) -> Option<Status> {
    let bytes = read_bounded(&status_path(shared, model)).ok()??;
    serde_json::from_slice(&bytes).ok()
}

// ---- The gateway's side ----

/// Writes the signed `token` of an order for `model` to the shared volume, replacing any
/// earlier order for it. Blocking.
pub fn place(shared: &Path, model: &str, token: &str) -> Result<(), String> {
    let path = order_path(shared, model);
    write_atomic(&path, token.as_bytes()).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// A fresh order id: the time and a process-wide counter.
pub fn new_id(now_ms: u64) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{now_ms}-{}-{n}", std::process::id())
}

/// Follows the sidecar's status for order `id` of `model` until it is final, reporting
/// progress through `progress(done, total)`, polling every `every` until `deadline`: `Ok` when
/// the sidecar says ready (or unloaded), the reason when it failed or never finished.
pub async fn follow(
    shared: &Path,
    model: &str,
    id: &str,
    deadline: tokio::time::Instant,
    every: Duration,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<(), String> {
    let mut last: Option<State> = None;
    loop {
        let status = {
            let (shared, model) = (shared.to_owned(), model.to_owned());
            tokio::task::spawn_blocking(move || read_status(&shared, &model)).await.ok().flatten()
        };
        if let Some(s) = status.filter(|s| s.order == id) {
            progress(s.bytes_done, s.bytes_total);
            match s.state {
                State::Ready | State::Unloaded => return Ok(()),
                State::Failed => {
                    return Err(s.reason.unwrap_or_else(|| "the sidecar gave no reason".into()));
                }
                state => last = Some(state),
            }
        }
        if tokio::time::Instant::now() + every > deadline {
            let seen = match last {
                None => "never answered the order (is `edgeroute watch --hf-token-file` running, \
                         and does it trust this node's seal key? its log names every refusal)"
                    .to_owned(),
                Some(s) => format!("was still {s:?} at the deadline").to_lowercase(),
            };
            return Err(format!("the watch sidecar {seen}"));
        }
        tokio::time::sleep(every).await;
    }
}

// ---- The sidecar's side ----

/// Where and how the sidecar downloads.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The hub client's settings, the token among them (from `--hf-token-file`).
    pub hub: edgeroute_hub::HubConfig,
    /// Where downloads are installed: the sidecar's own, never the shared volume (the
    /// gateway can write that). On Triton's repository's filesystem, entries hard-link them.
    pub downloads: PathBuf,
    /// Free space kept after a download, bytes.
    pub disk_margin_bytes: u64,
}

/// One running order.
struct Running {
    order: String,
    task: tokio::task::AbortHandle,
}

/// The sidecar's order executor: [`Sidecar::scan`] looks at `<shared>/.orders/` and starts
/// (or replaces) a task per model whose order [`should_run`].
pub struct Sidecar {
    shared: PathBuf,
    repository: PathBuf,
    installer: edgeroute_hub::Installer,
    keys: edgeroute_hub::SealVerifier,
    triton: Option<TritonRepository>,
    allow_backends: Vec<String>,
    running: HashMap<String, Running>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar").field("shared", &self.shared).finish_non_exhaustive()
    }
}

impl Sidecar {
    /// Opens the download area (`settings.downloads`, created if missing).
    pub async fn open(
        settings: &HubSettings,
        shared: PathBuf,
        repository: PathBuf,
        keys: edgeroute_hub::SealVerifier,
        triton: Option<TritonRepository>,
        allow_backends: Vec<String>,
    ) -> Result<Sidecar, edgeroute_hub::HubError> {
        let client = edgeroute_hub::HubClient::new(settings.hub.clone())?;
        let cfg = edgeroute_hub::InstallerConfig {
            repo_root: settings.downloads.clone(),
            disk_margin_bytes: settings.disk_margin_bytes,
        };
        let installer = edgeroute_hub::Installer::open(cfg, client).await?;
        Ok(Sidecar {
            shared,
            repository,
            installer,
            keys,
            triton,
            allow_backends,
            running: HashMap::new(),
        })
    }

    /// Reads every order and starts what should run. Blocking reads, all small.
    pub fn scan(&mut self) {
        self.running.retain(|_, r| !r.task.is_finished());
        let dir = self.shared.join(ORDERS_DIR);
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(model) = name.strip_suffix(".jws") else { continue };
            match self.read_order(&e.path(), model) {
                Ok(order) => self.start(order),
                Err(why) => {
                    tracing::warn!(order = %e.path().display(), error = %why, "order refused")
                }
            }
        }
    }

    /// A verified, checked order for `model` from `path`.
    fn read_order(&self, path: &Path, model: &str) -> Result<Order, String> {
        let bytes = read_bounded(path).map_err(|e| e.to_string())?.ok_or("gone")?;
        let token = std::str::from_utf8(&bytes).map_err(|_| "not UTF-8")?.trim();
        let order: Order = self.keys.verify_typed(ORDER_TYP, token).map_err(|e| e.to_string())?;
        // The file's name binds the model, as a seal's directory does.
        if order.model != model {
            return Err(format!("signed for `{}`, found as `{model}`", order.model));
        }
        check_order(&order)?;
        Ok(order)
    }

    fn start(&mut self, order: Order) {
        let current = self.running.get(&order.model).map(|r| r.order.as_str());
        let status = read_status(&self.shared, &order.model);
        if !should_run(&order, status.as_ref(), current) {
            return;
        }
        if let Some(old) = self.running.remove(&order.model) {
            tracing::info!(model = %order.model, replaced = %old.order, "a newer order replaces one in progress");
            old.task.abort();
        }
        tracing::info!(model = %order.model, order = %order.id, action = ?order.action, "carrying out an order");
        let job = Job {
            shared: self.shared.clone(),
            repository: self.repository.clone(),
            installer: self.installer.clone(),
            triton: self.triton.clone(),
            allow_backends: self.allow_backends.clone(),
            previous: status,
        };
        let (model, id) = (order.model.clone(), order.id.clone());
        let task = tokio::spawn(async move { job.run(order).await });
        self.running.insert(model, Running { order: id, task: task.abort_handle() });
    }
}

/// What one order's task needs.
struct Job {
    shared: PathBuf,
    repository: PathBuf,
    installer: edgeroute_hub::Installer,
    triton: Option<TritonRepository>,
    allow_backends: Vec<String>,
    /// The model's status before this order (for a purge: what was installed).
    previous: Option<Status>,
}

impl Job {
    async fn run(self, order: Order) {
        let mut status = Status {
            v: ORDER_VERSION,
            order: order.id.clone(),
            model: order.model.clone(),
            state: State::Downloading,
            bytes_done: 0,
            bytes_total: None,
            reason: None,
            installed: None,
        };
        let result = match &order.action {
            Action::Load { repo, revision, files, device } => {
                self.load(&mut status, repo, revision, files.as_deref(), *device).await
            }
            Action::Unload { purge } => self.unload(&mut status, *purge).await,
        };
        match result {
            Ok(state) => status.state = state,
            Err(reason) => {
                tracing::warn!(model = %order.model, order = %order.id, %reason, "order failed");
                status.state = State::Failed;
                status.reason = Some(reason.chars().take(MAX_REASON).collect());
            }
        }
        self.write(&status).await;
    }

    async fn write(&self, status: &Status) {
        let path = status_path(&self.shared, &status.model);
        let Ok(bytes) = serde_json::to_vec(status) else { return };
        let done = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes)).await;
        if !matches!(done, Ok(Ok(()))) {
            tracing::warn!(model = %status.model, "could not write the order's status");
        }
    }

    async fn load(
        &self,
        status: &mut Status,
        repo: &str,
        revision: &str,
        files: Option<&[String]>,
        device: u32,
    ) -> Result<State, String> {
        self.write(status).await;
        let model =
            edgeroute_hub::HubModel::parse(repo, Some(revision)).map_err(|e| e.to_string())?;
        let filter = match files {
            Some(p) => edgeroute_hub::FileFilter::new(p.iter()).map_err(|e| e.to_string())?,
            None => edgeroute_hub::FileFilter::default(),
        };
        let manifest = self.installer.resolve(&model, &filter).await.map_err(|e| e.to_string())?;
        crate::convert::classify(manifest.files.iter().map(|f| f.path.as_str()))
            .map_err(|e| format!("{repo}: {e}"))?;
        let handle = self.installer.install_manifest(manifest).await.map_err(|e| e.to_string())?;
        let mut progress = handle.progress();
        let wait = handle.wait();
        tokio::pin!(wait);
        let mut written = tokio::time::Instant::now();
        let installed = loop {
            tokio::select! {
                done = &mut wait => break done.map_err(|e| e.to_string())?,
                changed = progress.changed() => {
                    if changed.is_err() {
                        break wait.await.map_err(|e| e.to_string())?;
                    }
                    let p = progress.borrow_and_update().clone();
                    status.bytes_done = p.done_bytes;
                    status.bytes_total = Some(p.total_bytes);
                    if written.elapsed() >= PROGRESS_EVERY {
                        written = tokio::time::Instant::now();
                        self.write(status).await;
                    }
                }
            }
        };
        status.bytes_done = installed.bytes;
        status.bytes_total = Some(installed.bytes);
        status.installed = Some(format!("{}@{}", installed.id, installed.commit));
        status.state = State::Converting;
        self.write(status).await;

        let (name, repository, allow) =
            (status.model.clone(), self.repository.clone(), self.allow_backends.clone());
        let files: Vec<String> = installed.files.iter().map(|f| f.as_str().to_owned()).collect();
        let snapshot = installed.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let config = crate::convert::read_config_json(&snapshot)?;
            let target = crate::convert::Target { name: &name, device, repository: &repository };
            let entry = crate::convert::plan_entry(&files, config.as_deref(), &target)?;
            // Staged inside Triton's repository as the watcher's copies are (a crash's
            // leftovers are removed when the watcher starts), checked as they are.
            let staging = repository.join(format!(".staging-{name}-{}", std::process::id()));
            crate::convert::write_entry(&entry, &snapshot, &repository, &staging, |dir, model| {
                crate::watcher::check_code(dir, &repository.join(model), &allow)
            })
        })
        .await
        .map_err(|e| e.to_string())?;
        written.map_err(|e| format!("conversion for Triton failed: {e}"))?;

        status.state = State::Loading;
        self.write(status).await;
        if let Some(t) = &self.triton {
            t.load(&status.model).await.map_err(|e| format!("Triton load failed: {e}"))?;
        }
        tracing::info!(model = %status.model, "order carried out: installed and loaded");
        Ok(State::Ready)
    }

    async fn unload(&self, status: &mut Status, purge: bool) -> Result<State, String> {
        if let Some(t) = &self.triton
            && let Err(e) = t.unload(&status.model).await
        {
            // Not loaded (never was, or Triton restarted): nothing to free.
            tracing::info!(model = %status.model, error = %e, "Triton unload");
        }
        if !purge {
            return Ok(State::Unloaded);
        }
        let (repository, name) = (self.repository.clone(), status.model.clone());
        let trash = repository.join(format!(".staging-{name}-{}-removed", std::process::id()));
        tokio::task::spawn_blocking(move || {
            crate::convert::remove_entry(&repository, &name, &trash)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let installed = self.previous.as_ref().and_then(|s| s.installed.as_deref());
        if let Some((id, commit)) = installed.and_then(|i| i.split_once('@'))
            && let (Ok(id), Ok(commit)) =
                (edgeroute_hub::HubId::parse(id), edgeroute_hub::Commit::parse(commit))
        {
            self.installer.remove(&id, &commit).await.map_err(|e| e.to_string())?;
        }
        Ok(State::Unloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_order(id: &str) -> Order {
        Order {
            v: ORDER_VERSION,
            id: id.into(),
            model: "llm".into(),
            action: Action::Load {
                repo: "org/llm".into(),
                revision: "main".into(),
                files: None,
                device: 1,
            },
            iat: 1,
        }
    }

    fn status(order: &str, state: State) -> Status {
        Status {
            v: ORDER_VERSION,
            order: order.into(),
            model: "llm".into(),
            state,
            bytes_done: 0,
            bytes_total: None,
            reason: None,
            installed: None,
        }
    }

    #[test]
    fn an_order_asks_only_what_may_be_asked() {
        check_order(&load_order("1")).unwrap();
        let bad = |f: &dyn Fn(&mut Order)| {
            let mut o = load_order("1");
            f(&mut o);
            check_order(&o).unwrap_err()
        };
        assert!(bad(&|o| o.v = 2).contains("version"));
        assert!(bad(&|o| o.model = "../x".into()).contains("model name"));
        assert!(bad(&|o| o.id = String::new()).contains("order id"));
        let refused = |repo: &str, revision: &str, files: Option<Vec<String>>, device: u32| {
            let mut o = load_order("1");
            o.action = Action::Load { repo: repo.into(), revision: revision.into(), files, device };
            check_order(&o).unwrap_err()
        };
        refused("not a repo", "main", None, 0);
        refused("org/llm", "../../x", None, 0);
        refused("org/llm", "main", Some(vec!["../x".into()]), 0);
        assert!(refused("org/llm", "main", None, MAX_DEVICE + 1).contains("device"));
        let mut unload = load_order("1");
        unload.action = Action::Unload { purge: true };
        check_order(&unload).unwrap();
    }

    #[test]
    fn an_order_runs_once_even_across_restarts() {
        let o = load_order("7");
        assert!(should_run(&o, None, None), "new");
        assert!(!should_run(&o, None, Some("7")), "already running here");
        assert!(should_run(&o, None, Some("6")), "replaces an older one in progress");
        assert!(!should_run(&o, Some(&status("7", State::Ready)), None), "done before a restart");
        assert!(!should_run(&o, Some(&status("7", State::Failed)), None));
        assert!(should_run(&o, Some(&status("7", State::Downloading)), None), "resumed");
        assert!(should_run(&o, Some(&status("6", State::Ready)), None), "a newer order");
    }

    #[test]
    fn orders_and_statuses_keep_their_shape() {
        let o = load_order("1");
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["action"]["kind"], "load");
        assert_eq!(serde_json::from_value::<Order>(json).unwrap(), o);
        let mut extra = serde_json::to_value(&o).unwrap();
        extra["trust_remote_code"] = true.into();
        assert!(serde_json::from_value::<Order>(extra).is_err(), "unknown fields refused");
        let s = status("1", State::Failed);
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"state\":\"failed\""), "{text}");
    }

    #[test]
    fn files_are_written_whole_and_read_bounded() {
        let dir = std::env::temp_dir().join(format!("edgeroute-orders-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = dir.join("sub").join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(read_bounded(&p).unwrap().unwrap(), b"two");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1, "no temp left");
        assert!(read_bounded(&dir.join("missing")).unwrap().is_none());
        std::fs::write(&p, vec![b'x'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(read_bounded(&p).is_err());
        std::fs::remove_dir_all(dir).ok();
    }
}
