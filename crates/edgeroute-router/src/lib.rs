//! `edgeroute router`: edgeroute for clients that cannot embed the SDK — one shared,
//! multi-tenant, OpenAI-compatible service per region, making the SDK's decisions for them.
//!
//! A request goes through, in order:
//! 1. **auth** — the tenant's JWT (`[auth]`, the node's verifier and its cache); the tenant is
//!    its `sub`. The token must carry the `inference` scope. The router never substitutes a
//!    token of its own: the tenant's token goes to discovery (its residency and policy rules
//!    decide the list) and to the nodes (its limits and residency hold there too), through
//!    [`edgeroute_client::Client::session_as`].
//! 2. **rate** — per tenant, GCRA (`limits.rate_limit_per_s`, `rate_limit_burst`): 429 with
//!    `Retry-After`.
//! 3. **admission** — buffering, not shedding ([`admission`]): up to `total_in_flight` requests
//!    run, `tenant_in_flight` per tenant; past that a request waits in its tenant's bounded
//!    queue (interactive before batch: `x-edgeroute-priority`) until capacity frees or
//!    `queue_timeout_ms` passes. Queue full: 429 `tenant_queue_full`; waited too long: 503
//!    `router_busy`; both with `Retry-After` and a message saying what happened. A stream
//!    holds its place until its last byte.
//! 4. **the SDK's ladder** — the local proxy's front ([`edgeroute_proxy::Front`]): a session
//!    per (tenant, `x-edgeroute-session` or none, model or pipeline), failover, hedging,
//!    mid-stream continuation, placement misses, moves between turns, a policy's cascades and
//!    cloud pools. Answers name the node in `x-edgeroute-node` and the router in
//!    `x-edgeroute-router`.
//!
//! Who may call what: `POST /v1/chat/completions` — a tenant token with `inference`;
//! `GET /health` — anyone (no tenant data: counts only); `GET /metrics` — a token with the
//! `admin` scope. Without `[auth]` (`router.allow_unauthenticated`, loopback only) every route
//! is open and the nodes see no token.

pub mod admission;
pub mod config;
pub mod jobs;
pub mod share;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router as Routes;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgeroute_auth::{KeyStore, Scope};
use edgeroute_client::{Client, ClientConfig, ClientError};
use edgeroute_http::ApiError;
use edgeroute_proxy::{Caller, Front, ProxyConfig};
use futures_util::StreamExt;
use governor::{Quota, RateLimiter};
use http::{HeaderValue, StatusCode, header};
use tokio::sync::oneshot;

pub use config::RouterConfig;

use crate::admission::{Admission, Admit, Class, Refusal, Ticket};

