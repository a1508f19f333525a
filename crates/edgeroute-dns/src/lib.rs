//! The region layer's decisions (issue 17; the plan is `docs/geodns-plan.md`).
//!
//! DNS gets a client to the right region, and to the nearest healthy discovery replicas and
//! regional routers there; the SDK's probes still choose the node. This crate holds what an
//! authoritative GeoDNS server decides, with no sockets and no clock:
//!
//! - [`geo`]: where the client is — the EDNS Client Subnet (RFC 7871: truncated to /24 and
//!   /56, echoed with a scope) when the resolver sends one, else the resolver's address —
//!   mapped to a region by the config's CIDR tables (longest prefix wins), else the default.
//! - [`health`]: one target's health from its probes — withdrawn after `down_after` failed
//!   probes in a row, back only after `up_probes` good ones *and* `up_after_ms` of unbroken
//!   health (hysteresis); whether its state changed recently (answers then carry a short TTL).
//! - [`names`]: which question a name in the zone asks (`discovery.<zone>`, `api.<zone>`, a
//!   region's pinned names, their SRV names, the apex).
//! - [`decide`]: which targets an answer names — the nearest healthy ones, at most
//!   `answer_count`, with a standby in another region when one is healthy; a pinned region's
//!   only; everything when nothing is healthy (fail open) — and the answer's TTL.
//! - [`config`]: `dns.toml`, validated (every error names its key).
//! - [`wire`]: one query's bytes to its answer's bytes (hickory-proto's codec): the server
//!   short of its sockets.
//!
//! Invariants: a pinned name never answers another region's target (residency); a region with
//! no healthy target is never answered while another region has one; an answer is never empty
//! while the zone has a target of the kind asked.

pub mod config;
pub mod decide;
pub mod geo;
pub mod health;
pub mod names;
pub mod wire;

pub use config::{ConfigError, DnsConfig};
pub use decide::{Kind, Selection, TargetView, View, select};
pub use geo::{Cidr, Ecs, Located, Locator, Why};
pub use health::{Health, HealthRules};
pub use names::{Question, parse_name};
pub use wire::Answerer;
