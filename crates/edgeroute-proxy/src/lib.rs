//! `edgeroute proxy`: the client SDK behind an OpenAI-compatible endpoint on the client's own
//! machine, so any OpenAI client in any language gets edgeroute's routing and failover without
//! a code change — point its base URL at `http://127.0.0.1:PORT/v1`.
//!
//! Who may call it: a program on this machine. It binds to loopback by default and holds the
//! user's token for the fleet (read from `--token-file` or `EDGEROUTE_TOKEN`, never from the
//! command line, where every local user sees it), so a web page the user visits must not be
//! able to use it. Before any route ([`check_caller`]):
//!
//! - `Host` must name loopback (`127.0.0.0/8`, `[::1]`, `localhost`, any port) or one of
//!   [`ProxyConfig::allowed_hosts`], else 421 `host_not_allowed`: a DNS-rebinding page (its own
//!   name resolved to 127.0.0.1, so same-origin with the proxy) is refused;
//! - a request with an `Origin` header not in [`ProxyConfig::allowed_origins`] (none by default;
//!   `null` included), or marked by the browser as `Sec-Fetch-Site: cross-site | same-site`, is
//!   refused, 403 `origin_not_allowed`: browsers send these, programs do not, and a refused CORS
//!   preflight stops every non-simple request;
//! - a `POST` must say `Content-Type: application/json`, else 415 `unsupported_media_type`: the
//!   CORS "simple" form post (`text/plain`) a page can send without a preflight is refused. The
//!   audio uploads (`/v1/audio/transcriptions`, `/translations`) may also be
//!   `multipart/form-data`: a browser sends `Origin` with every POST, so such a form reaching
//!   this check without one (or with an allowed one) is a program's.
//!
//! The fleet's nodes then check the token on every request, and the SDK sends it only over TLS
//! or to loopback.
//!
//! A session (one pinned node plus standby) is kept per `x-edgeroute-session` header value and
//! model (or pipeline, with `x-edgeroute-pipeline`: every model of a voice pipeline on one
//! node); requests without the header share one session per model. Requests never wait for
//! each other: turns of one session run concurrently, and the session's moves happen between
//! turns. The session table is bounded (least recently used out first) and idle sessions
//! expire. Answers are what the SDK produced: a node's client error (4xx) is passed through as
//! is; a failure the SDK could not route around becomes a 502/503/404 in OpenAI's error shape;
//! a stream that fails after its first token ends with an SSE error event and no `[DONE]` (it
//! is never reported as complete). Every answer names its node in `x-edgeroute-node` and its
//! tier in `x-edgeroute-tier` (`edge`, or a policy's cloud pool); a stream
//! continued on another node says so in an SSE comment (`: edgeroute continued …`) at the
//! point where it moved.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use edgeroute_client::{Client, ClientError, Served, Session, StreamItem};
use edgeroute_http::ApiError;
use edgeroute_proto::headers::{MODEL_VERSION_HEADER, SESSION_HEADER};
use edgeroute_proto::{ChatCompletionRequest, ErrorBody, Side};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// Largest request body accepted, bytes.
pub const DEFAULT_MAX_BODY: usize = 4 << 20;

/// The header that asks for a pipeline session.
pub const PIPELINE_HEADER: &str = "x-edgeroute-pipeline";
/// The header naming the node that served (or started) an answer.
pub const NODE_HEADER: &str = "x-edgeroute-node";
/// The header naming the tier that served: `edge`, or a routing policy's cloud pool.
pub const TIER_HEADER: &str = "x-edgeroute-tier";

/// The header naming the model that served when it is not the one asked for: a routing
/// policy's cascade answered with a reduced model (degraded mode).
pub const SERVED_MODEL_HEADER: &str = "x-edgeroute-served-model";
/// `cascade` when [`SERVED_MODEL_HEADER`] is set: the answer is degraded, and why.
pub const DEGRADED_HEADER: &str = "x-edgeroute-degraded";

