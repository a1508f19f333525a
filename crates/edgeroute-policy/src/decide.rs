//! The decision: a filter chain over the candidates of each attempt (cascade step × tier ×
//! version), recording which filters ran and why each dropped candidate was dropped.
//!
//! Order of attempts: for each model of the cascade (the requested one, then the first
//! matched rule's `cascade`, each under the rule that matches *it*), for each of that rule's
//! tiers in order, for the edge each version in order (the canary's pick, then the split's
//! other versions; a pinned version alone). The first attempt with an eligible candidate
//! answers. Residency holds on every attempt: no tier, version or fallback widens it.

use std::sync::Arc;

use crate::expr::ExprInput;
use crate::fleet::Fleet;
use crate::hash::{bucket, mix, stable_hash};
use crate::policy::{Below, Policy, Rule, ScoreWeights, TenantResidency, TierRef};
use crate::residency::lists_allow;
use crate::types::{Hardware, Price, Request, Sticky, StrategyKind};

/// Candidates returned when neither the request nor the rule says.
pub const DEFAULT_K: usize = 3;

/// How a decision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `nodes` (edge) or `pool` (cloud) says where to go.
    Routed,
    /// Every attempt's every candidate was dropped: see `explain`.
    NoEligible,
    /// The model is not in the registry (the caller may route it the policy-less way).
    UnknownModel,
    /// The pinned version is not one of the model's.
    UnknownVersion,
    /// The fleet was compiled for another policy: rebuild it.
    StaleFleet,
}

/// One link of the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// The model version is ready on the node (the pool serves the model).
    Serves,
    /// The node accepts new sessions.
    Health,
    /// The tenant's residency (claims and policy), narrowed by the client's regions.
    Residency,
    /// The registry's placement constraints for the version.
    Placement,
    /// The rule's regions, jurisdictions and hardware.
    Constraints,
    /// The rule's bounds on node figures and the client's RTT.
    Thresholds,
    /// The rule's price ceilings.
    Price,
    /// The rule's expression.
    Expr,
    /// Eligible, but not among the `k` best.
    Rank,
}

impl Filter {
    pub fn name(self) -> &'static str {
        match self {
            Filter::Serves => "serves",
            Filter::Health => "health",
            Filter::Residency => "residency",
            Filter::Placement => "placement",
            Filter::Constraints => "constraints",
            Filter::Thresholds => "thresholds",
            Filter::Price => "price",
            Filter::Expr => "expr",
            Filter::Rank => "rank",
        }
    }
}

/// The filters of an edge attempt, in order.
pub const EDGE_FILTERS: &[Filter] = &[
    Filter::Serves,
    Filter::Health,
    Filter::Residency,
    Filter::Placement,
    Filter::Constraints,
    Filter::Thresholds,
    Filter::Price,
    Filter::Expr,
    Filter::Rank,
];

/// The filters of a cloud attempt (a pool has no node figures).
pub const CLOUD_FILTERS: &[Filter] =
    &[Filter::Serves, Filter::Residency, Filter::Constraints, Filter::Price, Filter::Rank];

/// A node figure a bound applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    TtftP99Ms,
    Queue,
    GpuUtil,
    ErrorRate,
    RttMs,
    PricePer1k,
    RequestPrice,
}

/// Why a candidate was dropped.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    NotServed,
    Unavailable,
    /// Outside the tenant's jurisdictions or regions.
    Residency,
    /// Outside the regions the client asked for.
    RequestedRegions,
    PlacementRegion,
    PlacementJurisdiction,
    PlacementHardware,
    Region,
    Jurisdiction,
    Hardware(Hardware),
    /// `value` is not below `bound`.
    NotBelow {
        figure: Figure,
        value: f64,
        bound: f64,
    },
    /// The bound's figure is unknown (no RTT measured, no price, no token estimate).
    Unknown(Figure),
    ExprFalse,
    ExprError(String),
    /// Eligible, ranked `rank` (0-based) with `k` wanted.
    BeyondK {
        rank: u32,
    },
}

/// A candidate of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Candidate {
    /// Index into [`Fleet::nodes`].
    Node(u32),
    /// Index into [`Policy::pools`].
    Pool(u16),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Drop {
    /// Index into [`Explain::attempts`].
    pub attempt: u16,
    pub candidate: Candidate,
    pub filter: Filter,
    pub reason: Reason,
}

