//! HTTP API: `/v1/discover`, `/v1/nodes`, `/v1/topology`, `/health`, `/metrics`.
//!
//! Who may call what (with `[auth]`; without it, which needs `discovery.allow_unauthenticated`,
//! everything is open): `/v1/discover` a token with scope `inference`, and `explain=true`
//! on it a token with `admin` too (otherwise 403 `insufficient_scope`, `param: explain`: the
//! excluded nodes, their regions and why are the fleet's map, not a client's business);
//! `/v1/nodes` and `/v1/topology` scope `admin`; `/health` and `/metrics` anyone. An admin
//! token sees the fleet's map only when its audience names the fleet (`edgeroute:fleet`): one
//! minted for a node or a region administers that, not the map (403
//! `admin_token_not_for_the_fleet`).
//!
//! Residency holds on every `/v1/discover` answer, policy or not: a node the token's residency
//! claims refuse (`Verified::may_process_in`, the node's jurisdiction from
//! [`crate::routing::Jurisdictions`]; unknown fails a `jurisdictions` claim) is never a
//! candidate, whatever `region` the client sends. With a routing policy loaded (`[policy]`) and
//! a model its registry knows, `Policy::decide` orders the answer, which carries a `policy`
//! object (version, rule, version id, tier, pool) and the `x-edgeroute-decision` header, and
//! with `explain` a `policy_explain` object (rule, attempts, drops); a model it does not know is
//! scored as without a policy. `session=` keeps a canary split's client on one version.
//!
//! Every handler reads the current [`Snapshot`] through one atomic load and never takes a lock:
//! a discover request costs a query parse, a lookup, a merge of at most `k` entries per allowed
//! region, and serialising the answer.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::{RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgeroute_auth::Scope;
use edgeroute_core::score::{Exclusion, Factors, Query, Strategy};
use edgeroute_http::ApiError;
use edgeroute_policy::Outcome;
use edgeroute_proto::models::ModelState;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

use crate::Shared;
use crate::config::is_name;
use crate::fleet::NodeInfo;
use crate::metrics::OutcomeLabels;
use crate::snapshot::{ModelStats, Snapshot};

pub const REPLICA_HEADER: &str = "x-edgeroute-discovery";

pub fn router(shared: Arc<Shared>) -> Router {
    let clients = Router::new()
        .route("/v1/discover", get(discover))
        .route_layer(middleware::from_fn_with_state((shared.clone(), Scope::Inference), require));
    let operators = Router::new()
        .route("/v1/nodes", get(nodes))
        .route("/v1/topology", get(topology))
        .route("/v1/policy/check", post(policy_check))
        .route_layer(middleware::from_fn_with_state((shared.clone(), Scope::Admin), require));
    Router::new()
        .merge(clients)
        .merge(operators)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|req: Request| async move { ApiError::not_found(req.uri().path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(shared)
}

/// What the caller's token allows beyond the route's own scope.
#[derive(Debug, Clone)]
struct Caller {
    /// May see the fleet's map (`explain`): an admin token, or a replica without `[auth]`.
    admin: bool,
    /// The verified token (`None`: a replica without `[auth]`): its tenant and residency.
    token: Option<Arc<edgeroute_auth::Verified>>,
}

impl Caller {
    /// Whether the token's residency claims allow a node of `region` and `jurisdiction`
    /// (unknown jurisdiction: fails any `jurisdictions` claim).
    fn may_process_in(&self, region: &str, jurisdiction: Option<&str>) -> bool {
        self.token.as_ref().is_none_or(|t| t.may_process_in(region, jurisdiction))
    }

    fn confined(&self) -> bool {
        self.token.as_ref().is_some_and(|t| t.residency.is_some())
    }
}

/// Checks the bearer token against the replica's keys, when it has any.
async fn require(
    State((sh, scope)): State<(Arc<Shared>, Scope)>,
    mut req: Request,
    next: Next,
) -> Response {
    let Some(store) = &sh.auth else {
        req.extensions_mut().insert(Caller { admin: true, token: None });
        return next.run(req).await;
    };
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let now = edgeroute_core::clock::unix_ms() / 1000;
    // Remembered verifications (the node's cache): a client's repeated token costs a lookup.
    let verified =
        edgeroute_auth::parse_bearer(header).and_then(|token| store.authenticate(token, now));
    let verified = verified.and_then(|v| {
        // The fleet's map is the whole fleet's: an admin token sees it only when it names the
        // fleet (`edgeroute:fleet`), not a node or a region of it. Such a token may also ask
        // `/v1/discover` (with `explain`): the verifier keeps an admin audience's token admin
        // only, so it carries no `inference` scope of its own.
        let fleet = v.aud.iter().any(|a| a == edgeroute_auth::admin::FLEET_AUDIENCE);
        let admin = v.scope.contains(Scope::Admin) && fleet;
        if (admin && scope == Scope::Inference) || v.scope.contains(scope) {
            Ok((v, admin))
        } else {
            Err(edgeroute_auth::AuthError::InsufficientScope { required: scope })
        }
    });
    match verified {
        Ok((v, admin)) => {
            if scope == Scope::Admin && !admin {
                return ApiError::forbidden(
                    "admin_token_not_for_the_fleet",
                    "the fleet's views need an admin token whose audience is `edgeroute:fleet` \
                     (mint it with `edgeroute token mint --scope admin --fleet`)",
                )
                .into_response();
            }
            req.extensions_mut().insert(Caller { admin, token: Some(v) });
            next.run(req).await
        }
        Err(e) if e.http_status() == 403 => {
            ApiError::forbidden(e.api_code(), e.to_string()).into_response()
        }
        Err(e) => ApiError::unauthorized(e.api_code(), e.to_string()).into_response(),
    }
}

/// A parsed, validated `/v1/discover` request.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverParams {
    pub query: Query,
    pub strategy: Strategy,
    pub explain: bool,
    /// Where the client is. Discovery ranks by what it sees of nodes (queues, first tokens),
    /// not by the client's network path: the best node of this region is added to the answer
    /// when it is not already in the top k, so the client's probes can weigh it.
    pub near: Option<String>,
    /// The client's session id (`session=`), which a routing policy's canary split keeps on
    /// one version (`sticky = "session"`).
    pub session: Option<String>,
    /// The client gave `k` (with a routing policy, a rule's own `k` applies otherwise).
    pub k_given: bool,
}

fn once<T>(slot: &Option<T>, key: &str) -> Result<(), ApiError> {
    match slot {
        Some(_) => Err(bad(key, format!("`{key}` given more than once"))),
        None => Ok(()),
    }
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(Some(param), message).with_code("invalid_parameter")
}

/// A model or pipeline id: what the node's load endpoint accepts (hub ids with `/`).
fn is_model_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':'))
}

