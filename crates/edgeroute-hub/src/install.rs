//! Atomic installs into the model repository, with one shared download per model and commit.
//!
//! # On-disk layout
//!
//! ```text
//! repo_root/
//!   .lock                               flock held by the one Installer using this root
//!   .partial/<org>--<name>/<commit>/…   downloads in progress (kept across restarts: resumable)
//!   .staging/<pid>-<n>/…                an install being assembled (removed at start-up)
//!   <org>--<name>/<commit>/…            installed models (`<name>/<commit>/` for ids without org)
//! ```
//!
//! An install checks the free space first (model size minus what is already downloaded, plus a
//! margin), downloads every missing file into `.partial`, hard-links the finished files into a
//! fresh staging directory (with any files of an earlier install of the same commit), checks
//! that the staged tree is a loadable model, fsyncs every file and directory, and renames the
//! staging directory into place. When an earlier selection of the same commit is installed,
//! the new directory replaces it with one atomic exchange (`renameat2(RENAME_EXCHANGE)`), so a
//! reader sees the old tree or the new one, never a mix. A crash, a full disk or a cancellation
//! at any point leaves the installed models as they were; leftovers are hidden under `.partial`
//! and `.staging`, and the next [`Installer::open`] clears `.staging`.
//!
//! With a seal signer ([`Installer::open_with`]), the staged tree is sealed (see
//! [`crate::seal`]: a signed list of every file and its SHA-256, `.edgeroute-seal`) before the
//! rename, so an installed directory is always sealed; the seal names the model by its top
//! directory (`<org>--<name>`). A model installed before sealing was configured is sealed in
//! place the next time it is installed.
//!
//! One `Installer` owns a repository root at a time (an exclusive `flock` on `.lock`): cleaning
//! `.staging` at start-up would otherwise break another process's install.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::client::HubClient;
use crate::error::HubError;
use crate::filter::{FileFilter, layout_problem};
use crate::manifest::{FileEntry, Manifest, RepoPath};
use crate::model_ref::{Commit, HubId, HubModel, LocalModel};
use crate::progress::{FileProgress, Phase, Progress};
use crate::seal::{SEAL_FILE, SealError, SealSigner, seal_dir};

const STAGING: &str = ".staging";
const PARTIAL: &str = ".partial";
const LOCK: &str = ".lock";

/// Measures free space; injectable so tests can simulate a full disk.
pub trait DiskProbe: Send + Sync {
    /// Bytes available to this process on the filesystem holding `path`.
    fn free_bytes(&self, path: &Path) -> std::io::Result<u64>;
}

/// The real probe: `statvfs(2)`, blocks available to unprivileged users.
#[derive(Debug, Default, Clone, Copy)]
pub struct StatvfsProbe;

impl DiskProbe for StatvfsProbe {
    // The field widths differ between platforms, hence the casts.
    #[allow(clippy::unnecessary_cast)]
    fn free_bytes(&self, path: &Path) -> std::io::Result<u64> {
        let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
        Ok((s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64))
    }
}

/// Where models are installed and how much space to keep free.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallerConfig {
    /// The model repository. Created if missing. Required.
    pub repo_root: PathBuf,
    /// Free space that must remain after a download, on top of the model's size, so that a
    /// load never fills the disk. Default 1 GiB.
    #[serde(default = "default_margin")]
    pub disk_margin_bytes: u64,
}

fn default_margin() -> u64 {
    1 << 30
}

impl InstallerConfig {
    pub fn new(repo_root: impl Into<PathBuf>) -> Self {
        InstallerConfig { repo_root: repo_root.into(), disk_margin_bytes: default_margin() }
    }
}

/// A model installed in the repository.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub id: HubId,
    pub commit: Commit,
    /// The model directory, `repo_root/<org>--<name>/<commit>`.
    pub path: PathBuf,
    /// The files of the requested selection, relative to `path`, sorted.
    pub files: Vec<RepoPath>,
    /// Their total size in bytes.
    pub bytes: u64,
    /// True if every file was already installed and nothing was downloaded.
    pub already_present: bool,
}

impl Installed {
    /// The first `.gguf` file (for split GGUF models, the first part), if any.
    pub fn gguf(&self) -> Option<PathBuf> {
        self.files
            .iter()
            .find(|f| f.as_str().to_ascii_lowercase().ends_with(".gguf"))
            .map(|f| self.path.join(f.as_str()))
    }
}

