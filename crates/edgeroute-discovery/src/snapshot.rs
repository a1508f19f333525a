//! The immutable snapshot `/v1/discover` reads: every node's view plus ranked lists prepared
//! for every model, pipeline, strategy and region, so answering is a lookup and a merge of at
//! most `k` entries per allowed region, whatever the fleet's size.
//!
//! The lists are exactly what [`edgeroute_core::score::rank`] would return for the same
//! snapshot and query (a property test pins it), regional diversity included: `k ≥ 2`
//! candidates span two regions whenever the eligible nodes do. `explain=true` runs `rank`
//! itself, because it must say why every other node was left out, and that costs a pass over
//! the fleet.
//!
//! Building is the cost of every change, so it avoids per-node allocation: model, pipeline and
//! region names are interned to small integers once, lists are vectors indexed by them, and
//! node entries are shared (`Arc`) with the registry, which rebuilds only the nodes that
//! changed.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use edgeroute_core::score::{self, Health, Query, Ranking, Strategy, Weights};

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

/// A sort key equal in order to [`order`]: scores are finite and ≥ 0 (`score` clamps every
/// factor), and for such floats the IEEE bit pattern orders as an unsigned integer.
fn key(c: &Cand) -> (u64, u32) {
    debug_assert!(c.score_ms >= 0.0 && c.score_ms.is_finite());
    // `+ 0.0` turns a -0.0 into +0.0, whose bits sort first.
    ((c.score_ms + 0.0).to_bits(), c.idx)
}

/// One key's candidates, best first, overall and per region (indexed by region id).
#[derive(Debug, Clone, Default)]
struct Ranked {
    all: Vec<Cand>,
    by_region: Vec<Vec<Cand>>,
}

/// One strategy's lists, indexed by model id and pipeline id.
#[derive(Debug, Clone, Default)]
struct Lists {
    by_model: Vec<Ranked>,
    by_pipeline: Vec<Ranked>,
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
    /// Nodes unloading the model (draining what is in flight, or unloading it): not listed.
    pub unloading: u32,
    /// Nodes with the model ready but ejected for it by correctness probes (wrong answers).
    #[serde(skip_serializing_if = "is_zero")]
    pub ejected: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Names interned to dense ids.
#[derive(Debug, Clone, Default)]
struct Names {
    ids: FxHashMap<String, u32>,
    names: Vec<String>,
}

impl Names {
    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.ids.insert(name.to_owned(), id);
        self.names.push(name.to_owned());
        id
    }

    fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    fn len(&self) -> usize {
        self.names.len()
    }
}

/// The fleet at one instant, ranked.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub generation: u64,
    pub built_at_unix_ms: u64,
    nodes: Vec<Arc<NodeEntry>>,
    lists: Vec<Lists>,
    models: Names,
    pipelines: Names,
    regions: Names,
    /// Each node's region id, indexed like `nodes`.
    node_regions: Vec<u32>,
    /// Indexed by model id.
    model_stats: Vec<ModelStats>,
    weights: Vec<Weights>,
}

fn eligible(h: Health) -> bool {
    !matches!(h, Health::Unhealthy | Health::Draining)
}

/// What the ranking needs of one node, compact: the build touches each node's entry once.
struct Facts {
    region: u32,
    /// Range into the flat model list.
    models: std::ops::Range<usize>,
    /// Range into the flat pipeline list.
    pipelines: std::ops::Range<usize>,
    eligible: bool,
    /// Score per strategy.
    scores: [f64; 3],
}