/// Parses the query string. Unknown parameters are refused: a misspelt `regions=` must not
/// silently drop a data-residency constraint.
pub fn parse_params(
    raw: Option<&str>,
    default_k: usize,
    max_k: usize,
    default_strategy: Strategy,
    max_query_bytes: usize,
) -> Result<DiscoverParams, ApiError> {
    let raw = raw.unwrap_or("");
    if raw.len() > max_query_bytes {
        return Err(ApiError::invalid_request(
            None,
            format!("query string longer than {max_query_bytes} bytes"),
        )
        .with_code("query_too_long"));
    }
    let mut model = None;
    let mut pipeline = None;
    let mut regions: Vec<String> = Vec::new();
    let mut k = None;
    let mut strategy = None;
    let mut explain = None;
    let mut near = None;
    let mut session = None;
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        match &*key {
            "model" => {
                once(&model, &key)?;
                if !is_model_id(&value) {
                    return Err(bad("model", "a model id: 1-256 characters of [A-Za-z0-9._/:-]"));
                }
                model = Some(value.into_owned());
            }
            "pipeline" => {
                once(&pipeline, &key)?;
                if !is_model_id(&value) {
                    return Err(bad(
                        "pipeline",
                        "a pipeline id: 1-256 characters of [A-Za-z0-9._/:-]",
                    ));
                }
                pipeline = Some(value.into_owned());
            }
            // Repeatable and comma-separated: `region=tor,mtl` or `region=tor&region=mtl`.
            "region" => {
                for r in value.split(',') {
                    let r = r.trim();
                    if !is_name(r) {
                        return Err(bad(
                            "region",
                            format!(
                                "`{r}` is not a region name ({})",
                                edgeroute_proto::names::NAME_RULE
                            ),
                        ));
                    }
                    if !regions.iter().any(|x| x == r) {
                        regions.push(r.to_owned());
                    }
                }
                if regions.len() > 64 {
                    return Err(bad("region", "at most 64 regions"));
                }
            }
            "k" => {
                once(&k, &key)?;
                let n: usize = value
                    .parse()
                    .map_err(|_| bad("k", format!("`{value}` is not a whole number")))?;
                if n == 0 || n > max_k {
                    return Err(bad("k", format!("k must be between 1 and {max_k}")));
                }
                k = Some(n);
            }
            "strategy" => {
                once(&strategy, &key)?;
                strategy = Some(Strategy::from_name(&value).ok_or_else(|| {
                    bad(
                        "strategy",
                        format!(
                            "`{value}` is not a strategy: latency_first, availability_first or cost_optimized"
                        ),
                    )
                })?);
            }
            "near" => {
                once(&near, &key)?;
                if !is_name(&value) {
                    return Err(bad(
                        "near",
                        format!(
                            "`{value}` is not a region name ({})",
                            edgeroute_proto::names::NAME_RULE
                        ),
                    ));
                }
                near = Some(value.into_owned());
            }
            "session" => {
                once(&session, &key)?;
                let ok = !value.is_empty()
                    && value.len() <= 128
                    && value.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
                    });
                if !ok {
                    return Err(bad(
                        "session",
                        "a session id: 1-128 characters of [A-Za-z0-9._:-]",
                    ));
                }
                session = Some(value.into_owned());
            }
            "explain" => {
                once(&explain, &key)?;
                explain = Some(match &*value {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(bad("explain", "true or false")),
                });
            }
            _ => {
                return Err(bad(
                    &key,
                    format!(
                        "unknown parameter `{key}` (expected model, region, near, k, pipeline, strategy, session, explain)"
                    ),
                ));
            }
        }
    }
    let model = model.ok_or_else(|| bad("model", "`model` is required"))?;
    Ok(DiscoverParams {
        query: Query { model, pipeline, allowed_regions: regions, k: k.unwrap_or(default_k) },
        strategy: strategy.unwrap_or(default_strategy),
        explain: explain.unwrap_or(false),
        near,
        session,
        k_given: k.is_some(),
    })
}

