//! Getting a model's files onto the node before the backend loads them: nothing to do for a
//! local directory (validated, used in place); a verified download and atomic install for a
//! hub model (through `edgeroute-hub`, which treats every server-supplied value as hostile);
//! and, when the backend is Triton, the hub model laid out as a Triton repository entry next
//! to the install ([`crate::convert`]), for the `edgeroute watch` sidecar (or Triton itself)
//! to pick up.

use std::path::{Path, PathBuf};

use edgeroute_http::ApiError;
use edgeroute_hub::HubError;
use http::StatusCode;

use crate::gateway::AppState;
use crate::models::{LoadRequest, Source};

/// Maps a hub error to the answer a load request gets.
pub fn hub_error(e: &HubError) -> ApiError {
    let status = match e {
        HubError::NotFound { .. } => StatusCode::NOT_FOUND,
        HubError::Unauthorized { .. }
        | HubError::LocalPathForbidden { .. }
        | HubError::ForbiddenRedirect { .. } => StatusCode::FORBIDDEN,
        HubError::InsufficientDisk { .. } => StatusCode::INSUFFICIENT_STORAGE,
        _ if e.is_client_error() => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    };
    let kind = if status.is_client_error() { "invalid_request_error" } else { "upstream_error" };
    let param = match e {
        HubError::InvalidRevision { .. } => Some("revision"),
        HubError::InvalidFilter { .. } => Some("files"),
        HubError::LocalPathNotAbsolute { .. }
        | HubError::LocalPathNotFound { .. }
        | HubError::LocalPathForbidden { .. } => Some("path"),
        _ if e.is_client_error() => Some("model"),
        _ => None,
    };
    let err = ApiError::new(status, kind, Some(e.code()), e.to_string());
    match param {
        Some(p) => err.with_param(p),
        None => err,
    }
}

/// Checks a hub reference's shape (no network).
pub fn validate_ref(repo: &str, revision: &str) -> Result<(), ApiError> {
    edgeroute_hub::HubModel::parse(repo, Some(revision)).map(|_| ()).map_err(|e| hub_error(&e))
}

/// What a load will fetch, decided before answering the request.
#[derive(Debug)]
pub enum Plan {
    /// Use these files in place.
    Local { path: PathBuf },
    /// Download and install from the hub.
    Hub(Box<HubPlan>),
}

#[derive(Debug)]
pub struct HubPlan {
    /// The install, already started (or joined, when the same model is being installed).
    pub installing: edgeroute_hub::InstallHandle,
}

/// Where the files ended up, and their size.
#[derive(Debug, Clone)]
pub struct Installed {
    pub path: PathBuf,
    pub bytes: u64,
    /// The hub install's files (repository paths), for a hub model.
    pub files: Option<Vec<String>>,
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else { return 0 };
    rd.filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

pub async fn plan(st: &AppState, source: &Source, req: &LoadRequest) -> Result<Plan, ApiError> {
    match source {
        Source::Path { path } => Ok(Plan::Local { path: path.clone() }),
        Source::Config => Err(ApiError::internal("a configured model cannot be loaded again")),
        Source::Hub { repo, revision } => {
            let Some(hub) = st.hub.get() else {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "invalid_request_error",
                    Some("hub_not_configured"),
                    "This node has no model repository (models.repository): it cannot download models.",
                ));
            };
            let model =
                edgeroute_hub::HubModel::parse(repo, Some(revision)).map_err(|e| hub_error(&e))?;
            let filter = match &req.files {
                Some(patterns) => {
                    edgeroute_hub::FileFilter::new(patterns.iter()).map_err(|e| hub_error(&e))?
                }
                None => edgeroute_hub::FileFilter::default(),
            };
            let timeout = crate::config::ms(st.models_cfg.resolve_timeout_ms);
            // Resolving and starting the install (which checks free disk space first) happen
            // before answering, so an unknown, gated, unsafe or too-large model is refused now.
            let triton = st.backend.triton().is_some();
            let started = async {
                let manifest = hub.resolve(&model, &filter).await.map_err(|e| hub_error(&e))?;
                // A selection Triton cannot serve is refused before anything is downloaded;
                // `config.json`'s contents are checked once it is here.
                if triton {
                    let paths = manifest.files.iter().map(|f| f.path.as_str());
                    crate::convert::classify(paths).map_err(|e| {
                        ApiError::invalid_request(Some("model"), format!("{repo}: {e}"))
                            .with_code("unsupported_model_format")
                    })?;
                }
                hub.install_manifest(manifest).await.map_err(|e| hub_error(&e))
            };
            let installing = tokio::time::timeout(timeout, started).await.map_err(|_| {
                ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_error",
                    Some("hub_timeout"),
                    "The hub did not answer in time.",
                )
            })??;
            Ok(Plan::Hub(Box::new(HubPlan { installing })))
        }
    }
}