/// What an answer says of who served it: the node, its tier (its pool's name, else `edge`),
/// the model version the node reported, and, when a cascade's reduced model served, which
/// model and that it is degraded.
fn served_by(served: &Served, h: &mut http::HeaderMap) {
    let node = &served.node;
    if let Ok(n) = HeaderValue::from_str(&node.id) {
        h.insert(NODE_HEADER, n);
    }
    let tier = node.pool.as_deref().and_then(|p| HeaderValue::from_str(p).ok());
    h.insert(TIER_HEADER, tier.unwrap_or(HeaderValue::from_static("edge")));
    if let Some(v) = served.model_version.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
        h.insert(MODEL_VERSION_HEADER, v);
    }
    if let Some(m) = node.serve_as.as_deref().and_then(|m| HeaderValue::from_str(m).ok()) {
        h.insert(SERVED_MODEL_HEADER, m);
        h.insert(DEGRADED_HEADER, HeaderValue::from_static("cascade"));
    }
}

/// The proxy's limits; every one explicit.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Largest request body, bytes. Default 4 MiB.
    pub max_body: usize,
    /// Largest body of the other endpoints (an audio upload), bytes. Default 25 MiB.
    pub max_upload: usize,
    /// Sessions kept at once; past this the least recently used is dropped. Default 10,000.
    pub max_sessions: usize,
    /// A session unused for this long is dropped. Default 10 minutes.
    pub session_idle: Duration,
    /// Longest `x-edgeroute-session` / `x-edgeroute-pipeline` value, bytes. Default 128.
    pub max_key_len: usize,
    /// Host names (or addresses) besides loopback that callers may name in `Host`, any port,
    /// compared without case: `127.0.0.0/8`, `[::1]` and `localhost` are always allowed.
    /// Default: none (a DNS-rebinding guard: a request naming any other host is refused, 421).
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`scheme://host[:port]`, exact) allowed to call the proxy. Default:
    /// none, so any request with an `Origin` header (`null` included) is refused (403): web
    /// pages may not drive the proxy with the user's token.
    pub allowed_origins: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_body: DEFAULT_MAX_BODY,
            max_upload: 25 * 1024 * 1024,
            max_sessions: 10_000,
            session_idle: Duration::from_secs(600),
            max_key_len: 128,
            allowed_hosts: vec![],
            allowed_origins: vec![],
        }
    }
}

/// Why a token file could not be used. Never quotes the file's content.
#[derive(Debug)]
pub enum TokenFileError {
    /// The file could not be read.
    Read { path: std::path::PathBuf, error: std::io::Error },
    /// The file holds nothing but whitespace.
    Empty { path: std::path::PathBuf },
    /// The token holds whitespace or a character a header cannot carry (two tokens, a
    /// stray line): refused rather than guessed at.
    Malformed { path: std::path::PathBuf },
}

impl std::fmt::Display for TokenFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenFileError::Read { path, error } => {
                write!(f, "reading the token file {}: {error}", path.display())
            }
            TokenFileError::Empty { path } => {
                write!(f, "the token file {} is empty", path.display())
            }
            TokenFileError::Malformed { path } => write!(
                f,
                "the token file {} must hold one token: visible ASCII, no spaces, one line",
                path.display()
            ),
        }
    }
}

impl std::error::Error for TokenFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TokenFileError::Read { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// The bearer token in `path` (surrounding whitespace, such as the trailing newline `echo`
/// writes, is trimmed). A token is read from a file or the environment, never taken from the
/// command line, where every local user sees it (`ps`, `/proc/<pid>/cmdline`). A file that
/// other users may read is used, with a warning.
pub fn read_token_file(path: &std::path::Path) -> Result<String, TokenFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| TokenFileError::Read { path: path.to_owned(), error })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty { path: path.to_owned() });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenFileError::Malformed { path: path.to_owned() });
    }
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the token file is readable by other users: chmod 600 it"
            );
        }
    }
    Ok(token.to_owned())
}

/// (caller's token or "", session header, pipeline or "", model or "").
type SessionKey = (String, String, String, String);

/// Who a request is for, when the front serves many callers (the regional router): its tenant
/// keys its sessions apart from others', and its own token goes to discovery and the nodes.
#[derive(Clone)]
pub struct Caller {
    pub tenant: String,
    pub bearer: Arc<str>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("tenant", &self.tenant)
            .field("bearer", &"<redacted>")
            .finish()
    }
}

