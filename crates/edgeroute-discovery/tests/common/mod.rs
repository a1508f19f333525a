//! What discovery's integration tests share: a replica started from TOML on a loopback port.
//! Each test file adds the queries it needs in an `impl Replica` of its own.

use std::net::SocketAddr;

use edgeroute_bus::Bus;
use edgeroute_discovery::{Discovery, DiscoveryConfig};

/// A running replica; stops when dropped.
pub struct Replica {
    pub addr: SocketAddr,
    _running: edgeroute_discovery::Spawned,
}

impl Replica {
    /// A replica from `toml` (environment lookups find nothing), following `bus` if given.
    pub async fn start(toml: &str, bus: Option<Bus>) -> Replica {
        let cfg = DiscoveryConfig::from_toml(toml, |_| None).expect("a valid discovery config");
        let mut d = Discovery::build(cfg).expect("a replica builds");
        if let Some(b) = bus {
            d = d.with_bus(b);
        }
        let running = d.spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("it serves");
        Replica { addr: running.addr(), _running: running }
    }
}
