//! The internet-facing HTTP surface of a node: routes, authentication, per-tenant rate
//! limits, admission (concurrency cap, drain) and the headers every response carries.
//!
//! Layering, outermost first: response headers (node id, load report, migrate hint) → auth
//! (scope per route group) → rate limit (inference only) → handler. The POST inference routes
//! run auth and the rate limit as plain calls in their own service ([`Route`]), and the public
//! listener reaches them through [`Gateway`] without the router: chat is the route every token
//! goes through, and the generic layers cost it boxed futures.
//! Admission happens in the chat handler itself because the slot it takes must live as long as
//! the response stream.

mod admin;
pub mod admission;
mod auth;
mod chat;
mod info;
mod manage;
mod ratelimit;
pub mod realtime;
pub mod surface;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use axum::Router;
use axum::extract::Request;
use axum::middleware;
use axum::response::Response;
use axum::routing::{get, get_service, post, post_service};
use edgeroute_auth::{KeyStore, Scope};
use edgeroute_http::ApiError;
use edgeroute_proto::LoadReport;
use futures_util::future::Either;
use http::HeaderValue;
use tower::util::MapResponseLayer;

use crate::backend::Backend;
use crate::backend::surface::Endpoint;
use crate::config::{Limits, Telemetry as TelemetryConfig};
use crate::lifecycle::{Phase, Sessions};
use crate::metrics::Metrics;
use crate::telemetry::Telemetry;

pub use ratelimit::TenantLimiter;

/// The wall clock (Unix ms; `edgeroute_core::clock`), a seam so tests can move it (token
/// expiry, `created`, model timestamps).
pub use edgeroute_core::clock::WallClock;

/// The fleet's headers ([`edgeroute_proto::headers`]) as `HeaderName`s, made at compile
/// time: a `&str` name is parsed and checked again at every lookup and insert.
pub(crate) mod hdr {
    use edgeroute_proto::headers as h;
    use http::HeaderName;

    pub const NODE: HeaderName = HeaderName::from_static(h::NODE_HEADER);
    pub const LOAD: HeaderName = HeaderName::from_static(h::LOAD_HEADER);
    pub const MIGRATE: HeaderName = HeaderName::from_static(h::MIGRATE_HEADER);
    pub const SESSION: HeaderName = HeaderName::from_static(h::SESSION_HEADER);
    /// The registry version of the model that answered, when the load named one.
    pub const MODEL_VERSION: HeaderName = HeaderName::from_static(h::MODEL_VERSION_HEADER);
}

/// Everything a request handler may touch. Shared behind an `Arc`.
pub struct NodeState {
    pub id: String,
    pub region: String,
    /// The jurisdiction data is processed in (`node.jurisdiction`), for residency checks.
    pub jurisdiction: Option<String>,
    /// The hardware class (`node.hardware`), for placement constraints.
    pub hardware: edgeroute_policy::Hardware,
    /// The fleet's policy document (`[policy] file`), read at each load for its registry.
    pub policy_file: Option<std::path::PathBuf>,
    pub cost_per_1k: Option<f64>,
    pub node_header: HeaderValue,
    pub limits: Limits,
    pub telemetry_cfg: TelemetryConfig,
    pub telemetry: Arc<Telemetry>,
    pub phase: ArcSwap<Phase>,
    pub sessions: Sessions,
    pub backend: Backend,
    /// Which models are served, in which state: the routing truth.
    pub models: crate::models::ModelTable,
    pub models_cfg: crate::config::ModelsConfig,
    /// The model repository's installer, opened when the node starts serving (when
    /// `models.repository` is set).
    pub hub: std::sync::OnceLock<edgeroute_hub::Installer>,
    pub pipelines: Vec<crate::config::PipelineSpec>,
    /// `None` only when the config waives authentication.
    pub auth: Option<Arc<KeyStore>>,
    pub limiter: TenantLimiter,
    /// In-flight requests per tenant (a share of `max_concurrency`).
    pub tenants: Arc<admission::TenantSlots>,
    /// Room for request bodies, node-wide.
    pub bodies: admission::BodyBudget,
    /// Realtime sessions open, node-wide and per tenant.
    pub realtime: realtime::Seats,
    /// What the transport refused before any route ran (431, malformed heads, silent
    /// connections, the per-source cap), reported in `/metrics` with the gateway's refusals.
    pub edge: Arc<edgeroute_http::EdgeCounters>,
    /// Request fields the backend takes beyond OpenAI's (`backend.extra_fields`).
    pub forward_fields: Vec<String>,
    pub metrics: Metrics,
    pub clock: WallClock,
    pub seq: AtomicU64,
    /// The load-report header values recently sent, so an unchanged load is not formatted
    /// (and allocated) again for every response.
    pub load_header: LoadHeader,
    /// The tenant of every caller when the config waives authentication.
    pub anonymous: Arc<str>,
    /// What this node's response ids start with (`chatcmpl-<id>-`).
    pub response_ids: Arc<str>,
}

