//! Region-by-region model rollouts (issue 18, brief §3.8): a new version of a model goes out
//! one wave of regions at a time behind the routing policy's version weights and validation
//! gates, keeping at least two regions on the old version until the first wave has proven the
//! new one; a failed gate rolls the wave back without a failed request.
//!
//! - [`plan`]: `rollout.toml`, validated (every error names its key).
//! - [`gate`]: whether a step passes — correctness probes, the error rate against the old
//!   version's by a confidence bound, TTFT p99 within a ratio, a soak time.
//! - [`machine`]: the rollout as a state machine — inputs and `now_ms` in, actions out (load,
//!   weights, unload), its state plain data a driver keeps on the bus.
//!
//! Invariants (property-tested in `tests/props.rs`): before the first wave has passed every
//! step, no region outside it is given any share of the new version; a failure ends with the
//! failing wave's regions at 0 % and the new version unloaded there; a region's share only
//! grows through the plan's steps, never past them; the old version is unloaded only after
//! every wave has passed.
//!
//! - [`driver`]: performs the machine's actions on a [`driver::Fleet`], judges each step on
//!   the nodes' counters and the plan's correctness probes, keeps its state in a
//!   [`driver::StateStore`] after every change (resumable).
//! - [`http`]: the real fleet (discovery's topology, the nodes' admin API and metrics, the
//!   policy on the bus) and the state on the bus (JetStream KV, compare-and-set).
//!
//! The plan, gates and machine do no I/O; the driver's I/O is behind the two traits.

pub mod driver;
pub mod gate;
pub mod http;
pub mod machine;
pub mod plan;

pub use gate::{Verdict, VersionStats, judge};
pub use machine::{Action, Event, Input, Phase, Rollout};
pub use plan::{Gates, Plan, PlanError, Probe};
