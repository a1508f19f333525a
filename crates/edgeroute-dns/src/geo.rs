//! Where a DNS client is: its subnet (from EDNS Client Subnet, else the resolver's address)
//! and the region that subnet maps to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address block: the network address (host bits cleared) and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an address block (e.g. 192.0.2.0/24 or 2001:db8::/48)")]
pub struct CidrError(pub String);

impl Cidr {
    /// The block of `len` leading bits of `addr` (`len` capped at the family's width).
    pub fn new(addr: IpAddr, len: u8) -> Cidr {
        let len = len.min(width(addr));
        Cidr { addr: truncate(addr, len), len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `ip` lies in the block (never across families).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.addr.is_ipv4() == ip.is_ipv4() && truncate(ip, self.len) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(s.to_owned());
        let (a, l) = s.split_once('/').ok_or_else(err)?;
        let addr: IpAddr = a.parse().map_err(|_| err())?;
        let len: u8 = l.parse().map_err(|_| err())?;
        if len > width(addr) {
            return Err(err());
        }
        Ok(Cidr::new(addr, len))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn width(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// `ip` with every bit past the first `len` cleared.
pub fn truncate(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let len = u32::from(len.min(32));
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let len = u32::from(len.min(128));
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    }
}

/// An EDNS Client Subnet option as a resolver sent it: the client's address (its first
/// `source` bits are meaningful) and the source prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ecs {
    pub addr: IpAddr,
    pub source: u8,
}

/// How far into a client's address the server looks (RFC 7871 §11.1 recommends no more than
/// /24 and /56, for the client's privacy and the resolvers' caches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EcsLimits {
    pub v4: u8,
    pub v6: u8,
}

impl Default for EcsLimits {
    fn default() -> Self {
        EcsLimits { v4: 24, v6: 56 }
    }
}

/// What located the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The client subnet the resolver sent matched a table entry.
    Ecs,
    /// The client subnet matched no table entry, but the geo database placed it.
    EcsDb,
    /// The resolver's own address matched a table entry.
    Resolver,
    /// The resolver's address matched no table entry, but the geo database placed it.
    ResolverDb,
    /// Nothing matched: the default region.
    Default,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::Ecs => "ecs",
            Why::EcsDb => "ecs+geodb",
            Why::Resolver => "resolver",
            Why::ResolverDb => "resolver+geodb",
            Why::Default => "default",
        }
    }
}

/// A database of address ranges to regions (a MaxMind-format file, see [`crate::mmdb`]),
/// asked when the CIDR tables place nobody. In memory: no I/O per query.
pub trait RegionDb: std::fmt::Debug + Send + Sync {
    /// The region index `ip` belongs to, if the database places it.
    fn region_of(&self, ip: IpAddr) -> Option<usize>;
}

/// Where a client was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// Index of the region (in the order the locator was given them).
    pub region: usize,
    pub why: Why,
    /// The subnet the decision was made on (the ECS truncated to the limits, else the
    /// resolver's address as a host block): a stable key for spreading load.
    pub subnet: Cidr,
    /// The scope prefix length to echo in the answer's ECS option (RFC 7871 §7.2.1): the
    /// answer holds for every client in `subnet`. `None`: the query had no ECS (none echoed).
    pub scope: Option<u8>,
}

/// Subnets to regions: the longest matching prefix of the tables wins, else the geo
/// database, else the default region.
#[derive(Debug, Clone)]
pub struct Locator {
    /// Longest prefix first.
    rules: Vec<(Cidr, usize)>,
    db: Option<std::sync::Arc<dyn RegionDb>>,
    default: usize,
    limits: EcsLimits,
}

impl Locator {
    /// `rules`: (block, region index); `default`: the region of an unmatched client.
    pub fn new(mut rules: Vec<(Cidr, usize)>, default: usize, limits: EcsLimits) -> Locator {
        rules.sort_by_key(|r| std::cmp::Reverse(r.0.len));
        Locator { rules, db: None, default, limits }
    }

    /// Asks `db` for clients the tables do not place.
    pub fn with_db(mut self, db: std::sync::Arc<dyn RegionDb>) -> Locator {
        self.db = Some(db);
        self
    }

    /// The region of `ip` and whether the database (not a table) placed it.
    fn lookup(&self, ip: IpAddr) -> Option<(usize, bool)> {
        if let Some((_, r)) = self.rules.iter().find(|(c, _)| c.contains(ip)) {
            return Some((*r, false));
        }
        self.db.as_ref().and_then(|db| db.region_of(ip)).map(|r| (r, true))
    }