/// The last few load-report header values, by the figures they encode. The figures take few
/// distinct values at a time (in-flight moves by one, TTFT is refreshed every 250 ms), so a
/// handful of entries answers nearly every response without formatting.
#[derive(Default)]
pub struct LoadHeader {
    recent: std::sync::Mutex<Recent>,
}

/// Entries, and the one the next new value replaces.
type Recent = ([Option<(LoadReport, HeaderValue)>; 8], usize);

impl LoadHeader {
    pub fn value(&self, report: LoadReport) -> Option<HeaderValue> {
        let Ok(mut g) = self.recent.lock() else {
            return HeaderValue::from_str(&report.to_string()).ok();
        };
        let (entries, next) = &mut *g;
        if let Some((_, v)) = entries.iter().flatten().find(|(r, _)| *r == report) {
            return Some(v.clone());
        }
        let v = HeaderValue::from_str(&report.to_string()).ok()?;
        entries[*next] = Some((report, v.clone()));
        *next = (*next + 1) % entries.len();
        Some(v)
    }
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("id", &self.id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

pub type AppState = Arc<NodeState>;

impl NodeState {
    pub fn load_report(&self) -> LoadReport {
        LoadReport {
            queue_depth: self.backend.queue_depth(),
            in_flight: self.telemetry.in_flight(),
            capacity: self.limits.max_concurrency,
            ttft_ms: self.telemetry.recent_ttft_ms(),
        }
    }
}

/// Which listener a router is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// The public listener: inference, `/health`, `/metrics`, and the admin routes only when
    /// no admin listener is configured and `[auth]` is (see [`crate::config::AdminSection`]).
    Public,
    /// The admin listener (`admin.listen`): the admin routes, `/health` and `/metrics`.
    Admin,
}

/// Whether `path` is an admin route's (for the public listener's refusals).
fn is_admin_path(path: &str) -> bool {
    path.starts_with("/admin/")
        || path == "/admin"
        || path == "/v1/models/load"
        || path == "/v1/models/unload"
}

/// The router of one listener. The inference routes (public plane) are layered exactly as
/// before: the admin plane adds nothing to an inference request's path.
pub fn router(state: AppState, plane: Plane, admin_listener: bool) -> Router {
    // The admin routes, guarded by the admin scope and the token's audience (this node, its
    // region, or the fleet). Served on the admin listener, or on the public one when there is
    // none and tokens are checked; never on a public listener without `[auth]`.
    let admin = Router::new()
        .route("/admin/drain", post(admin::start_drain).delete(admin::stop_drain))
        .route("/admin/faults", get(admin::get_faults).put(admin::set_faults))
        .route("/v1/models/load", post(manage::load))
        .route("/v1/models/unload", post(manage::unload))
        .route_layer(middleware::from_fn_with_state((state.clone(), Scope::Admin), auth::require));
    let base = match plane {
        Plane::Admin => Router::new().merge(admin),
        Plane::Public => {
            let inference = Router::new()
                .route("/v1/models", get(info::models))
                .route("/v1/models/{id}", get(manage::get_model))
                .route_layer(middleware::from_fn_with_state(state.clone(), ratelimit::limit))
                .route_layer(middleware::from_fn_with_state(
                    (state.clone(), Scope::Inference),
                    auth::require,
                ));
            // The POST inference routes ([`PostRoute`]) authenticate and limit inside their own
            // service (same checks, same order), without the middleware layers.
            let own = |scope: Scope, route: PostRoute| {
                Route::new(state.clone(), scope, move |st, sc, r| route.serve(st, sc, r))
            };
            let r = Router::new()
                .route_service(
                    "/v1/chat/completions",
                    post_service(own(Scope::Inference, PostRoute::Chat)),
                )
                .route_service(
                    "/v1/audio/transcriptions",
                    post_service(own(
                        Scope::Inference,
                        PostRoute::Surface(Endpoint::Transcriptions),
                    )),
                )
                .route_service(
                    "/v1/audio/translations",
                    post_service(own(Scope::Inference, PostRoute::Surface(Endpoint::Translations))),
                )
                .route_service(
                    "/v1/audio/speech",
                    post_service(own(Scope::Inference, PostRoute::Surface(Endpoint::Speech))),
                )
                .route_service(
                    "/v1/completions",
                    post_service(own(Scope::Inference, PostRoute::Surface(Endpoint::Completions))),
                )
                .route_service(
                    "/v1/embeddings",
                    post_service(own(Scope::Inference, PostRoute::Surface(Endpoint::Embeddings))),
                )
                .route_service(
                    "/v1/realtime",
                    get_service(Route::new(state.clone(), Scope::Inference, realtime::upgrade)),
                )
                .merge(inference);
            if !admin_listener && state.auth.is_some() { r.merge(admin) } else { r }
        }
    };
    // Admin paths the public listener does not serve: without `[auth]` (and no admin
    // listener) it says why; with an admin listener they do not exist here (404), whatever
    // the method (`POST /v1/models/load` would otherwise meet `GET /v1/models/{id}`: 405).
    let elsewhere = match plane {
        Plane::Public if state.auth.is_none() && !admin_listener => Some(true),
        Plane::Public if admin_listener => Some(false),
        _ => None,
    };
    let refused = move |path: &str| match elsewhere {
        Some(needs_auth) if is_admin_path(path) => Some(if needs_auth {
            ApiError::forbidden(
                "admin_needs_auth",
                "Admin routes are not served on this listener without [auth]: configure [auth] \
                 and use an admin token, or set admin.listen to a loopback address.",
            )
        } else {
            ApiError::not_found(path)
        }),
        _ => None,
    };
    base.route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .fallback(move |req: Request| async move {
            refused(req.uri().path()).unwrap_or_else(|| ApiError::not_found(req.uri().path()))
        })
        .method_not_allowed_fallback(move |req: Request| async move {
            refused(req.uri().path()).unwrap_or_else(ApiError::method_not_allowed)
        })
        .layer(MapResponseLayer::new({
            let st = state.clone();
            move |res| response_headers(&st, res)
        }))
        .with_state(state)
}

/// An inference route served on `POST` by a [`Route`] of its own: in the router, and answered
/// by [`Gateway`] without it.
#[derive(Debug, Clone, Copy)]
enum PostRoute {
    Chat,
    Surface(Endpoint),
}

impl PostRoute {
    /// The route a path names (the router's table, below, names the same paths).
    fn of(path: &str) -> Option<PostRoute> {
        Some(match path {
            "/v1/chat/completions" => PostRoute::Chat,
            "/v1/audio/transcriptions" => PostRoute::Surface(Endpoint::Transcriptions),
            "/v1/audio/translations" => PostRoute::Surface(Endpoint::Translations),
            "/v1/audio/speech" => PostRoute::Surface(Endpoint::Speech),
            "/v1/completions" => PostRoute::Surface(Endpoint::Completions),
            "/v1/embeddings" => PostRoute::Surface(Endpoint::Embeddings),
            _ => return None,
        })
    }