/// The header naming the router replica that answered.
pub const ROUTER_HEADER: &str = "x-edgeroute-router";
/// The header a caller sets to `batch` for work that may wait behind interactive traffic.
pub const PRIORITY_HEADER: &str = "x-edgeroute-priority";

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("auth keys: {0}")]
    Auth(#[from] edgeroute_auth::AuthError),
    #[error("tls: {0}")]
    Tls(#[from] edgeroute_http::tls::TlsError),
    #[error("client: {0}")]
    Client(#[from] ClientError),
    #[error(transparent)]
    Jobs(#[from] jobs::JobsError),
    #[error("bus: {0}")]
    Bus(#[from] edgeroute_bus::BusError),
}

type Limiter = RateLimiter<
    Arc<str>,
    governor::state::keyed::DefaultKeyedStateStore<Arc<str>>,
    governor::clock::DefaultClock,
>;

/// Counters `/metrics` reports.
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    unauthorized: AtomicU64,
    rate_limited: AtomicU64,
    queue_full: AtomicU64,
    queue_timeout: AtomicU64,
    waited: AtomicU64,
}

struct Shared {
    cfg: RouterConfig,
    front: Front,
    auth: Option<Arc<KeyStore>>,
    limiter: Limiter,
    gate: Arc<Gate>,
    id: HeaderValue,
    counters: Counters,
    /// `[jobs]`: files, batches, async requests.
    jobs: Option<Arc<jobs::Jobs>>,
    /// `[bus]`: where the replicas share their ejections.
    bus: Option<edgeroute_bus::Bus>,
    share: Arc<share::ShareCounters>,
}

/// A built router: its routes, and the key reloader to run beside them.
pub struct RouterService {
    shared: Arc<Shared>,
}

impl RouterService {
    pub fn build(cfg: RouterConfig) -> Result<RouterService, RouterError> {
        cfg.validate()?;
        let auth = cfg.auth.as_ref().map(KeyStore::from_config).transpose()?.map(Arc::new);
        let r = &cfg.router;
        let client = Client::new(ClientConfig {
            discovery: r.discovery.clone(),
            token: None,
            allow_plaintext: r.allow_plaintext,
            ca_file: r.ca_file.clone(),
            first_token_timeout: Duration::from_millis(r.first_token_timeout_ms),
            respect_node_capacity: r.respect_node_capacity,
            ..ClientConfig::default()
        })?;
        let l = &cfg.limits;
        let front = Front::new(
            client,
            ProxyConfig {
                max_body: l.max_body_bytes,
                max_sessions: l.max_sessions,
                session_idle: Duration::from_secs(l.session_idle_s),
                ..ProxyConfig::default()
            },
        );
        let quota =
            Quota::per_second(NonZeroU32::new(l.rate_limit_per_s).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(l.rate_limit_burst).unwrap_or(NonZeroU32::MIN));
        let id = HeaderValue::from_str(&r.id).unwrap_or(HeaderValue::from_static("router"));
        let gate = Arc::new(Gate::new(cfg.admission()));
        let shared = Shared {
            front,
            auth,
            limiter: RateLimiter::keyed(quota),
            gate,
            id,
            counters: Counters::default(),
            jobs: None,
            bus: None,
            share: Arc::default(),
            cfg,
        };
        Ok(RouterService { shared: Arc::new(shared) })
    }

    /// [`RouterService::build`], and the job store of `[jobs]` opened (its schema created).
    pub async fn open(cfg: RouterConfig) -> Result<RouterService, RouterError> {
        let bus = match &cfg.bus {
            Some(b) => Some(edgeroute_bus::Bus::connect(b).await?),
            None => None,
        };
        let bus_nats = match bus.as_ref().map(edgeroute_bus::Bus::transport) {
            Some(edgeroute_bus::Transport::Nats(n)) => Some(n.client().clone()),
            _ => None,
        };
        let jobs = match &cfg.jobs {
            Some(j) => Some(Arc::new(jobs::Jobs::open(j.clone(), &cfg.router.id, bus_nats).await?)),
            None => None,
        };
        let mut service = RouterService::build(cfg)?;
        if let Some(shared) = Arc::get_mut(&mut service.shared) {
            shared.jobs = jobs;
            shared.bus = bus;
        }
        Ok(service)
    }

    /// Shares ejections on `bus` (a handle the caller holds: replicas of one process on one
    /// embedded bus), in place of `[bus]`.
    pub fn with_bus(mut self, bus: edgeroute_bus::Bus) -> RouterService {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.bus = Some(bus);
        }
        self
    }

    /// The routes (see the crate docs for who may call each).
    pub fn routes(&self) -> Routes {
        Routes::new()
            .route("/v1/chat/completions", post(chat))
            .route(
                "/v1/files",
                post(jobs::api::upload_file).layer(axum::extract::DefaultBodyLimit::max(
                    self.shared.jobs.as_ref().map_or(0, |j| j.store.limits().max_file_bytes)
                        + (1 << 16),
                )),
            )
            .route("/v1/files/{id}", get(jobs::api::get_file))
            .route("/v1/files/{id}/content", get(jobs::api::file_content))
            .route("/v1/batches", post(jobs::api::create_batch).get(jobs::api::list_batches))
            .route("/v1/batches/{id}", get(jobs::api::get_batch))
            .route("/v1/batches/{id}/cancel", post(jobs::api::cancel_batch))
            .route("/v1/async/{id}", get(jobs::api::get_async))
            .route("/v1/async/{id}/cancel", post(jobs::api::cancel_async))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
            .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
            .with_state(self.shared.clone())
    }

    /// Serves on `listener` until `shutdown`, reloading auth keys beside it.
    pub async fn serve<L: edgeroute_http::Listener>(
        self,
        listener: L,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), RouterError> {
        let tls = self.shared.cfg.tls.as_ref().map(|t| t.acceptor()).transpose()?;
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let reloader = match (&self.shared.auth, &self.shared.cfg.auth) {
            (Some(store), Some(a)) if a.reload_interval_ms > 0 => Some(
                edgeroute_auth::spawn_reloader(store.clone(), a.reload_interval(), async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                }),
            ),
            _ => None,
        };
        let mut tasks = jobs::spawn(self.shared.clone(), stop_tx.subscribe());
        if let Some(bus) = self.shared.bus.clone() {
            let (client, id) =
                (self.shared.front.client().clone(), self.shared.cfg.router.id.clone());
            let counters = self.shared.share.clone();
            tasks.push(tokio::spawn(async move {
                let opts = share::ShareOptions::default();
                if let Err(e) = share::run(bus, client, id, opts, counters).await {
                    tracing::warn!(error = %e, "router replicas' sharing stopped");
                }
            }));
        }
        let limits = edgeroute_http::ServerLimits::default();
        edgeroute_http::serve(listener, self.routes(), limits, tls, shutdown).await;
        let _ = stop_tx.send(true);
        if let Some(r) = reloader {
            let _ = r.await;
        }
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        Ok(())
    }
}

/// Reads the router's config file and serves it: all `edgeroute router` runs.
pub async fn serve<L: edgeroute_http::Listener>(
    cfg: RouterConfig,
    listener: L,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), RouterError> {
    RouterService::open(cfg).await?.serve(listener, shutdown).await
}

/// A verified caller: who, with which token, and what the token says.
pub(crate) struct Authed {
    pub caller: Caller,
    pub verified: Arc<edgeroute_auth::Verified>,
}

/// The verified caller (`None` without `[auth]`), or the refusal.
pub(crate) fn verify(
    sh: &Shared,
    headers: &http::HeaderMap,
    scope: Scope,
) -> Result<Option<Authed>, Response> {
    let Some(store) = &sh.auth else { return Ok(None) };
    let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let now = edgeroute_core::clock::unix_ms() / 1000;
    let token = edgeroute_auth::parse_bearer(header);
    let verified = token.and_then(|t| store.authenticate(t, now).map(|v| (t, v)));
    match verified {
        Ok((t, v)) if v.scope.contains(scope) => Ok(Some(Authed {
            caller: Caller { tenant: v.tenant.to_string(), bearer: Arc::from(t) },
            verified: v,
        })),
        Ok(_) => Err(ApiError::forbidden(
            "insufficient_scope",
            format!("this route needs a token with the `{}` scope", scope.as_str()),
        )
        .into_response()),
        Err(e) if e.http_status() == 403 => {
            Err(ApiError::forbidden(e.api_code(), e.to_string()).into_response())
        }
        Err(e) => Err(ApiError::unauthorized(e.api_code(), e.to_string()).into_response()),
    }
}

/// The verified caller, or the refusal.
fn authenticate(sh: &Shared, req: &Request, scope: Scope) -> Result<Option<Caller>, Response> {
    verify(sh, req.headers(), scope).map(|a| a.map(|a| a.caller))
}

fn too_many(code: &str, message: String, retry_after: Duration) -> Response {
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some(code), message)
        .with_header(header::RETRY_AFTER, secs.to_string())
        .into_response()
}

