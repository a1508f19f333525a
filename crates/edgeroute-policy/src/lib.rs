//! Routing policy for edgeroute: the model registry and the policy document, parsed and
//! validated into a [`Policy`], and the decision as a filter chain that records why.
//!
//! Architecture invariant: pure. No I/O, no clock reads, no randomness, no global state: a
//! decision is a function of the policy, the fleet snapshot ([`Fleet`]), the request and the
//! caller-owned [`RoutingState`]. Discovery calls [`Policy::decide`] per request; the node
//! calls [`Policy::check_placement`] before a load and [`residency_allows`] per request; hot
//! reload calls [`Policy::parse`], [`Policy::validate_against`] and [`diff`].
//!
//! The format is documented in `docs/policy.md`.

mod check;
mod decide;
mod doc;
pub mod expr;
mod fleet;
pub mod hash;
mod policy;
mod residency;
mod types;

pub use check::{Difference, Summary, Warning, diff};
pub use decide::{
    Attempt, CLOUD_FILTERS, Candidate, DEFAULT_K, Decision, Drop, EDGE_FILTERS, Explain, Figure,
    Filter, Outcome, Pick, Reason, RoutingState,
};
pub use fleet::Fleet;
pub use policy::{
    MAX_CASCADE, MAX_K, MAX_RULES, MAX_TIERS, MAX_VERSIONS, ModelDef, PlacementError, Policy,
    PolicyError, Pool, Registry, ScoreWeights, VersionDef,
};
pub use residency::residency_allows;
pub use types::{
    Claims, Class, Hardware, NodeFacts, Price, Request, Sample, Served, Sticky, StrategyKind,
    Tokens,
};
