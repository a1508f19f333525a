//! `POST /v1/models/load`, `POST /v1/models/unload`, `GET /v1/models/{id}` (scope `admin` for
//! the first two): deployment is an API call to the node itself.
//!
//! Everything that can be checked before work starts is checked synchronously and answered
//! with a precise 4xx (bad id, unknown GPU, not enough VRAM, unknown or unsafe hub model, not
//! enough disk); the download and the backend load then run in the background and the answer
//! is `202` with the model in state `loading` and the URL to follow its progress.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use edgeroute_core::capacity::{GpuLoad, PlacementError, check_fit};
use edgeroute_http::ApiError;
use edgeroute_proto::headers::is_hint_token;
use edgeroute_proto::models::ModelState;
use http::StatusCode;
use serde_json::json;
use tokio::time::Instant;

use super::admin::{Action, log_action};
use super::{AppState, Tenant};
use crate::backend::Activation;
use crate::config::ms;
use crate::models::{LoadRequest, Record, Source, Unload, UnloadRequest};

const MAX_BODY: usize = 64 * 1024;

/// Checks a load of `id` against the model registry of the policy file (`[policy] file`), read
/// now so a new policy needs no restart. A model the registry does not name is not governed;
/// an unreadable or invalid policy refuses every load (fail closed: the constraints it may
/// hold are data-sovereignty rules). The version the load provides: the registry's (the
/// given one, else the model's default) or, for a model it does not name, the given one.
async fn check_registry(
    st: &AppState,
    id: &str,
    version: Option<&str>,
) -> Result<Option<String>, ApiError> {
    let given = version.map(str::to_owned);
    let Some(file) = &st.policy_file else { return Ok(given) };
    let unusable = |why: String| {
        ApiError::unavailable(
            "policy_unavailable",
            format!(
                "This node cannot check the load against the fleet's model registry ({}: {why}); \
                 fix the policy file and retry.",
                file.display()
            ),
            5,
        )
    };
    let text = tokio::fs::read_to_string(file).await.map_err(|e| unusable(e.to_string()))?;
    let policy = edgeroute_policy::Policy::parse(&text).map_err(|e| unusable(e.to_string()))?;
    let Some(model) = policy.registry().model(id) else { return Ok(given) };
    let version = match version {
        Some(v) => v,
        None => &model.versions[model.default_version].id,
    };
    policy
        .check_placement(id, version, &st.region, st.jurisdiction.as_deref(), st.hardware)
        .map(|()| Some(version.to_owned()))
        .map_err(|e| match e {
            edgeroute_policy::PlacementError::UnknownVersion { .. } => {
                ApiError::invalid_request(Some("version"), e.to_string())
                    .with_code("unknown_version")
            }
            _ => ApiError::forbidden(
                "placement_violation",
                format!(
                    "{e} (node `{}`: region `{}`, jurisdiction `{}`, hardware `{}`), by the \
                     registry of policy `{}`.",
                    st.id,
                    st.region,
                    st.jurisdiction.as_deref().unwrap_or("unset"),
                    st.hardware.name(),
                    policy.version()
                ),
            ),
        })
}

fn conflict(code: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "invalid_request_error", Some(code), message)
}

fn record_response(status: StatusCode, r: &Record) -> Response {
    let mut v = serde_json::to_value(r).unwrap_or_else(|_| json!({}));
    if let Some(until) = r.drain_until {
        v["deadline_ms"] =
            json!(until.saturating_duration_since(Instant::now()).as_millis() as u64);
    }
    v["status_url"] = json!(format!("/v1/models/{}", r.id));
    (status, Json(v)).into_response()
}

pub async fn get_model(
    State(st): State<AppState>,
    id: Result<UrlPath<String>, PathRejection>,
) -> Result<Response, ApiError> {
    // An id that is not UTF-8 once percent-decoded is the caller's mistake, in OpenAI's shape.
    let UrlPath(id) = id.map_err(|e| ApiError::invalid_request(Some("id"), e.body_text()))?;
    st.models
        .get(&id)
        .map(|r| record_response(StatusCode::OK, &r))
        .ok_or_else(|| ApiError::model_not_found(&id))
}

