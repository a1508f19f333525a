//! Scoring and ranking candidate nodes for a request: the discovery service's decision,
//! as a pure function of a fleet snapshot, the request and the deployment's weights.
//!
//! A node's score is a predicted time to first token in milliseconds (lower is better): its
//! reported TTFT p50, plus the wait its queue implies, plus penalties for degraded health,
//! server-side error rate and saturation. Strategies change the weights: latency-first is the
//! default; availability-first favours spare capacity; cost-optimized adds the node's price.
//! Hard constraints (model ready, pipeline servable, health, data residency) exclude nodes and
//! say why. Ties are broken by node id, so a ranking is deterministic for a given snapshot;
//! near-tie randomisation belongs to the client, which knows its own seed.
//!
//! A list of `k ≥ 2` candidates spans two regions whenever the eligible nodes do: if the best
//! `k` all sit in one region, the last is replaced by the best node outside it, so the
//! client's standby survives a whole-region outage (see [`diversify`]).

use std::collections::{BTreeMap, BTreeSet};

/// A node's health as discovery estimates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Serving, but failing a noticeable share of requests.
    Degraded,
    /// Full but healthy: deprioritised, never excluded.
    Saturated,
    /// Refusing new sessions.
    Draining,
    /// Ejected.
    Unhealthy,
}

/// What discovery knows of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub region: String,
    pub health: Health,
    /// Models ready on the node.
    pub models: BTreeSet<String>,
    /// Pipelines every model of which is ready on the node, with their availability: the
    /// share of free slots on the pipeline's busiest GPU, in [0, 1].
    pub pipelines: BTreeMap<String, f64>,
    pub queue_depth: u32,
    pub in_flight: u32,
    pub capacity: u32,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// Server-side failures over the node's window, in [0, 1].
    pub error_rate: f64,
    /// Price per 1,000 tokens, in the deployment's currency; 0 when unknown.
    pub cost_per_1k: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    LatencyFirst,
    AvailabilityFirst,
    CostOptimized,
}

impl Strategy {
    pub const ALL: [Strategy; 3] =
        [Strategy::LatencyFirst, Strategy::AvailabilityFirst, Strategy::CostOptimized];

    /// The strategy's wire name (`latency_first`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Strategy::LatencyFirst => "latency_first",
            Strategy::AvailabilityFirst => "availability_first",
            Strategy::CostOptimized => "cost_optimized",
        }
    }

    /// Parses a wire name; `-` and `_` are interchangeable.
    pub fn from_name(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|k| k.name() == s.replace('-', "_"))
    }

    /// Position in [`Strategy::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Tunable per deployment. All penalties are in milliseconds of predicted TTFT.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Added for a degraded node.
    pub degraded_ms: f64,
    /// Added for a saturated node.
    pub saturated_ms: f64,
    /// Added per unit of error rate (0.1 error rate × 2000 = 200 ms).
    pub error_rate_ms: f64,
    /// Multiplies the queue wait (queued requests × TTFT p50 / capacity).
    pub queue_factor: f64,
    /// Availability-first: added per unit of load (in-flight / capacity).
    pub load_ms: f64,
    /// Cost-optimized: added per unit of cost per 1k tokens.
    pub cost_ms: f64,
    /// For a pipeline request: added per unit of unavailability of the pipeline's busiest GPU
    /// (a fully busy bottleneck adds the whole figure).
    pub pipeline_busy_ms: f64,
}

impl Weights {
    pub fn for_strategy(s: Strategy) -> Weights {
        let base = Weights {
            degraded_ms: 150.0,
            saturated_ms: 100.0,
            error_rate_ms: 2000.0,
            queue_factor: 1.0,
            load_ms: 0.0,
            cost_ms: 0.0,
            pipeline_busy_ms: 200.0,
        };
        match s {
            Strategy::LatencyFirst => base,
            Strategy::AvailabilityFirst => Weights { load_ms: 300.0, saturated_ms: 400.0, ..base },
            Strategy::CostOptimized => Weights { cost_ms: 100.0, ..base },
        }
    }
}

/// What the client asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub model: String,
    /// A pipeline that must be servable on the node, if any.
    pub pipeline: Option<String>,
    /// Data residency: only these regions (empty = any).
    pub allowed_regions: Vec<String>,
    pub k: usize,
}

/// Each factor of a score, for `explain=true`.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub ttft_p50_ms: f64,
    pub queue_wait_ms: f64,
    pub health_penalty_ms: f64,
    pub error_penalty_ms: f64,
    pub load_penalty_ms: f64,
    pub cost_penalty_ms: f64,
    pub pipeline_penalty_ms: f64,
}