struct Slot {
    session: Arc<OnceCell<Arc<Session>>>,
    last_used: Instant,
}

/// The OpenAI-compatible front over the SDK: its session table and the chat route, shared by
/// the local proxy (one caller, the machine's) and the regional router (many tenants).
pub struct Front {
    client: Client,
    cfg: ProxyConfig,
    sessions: Mutex<HashMap<SessionKey, Slot>>,
}

type State_ = Front;

impl Front {
    pub fn new(client: Client, cfg: ProxyConfig) -> Front {
        Front { client, cfg, sessions: Mutex::new(HashMap::new()) }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Sessions in the table.
    pub fn sessions(&self) -> usize {
        self.len()
    }

    /// The slot for `key`, created if new; expired and excess sessions are dropped first.
    fn slot(&self, key: SessionKey) -> Arc<OnceCell<Arc<Session>>> {
        let now = Instant::now();
        let mut table = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = table.get_mut(&key) {
            s.last_used = now;
            return s.session.clone();
        }
        let idle = self.cfg.session_idle;
        table.retain(|_, s| now.saturating_duration_since(s.last_used) < idle);
        while table.len() >= self.cfg.max_sessions.max(1) {
            let Some(oldest) =
                table.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| k.clone())
            else {
                break;
            };
            table.remove(&oldest);
        }
        let cell = Arc::new(OnceCell::new());
        table.insert(key, Slot { session: cell.clone(), last_used: now });
        cell
    }

    fn len(&self) -> usize {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Builds the SDK client from `client` and serves the proxy on `listener` until `shutdown`
/// resolves: all that `edgeroute proxy` runs.
pub async fn serve<L: edgeroute_http::Listener>(
    client: edgeroute_client::ClientConfig,
    cfg: ProxyConfig,
    listener: L,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ClientError> {
    let app = router_with(Client::new(client)?, cfg);
    edgeroute_http::serve(listener, app, edgeroute_http::ServerLimits::default(), None, shutdown)
        .await;
    Ok(())
}

/// The proxy's routes over `client`, with the default limits.
pub fn router(client: Client, max_body: usize) -> Router {
    router_with(client, ProxyConfig { max_body, ..ProxyConfig::default() })
}

/// The proxy's routes over `client`, every one behind [`check_caller`].
pub fn router_with(client: Client, cfg: ProxyConfig) -> Router {
    let st = Arc::new(Front::new(client, cfg));
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/audio/transcriptions", post(surface))
        .route("/v1/audio/translations", post(surface))
        .route("/v1/audio/speech", post(surface))
        .route("/v1/embeddings", post(surface))
        .route("/v1/realtime", get(realtime))
        .route("/health", get(|| async { axum::Json(serde_json::json!({"status": "ready"})) }))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(axum::middleware::from_fn_with_state(st.clone(), guard))
        .with_state(st)
}

async fn guard(State(st): State<Arc<State_>>, req: Request, next: Next) -> Response {
    match check_caller(&st.cfg, req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            tracing::warn!(
                method = %req.method(),
                path = req.uri().path(),
                refused = %e,
                "edgeroute proxy: caller refused"
            );
            e.into_response()
        }
    }
}

/// Whether this request may use the proxy (and so the user's token): a program on this machine,
/// not a web page. Checked, in order, before any route: the `Host` it names (loopback or
/// configured: 421), the browser's cross-site signals (`Origin` not allowed, `Sec-Fetch-Site`
/// cross-site or same-site: 403), and a `POST`'s content type (`application/json`: 415).
pub fn check_caller(
    cfg: &ProxyConfig,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    // HTTP/1.1 names the host in `Host`; HTTP/2 in the `:authority` (the URI's).
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    if !host.is_some_and(|h| host_allowed(h, &cfg.allowed_hosts)) {
        let named = host.map_or("no host".to_owned(), |h| format!("`{}`", h.escape_default()));
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "invalid_request_error",
            Some("host_not_allowed"),
            format!(
                "this proxy answers only to loopback (127.0.0.1, [::1], localhost) and its \
                 configured host names (--allow-host), not {named}"
            ),
        )
        .fault(Side::Caller, false));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|o| cfg.allowed_origins.iter().any(|a| a == o));
        if !allowed {
            return Err(ApiError::forbidden(
                "origin_not_allowed",
                "requests from web pages are refused: this proxy holds your token (allow an \
                 origin with --allow-origin)",
            )
            .fault(Side::Caller, false));
        }
    } else if let Some(site) = headers.get("sec-fetch-site")
        && matches!(site.as_bytes(), b"cross-site" | b"same-site")
    {
        return Err(ApiError::forbidden(
            "origin_not_allowed",
            "cross-site requests from web pages are refused: this proxy holds your token",
        )
        .fault(Side::Caller, false));
    }
    // An audio upload is a multipart form, which a page could also post without a preflight;
    // but a browser sends `Origin` with every POST (refused above unless allowed), so a form
    // without one comes from a program. Only the upload routes take it.
    let upload = matches!(uri.path(), "/v1/audio/transcriptions" | "/v1/audio/translations");
    if *method == Method::POST && !is_json(headers) && !(upload && is_form(headers)) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            Some("unsupported_media_type"),
            "the request body must be JSON, sent with `Content-Type: application/json`",
        )
        .fault(Side::Caller, false));
    }
    Ok(())
}