/// A model found in the repository by [`Installer::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstalledModel {
    pub id: HubId,
    pub commit: Commit,
    pub path: PathBuf,
}

type Outcome = Option<Result<Installed, HubError>>;

/// A running (or finished) install, possibly shared with other callers.
#[derive(Clone, Debug)]
pub struct InstallHandle {
    progress: watch::Receiver<Progress>,
    result: watch::Receiver<Outcome>,
    joined: bool,
}

impl InstallHandle {
    /// Live progress: bytes per file and overall, and the phase.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// True if this caller joined an install that another caller had started.
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// Waits for the install to finish. Every caller sharing the install gets the same result.
    pub async fn wait(&self) -> Result<Installed, HubError> {
        let mut rx = self.result.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Err(HubError::Cancelled)),
            // The install task ended without a result: it was cancelled (or panicked).
            Err(_) => Err(HubError::Cancelled),
        }
    }
}

/// Installs models into one repository root. Cheap to clone.
#[derive(Clone)]
pub struct Installer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer").field("repo_root", &self.inner.root).finish_non_exhaustive()
    }
}

struct Inner {
    root: PathBuf,
    client: HubClient,
    probe: Arc<dyn DiskProbe>,
    margin: u64,
    /// Seals every install when set.
    seal: Option<SealSigner>,
    slots: Mutex<HashMap<Key, Slot>>,
    next: AtomicU64,
    /// Held for the installer's lifetime; released on drop.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

type Key = (HubId, Commit);

enum Slot {
    Installing(Flight),
    Removing,
}

struct Flight {
    id: u64,
    files: BTreeSet<RepoPath>,
    progress: watch::Receiver<Progress>,
    result: watch::Receiver<Outcome>,
    abort: tokio::task::AbortHandle,
}

impl Inner {
    fn slots(&self) -> MutexGuard<'_, HashMap<Key, Slot>> {
        // The map stays consistent even if a holder panicked: every update is one insert or
        // remove.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unique(&self) -> String {
        format!("{}-{}", std::process::id(), self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// Paths of one model at one commit.
struct Dirs {
    model: PathBuf,
    installed: PathBuf,
    partial: PathBuf,
}

impl Dirs {
    fn new(root: &Path, id: &HubId, commit: &Commit) -> Self {
        let model = root.join(id.dir_name());
        Dirs {
            installed: model.join(commit.as_str()),
            model,
            partial: root.join(PARTIAL).join(id.dir_name()).join(commit.as_str()),
        }
    }
}

impl Installer {
    /// Opens (creating if needed) the repository at `config.repo_root`, takes its lock, and
    /// removes orphaned staging directories left by a crash.
    pub async fn open(config: InstallerConfig, client: HubClient) -> Result<Self, HubError> {
        Self::open_with_probe(config, client, Arc::new(StatvfsProbe)).await
    }

    /// [`Installer::open`] with a custom free-space probe.
    pub async fn open_with_probe(
        config: InstallerConfig,
        client: HubClient,
        probe: Arc<dyn DiskProbe>,
    ) -> Result<Self, HubError> {
        Self::open_with(config, client, probe, None).await
    }

    /// [`Installer::open_with_probe`] that also seals every install with `seal` (see
    /// [`crate::seal`]), so the sidecar copying models to the backend installs only what this
    /// installer wrote.
    pub async fn open_with(
        config: InstallerConfig,
        client: HubClient,
        probe: Arc<dyn DiskProbe>,
        seal: Option<SealSigner>,
    ) -> Result<Self, HubError> {
        let InstallerConfig { repo_root, disk_margin_bytes } = config;
        let (root, lock) = blocking(move || open_root(&repo_root)).await?;
        Ok(Installer {
            inner: Arc::new(Inner {
                root,
                client,
                probe,
                margin: disk_margin_bytes,
                seal,
                slots: Mutex::new(HashMap::new()),
                next: AtomicU64::new(0),
                _lock: lock,
            }),
        })
    }

    /// The (canonical) repository root.
    pub fn repo_root(&self) -> &Path {
        &self.inner.root
    }

    /// Where `id` at `commit` is (or would be) installed.
    pub fn model_path(&self, id: &HubId, commit: &Commit) -> PathBuf {
        Dirs::new(&self.inner.root, id, commit).installed
    }

    /// The hub client this installer downloads with.
    pub fn client(&self) -> &HubClient {
        &self.inner.client
    }

    /// A fresh path under the repository's hidden staging area (not created): for work that,
    /// like an install, is assembled out of sight and renamed into the repository (a Triton
    /// entry converted from an install). Whatever is left there by a crash is removed the next
    /// time the repository is opened.
    pub fn staging_path(&self) -> PathBuf {
        self.inner.root.join(STAGING).join(self.inner.unique())
    }

    /// Seals `dir` for the backend model `model` with this installer's key, when it has one
    /// (see [`crate::seal`]); `Ok(None)` when sealing is not configured. The key itself never
    /// leaves the installer. Blocking.
    pub fn seal(&self, dir: &Path, model: &str) -> Result<Option<crate::seal::Seal>, SealError> {
        let Some(signer) = &self.inner.seal else { return Ok(None) };
        let now = edgeroute_core::clock::unix_ms() / 1000;
        seal_dir(dir, model, signer, now).map(Some)
    }

    /// Signs `claims` typed `typ` with this installer's seal key (see
    /// [`SealSigner::sign_typed`]); `Ok(None)` when sealing is not configured.
    pub fn sign_typed<T: Serialize>(
        &self,
        typ: &str,
        claims: &T,
    ) -> Result<Option<String>, SealError> {
        self.inner.seal.as_ref().map(|s| s.sign_typed(typ, claims)).transpose()
    }

    /// Resolves `model` on the hub (no download): the commit and the files `filter` selects,
    /// validated. Pass the result to [`Installer::install_manifest`]; this split lets a caller
    /// answer "not found" or "pickle refused" before accepting a load.
    pub async fn resolve(
        &self,
        model: &HubModel,
        filter: &FileFilter,
    ) -> Result<Manifest, HubError> {
        self.inner.client.resolve(model, filter).await
    }

    /// Resolves `model` on the hub and installs the files `filter` selects; see
    /// [`Installer::install_manifest`].
    pub async fn install(
        &self,
        model: &HubModel,
        filter: &FileFilter,
    ) -> Result<InstallHandle, HubError> {
        let manifest = self.inner.client.resolve(model, filter).await?;
        self.install_manifest(manifest).await
    }

    /// Starts installing `manifest` in the background, or joins the install of the same model
    /// and commit already running when it covers the same files. If the running install has a
    /// different selection, this waits for it and then adds the missing files.
    ///
    /// Dropping the handle does not stop the install; [`Installer::cancel`] does.
    pub async fn install_manifest(&self, manifest: Manifest) -> Result<InstallHandle, HubError> {
        let key = (manifest.id.clone(), manifest.commit.clone());
        let wanted: BTreeSet<RepoPath> = manifest.files.iter().map(|f| f.path.clone()).collect();
        let manifest = Arc::new(manifest);
        loop {
            let mut running = {
                let mut slots = self.inner.slots();
                match slots.get(&key) {
                    Some(Slot::Removing) => {
                        return Err(HubError::Busy {
                            id: key.0.to_string(),
                            commit: key.1.to_string(),
                        });
                    }
                    Some(Slot::Installing(f)) if wanted.is_subset(&f.files) => {
                        tracing::info!(model = %key.0, commit = %key.1, "joining the install in progress");
                        return Ok(InstallHandle {
                            progress: f.progress.clone(),
                            result: f.result.clone(),
                            joined: true,
                        });
                    }
                    Some(Slot::Installing(f)) => f.result.clone(),
                    None => return Ok(self.start(&mut slots, key, wanted, manifest)),
                }
            };
            // The slot is removed before its result is published, so once this returns the
            // next lookup finds no slot or a newer one.
            let _ = running.wait_for(Option::is_some).await;
            tokio::task::yield_now().await;
        }
    }

    fn start(
        &self,
        slots: &mut HashMap<Key, Slot>,
        key: Key,
        files: BTreeSet<RepoPath>,
        manifest: Arc<Manifest>,
    ) -> InstallHandle {
        let flight = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let initial = Progress {
            phase: Phase::Preparing,
            files: manifest
                .files
                .iter()
                .map(|f| FileProgress {
                    path: f.path.to_string(),
                    done_bytes: 0,
                    total_bytes: f.size,
                })
                .collect(),
            done_bytes: 0,
            total_bytes: manifest.total_bytes(),
        };
        let (progress_tx, progress_rx) = watch::channel(initial);
        let (result_tx, result_rx) = watch::channel(None);
        let guard = FlightGuard {
            inner: self.inner.clone(),
            key: key.clone(),
            flight,
            progress: progress_tx,
            result: result_tx,
        };
        let inner = self.inner.clone();
        tracing::info!(model = %key.0, commit = %key.1, files = manifest.files.len(), bytes = manifest.total_bytes(), "install started");
        let task = tokio::spawn(async move {
            match prepare(&inner, &manifest, &guard.progress).await {
                Err(e) => guard.finish(Err(e)),
                Ok(Prepared::Present(installed)) => guard.finish(Ok(installed)),
                Ok(Prepared::Downloaded(plan)) => {
                    guard.progress.send_modify(|p| p.phase = Phase::Installing);
                    // The guard moves into the blocking task: once the files are being moved
                    // into place, a cancellation no longer stops the install, and the result
                    // reported is the real one.
                    let _ = tokio::task::spawn_blocking(move || {
                        let result = finalize(&inner, &manifest, &plan);
                        guard.finish(result);
                    })
                    .await;
                }
            }
        });
        slots.insert(
            key,
            Slot::Installing(Flight {
                id: flight,
                files,
                progress: progress_rx.clone(),
                result: result_rx.clone(),
                abort: task.abort_handle(),
            }),
        );
        InstallHandle { progress: progress_rx, result: result_rx, joined: false }
    }

    /// Cancels the install of `id` at `commit` if it is still downloading; callers waiting on
    /// it get [`HubError::Cancelled`]. Downloaded data stays in `.partial` for a later resume.
    /// Once the install is moving files into place it completes. Returns whether an install
    /// was running.
    pub fn cancel(&self, id: &HubId, commit: &Commit) -> bool {
        match self.inner.slots().get(&(id.clone(), commit.clone())) {
            Some(Slot::Installing(f)) => {
                f.abort.abort();
                true
            }
            _ => false,
        }
    }

    /// Removes an installed model (for unload): renamed out of sight first, then deleted, so
    /// a reader never sees a half-deleted tree. Also drops partial downloads of that commit.
    /// Returns whether it was installed. Fails with [`HubError::Busy`] while it is installing.
    pub async fn remove(&self, id: &HubId, commit: &Commit) -> Result<bool, HubError> {
        let key = (id.clone(), commit.clone());
        {
            let mut slots = self.inner.slots();
            if slots.contains_key(&key) {
                return Err(HubError::Busy { id: id.to_string(), commit: commit.to_string() });
            }
            slots.insert(key.clone(), Slot::Removing);
        }
        let guard = RemovalGuard { inner: self.inner.clone(), key };
        let inner = self.inner.clone();
        let (id, commit) = (id.clone(), commit.clone());
        blocking(move || {
            let _guard = guard;
            remove_blocking(&inner, &id, &commit)
        })
        .await
    }

    /// [`Installer::remove`] by installed path (as returned in [`Installed::path`]). Refuses
    /// any path that is not exactly `repo_root/<model dir>/<commit>`.
    pub async fn remove_path(&self, path: &Path) -> Result<bool, HubError> {
        let refuse = || HubError::LocalPathForbidden { path: path.to_owned() };
        let rel = path.strip_prefix(&self.inner.root).map_err(|_| refuse())?;
        let mut parts = rel.components().map(|c| c.as_os_str().to_str());
        let (Some(Some(dir)), Some(Some(commit)), None) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(refuse());
        };
        let id = parse_dir_name(dir).ok_or_else(refuse)?;
        let commit = Commit::parse(commit).map_err(|_| refuse())?;
        self.remove(&id, &commit).await
    }

    /// Every model installed in the repository (directories that do not parse as a model id
    /// and commit are ignored).
    pub async fn list(&self) -> Result<Vec<InstalledModel>, HubError> {
        let root = self.inner.root.clone();
        blocking(move || list_blocking(&root)).await
    }
}

/// Publishes a flight's progress and result, and frees its slot when the install ends,
/// however it ends.
struct FlightGuard {
    inner: Arc<Inner>,
    key: Key,
    flight: u64,
    progress: watch::Sender<Progress>,
    result: watch::Sender<Outcome>,
}

impl FlightGuard {
    fn release(&self) {
        let mut slots = self.inner.slots();
        if matches!(slots.get(&self.key), Some(Slot::Installing(f)) if f.id == self.flight) {
            slots.remove(&self.key);
        }
    }