/// Runs the plan: `None` when there is nothing to install.
pub async fn fetch(st: &AppState, id: &str, plan: Plan) -> Result<Option<Installed>, String> {
    match plan {
        Plan::Local { path } => {
            let bytes = tokio::task::spawn_blocking({
                let p = path.clone();
                move || dir_size(&p)
            })
            .await
            .unwrap_or(0);
            Ok(Some(Installed { path, bytes, files: None }))
        }
        Plan::Hub(p) => {
            let handle = p.installing;
            let mut progress = handle.progress();
            let wait = handle.wait();
            tokio::pin!(wait);
            let installed = loop {
                tokio::select! {
                    done = &mut wait => break done.map_err(|e| e.to_string())?,
                    changed = progress.changed() => {
                        if changed.is_err() {
                            break wait.await.map_err(|e| e.to_string())?;
                        }
                        let p = progress.borrow_and_update().clone();
                        st.models.progress(id, crate::models::Progress { bytes_done: p.done_bytes, bytes_total: Some(p.total_bytes) });
                    }
                }
            };
            st.models.progress(
                id,
                crate::models::Progress {
                    bytes_done: installed.bytes,
                    bytes_total: Some(installed.bytes),
                },
            );
            let files = installed.files.iter().map(|f| f.as_str().to_owned()).collect();
            Ok(Some(Installed { path: installed.path, bytes: installed.bytes, files: Some(files) }))
        }
    }
}

/// Lays a hub install out as the Triton entry `name`, pinned to CUDA device `device`, in the
/// node's model repository (the shared volume), sealed with the node's seal key: the decision
/// is [`crate::convert::plan_entry`], the write [`crate::convert::write_entry`] (staged, then
/// renamed; nothing is left behind on failure). Before sealing, the staged entry goes through
/// the watcher's own code check with nothing allowed, so an entry the sidecar would refuse
/// fails here, with its reason, rather than never appearing in Triton. Returns the entry's
/// path, or why there is none.
pub async fn lay_out_for_triton(
    st: &AppState,
    name: &str,
    device: u32,
    installed: &Installed,
) -> Result<PathBuf, String> {
    let hub = st.hub.get().ok_or("no model repository configured (models.repository)")?.clone();
    let files = installed.files.clone().ok_or("not a hub install")?;
    let snapshot = installed.path.clone();
    let repository = match st.backend.triton_repository() {
        Some(p) => p.to_owned(),
        None => hub.repo_root().to_owned(),
    };
    let name = name.to_owned();
    let done = tokio::task::spawn_blocking(move || {
        let config = crate::convert::read_config_json(&snapshot)?;
        let target = crate::convert::Target { name: &name, device, repository: &repository };
        let entry = crate::convert::plan_entry(&files, config.as_deref(), &target)?;
        let staging = hub.staging_path();
        crate::convert::write_entry(&entry, &snapshot, hub.repo_root(), &staging, |dir, model| {
            crate::watcher::check_code(dir, &repository.join(model), &[])?;
            hub.seal(dir, model).map(drop).map_err(|e| format!("sealing: {e}"))
        })
    })
    .await;
    match done {
        Ok(Ok(path)) => Ok(path),
        Ok(Err(e)) => Err(format!("conversion for Triton failed: {e}")),
        Err(e) => Err(format!("conversion for Triton failed: {e}")),
    }
}

/// Deletes the Triton entry `name` written by [`lay_out_for_triton`], if it is there.
pub async fn purge_entry(st: &AppState, name: &str) -> Result<bool, String> {
    let hub = st.hub.get().ok_or("no model repository configured")?.clone();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        crate::convert::remove_entry(hub.repo_root(), &name, &hub.staging_path())
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Deletes an installed model's files (only a model directory inside the model repository).
pub async fn purge(st: &AppState, path: &Path) -> Result<(), String> {
    match st.hub.get() {
        Some(hub) => hub.remove_path(path).await.map(|_| ()).map_err(|e| e.to_string()),
        None => Err("no model repository configured".into()),
    }
}
