//! Admin endpoints (scope `admin`): drain control and, for the simulator backend, run-time
//! fault injection.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use edgeroute_http::ApiError;
use edgeroute_proto::headers::is_hint_token;
use edgeroute_sim::Faults;
use http::StatusCode;
use serde::Deserialize;

use super::AppState;
use super::info::node_health;
use crate::config::ms;
use crate::lifecycle::Phase;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// Why (`drain`, `maintenance`...). Default `drain`.
    #[serde(default)]
    reason: Option<String>,
    /// How long known sessions are still served. Default `limits.drain_deadline_ms`.
    #[serde(default)]
    deadline_ms: Option<u64>,
    /// A node to suggest to clients.
    #[serde(default)]
    to: Option<String>,
}

/// Starts (or re-targets) a drain: new sessions are refused with a migrate hint, known sessions
/// are served until the deadline, in-flight requests finish.
pub async fn start_drain(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|_| ApiError::payload_too_large(64 * 1024))?;
    let req: DrainRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        DrainRequest::default()
    } else {
        edgeroute_http::json::parse_json(&bytes)?
    };
    let reason = req.reason.unwrap_or_else(|| "drain".into());
    for (param, v) in [("reason", Some(&reason)), ("to", req.to.as_ref())] {
        if let Some(v) = v
            && !is_hint_token(v)
        {
            return Err(ApiError::invalid_request(
                Some(param),
                format!("`{param}` must be 1-128 characters of [A-Za-z0-9._:-]"),
            ));
        }
    }
    if matches!(**st.phase.load(), Phase::ShuttingDown { .. }) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            Some("shutting_down"),
            "The node is shutting down.",
        ));
    }
    let deadline = ms(req.deadline_ms.unwrap_or(st.limits.drain_deadline_ms));
    let until = st.telemetry.now() + deadline;
    tracing::info!(node = %st.id, %reason, deadline_ms = deadline.as_millis() as u64, to = ?req.to, "drain started");
    st.phase.store(Arc::new(Phase::Draining { reason, to: req.to.clone(), until }));
    st.models.emit(edgeroute_proto::topology::EventKind::NodeDraining {
        deadline_ms: deadline.as_millis() as u64,
        to: req.to,
    });
    Ok((StatusCode::ACCEPTED, Json(node_health(&st))).into_response())
}

/// Cancels a drain.
pub async fn stop_drain(State(st): State<AppState>) -> Result<Response, ApiError> {
    let cur = st.phase.load();
    match &**cur {
        Phase::Draining { .. } => {
            st.phase.store(Arc::new(Phase::Serving));
            st.models.emit(edgeroute_proto::topology::EventKind::NodeReady);
            tracing::info!(node = %st.id, "drain cancelled");
            Ok(Json(node_health(&st)).into_response())
        }
        Phase::Serving => Ok(Json(node_health(&st)).into_response()),
        Phase::ShuttingDown { .. } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            Some("shutting_down"),
            "The node is shutting down.",
        )),
    }
}

fn simulator(st: &AppState) -> Result<&Arc<edgeroute_sim::Simulator>, ApiError> {
    st.backend.simulator().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            Some("not_simulated"),
            "Fault injection needs the simulator backend.",
        )
    })
}

pub async fn get_faults(State(st): State<AppState>) -> Result<Json<Faults>, ApiError> {
    Ok(Json(simulator(&st)?.faults()))
}

pub async fn set_faults(State(st): State<AppState>, body: Body) -> Result<Json<Faults>, ApiError> {
    let sim = simulator(&st)?;
    let faults: Faults = edgeroute_http::json::read_json(body, 64 * 1024).await?;
    sim.set_faults(faults.clone()).map_err(|e| ApiError::invalid_request(None, e.to_string()))?;
    tracing::warn!(node = %st.id, ?faults, "simulator faults changed");
    Ok(Json(sim.faults()))
}