    fn finish(self, result: Result<Installed, HubError>) {
        match &result {
            Ok(i) => {
                tracing::info!(model = %i.id, commit = %i.commit, path = %i.path.display(), "install finished");
            }
            Err(e) => {
                tracing::warn!(model = %self.key.0, commit = %self.key.1, error = %e, code = e.code(), "install failed");
            }
        }
        let phase = if result.is_ok() { Phase::Done } else { Phase::Failed };
        self.progress.send_modify(|p| p.phase = phase);
        // Slot first, result second: see `install_manifest`.
        self.release();
        self.result.send_replace(Some(result));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        // After `finish` this is a no-op. On cancellation it marks the progress failed and
        // frees the slot before the result sender is dropped (fields drop after this), which
        // wakes waiters with `Cancelled`.
        if self.result.borrow().is_none() {
            self.progress.send_modify(|p| p.phase = Phase::Failed);
        }
        self.release();
    }
}

struct RemovalGuard {
    inner: Arc<Inner>,
    key: Key,
}

impl Drop for RemovalGuard {
    fn drop(&mut self) {
        let mut slots = self.inner.slots();
        if matches!(slots.get(&self.key), Some(Slot::Removing)) {
            slots.remove(&self.key);
        }
    }
}

enum Prepared {
    Present(Installed),
    Downloaded(Plan),
}

/// What `finalize` assembles: which files come from the earlier install, which from
/// `.partial`.
struct Plan {
    dirs: Dirs,
    present: BTreeSet<RepoPath>,
}

/// Checks what is installed and the free space, then downloads what is missing.
async fn prepare(
    inner: &Arc<Inner>,
    manifest: &Arc<Manifest>,
    progress: &watch::Sender<Progress>,
) -> Result<Prepared, HubError> {
    let dirs = Dirs::new(&inner.root, &manifest.id, &manifest.commit);
    let (present, partial_lens) = {
        let m = manifest.clone();
        let (installed, partial) = (dirs.installed.clone(), dirs.partial.clone());
        blocking(move || Ok(survey(&m.files, &installed, &partial))).await?
    };
    if present.len() == manifest.files.len() {
        // Installed before sealing was configured: sealed in place (one atomic rename of
        // the seal file; the model's files are untouched).
        if inner.seal.is_some() && !dirs.installed.join(SEAL_FILE).is_file() {
            let (inner, dirs) =
                (inner.clone(), Dirs::new(&inner.root, &manifest.id, &manifest.commit));
            blocking(move || seal_tree(&inner, &dirs, &dirs.installed)).await?;
        }
        return Ok(Prepared::Present(installed(manifest, &dirs, true)));
    }

    let missing: Vec<(usize, &FileEntry)> =
        manifest.files.iter().enumerate().filter(|(_, f)| !present.contains(&f.path)).collect();
    let to_fetch: u64 =
        missing.iter().map(|(i, f)| f.size.saturating_sub(partial_lens[*i])).sum::<u64>();
    let needed = to_fetch.saturating_add(inner.margin);
    let free = {
        let (probe, root) = (inner.probe.clone(), inner.root.clone());
        blocking(move || probe.free_bytes(&root).map_err(|e| HubError::io("statvfs", &root, e)))
            .await?
    };
    if free < needed {
        return Err(HubError::InsufficientDisk { needed, free });
    }

    progress.send_modify(|p| {
        p.phase = Phase::Downloading;
        for (i, f) in manifest.files.iter().enumerate() {
            let done = if present.contains(&f.path) { f.size } else { partial_lens[i] };
            p.set_file(i, done);
        }
    });
    for (i, file) in missing {
        let dest = dirs.partial.join(file.path.as_str());
        let mut report = |done: u64| progress.send_modify(|p| p.set_file(i, done));
        inner.client.download(&manifest.id, &manifest.commit, file, &dest, &mut report).await?;
    }
    Ok(Prepared::Downloaded(Plan { dirs, present }))
}

/// Which files are already installed (a regular file of the right size; not re-hashed), and
/// how many bytes of each are already in `.partial`.
fn survey(files: &[FileEntry], installed: &Path, partial: &Path) -> (BTreeSet<RepoPath>, Vec<u64>) {
    let mut present = BTreeSet::new();
    let mut partial_lens = Vec::with_capacity(files.len());
    for f in files {
        let is_complete = |dir: &Path| {
            std::fs::symlink_metadata(dir.join(f.path.as_str()))
                .is_ok_and(|m| m.is_file() && m.len() == f.size)
        };
        if is_complete(installed) {
            present.insert(f.path.clone());
        }
        let len = std::fs::symlink_metadata(partial.join(f.path.as_str()))
            .ok()
            .filter(|m| m.is_file())
            .map_or(0, |m| m.len().min(f.size));
        partial_lens.push(len);
    }
    (present, partial_lens)
}

fn installed(manifest: &Manifest, dirs: &Dirs, already_present: bool) -> Installed {
    Installed {
        id: manifest.id.clone(),
        commit: manifest.commit.clone(),
        path: dirs.installed.clone(),
        files: manifest.files.iter().map(|f| f.path.clone()).collect(),
        bytes: manifest.total_bytes(),
        already_present,
    }
}

/// Stages, verifies, syncs and renames into place. Blocking.
fn finalize(inner: &Inner, manifest: &Manifest, plan: &Plan) -> Result<Installed, HubError> {
    let dirs = &plan.dirs;
    let staging = inner.root.join(STAGING).join(inner.unique());
    std::fs::create_dir(&staging).map_err(|e| HubError::io("creating", &staging, e))?;
    let assembled = assemble(inner, manifest, plan, &staging);
    if let Err(e) = assembled {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    // Installed: the downloads of this commit are no longer needed.
    let _ = std::fs::remove_dir_all(&dirs.partial);
    if let Some(parent) = dirs.partial.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(installed(manifest, dirs, false))
}

fn assemble(
    inner: &Inner,
    manifest: &Manifest,
    plan: &Plan,
    staging: &Path,
) -> Result<(), HubError> {
    let dirs = &plan.dirs;
    // Files of an earlier selection of this commit are carried over, so the new tree is a
    // superset of the old one.
    if dirs.installed.is_dir() {
        let wanted: BTreeSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
        link_tree(&dirs.installed, &dirs.installed, staging, &wanted)?;
    }
    for f in &manifest.files {
        let dst = staging.join(f.path.as_str());
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HubError::io("creating", parent, e))?;
        }
        if plan.present.contains(&f.path) {
            let src = dirs.installed.join(f.path.as_str());
            std::fs::hard_link(&src, &dst)
                .or_else(|_| std::fs::copy(&src, &dst).map(drop))
                .map_err(|e| HubError::io("linking", &src, e))?;
        } else {
            // A link, not a rename: if the process dies before the final rename, the
            // download is still in `.partial` to resume from.
            let src = dirs.partial.join(f.path.as_str());
            std::fs::hard_link(&src, &dst)
                .or_else(|_| std::fs::rename(&src, &dst))
                .map_err(|e| HubError::io("staging", &src, e))?;
        }
    }
    // Check what is on disk, not what was meant to be there.
    for f in &manifest.files {
        let path = staging.join(f.path.as_str());
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| HubError::io("checking", &path, e))?;
        if !meta.is_file() || meta.len() != f.size {
            return Err(HubError::SizeMismatch {
                path: f.path.to_string(),
                expected: f.size,
                got: meta.len(),
            });
        }
    }
    if let Some(reason) = layout_problem(manifest.files.iter().map(|f| f.path.as_str())) {
        return Err(HubError::NoLoadableWeights { id: manifest.id.to_string(), reason });
    }
    // Sealed in staging, before the rename: an installed directory is never unsealed. A
    // seal carried over from the earlier selection is replaced (renamed over, so its
    // hard-linked original is untouched).
    seal_tree(inner, dirs, staging)?;
    sync_tree(staging)?;