/// `Content-Type` is `multipart/form-data` (with its boundary).
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("multipart/form-data"))
}

/// `Content-Type` is `application/json`, parameters (`; charset=utf-8`) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// A `Host` value (`name`, `name:port`, `[v6]:port`) names loopback or one of `allowed` (any
/// port, without case, a trailing dot ignored).
fn host_allowed(value: &str, allowed: &[String]) -> bool {
    let value = value.trim();
    let name = if let Some(rest) = value.strip_prefix('[') {
        // `[::1]` or `[::1]:8089`.
        match rest.split_once(']') {
            Some((v6, tail)) if tail.is_empty() || tail.strip_prefix(':').is_some_and(is_port) => {
                v6
            }
            _ => return false,
        }
    } else {
        match value.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => value,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return false;
    }
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
        return true;
    }
    allowed.iter().any(|a| {
        let a = a.trim().trim_start_matches('[').trim_end_matches(']');
        let a = a.strip_suffix('.').unwrap_or(a);
        a.eq_ignore_ascii_case(name)
    })
}

/// A port: 1-5 digits.
fn is_port(p: &str) -> bool {
    (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())
}

/// The SDK's error as the proxy's answer: the SDK's classification ([`ClientError::fault`])
/// in `x-edgeroute-error` whatever the status, and the node's own body for a refusal.
pub fn error_response(e: ClientError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let fault = e.fault();
    let api = match e {
        // The node's own refusal, as the node sent it.
        ClientError::Api { body, .. } => {
            let parsed = serde_json::from_str::<ErrorBody>(&body)
                .unwrap_or_else(|_| ErrorBody::new(body, "invalid_request_error", None, None));
            ApiError::from_body(status, parsed, fault)
        }
        ClientError::Discovery(m) => ApiError::unavailable("discovery_unavailable", m, 1),
        ClientError::NoCandidates { model, reason } => ApiError::new(
            status,
            "invalid_request_error",
            Some("model_not_found"),
            format!("no node serves model `{model}`: {reason}"),
        )
        .with_param("model"),
        ClientError::Invalid(m) => ApiError::invalid_request(None, m),
        e @ ClientError::PlaintextToken { .. } => {
            ApiError::invalid_request(None, e.to_string()).with_code("plaintext_token")
        }
        e @ ClientError::BudgetSpent(_) => {
            ApiError::unavailable("retry_budget_spent", e.to_string(), 1)
        }
        e @ ClientError::FleetSaturated { retry_after_ms, .. } => {
            ApiError::unavailable("fleet_saturated", e.to_string(), retry_after_ms.div_ceil(1000))
        }
        e @ (ClientError::Exhausted(_) | ClientError::StreamCut(_)) => {
            ApiError::new(status, "api_error", Some("no_node_available"), e.to_string())
        }
    };
    api.fault(fault.side, fault.retry).into_response()
}

