//! Dry runs for hot reload and `edgeroute policy check`: what a candidate policy would make
//! of the fleet and of sample requests, before it is applied.

use std::sync::Arc;

use crate::decide::Outcome;
use crate::fleet::Fleet;
use crate::policy::{Policy, TierRef};
use crate::types::{NodeFacts, Sample};

/// Something in a valid policy that is probably not what its author meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Warning {
    /// An earlier rule matches every request this rule could (same or no model list, no other
    /// condition): it never matches.
    Shadowed { rule: String, by: String },
    /// No node of the fleet serves any version of the rule's models.
    NoNodeServes { rule: String },
    /// No node of the fleet passes the rule's region, jurisdiction and hardware constraints
    /// (and the rule has no cloud tier).
    ConstraintsMatchNoNode { rule: String },
    /// A node reports a model that the registry does not know.
    UnknownModel { node: String, model: String },
    /// A node reports a version the registry does not know.
    UnknownVersion { node: String, model: String, version: String },
    /// A node holds a version where the registry's placement forbids it.
    PlacementViolated { node: String, model: String, version: String },
    /// A node's region maps to no jurisdiction and it reports none.
    NoJurisdiction { node: String },
}

/// What a decision amounts to, for comparing two policies.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub outcome: Outcome,
    pub rule: Option<Arc<str>>,
    pub model: Option<Arc<str>>,
    pub version: Option<Arc<str>>,
    pub tier: Option<Arc<str>>,
    pub cascade_step: u8,
    /// The first node (edge) chosen.
    pub node: Option<String>,
}

/// A sample the two policies decide differently.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    /// Index into the samples.
    pub sample: usize,
    pub live: Summary,
    pub candidate: Summary,
}

fn summarise(p: &Policy, fleet: &Fleet, s: &Sample) -> Summary {
    // A fresh state per sample: round robin must not make two equal policies differ.
    let mut state = p.new_state();
    let d = p.decide(&s.as_request(), fleet, &mut state, false);
    Summary {
        outcome: d.outcome,
        rule: d.rule,
        model: d.model,
        version: d.version,
        tier: d.tier,
        cascade_step: d.cascade_step,
        node: d.nodes.first().and_then(|p| fleet.node(p.node)).map(|n| n.id.clone()),
    }
}

/// Decides every sample under both policies against the same nodes and lists where they
/// differ (rule, model, version, tier, cascade step or first node). For shadow mode.
pub fn diff(
    live: &Policy,
    candidate: &Policy,
    samples: &[Sample],
    nodes: &[NodeFacts],
) -> Vec<Difference> {
    let lf = Fleet::new(live, nodes.to_vec());
    let cf = Fleet::new(candidate, nodes.to_vec());
    samples
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            let (a, b) = (summarise(live, &lf, s), summarise(candidate, &cf, s));
            // Rule ids of two documents are compared by text.
            (a != b).then_some(Difference { sample: i, live: a, candidate: b })
        })
        .collect()
}

impl Policy {
    /// Warnings about this policy against a fleet: rules that can never match or never find a
    /// node, and nodes that hold what the registry does not know or forbids.
    pub fn validate_against(&self, nodes: &[NodeFacts]) -> Vec<Warning> {
        let mut out = Vec::new();
        let reg = self.registry();
        for n in nodes {
            let j = n.jurisdiction.as_deref().or_else(|| self.jurisdiction_of(&n.region));
            if j.is_none() {
                out.push(Warning::NoJurisdiction { node: n.id.clone() });
            }
            for s in &n.models {
                let Some(m) = reg.model(&s.model) else {
                    out.push(Warning::UnknownModel { node: n.id.clone(), model: s.model.clone() });
                    continue;
                };
                if m.version_index(&s.version).is_none() {
                    out.push(Warning::UnknownVersion {
                        node: n.id.clone(),
                        model: s.model.clone(),
                        version: s.version.clone(),
                    });
                } else if self
                    .check_placement(&s.model, &s.version, &n.region, j, n.hardware)
                    .is_err()
                {
                    out.push(Warning::PlacementViolated {
                        node: n.id.clone(),
                        model: s.model.clone(),
                        version: s.version.clone(),
                    });
                }
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            if let Some(by) = self.rules[..i].iter().find(|e| {
                e.matches_everything()
                    && (e.models.is_empty()
                        || (!r.models.is_empty() && r.models.iter().all(|m| e.models.contains(m))))
            }) {
                out.push(Warning::Shadowed { rule: r.id.to_string(), by: by.id.to_string() });
                continue;
            }
            let models: Vec<&str> = if r.models.is_empty() {
                reg.models().iter().map(|m| &*m.name).collect()
            } else {
                r.models.iter().map(|&m| &*reg.models()[m as usize].name).collect()
            };
            let serving: Vec<&NodeFacts> = nodes
                .iter()
                .filter(|n| n.models.iter().any(|s| models.contains(&s.model.as_str())))
                .collect();
            let has_pool = r.tiers.iter().any(|t| matches!(t, TierRef::Pool(_)));
            if serving.is_empty() {
                if !has_pool {
                    out.push(Warning::NoNodeServes { rule: r.id.to_string() });
                }
                continue;
            }
            let fits = serving.iter().any(|n| {
                let j = n.jurisdiction.as_deref().or_else(|| self.jurisdiction_of(&n.region));
                (r.regions.is_empty() || r.regions.contains(&n.region))
                    && (r.jurisdictions.is_empty()
                        || j.is_some_and(|j| r.jurisdictions.iter().any(|x| x == j)))
                    && (r.hardware.is_empty() || r.hardware.contains(&n.hardware))
            });
            if !fits && !has_pool {
                out.push(Warning::ConstraintsMatchNoNode { rule: r.id.to_string() });
            }
        }
        out
    }
}