    let root = dirs.model.parent().unwrap_or(&dirs.model);
    if !dirs.model.exists() {
        std::fs::create_dir(&dirs.model).map_err(|e| HubError::io("creating", &dirs.model, e))?;
        sync_dir(root)?;
    }
    if std::fs::symlink_metadata(&dirs.installed).is_ok() {
        // An earlier selection of this commit is installed: swap in the superset atomically,
        // then delete the old tree (now at the staging path).
        exchange(staging, &dirs.installed)?;
        sync_dir(&dirs.model)?;
        let _ = std::fs::remove_dir_all(staging);
    } else {
        std::fs::rename(staging, &dirs.installed)
            .map_err(|e| HubError::io("renaming into place", &dirs.installed, e))?;
        sync_dir(&dirs.model)?;
    }
    if let Some(staging_parent) = staging.parent() {
        sync_dir(staging_parent)?;
    }
    Ok(())
}

/// Hard-links (or copies) every regular file under `dir` to the same place under `to`,
/// except the paths in `skip` (relative to `base`). Symlinks are not carried over.
fn link_tree(base: &Path, dir: &Path, to: &Path, skip: &BTreeSet<&str>) -> Result<(), HubError> {
    let entries = std::fs::read_dir(dir).map_err(|e| HubError::io("listing", dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| HubError::io("listing", dir, e))?.path();
        let kind = std::fs::symlink_metadata(&path)
            .map_err(|e| HubError::io("checking", &path, e))?
            .file_type();
        let rel = path.strip_prefix(base).unwrap_or(&path);
        if kind.is_dir() {
            link_tree(base, &path, to, skip)?;
        } else if kind.is_file() && !rel.to_str().is_some_and(|r| skip.contains(r)) {
            let dst = to.join(rel);
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent).map_err(|e| HubError::io("creating", parent, e))?;
            }
            std::fs::hard_link(&path, &dst)
                .or_else(|_| std::fs::copy(&path, &dst).map(drop))
                .map_err(|e| HubError::io("linking", &path, e))?;
        }
    }
    Ok(())
}