#[derive(Serialize)]
struct Candidate<'a> {
    id: &'a str,
    region: &'a str,
    url: &'a str,
    health: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_reason: Option<&'a str>,
    models: &'a [String],
    queue_depth: u32,
    in_flight: u32,
    capacity: u32,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    ttft_estimated: bool,
    error_rate: f64,
    cost_per_1k: f64,
    score_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    factors: Option<FactorsJson>,
    /// The model to name in requests sent here (a policy cascade answered with another).
    #[serde(skip_serializing_if = "Option::is_none")]
    serve_as: Option<&'a str>,
    /// A policy's cloud pool, not a node: `url` is its OpenAI-compatible base URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<&'a str>,
}

impl<'a> Candidate<'a> {
    fn new(n: &'a NodeInfo, score_ms: f64) -> Self {
        Candidate {
            id: &n.id,
            region: &n.region,
            url: &n.url,
            health: n.health,
            health_reason: n.health_reason.as_deref(),
            models: &n.models,
            queue_depth: n.queue_depth,
            in_flight: n.in_flight,
            capacity: n.capacity,
            ttft_p50_ms: n.ttft_p50_ms,
            ttft_p99_ms: n.ttft_p99_ms,
            ttft_estimated: n.ttft_estimated,
            error_rate: n.error_rate,
            cost_per_1k: n.cost_per_1k,
            score_ms,
            factors: None,
            serve_as: None,
            pool: None,
        }
    }
}

#[derive(Serialize)]
struct FactorsJson {
    ttft_p50_ms: f64,
    queue_wait_ms: f64,
    health_penalty_ms: f64,
    error_penalty_ms: f64,
    load_penalty_ms: f64,
    cost_penalty_ms: f64,
    pipeline_penalty_ms: f64,
}

impl From<&Factors> for FactorsJson {
    fn from(f: &Factors) -> Self {
        FactorsJson {
            ttft_p50_ms: f.ttft_p50_ms,
            queue_wait_ms: f.queue_wait_ms,
            health_penalty_ms: f.health_penalty_ms,
            error_penalty_ms: f.error_penalty_ms,
            load_penalty_ms: f.load_penalty_ms,
            cost_penalty_ms: f.cost_penalty_ms,
            pipeline_penalty_ms: f.pipeline_penalty_ms,
        }
    }
}

#[derive(Serialize)]
struct Excluded<'a> {
    id: &'a str,
    region: &'a str,
    reason: &'static str,
    detail: String,
}

fn exclusion_code(e: Exclusion) -> &'static str {
    match e {
        Exclusion::ModelNotReady => "model_not_ready",
        Exclusion::PipelineNotServable => "pipeline_not_servable",
        Exclusion::RegionNotAllowed => "region_not_allowed",
        Exclusion::Draining => "draining",
        Exclusion::Unhealthy => "unhealthy",
    }
}

#[derive(Serialize)]
struct Reason {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_nodes: Option<ModelStats>,
}

#[derive(Serialize)]
struct DiscoverResponse<'a> {
    object: &'static str,
    model: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pipeline: Option<&'a str>,
    strategy: &'static str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    regions: &'a [String],
    /// How long the answer may be used before asking again, and how long it may still be used
    /// while discovery is unreachable.
    ttl_ms: u64,
    stale_ok_ms: u64,
    generation: u64,
    generated_at_ms: u64,
    replica: &'a str,
    candidates: Vec<Candidate<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<Reason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    excluded: Option<Vec<Excluded<'a>>>,
    /// What the routing policy decided, when one is loaded and knows the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<PolicyJson>,
    /// Why (`explain=true`): the matched rule, every attempt, every drop.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_explain: Option<ExplainJson>,
}

impl<'a> DiscoverResponse<'a> {
    /// What every answer carries (no exclusions, no policy), its outcome counted in
    /// `/metrics`.
    fn new(
        sh: &'a Shared,
        snap: &Snapshot,
        params: &'a DiscoverParams,
        candidates: Vec<Candidate<'a>>,
        reason: Option<Reason>,
    ) -> DiscoverResponse<'a> {
        let outcome = if reason.is_some() { "empty" } else { "ok" };
        sh.metrics.discover.get_or_create(&OutcomeLabels { outcome }).inc();
        let q = &params.query;
        DiscoverResponse {
            object: "edgeroute.discovery",
            model: &q.model,
            pipeline: q.pipeline.as_deref(),
            strategy: params.strategy.name(),
            regions: &q.allowed_regions,
            ttl_ms: sh.cfg.serving.ttl_ms,
            stale_ok_ms: sh.cfg.serving.stale_ok_ms,
            generation: snap.generation,
            generated_at_ms: snap.built_at_unix_ms,
            replica: &sh.cfg.discovery.id,
            candidates,
            reason,
            excluded: None,
            policy: None,
            policy_explain: None,
        }
    }
}

