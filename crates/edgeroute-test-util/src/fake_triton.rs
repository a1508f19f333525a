//! A fake NVIDIA Triton: the model repository API (KServe v2 extension) over a real directory,
//! plus an OpenAI-compatible frontend that answers only for models Triton has loaded.
//!
//! Faithful where the node depends on it: `POST /v2/repository/index` lists every model
//! directory with its state; `POST /v2/repository/models/{name}/load` loads only a directory
//! that exists and holds a `config.pbtxt` (else 400 with Triton's error shape);
//! `…/unload` makes it `UNAVAILABLE`; `GET /v2/models/{name}/ready` answers 200 only when
//! ready. Inference goes to a simulator whose loaded models follow Triton's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgeroute_sim::{SimConfig, SimModel, Simulator};
use http::StatusCode;
use serde_json::json;

#[derive(Clone)]
pub struct FakeTriton {
    inner: Arc<Inner>,
}

struct Inner {
    repository: PathBuf,
    /// name → (state, reason)
    states: Mutex<BTreeMap<String, (&'static str, String)>>,
    sim: Arc<Simulator>,
    load_delay: Duration,
    pub loads: AtomicUsize,
    /// `--http-restricted-api=model-repository:<name>=<value>`: the header repository calls
    /// must carry.
    restricted: Option<(String, String)>,
}

impl std::fmt::Debug for FakeTriton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeTriton")
            .field("repository", &self.inner.repository)
            .finish_non_exhaustive()
    }
}

impl FakeTriton {
    /// A Triton serving models from `repository`, taking `load_delay` to load one.
    pub fn new(repository: impl Into<PathBuf>, load_delay: Duration) -> Self {
        let cfg = SimConfig {
            ttft_base_ms: 2,
            prefill_us_per_token: 0,
            tokens_per_s: 2000.0,
            models: vec![],
            ..SimConfig::default()
        };
        let sim = Arc::new(Simulator::new(cfg).expect("valid simulator config"));
        FakeTriton {
            inner: Arc::new(Inner {
                repository: repository.into(),
                states: Mutex::new(BTreeMap::new()),
                sim,
                load_delay,
                loads: AtomicUsize::new(0),
                restricted: None,
            }),
        }
    }

    /// As [`FakeTriton::new`], started with `--http-restricted-api=model-repository:name=value`:
    /// repository calls without that header are refused (403, as Triton does).
    pub fn restricted(
        repository: impl Into<PathBuf>,
        load_delay: Duration,
        name: &str,
        value: &str,
    ) -> Self {
        let mut t = Self::new(repository, load_delay);
        if let Some(inner) = Arc::get_mut(&mut t.inner) {
            inner.restricted = Some((name.to_ascii_lowercase(), value.to_owned()));
        }
        t
    }

    /// How many load requests Triton received.
    pub fn loads(&self) -> usize {
        self.inner.loads.load(Ordering::SeqCst)
    }

    pub fn state_of(&self, name: &str) -> Option<&'static str> {
        self.inner.states.lock().ok()?.get(name).map(|(s, _)| *s)
    }

    pub fn router(&self) -> Router {
        let chat = edgeroute_sim::server::router(self.inner.sim.clone());
        let repository = Router::new()
            .route("/v2/repository/index", post(index))
            .route("/v2/repository/models/{name}/load", post(load))
            .route("/v2/repository/models/{name}/unload", post(unload))
            .route_layer(axum::middleware::from_fn_with_state(self.clone(), restricted_api));
        Router::new()
            .route("/v2/health/ready", get(|| async { StatusCode::OK }))
            .merge(repository)
            .route("/v2/models/{name}/ready", get(ready))
            .with_state(self.clone())
            .merge(chat)
    }
}

async fn restricted_api(
    State(t): State<FakeTriton>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some((name, value)) = &t.inner.restricted
        && req.headers().get(name.as_str()).and_then(|v| v.to_str().ok()) != Some(value.as_str())
    {
        return triton_error(
            StatusCode::FORBIDDEN,
            format!("This API is restricted, expecting header '{name}'"),
        );
    }
    next.run(req).await
}

fn triton_error(status: StatusCode, msg: String) -> Response {
    (status, Json(json!({ "error": msg }))).into_response()
}

async fn index(State(t): State<FakeTriton>) -> Response {
    let mut out = Vec::new();
    let states = t.inner.states.lock().map(|s| s.clone()).unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir(&t.inner.repository) {
        let mut names: Vec<String> = rd
            .filter_map(Result::ok)
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        for n in names {
            match states.get(&n) {
                Some((s, reason)) => {
                    out.push(json!({"name": n, "version": "1", "state": s, "reason": reason}))
                }
                None => out.push(json!({"name": n})),
            }
        }
    }
    Json(out).into_response()
}

async fn load(State(t): State<FakeTriton>, Path(name): Path<String>) -> Response {
    t.inner.loads.fetch_add(1, Ordering::SeqCst);
    let dir = t.inner.repository.join(&name);
    if name.contains('/') || name.contains("..") || !dir.join("config.pbtxt").is_file() {
        return triton_error(
            StatusCode::BAD_REQUEST,
            format!("failed to load '{name}', failed to poll from model repository"),
        );
    }
    if let Ok(mut s) = t.inner.states.lock() {
        s.insert(name.clone(), ("LOADING", String::new()));
    }
    tokio::time::sleep(t.inner.load_delay).await;
    let _ = t.inner.sim.unload_model(&name);
    if let Err(e) =
        t.inner.sim.load_model(SimModel { memory_mb: 0, ..SimModel::new(name.clone(), "gpu0") })
    {
        return triton_error(StatusCode::BAD_REQUEST, format!("failed to load '{name}': {e}"));
    }
    if let Ok(mut s) = t.inner.states.lock() {
        s.insert(name, ("READY", String::new()));
    }
    (StatusCode::OK, Json(json!({}))).into_response()
}

async fn unload(State(t): State<FakeTriton>, Path(name): Path<String>) -> Response {
    let known = t
        .inner
        .states
        .lock()
        .map(|mut s| s.insert(name.clone(), ("UNAVAILABLE", "unloaded".into())).is_some())
        .unwrap_or(false);
    t.inner.sim.unload_model(&name);
    if !known {
        return triton_error(
            StatusCode::BAD_REQUEST,
            format!("failed to unload '{name}', no version is available"),
        );
    }
    (StatusCode::OK, Json(json!({}))).into_response()
}

async fn ready(State(t): State<FakeTriton>, Path(name): Path<String>) -> StatusCode {
    match t.inner.states.lock().ok().and_then(|s| s.get(&name).map(|(st, _)| *st)) {
        Some("READY") => StatusCode::OK,
        _ => StatusCode::BAD_REQUEST,
    }
}