/// One run of the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// 0: the requested model; n: the n-th fallback.
    pub step: u8,
    /// The rule in force for this step's model.
    pub rule: Option<Arc<str>>,
    pub model: Arc<str>,
    pub version: Option<Arc<str>>,
    pub tier: Arc<str>,
    pub filters: &'static [Filter],
    /// How many candidates entered the chain.
    pub candidates: u32,
}

/// Why: built only when asked.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Explain {
    pub attempts: Vec<Attempt>,
    pub drops: Vec<Drop>,
}

/// An edge node chosen, best first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pick {
    /// Index into [`Fleet::nodes`].
    pub node: u32,
    /// The strategy's score (predicted first token, ms).
    pub score: f64,
}

/// The answer for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    pub policy_version: Arc<str>,
    /// The rule the request matched (none: the registry's defaults, edge, latency first).
    pub rule: Option<Arc<str>>,
    /// The rule in force for the step that answered (differs after a cascade).
    pub step_rule: Option<Arc<str>>,
    /// The logical model served.
    pub model: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
    /// `edge` or the pool's name.
    pub tier: Option<Arc<str>>,
    pub cascade_step: u8,
    /// How the nodes were ordered: the strategy of the rule in force for the step that
    /// answered (latency first without one).
    pub strategy: StrategyKind,
    pub nodes: Vec<Pick>,
    pub pool: Option<Arc<crate::Pool>>,
    /// How many attempts ran.
    pub attempts: u16,
    pub explain: Option<Explain>,
}

impl Decision {
    fn new(policy_version: Arc<str>) -> Decision {
        Decision {
            outcome: Outcome::NoEligible,
            policy_version,
            rule: None,
            step_rule: None,
            model: None,
            version: None,
            tier: None,
            cascade_step: 0,
            strategy: StrategyKind::LatencyFirst,
            nodes: Vec::new(),
            pool: None,
            attempts: 0,
            explain: None,
        }
    }

    /// The compact value for answers' headers:
    /// `v=2026-12-03.1;rule=eu-canary;tier=edge;ver=v2` (`-` for what is absent; `;step=n`
    /// after a cascade).
    pub fn header(&self) -> String {
        let dash = |s: &Option<Arc<str>>| s.as_deref().unwrap_or("-").to_owned();
        let mut h = format!(
            "v={};rule={};tier={};ver={}",
            self.policy_version,
            dash(&self.rule),
            dash(&self.tier),
            dash(&self.version)
        );
        if self.cascade_step > 0 {
            h.push_str(&format!(";step={}", self.cascade_step));
        }
        h
    }
}

/// What round-robin and weighted strategies remember between decisions: one counter per rule
/// (and one for requests no rule matched). The caller owns it (per thread, or behind its own
/// lock); a policy reload may hand the old one on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingState {
    counters: Vec<u64>,
}

impl RoutingState {
    fn next(&mut self, slot: usize) -> u64 {
        if self.counters.len() <= slot {
            self.counters.resize(slot + 1, 0);
        }
        let c = self.counters[slot];
        self.counters[slot] = c.wrapping_add(1);
        c
    }
}

#[derive(Debug, Clone, Copy)]
struct Cand {
    idx: u32,
    key: f64,
    score: f64,
}

struct Ctx<'a> {
    req: &'a Request<'a>,
    tenant: Option<&'a TenantResidency>,
    explain: Option<Explain>,
    attempts: u16,
    survivors: Vec<Cand>,
}

impl Ctx<'_> {
    fn residency(&self, region: &str, jurisdiction: Option<&str>) -> Result<(), Reason> {
        let c = self.req.claims;
        let ok =
            lists_allow(c.jurisdictions.as_deref(), c.regions.as_deref(), region, jurisdiction)
                && self.tenant.is_none_or(|t| {
                    lists_allow(
                        t.jurisdictions.as_deref(),
                        t.regions.as_deref(),
                        region,
                        jurisdiction,
                    )
                });
        if !ok {
            return Err(Reason::Residency);
        }
        if !self.req.regions.is_empty() && !self.req.regions.iter().any(|r| r == region) {
            return Err(Reason::RequestedRegions);
        }
        Ok(())
    }

    fn drop(&mut self, candidate: Candidate, filter: Filter, reason: Reason) {
        if let Some(ex) = &mut self.explain {
            let attempt = self.attempts.saturating_sub(1);
            ex.drops.push(Drop { attempt, candidate, filter, reason });
        }
    }
}