fn empty_reason(snap: &Snapshot, p: &DiscoverParams, confined: bool) -> Reason {
    let q = &p.query;
    let Some(stats) = snap.model_stats(&q.model) else {
        let known = snap.models();
        let shown: Vec<&str> = known.iter().take(20).copied().collect();
        return Reason {
            code: "model_unknown",
            message: format!(
                "no node in the fleet holds model `{}`; models known: [{}]{}",
                q.model,
                shown.join(", "),
                if known.len() > shown.len() { ", ..." } else { "" }
            ),
            model_nodes: None,
        };
    };
    if let Some(pl) = &q.pipeline
        && !snap.knows_pipeline(pl)
    {
        return Reason {
            code: "pipeline_unknown",
            message: format!("no node can serve pipeline `{pl}` now"),
            model_nodes: Some(stats),
        };
    }
    let (code, message) = if stats.ready == 0 {
        (
            "model_not_ready",
            format!(
                "model `{}` is ready on no node ({} loading, {} failed, {} unloading)",
                q.model, stats.loading, stats.failed, stats.unloading
            ),
        )
    } else if confined && stats.eligible > 0 {
        (
            "residency_unsatisfied",
            format!(
                "no eligible node holding model `{}` is where the token's residency claims allow{}",
                q.model,
                if q.allowed_regions.is_empty() { "" } else { " among the regions asked for" }
            ),
        )
    } else if stats.eligible == 0 {
        (
            "no_healthy_node",
            format!(
                "model `{}` is ready on {} node(s), none of them healthy and accepting sessions{}",
                q.model,
                stats.ready,
                if stats.ejected > 0 {
                    format!(
                        " ({} ejected for wrong answers to the correctness probe)",
                        stats.ejected
                    )
                } else {
                    String::new()
                }
            ),
        )
    } else {
        (
            "constraints_unsatisfied",
            format!(
                "{} eligible node(s) hold model `{}`, none in the allowed regions [{}]{}",
                stats.eligible,
                q.model,
                q.allowed_regions.join(", "),
                if q.pipeline.is_some() { " with the pipeline servable" } else { "" }
            ),
        )
    };
    Reason { code, message, model_nodes: Some(stats) }
}

async fn discover(
    State(sh): State<Arc<Shared>>,
    caller: Option<Extension<Caller>>,
    RawQuery(raw): RawQuery,
) -> Response {
    let cfg = &sh.cfg;
    let params = match parse_params(
        raw.as_deref(),
        cfg.serving.default_k,
        cfg.serving.max_k,
        sh.default_strategy,
        cfg.limits.max_query_bytes,
    ) {
        Ok(p) => p,
        Err(e) => {
            sh.metrics.discover.get_or_create(&OutcomeLabels { outcome: "bad_request" }).inc();
            return e.into_response();
        }
    };
    // Without the extension (a route outside `require`) the caller is nobody: no map.
    let caller = caller.map_or(Caller { admin: false, token: None }, |Extension(c)| c);
    if params.explain && !caller.admin {
        sh.metrics.discover.get_or_create(&OutcomeLabels { outcome: "forbidden" }).inc();
        return ApiError::forbidden(
            "insufficient_scope",
            "explain=true shows the fleet's map: it needs a token with scope `admin`",
        )
        .with_param("explain")
        .into_response();
    }
    let compiled = sh.routing.as_ref().map(|r| r.compiled());
    if let Some(c) = &compiled
        && params.query.pipeline.is_none()
        && let Some(res) = decide(&sh, &caller, &params, c)
    {
        return res;
    }
    let policy = compiled.as_ref().map(|c| &c.loaded.policy);
    let snap = sh.snapshot.load();
    let q = &params.query;
    // Residency holds whatever the client asks: a node the token's claims refuse is no
    // candidate (a node of unknown jurisdiction fails a `jurisdictions` claim).
    let allowed = |n: &NodeInfo| {
        caller.may_process_in(&n.region, sh.jurisdictions.of(&n.id, &n.region, policy))
    };
    let (candidates, excluded) = if params.explain {
        let ranking = snap.explain(q, params.strategy);
        let mut excluded = Vec::new();
        let mut cands: Vec<Candidate> = Vec::new();
        for c in &ranking.candidates {
            let Some(i) = snap.index_of(&c.node) else { continue };
            let info = &snap.nodes()[i].info;
            if !allowed(info) {
                excluded.push(residency_excluded(info));
                continue;
            }
            let mut cand = Candidate::new(info, c.score_ms);
            cand.factors = Some(FactorsJson::from(&c.factors));
            cands.push(cand);
        }
        excluded.extend(ranking.excluded.iter().filter_map(|(id, why)| {
            let info = &snap.nodes()[snap.index_of(id)?].info;
            let detail = match why {
                Exclusion::Unhealthy | Exclusion::Draining => {
                    info.health_reason.clone().unwrap_or_default()
                }
                Exclusion::ModelNotReady if info.wrong_answers(&q.model).is_some() => {
                    info.wrong_answers(&q.model).unwrap_or_default().to_owned()
                }
                Exclusion::ModelNotReady => {
                    let model = match info.detail.model_states.get(&q.model) {
                        Some(ModelState::Loading) => "model loading",
                        Some(ModelState::Failed) => "model failed to load",
                        Some(ModelState::Draining) => {
                            "model draining before an unload: no new sessions"
                        }
                        Some(ModelState::Unloading) => "model unloading",
                        _ => "model not on the node",
                    };
                    // An unverified node has no models to show: say why.
                    match (&info.health_reason, info.health) {
                        (Some(why), "unhealthy") => format!("{model} (node unhealthy: {why})"),
                        _ => model.to_owned(),
                    }
                }
                Exclusion::PipelineNotServable => {
                    "a model of the pipeline is not ready on the node".to_owned()
                }
                Exclusion::RegionNotAllowed => {
                    format!("region `{}` is not in the allowed regions", info.region)
                }
            };
            Some(Excluded {
                id: &info.id,
                region: &info.region,
                reason: match why {
                    Exclusion::ModelNotReady if info.wrong_answers(&q.model).is_some() => {
                        "wrong_answers"
                    }
                    _ => exclusion_code(*why),
                },
                detail,
            })
        }));
        (cands, Some(excluded))
    } else {
        let allow = |e: &crate::fleet::NodeEntry| allowed(&e.info);
        let mut top = snap.top_k_where(q, params.strategy, allow);
        if let Some(near) = &params.near
            && (q.allowed_regions.is_empty() || q.allowed_regions.contains(near))
        {
            let local = Query { allowed_regions: vec![near.clone()], k: 1, ..q.clone() };
            if let Some(best) = snap.top_k_where(&local, params.strategy, allow).into_iter().next()
                && !top.iter().any(|c| c.idx == best.idx)
            {
                top.push(best);
            }
        }
        let cands = top.into_iter().map(|c| Candidate::new(snap.info(c), c.score_ms)).collect();
        (cands, None)
    };
    let reason: Option<Reason> = if candidates.is_empty() {
        Some(empty_reason(&snap, &params, caller.confined()))
    } else {
        None
    };
    let body = DiscoverResponse {
        excluded,
        ..DiscoverResponse::new(&sh, &snap, &params, candidates, reason)
    };
    json_response(&sh, &body, Some(&sh.cache_control))
}

