//! The immutable snapshot `/v1/discover` reads: every node's view plus ranked lists prepared
//! for every model, pipeline, strategy and region, so answering is a lookup and a merge of at
//! most `k` entries per allowed region, whatever the fleet's size.
//!
//! The lists are exactly what [`edgeroute_core::score::rank`] would return for the same
//! snapshot and query (a property test pins it); `explain=true` runs `rank` itself, because it
//! must say why every other node was left out, and that costs a pass over the fleet.

use std::collections::HashMap;

use edgeroute_core::score::{self, Health, NodeView, Query, Ranking, Strategy, Weights};

use crate::fleet::{NodeEntry, NodeInfo};

/// One ranked entry: an index into the snapshot's nodes and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cand {
    pub idx: u32,
    pub score_ms: f64,
}

fn order(a: &Cand, b: &Cand) -> std::cmp::Ordering {
    // Nodes are sorted by id, so index order is id order: ties break as `rank` does.
    a.score_ms.total_cmp(&b.score_ms).then(a.idx.cmp(&b.idx))
}

#[derive(Debug, Clone, Default)]
struct Ranked {
    all: Vec<Cand>,
    by_region: HashMap<String, Vec<Cand>>,
}

#[derive(Debug, Clone, Default)]
struct Lists {
    by_model: HashMap<String, Ranked>,
    by_pipeline: HashMap<String, Ranked>,
}

/// How many nodes hold a model, by state; the reason given when no candidate is left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ModelStats {
    /// Nodes with the model ready and the node eligible (not draining, not unhealthy).
    pub eligible: u32,
    /// Nodes with the model ready.
    pub ready: u32,
    pub loading: u32,
    pub failed: u32,
}

/// The fleet at one instant, ranked.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub built_at_unix_ms: u64,
    views: Vec<NodeView>,
    infos: Vec<NodeInfo>,
    lists: Vec<Lists>,
    models: HashMap<String, ModelStats>,
    pipelines: HashMap<String, u32>,
    weights: Vec<Weights>,
}

fn eligible(h: Health) -> bool {
    !matches!(h, Health::Unhealthy | Health::Draining)
}

