//! Watcher mode for split deployments: the gateway writes models to a shared volume; this
//! process (on the backend's side) sees a new model directory appear, checks it, copies it
//! atomically into the backend's model repository and asks the backend to load it.
//!
//! A directory is taken once it is valid and has been quiet for `settle` (writers may still be
//! copying files into it). Validity for Triton: a safe directory name and a `config.pbtxt`.
//!
//! Whoever can write to the shared volume must not gain code execution on the GPU side: a
//! model that carries code — Triton's `python` backend, a custom `execution_env_path`, any
//! `.py` file — is refused unless its backend is allow-listed (`--allow-backend`). Weights-only
//! backends (ONNX Runtime, TensorRT, OpenVINO...) pass. Loads and unloads carry the header of
//! Triton's restricted repository API when configured.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::backend::triton::{TritonRepository, valid_model_name};

#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The shared volume the gateway writes models to.
    pub shared: PathBuf,
    /// The backend's model repository.
    pub repository: PathBuf,
    /// Triton's HTTP endpoint; without it models are only copied.
    pub triton_url: Option<String>,
    /// Quiet time before a directory is taken.
    pub settle: Duration,
    /// Backends whose models may carry code (e.g. `python`); none by default.
    pub allow_backends: Vec<String>,
    /// Header (name, value) of Triton's restricted repository API, when it is restricted.
    pub triton_restricted: Option<(String, String)>,
}

/// Largest `config.pbtxt` read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Why a model directory carries code the backend would run, if it does and its backend is
/// not in `allow`. Reads `config.pbtxt` (`backend`, `platform`, `execution_env_path`) and
/// looks for `.py` files anywhere in the directory (symlinks are not followed).
pub fn check_code(dir: &Path, allow: &[String]) -> Result<(), String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(dir.join("config.pbtxt"))
        .and_then(|f| f.take(MAX_CONFIG_BYTES).read_to_string(&mut text))
        .map_err(|e| format!("reading config.pbtxt: {e}"))?;
    let backends: Vec<String> =
        ["backend", "platform"].iter().flat_map(|k| field_values(&text, k)).collect();
    let allowed = |b: &str| allow.iter().any(|a| a == b);
    if let Some(b) = backends.iter().find(|b| b.as_str() == "python" && !allowed(b)) {
        return Err(format!("backend `{b}` runs code from the model directory"));
    }
    if !field_values(&text, "execution_env_path").is_empty() && !allowed("python") {
        return Err("`execution_env_path` brings a Python environment".into());
    }
    if let Some(py) = find_python(dir) {
        let named = backends.first().map_or("none", String::as_str);
        if !backends.iter().any(|b| allowed(b)) {
            return Err(format!(
                "`{}` is code, and backend `{named}` is not allowed to carry code",
                py.display()
            ));
        }
    }
    Ok(())
}

/// The quoted values of `key: "value"` in a protobuf text file (any line layout).
fn field_values(text: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(key) {
        let before = rest[..i].chars().next_back();
        let after = &rest[i + key.len()..];
        rest = after;
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let Some(value) = after.trim_start().strip_prefix(':') else { continue };
        let Some(value) = value.trim_start().strip_prefix('"') else { continue };
        if let Some(end) = value.find('"') {
            out.push(value[..end].to_owned());
        }
    }
    out
}

/// The first `.py` file under `dir`, if any.
fn find_python(dir: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let p = e.path();
        if t.is_dir() {
            if let Some(found) = find_python(&p) {
                return Some(found);
            }
        } else if t.is_file() && p.extension().is_some_and(|x| x == "py") {
            return Some(p);
        }
    }
    None
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("watching {path}: {source}")]
    Notify { path: String, source: notify::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Why a directory is not (yet) a model.
pub fn check_model_dir(dir: &Path) -> Result<String, String> {
    let name = dir.file_name().and_then(|n| n.to_str()).ok_or("not a UTF-8 name")?.to_owned();
    if !valid_model_name(&name) {
        return Err(format!("`{name}` is not a valid model name"));
    }
    if !dir.join("config.pbtxt").is_file() {
        return Err(format!("`{name}` has no config.pbtxt yet"));
    }
    Ok(name)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let t = e.file_type()?;
        let dest = to.join(e.file_name());
        if t.is_dir() {
            copy_tree(&e.path(), &dest)?;
        } else if t.is_file() {
            std::fs::copy(e.path(), &dest)?;
            std::fs::File::open(&dest)?.sync_all()?;
        }
        // Symlinks are not followed: a model directory must hold its own files.
    }
    std::fs::File::open(to)?.sync_all()
}