/// Atomically swaps two directories where the platform can; otherwise moves the old one
/// aside first (a short window in which the path is missing, never half-written).
fn exchange(new: &Path, old: &Path) -> Result<(), HubError> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        if renameat2(AT_FDCWD, new, AT_FDCWD, old, RenameFlags::RENAME_EXCHANGE).is_ok() {
            return Ok(());
        }
    }
    let aside = new.with_extension("old");
    std::fs::rename(old, &aside).map_err(|e| HubError::io("moving aside", old, e))?;
    if let Err(e) = std::fs::rename(new, old) {
        // Put the old tree back rather than leave the model missing.
        let _ = std::fs::rename(&aside, old);
        return Err(HubError::io("renaming into place", old, e));
    }
    std::fs::rename(&aside, new).map_err(|e| HubError::io("moving aside", &aside, e))
}

/// fsyncs every file and directory under `dir` (directories after their contents).
fn sync_tree(dir: &Path) -> Result<(), HubError> {
    let entries = std::fs::read_dir(dir).map_err(|e| HubError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| HubError::io("listing", dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| HubError::io("checking", &path, e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| HubError::io("syncing", &path, e))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), HubError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| HubError::io("syncing directory", dir, e))
}

fn open_root(repo_root: &Path) -> Result<(PathBuf, nix::fcntl::Flock<std::fs::File>), HubError> {
    std::fs::create_dir_all(repo_root).map_err(|e| HubError::io("creating", repo_root, e))?;
    let root =
        std::fs::canonicalize(repo_root).map_err(|e| HubError::io("resolving", repo_root, e))?;
    let lock_path = root.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| HubError::io("opening", &lock_path, e))?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |_| HubError::Config {
            reason: format!(
                "the model repository {} is in use by another installer (lock {LOCK})",
                root.display()
            ),
        },
    )?;
    for dir in [STAGING, PARTIAL] {
        let path = root.join(dir);
        std::fs::create_dir_all(&path).map_err(|e| HubError::io("creating", &path, e))?;
    }
    let staging = root.join(STAGING);
    let mut removed = 0;
    let entries = std::fs::read_dir(&staging).map_err(|e| HubError::io("listing", &staging, e))?;
    for entry in entries {
        let path = entry.map_err(|e| HubError::io("listing", &staging, e))?.path();
        let gone = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        gone.map_err(|e| HubError::io("removing orphaned staging", &path, e))?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(removed, root = %root.display(), "removed orphaned staging directories");
        sync_dir(&staging)?;
    }
    Ok((root, lock))
}

