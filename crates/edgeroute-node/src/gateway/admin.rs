//! Admin endpoints (scope `admin`, with an audience naming this node, its region or the
//! fleet; served on the admin listener when one is configured): drain control and, for the
//! simulator backend, run-time fault injection.
//!
//! Every admin action (drain start and stop, faults set, model load and unload) is logged by
//! [`log_action`] at `info` with target `edgeroute::admin`: the node, the token's subject and
//! the action.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use edgeroute_http::ApiError;
use edgeroute_proto::headers::is_hint_token;
use edgeroute_sim::Faults;
use http::StatusCode;
use serde::Deserialize;

use super::info::node_health;
use super::{AppState, Tenant};
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

/// An admin action, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    DrainStart,
    DrainStop,
    FaultsSet,
    ModelLoad,
    ModelUnload,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::DrainStart => "drain_start",
            Action::DrainStop => "drain_stop",
            Action::FaultsSet => "faults_set",
            Action::ModelLoad => "model_load",
            Action::ModelUnload => "model_unload",
        }
    }
}

/// Logs an admin action accepted on node `node` for `subject` (the token's `sub`, or
/// `anonymous` on a loopback admin listener without `[auth]`); `detail` is what it acted on
/// (a model id, the drain's reason, the faults).
pub fn log_action(node: &str, subject: &Tenant, action: Action, detail: &str) {
    tracing::info!(
        target: "edgeroute::admin",
        node,
        subject = &*subject.0,
        action = action.as_str(),
        detail,
        "admin action"
    );
}

/// Starts (or re-targets) a drain: new sessions are refused with a migrate hint, known sessions
/// are served until the deadline, in-flight requests finish.
pub async fn start_drain(
    State(st): State<AppState>,
    Extension(who): Extension<Tenant>,
    body: Body,
) -> Result<Response, ApiError> {
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
    log_action(&st.id, &who, Action::DrainStart, &reason);
    st.phase.store(Arc::new(Phase::Draining { reason, to: req.to.clone(), until }));
    st.models.emit(edgeroute_proto::topology::EventKind::NodeDraining {
        deadline_ms: deadline.as_millis() as u64,
        to: req.to,
    });
    Ok((StatusCode::ACCEPTED, Json(node_health(&st))).into_response())
}

/// Cancels a drain.
pub async fn stop_drain(
    State(st): State<AppState>,
    Extension(who): Extension<Tenant>,
) -> Result<Response, ApiError> {
    let cur = st.phase.load();
    match &**cur {
        Phase::Draining { .. } => {
            log_action(&st.id, &who, Action::DrainStop, "");
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

pub async fn set_faults(
    State(st): State<AppState>,
    Extension(who): Extension<Tenant>,
    body: Body,
) -> Result<Json<Faults>, ApiError> {
    let sim = simulator(&st)?;
    let faults: Faults = edgeroute_http::json::read_json(body, 64 * 1024).await?;
    sim.set_faults(faults.clone()).map_err(|e| ApiError::invalid_request(None, e.to_string()))?;
    tracing::warn!(node = %st.id, ?faults, "simulator faults changed");
    log_action(&st.id, &who, Action::FaultsSet, &format!("{faults:?}"));
    Ok(Json(sim.faults()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    use super::*;

    /// Records every event's target and fields as `key=value` text.
    #[derive(Default, Clone)]
    struct Capture(Arc<Mutex<Vec<String>>>);

    struct Fields(String);

    impl Visit for Fields {
        fn record_str(&mut self, field: &Field, value: &str) {
            self.0.push_str(&format!("{}={value} ", field.name()));
        }
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!("{}={value:?} ", field.name()));
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut f = Fields(format!("target={} ", event.metadata().target()));
            event.record(&mut f);
            if let Ok(mut v) = self.0.lock() {
                v.push(f.0);
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    #[test]
    fn an_admin_action_is_logged_with_the_subject_and_the_action() {
        let capture = Capture::default();
        tracing::subscriber::with_default(capture.clone(), || {
            log_action("tor-1", &Tenant(Arc::from("ops-alice")), Action::ModelLoad, "llama-3");
            log_action("tor-1", &Tenant(Arc::from("anonymous")), Action::DrainStop, "");
        });
        let lines = capture.0.lock().unwrap().clone();
        assert_eq!(lines.len(), 2, "{lines:?}");
        for want in [
            "target=edgeroute::admin",
            "node=tor-1",
            "subject=ops-alice",
            "action=model_load",
            "detail=llama-3",
        ] {
            assert!(lines[0].contains(want), "{want} in {}", lines[0]);
        }
        assert!(lines[1].contains("subject=anonymous") && lines[1].contains("action=drain_stop"));
    }
}