fn residency_excluded(info: &NodeInfo) -> Excluded<'_> {
    Excluded {
        id: &info.id,
        region: &info.region,
        reason: "residency",
        detail: "outside the token's residency claims (jurisdictions, regions)".to_owned(),
    }
}

/// The header carrying [`edgeroute_policy::Decision::header`] on answers a policy decided.
pub const DECISION_HEADER: &str = "x-edgeroute-decision";

/// What the policy chose, beside the candidates.
#[derive(Serialize)]
struct PolicyJson {
    version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    /// The model served (differs from the one asked for after a cascade).
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tier: Option<String>,
    #[serde(skip_serializing_if = "is_zero")]
    cascade_step: u8,
    /// A cloud tier answered: where to send the request instead of a node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<PoolJson>,
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct PoolJson {
    name: String,
    endpoint: String,
    region: String,
}

#[derive(Serialize)]
struct ExplainJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    attempts: Vec<AttemptJson>,
    drops: Vec<DropJson>,
}

#[derive(Serialize)]
struct AttemptJson {
    step: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<String>,
    model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    tier: String,
    filters: Vec<&'static str>,
    candidates: u32,
}

#[derive(Serialize)]
struct DropJson {
    attempt: u16,
    /// A node id or a pool name.
    candidate: String,
    filter: &'static str,
    reason: String,
}

fn reason_text(r: &edgeroute_policy::Reason) -> String {
    use edgeroute_policy::Reason as R;
    match r {
        R::NotServed => "not_served".into(),
        R::Unavailable => "unavailable".into(),
        R::Residency => "residency".into(),
        R::RequestedRegions => "requested_regions".into(),
        R::PlacementRegion => "placement_region".into(),
        R::PlacementJurisdiction => "placement_jurisdiction".into(),
        R::PlacementHardware => "placement_hardware".into(),
        R::Region => "region".into(),
        R::Jurisdiction => "jurisdiction".into(),
        R::Hardware(h) => format!("hardware {}", h.name()),
        R::NotBelow { figure, value, bound } => format!("{figure:?} {value} not below {bound}"),
        R::Unknown(figure) => format!("{figure:?} unknown"),
        R::ExprFalse => "expr_false".into(),
        R::ExprError(e) => format!("expr_error: {e}"),
        R::BeyondK { rank } => format!("beyond_k (rank {rank})"),
    }
}