fn remove_blocking(inner: &Inner, id: &HubId, commit: &Commit) -> Result<bool, HubError> {
    let dirs = Dirs::new(&inner.root, id, commit);
    let _ = std::fs::remove_dir_all(&dirs.partial);
    if std::fs::symlink_metadata(&dirs.installed).is_err() {
        return Ok(false);
    }
    let trash = inner.root.join(STAGING).join(format!("{}-removed", inner.unique()));
    std::fs::rename(&dirs.installed, &trash)
        .map_err(|e| HubError::io("moving out of the repository", &dirs.installed, e))?;
    sync_dir(&dirs.model)?;
    std::fs::remove_dir_all(&trash).map_err(|e| HubError::io("deleting", &trash, e))?;
    // The model directory goes too once its last commit is gone (fails harmlessly if not).
    if std::fs::remove_dir(&dirs.model).is_ok() {
        sync_dir(&inner.root)?;
    }
    Ok(true)
}

/// The inverse of [`HubId::dir_name`].
fn parse_dir_name(name: &str) -> Option<HubId> {
    match name.split_once("--") {
        Some((org, model)) => HubId::parse(&format!("{org}/{model}")).ok(),
        None => HubId::parse(name).ok(),
    }
}

fn list_blocking(root: &Path) -> Result<Vec<InstalledModel>, HubError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(root).map_err(|e| HubError::io("listing", root, e))?;
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().and_then(parse_dir_name) else { continue };
        let Ok(commits) = std::fs::read_dir(entry.path()) else { continue };
        for c in commits.flatten() {
            let Some(commit) = c.file_name().to_str().and_then(|s| Commit::parse(s).ok()) else {
                continue;
            };
            if c.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(InstalledModel { id: id.clone(), commit, path: c.path() });
            }
        }
    }
    out.sort_by(|a, b| (&a.id, &a.commit).cmp(&(&b.id, &b.commit)));
    Ok(out)
}