async fn chat(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    sh.counters.requests.fetch_add(1, Ordering::Relaxed);
    let caller = match authenticate(&sh, &req, Scope::Inference) {
        Ok(c) => c,
        Err(refusal) => {
            sh.counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            return refusal;
        }
    };
    let class = match req.headers().get(PRIORITY_HEADER).map(|v| v.as_bytes()) {
        None | Some(b"interactive") => Class::Interactive,
        Some(b"batch") => Class::Batch,
        Some(_) => {
            return ApiError::invalid_request(
                None,
                format!("`{PRIORITY_HEADER}` is `interactive` (the default) or `batch`"),
            )
            .with_code("invalid_header")
            .into_response();
        }
    };
    let tenant: Arc<str> = Arc::from(caller.as_ref().map_or("anonymous", |c| c.tenant.as_str()));
    if let Err(not_until) = sh.limiter.check_key(&tenant) {
        sh.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
        let wait = not_until
            .wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
        let l = &sh.cfg.limits;
        return too_many(
            "rate_limit_exceeded",
            format!(
                "tenant `{tenant}` is over its {} requests/s (burst {}); retry after {} ms",
                l.rate_limit_per_s,
                l.rate_limit_burst,
                wait.as_millis()
            ),
            wait,
        );
    }
    // `Prefer: respond-async`: stored now, run by the job workers, answered by poll or webhook.
    if jobs::api::wants_async(req.headers()) {
        let mut res = jobs::api::submit_async(sh.clone(), req).await;
        res.headers_mut().insert(ROUTER_HEADER, sh.id.clone());
        return res;
    }
    let permit = match sh.gate.enter(tenant.clone(), class).await {
        Ok((p, waited)) => {
            if waited {
                sh.counters.waited.fetch_add(1, Ordering::Relaxed);
            }
            p
        }
        Err(Refusal::QueueFull) => {
            sh.counters.queue_full.fetch_add(1, Ordering::Relaxed);
            let l = &sh.cfg.limits;
            return too_many(
                "tenant_queue_full",
                format!(
                    "tenant `{tenant}` has {} requests running and {} waiting, its bounds: every eligible node is busy; retry shortly",
                    l.tenant_in_flight, l.tenant_queue
                ),
                Duration::from_secs(1),
            );
        }
        Err(Refusal::Timeout) => {
            sh.counters.queue_timeout.fetch_add(1, Ordering::Relaxed);
            let ms = sh.cfg.limits.queue_timeout_ms;
            let secs = (ms / 1000).max(1);
            return ApiError::unavailable(
                "router_busy",
                format!(
                    "waited {ms} ms for capacity ({} class) and none freed: the fleet behind this router is saturated; retry in {secs} s",
                    class.name()
                ),
                secs,
            )
            .into_response();
        }
    };
    let res = edgeroute_proxy::chat_for(&sh.front, caller.as_ref(), req).await;
    let (mut parts, body) = res.into_parts();
    parts.headers.insert(ROUTER_HEADER, sh.id.clone());
    // The place is held until the answer's last byte (a stream's end), then given to the next
    // waiter.
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _held = &permit;
        chunk
    }));
    Response::from_parts(parts, body)
}