fn explain_json(
    d: &edgeroute_policy::Decision,
    c: &crate::routing::Compiled,
) -> Option<ExplainJson> {
    let ex = d.explain.as_ref()?;
    let s = |a: &Option<Arc<str>>| a.as_deref().map(str::to_owned);
    let pools = c.loaded.policy.pools();
    Some(ExplainJson {
        rule: s(&d.rule),
        attempts: ex
            .attempts
            .iter()
            .map(|a| AttemptJson {
                step: a.step,
                rule: s(&a.rule),
                model: a.model.to_string(),
                version: s(&a.version),
                tier: a.tier.to_string(),
                filters: a.filters.iter().map(|f| f.name()).collect(),
                candidates: a.candidates,
            })
            .collect(),
        drops: ex
            .drops
            .iter()
            .map(|dr| DropJson {
                attempt: dr.attempt,
                candidate: match dr.candidate {
                    edgeroute_policy::Candidate::Node(i) => {
                        c.fleet.node(i).map_or_else(String::new, |n| n.id.clone())
                    }
                    edgeroute_policy::Candidate::Pool(i) => {
                        pools.get(usize::from(i)).map_or_else(String::new, |p| p.name.to_string())
                    }
                },
                filter: dr.filter.name(),
                reason: reason_text(&dr.reason),
            })
            .collect(),
    })
}

/// Answers `/v1/discover` by the routing policy. `None`: the policy does not know the model
/// (or its fleet is stale), and today's scoring answers instead.
fn decide(
    sh: &Shared,
    caller: &Caller,
    params: &DiscoverParams,
    c: &crate::routing::Compiled,
) -> Option<Response> {
    let q = &params.query;
    let residency = caller.token.as_ref().and_then(|t| t.residency.as_deref());
    let claims = edgeroute_policy::Claims {
        sub: caller.token.as_ref().map(|t| t.tenant.to_string()).unwrap_or_default(),
        jurisdictions: residency.and_then(|r| r.jurisdictions.clone()),
        regions: residency.and_then(|r| r.regions.clone()),
        // The token's other claims: rules may match on them (`match.claims`).
        attrs: caller.token.as_ref().and_then(|t| t.attrs.clone()).unwrap_or_default(),
    };
    let mut req = edgeroute_policy::Request::new(&claims, &q.model);
    req.regions = &q.allowed_regions;
    req.session = params.session.as_deref();
    req.client_region = params.near.as_deref();
    req.k = if params.k_given { q.k } else { 0 };
    let d = c.decide(&req, params.explain);
    match d.outcome {
        Outcome::UnknownModel => return None,
        Outcome::StaleFleet | Outcome::UnknownVersion => {
            tracing::warn!(outcome = ?d.outcome, model = %q.model, "routing policy could not decide; scoring instead");
            return None;
        }
        Outcome::Routed | Outcome::NoEligible => {}
    }
    let snap = &c.snapshot;
    // After a cascade the nodes serve another model: clients name it in their requests.
    let serve_as = d.model.as_deref().filter(|m| *m != q.model);
    let mut candidates: Vec<Candidate> = d
        .nodes
        .iter()
        .filter_map(|p| {
            let n = c.fleet.node(p.node)?;
            // The policy applied residency; checked again from the token alone, so no
            // policy text can widen it.
            if !caller.may_process_in(&n.region, c.fleet.jurisdiction(p.node)) {
                return None;
            }
            let mut cand = Candidate::new(&snap.nodes()[snap.index_of(&n.id)?].info, p.score);
            cand.serve_as = serve_as;
            Some(cand)
        })
        .collect();
    let s = |a: &Option<Arc<str>>| a.as_deref().map(str::to_owned);
    let pool = d.pool.as_ref().map(|p| PoolJson {
        name: p.name.to_string(),
        endpoint: p.endpoint.clone(),
        region: p.region.clone(),
    });
    // A cloud tier answered: the pool is the one candidate, so a client follows the decision
    // as it follows any list (the policy checked the pool's residency; checked again here).
    let pool_models: Vec<String> = d.model.iter().map(|m| m.to_string()).collect();
    if let Some(p) = &d.pool
        && caller.may_process_in(&p.region, p.jurisdiction.as_deref())
    {
        candidates.push(Candidate {
            id: &p.name,
            region: &p.region,
            url: &p.endpoint,
            health: "ready",
            health_reason: None,
            models: &pool_models,
            queue_depth: 0,
            in_flight: 0,
            capacity: 0,
            ttft_p50_ms: 0.0,
            ttft_p99_ms: 0.0,
            ttft_estimated: true,
            error_rate: 0.0,
            cost_per_1k: (p.price.input_per_1k + p.price.output_per_1k) / 2.0,
            score_ms: 0.0,
            factors: None,
            serve_as: d.model.as_deref(),
            pool: Some(&p.name),
        });
    }
    let reason = (candidates.is_empty() && pool.is_none()).then(|| Reason {
        code: "policy_no_eligible",
        message: format!(
            "routing policy `{}`{}: no node or pool passed for model `{}` (an admin token with explain=true shows each drop)",
            d.policy_version,
            d.rule.as_deref().map(|r| format!(", rule `{r}`")).unwrap_or_default(),
            q.model
        ),
        model_nodes: snap.model_stats(&q.model),
    });
    let body = DiscoverResponse {
        policy: Some(PolicyJson {
            version: d.policy_version.to_string(),
            rule: s(&d.rule),
            model: s(&d.model),
            version_id: s(&d.version),
            tier: s(&d.tier),
            cascade_step: d.cascade_step,
            pool,
        }),
        policy_explain: explain_json(&d, c),
        // The policy's rule orders the nodes, whatever strategy the client asked for.
        strategy: d.strategy.name(),
        ..DiscoverResponse::new(sh, snap, params, candidates, reason)
    };
    let mut res = json_response(sh, &body, Some(&sh.cache_control));
    if let Ok(v) = HeaderValue::from_str(&d.header()) {
        res.headers_mut().insert(DECISION_HEADER, v);
    }
    Some(res)
}