/// The served id a source gets when the request names none.
fn default_id(source: &Source) -> Option<String> {
    match source {
        Source::Hub { repo, .. } => repo.rsplit('/').next().map(str::to_owned),
        Source::Path { path } => path.file_name().and_then(|n| n.to_str()).map(str::to_owned),
        Source::Config => None,
    }
}

/// A local directory is accepted only under an allowed root, after resolving symlinks.
fn check_local_path(path: &Path, roots: &[PathBuf]) -> Result<PathBuf, ApiError> {
    let bad = |m: String| ApiError::invalid_request(Some("path"), m);
    if !path.is_absolute() {
        return Err(bad("`path` must be absolute".into()));
    }
    let real = path
        .canonicalize()
        .map_err(|e| bad(format!("`{}` cannot be read: {e}", path.display())))?;
    if !real.is_dir() {
        return Err(bad(format!("`{}` is not a directory", path.display())));
    }
    let allowed = roots
        .iter()
        .filter_map(|r| r.canonicalize().ok())
        .any(|r| real.starts_with(&r) && real != r);
    if !allowed {
        return Err(ApiError::forbidden(
            "path_not_allowed",
            format!("`{}` is not under models.allowed_local_roots", path.display()),
        ));
    }
    Ok(real)
}

pub async fn load(
    State(st): State<AppState>,
    Extension(who): Extension<Tenant>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: LoadRequest = edgeroute_http::json::read_json(body, MAX_BODY).await?;
    let source = match (&req.model, &req.path) {
        (Some(repo), None) => {
            let revision = req.revision.clone().unwrap_or_else(|| "main".into());
            crate::fetch::validate_ref(repo, &revision)?;
            Source::Hub { repo: repo.clone(), revision }
        }
        (None, Some(p)) => {
            Source::Path { path: check_local_path(p, &st.models_cfg.allowed_local_roots)? }
        }
        _ => {
            return Err(ApiError::invalid_request(
                Some("model"),
                "Give exactly one of `model` (a hub repository id) or `path`.",
            ));
        }
    };
    let id = req.id.clone().or_else(|| default_id(&source)).unwrap_or_default();
    if !is_hint_token(&id) {
        return Err(ApiError::invalid_request(
            Some("id"),
            format!("`{id}` is not a valid model id: 1-128 characters of [A-Za-z0-9._:-]"),
        ));
    }

    // The fleet's registry: a registered model may be placed only where it is allowed.
    let version = check_registry(&st, &id, req.version.as_deref()).await?;

    // Placement: the GPU must exist and have room.
    let gpus: Vec<GpuLoad> = super::info::gpu_loads(&st.backend.gpus());
    let gpu = match &req.gpu {
        Some(g) => g.clone(),
        None => gpus.first().map(|g| g.id.clone()).unwrap_or_else(|| "gpu0".into()),
    };
    if let Some(cur) = st.models.get(&id)
        && cur.state == ModelState::Ready
        && cur.source == source
    {
        return Ok(record_response(StatusCode::OK, &cur));
    }
    let memory_hint = req.memory_mb.unwrap_or(0);
    check_fit(&gpu, memory_hint, &gpus).map_err(|e| match e {
        PlacementError::UnknownGpu(g) => ApiError::invalid_request(
            Some("gpu"),
            format!(
                "GPU `{g}` does not exist on this node (known: {})",
                gpus.iter().map(|g| g.id.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
        .with_code("unknown_gpu"),
        PlacementError::InsufficientMemory { gpu, needed_mb, free_mb } => conflict(
            "insufficient_gpu_memory",
            format!("`{id}` needs {needed_mb} MB on {gpu}, which has {free_mb} MB free"),
        ),
    })?;

    // Where a hub model goes in Triton: its name there, and the CUDA device of the GPU (its
    // position in the backend's list, checked above to exist).
    let triton_name = req.options.upstream_name.clone().unwrap_or_else(|| id.clone());
    let device = gpus.iter().position(|g| g.id == gpu).and_then(|i| u32::try_from(i).ok());
    let target = crate::fetch::TritonTarget { name: &triton_name, device: device.unwrap_or(0) };
    let sidecar = st.models_cfg.downloads == crate::config::Downloads::Sidecar;
    let load_time = match &st.backend {
        crate::backend::Backend::Sim(_) => {
            ms(req.options.load_time_ms.unwrap_or(st.models_cfg.sim_load_time_ms))
        }
        crate::backend::Backend::OpenAi(_) => Duration::from_millis(600_000),
    };

    // Hub models are resolved now (unless the sidecar downloads), so an unknown, gated or
    // unsafe model is a 4xx at once.
    let plan = crate::fetch::plan(&st, &source, &req, target, load_time).await?;

    let (record, started) =
        match st.models.begin_load(&id, Some(gpu.clone()), memory_hint, source.clone(), version) {
            Ok(x) => x,
            Err(cur) if matches!(cur.state, ModelState::Draining | ModelState::Unloading) => {
                return Err(conflict(
                    "model_unloading",
                    format!("`{id}` is being unloaded; load it again once it is gone"),
                ));
            }
            Err(cur) => {
                return Err(conflict(
                    "model_id_in_use",
                    format!(
                        "`{id}` is already {} from another source; unload it first",
                        serde_json::to_value(cur.state)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    ),
                ));
            }
        };
    if !started {
        return Ok(record_response(StatusCode::ACCEPTED, &record));
    }
    // A hub model this node downloads for Triton is converted here into a repository entry
    // on the GPU's device; one the sidecar downloads is converted there.
    let triton_device = match (&source, st.backend.triton()) {
        (Source::Hub { .. }, Some(_)) if !sidecar => device,
        _ => None,
    };
    if sidecar && matches!(source, Source::Hub { .. }) {
        st.models.set_ordered_as(&id, triton_name.clone());
    }
    let activation = Activation {
        id: id.clone(),
        gpu: Some(gpu),
        memory_mb: memory_hint,
        await_repository: triton_device.is_some(),
        upstream_name: req.options.upstream_name.clone(),
        load_time,
    };
    let task_st = st.clone();
    let task = tokio::spawn(async move {
        run_load(task_st, plan, activation, memory_hint == 0, triton_device).await
    });
    st.models.set_task(&id, task.abort_handle());
    tracing::info!(model = %id, ?source, "model load started");
    log_action(&st.id, &who, Action::ModelLoad, &id);
    Ok(record_response(StatusCode::ACCEPTED, &record))
}

/// Fetch, then (a hub model on Triton, `triton_device` set) convert into a Triton repository
/// entry on that CUDA device, then activate. Every failure marks the model `failed` with its
/// reason, which `/health`, `GET /v1/models/{id}` and the bus carry.
async fn run_load(
    st: AppState,
    plan: crate::fetch::Plan,
    mut a: Activation,
    estimate_memory: bool,
    triton_device: Option<u32>,
) {
    let id = a.id.clone();
    match crate::fetch::fetch(&st, &id, plan).await {
        Ok(Some(installed)) => {
            if estimate_memory {
                // Weights take about their file size in VRAM, plus working memory.
                a.memory_mb = (installed.bytes as f64 * 1.2 / (1024.0 * 1024.0)).ceil() as u64;
            }
            st.models.set_path(&id, installed.path.clone(), a.memory_mb);
            if let Some(device) = triton_device {
                let name = a.upstream_name.clone().unwrap_or_else(|| id.clone());
                match crate::fetch::lay_out_for_triton(&st, &name, device, &installed).await {
                    Ok(entry) => st.models.set_triton_entry(&id, entry),
                    Err(reason) => return st.models.mark_failed(&id, reason),
                }
            }
        }
        Ok(None) => {}
        Err(reason) => return st.models.mark_failed(&id, reason),
    }
    match st.backend.activate(&a).await {
        Ok(()) => {
            tracing::info!(model = %id, "model ready");
            st.models.mark_ready(&id);
        }
        Err(reason) => st.models.mark_failed(&id, format!("backend load failed: {reason}")),
    }
}

/// Unload is a drain for one model. A model with requests in flight is marked `draining` at
/// once (on the bus and in `/health`, so routing sends no new session here) and still serves
/// what is in flight and the turns of pinned sessions, every answer carrying
/// `x-edgeroute-migrate: reason=unload; deadline_ms=…; model=…`; the backend unload starts when
/// its last request ends or at `models.unload_drain_ms`, and the answer is `202` with
/// `state: "draining"`, `deadline_ms` and `in_flight`. An idle model (or any, with no drain
/// time) is unloaded before the answer, which is `200` with `state: "unloaded"`, as before.
pub async fn unload(
    State(st): State<AppState>,
    Extension(who): Extension<Tenant>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: UnloadRequest = edgeroute_http::json::read_json(body, MAX_BODY).await?;
    let now = Instant::now();
    let until = now + ms(st.models_cfg.unload_drain_ms);
    let Some(started) = st.models.begin_unload(&req.model, now, until) else {
        return Err(ApiError::model_not_found(&req.model));
    };
    log_action(&st.id, &who, Action::ModelUnload, &req.model);
    match started {
        Unload::Now(cur) => {
            finish_unload(&st, &cur, req.purge).await;
            Ok((StatusCode::OK, Json(json!({"id": cur.id, "state": "unloaded"}))).into_response())
        }
        Unload::InProgress(cur) => Ok(record_response(StatusCode::ACCEPTED, &cur)),
        Unload::Draining { record, until, in_flight, started } => {
            if started {
                tracing::info!(model = %record.id, in_flight, deadline_ms = st.models_cfg.unload_drain_ms, "model draining before unload");
                let task_st = st.clone();
                let id = record.id.clone();
                let purge = req.purge;
                tokio::spawn(async move {
                    if task_st.models.wait_drained(&id, until).await
                        && let Some(cur) = task_st.models.get(&id)
                    {
                        finish_unload(&task_st, &cur, purge).await;
                    }
                });
            }
            let mut v = serde_json::to_value(&record).unwrap_or_else(|_| json!({}));
            v["state"] = json!("draining");
            v["deadline_ms"] = json!(until.saturating_duration_since(now).as_millis() as u64);
            v["in_flight"] = json!(in_flight);
            v["status_url"] = json!(format!("/v1/models/{}", record.id));
            Ok((StatusCode::ACCEPTED, Json(v)).into_response())
        }
    }
}

/// The backend unload of a model already marked `unloading`, then its removal from the table
/// (published as `ModelUnloaded`): requests for it now get `404 model_not_found`.
async fn finish_unload(st: &AppState, cur: &Record, purge: bool) {
    if let Err(e) = st.backend.deactivate(&cur.id, None).await {
        tracing::warn!(model = %cur.id, error = %e, "backend unload failed; the model is unrouted anyway");
    }
    // Loaded by the sidecar: Triton's repository API is its, so the unload is an order too.
    if let Some(name) = &cur.ordered_as
        && let Err(e) = crate::fetch::order_unload(st, name, purge).await
    {
        tracing::warn!(model = %cur.id, error = %e, "could not order the sidecar to unload it");
    }
    if purge
        && let Some(name) = cur.triton_entry.as_deref().and_then(|p| p.file_name())
        && let Err(e) = crate::fetch::purge_entry(st, &name.to_string_lossy()).await
    {
        tracing::warn!(model = %cur.id, error = %e, "could not delete the model's Triton entry");
    }
    if purge
        && let Some(path) = &cur.path
        && let Err(e) = crate::fetch::purge(st, path).await
    {
        tracing::warn!(model = %cur.id, error = %e, "could not delete the model's files");
    }
    st.models.remove(&cur.id);
    tracing::info!(model = %cur.id, "model unloaded");
}