fn rule_constraints(
    rule: Option<&Rule>,
    region: &str,
    jurisdiction: Option<&str>,
    hardware: Option<Hardware>,
) -> Result<(), Reason> {
    let Some(r) = rule else { return Ok(()) };
    if !r.regions.is_empty() && !r.regions.iter().any(|x| x == region) {
        return Err(Reason::Region);
    }
    if !r.jurisdictions.is_empty()
        && !jurisdiction.is_some_and(|j| r.jurisdictions.iter().any(|x| x == j))
    {
        return Err(Reason::Jurisdiction);
    }
    if let Some(hw) = hardware
        && !r.hardware.is_empty()
        && !r.hardware.contains(&hw)
    {
        return Err(Reason::Hardware(hw));
    }
    Ok(())
}

fn below(figure: Figure, value: f64, bound: Option<f64>) -> Result<(), Reason> {
    match bound {
        // NaN is not below anything: fails closed.
        Some(b) if value.partial_cmp(&b) != Some(std::cmp::Ordering::Less) => {
            Err(Reason::NotBelow { figure, value, bound: b })
        }
        _ => Ok(()),
    }
}

fn price_ok(b: &Below, price: Option<Price>, req: &Request<'_>) -> Result<(), Reason> {
    if b.price_per_1k.is_none() && b.request_price.is_none() {
        return Ok(());
    }
    let Some(p) = price else { return Err(Reason::Unknown(Figure::PricePer1k)) };
    below(Figure::PricePer1k, p.blended_per_1k(req.tokens), b.price_per_1k)?;
    if b.request_price.is_some() {
        let Some(t) = req.tokens else { return Err(Reason::Unknown(Figure::RequestPrice)) };
        below(Figure::RequestPrice, p.request(t), b.request_price)?;
    }
    Ok(())
}

fn score(
    n: &crate::NodeFacts,
    rtt: Option<f64>,
    w: &ScoreWeights,
    tokens: Option<crate::Tokens>,
) -> f64 {
    let f = |x: f64| if x.is_finite() { x.max(0.0) } else { 0.0 };
    let p50 = f(n.ttft_p50_ms);
    let cap = f64::from(n.capacity.max(1));
    w.ttft * p50
        + w.queue * f64::from(n.queue) * p50 / cap
        + w.rtt * f(rtt.unwrap_or(0.0))
        + w.error_ms * f(n.error_rate).min(1.0)
        + w.load_ms * (f64::from(n.in_flight) / cap).min(4.0)
        + w.cost_ms * n.price.map_or(0.0, |p| f(p.blended_per_1k(tokens)))
}

impl Policy {
    /// A fresh round-robin state for this policy.
    pub fn new_state(&self) -> RoutingState {
        RoutingState { counters: vec![0; self.rules.len() + 1] }
    }