fn json_response<T: Serialize>(sh: &Shared, body: &T, cache: Option<&HeaderValue>) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            let mut res = (StatusCode::OK, bytes).into_response();
            let h = res.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(REPLICA_HEADER, sh.replica_header.clone());
            if let Some(c) = cache {
                h.insert(header::CACHE_CONTROL, c.clone());
            }
            res
        }
        Err(e) => ApiError::internal(format!("serialising the answer: {e}")).into_response(),
    }
}

#[derive(Serialize)]
struct NodesResponse<'a> {
    object: &'static str,
    generation: u64,
    generated_at_ms: u64,
    replica: &'a str,
    nodes: Vec<&'a NodeInfo>,
}

/// A dry run of the candidate policy in the body (TOML, at most 1 MiB) against this replica's
/// fleet and the policy in force: never applied (`crate::policy_check`).
async fn policy_check(State(sh): State<Arc<Shared>>, body: axum::body::Body) -> Response {
    let max = crate::policy_check::MAX_TEXT_BYTES;
    let bytes = match axum::body::to_bytes(body, max).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("policy_too_large"),
                format!("A policy text is at most {max} bytes."),
            )
            .into_response();
        }
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return ApiError::invalid_request(None, "The policy text is not UTF-8.").into_response();
    };
    let snap = sh.snapshot.load_full();
    let live = sh.routing.as_ref().map(|r| r.compiled());
    let report = match &live {
        Some(c) => crate::policy_check::check(text, Some(&c.loaded.policy), c.fleet.nodes()),
        None => {
            // No policy in force: the nodes as the candidate would see them.
            let nodes = match edgeroute_policy::Policy::parse(text) {
                Ok(p) => crate::routing::facts(&snap, &p, &sh.jurisdictions),
                Err(_) => Vec::new(),
            };
            crate::policy_check::check(text, None, &nodes)
        }
    };
    json_response(&sh, &report, None)
}

async fn nodes(State(sh): State<Arc<Shared>>) -> Response {
    let snap = sh.snapshot.load();
    let body = NodesResponse {
        object: "edgeroute.nodes",
        generation: snap.generation,
        generated_at_ms: snap.built_at_unix_ms,
        replica: &sh.cfg.discovery.id,
        nodes: snap.infos().collect(),
    };
    json_response(&sh, &body, None)
}

#[derive(Serialize)]
struct TopologyResponse<'a> {
    object: &'static str,
    generation: u64,
    models: Vec<&'a str>,
    nodes: Vec<TopologyNode<'a>>,
    /// model → node → state, for every model a node holds in any state.
    matrix: BTreeMap<&'a str, BTreeMap<&'a str, ModelState>>,
    /// model → registry version → nodes holding that version (in any state), for the models
    /// whose nodes reported a version.
    versions: BTreeMap<&'a str, BTreeMap<&'a str, Vec<&'a str>>>,
}

#[derive(Serialize)]
struct TopologyNode<'a> {
    id: &'a str,
    region: &'a str,
    /// Where the node serves (its admin API for an operator's tools: `edgeroute rollout`).
    url: &'a str,
    health: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    hardware: Option<&'a str>,
}

async fn topology(State(sh): State<Arc<Shared>>) -> Response {
    let snap = sh.snapshot.load();
    let mut matrix: BTreeMap<&str, BTreeMap<&str, ModelState>> = BTreeMap::new();
    let mut versions: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for n in snap.infos() {
        for (m, s) in &n.detail.model_states {
            matrix.entry(m.as_str()).or_default().insert(n.id.as_str(), *s);
        }
        for (m, v) in &n.detail.model_versions {
            versions.entry(m).or_default().entry(v).or_default().push(&n.id);
        }
    }
    let body = TopologyResponse {
        object: "edgeroute.topology",
        generation: snap.generation,
        models: matrix.keys().copied().collect(),
        nodes: snap
            .infos()
            .map(|n| TopologyNode {
                id: &n.id,
                region: &n.region,
                url: &n.url,
                health: n.health,
                hardware: n.detail.hardware.as_deref(),
            })
            .collect(),
        matrix,
        versions,
    };
    json_response(&sh, &body, None)
}

#[derive(Serialize)]
struct HealthResponse<'a> {
    status: &'static str,
    replica: &'a str,
    region: &'a str,
    version: &'static str,
    uptime_s: u64,
    generation: u64,
    /// Milliseconds since the snapshot was built.
    snapshot_age_ms: u64,
    nodes: usize,
    nodes_by_health: BTreeMap<&'static str, usize>,
    bus: BusHealth,
    /// The routing policy, when `[policy]` names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<PolicyHealth>,
}