    /// The route's answer.
    fn serve(self, st: AppState, scope: Scope, req: Request) -> RouteAnswer<Response> {
        self.serve_then(st, scope, req, |res| res)
    }

    /// The route's answer passed through `then`, in a box of the route's own size: one future
    /// type for every route would be the size of the largest, moved (and its cache lines
    /// touched) for every chat request.
    fn serve_then<T, F>(self, st: AppState, scope: Scope, req: Request, then: F) -> RouteAnswer<T>
    where
        T: 'static,
        F: FnOnce(Response) -> T + Send + 'static,
    {
        match self {
            PostRoute::Chat => Box::pin(async move { then(chat::serve(st, scope, req).await) }),
            PostRoute::Surface(e) => {
                Box::pin(async move { then(surface::serve(st, scope, e, req).await) })
            }
        }
    }
}

/// The public listener's service: `POST` to an inference route ([`PostRoute`]) is answered
/// here, straight to its [`Route`] and [`response_headers`]; everything else goes to the
/// router. The router's generic layers (a boxed service and future per layer, each boxing the
/// one inside it) were, per chat request, a fifth of the gateway's instructions (issue 13). The
/// answer is the same either way: the router keeps these routes (with their scope, the table
/// the OpenAPI drift test reads) and serves them when a layer wraps it.
#[derive(Clone)]
pub struct Gateway {
    st: AppState,
    router: Router,
    /// Whether the inference routes are answered here (the public plane, router unwrapped).
    direct: bool,
}

impl Gateway {
    /// `router` as built by [`router`] for `plane`; `direct` only when nothing wraps it (a
    /// wrapping layer must see every request).
    pub fn new(st: AppState, router: Router, direct: bool) -> Gateway {
        Gateway { st, router, direct }
    }
}

/// A route's answer as a boxed future.
type RouteAnswer<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The answer of a route's own service: one boxed future.
type BoxedAnswer = RouteAnswer<Result<Response, Infallible>>;

impl tower::Service<Request> for Gateway {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<BoxedAnswer, axum::routing::future::RouteFuture<Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if self.direct
            && req.method() == http::Method::POST
            && let Some(route) = PostRoute::of(req.uri().path())
        {
            let st = self.st.clone();
            return Either::Left(route.serve_then(st.clone(), Scope::Inference, req, move |res| {
                Ok(response_headers(&st, res))
            }));
        }
        Either::Right(tower::Service::call(&mut self.router, req))
    }
}

