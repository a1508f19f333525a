//! The region layer's decisions (issue 17; the plan is `docs/geodns-plan.md`).
//!
//! DNS gets a client to the right region, and to the nearest healthy discovery replicas and
//! regional routers there; the SDK's probes still choose the node. This crate holds what an
//! authoritative GeoDNS server decides, with no sockets and no clock:
//!
//! - [`geo`]: where the client is — the EDNS Client Subnet (RFC 7871: truncated to /24 and
//!   /56, echoed with a scope) when the resolver sends one, else the resolver's address —
//!   mapped to a region by the config's CIDR tables (longest prefix wins), else a
//!   MaxMind-format database ([`mmdb`]: an `edgeroute_region` key or the country), else the
//!   default region.
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
//! - [`topology`]: the topology bus as an input — a region whose nodes it shows, none of
//!   them serving, ranks after the regions that serve (never withdrawn on the bus's word).
//! - [`serve`] and [`probe`]: the I/O edges — UDP and TCP listeners in front of `wire`, and
//!   the health probes (and bus follower) that keep the view current ([`start`] runs them).
//!
//! Invariants: a pinned name never answers another region's target (residency); a region with
//! no healthy target is never answered while another region has one; an answer is never empty
//! while the zone has a target of the kind asked.

pub mod config;
pub mod decide;
pub mod geo;
pub mod health;
pub mod mmdb;
pub mod names;
pub mod probe;
pub mod serve;
pub mod topology;
pub mod wire;

pub use config::{ConfigError, DnsConfig};
pub use decide::{Kind, Selection, TargetView, View, select};
pub use geo::{Cidr, Ecs, Located, Locator, Why};
pub use health::{Health, HealthRules};
pub use names::{Question, parse_name};
pub use wire::Answerer;

/// A running server: its address (UDP and TCP) and what it shares with its tasks.
#[derive(Debug)]
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub shared: std::sync::Arc<serve::Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds `addr` (UDP and TCP) and runs the listeners and the probes of `cfg` until the
/// returned [`Running`] is dropped. Every target counts as up until its probes say otherwise.
pub async fn start(cfg: DnsConfig, addr: std::net::SocketAddr) -> Result<Running, String> {
    let answerer = Answerer::new(&cfg).map_err(|e| e.to_string())?;
    let view = cfg.view(|_| (true, false));
    let shared = std::sync::Arc::new(serve::Shared {
        answerer,
        view: arc_swap::ArcSwap::from_pointee(view),
        counters: serve::Counters::default(),
    });
    let (udp, tcp) = serve::bind(addr).await.map_err(|e| format!("binding {addr}: {e}"))?;
    match serve::set_udp_recv_buffer(&udp, cfg.answers.udp_recv_buffer_bytes) {
        Ok(granted) => tracing::debug!(granted, "dns: UDP receive buffer"),
        Err(e) => tracing::warn!(error = %e, "dns: could not size the UDP receive buffer"),
    }
    let addr = udp.local_addr().map_err(|e| e.to_string())?;
    let cfg = std::sync::Arc::new(cfg);
    if let Some(ca) = &cfg.health.ca_file {
        std::fs::metadata(ca).map_err(|e| format!("health.ca_file {}: {e}", ca.display()))?;
    }
    let (s1, s2, s3) = (shared.clone(), shared.clone(), shared.clone());
    let tasks = vec![
        tokio::spawn(async move {
            if let Err(e) = serve::serve_udp(udp, s1).await {
                tracing::error!(error = %e, "dns: UDP listener stopped");
            }
        }),
        tokio::spawn(async move {
            if let Err(e) = serve::serve_tcp(tcp, s2, serve::TcpLimits::default()).await {
                tracing::error!(error = %e, "dns: TCP listener stopped");
            }
        }),
        tokio::spawn(async move {
            if let Err(e) = probe::run(cfg, s3).await {
                tracing::error!(error = %e, "dns: probes stopped");
            }
        }),
    ];
    Ok(Running { addr, shared, tasks })
}