impl Snapshot {
    /// Ranks `nodes` (sorted by id) under each strategy's `weights` ([`Strategy::ALL`] order).
    ///
    /// A node's ready models are the `Ready` entries of `info.detail.model_states` (which
    /// `view.models` mirrors, less those the node is ejected for by correctness probes).
    pub fn build(
        nodes: Vec<Arc<NodeEntry>>,
        weights: [Weights; 3],
        generation: u64,
        built_at_unix_ms: u64,
    ) -> Snapshot {
        use edgeroute_proto::models::ModelState;
        debug_assert!(nodes.windows(2).all(|w| w[0].view.id < w[1].view.id), "sorted by id");
        let mut models = Names::default();
        let mut pipelines = Names::default();
        let mut regions = Names::default();
        let mut model_stats: Vec<ModelStats> = Vec::new();
        let mut facts = Vec::with_capacity(nodes.len());
        let mut flat_models: Vec<u32> = Vec::with_capacity(nodes.len() * 3);
        // (pipeline id, score per strategy)
        let mut flat_pipelines: Vec<(u32, [f64; 3])> = Vec::new();
        for n in &nodes {
            let v = &n.view;
            let ok = eligible(v.health);
            let m0 = flat_models.len();
            for (m, state) in &n.info.detail.model_states {
                let id = models.intern(m);
                if model_stats.len() <= id as usize {
                    model_stats.resize(id as usize + 1, ModelStats::default());
                }
                let s = &mut model_stats[id as usize];
                match state {
                    // Ejected by correctness probes (wrong answers): held, no candidate.
                    ModelState::Ready if n.info.wrong_answers(m).is_some() => {
                        s.ready += 1;
                        s.ejected += 1;
                    }
                    ModelState::Ready => {
                        s.ready += 1;
                        s.eligible += u32::from(ok);
                        flat_models.push(id);
                    }
                    ModelState::Loading => s.loading += 1,
                    ModelState::Failed => s.failed += 1,
                    ModelState::Draining | ModelState::Unloading => s.unloading += 1,
                }
            }
            debug_assert_eq!(flat_models.len() - m0, v.models.len(), "view.models mirrors states");
            let p0 = flat_pipelines.len();
            let mut scores = [0.0; 3];
            if ok {
                for (s, w) in scores.iter_mut().zip(&weights) {
                    *s = score::score(v, w, None).total();
                }
                for p in v.pipelines.keys() {
                    let mut ps = [0.0; 3];
                    for (s, w) in ps.iter_mut().zip(&weights) {
                        *s = score::score(v, w, Some(p)).total();
                    }
                    flat_pipelines.push((pipelines.intern(p), ps));
                }
            } else {
                for p in v.pipelines.keys() {
                    pipelines.intern(p);
                }
            }
            facts.push(Facts {
                region: regions.intern(&v.region),
                models: m0..flat_models.len(),
                pipelines: p0..flat_pipelines.len(),
                eligible: ok,
                scores,
            });
        }
        model_stats.resize(models.len(), ModelStats::default());
        let node_regions: Vec<u32> = facts.iter().map(|f| f.region).collect();
        let n_regions = regions.len();
        let lists = (0..weights.len())
            .map(|s| {
                // One sort per strategy: a node scores the same for every model it holds, so
                // walking nodes best-first fills every model's list already in order.
                let mut order: Vec<Cand> = facts
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.eligible)
                    .map(|(i, f)| Cand { idx: i as u32, score_ms: f.scores[s] })
                    .collect();
                order.sort_unstable_by_key(key);
                let mut by_model = vec![Ranked::default(); models.len()];
                for r in &mut by_model {
                    r.by_region = vec![Vec::new(); n_regions];
                }
                for c in &order {
                    let f = &facts[c.idx as usize];
                    for &m in &flat_models[f.models.clone()] {
                        let r = &mut by_model[m as usize];
                        r.all.push(*c);
                        r.by_region[f.region as usize].push(*c);
                    }
                }
                // Pipeline scores differ per pipeline (its bottleneck's load): sorted apiece.
                let mut by_pipeline = vec![Ranked::default(); pipelines.len()];
                for (i, f) in facts.iter().enumerate() {
                    for (p, ps) in &flat_pipelines[f.pipelines.clone()] {
                        by_pipeline[*p as usize].all.push(Cand { idx: i as u32, score_ms: ps[s] });
                    }
                }
                for r in &mut by_pipeline {
                    r.all.sort_unstable_by_key(key);
                    r.by_region = vec![Vec::new(); n_regions];
                    for c in &r.all {
                        r.by_region[facts[c.idx as usize].region as usize].push(*c);
                    }
                }
                Lists { by_model, by_pipeline }
            })
            .collect();
        Snapshot {
            generation,
            built_at_unix_ms,
            nodes,
            lists,
            models,
            pipelines,
            regions,
            node_regions,
            model_stats,
            weights: weights.to_vec(),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn nodes(&self) -> &[Arc<NodeEntry>] {
        &self.nodes
    }

    pub fn infos(&self) -> impl ExactSizeIterator<Item = &NodeInfo> {
        self.nodes.iter().map(|n| &n.info)
    }

    pub fn info(&self, c: Cand) -> &NodeInfo {
        &self.nodes[c.idx as usize].info
    }

    pub fn model_stats(&self, model: &str) -> Option<ModelStats> {
        self.models.get(model).map(|id| self.model_stats[id as usize])
    }

    /// Models known anywhere in the fleet, in any state, sorted.
    pub fn models(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.models.names.iter().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn knows_pipeline(&self, p: &str) -> bool {
        self.pipelines.get(p).is_some()
    }

    pub fn weights(&self, s: Strategy) -> Weights {
        self.weights.get(s.index()).copied().unwrap_or_else(|| Weights::for_strategy(s))
    }

    /// The best `q.k` candidates, best first, spanning two regions when the eligible nodes do
    /// and `k ≥ 2` (the last place goes to the best node outside the first one's region, as
    /// [`score::diversify`] decides for `rank`). Cost: O(k × allowed regions), plus, when both
    /// a pipeline and a model are given, the pipeline's nodes skipped for lacking the model.
    pub fn top_k(&self, q: &Query, s: Strategy) -> Vec<Cand> {
        self.top_k_where(q, s, |_| true)
    }

    /// [`Snapshot::top_k`] among the nodes `allow` accepts (the caller's residency): a node it
    /// refuses is skipped as if absent, so the answer is still the best `k` of what remains,
    /// diversity included. `allow` runs on the nodes the merge walks past, not on the fleet.
    pub fn top_k_where(
        &self,
        q: &Query,
        s: Strategy,
        allow: impl Fn(&NodeEntry) -> bool,
    ) -> Vec<Cand> {
        let Some(lists) = self.lists.get(s.index()) else { return vec![] };
        let (ranked, need_model) = match &q.pipeline {
            Some(p) => (self.pipelines.get(p).map(|id| &lists.by_pipeline[id as usize]), true),
            None => (self.models.get(&q.model).map(|id| &lists.by_model[id as usize]), false),
        };
        let Some(ranked) = ranked else { return vec![] };
        let keep = |c: &Cand| {
            let n = &self.nodes[c.idx as usize];
            (!need_model || n.view.models.contains(&q.model)) && allow(n)
        };
        // Region ids the query allows, each once (all when unconstrained).
        let allowed: Vec<u32> = if q.allowed_regions.is_empty() {
            (0..self.regions.len() as u32).collect()
        } else {
            let mut ids: Vec<u32> =
                q.allowed_regions.iter().filter_map(|r| self.regions.get(r)).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let mut out = if q.allowed_regions.is_empty() {
            ranked.all.iter().filter(|c| keep(c)).take(q.k).copied().collect()
        } else {
            let mut heads: Vec<std::iter::Peekable<_>> = allowed
                .iter()
                .filter_map(|&id| ranked.by_region.get(id as usize))
                .map(|list| list.iter().filter(|c| keep(c)).peekable())
                .collect();
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
        };
        // Regional diversity: a full cut from one region gives its last place to the best
        // node of the allowed regions outside it, if there is one.
        if q.k >= 2 && out.len() == q.k {
            let region = |c: &Cand| self.node_regions[c.idx as usize];
            let first = region(&out[0]);
            if out.iter().all(|c| region(c) == first) {
                let other = allowed
                    .iter()
                    .filter(|&&r| r != first)
                    .filter_map(|&r| ranked.by_region.get(r as usize)?.iter().find(|c| keep(c)))
                    .min_by(|a, b| order(a, b));
                if let Some(c) = other {
                    out[q.k - 1] = *c;
                }
            }
        }
        out
    }

    /// The full ranking with every factor and every exclusion: a pass over the fleet.
    pub fn explain(&self, q: &Query, s: Strategy) -> Ranking {
        score::rank(self.nodes.iter().map(|n| &n.view), q, &self.weights(s))
    }

    /// Index of a node by id.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.binary_search_by(|n| n.view.id.as_str().cmp(id)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{NodeDetail, Source};
    use edgeroute_core::score::NodeView;
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
                model_versions: Default::default(),
                hardware: None,
                gpu_util: 0.0,
                phi: 0.0,
                last_probe_age_ms: None,
                probes: Default::default(),
                bus_liveness: None,
            },
        };
        NodeEntry { view: v, info }
    }