/// Copies `dir` into `repository/<name>` atomically: staged beside it, synced, renamed.
pub fn install(dir: &Path, repository: &Path) -> Result<String, String> {
    let name = check_model_dir(dir)?;
    let staging = repository.join(format!(".staging-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    copy_tree(dir, &staging).map_err(|e| format!("copying `{name}`: {e}"))?;
    let dest = repository.join(&name);
    if dest.exists() {
        let old = repository.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(&dest, &old).map_err(|e| format!("replacing `{name}`: {e}"))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(&staging, &dest).map_err(|e| format!("installing `{name}`: {e}"))?;
    std::fs::File::open(repository).and_then(|f| f.sync_all()).map_err(|e| e.to_string())?;
    Ok(name)
}

/// Runs until `shutdown` resolves. Returns the names installed, in order (for tests and logs).
pub async fn run(
    cfg: WatchConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Vec<String>, WatchError> {
    std::fs::create_dir_all(&cfg.repository)?;
    // Leftovers of an interrupted copy are never loaded.
    for e in std::fs::read_dir(&cfg.repository)?.flatten() {
        if e.file_name().to_string_lossy().starts_with(".staging-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let triton = match cfg.triton_url.as_deref() {
        None => None,
        Some(u) => {
            let repo = TritonRepository::new(u, Duration::from_secs(600));
            Some(match &cfg.triton_restricted {
                None => repo,
                Some((name, value)) => repo
                    .with_restricted_header(name, value)
                    .map_err(|e| WatchError::Io(std::io::Error::other(e)))?,
            })
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let shared = cfg.shared.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reads are not changes: the watcher's own reads (checking, copying) would otherwise
        // make every model look changed again, and be installed again, forever.
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
        {
            for p in ev.paths {
                // The model directory is the path's first component under the shared root.
                if let Ok(rel) = p.strip_prefix(&shared)
                    && let Some(first) = rel.components().next()
                {
                    let _ = tx.send(shared.join(first.as_os_str()));
                }
            }
        }
    })
    .map_err(|source| WatchError::Notify { path: cfg.shared.display().to_string(), source })?;
    watcher
        .watch(&cfg.shared, RecursiveMode::Recursive)
        .map_err(|source| WatchError::Notify { path: cfg.shared.display().to_string(), source })?;

    // Directories already present count as just changed.
    let mut pending: BTreeMap<PathBuf, tokio::time::Instant> = BTreeMap::new();
    for e in std::fs::read_dir(&cfg.shared)?.flatten() {
        if e.path().is_dir() {
            pending.insert(e.path(), tokio::time::Instant::now());
        }
    }
    let mut installed = Vec::new();
    tokio::pin!(shutdown);
    loop {
        let next_due = pending.values().min().map(|t| *t + cfg.settle);
        tokio::select! {
            () = &mut shutdown => break,
            Some(dir) = rx.recv() => {
                pending.insert(dir, tokio::time::Instant::now());
            }
            () = async { match next_due { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                let now = tokio::time::Instant::now();
                let due: Vec<PathBuf> = pending.iter().filter(|(_, t)| **t + cfg.settle <= now).map(|(p, _)| p.clone()).collect();
                for dir in due {
                    pending.remove(&dir);
                    if !dir.is_dir() || check_model_dir(&dir).is_err() {
                        continue;
                    }
                    if let Err(e) = check_code(&dir, &cfg.allow_backends) {
                        tracing::warn!(dir = %dir.display(), error = %e, "refused: a model that carries code needs its backend in --allow-backend");
                        continue;
                    }
                    let (d, repo) = (dir.clone(), cfg.repository.clone());
                    match tokio::task::spawn_blocking(move || install(&d, &repo)).await {
                        Ok(Ok(name)) => {
                            tracing::info!(model = %name, "installed into the backend repository");
                            if let Some(t) = &triton
                                && let Err(e) = t.load(&name).await
                            {
                                tracing::warn!(model = %name, error = %e, "backend load failed");
                                continue;
                            }
                            installed.push(name);
                        }
                        Ok(Err(e)) => tracing::warn!(dir = %dir.display(), error = %e, "not installed"),
                        Err(e) => tracing::warn!(error = %e, "install task failed"),
                    }
                }
            }
        }
    }
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_text_fields_are_found_in_any_layout() {
        let t = "name: \"m\"\nbackend: \"python\"\nplatform:\"onnxruntime_onnx\" max_batch_size: 8";
        assert_eq!(field_values(t, "backend"), vec!["python"]);
        assert_eq!(field_values(t, "platform"), vec!["onnxruntime_onnx"]);
        assert!(field_values("my_backend: \"python\"", "backend").is_empty(), "whole words");
        assert!(field_values("backend python", "backend").is_empty());
    }
}