    /// Decides where `req` goes in `fleet`. Pure: the same policy, fleet, request and state
    /// give the same decision. `explain` builds the attempts and every drop (allocates); without
    /// it a decision allocates its `nodes` and a reused buffer of survivors, nothing per
    /// candidate.
    pub fn decide(
        &self,
        req: &Request<'_>,
        fleet: &Fleet,
        state: &mut RoutingState,
        explain: bool,
    ) -> Decision {
        let mut d = Decision::new(self.version.clone());
        // Asked for, an explanation is there even when no attempt ran.
        d.explain = explain.then(Explain::default);
        if fleet.fingerprint != self.fingerprint {
            d.outcome = Outcome::StaleFleet;
            return d;
        }
        let Some(model) = self.registry.index(req.model) else {
            d.outcome = Outcome::UnknownModel;
            return d;
        };
        let def = &self.registry.models()[model as usize];
        let pinned = match req.version {
            None => None,
            Some(v) => match def.version_index(v) {
                Some(i) => Some(i),
                None => {
                    d.outcome = Outcome::UnknownVersion;
                    return d;
                }
            },
        };
        let first = self.rule_for(model, req);
        d.rule = first.map(|i| self.rules[usize::from(i)].id.clone());
        let mut cx = Ctx {
            req,
            tenant: self.tenants.get(&req.claims.sub),
            explain: explain.then(Explain::default),
            attempts: 0,
            // One buffer for every attempt: no reallocation as nodes pass.
            survivors: Vec::with_capacity(fleet.len()),
        };
        let cascade: &[u32] = first.map_or(&[], |i| &self.rules[usize::from(i)].cascade);
        for step in 0..=cascade.len() {
            let (m, ri) = if step == 0 {
                (model, first)
            } else {
                let m = cascade[step - 1];
                (m, self.rule_for(m, req))
            };
            let rule = ri.map(|i| &self.rules[usize::from(i)]);
            let pinned = if step == 0 { pinned } else { None };
            let chosen = pinned.unwrap_or_else(|| self.canary(m, rule, req));
            let slot = ri.map_or(self.rules.len(), usize::from);
            let tiers: &[TierRef] = rule.map_or(&[TierRef::Edge], |r| &r.tiers);
            for &tier in tiers {
                let served = match tier {
                    TierRef::Edge => {
                        let others = rule
                            .filter(|_| pinned.is_none())
                            .map_or(&[][..], |r| &r.versions[..])
                            .iter()
                            .map(|&(v, _)| v)
                            .filter(|&v| v != chosen);
                        let mut hit = None;
                        for v in std::iter::once(chosen).chain(others) {
                            if self.attempt_edge(&mut cx, fleet, step, m, v, rule) {
                                hit = Some(v);
                                break;
                            }
                        }
                        hit.map(|v| (v, None))
                    }
                    TierRef::Pool(p) => self
                        .attempt_pool(&mut cx, step, m, pinned, p, rule)
                        .map(|v| (v, Some(self.pools[usize::from(p)].clone()))),
                };
                if let Some((v, pool)) = served {
                    let def = &self.registry.models()[m as usize];
                    d.outcome = Outcome::Routed;
                    d.step_rule = rule.map(|r| r.id.clone());
                    d.model = Some(def.name.clone());
                    d.version = Some(def.versions[v].id.clone());
                    d.tier =
                        Some(pool.as_ref().map_or_else(|| self.edge.clone(), |p| p.name.clone()));
                    d.cascade_step = step as u8;
                    d.strategy = rule.map_or(StrategyKind::LatencyFirst, |r| r.strategy);
                    if pool.is_none() {
                        let k = self.k(req, rule);
                        d.nodes = self.rank(&mut cx, fleet, state, slot, rule, k);
                    }
                    d.pool = pool;
                    d.attempts = cx.attempts;
                    d.explain = cx.explain;
                    return d;
                }
            }
        }
        d.attempts = cx.attempts;
        d.explain = cx.explain;
        d
    }

    fn k(&self, req: &Request<'_>, rule: Option<&Rule>) -> usize {
        let k = if req.k > 0 { req.k } else { rule.and_then(|r| r.k).unwrap_or(DEFAULT_K) };
        k.min(crate::policy::MAX_K)
    }

    /// The version the rule's split gives this caller (the registry's default without one).
    fn canary(&self, m: u32, rule: Option<&Rule>, req: &Request<'_>) -> usize {
        let def = &self.registry.models()[m as usize];
        let Some(r) = rule.filter(|r| r.total_weight > 0) else { return def.default_version };
        let key = match r.sticky {
            Sticky::Session => req.session.unwrap_or(&req.claims.sub),
            Sticky::Tenant => &req.claims.sub,
        };
        let mut b = bucket(stable_hash(&[r.id.as_bytes(), key.as_bytes()]), r.total_weight);
        for &(v, w) in &r.versions {
            if b < u64::from(w) {
                return v;
            }
            b -= u64::from(w);
        }
        def.default_version
    }

    #[allow(clippy::too_many_arguments)]
    fn begin(
        &self,
        cx: &mut Ctx<'_>,
        step: usize,
        m: u32,
        v: Option<usize>,
        tier: Arc<str>,
        rule: Option<&Rule>,
        filters: &'static [Filter],
        n: usize,
    ) {
        cx.attempts = cx.attempts.saturating_add(1);
        if let Some(ex) = &mut cx.explain {
            let def = &self.registry.models()[m as usize];
            ex.attempts.push(Attempt {
                step: step as u8,
                rule: rule.map(|r| r.id.clone()),
                model: def.name.clone(),
                version: v.map(|v| def.versions[v].id.clone()),
                tier,
                filters,
                candidates: n as u32,
            });
        }
    }

