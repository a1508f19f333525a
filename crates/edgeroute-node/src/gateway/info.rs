//! `GET /health`, `GET /v1/models`, `GET /metrics`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use edgeroute_core::capacity::{GpuLoad, pipeline_availability};
use edgeroute_proto::health::{
    DrainInfo, ModelHealth, NodeHealth, NodeStatus, Percentiles, PipelineHealth,
};
use edgeroute_proto::models::{ModelEntry, ModelList};
use http::{StatusCode, header};

use super::AppState;
use crate::lifecycle::Phase;

pub async fn health(State(st): State<AppState>) -> Response {
    let h = node_health(&st);
    let code = if h.ready || h.status == NodeStatus::Draining {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(h)).into_response()
}

fn pct(s: edgeroute_core::window::Summary) -> Percentiles {
    Percentiles { p50: s.p50_us as f64 / 1000.0, p99: s.p99_us as f64 / 1000.0, samples: s.count }
}

pub fn node_health(st: &AppState) -> NodeHealth {
    let now = st.telemetry.now();
    let figures = st.telemetry.figures();
    let phase = st.phase.load();
    let in_flight = st.telemetry.in_flight();
    let queue_depth = st.backend.queue_depth();
    let gpus = st.backend.gpus();
    let slots: u32 = gpus.iter().map(|g| g.slots).sum();
    let capacity = st.limits.max_concurrency;
    let t = &st.telemetry_cfg;
    let status = match &**phase {
        Phase::ShuttingDown { .. } => NodeStatus::ShuttingDown,
        Phase::Draining { .. } => NodeStatus::Draining,
        Phase::Serving
            if figures.requests >= t.degraded_min_samples
                && figures.error_rate > t.degraded_error_rate =>
        {
            NodeStatus::Degraded
        }
        // Full but healthy: at the admission cap, or a queue as deep as the GPU slots (a new
        // request would wait at least one whole generation).
        Phase::Serving if in_flight >= capacity || (slots > 0 && queue_depth >= slots) => {
            NodeStatus::Saturated
        }
        Phase::Serving => NodeStatus::Ready,
    };
    let drain = match &**phase {
        Phase::Draining { reason, to, until } => Some(DrainInfo {
            reason: reason.clone(),
            deadline_ms: until.saturating_sub(now).as_millis() as u64,
            to: to.clone(),
            drained: in_flight == 0,
        }),
        _ => None,
    };
    NodeHealth {
        status,
        ready: matches!(**phase, Phase::Serving),
        node_id: st.id.clone(),
        region: st.region.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_s: now.as_secs(),
        models: st
            .models
            .list()
            .into_iter()
            .map(|m| ModelHealth { id: m.id, state: m.state, gpu: m.gpu, version: m.version })
            .collect(),
        pipelines: pipelines(st, &gpus),
        gpus,
        queue_depth,
        in_flight,
        capacity,
        window_s: st.telemetry.window().as_secs(),
        ttft_ms: pct(figures.ttft),
        latency_ms: pct(figures.latency),
        error_rate: figures.error_rate,
        requests_in_window: figures.requests,
        drain,
        cost_per_1k: st.cost_per_1k,
        hardware: Some(st.hardware.name().to_owned()),
    }
}

/// The backend's GPU report in the shape the capacity logic takes.
pub fn gpu_loads(gpus: &[edgeroute_proto::health::GpuHealth]) -> Vec<GpuLoad> {
    gpus.iter()
        .map(|g| GpuLoad {
            id: g.id.clone(),
            slots: g.slots,
            busy: g.busy,
            queued: g.queued,
            memory_used_mb: g.memory_used_mb,
            memory_total_mb: g.memory_total_mb,
        })
        .collect()
}

fn pipelines(st: &AppState, gpus: &[edgeroute_proto::health::GpuHealth]) -> Vec<PipelineHealth> {
    if st.pipelines.is_empty() {
        return vec![];
    }
    let loads = gpu_loads(gpus);
    let placement = st.models.ready_placement();
    st.pipelines
        .iter()
        .map(|p| {
            let a = pipeline_availability(&p.id, &p.models, &placement, &loads);
            PipelineHealth {
                id: a.id,
                models: p.models.clone(),
                servable: a.servable,
                availability: a.availability,
                bottleneck_gpu: a.bottleneck,
                missing: a.missing,
            }
        })
        .collect()
}

pub async fn models(State(st): State<AppState>) -> Json<ModelList> {
    st.metrics.request("models", 200);
    let created = edgeroute_core::clock::unix_s(&st.clock);
    Json(ModelList {
        object: "list".into(),
        data: st
            .models
            .list()
            .into_iter()
            .map(|m| ModelEntry {
                id: m.id,
                object: "model".into(),
                created,
                owned_by: "edgeroute".into(),
                state: m.state,
                gpu: m.gpu,
                reason: m.reason,
            })
            .collect(),
    })
}

pub async fn metrics(State(st): State<AppState>) -> Response {
    let m = &st.metrics;
    m.in_flight.set(i64::from(st.telemetry.in_flight()));
    m.queue_depth.set(i64::from(st.backend.queue_depth()));
    if let Some(a) = &st.auth {
        m.auth_reload_failures.set(a.reload_failures() as i64);
    }
    m.sync_edge(&st.edge.snapshot());
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        m.render(),
    )
        .into_response()
}