impl Factors {
    pub fn total(&self) -> f64 {
        self.ttft_p50_ms
            + self.queue_wait_ms
            + self.health_penalty_ms
            + self.error_penalty_ms
            + self.load_penalty_ms
            + self.cost_penalty_ms
            + self.pipeline_penalty_ms
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub node: String,
    pub score_ms: f64,
    pub factors: Factors,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exclusion {
    ModelNotReady,
    PipelineNotServable,
    RegionNotAllowed,
    Draining,
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Ranking {
    /// Best first, at most `k`.
    pub candidates: Vec<Scored>,
    /// Why every other node was left out (nodes beyond `k` are not listed here).
    pub excluded: Vec<(String, Exclusion)>,
}

fn exclusion(n: &NodeView, q: &Query) -> Option<Exclusion> {
    if !q.allowed_regions.is_empty() && !q.allowed_regions.contains(&n.region) {
        return Some(Exclusion::RegionNotAllowed);
    }
    if !n.models.contains(&q.model) {
        return Some(Exclusion::ModelNotReady);
    }
    if let Some(p) = &q.pipeline
        && !n.pipelines.contains_key(p)
    {
        return Some(Exclusion::PipelineNotServable);
    }
    match n.health {
        Health::Unhealthy => Some(Exclusion::Unhealthy),
        Health::Draining => Some(Exclusion::Draining),
        _ => None,
    }
}

fn finite(x: f64) -> f64 {
    if x.is_finite() { x.max(0.0) } else { 0.0 }
}

/// The predicted TTFT of a node and its factors, for a request of `pipeline` (if any).
pub fn score(n: &NodeView, w: &Weights, pipeline: Option<&str>) -> Factors {
    let pipeline_busy = pipeline
        .and_then(|p| n.pipelines.get(p))
        .map_or(0.0, |avail| 1.0 - finite(*avail).min(1.0));
    let p50 = finite(n.ttft_p50_ms);
    let cap = f64::from(n.capacity.max(1));
    Factors {
        ttft_p50_ms: p50,
        queue_wait_ms: finite(w.queue_factor) * f64::from(n.queue_depth) * p50 / cap,
        health_penalty_ms: match n.health {
            Health::Degraded => w.degraded_ms,
            Health::Saturated => w.saturated_ms,
            _ => 0.0,
        },
        error_penalty_ms: finite(w.error_rate_ms) * finite(n.error_rate).min(1.0),
        load_penalty_ms: finite(w.load_ms) * (f64::from(n.in_flight) / cap).min(4.0),
        cost_penalty_ms: finite(w.cost_ms) * finite(n.cost_per_1k),
        pipeline_penalty_ms: finite(w.pipeline_busy_ms) * pipeline_busy,
    }
}

/// Ranks `nodes` for `q`: eligible nodes by score (then id), at most `q.k`, spanning two
/// regions when the eligible nodes do and `k ≥ 2` ([`diversify`]).
pub fn rank<'a>(nodes: impl IntoIterator<Item = &'a NodeView>, q: &Query, w: &Weights) -> Ranking {
    let mut out = Ranking::default();
    let mut scored = Vec::new();
    for n in nodes {
        match exclusion(n, q) {
            Some(why) => out.excluded.push((n.id.clone(), why)),
            None => {
                let factors = score(n, w, q.pipeline.as_deref());
                let s = Scored { node: n.id.clone(), score_ms: factors.total(), factors };
                scored.push((s, n.region.as_str()));
            }
        }
    }
    scored.sort_by(|(a, _), (b, _)| {
        a.score_ms.total_cmp(&b.score_ms).then_with(|| a.node.cmp(&b.node))
    });
    let regions: Vec<&str> = scored.iter().map(|(_, r)| *r).collect();
    if let Some((slot, from)) = diversify(&regions, q.k) {
        let moved = scored.remove(from);
        scored.insert(slot, moved);
    }
    scored.truncate(q.k);
    out.candidates = scored.into_iter().map(|(s, _)| s).collect();
    out.excluded.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Regional diversity of a top-`k` cut. `regions` are the eligible candidates' regions, best
/// first. When `k ≥ 2` and the best `k` all share the best node's region while some
/// candidate beyond them does not, returns `(k - 1, j)`: the candidate at `j` (the best node
/// of the second-best region) takes the last place of the cut, which stays in score order
/// since that node ranks below every other entry. `None` when the cut already spans two
/// regions, holds every candidate, or the candidates span one region.
pub fn diversify(regions: &[&str], k: usize) -> Option<(usize, usize)> {
    if k < 2 || regions.len() <= k {
        return None;
    }
    let first = regions[0];
    if regions[..k].iter().any(|r| *r != first) {
        return None;
    }
    let j = regions[k..].iter().position(|r| *r != first)? + k;
    Some((k - 1, j))
}

#[cfg(test)]
mod tests {
    use super::{Exclusion, Health, NodeView, Query, Ranking, Strategy as Preset, Weights, rank};
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn node(id: &str, region: &str, p50: f64, q: u32) -> NodeView {
        NodeView {
            id: id.into(),
            region: region.into(),
            health: Health::Ready,
            models: ["llm".to_owned()].into(),
            pipelines: BTreeMap::new(),
            queue_depth: q,
            in_flight: q,
            capacity: 4,
            ttft_p50_ms: p50,
            ttft_p99_ms: p50 * 2.0,
            error_rate: 0.0,
            cost_per_1k: 0.0,
        }
    }

    fn query(k: usize) -> Query {
        Query { model: "llm".into(), pipeline: None, allowed_regions: vec![], k }
    }

    #[test]
    fn queue_and_health_move_a_node_down() {
        let w = Weights::for_strategy(Preset::LatencyFirst);
        let mut slow_queue = node("a", "tor", 40.0, 8); // 40 + 8×40/4 = 120
        let fast = node("b", "tor", 60.0, 0);
        let r = rank(&[slow_queue.clone(), fast.clone()], &query(2), &w);
        assert_eq!(r.candidates[0].node, "b");
        assert_eq!(r.candidates[1].score_ms, 120.0);
        slow_queue.queue_depth = 0;
        slow_queue.health = Health::Degraded;
        let r = rank(&[slow_queue, fast], &query(2), &w);
        assert_eq!(r.candidates[0].node, "b", "40 ms + degraded penalty loses to 60 ms");
    }

    #[test]
    fn saturated_is_deprioritised_not_excluded_and_draining_is_excluded() {
        let w = Weights::for_strategy(Preset::LatencyFirst);
        let mut sat = node("a", "tor", 10.0, 0);
        sat.health = Health::Saturated;
        let mut drain = node("b", "tor", 10.0, 0);
        drain.health = Health::Draining;
        let r = rank(&[sat, drain], &query(3), &w);
        assert_eq!(r.candidates.len(), 1);
        assert_eq!(r.excluded, vec![("b".to_owned(), Exclusion::Draining)]);
    }

    #[test]
    fn cost_optimized_prefers_the_cheaper_of_two_similar_nodes() {
        let mut cheap = node("a", "mtl", 50.0, 0);
        cheap.cost_per_1k = 0.1;
        let mut dear = node("b", "tor", 45.0, 0);
        dear.cost_per_1k = 0.5;
        let lat = rank(
            &[cheap.clone(), dear.clone()],
            &query(1),
            &Weights::for_strategy(Preset::LatencyFirst),
        );
        let cost = rank(&[cheap, dear], &query(1), &Weights::for_strategy(Preset::CostOptimized));
        assert_eq!((lat.candidates[0].node.as_str(), cost.candidates[0].node.as_str()), ("b", "a"));
    }

    #[test]
    fn a_top_k_keeps_the_best_node_of_a_second_region() {
        let w = Weights::for_strategy(Preset::LatencyFirst);
        let fleet = [
            node("tor-1", "tor", 10.0, 0),
            node("tor-2", "tor", 20.0, 0),
            node("tor-3", "tor", 30.0, 0),
            node("mtl-1", "mtl", 50.0, 0),
            node("van-1", "van", 40.0, 0),
        ];
        let ids = |r: &Ranking| r.candidates.iter().map(|c| c.node.clone()).collect::<Vec<_>>();
        // The best three are all in Toronto: the third place goes to the best node elsewhere
        // (Vancouver's, at 40 ms, not Montreal's at 50), and the list stays in score order.
        assert_eq!(ids(&rank(&fleet, &query(3), &w)), ["tor-1", "tor-2", "van-1"]);
        assert_eq!(ids(&rank(&fleet, &query(2), &w)), ["tor-1", "van-1"]);
        // k = 1 has no room for a standby; a list holding every candidate needs no change.
        assert_eq!(ids(&rank(&fleet, &query(1), &w)), ["tor-1"]);
        assert_eq!(ids(&rank(&fleet, &query(9), &w)).len(), 5);
        // Residency: within Toronto alone there is no second region.
        let mut q = query(2);
        q.allowed_regions = vec!["tor".into()];
        assert_eq!(ids(&rank(&fleet, &q, &w)), ["tor-1", "tor-2"]);
        q.allowed_regions = vec!["tor".into(), "mtl".into()];
        assert_eq!(ids(&rank(&fleet, &q, &w)), ["tor-1", "mtl-1"]);
        // A cut that already spans two regions is left as scored.
        let mixed = [
            node("tor-1", "tor", 10.0, 0),
            node("mtl-1", "mtl", 15.0, 0),
            node("tor-2", "tor", 20.0, 0),
        ];
        assert_eq!(ids(&rank(&mixed, &query(2), &w)), ["tor-1", "mtl-1"]);
        assert_eq!(super::diversify(&["a", "a", "b"], 2), Some((1, 2)));
        assert_eq!(super::diversify(&["a", "b", "a"], 2), None);
        assert_eq!(super::diversify(&["a", "a", "a"], 2), None);
    }

    fn arb_node() -> impl Strategy<Value = NodeView> {
        (
            "[a-e][0-9]",
            prop_oneof![Just("van"), Just("tor"), Just("mtl")],
            proptest::collection::btree_set(
                prop_oneof![Just("llm".to_owned()), Just("stt".to_owned())],
                0..3,
            ),
            0u32..20,
            1u32..16,
            0.0f64..500.0,
            0.0f64..1.0,
            prop_oneof![
                Just(Health::Ready),
                Just(Health::Degraded),
                Just(Health::Saturated),
                Just(Health::Draining),
                Just(Health::Unhealthy)
            ],
        )
            .prop_map(|(id, region, models, q, cap, p50, err, health)| NodeView {
                id,
                region: region.into(),
                health,
                models,
                pipelines: BTreeMap::new(),
                queue_depth: q,
                in_flight: q,
                capacity: cap,
                ttft_p50_ms: p50,
                ttft_p99_ms: p50 * 3.0,
                error_rate: err,
                cost_per_1k: 0.0,
            })
    }

    /// Node ids are unique in a fleet.
    fn unique_ids(mut v: Vec<NodeView>) -> Vec<NodeView> {
        for (i, n) in v.iter_mut().enumerate() {
            n.id = format!("{}-{i:02}", n.id);
        }
        v
    }

    proptest! {
        #[test]
        fn invariants_hold(nodes in proptest::collection::vec(arb_node(), 0..12).prop_map(unique_ids), regions in proptest::collection::vec(prop_oneof![Just("van".to_owned()), Just("tor".to_owned())], 0..2), k in 0usize..6) {
            let q = Query { model: "llm".into(), pipeline: None, allowed_regions: regions.clone(), k };
            let w = Weights::for_strategy(Preset::LatencyFirst);
            let r = rank(&nodes, &q, &w);
            prop_assert!(r.candidates.len() <= k);
            for c in &r.candidates {
                let n = nodes.iter().find(|n| n.id == c.node).unwrap();
                prop_assert!(n.models.contains("llm"), "a node without the model was returned");
                prop_assert!(regions.is_empty() || regions.contains(&n.region), "residency violated");
                prop_assert!(!matches!(n.health, Health::Draining | Health::Unhealthy));
                prop_assert!(c.score_ms.is_finite() && c.score_ms >= 0.0);
            }
            prop_assert!(r.candidates.windows(2).all(|p| p[0].score_ms <= p[1].score_ms));
            // Two regions whenever the eligible nodes span two and k leaves room.
            let region = |id: &str| nodes.iter().find(|n| n.id == id).unwrap().region.clone();
            let eligible: BTreeSet<String> = nodes
                .iter()
                .filter(|n| n.models.contains("llm") && (regions.is_empty() || regions.contains(&n.region)))
                .filter(|n| !matches!(n.health, Health::Draining | Health::Unhealthy))
                .map(|n| n.region.clone())
                .collect();
            let listed: BTreeSet<String> = r.candidates.iter().map(|c| region(&c.node)).collect();
            if k >= 2 && eligible.len() >= 2 {
                prop_assert!(listed.len() >= 2, "one region listed of {:?}", eligible);
            }
            // Deterministic: the same snapshot, in any order, ranks the same.
            let mut reversed = nodes.clone();
            reversed.reverse();
            let again = rank(&reversed, &q, &w);
            let ids = |r: &Ranking| r.candidates.iter().map(|c| (c.node.clone(), c.score_ms.to_bits())).collect::<Vec<_>>();
            prop_assert_eq!(ids(&r), ids(&again));
        }
    }
}