    /// Places a client that asked through `resolver`, with the resolver's ECS option if it
    /// sent one. An ECS with a source prefix of 0 is the client opting out (RFC 7871 §7.1.2):
    /// the resolver's address decides, and scope 0 is echoed.
    pub fn locate(&self, resolver: IpAddr, ecs: Option<Ecs>) -> Located {
        let host = Cidr::new(resolver, width(resolver));
        match ecs {
            Some(e) if e.source > 0 => {
                let cap = if e.addr.is_ipv4() { self.limits.v4 } else { self.limits.v6 };
                let subnet = Cidr::new(e.addr, e.source.min(cap));
                match self.lookup(subnet.addr) {
                    Some((region, db)) => Located {
                        region,
                        why: if db { Why::EcsDb } else { Why::Ecs },
                        subnet,
                        scope: Some(subnet.len),
                    },
                    None => Located {
                        region: self.default,
                        why: Why::Default,
                        subnet,
                        scope: Some(subnet.len),
                    },
                }
            }
            _ => {
                let scope = ecs.map(|_| 0);
                match self.lookup(resolver) {
                    Some((region, db)) => {
                        let why = if db { Why::ResolverDb } else { Why::Resolver };
                        Located { region, why, subnet: host, scope }
                    }
                    None => {
                        Located { region: self.default, why: Why::Default, subnet: host, scope }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn locator() -> Locator {
        let rules = vec![
            ("192.0.2.0/24".parse().unwrap(), 0),
            ("198.51.100.0/24".parse().unwrap(), 1),
            ("198.51.0.0/16".parse().unwrap(), 2),
            ("2001:db8:1::/48".parse().unwrap(), 1),
            ("127.0.0.0/8".parse().unwrap(), 2),
        ];
        Locator::new(rules, 0, EcsLimits::default())
    }

    #[test]
    fn blocks_parse_normalize_and_refuse_nonsense() {
        let c: Cidr = "192.0.2.77/24".parse().unwrap();
        assert_eq!(c.to_string(), "192.0.2.0/24");
        assert!(c.contains(ip("192.0.2.200")) && !c.contains(ip("192.0.3.1")));
        assert!(!c.contains(ip("::ffff:192.0.2.1")), "never across families");
        let v6: Cidr = "2001:db8:1:2::/56".parse().unwrap();
        assert_eq!(v6.to_string(), "2001:db8:1::/56");
        for bad in ["192.0.2.0", "192.0.2.0/33", "::/129", "x/8", "192.0.2.0/-1", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("203.0.113.9")));
    }

    #[test]
    fn ecs_is_truncated_to_24_and_56_and_echoed_with_that_scope() {
        let l = locator();
        let at = l.locate(ip("10.0.0.1"), Some(Ecs { addr: ip("198.51.100.99"), source: 32 }));
        assert_eq!((at.region, at.why), (1, Why::Ecs));
        assert_eq!((at.subnet.to_string(), at.scope), ("198.51.100.0/24".to_owned(), Some(24)));
        let v6 = Ecs { addr: ip("2001:db8:1:ff:1::1"), source: 64 };
        let at = l.locate(ip("10.0.0.1"), Some(v6));
        assert_eq!((at.region, at.scope), (1, Some(56)));
        // A shorter source than the cap stands as sent.
        let at = l.locate(ip("10.0.0.1"), Some(Ecs { addr: ip("198.51.7.0"), source: 16 }));
        assert_eq!((at.region, at.scope), (2, Some(16)));
    }

    #[test]
    fn ecs_wins_over_the_resolver_and_the_longest_prefix_wins() {
        let l = locator();
        // The resolver sits in region 2's block; the client's subnet in region 1's /24, which
        // lies inside region 2's /16: the longer prefix decides.
        let at = l.locate(ip("127.0.0.1"), Some(Ecs { addr: ip("198.51.100.0"), source: 24 }));
        assert_eq!((at.region, at.why), (1, Why::Ecs));
    }

    #[test]
    fn a_source_of_zero_uses_the_resolver_address_and_echoes_scope_zero() {
        let l = locator();
        let at = l.locate(ip("127.0.0.9"), Some(Ecs { addr: ip("0.0.0.0"), source: 0 }));
        assert_eq!((at.region, at.why, at.scope), (2, Why::Resolver, Some(0)));
        let at = l.locate(ip("127.0.0.9"), None);
        assert_eq!((at.region, at.why, at.scope), (2, Why::Resolver, None));
    }

    /// A database that places 203.0.113.0/24 in region 1 and everything in 198.51.0.0/16 in
    /// region 0.
    #[derive(Debug)]
    struct FakeDb;
    impl RegionDb for FakeDb {
        fn region_of(&self, ip: IpAddr) -> Option<usize> {
            let c = |s: &str| s.parse::<Cidr>().unwrap().contains(ip);
            if c("203.0.113.0/24") {
                Some(1)
            } else if c("198.51.0.0/16") {
                Some(0)
            } else {
                None
            }
        }
    }

    #[test]
    fn the_tables_beat_the_database_which_beats_the_default() {
        let l = locator().with_db(std::sync::Arc::new(FakeDb));
        let ecs = |a: &str| Some(Ecs { addr: ip(a), source: 24 });
        // The database alone places it.
        let at = l.locate(ip("10.0.0.1"), ecs("203.0.113.9"));
        assert_eq!((at.region, at.why, at.scope), (1, Why::EcsDb, Some(24)));
        // A table entry (198.51.100.0/24 → 1, inside 198.51.0.0/16 → 2) wins over the database.
        let at = l.locate(ip("10.0.0.1"), ecs("198.51.100.1"));
        assert_eq!((at.region, at.why), (1, Why::Ecs));
        // Neither: the default.
        let at = l.locate(ip("10.0.0.1"), ecs("100.64.0.1"));
        assert_eq!((at.region, at.why), (0, Why::Default));
        // The resolver's address goes through the database too.
        let at = l.locate(ip("203.0.113.53"), None);
        assert_eq!((at.region, at.why), (1, Why::ResolverDb));
    }

    #[test]
    fn an_unknown_client_goes_to_the_default_region() {
        let l = locator();
        let at = l.locate(ip("203.0.113.5"), None);
        assert_eq!((at.region, at.why), (0, Why::Default));
        let at = l.locate(ip("127.0.0.1"), Some(Ecs { addr: ip("203.0.113.0"), source: 24 }));
        assert_eq!((at.region, at.why, at.scope), (0, Why::Default, Some(24)));
    }
}
