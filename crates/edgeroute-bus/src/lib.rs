//! The topology bus: how the fleet learns which node runs which model, and which nodes are up.
//!
//! Nodes publish model loading/ready/failed/unloaded, drain and up/down events through a
//! [`Publisher`]; discovery replicas follow them with a [`Subscription`], a stream of
//! [`FleetUpdate`]s backed by a [`FleetView`]. Every node numbers its events (`epoch`, `seq`)
//! and the bus also stores each node's latest full [`NodeSnapshot`], so a subscriber that
//! misses messages or starts late resyncs from the snapshot instead of drifting.
//!
//! Two transports behind one [`Bus`] handle:
//! - embedded (default): in process, tokio broadcast plus a shared map;
//! - NATS: core subjects `<prefix>.<region>.<node_id>` for events, a JetStream KV bucket
//!   (key = node id) for snapshots. See [`nats`] for the layout.
//!
//! The routing policy travels on the same bus ([`policy`]): an admin puts a text once, every
//! discovery replica watches it (the current text first, then each new one) and acknowledges
//! what it did with it.
//!
//! Who may speak: on NATS each node connects as its own NKey user (`nkey_seed_file` or
//! `creds_file` in [`BusConfig`], TLS optional or required) whose server-side permissions
//! allow only its own subject and KV key ([`credentials`]; `deploy/nats/` ships the server
//! configuration). What the bus announces is held bounded by each subscriber's [`FleetView`]
//! ([`ViewLimits`]: node and model caps, an epoch cap from the wall clock, forgetting).
//!
//! What this crate deliberately does not do: it is never on the request path. A dead bus stops
//! routing refreshes only: [`Bus::connect`] succeeds with the server down, and
//! [`Publisher::publish`] never blocks. [`FleetView`] is pure (no I/O, `now` passed in).
//!
//! [`NodeSnapshot`]: edgeroute_proto::topology::NodeSnapshot

mod bus;
mod config;
pub mod credentials;
mod error;
mod inprocess;
pub mod nats;
pub mod policy;
mod publisher;
pub mod rollout;
mod subscription;
mod view;
pub mod wire;

pub use bus::{Bus, Transport};
pub use config::{BusConfig, BusKind, MAX_POLICY_LIMIT};
pub use error::BusError;
pub use inprocess::InProcessBus;
pub use nats::NatsBus;
pub use policy::{PolicyResult, PolicyStatus, PolicyStatuses, PolicyUpdate, PolicyWatch};
pub use publisher::{
    Clock, NodeIdentity, Publisher, PublisherOptions, PublisherStats, system_clock,
};
pub use subscription::{FleetUpdate, Subscription};
pub use view::{Applied, FleetCounters, FleetView, Refusal, SnapshotApplied, ViewLimits};
pub use wire::{MAX_MESSAGE_BYTES, Rejected};