/// Checks that a local model is loadable: a `.gguf` file, or a directory holding a `.gguf` or
/// `config.json` plus `*.safetensors` at its top level. Blocking (reads the directory).
pub fn check_local(model: &LocalModel) -> Result<(), HubError> {
    let path = model.path();
    let shown_id = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| HubError::io("reading", path, e))?;
    let names: Vec<String> = if meta.is_file() {
        path.file_name().and_then(|n| n.to_str()).map(str::to_owned).into_iter().collect()
    } else {
        std::fs::read_dir(path)
            .map_err(|e| HubError::io("listing", path, e))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect()
    };
    match layout_problem(names.iter().map(String::as_str)) {
        None => Ok(()),
        Some(reason) => Err(HubError::NoLoadableWeights { id: shown_id, reason }),
    }
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T, F>(f: F) -> Result<T, HubError>
where
    F: FnOnce() -> Result<T, HubError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        HubError::io(
            "running blocking file work",
            PathBuf::new(),
            std::io::Error::other(e.to_string()),
        )
    })?
}

/// Seals `tree` (the staged or installed directory of `dirs`) when a signer is configured; the
/// model is named by its top directory (`<org>--<name>`, or `<name>`). Blocking.
fn seal_tree(inner: &Inner, dirs: &Dirs, tree: &Path) -> Result<(), HubError> {
    let Some(signer) = &inner.seal else { return Ok(()) };
    let model = dirs.model.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let now = edgeroute_core::clock::unix_ms() / 1000;
    match seal_dir(tree, model, signer, now) {
        Ok(_) => Ok(()),
        Err(SealError::Io { op, path, source }) => Err(HubError::io(op, path, source)),
        // Not reachable for a staged hub tree (its paths are validated, it has no links),
        // but reported, never ignored: the install fails rather than going in unsealed.
        Err(e) => Err(HubError::io("sealing", tree, std::io::Error::other(e.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths() {
        let id = HubId::parse("org/name").unwrap();
        let commit = Commit::parse(&"a".repeat(40)).unwrap();
        let d = Dirs::new(Path::new("/repo"), &id, &commit);
        assert_eq!(d.model, Path::new("/repo/org--name"));
        assert_eq!(d.installed, Path::new(&format!("/repo/org--name/{}", "a".repeat(40))));
        assert_eq!(d.partial, Path::new(&format!("/repo/.partial/org--name/{}", "a".repeat(40))));
    }

    #[test]
    fn exchange_swaps_directories() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        std::fs::write(a.join("new"), b"n").unwrap();
        std::fs::write(b.join("old"), b"o").unwrap();
        exchange(&a, &b).unwrap();
        assert!(b.join("new").exists());
        assert!(a.join("old").exists());
    }

    #[test]
    fn local_layouts() {
        let root = tempfile::tempdir().unwrap();
        let roots = vec![root.path().to_owned()];
        let gguf = root.path().join("m.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        check_local(&LocalModel::parse(&gguf, &roots).unwrap()).unwrap();
        let dir = root.path().join("st");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"x").unwrap();
        let err = check_local(&LocalModel::parse(&dir, &roots).unwrap()).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::write(dir.join("config.json"), b"{}").unwrap();
        check_local(&LocalModel::parse(&dir, &roots).unwrap()).unwrap();
    }
}