#[derive(serde::Serialize)]
struct HealthBody<'a> {
    status: &'static str,
    router: &'a str,
    region: &'a str,
    in_flight: u32,
    waiting: usize,
    sessions: usize,
}

async fn health(State(sh): State<Arc<Shared>>) -> Response {
    let (in_flight, waiting) = sh.gate.counts();
    let mut res = axum::Json(HealthBody {
        status: "ready",
        router: &sh.cfg.router.id,
        region: &sh.cfg.router.region,
        in_flight,
        waiting,
        sessions: sh.front.sessions(),
    })
    .into_response();
    res.headers_mut().insert(ROUTER_HEADER, sh.id.clone());
    res
}

async fn metrics(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    if let Err(refusal) = authenticate(&sh, &req, Scope::Admin) {
        return refusal;
    }
    let c = &sh.counters;
    let (in_flight, waiting) = sh.gate.counts();
    let mut out = String::new();
    for (name, help, v) in [
        ("requests", "Chat requests received", c.requests.load(Ordering::Relaxed)),
        (
            "unauthorized",
            "Requests refused by auth (401/403)",
            c.unauthorized.load(Ordering::Relaxed),
        ),
        (
            "rate_limited",
            "Requests over their tenant's rate (429)",
            c.rate_limited.load(Ordering::Relaxed),
        ),
        (
            "queue_full",
            "Requests refused with their tenant's queue full (429)",
            c.queue_full.load(Ordering::Relaxed),
        ),
        (
            "queue_timeout",
            "Requests that waited too long for capacity (503)",
            c.queue_timeout.load(Ordering::Relaxed),
        ),
        ("waited", "Requests that waited for capacity, then ran", c.waited.load(Ordering::Relaxed)),
    ] {
        out.push_str(&format!(
            "# HELP edgeroute_router_{name} {help}.\n# TYPE edgeroute_router_{name} counter\nedgeroute_router_{name}_total {v}\n"
        ));
    }
    for (name, help, v) in [
        ("in_flight", "Requests running", in_flight as usize),
        ("waiting", "Requests waiting for capacity", waiting),
        ("sessions", "Sessions in the table", sh.front.sessions()),
    ] {
        out.push_str(&format!(
            "# HELP edgeroute_router_{name} {help}.\n# TYPE edgeroute_router_{name} gauge\nedgeroute_router_{name} {v}\n"
        ));
    }
    if let Some(j) = &sh.jobs {
        let c = &j.counters;
        for (name, help, v) in [
            ("claimed", "Job items claimed by this replica", &c.claimed),
            ("succeeded", "Job items answered", &c.succeeded),
            ("failed", "Job items failed for good", &c.failed),
            ("requeued", "Job items given back for want of capacity", &c.requeued),
            ("saturated", "Job item tries the fleet had no room for, tried again", &c.saturated),
            ("aborted", "Job items aborted (cancel, expiry)", &c.aborted),
            ("stale", "Job item results dropped: another replica owned the item", &c.stale),
            ("webhooks_sent", "Webhook attempts answered 2xx", &c.webhooks_sent),
            ("webhooks_failed", "Webhook attempts that failed", &c.webhooks_failed),
        ] {
            out.push_str(&format!(
                "# HELP edgeroute_router_jobs_{name} {help}.\n# TYPE edgeroute_router_jobs_{name} counter\nedgeroute_router_jobs_{name}_total {}\n",
                v.load(Ordering::Relaxed)
            ));
        }
    }
    let c = &sh.share;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    for (name, help, v) in [
        (
            "published",
            "Ejections, recoveries and policy versions this replica told the others",
            n(&c.published),
        ),
        ("applied_ejections", "Other replicas' ejections applied here", n(&c.applied_ejections)),
        ("applied_rejoins", "Other replicas' recoveries applied here", n(&c.applied_rejoins)),
        (
            "applied_policy_versions",
            "Other replicas' routing policy versions taken in (lists revalidated)",
            n(&c.applied_policy_versions),
        ),
        (
            "ignored",
            "Messages ignored (stale, malformed, another version)",
            n(&c.ignored_stale) + n(&c.ignored_malformed) + n(&c.ignored_other_version),
        ),
    ] {
        out.push_str(&format!(
            "# HELP edgeroute_router_share_{name} {help}.\n# TYPE edgeroute_router_share_{name} counter\nedgeroute_router_share_{name}_total {v}\n"
        ));
    }
    let s = sh.front.client().stats();
    for (name, v) in [
        ("failovers", s.failovers),
        ("hedges", s.hedges),
        ("placement_misses", s.placement_misses),
        ("discoveries", s.discoveries),
    ] {
        out.push_str(&format!(
            "# TYPE edgeroute_router_client_{name} counter\nedgeroute_router_client_{name}_total {v}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// [`Admission`] behind a lock, with a channel per waiter: the I/O side of the admission.
struct Gate {
    inner: Mutex<(Admission, HashMap<Ticket, oneshot::Sender<()>>)>,
}

/// A running request's place; dropping it frees the place for the next waiter.
pub struct Permit {
    gate: Arc<Gate>,
    tenant: Arc<str>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release(&self.tenant);
    }
}

/// Takes a waiter out of its queue when its caller goes away before it ran (or, if it had
/// just been given a place, gives the place back).
struct Waiting<'a> {
    gate: &'a Arc<Gate>,
    tenant: &'a Arc<str>,
    ticket: Ticket,
    done: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.done && !self.gate.leave(self.tenant, self.ticket) {
            self.gate.release(self.tenant);
        }
    }
}

impl Gate {
    fn new(limits: admission::Limits) -> Gate {
        Gate { inner: Mutex::new((Admission::new(limits), HashMap::new())) }
    }

    fn counts(&self) -> (u32, usize) {
        let g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (g.0.in_flight(), g.0.waiting())
    }

    /// A place for `tenant`'s request: at once, after waiting (`true`), or refused.
    async fn enter(
        self: &Arc<Self>,
        tenant: Arc<str>,
        class: Class,
    ) -> Result<(Permit, bool), Refusal> {
        let now = tokio::time::Instant::now().into_std();
        let (ticket, until, mut rx) = {
            let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
            match g.0.request(&tenant, class, now) {
                Admit::Run(_) => return Ok((Permit { gate: self.clone(), tenant }, false)),
                Admit::Refused(r) => return Err(r),
                Admit::Wait { ticket, until } => {
                    let (tx, rx) = oneshot::channel();
                    g.1.insert(ticket, tx);
                    (ticket, until, rx)
                }
            }
        };
        let mut waiting = Waiting { gate: self, tenant: &tenant, ticket, done: false };
        let woken = tokio::time::timeout_at(tokio::time::Instant::from_std(until), &mut rx).await;
        waiting.done = true;
        drop(waiting);
        if let Ok(Ok(())) = woken {
            return Ok((Permit { gate: self.clone(), tenant }, true));
        }
        // The deadline passed. Under the lock: either the place was given meanwhile (taken:
        // the request runs), or the waiter leaves its queue.
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if rx.try_recv().is_ok() {
            drop(g);
            return Ok((Permit { gate: self.clone(), tenant }, true));
        }
        g.1.remove(&ticket);
        g.0.cancel(&tenant, ticket);
        Err(Refusal::Timeout)
    }

    /// `ticket` leaves its queue; `false` if it was no longer waiting (it had been started).
    fn leave(&self, tenant: &str, ticket: Ticket) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        g.1.remove(&ticket);
        g.0.cancel(tenant, ticket)
    }

    /// A running request of `tenant` ended: its place goes to the next waiters; a waiter
    /// whose caller went away meanwhile gives the place straight back.
    fn release(&self, tenant: &str) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let now = tokio::time::Instant::now().into_std();
        let mut ended: Vec<Arc<str>> = vec![Arc::from(tenant)];
        while let Some(t) = ended.pop() {
            for (ticket, owner) in g.0.release(&t, now) {
                let delivered = g.1.remove(&ticket).is_some_and(|tx| tx.send(()).is_ok());
                if !delivered {
                    ended.push(owner);
                }
            }
        }
    }
}