/// Every response names the node and reports its load, so clients learn load without probing;
/// while draining or shutting down it also carries the migrate hint. A plain mapping of the
/// response (no boxed middleware future).
fn response_headers(st: &AppState, mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(hdr::NODE, st.node_header.clone());
    if let Some(v) = st.load_header.value(st.load_report()) {
        h.insert(hdr::LOAD, v);
    }
    if !h.contains_key(hdr::MIGRATE)
        && let Some(hint) = st.phase.load().hint(st.telemetry.now())
        && let Ok(v) = HeaderValue::from_str(&hint.to_string())
    {
        h.insert(hdr::MIGRATE, v);
    }
    res
}

/// A route as one service that authenticates itself: `handle` gets the state, the scope a
/// caller's token must grant (named at the router, where a reader and the OpenAPI check look
/// for who may call a route) and the request. One boxed future per request, no middleware
/// layer: the chat route's cost, shared by every inference route that is not `/v1/models`.
pub struct Route<F> {
    st: AppState,
    scope: Scope,
    handle: F,
}

impl<F: Clone> Clone for Route<F> {
    fn clone(&self) -> Self {
        Route { st: self.st.clone(), scope: self.scope, handle: self.handle.clone() }
    }
}

impl<F> Route<F> {
    pub fn new(st: AppState, scope: Scope, handle: F) -> Route<F> {
        Route { st, scope, handle }
    }
}

impl<F, Fut> tower::Service<Request> for Route<F>
where
    F: Fn(AppState, Scope, Request) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxedAnswer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let fut = (self.handle)(self.st.clone(), self.scope, req);
        Box::pin(async move { Ok(fut.await) })
    }
}

/// A tenant as authenticated by the auth layer (the JWT `sub`).
#[derive(Debug, Clone)]
pub struct Tenant(pub Arc<str>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_header_always_says_the_current_figures() {
        let h = LoadHeader::default();
        let report = |f| LoadReport { queue_depth: 0, in_flight: f, capacity: 64, ttft_ms: 120 };
        // More distinct figures than entries, then back again: each answer is exact.
        for round in 0..3 {
            for f in 0..20 {
                let v = h.value(report(f)).and_then(|v| v.to_str().ok().map(str::to_owned));
                assert_eq!(
                    v,
                    Some(format!("q=0;f={f};c=64;t=120")),
                    "round {round}, in-flight {f}"
                );
            }
        }
    }
}
