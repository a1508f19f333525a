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
//! - [`fetch`], [`convert`]: hub downloads, and their layout as a Triton repository entry;
//!   [`orders`]: the same done by the GPU side's sidecar, for a gateway without the HF token.
//! - [`watcher`]: `edgeroute watch`, the sidecar that installs entries into Triton's repository.
//!
//! The binary calls [`serve`]; tests call [`Node::build`] and drive [`Node::router`] directly.

pub mod backend;
pub mod config;
pub mod convert;
pub mod fetch;
pub mod gateway;
pub mod lifecycle;
pub mod metrics;
pub mod models;
pub mod orders;
pub mod telemetry;
pub mod watcher;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use arc_swap::ArcSwap;
use edgeroute_auth::KeyStore;
use edgeroute_http::Listener;
use http::HeaderValue;

pub use config::NodeConfig;
pub use gateway::{AppState, NodeState, WallClock};

use crate::backend::Backend;
use crate::config::ms;
use crate::gateway::TenantLimiter;
use crate::lifecycle::{Phase, Sessions};
use crate::metrics::Metrics;
use crate::telemetry::Telemetry;

/// The publisher, shared by the model table's event sink and the shutdown path.
type SharedPublisher = Arc<std::sync::Mutex<Option<edgeroute_bus::Publisher>>>;

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
    #[error("admin.tls: {0}")]
    AdminTls(String),
    #[error("model repository: {0}")]
    Hub(#[from] edgeroute_hub::HubError),
    #[error("topology bus: {0}")]
    Bus(#[from] edgeroute_bus::BusError),
}

/// Builds a node from `cfg` and serves it on `listener` until `shutdown` resolves (then drains
/// as [`Node::serve`] does): all that `edgeroute node` runs.
pub async fn serve<L: Listener>(
    cfg: NodeConfig,
    listener: L,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    Node::build(cfg)?.serve(listener, shutdown).await
}

/// A built node: its shared state and config, ready to serve.
#[derive(Clone)]
pub struct Node {
    state: AppState,
    cfg: Arc<NodeConfig>,
    /// A bus handed in by the caller (the embedded bus shared with discovery in one process).
    bus: Option<edgeroute_bus::Bus>,
    /// Wraps the gateway's router before serving (a lab's measurement layer).
    wrap: Option<RouterWrap>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.cfg.node.id)
            .field("bus", &self.bus.is_some())
            .field("wrapped", &self.wrap.is_some())
            .finish_non_exhaustive()
    }
}

/// See [`Node::wrap_router`].
pub type RouterWrap = Arc<dyn Fn(axum::Router) -> axum::Router + Send + Sync>;

impl Node {
    pub fn build(cfg: NodeConfig) -> Result<Node, NodeError> {
        Node::build_with_clock(cfg, edgeroute_core::clock::system())
    }

