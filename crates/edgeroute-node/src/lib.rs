//! The edgeroute edge node: an OpenAI-compatible gateway in front of one inference backend.
//!
//! Everything a request touches lives here, on the node that serves it: authentication with
//! locally stored keys, per-tenant rate limits, the concurrency cap, drain state and the
//! telemetry reported in every response. Nothing on the request path calls a central service.
//!
//! - [`config`]: the TOML config, strictly parsed.
//! - [`gateway`]: routes and middleware (auth, rate limit, admission, response headers).
//! - [`backend`]: the simulator and OpenAI-compatible upstreams, behind one commit-point contract.
//! - [`telemetry`], [`lifecycle`]: sliding-window figures and the serving/draining/shutdown phases.
//!
//! The binary calls [`serve`]; tests call [`Node::build`] and drive [`Node::router`] directly.

pub mod backend;
pub mod config;
pub mod gateway;
pub mod lifecycle;
pub mod metrics;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use edgeroute_auth::KeyStore;
use edgeroute_http::Listener;
use http::HeaderValue;

pub use config::NodeConfig;
pub use gateway::{AppState, NodeState, UnixClock, system_clock};

use crate::backend::Backend;
use crate::config::ms;
use crate::gateway::TenantLimiter;
use crate::lifecycle::{Phase, Sessions};
use crate::metrics::Metrics;
use crate::telemetry::Telemetry;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("backend: {0}")]
    Backend(#[from] backend::BuildError),
    #[error("auth keys: {0}")]
    Auth(#[from] edgeroute_auth::AuthError),
    #[error("TLS: {0}")]
    Tls(#[from] edgeroute_http::tls::TlsError),
}

/// A built node: its shared state and config, ready to serve.
#[derive(Debug, Clone)]
pub struct Node {
    state: AppState,
    cfg: Arc<NodeConfig>,
}

impl Node {
    pub fn build(cfg: NodeConfig) -> Result<Node, NodeError> {
        Node::build_with_clock(cfg, system_clock())
    }

    /// As [`Node::build`], with the Unix clock used for token expiry and `created` fields.
    pub fn build_with_clock(cfg: NodeConfig, clock: UnixClock) -> Result<Node, NodeError> {
        cfg.validate()?;
        let auth = match &cfg.auth {
            Some(a) => Some(Arc::new(KeyStore::from_config(a)?)),
            None => {
                tracing::warn!(node = %cfg.node.id, "authentication is disabled (node.allow_unauthenticated): use only on loopback");
                None
            }
        };
        let l = &cfg.limits;
        let backend = Backend::from_config(&cfg.backend, l.max_concurrency)?;
        let node_header =
            HeaderValue::from_str(&cfg.node.id).map_err(|_| config::ConfigError::Invalid {
                key: "node.id".into(),
                message: "not a valid header value".into(),
            })?;
        let state = Arc::new(NodeState {
            id: cfg.node.id.clone(),
            region: cfg.node.region.clone(),
            node_header,
            limits: l.clone(),
            telemetry_cfg: cfg.telemetry.clone(),
            telemetry: Arc::new(Telemetry::new(cfg.telemetry.window_s)),
            phase: ArcSwap::from_pointee(Phase::Serving),
            sessions: Sessions::new(l.max_sessions, ms(l.session_ttl_ms)),
            backend,
            auth,
            limiter: TenantLimiter::new(l.rate_limit_per_s, l.rate_limit_burst),
            metrics: Metrics::default(),
            clock,
            seq: AtomicU64::new(0),
        });
        Ok(Node { state, cfg: Arc::new(cfg) })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn router(&self) -> axum::Router {
        gateway::router(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then: health turns not-ready, new
    /// requests are refused with a migrate hint, and after `not_ready_delay_ms` the listener
    /// closes while in-flight streams get `shutdown_grace_ms` to finish.
    pub async fn serve<L: Listener>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let tls = match &self.cfg.tls {
            Some(t) => {
                Some(edgeroute_http::tls::acceptor_from_pem_files(&t.cert_file, &t.key_file)?)
            }
            None => None,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut background = Vec::new();
        if let (Some(store), Some(a)) = (&self.state.auth, &self.cfg.auth)
            && a.reload_interval_ms > 0
        {
            background.push(edgeroute_auth::spawn_reloader(
                store.clone(),
                a.reload_interval(),
                stopped(),
            ));
        }
        let st = self.state.clone();
        let maint_stop = stopped();
        background.push(tokio::spawn(async move {
            tokio::pin!(maint_stop);
            loop {
                tokio::select! {
                    () = &mut maint_stop => break,
                    () = tokio::time::sleep(Duration::from_secs(30)) => st.limiter.maintain(),
                }
            }
        }));

        let st = self.state.clone();
        let limits = self.cfg.limits.clone();
        let drain_then_stop = async move {
            shutdown.await;
            let grace = ms(limits.shutdown_grace_ms);
            let delay = ms(limits.not_ready_delay_ms);
            st.phase
                .store(Arc::new(Phase::ShuttingDown { until: st.telemetry.now() + delay + grace }));
            tracing::info!(node = %st.id, not_ready_delay_ms = limits.not_ready_delay_ms, "shutting down: health is not-ready");
            tokio::time::sleep(delay).await;
        };
        tracing::info!(node = %self.cfg.node.id, region = %self.cfg.node.region, tls = tls.is_some(), "node serving");
        edgeroute_http::serve(
            listener,
            self.router(),
            self.cfg.limits.server_limits(),
            tls,
            drain_then_stop,
        )
        .await;
        let _ = stop_tx.send(true);
        for b in background {
            let _ = b.await;
        }
        Ok(())
    }
}