/// The SDK's decision counters, in the Prometheus text format.
async fn metrics(State(st): State<Arc<State_>>) -> Response {
    let s = st.client.stats();
    let rows = [
        ("discoveries", "Candidate lists obtained", s.discoveries),
        ("stale_lists", "Lists served from the cache with discovery unreachable", s.stale_lists),
        ("discovery_failures", "Discovery endpoints that failed", s.discovery_failures),
        ("probes", "Node probes answered", s.probes),
        ("probe_failures", "Node probes failed or late", s.probe_failures),
        ("sessions", "Sessions pinned", s.sessions),
        ("failovers", "Requests moved after a failure", s.failovers),
        ("hedges", "Late first answers hedged on another node", s.hedges),
        ("migrations", "Planned session moves", s.migrations),
        ("ejections", "Nodes ejected after repeated failures", s.ejections),
        (
            "placement_misses",
            "Nodes that no longer had a model they were listed for",
            s.placement_misses,
        ),
        ("retries", "Attempts beyond a request's first, allowed by the retry budget", s.retries),
        ("retries_denied", "Attempts the retry budget refused", s.retries_denied),
    ];
    let mut out = String::new();
    for (name, help, v) in rows {
        out.push_str(&format!(
            "# HELP edgeroute_client_{name} {help}.\n# TYPE edgeroute_client_{name} counter\nedgeroute_client_{name}_total {v}\n"
        ));
    }
    out.push_str(&format!(
        "# HELP edgeroute_proxy_sessions Sessions in the proxy's table.\n# TYPE edgeroute_proxy_sessions gauge\nedgeroute_proxy_sessions {}\n",
        st.len()
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// A session or pipeline header: 1 to `max` bytes of `[A-Za-z0-9._:-]`; `None` when absent.
fn key_header(h: &HeaderMap, name: &str, max: usize) -> Result<Option<String>, Response> {
    let Some(v) = h.get(name) else { return Ok(None) };
    let ok = !v.is_empty()
        && v.len() <= max
        && v.as_bytes().iter().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(b));
    if !ok {
        let msg = format!("`{name}` must be 1-{max} characters of [A-Za-z0-9._:-]");
        return Err(ApiError::invalid_request(None, msg)
            .with_code("invalid_header")
            .into_response());
    }
    Ok(v.to_str().ok().map(str::to_owned))
}

async fn chat(State(st): State<Arc<State_>>, req: Request) -> Response {
    chat_for(&st, None, req).await
}

/// The session for (caller, session key, pipeline or model), made on first use.
async fn session_for(
    st: &Front,
    caller: Option<&Caller>,
    session_key: String,
    pipeline: Option<String>,
    model: &str,
) -> Result<Arc<Session>, Response> {
    let tenant = caller.map(|c| c.bearer.to_string()).unwrap_or_default();
    let key = match &pipeline {
        Some(p) => (tenant, session_key, p.clone(), String::new()),
        None => (tenant, session_key, String::new(), model.to_owned()),
    };
    let cell = st.slot(key);
    let session = cell
        .get_or_try_init(|| async {
            let s = match (&pipeline, caller) {
                (Some(p), None) => st.client.pipeline_session(p, model).await,
                (None, None) => st.client.session(model).await,
                (Some(p), Some(c)) => st.client.pipeline_session_as(p, model, &c.bearer).await,
                (None, Some(c)) => st.client.session_as(model, &c.bearer).await,
            };
            s.map(Arc::new)
        })
        .await;
    match session {
        Ok(s) => Ok(s.clone()),
        Err(e) => Err(error_response(e)),
    }
}

/// `/v1/audio/transcriptions`, `/translations`, `/speech` and `/v1/embeddings` through the
/// SDK ([`Session::call`]): the model from the JSON body or the upload's `model` field, the
/// session as for chat, the request re-sent whole to the next node until one answers.
async fn surface(State(st): State<Arc<State_>>, req: Request) -> Response {
    surface_for(&st, None, req).await
}

/// The session a request names (`x-edgeroute-session`, else `default`) and its pipeline
/// (`x-edgeroute-pipeline`), each checked; the refusal to send otherwise.
fn session_keys(st: &Front, h: &HeaderMap) -> Result<(String, Option<String>), Response> {
    let max = st.cfg.max_key_len;
    match (key_header(h, SESSION_HEADER, max), key_header(h, PIPELINE_HEADER, max)) {
        (Ok(s), Ok(p)) => Ok((s.unwrap_or_else(|| "default".into()), p)),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// [`surface`] for `caller`.
pub async fn surface_for(st: &Front, caller: Option<&Caller>, req: Request) -> Response {
    let (session_key, pipeline) = match session_keys(st, req.headers()) {
        Ok(k) => k,
        Err(e) => return e,
    };
    let path = req.uri().path().to_owned();
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let body = match edgeroute_http::json::read_body(req.into_body(), st.cfg.max_upload).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let model = match request_model(&content_type, &body).await {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let session = match session_for(st, caller, session_key, pipeline, &model).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let raw = edgeroute_client::RawRequest { model, path, content_type, body };
    match session.call(&raw).await {
        Ok((answer, served)) => {
            let mut res = Response::new(axum::body::Body::from(answer.body));
            *res.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
            if let Some(ct) = answer.content_type.and_then(|c| http::HeaderValue::from_str(&c).ok())
            {
                res.headers_mut().insert(http::header::CONTENT_TYPE, ct);
            }
            served_by(&served, res.headers_mut());
            res
        }
        Err(e) => error_response(e),
    }
}

/// `GET /v1/realtime?model=M`: a realtime session through the SDK ([`Client::realtime`]),
/// which moves it between nodes (between turns on a migrate hint, at once when a node dies)
/// with its conversation replayed; the caller's WebSocket stays open throughout.
async fn realtime(
    State(st): State<Arc<State_>>,
    uri: Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    realtime_for(&st, None, &uri, ws).await
}

/// [`realtime`] for `caller`. The session is opened on a node before the upgrade is answered:
/// a fleet that cannot take it is an HTTP error, not an open socket that closes.
pub async fn realtime_for(
    st: &Front,
    caller: Option<&Caller>,
    uri: &Uri,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            let msg = format!("`/v1/realtime` is a WebSocket: send `Upgrade: websocket` ({e}).");
            return ApiError::invalid_request(None, msg).into_response();
        }
    };
    let query = axum::extract::Query::<HashMap<String, String>>::try_from_uri(uri);
    let model = query.ok().and_then(|mut q| q.0.remove("model"));
    let Some(model) = model.filter(|m| !m.is_empty()) else {
        let e = ApiError::invalid_request(Some("model"), "`model` is required: `?model=…`.");
        return e.into_response();
    };
    let opened = match caller {
        Some(c) => st.client.realtime_as(&model, &c.bearer).await,
        None => st.client.realtime(&model).await,
    };
    let rt = match opened {
        Ok(rt) => rt,
        Err(e) => return error_response(e),
    };
    let node = http::HeaderValue::from_str(&rt.node()).ok();
    let mut res = ws
        .protocols([edgeroute_proto::realtime::SUBPROTOCOL])
        .on_upgrade(move |socket| bridge_realtime(socket, rt));
    if let Some(n) = node {
        res.headers_mut().insert(NODE_HEADER, n);
    }
    res
}

/// The caller's socket to the SDK's session and back, until either ends.
async fn bridge_realtime(mut socket: WebSocket, mut rt: edgeroute_client::Realtime) {
    use edgeroute_proto::realtime::{CLOSE_BACKEND_FAILED, error_event};
    let close = |code: u16, reason: &str| {
        WsMessage::Close(Some(CloseFrame { code, reason: reason.to_owned().into() }))
    };
    loop {
        tokio::select! {
            m = socket.recv() => match m {
                Some(Ok(WsMessage::Text(t))) => {
                    let sent = match serde_json::from_str::<serde_json::Value>(t.as_str()) {
                        Ok(v) => rt.send(v).await.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("not JSON: {e}")),
                    };
                    if let Err(why) = sent {
                        let e = error_event("event_proxy", "invalid_request_error",
                            "invalid_event", &why, None, None);
                        if socket.send(WsMessage::Text(e.to_string().into())).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            ev = rt.recv() => match ev {
                Some(Ok(v)) => {
                    if socket.send(WsMessage::Text(v.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    let msg = format!("No node could take the session over: {e}");
                    let ev = error_event("event_proxy", "server_error", "fleet_unavailable",
                        &msg, None, None);
                    let _ = socket.send(WsMessage::Text(ev.to_string().into())).await;
                    let _ = socket.send(close(CLOSE_BACKEND_FAILED, "no node could take the session")).await;
                    return;
                }
                None => {
                    let _ = socket.send(close(1000, "the session ended")).await;
                    return;
                }
            },
        }
    }
}

/// The model a request names: its JSON `model`, or its multipart form's `model` field.
async fn request_model(content_type: &str, body: &Bytes) -> Result<String, ApiError> {
    let missing = || ApiError::invalid_request(Some("model"), "`model` is required.");
    if content_type.starts_with("multipart/form-data") {
        let boundary = multer::parse_boundary(content_type).map_err(|_| {
            ApiError::invalid_request(Some("file"), "multipart/form-data without a boundary.")
        })?;
        let once = futures_util::stream::once(std::future::ready(Ok::<
            Bytes,
            std::convert::Infallible,
        >(body.clone())));
        let mut form = multer::Multipart::new(once, boundary);
        while let Some(field) = form.next_field().await.map_err(|e| {
            ApiError::invalid_request(Some("file"), format!("A malformed multipart form: {e}"))
        })? {
            if field.name() == Some("model") {
                let text = field.text().await.map_err(|_| missing())?;
                return if text.trim().is_empty() { Err(missing()) } else { Ok(text) };
            }
        }
        return Err(missing());
    }
    let v: serde_json::Value = edgeroute_http::json::parse_json(body)?;
    v["model"].as_str().filter(|m| !m.trim().is_empty()).map(str::to_owned).ok_or_else(missing)
}

/// The chat route for `caller` (`None`: the client's own token): a session per (caller,
/// `x-edgeroute-session`, pipeline or model), its turn, the answer or the stream.
pub async fn chat_for(st: &Front, caller: Option<&Caller>, req: Request) -> Response {
    let (session_key, pipeline) = match session_keys(st, req.headers()) {
        Ok(k) => k,
        Err(e) => return e,
    };
    let body: ChatCompletionRequest =
        match edgeroute_http::json::read_json(req.into_body(), st.cfg.max_body).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
    // A pipeline session serves every model of the pipeline from one node. A session acts
    // with the token it was made with, so it is the caller's token (not only its tenant) that
    // keys it: a renewed token, or another token of the tenant with other claims (residency),
    // gets a session of its own rather than one holding an older, perhaps expired, token.
    let session = match session_for(st, caller, session_key, pipeline, &body.model).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    if !body.stream {
        return match session.chat_served(&body).await {
            Ok((c, served)) => {
                let mut res = axum::Json(c).into_response();
                served_by(&served, res.headers_mut());
                res
            }
            Err(e) => error_response(e),
        };
    }
    let stream = match session.chat_stream(&body).await {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    let mut served = http::HeaderMap::new();
    served_by(stream.served(), &mut served);
    let frames = futures_util::stream::unfold(Some(stream), |state| async move {
        let mut s = state?;
        let frame = match s.next_item().await {
            Some(Ok(StreamItem::Chunk(chunk))) => {
                let json = serde_json::to_vec(&chunk).unwrap_or_default();
                edgeroute_proto::sse::data_frame(&json)
            }
            Some(Ok(StreamItem::Continued { from, to, after_tokens })) => Bytes::from(format!(
                ": edgeroute continued from={from} to={to} after_tokens={after_tokens}\n\n"
            )),
            // After the first token: an error event, and never [DONE].
            Some(Err(e)) => {
                let body = ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "api_error",
                    Some("stream_failed"),
                    e.to_string(),
                )
                .body_json();
                return Some((Ok(edgeroute_proto::sse::data_frame(&body)), None));
            }
            None => {
                return Some((Ok(Bytes::from_static(edgeroute_proto::sse::DONE_FRAME)), None));
            }
        };
        Some((Ok::<Bytes, std::convert::Infallible>(frame), Some(s)))
    });
    let mut res = Response::new(Body::from_stream(frames));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.extend(served);
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SessionKey {
        (String::new(), s.to_owned(), String::new(), "m".to_owned())
    }

    #[tokio::test(start_paused = true)]
    async fn the_session_table_is_bounded_and_idle_sessions_expire() {
        let client = Client::new(edgeroute_client::ClientConfig::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let cfg = ProxyConfig {
            max_sessions: 2,
            session_idle: Duration::from_secs(10),
            ..ProxyConfig::default()
        };
        let st = Front::new(client, cfg);
        let a = st.slot(key("a"));
        tokio::time::advance(Duration::from_secs(1)).await;
        st.slot(key("b"));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(Arc::ptr_eq(&a, &st.slot(key("a"))), "the same key, the same session");
        st.slot(key("c"));
        let mut keys: Vec<String> = st
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .map(|k| k.1.clone())
            .collect();
        keys.sort();
        assert_eq!(keys, ["a", "c"], "the least recently used went first");
        tokio::time::advance(Duration::from_secs(11)).await;
        st.slot(key("d"));
        assert_eq!(st.len(), 1, "idle sessions expired");
    }

    #[test]
    fn hosts_are_loopback_or_configured() {
        let allowed = ["proxy.internal".to_owned(), "[fd00::5]".to_owned()];
        for ok in [
            "127.0.0.1:8089",
            "127.0.0.1",
            "127.200.0.1:1",
            "[::1]:8089",
            "[::1]",
            "localhost",
            "LocalHost.:8089",
            "proxy.internal:80",
            "PROXY.INTERNAL",
            "[fd00::5]:8089",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for refused in [
            "",
            ":8089",
            "evil.example",
            "evil.example:8089",
            "localhost.evil.example",
            "127.0.0.1.nip.io:8089",
            "0.0.0.0:8089",
            "128.0.0.1",
            "[::2]:8089",
            "[::1]x",
            "::1",
            "localhost:80:80",
            "localhost:abc",
            "proxy.internal.evil.example",
            "user@localhost",
        ] {
            assert!(!host_allowed(refused, &allowed), "{refused}");
        }
    }

    #[test]
    fn a_request_without_a_host_is_refused() {
        let cfg = ProxyConfig::default();
        let uri: Uri = "/v1/chat/completions".parse().unwrap_or_default();
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let e = check_caller(&cfg, &Method::POST, &uri, &h).err().map(|e| e.status);
        assert_eq!(e, Some(StatusCode::MISDIRECTED_REQUEST));
        // HTTP/2 names it in the URI's authority.
        let uri: Uri = "http://127.0.0.1:8089/v1/chat/completions".parse().unwrap_or_default();
        assert!(check_caller(&cfg, &Method::POST, &uri, &h).is_ok());
        // A GET needs no content type.
        h.remove(header::CONTENT_TYPE);
        assert!(check_caller(&cfg, &Method::GET, &uri, &h).is_ok());
    }

    #[test]
    fn session_headers_are_validated() {
        let mut h = HeaderMap::new();
        assert_eq!(key_header(&h, SESSION_HEADER, 8).ok(), Some(None));
        h.insert(SESSION_HEADER, HeaderValue::from_static("call-42.a:b_c"));
        assert!(key_header(&h, SESSION_HEADER, 128).is_ok_and(|v| v.is_some()));
        assert!(key_header(&h, SESSION_HEADER, 8).is_err(), "too long");
        h.insert(SESSION_HEADER, HeaderValue::from_static("a b"));
        assert!(key_header(&h, SESSION_HEADER, 128).is_err(), "bad character");
        h.insert(SESSION_HEADER, HeaderValue::from_static(""));
        assert!(key_header(&h, SESSION_HEADER, 128).is_err(), "empty");
    }
}