    /// As [`Node::build`], with the Unix clock used for token expiry and `created` fields.
    pub fn build_with_clock(cfg: NodeConfig, clock: WallClock) -> Result<Node, NodeError> {
        cfg.validate()?;
        if let Some(w) = cfg.backend_exposure_warning() {
            tracing::warn!(node = %cfg.node.id, "{w}");
        }
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
            cost_per_1k: cfg.node.cost_per_1k,
            jurisdiction: cfg.node.jurisdiction.clone(),
            hardware: cfg.node.hardware,
            policy_file: cfg.policy.file.clone(),
            node_header,
            limits: l.clone(),
            telemetry_cfg: cfg.telemetry.clone(),
            telemetry: Arc::new(Telemetry::new(cfg.telemetry.window_s)),
            phase: ArcSwap::from_pointee(Phase::Serving),
            sessions: Sessions::new(l.max_sessions, ms(l.session_ttl_ms)),
            models: {
                let t = crate::models::ModelTable::new(clock.clone());
                for m in backend.models() {
                    t.insert_ready(&m.id, m.gpu, m.memory_mb);
                }
                t
            },
            models_cfg: cfg.models.clone(),
            hub: std::sync::OnceLock::new(),
            pipelines: cfg.pipelines.clone(),
            backend,
            auth,
            limiter: TenantLimiter::new(l.rate_limit_per_s, l.rate_limit_burst),
            tenants: gateway::admission::TenantSlots::new(l.tenant_concurrency()),
            bodies: gateway::admission::BodyBudget::new(
                l.max_buffered_body_bytes,
                l.tenant_max_share,
            ),
            realtime: gateway::realtime::Seats::new(l),
            edge: Arc::default(),
            forward_fields: match &cfg.backend {
                config::BackendConfig::Openai(o) => o.extra_fields.clone(),
                config::BackendConfig::Sim { .. } => vec![],
            },
            metrics: Metrics::default(),
            clock,
            seq: AtomicU64::new(0),
            load_header: gateway::LoadHeader::default(),
            anonymous: std::sync::Arc::from("anonymous"),
            response_ids: std::sync::Arc::from(format!("chatcmpl-{}-", cfg.node.id)),
        });
        Ok(Node { state, cfg: Arc::new(cfg), bus: None, wrap: None })
    }

    /// Publishes on `bus` (instead of the one `[bus]` configures).
    pub fn with_bus(mut self, bus: edgeroute_bus::Bus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Serves the gateway's router wrapped by `wrap` (layers of the caller's own: a lab
    /// measuring what each request does on the node). Nothing in production uses it.
    pub fn wrap_router(mut self, wrap: RouterWrap) -> Self {
        self.wrap = Some(wrap);
        self
    }

    /// The URL the node announces: `node.public_url`, else derived from the bound address.
    fn public_url(&self, bound: Option<std::net::SocketAddr>) -> String {
        if let Some(u) = &self.cfg.node.public_url {
            return u.clone();
        }
        let scheme = if self.cfg.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", bound.unwrap_or(self.cfg.node.listen))
    }

    /// Starts the topology publisher: announces the node with its ready models, then every
    /// change. A dead bus never stops the node: the publisher buffers and catches up.
    async fn start_publisher(
        &self,
        bound: Option<std::net::SocketAddr>,
    ) -> Result<Option<SharedPublisher>, NodeError> {
        let bus = match (&self.bus, &self.cfg.bus) {
            (Some(b), _) => b.clone(),
            (None, Some(cfg)) => edgeroute_bus::Bus::connect(cfg).await?,
            (None, None) => return Ok(None),
        };
        let options = edgeroute_bus::PublisherOptions::from_config(bus.config());
        let epoch = edgeroute_core::clock::unix_ms();
        let identity = edgeroute_bus::NodeIdentity {
            node_id: self.cfg.node.id.clone(),
            region: self.cfg.node.region.clone(),
            url: self.public_url(bound),
            epoch,
        };
        let publisher =
            edgeroute_bus::Publisher::spawn(bus, identity, options, edgeroute_bus::system_clock())?;
        for m in self.state.models.list() {
            if m.state == edgeroute_proto::models::ModelState::Ready {
                publisher.publish(edgeroute_proto::topology::EventKind::ModelReady {
                    model: m.id,
                    gpu: m.gpu,
                    version: m.version,
                });
            }
        }
        let shared: SharedPublisher = Arc::new(std::sync::Mutex::new(Some(publisher)));
        let p = shared.clone();
        self.state.models.set_sink(Arc::new(move |kind| {
            if let Ok(guard) = p.lock()
                && let Some(publisher) = guard.as_ref()
            {
                publisher.publish(kind);
            }
        }));
        Ok(Some(shared))
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// The public listener's router: inference, `/health`, `/metrics`, and the admin routes
    /// only when no admin listener is configured and `[auth]` is.
    pub fn router(&self) -> axum::Router {
        gateway::router(self.state.clone(), gateway::Plane::Public, self.cfg.admin_listener())
    }

    /// The admin listener's router (`admin.listen`): the admin routes, `/health`, `/metrics`.
    pub fn admin_router(&self) -> axum::Router {
        gateway::router(self.state.clone(), gateway::Plane::Admin, true)
    }

    /// Serves on `listener` until `shutdown` resolves, then: health turns not-ready, new
    /// requests are refused with a migrate hint, and after `not_ready_delay_ms` the listener
    /// closes while in-flight streams get `shutdown_grace_ms` to finish.
    ///
    /// With `admin.listen` configured, the admin plane is served on that address too (bound
    /// here); see [`Node::serve_planes`] to hand in both listeners.
    pub async fn serve<L: Listener>(
        self,
        listener: L,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let admin = match self.cfg.admin.listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                config::ConfigError::Invalid {
                    key: "admin.listen".into(),
                    message: format!("cannot listen on {addr}: {e}"),
                }
            })?),
            None => None,
        };
        self.serve_planes(listener, admin, shutdown).await
    }

    /// As [`Node::serve`], with the admin plane on `admin` (when given; it must be given when
    /// `admin.listen` is configured, or the admin routes are served nowhere). The admin
    /// listener is plaintext on loopback (config validation refuses anything else) and stops
    /// with the public one.
    pub async fn serve_planes<L: Listener, A: Listener>(
        self,
        listener: L,
        admin: Option<A>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        let tls = match &self.cfg.tls {
            Some(t) => Some(t.acceptor()?),
            None => None,
        };
        let publisher = self.start_publisher(listener.local_addr()).await?;
        if let Some(root) = &self.cfg.models.repository {
            let client = edgeroute_hub::HubClient::new(self.cfg.models.hub.clone())?;
            let icfg = edgeroute_hub::InstallerConfig {
                repo_root: root.clone(),
                disk_margin_bytes: self.cfg.models.disk_margin_mb * 1024 * 1024,
            };
            // Every install is sealed for `edgeroute watch` when a seal key is configured; a
            // key that cannot sign stops the node here, not at its first install.
            let seal = match (&self.cfg.models.seal_key_file, &self.cfg.models.seal_kid) {
                (Some(file), Some(kid)) => {
                    let bad = |e: String| edgeroute_hub::HubError::Config {
                        reason: format!("models.seal_key_file {}: {e}", file.display()),
                    };
                    let pem = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
                    Some(
                        edgeroute_hub::SealSigner::from_pem(&pem, kid, &self.cfg.node.id)
                            .map_err(|e| bad(e.to_string()))?,
                    )
                }
                _ => None,
            };
            let probe = std::sync::Arc::new(edgeroute_hub::StatvfsProbe);
            let installer = edgeroute_hub::Installer::open_with(icfg, client, probe, seal).await?;
            let _ = self.state.hub.set(installer);
        }
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
        // Inference requests skip the router's layers, unless a wrapping layer must see them.
        let app = match &self.wrap {
            Some(wrap) => gateway::Gateway::new(self.state.clone(), wrap(self.router()), false),
            None => gateway::Gateway::new(self.state.clone(), self.router(), true),
        };
        let limits = edgeroute_http::ServerLimits {
            counters: self.state.edge.clone(),
            ..self.cfg.limits.server_limits()
        };
        let admin_plane = match admin {
            Some(admin) => {
                let tls = self.cfg.admin.tls.as_ref().map(admin_acceptor).transpose()?;
                tracing::info!(node = %self.cfg.node.id, addr = ?admin.local_addr(), mtls = tls.is_some(), "admin plane serving");
                let app = self.admin_router();
                let admin_limits = self.cfg.limits.server_limits();
                let stop = stopped();
                Some(tokio::spawn(edgeroute_http::serve(admin, app, admin_limits, tls, stop)))
            }
            None => None,
        };
        edgeroute_http::serve(listener, app, limits, tls, drain_then_stop).await;
        if let Some(p) = publisher {
            let taken = p.lock().ok().and_then(|mut g| g.take());
            if let Some(p) = taken
                && !p.shutdown(Duration::from_secs(2)).await
            {
                tracing::warn!("topology bus: the node-down event may not have reached the bus");
            }
        }
        let _ = stop_tx.send(true);
        if let Some(a) = admin_plane {
            let _ = a.await;
        }
        for b in background {
            let _ = b.await;
        }
        Ok(())
    }
}

/// The admin listener's acceptor: its certificate, and client certificates required, verified
/// against `client_ca_file` (rustls' WebPKI verifier on the ring provider, as the public
/// listener's TLS).
fn admin_acceptor(t: &config::AdminTls) -> Result<edgeroute_http::tls::TlsAcceptor, NodeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let err = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        NodeError::AdminTls(format!("{what} {}: {e}", path.display()))
    };
    let certs = |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, NodeError> {
        let certs: Vec<_> = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| err("cannot read certificates from", path, &e))?;
        if certs.is_empty() {
            return Err(err("no certificate in", path, &"empty"));
        }
        Ok(certs)
    };
    let chain = certs(&t.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&t.key_file)
        .map_err(|e| err("cannot read the private key", &t.key_file, &e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs(&t.client_ca_file)? {
        roots.add(ca).map_err(|e| err("bad CA certificate in", &t.client_ca_file, &e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| err("client CA", &t.client_ca_file, &e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| NodeError::AdminTls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| err("certificate and key", &t.cert_file, &e))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(edgeroute_http::tls::TlsAcceptor::from(Arc::new(cfg)))
}
