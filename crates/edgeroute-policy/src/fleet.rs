//! The fleet as a decision reads it: discovery's snapshot of nodes, compiled once against a
//! policy (model versions interned, jurisdictions resolved, nodes ordered by id).

use crate::policy::Policy;
use crate::types::NodeFacts;

#[derive(Debug, Clone)]
pub(crate) struct CompiledNode {
    pub jurisdiction: Option<Box<str>>,
    /// Flat version indices (`Registry::vid`) of the registered versions ready on the node.
    pub served: Box<[u32]>,
}

/// A fleet snapshot compiled for one policy. Build it when the snapshot or the policy changes
/// (a decision against a fleet built for another policy answers `Outcome::StaleFleet`).
#[derive(Debug, Clone)]
pub struct Fleet {
    pub(crate) fingerprint: u64,
    nodes: Vec<NodeFacts>,
    pub(crate) compiled: Vec<CompiledNode>,
}

impl Fleet {
    pub fn new(policy: &Policy, mut nodes: Vec<NodeFacts>) -> Fleet {
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let reg = policy.registry();
        let compiled = nodes
            .iter()
            .map(|n| {
                let jurisdiction = n
                    .jurisdiction
                    .as_deref()
                    .or_else(|| policy.jurisdiction_of(&n.region))
                    .map(Into::into);
                let mut served: Vec<u32> = n
                    .models
                    .iter()
                    .filter_map(|s| {
                        let m = reg.index(&s.model)?;
                        let v = reg.models()[m as usize].version_index(&s.version)?;
                        Some(reg.vid(m, v))
                    })
                    .collect();
                served.sort_unstable();
                served.dedup();
                CompiledNode { jurisdiction, served: served.into() }
            })
            .collect();
        Fleet { fingerprint: policy.fingerprint, nodes, compiled }
    }

    /// The nodes, ordered by id: a [`crate::Pick`]'s `node` indexes this.
    pub fn nodes(&self) -> &[NodeFacts] {
        &self.nodes
    }

    pub fn node(&self, index: u32) -> Option<&NodeFacts> {
        self.nodes.get(index as usize)
    }

    /// The jurisdiction a decision holds the node to (its own, or its region's).
    pub fn jurisdiction(&self, index: u32) -> Option<&str> {
        self.compiled.get(index as usize)?.jurisdiction.as_deref()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
