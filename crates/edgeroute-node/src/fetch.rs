//! Getting a model's files onto the node before the backend loads them: nothing to do for a
//! local directory (validated, used in place); a verified download and atomic install for a
//! hub model (through `edgeroute-hub`, which treats every server-supplied value as hostile).

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
            let started = async {
                let manifest = hub.resolve(&model, &filter).await?;
                hub.install_manifest(manifest).await
            };
            let installing = tokio::time::timeout(timeout, started)
                .await
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_error",
                        Some("hub_timeout"),
                        "The hub did not answer in time.",
                    )
                })?
                .map_err(|e| hub_error(&e))?;
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
            Ok(Some(Installed { path, bytes }))
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
            Ok(Some(Installed { path: installed.path, bytes: installed.bytes }))
        }
    }
}

/// Deletes an installed model's files (only a model directory inside the model repository).
pub async fn purge(st: &AppState, path: &Path) -> Result<(), String> {
    match st.hub.get() {
        Some(hub) => hub.remove_path(path).await.map(|_| ()).map_err(|e| e.to_string()),
        None => Err("no model repository configured".into()),
    }
}
