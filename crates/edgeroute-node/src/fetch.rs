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
    /// Order the `edgeroute watch` sidecar to download, convert and load it
    /// (`models.downloads = "sidecar"`).
    Order(Box<OrderPlan>),
}

/// A load order, signed and ready to be placed on the shared volume.
#[derive(Debug)]
pub struct OrderPlan {
    pub order: crate::orders::Order,
    pub token: String,
    /// How long to follow the sidecar's answer.
    pub wait: std::time::Duration,
}

/// Where a hub model goes when this node converts or orders it for Triton: the Triton model
/// name and the CUDA device.
#[derive(Debug, Clone, Copy)]
pub struct TritonTarget<'a> {
    pub name: &'a str,
    pub device: u32,
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

/// Decides how `source` gets onto the backend: a local directory in place; a hub model
/// resolved now (this node downloads) or ordered from the sidecar (`target` is where it goes
/// in Triton; `wait`, how long to follow the sidecar).
pub async fn plan(
    st: &AppState,
    source: &Source,
    req: &LoadRequest,
    target: TritonTarget<'_>,
    wait: std::time::Duration,
) -> Result<Plan, ApiError> {
    match source {
        Source::Path { path } => Ok(Plan::Local { path: path.clone() }),
        Source::Config => Err(ApiError::internal("a configured model cannot be loaded again")),
        Source::Hub { repo, revision }
            if st.models_cfg.downloads == crate::config::Downloads::Sidecar =>
        {
            order_plan(st, repo, revision, req, target, wait)
        }
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

/// A signed load order for the sidecar. Only the request's shape is checked here: this node
/// cannot reach the hub, so an unknown or unsafe model fails later, with the sidecar's reason.
fn order_plan(
    st: &AppState,
    repo: &str,
    revision: &str,
    req: &LoadRequest,
    target: TritonTarget<'_>,
    wait: std::time::Duration,
) -> Result<Plan, ApiError> {
    use crate::orders::{Action, ORDER_TYP, ORDER_VERSION, Order};
    let hub = st.hub.get().ok_or_else(|| ApiError::internal("no model repository open"))?;
    edgeroute_hub::HubModel::parse(repo, Some(revision)).map_err(|e| hub_error(&e))?;
    if let Some(patterns) = &req.files {
        edgeroute_hub::FileFilter::new(patterns.iter()).map_err(|e| hub_error(&e))?;
    }
    let now_ms = (st.clock)();
    let order = Order {
        v: ORDER_VERSION,
        id: crate::orders::new_id(now_ms),
        model: target.name.to_owned(),
        action: Action::Load {
            repo: repo.to_owned(),
            revision: revision.to_owned(),
            files: req.files.clone(),
            device: target.device,
        },
        iat: now_ms / 1000,
    };
    crate::orders::check_order(&order).map_err(|e| {
        ApiError::invalid_request(Some("id"), format!("cannot order `{}` loaded: {e}", target.name))
    })?;
    let token = hub
        .sign_typed(ORDER_TYP, &order)
        .map_err(|e| ApiError::internal(format!("signing the load order: {e}")))?
        .ok_or_else(|| ApiError::internal("orders need models.seal_key_file"))?;
    Ok(Plan::Order(Box::new(OrderPlan { order, token, wait })))
}

/// Places `token` (a signed order for Triton model `name`) on the shared volume.
pub async fn place_order(st: &AppState, name: &str, token: String) -> Result<(), String> {
    let hub = st.hub.get().ok_or("no model repository open")?;
    let (root, name) = (hub.repo_root().to_owned(), name.to_owned());
    tokio::task::spawn_blocking(move || crate::orders::place(&root, &name, &token))
        .await
        .map_err(|e| e.to_string())?
}

/// Orders the sidecar to unload Triton model `name` (and with `purge` delete its files there).
pub async fn order_unload(st: &AppState, name: &str, purge: bool) -> Result<(), String> {
    use crate::orders::{Action, ORDER_TYP, ORDER_VERSION, Order};
    let hub = st.hub.get().ok_or("no model repository open")?;
    let now_ms = (st.clock)();
    let order = Order {
        v: ORDER_VERSION,
        id: crate::orders::new_id(now_ms),
        model: name.to_owned(),
        action: Action::Unload { purge },
        iat: now_ms / 1000,
    };
    let token = hub
        .sign_typed(ORDER_TYP, &order)
        .map_err(|e| e.to_string())?
        .ok_or("orders need models.seal_key_file")?;
    place_order(st, name, token).await
}

/// Runs the plan: `None` when there is nothing to install (here).
pub async fn fetch(st: &AppState, id: &str, plan: Plan) -> Result<Option<Installed>, String> {
    match plan {
        Plan::Order(p) => {
            let OrderPlan { order, token, wait } = *p;
            place_order(st, &order.model, token).await?;
            let shared = st.hub.get().ok_or("no model repository open")?.repo_root().to_owned();
            let deadline = tokio::time::Instant::now() + wait;
            let progress = |done: u64, total: Option<u64>| {
                st.models
                    .progress(id, crate::models::Progress { bytes_done: done, bytes_total: total });
            };
            crate::orders::follow(
                &shared,
                &order.model,
                &order.id,
                deadline,
                crate::models::UPSTREAM_POLL,
                progress,
            )
            .await
            .map_err(|e| format!("the watch sidecar could not load `{}`: {e}", order.model))?;
            Ok(None)
        }
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
