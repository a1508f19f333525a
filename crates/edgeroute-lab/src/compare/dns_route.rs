//! The `edgeroute (DNS bootstrap)` strategy's name service: each site's SDK knows only the
//! zone name (`dns+http:discovery.edge.test`), and the fleet's GeoDNS — `edgeroute dns`'s own
//! answerer, on the world's discovery replicas — tells it where to ask, as it tells a real
//! client through its resolver.
//!
//! Each site's resolver has an address in a subnet the server places in the site's region
//! (the congested Toronto ISP's in Toronto: DNS sees where a client is, not how its peering
//! performs — the SDK's probes find that out). The query costs the site's round trip to its
//! region; the answer's SRV targets `<replica>.discovery.edge.test` reach the replica's host
//! on the in-memory network.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use edgeroute_client::{ConnectFuture, DnsFuture, Transport};
use edgeroute_dns::{Answerer, DnsConfig, View};

use super::world::{REGIONS, SITES, discovery_host};
use crate::memnet::MemNet;
use crate::wan::geo_rtt_ms;

pub const ZONE: &str = "edge.test";
/// What a site's SDK is configured with, and nothing else.
pub const ENTRY: &str = "dns+http:discovery.edge.test:80";
/// The nameserver the SDK is told (the transport answers it).
pub const NAMESERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 53)), 53);

/// Site `k`'s resolver address (10.1.k.53, in a /24 of its own).
pub fn resolver(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 1, u8::try_from(k).unwrap_or(u8::MAX), 53))
}

/// The zone's config: the world's regions and discovery replicas (every one healthy: this
/// comparison kills nodes, not replicas), each site's resolver subnet in its region, the
/// regions' distances from the world's WAN.
pub fn config() -> String {
    let mut t = format!("zone = \"{ZONE}\"\ndefault_region = \"toronto\"\n");
    for (i, a) in REGIONS.iter().enumerate() {
        t.push_str(&format!("[distance.{a}]\n"));
        for b in &REGIONS[i + 1..] {
            t.push_str(&format!("{b} = {}\n", geo_rtt_ms(a, b).round() as u32));
        }
    }
    for (r, region) in REGIONS.iter().enumerate() {
        let nets: Vec<String> = SITES
            .iter()
            .enumerate()
            .filter(|(_, s)| s.region == *region)
            .map(|(k, _)| format!("\"10.1.{k}.0/24\""))
            .collect();
        t.push_str(&format!(
            "[[regions]]\nname = \"{region}\"\nclient_cidrs = [{}]\n\
             discovery = [{{ id = \"{}\", addr = \"10.0.{r}.1\", port = 80, health = \"http://unused/health\" }}]\n",
            nets.join(", "),
            discovery_host(region)
        ));
    }
    t
}

/// A site's way out: the world's network, and DNS answered by the fleet's server.
pub struct DnsTransport {
    net: MemNet,
    answerer: Arc<Answerer>,
    view: Arc<View>,
    resolver: IpAddr,
    rtt: Duration,
}

impl DnsTransport {
    /// For site `k` on `net` (already `from` the site).
    pub fn new(net: MemNet, k: usize) -> anyhow::Result<DnsTransport> {
        let cfg = DnsConfig::from_toml(&config())?;
        let site = SITES[k];
        Ok(DnsTransport {
            net,
            answerer: Arc::new(Answerer::new(&cfg)?),
            view: Arc::new(cfg.view(|_| (true, false))),
            resolver: resolver(k),
            rtt: Duration::from_secs_f64(site.rtt_ms(site.region) / 1000.0),
        })
    }
}

impl Transport for DnsTransport {
    fn connect(&self, uri: &http::Uri) -> ConnectFuture {
        let suffix = format!(".discovery.{ZONE}");
        let host = uri.host().unwrap_or_default();
        match host.strip_suffix(&suffix) {
            Some(replica) => match format!("http://{replica}/").parse::<http::Uri>() {
                Ok(u) => self.net.connect(&u),
                Err(e) => Box::pin(std::future::ready(Err(io::Error::other(e)))),
            },
            None => self.net.connect(uri),
        }
    }

    fn dns(&self, _server: SocketAddr, query: Vec<u8>) -> Option<DnsFuture> {
        let answer = self.answerer.respond(&query, self.resolver, true, &self.view);
        let rtt = self.rtt;
        Some(Box::pin(async move {
            tokio::time::sleep(rtt).await;
            answer.ok_or_else(|| io::Error::other("the server sent nothing"))
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    #[test]
    fn each_site_is_told_its_own_regions_replica_first() {
        let cfg = DnsConfig::from_toml(&config()).unwrap();
        let locator = cfg.locator().unwrap();
        let view = cfg.view(|_| (true, false));
        for (k, site) in SITES.iter().enumerate() {
            let at = locator.locate(resolver(k), None);
            assert_eq!(cfg.regions[at.region].name, site.region, "{}", site.name);
            let s = edgeroute_dns::select(
                &view,
                edgeroute_dns::Kind::Discovery,
                at.region,
                None,
                0,
                3,
                cfg.ttl(),
            );
            assert_eq!(s.targets[0].id, discovery_host(site.region), "{}", site.name);
        }
    }
}