#[derive(Serialize)]
struct PolicyHealth {
    /// Where texts come from (`[policy] source`): `file` or `bus`.
    source: &'static str,
    /// The polled file (`source = "file"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    /// The version in force; null while a replica following the bus has received none.
    version: Option<String>,
    /// Where the text in force came from: `file` or `bus` (null: none yet).
    applied_from: Option<&'static str>,
    /// The bus revision of the text in force, when it came from the bus.
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<u64>,
    applied_at_ms: u64,
    /// Why the last text was refused (the version above stays in force), until a newer text
    /// is applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_refusal: Option<String>,
    applied: u64,
    refused: u64,
    /// The shadow policy (`[policy] shadow_file`): its version, decisions compared and
    /// differing since it was loaded, and the latest differing requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<crate::routing::ShadowReport>,
}

#[derive(Serialize)]
struct BusHealth {
    configured: bool,
    connected: bool,
    synced: bool,
    updates: u64,
}

async fn health(State(sh): State<Arc<Shared>>) -> Response {
    let snap = sh.snapshot.load();
    let mut by_health: BTreeMap<&'static str, usize> = BTreeMap::new();
    for n in snap.infos() {
        *by_health.entry(n.health).or_default() += 1;
    }
    let now_ms = crate::unix_ms();
    let bus = sh.bus_status();
    // Degraded, not down: with the bus or every node unreachable, the last-known fleet is still
    // the best answer a client can get.
    let status = if bus.configured && !bus.connected { "degraded" } else { "ready" };
    let body = HealthResponse {
        status,
        replica: &sh.cfg.discovery.id,
        region: &sh.cfg.discovery.region,
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: sh.started.elapsed().as_secs(),
        generation: snap.generation,
        snapshot_age_ms: now_ms.saturating_sub(snap.built_at_unix_ms),
        nodes: snap.len(),
        nodes_by_health: by_health,
        bus: BusHealth {
            configured: bus.configured,
            connected: bus.connected,
            synced: bus.synced,
            updates: bus.updates,
        },
        policy: sh.routing.as_ref().map(|r| {
            let st = r.status();
            PolicyHealth {
                source: r.source.as_str(),
                file: r.file.as_ref().map(|f| f.display().to_string()),
                version: st.applied_from.map(|_| st.version.clone()),
                applied_from: st.applied_from.map(crate::routing::Source::as_str),
                revision: st.revision,
                applied_at_ms: st.applied_at_ms,
                last_refusal: st.last_refusal,
                applied: st.applied,
                refused: st.refused,
                shadow: r.shadow_report(),
            }
        }),
    };
    json_response(&sh, &body, None)
}

async fn metrics(State(sh): State<Arc<Shared>>) -> Response {
    sh.refresh_gauges();
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        sh.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(q: &str) -> Result<DiscoverParams, ApiError> {
        parse_params(Some(q), 3, 32, Strategy::LatencyFirst, 2048)
    }

    #[test]
    fn parameters_parse_and_default() {
        let p = parse("model=llama-3.1-8b&region=tor,mtl&region=van&k=5&explain").unwrap();
        assert_eq!(p.query.allowed_regions, ["tor", "mtl", "van"]);
        assert_eq!((p.query.k, p.explain, p.strategy), (5, true, Strategy::LatencyFirst));
        let p = parse("model=meta%2Fllama&strategy=cost-optimized&pipeline=voice").unwrap();
        assert_eq!(p.query.model, "meta/llama");
        assert_eq!(p.query.k, 3);
        assert_eq!(p.strategy, Strategy::CostOptimized);
        assert_eq!(p.query.pipeline.as_deref(), Some("voice"));
        assert_eq!(parse("model=a&near=vancouver").unwrap().near.as_deref(), Some("vancouver"));
        let p = parse("model=a&session=s-1").unwrap();
        assert_eq!((p.session.as_deref(), p.k_given), (Some("s-1"), false));
    }

    #[test]
    fn bad_input_names_the_parameter() {
        let param = |q: &str| parse(q).unwrap_err().body.error.param.unwrap_or_default();
        assert_eq!(param("k=3"), "model");
        assert_eq!(param("model=a&k=0"), "k");
        assert_eq!(param("model=a&k=33"), "k");
        assert_eq!(param("model=a&k=x"), "k");
        assert_eq!(param("model=a&region=to%20r"), "region");
        assert_eq!(param("model=a&region="), "region");
        assert_eq!(param("model=a&regions=tor"), "regions", "a typo must not drop residency");
        assert_eq!(param("model=a&model=b"), "model");
        assert_eq!(param("model=a&near=to%20r"), "near");
        assert_eq!(param("model=a&near=tor&near=mtl"), "near");
        assert_eq!(param("model=a&strategy=fast"), "strategy");
        assert_eq!(param("model=a&explain=maybe"), "explain");
        assert_eq!(param("model=a&session=a%20b"), "session");
        assert_eq!(param("model=a&session=a&session=b"), "session");
        assert_eq!(param("model=a%20b"), "model");
        let long = format!("model={}", "a".repeat(3000));
        assert_eq!(parse(&long).unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