    /// Runs the edge chain for version `v` of model `m`; leaves the eligible nodes in
    /// `cx.survivors`.
    fn attempt_edge(
        &self,
        cx: &mut Ctx<'_>,
        fleet: &Fleet,
        step: usize,
        m: u32,
        v: usize,
        rule: Option<&Rule>,
    ) -> bool {
        self.begin(cx, step, m, Some(v), self.edge.clone(), rule, EDGE_FILTERS, fleet.len());
        let vid = self.registry.vid(m, v);
        let def = &self.registry.models()[m as usize];
        let ver = &def.versions[v];
        let no_below = Below::default();
        let b = rule.map_or(&no_below, |r| &r.below);
        let weights =
            rule.map_or(ScoreWeights::for_strategy(StrategyKind::LatencyFirst), |r| r.score);
        cx.survivors.clear();
        for (i, (n, c)) in fleet.nodes().iter().zip(&fleet.compiled).enumerate() {
            let cand = Candidate::Node(i as u32);
            let j = c.jurisdiction.as_deref();
            // Looked up only for a node that gets as far as needing it.
            let rtt = || cx.req.rtt_to(&n.region);
            let verdict = (|| {
                if !c.served.contains(&vid) {
                    return Err((Filter::Serves, Reason::NotServed));
                }
                if !n.available {
                    return Err((Filter::Health, Reason::Unavailable));
                }
                cx.residency(&n.region, j).map_err(|r| (Filter::Residency, r))?;
                placement(def, ver, &n.region, j, n.hardware)
                    .map_err(|r| (Filter::Placement, r))?;
                rule_constraints(rule, &n.region, j, Some(n.hardware))
                    .map_err(|r| (Filter::Constraints, r))?;
                let th = |f, x, bound| below(f, x, bound).map_err(|r| (Filter::Thresholds, r));
                th(Figure::TtftP99Ms, n.ttft_p99_ms, b.ttft_p99_ms)?;
                th(Figure::Queue, f64::from(n.queue), b.queue.map(f64::from))?;
                th(Figure::GpuUtil, n.gpu_util, b.gpu_util)?;
                th(Figure::ErrorRate, n.error_rate, b.error_rate)?;
                if b.rtt_ms.is_some() {
                    let Some(ms) = rtt() else {
                        return Err((Filter::Thresholds, Reason::Unknown(Figure::RttMs)));
                    };
                    th(Figure::RttMs, ms, b.rtt_ms)?;
                }
                price_ok(b, n.price, cx.req).map_err(|r| (Filter::Price, r))?;
                if let Some(e) = rule.and_then(|r| r.expr.as_ref()) {
                    let input = ExprInput { node: n, rtt_ms: rtt(), request: cx.req };
                    match e.eval(&input) {
                        Ok(true) => {}
                        Ok(false) => return Err((Filter::Expr, Reason::ExprFalse)),
                        Err(msg) => return Err((Filter::Expr, Reason::ExprError(msg))),
                    }
                }
                Ok(())
            })();
            match verdict {
                Err((f, r)) => cx.drop(cand, f, r),
                Ok(()) => {
                    let s = score(n, rtt(), &weights, cx.req.tokens);
                    let strategy = rule.map_or(StrategyKind::LatencyFirst, |r| r.strategy);
                    let key = match strategy {
                        StrategyKind::CostOptimized => {
                            n.price.map_or(f64::INFINITY, |p| p.blended_per_1k(cx.req.tokens))
                        }
                        StrategyKind::LeastConnections => f64::from(n.in_flight),
                        _ => s,
                    };
                    cx.survivors.push(Cand { idx: i as u32, key, score: s });
                }
            }
        }
        !cx.survivors.is_empty()
    }