impl Snapshot {
    /// Ranks `entries` (sorted by id) under each strategy's `weights` ([`Strategy::ALL`] order).
    pub fn build(
        entries: Vec<NodeEntry>,
        weights: [Weights; 3],
        generation: u64,
        built_at_unix_ms: u64,
    ) -> Snapshot {
        let (views, infos): (Vec<NodeView>, Vec<NodeInfo>) =
            entries.into_iter().map(|e| (e.view, e.info)).unzip();
        debug_assert!(views.windows(2).all(|w| w[0].id < w[1].id), "entries sorted by id");
        let mut models: HashMap<String, ModelStats> = HashMap::new();
        let mut pipelines: HashMap<String, u32> = HashMap::new();
        for (v, info) in views.iter().zip(&infos) {
            for (m, state) in &info.detail.model_states {
                let s = models.entry(m.clone()).or_default();
                match state {
                    edgeroute_proto::models::ModelState::Ready => {
                        s.ready += 1;
                        s.eligible += u32::from(eligible(v.health));
                    }
                    edgeroute_proto::models::ModelState::Loading => s.loading += 1,
                    edgeroute_proto::models::ModelState::Failed => s.failed += 1,
                    _ => {}
                }
            }
            // Models the bus or probe lists only as ready (no state map) still count.
            for m in &v.models {
                models.entry(m.clone()).or_default();
            }
            for p in v.pipelines.keys() {
                *pipelines.entry(p.clone()).or_default() += 1;
            }
        }
        let lists = weights.iter().map(|w| build_lists(&views, w)).collect();
        Snapshot {
            generation,
            built_at_unix_ms,
            views,
            infos,
            lists,
            models,
            pipelines,
            weights: weights.to_vec(),
        }
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    pub fn views(&self) -> &[NodeView] {
        &self.views
    }

    pub fn infos(&self) -> &[NodeInfo] {
        &self.infos
    }

    pub fn info(&self, c: Cand) -> &NodeInfo {
        &self.infos[c.idx as usize]
    }

    pub fn model_stats(&self, model: &str) -> Option<ModelStats> {
        self.models.get(model).copied()
    }

    /// Models known anywhere in the fleet, in any state, sorted.
    pub fn models(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.models.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn knows_pipeline(&self, p: &str) -> bool {
        self.pipelines.contains_key(p)
    }

    pub fn weights(&self, s: Strategy) -> Weights {
        self.weights.get(s.index()).copied().unwrap_or_else(|| Weights::for_strategy(s))
    }

    /// The best `q.k` candidates, best first. Cost: O(k × allowed regions), plus, when both a
    /// pipeline and a model are given, the pipeline's nodes skipped for lacking the model.
    pub fn top_k(&self, q: &Query, s: Strategy) -> Vec<Cand> {
        let Some(lists) = self.lists.get(s.index()) else { return vec![] };
        let (ranked, need_model) = match &q.pipeline {
            Some(p) => (lists.by_pipeline.get(p), true),
            None => (lists.by_model.get(&q.model), false),
        };
        let Some(ranked) = ranked else { return vec![] };
        let keep = |c: &Cand| !need_model || self.views[c.idx as usize].models.contains(&q.model);
        if q.allowed_regions.is_empty() {
            return ranked.all.iter().filter(|c| keep(c)).take(q.k).copied().collect();
        }
        let mut heads: Vec<std::iter::Peekable<_>> = Vec::with_capacity(q.allowed_regions.len());
        for (i, r) in q.allowed_regions.iter().enumerate() {
            if q.allowed_regions[..i].contains(r) {
                continue;
            }
            if let Some(list) = ranked.by_region.get(r) {
                heads.push(list.iter().filter(|c| keep(c)).peekable());
            }
        }
        let mut out = Vec::with_capacity(q.k.min(64));
        while out.len() < q.k {
            let mut best: Option<(usize, Cand)> = None;
            for (i, h) in heads.iter_mut().enumerate() {
                if let Some(c) = h.peek()
                    && best.is_none_or(|(_, b)| order(c, &b).is_lt())
                {
                    best = Some((i, **c));
                }
            }
            let Some((i, c)) = best else { break };
            heads[i].next();
            out.push(c);
        }
        out
    }

    /// The full ranking with every factor and every exclusion: a pass over the fleet.
    pub fn explain(&self, q: &Query, s: Strategy) -> Ranking {
        score::rank(&self.views, q, &self.weights(s))
    }

    /// Index of a node by id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.views.binary_search_by(|v| v.id.as_str().cmp(id)).ok()
    }
}

fn push(ranked: &mut HashMap<String, Ranked>, key: &str, c: Cand) {
    match ranked.get_mut(key) {
        Some(r) => r.all.push(c),
        None => {
            ranked.insert(key.to_owned(), Ranked { all: vec![c], by_region: HashMap::new() });
        }
    }
}

fn build_lists(views: &[NodeView], w: &Weights) -> Lists {
    let mut lists = Lists::default();
    for (i, v) in views.iter().enumerate() {
        if !eligible(v.health) {
            continue;
        }
        let idx = i as u32;
        if !v.models.is_empty() {
            let score_ms = score::score(v, w, None).total();
            for m in &v.models {
                push(&mut lists.by_model, m, Cand { idx, score_ms });
            }
        }
        for p in v.pipelines.keys() {
            let score_ms = score::score(v, w, Some(p)).total();
            push(&mut lists.by_pipeline, p, Cand { idx, score_ms });
        }
    }
    for r in lists.by_model.values_mut().chain(lists.by_pipeline.values_mut()) {
        r.all.sort_unstable_by(order);
        for c in &r.all {
            let region = &views[c.idx as usize].region;
            match r.by_region.get_mut(region) {
                Some(list) => list.push(*c),
                None => {
                    r.by_region.insert(region.clone(), vec![*c]);
                }
            }
        }
    }
    lists
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{NodeDetail, Source};
    use proptest::prelude::{Just, any, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as Gen;
    use std::collections::{BTreeMap, BTreeSet};

    fn entry(v: NodeView) -> NodeEntry {
        let info = NodeInfo {
            id: v.id.clone(),
            region: v.region.clone(),
            url: format!("http://{}", v.id),
            health: crate::fleet::health_name(v.health),
            health_reason: None,
            models: v.models.iter().cloned().collect(),
            queue_depth: v.queue_depth,
            in_flight: v.in_flight,
            capacity: v.capacity,
            ttft_p50_ms: v.ttft_p50_ms,
            ttft_p99_ms: v.ttft_p99_ms,
            ttft_estimated: false,
            error_rate: v.error_rate,
            cost_per_1k: v.cost_per_1k,
            pipelines: v.pipelines.clone(),
            detail: NodeDetail {
                placement_source: Source::Probe,
                configured: true,
                model_states: v
                    .models
                    .iter()
                    .map(|m| (m.clone(), edgeroute_proto::models::ModelState::Ready))
                    .collect(),
                phi: 0.0,
                last_probe_age_ms: None,
                probes: Default::default(),
                bus_liveness: None,
            },
        };
        NodeEntry { view: v, info }
    }

    fn arb_view() -> impl Gen<Value = NodeView> {
        (
            prop_oneof![Just("van"), Just("tor"), Just("mtl")],
            proptest::collection::btree_set(
                prop_oneof![Just("llm".to_owned()), Just("stt".to_owned()), Just("tts".to_owned())],
                0..3,
            ),
            proptest::collection::btree_map(
                prop_oneof![Just("voice".to_owned()), Just("chat".to_owned())],
                0.0f64..=1.0,
                0..2,
            ),
            (0u32..20, 1u32..16, 0.0f64..300.0, 0.0f64..0.5, 0.0f64..2.0),
            prop_oneof![
                Just(Health::Ready),
                Just(Health::Degraded),
                Just(Health::Saturated),
                Just(Health::Draining),
                Just(Health::Unhealthy)
            ],
        )
            .prop_map(|(region, models, pipelines, (q, cap, p50, err, cost), health)| {
                NodeView {
                    id: String::new(),
                    region: region.into(),
                    health,
                    models,
                    pipelines,
                    queue_depth: q,
                    in_flight: q,
                    capacity: cap,
                    // Coarse values make exact ties (broken by id) common.
                    ttft_p50_ms: (p50 / 20.0).round() * 20.0,
                    ttft_p99_ms: p50 * 2.0,
                    error_rate: err,
                    cost_per_1k: cost,
                }
            })
    }

    fn fleet() -> impl Gen<Value = Vec<NodeView>> {
        proptest::collection::vec(arb_view(), 0..40).prop_map(|mut v| {
            for (i, n) in v.iter_mut().enumerate() {
                n.id = format!("n{i:03}");
            }
            v
        })
    }

    fn query() -> impl Gen<Value = (Query, Strategy)> {
        (
            prop_oneof![Just("llm"), Just("stt"), Just("tts"), Just("nope")],
            proptest::option::of(prop_oneof![Just("voice"), Just("chat")]),
            proptest::collection::vec(
                prop_oneof![Just("van"), Just("tor"), Just("mtl"), Just("zz")],
                0..3,
            ),
            0usize..8,
            prop_oneof![
                Just(Strategy::LatencyFirst),
                Just(Strategy::AvailabilityFirst),
                Just(Strategy::CostOptimized)
            ],
        )
            .prop_map(|(m, p, regions, k, s)| {
                let q = Query {
                    model: m.into(),
                    pipeline: p.map(str::to_owned),
                    allowed_regions: regions.into_iter().map(str::to_owned).collect(),
                    k,
                };
                (q, s)
            })
    }

    fn snapshot(views: &[NodeView]) -> Snapshot {
        let weights = Strategy::ALL.map(Weights::for_strategy);
        Snapshot::build(views.iter().cloned().map(entry).collect(), weights, 1, 0)
    }

    proptest! {
        /// The prepared lists answer exactly as ranking the snapshot from scratch would, so the
        /// invariants `rank` guarantees (model present, residency, health, determinism) carry
        /// over to what `/v1/discover` serves.
        #[test]
        fn prepared_lists_equal_a_full_ranking(views in fleet(), (q, s) in query()) {
            let snap = snapshot(&views);
            let fast: Vec<(String, u64)> = snap
                .top_k(&q, s)
                .iter()
                .map(|c| (snap.info(*c).id.clone(), c.score_ms.to_bits()))
                .collect();
            let full: Vec<(String, u64)> = snap
                .explain(&q, s)
                .candidates
                .iter()
                .map(|c| (c.node.clone(), c.score_ms.to_bits()))
                .collect();
            prop_assert_eq!(&fast, &full);
            for (id, _) in &fast {
                let v = views.iter().find(|v| &v.id == id).unwrap();
                prop_assert!(v.models.contains(&q.model), "a node without the model");
                prop_assert!(q.allowed_regions.is_empty() || q.allowed_regions.contains(&v.region), "residency");
                prop_assert!(eligible(v.health));
                if let Some(p) = &q.pipeline { prop_assert!(v.pipelines.contains_key(p)); }
            }
        }

        /// The same fleet, presented in any order, gives the same answer.
        #[test]
        fn deterministic_for_a_snapshot(views in fleet(), (q, s) in query(), seed in any::<u64>()) {
            let mut shuffled = views.clone();
            let n = shuffled.len();
            if n > 1 {
                for i in 0..n {
                    let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % n as u64) as usize;
                    shuffled.swap(i, j);
                }
            }
            shuffled.sort_by(|a, b| a.id.cmp(&b.id));
            let a = snapshot(&views);
            let b = snapshot(&shuffled);
            prop_assert_eq!(a.top_k(&q, s), b.top_k(&q, s));
        }
    }

    #[test]
    fn regions_merge_in_score_order() {
        let mk = |id: &str, region: &str, p50: f64| NodeView {
            id: id.into(),
            region: region.into(),
            health: Health::Ready,
            models: BTreeSet::from(["llm".to_owned()]),
            pipelines: BTreeMap::new(),
            queue_depth: 0,
            in_flight: 0,
            capacity: 4,
            ttft_p50_ms: p50,
            ttft_p99_ms: p50,
            error_rate: 0.0,
            cost_per_1k: 0.0,
        };
        let views = vec![
            mk("a", "tor", 30.0),
            mk("b", "mtl", 20.0),
            mk("c", "tor", 10.0),
            mk("d", "van", 5.0),
        ];
        let snap = snapshot(&views);
        let q = Query {
            model: "llm".into(),
            pipeline: None,
            allowed_regions: vec!["tor".into(), "mtl".into(), "tor".into()],
            k: 5,
        };
        let ids: Vec<&str> = snap
            .top_k(&q, Strategy::LatencyFirst)
            .iter()
            .map(|c| snap.info(*c).id.as_str())
            .collect();
        assert_eq!(ids, ["c", "b", "a"]);
        assert_eq!(snap.model_stats("llm").unwrap().eligible, 4);
        assert!(snap.model_stats("tts").is_none());
    }
}