    fn arc(v: NodeView) -> Arc<NodeEntry> {
        Arc::new(entry(v))
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
        Snapshot::build(views.iter().cloned().map(arc).collect(), weights, 1, 0)
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

    /// A ready node serving `llm` with first tokens of `p50` ms.
    fn ready_llm_node(id: &str, region: &str, p50: f64) -> NodeView {
        NodeView {
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
        }
    }

    #[test]
    fn a_full_cut_from_one_region_keeps_the_best_node_of_another() {
        let mk = ready_llm_node;
        let mut down = mk("e", "van", 1.0);
        down.health = Health::Unhealthy;
        let views = vec![
            mk("a", "tor", 10.0),
            mk("b", "tor", 20.0),
            mk("c", "tor", 30.0),
            mk("d", "mtl", 50.0),
            down,
            mk("f", "van", 40.0),
        ];
        let snap = snapshot(&views);
        let ids = |regions: &[&str], k: usize| -> Vec<String> {
            let q = Query {
                model: "llm".into(),
                pipeline: None,
                allowed_regions: regions.iter().map(|r| (*r).to_owned()).collect(),
                k,
            };
            let fast: Vec<String> = snap
                .top_k(&q, Strategy::LatencyFirst)
                .iter()
                .map(|c| snap.info(*c).id.clone())
                .collect();
            let full: Vec<String> = snap
                .explain(&q, Strategy::LatencyFirst)
                .candidates
                .iter()
                .map(|c| c.node.clone())
                .collect();
            assert_eq!(fast, full, "top_k and rank disagree for {regions:?}, k={k}");
            fast
        };
        // The best eligible node outside Toronto is Vancouver's f (e is unhealthy).
        assert_eq!(ids(&[], 3), ["a", "b", "f"]);
        assert_eq!(ids(&[], 2), ["a", "f"]);
        assert_eq!(ids(&[], 1), ["a"]);
        assert_eq!(ids(&[], 9), ["a", "b", "c", "f", "d"]);
        // Residency is respected: the second region comes from the allowed ones only.
        assert_eq!(ids(&["tor", "mtl"], 2), ["a", "d"]);
        assert_eq!(ids(&["tor"], 2), ["a", "b"]);
        assert_eq!(ids(&["mtl", "van", "mtl"], 2), ["f", "d"]);
    }

    #[test]
    fn regions_merge_in_score_order() {
        let mk = ready_llm_node;
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