    /// Orders `cx.survivors` by the rule's strategy and keeps `k`; the rest are `Rank` drops.
    fn rank(
        &self,
        cx: &mut Ctx<'_>,
        fleet: &Fleet,
        state: &mut RoutingState,
        slot: usize,
        rule: Option<&Rule>,
        k: usize,
    ) -> Vec<Pick> {
        let strategy = rule.map_or(StrategyKind::LatencyFirst, |r| r.strategy);
        let by_key = |a: &Cand, b: &Cand| {
            a.key.total_cmp(&b.key).then(a.score.total_cmp(&b.score)).then(a.idx.cmp(&b.idx))
        };
        let s = &mut cx.survivors;
        let n = s.len();
        match strategy {
            StrategyKind::RoundRobin => {
                // Survivors are in node order; start one further each decision.
                let start = (state.next(slot) % n as u64) as usize;
                s.rotate_left(start);
            }
            StrategyKind::Weighted => {
                let r = rule.map_or(&[][..], |r| &r.weights[..]);
                let weight = |c: &Cand| {
                    let node = &fleet.nodes()[c.idx as usize];
                    r.iter()
                        .find(|(key, _)| *key == node.id)
                        .or_else(|| r.iter().find(|(key, _)| *key == node.region))
                        .map_or(0, |&(_, w)| u64::from(w))
                };
                let total: u64 = s.iter().map(weight).sum();
                let draw = state.next(slot);
                s.sort_by(by_key);
                if total > 0 {
                    let mut b = bucket(mix(draw ^ stable_hash(&[b"weighted"])), total);
                    let mut at = 0;
                    for (i, c) in s.iter().enumerate() {
                        let w = weight(c);
                        if b < w {
                            at = i;
                            break;
                        }
                        b -= w;
                    }
                    s[..=at].rotate_right(1);
                }
            }
            _ => {
                if cx.explain.is_none() && n > k && k > 0 {
                    s.select_nth_unstable_by(k - 1, by_key);
                    s.truncate(k);
                }
                s.sort_by(by_key);
            }
        }
        let picks = s.iter().take(k).map(|c| Pick { node: c.idx, score: c.score }).collect();
        if cx.explain.is_some() {
            let rest: Vec<Cand> = s.iter().skip(k).copied().collect();
            for (i, c) in rest.into_iter().enumerate() {
                cx.drop(
                    Candidate::Node(c.idx),
                    Filter::Rank,
                    Reason::BeyondK { rank: (k + i) as u32 },
                );
            }
        }
        picks
    }

    /// Runs the cloud chain for pool `p`; the version it serves when eligible.
    fn attempt_pool(
        &self,
        cx: &mut Ctx<'_>,
        step: usize,
        m: u32,
        pinned: Option<usize>,
        p: u16,
        rule: Option<&Rule>,
    ) -> Option<usize> {
        let pool = &self.pools[usize::from(p)];
        let def = &self.registry.models()[m as usize];
        let v = pool.serves.get(&*def.name).and_then(|v| def.version_index(v));
        self.begin(cx, step, m, v, pool.name.clone(), rule, CLOUD_FILTERS, 1);
        let cand = Candidate::Pool(p);
        let no_below = Below::default();
        let b = rule.map_or(&no_below, |r| &r.below);
        let verdict = (|| {
            let v = match v {
                Some(v) if pinned.is_none_or(|pv| pv == v) => v,
                _ => return Err((Filter::Serves, Reason::NotServed)),
            };
            let j = pool.jurisdiction.as_deref();
            cx.residency(&pool.region, j).map_err(|r| (Filter::Residency, r))?;
            rule_constraints(rule, &pool.region, j, None).map_err(|r| (Filter::Constraints, r))?;
            price_ok(b, Some(pool.price), cx.req).map_err(|r| (Filter::Price, r))?;
            Ok(v)
        })();
        match verdict {
            Ok(v) => Some(v),
            Err((f, r)) => {
                cx.drop(cand, f, r);
                None
            }
        }
    }
}

/// The registry's placement check without allocating (the public one names the model).
fn placement(
    m: &crate::ModelDef,
    v: &crate::VersionDef,
    region: &str,
    jurisdiction: Option<&str>,
    hardware: Hardware,
) -> Result<(), Reason> {
    for (regions, jurisdictions, hw) in
        [(&m.regions, &m.jurisdictions, &m.hardware), (&v.regions, &v.jurisdictions, &v.hardware)]
    {
        if !regions.is_empty() && !regions.iter().any(|r| r == region) {
            return Err(Reason::PlacementRegion);
        }
        if !jurisdictions.is_empty()
            && !jurisdiction.is_some_and(|j| jurisdictions.iter().any(|x| x == j))
        {
            return Err(Reason::PlacementJurisdiction);
        }
        if !hw.is_empty() && !hw.contains(&hardware) {
            return Err(Reason::PlacementHardware);
        }
    }
    Ok(())
}
