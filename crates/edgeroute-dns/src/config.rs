//! `dns.toml`: the zone, its regions and their targets, where clients are, how far regions
//! are from each other, the TTLs and the health rules. Unknown keys are errors; every error
//! names its key.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Deserialize;

use crate::decide::{RegionView, TargetView, Ttl, View};
use crate::geo::{Cidr, EcsLimits, Locator};
use crate::health::HealthRules;
use crate::mmdb::MmdbRegions;
use crate::names::is_label;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// The zone this server is authoritative for, e.g. `edge.example.net`.
    pub zone: String,
    /// The region of a client no table places.
    pub default_region: String,
    #[serde(default)]
    pub ttl: TtlConfig,
    #[serde(default)]
    pub answers: AnswerConfig,
    #[serde(default)]
    pub health: HealthConfig,
    /// The zone's SOA (negative answers carry it; `minimum` is their TTL).
    #[serde(default)]
    pub soa: SoaConfig,
    /// The zone's name servers (the apex's NS records). Default: `ns1.<zone>`.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Distances between regions (any unit, e.g. RTT ms), one direction is enough:
    /// `[distance.tor] mtl = 6`. Regions with no distance come after those with one.
    #[serde(default)]
    pub distance: BTreeMap<String, BTreeMap<String, u32>>,
    /// A MaxMind-format database asked for clients the regions' `client_cidrs` do not place.
    #[serde(default)]
    pub geoip: Option<GeoIpConfig>,
    /// The topology bus to follow (shaped as discovery's `[bus]`): a region whose nodes the
    /// bus shows, none of them up with a model ready, ranks after the regions that have one.
    /// The bus never withdraws a region on its own (a partitioned bus must not empty DNS).
    #[serde(default)]
    pub bus: Option<edgeroute_bus::BusConfig>,
    pub regions: Vec<RegionConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoIpConfig {
    /// The `.mmdb` file, read once at start. A record places its range by an
    /// `edgeroute_region` string, else by `country.iso_code` through `country_to_region`.
    pub mmdb: std::path::PathBuf,
    /// ISO 3166-1 alpha-2 country codes to region names, e.g. `{ CA = "tor", US = "van" }`.
    #[serde(default)]
    pub country_to_region: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlConfig {
    /// Default 30.
    #[serde(default = "d30")]
    pub calm_s: u32,
    /// While a target an answer covers changed state recently. Default 10.
    #[serde(default = "d10")]
    pub changing_s: u32,
    /// How long "recently" is. Default 60.
    #[serde(default = "d60")]
    pub changing_window_s: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerConfig {
    /// Targets per answer, 1–8. Default 3.
    #[serde(default = "d3")]
    pub count: usize,
    /// How far into an EDNS Client Subnet the server looks, IPv4 bits. Default 24.
    #[serde(default = "d24")]
    pub ecs_max_v4: u8,
    /// IPv6 bits. Default 56.
    #[serde(default = "d56")]
    pub ecs_max_v6: u8,
    /// Largest UDP answer whatever the query allows, bytes (DNS Flag Day 2020's 1232); a
    /// larger answer is truncated (TC) and the client asks again over TCP. At least 512.
    #[serde(default = "d1232")]
    pub max_udp_payload: u16,
    /// The UDP socket's receive buffer, bytes: room for a burst of queries while the server
    /// answers (the kernel caps it at `net.core.rmem_max`). Default 4 MiB.
    #[serde(default = "d4mib")]
    pub udp_recv_buffer_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoaConfig {
    /// The primary name server. Default `ns1.<zone>`.
    #[serde(default)]
    pub mname: Option<String>,
    /// The responsible mailbox as a name. Default `hostmaster.<zone>`.
    #[serde(default)]
    pub rname: Option<String>,
    #[serde(default = "d1u")]
    pub serial: u32,
    #[serde(default = "d3600")]
    pub refresh: u32,
    #[serde(default = "d600")]
    pub retry: u32,
    #[serde(default = "d86400")]
    pub expire: u32,
    /// The TTL of negative answers (NXDOMAIN, no data), s. Default 30.
    #[serde(default = "d30")]
    pub minimum: u32,
}

impl Default for SoaConfig {
    fn default() -> Self {
        SoaConfig {
            mname: None,
            rname: None,
            serial: 1,
            refresh: 3600,
            retry: 600,
            expire: 86_400,
            minimum: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Probe interval per target, ms. Default 250.
    #[serde(default = "d250")]
    pub interval_ms: u64,
    /// A probe unanswered after this long failed, ms. Default 250.
    #[serde(default = "d250")]
    pub timeout_ms: u64,
    /// Failed probes in a row that withdraw a target. Default 2.
    #[serde(default = "d2")]
    pub down_after: u32,
    /// Good probes in a row before it returns. Default 3.
    #[serde(default = "d3u")]
    pub up_probes: u32,
    /// And unbroken health for this long, ms. Default 10000.
    #[serde(default = "d10000")]
    pub up_after_ms: u64,
    /// The fleet CA (PEM) the targets' `https://` health URLs are verified against. Default:
    /// the Mozilla roots compiled in.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// A DNS label: `<name>.discovery.<zone>` pins to it.
    pub name: String,
    /// Client subnets placed in this region.
    #[serde(default)]
    pub client_cidrs: Vec<String>,
    #[serde(default)]
    pub discovery: Vec<TargetConfig>,
    #[serde(default)]
    pub api: Vec<TargetConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// A DNS label, unique in the zone: `<id>.<kind>.<zone>` names its address.
    pub id: String,
    pub addr: IpAddr,
    pub port: u16,
    /// Its health URL (its `/health`).
    pub health: String,
}

fn d1u() -> u32 {
    1
}
fn d600() -> u32 {
    600
}
fn d1232() -> u16 {
    1232
}
fn d4mib() -> usize {
    4 << 20
}
fn d3600() -> u32 {
    3600
}
fn d86400() -> u32 {
    86_400
}
fn d2() -> u32 {
    2
}
fn d3() -> usize {
    3
}
fn d3u() -> u32 {
    3
}
fn d10() -> u32 {
    10
}
fn d24() -> u8 {
    24
}
fn d30() -> u32 {
    30
}
fn d56() -> u8 {
    56
}
fn d60() -> u32 {
    60
}
fn d250() -> u64 {
    250
}
fn d10000() -> u64 {
    10_000
}

impl Default for TtlConfig {
    fn default() -> Self {
        TtlConfig { calm_s: 30, changing_s: 10, changing_window_s: 60 }
    }
}

impl Default for AnswerConfig {
    fn default() -> Self {
        AnswerConfig {
            count: 3,
            ecs_max_v4: 24,
            ecs_max_v6: 56,
            max_udp_payload: 1232,
            udp_recv_buffer_bytes: 4 << 20,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 250,
            timeout_ms: 250,
            down_after: 2,
            up_probes: 3,
            up_after_ms: 10_000,
            ca_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("dns config: {0}")]
    Parse(String),
    #[error("dns config: `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

impl DnsConfig {
    /// Parses and validates `dns.toml`.
    pub fn from_toml(text: &str) -> Result<DnsConfig, ConfigError> {
        let cfg: DnsConfig = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let zone = self.zone.strip_suffix('.').unwrap_or(&self.zone);
        if zone.is_empty() || !zone.split('.').all(is_label) {
            return Err(invalid("zone", "a lowercase domain name, e.g. edge.example.net"));
        }
        if self.regions.is_empty() {
            return Err(invalid("regions", "at least one region"));
        }
        let mut regions = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (i, r) in self.regions.iter().enumerate() {
            let key = format!("regions[{i}]");
            if !is_label(&r.name) || ["discovery", "api"].contains(&r.name.as_str()) {
                return Err(invalid(
                    format!("{key}.name"),
                    "a DNS label ([a-z0-9-], at most 63) other than `discovery` and `api`",
                ));
            }
            if !regions.insert(r.name.as_str()) {
                return Err(invalid(format!("{key}.name"), format!("`{}` twice", r.name)));
            }
            for (j, c) in r.client_cidrs.iter().enumerate() {
                c.parse::<Cidr>()
                    .map_err(|e| invalid(format!("{key}.client_cidrs[{j}]"), e.to_string()))?;
            }
            for (kind, targets) in [("discovery", &r.discovery), ("api", &r.api)] {
                for (j, t) in targets.iter().enumerate() {
                    let key = format!("{key}.{kind}[{j}]");
                    if !is_label(&t.id) {
                        return Err(invalid(format!("{key}.id"), "a DNS label ([a-z0-9-])"));
                    }
                    if !ids.insert(t.id.as_str()) {
                        return Err(invalid(format!("{key}.id"), format!("`{}` twice", t.id)));
                    }
                    if !(t.health.starts_with("http://") || t.health.starts_with("https://")) {
                        return Err(invalid(format!("{key}.health"), "an http(s) URL"));
                    }
                }
            }
        }
        // A target id equal to a region name would make `<label>.<kind>.<zone>` ambiguous.
        if let Some(clash) = ids.intersection(&regions).next() {
            return Err(invalid("regions", format!("`{clash}` is both a region and a target id")));
        }
        if !regions.contains(self.default_region.as_str()) {
            return Err(invalid("default_region", "must be one of `regions`"));
        }
        for (a, to) in &self.distance {
            for b in to.keys().chain(std::iter::once(a)) {
                if !regions.contains(b.as_str()) {
                    return Err(invalid(format!("distance.{a}"), format!("`{b}` is no region")));
                }
            }
        }
        if !(1..=8).contains(&self.answers.count) {
            return Err(invalid("answers.count", "1 to 8"));
        }
        if self.answers.udp_recv_buffer_bytes < 65_536 {
            return Err(invalid("answers.udp_recv_buffer_bytes", "at least 65536"));
        }
        if self.answers.max_udp_payload < 512 {
            return Err(invalid("answers.max_udp_payload", "at least 512"));
        }
        for (i, n) in
            self.nameservers.iter().chain(&self.soa.mname).chain(&self.soa.rname).enumerate()
        {
            let n = n.strip_suffix('.').unwrap_or(n);
            if n.is_empty() || !n.split('.').all(is_label) {
                return Err(invalid(
                    format!("nameservers/soa ({i})"),
                    format!("`{n}` is not a domain name"),
                ));
            }
        }
        if let Some(g) = &self.geoip {
            for (cc, r) in &g.country_to_region {
                if cc.len() != 2 || !cc.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(invalid(
                        format!("geoip.country_to_region.{cc}"),
                        "an ISO 3166-1 alpha-2 code, e.g. CA",
                    ));
                }
                if !regions.contains(r.as_str()) {
                    return Err(invalid(
                        format!("geoip.country_to_region.{cc}"),
                        format!("`{r}` is no region"),
                    ));
                }
            }
        }
        if let Some(bus) = &self.bus {
            bus.validate().map_err(|e| invalid("bus", e.to_string()))?;
        }
        if self.answers.ecs_max_v4 > 32 || self.answers.ecs_max_v6 > 128 {
            return Err(invalid("answers.ecs_max_v4/v6", "at most 32 and 128"));
        }
        let h = &self.health;
        if h.interval_ms == 0 || h.timeout_ms == 0 || h.down_after == 0 || h.up_probes == 0 {
            return Err(invalid("health", "interval_ms, timeout_ms, down_after, up_probes ≥ 1"));
        }
        if self.ttl.changing_s == 0 || self.ttl.changing_s > self.ttl.calm_s {
            return Err(invalid("ttl.changing_s", "between 1 and ttl.calm_s"));
        }
        Ok(())
    }

    /// Client subnets to regions (indices as in `regions`). Reads `geoip.mmdb` if set.
    pub fn locator(&self) -> Result<Locator, ConfigError> {
        let mut rules = Vec::new();
        for (i, r) in self.regions.iter().enumerate() {
            rules.extend(r.client_cidrs.iter().filter_map(|c| c.parse().ok()).map(|c| (c, i)));
        }
        let default =
            self.regions.iter().position(|r| r.name == self.default_region).unwrap_or_default();
        let limits = EcsLimits { v4: self.answers.ecs_max_v4, v6: self.answers.ecs_max_v6 };
        let locator = Locator::new(rules, default, limits);
        let Some(g) = &self.geoip else { return Ok(locator) };
        let names: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
        let db = MmdbRegions::open(&g.mmdb, &names, &g.country_to_region)
            .map_err(|e| invalid("geoip.mmdb", e))?;
        Ok(locator.with_db(std::sync::Arc::new(db)))
    }

    pub fn health_rules(&self) -> HealthRules {
        HealthRules {
            down_after: self.health.down_after,
            up_probes: self.health.up_probes,
            up_after_ms: self.health.up_after_ms,
            changing_window_ms: u64::from(self.ttl.changing_window_s) * 1000,
        }
    }

    pub fn ttl(&self) -> Ttl {
        Ttl { calm_s: self.ttl.calm_s, changing_s: self.ttl.changing_s }
    }

    /// The view with each target's health as `health(id)` says: (up, changing).
    pub fn view(&self, health: impl Fn(&str) -> (bool, bool)) -> View {
        let targets = |ts: &[TargetConfig]| {
            ts.iter()
                .map(|t| {
                    let (up, changing) = health(&t.id);
                    TargetView { id: t.id.clone(), addr: t.addr, port: t.port, up, changing }
                })
                .collect()
        };
        let regions = self
            .regions
            .iter()
            .map(|r| RegionView {
                name: r.name.clone(),
                discovery: targets(&r.discovery),
                api: targets(&r.api),
            })
            .collect();
        View::new(regions, |a, b| self.distance.get(a).and_then(|m| m.get(b)).copied())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;
    use crate::decide::{Kind, select};

    pub(crate) const SAMPLE: &str = r#"
zone = "edge.example.net."
default_region = "tor"

[distance.tor]
mtl = 6
van = 60
[distance.mtl]
van = 65

[[regions]]
name = "tor"
client_cidrs = ["192.0.2.0/24", "2001:db8:1::/48"]
discovery = [{ id = "disc-tor-1", addr = "127.0.1.1", port = 7070, health = "http://127.0.1.1:7070/health" }]
api = [{ id = "rtr-tor-1", addr = "127.0.1.3", port = 8080, health = "http://127.0.1.3:8080/health" }]

[[regions]]
name = "mtl"
client_cidrs = ["198.51.100.0/24"]
discovery = [{ id = "disc-mtl-1", addr = "127.0.2.1", port = 7070, health = "http://127.0.2.1:7070/health" }]

[[regions]]
name = "van"
client_cidrs = ["203.0.113.0/24"]
discovery = [{ id = "disc-van-1", addr = "127.0.3.1", port = 7070, health = "http://127.0.3.1:7070/health" }]
"#;

    #[test]
    fn the_sample_parses_locates_and_answers() {
        let cfg = DnsConfig::from_toml(SAMPLE).unwrap();
        let at = cfg.locator().unwrap().locate("10.0.0.1".parse().unwrap(), None);
        assert_eq!(cfg.regions[at.region].name, "tor", "unplaced: the default region");
        let ecs = crate::geo::Ecs { addr: "203.0.113.7".parse().unwrap(), source: 32 };
        let at = cfg.locator().unwrap().locate("10.0.0.1".parse().unwrap(), Some(ecs));
        assert_eq!(cfg.regions[at.region].name, "van");
        let view = cfg.view(|_| (true, false));
        let s = select(&view, Kind::Discovery, at.region, None, 0, cfg.answers.count, cfg.ttl());
        let ids: Vec<&str> = s.targets.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["disc-van-1", "disc-tor-1", "disc-mtl-1"]);
        assert_eq!(cfg.health_rules().changing_window_ms, 60_000);
    }

    #[test]
    fn every_mistake_names_its_key() {
        let cases = [
            (
                SAMPLE.replace("default_region = \"tor\"", "default_region = \"sea\""),
                "default_region",
            ),
            (SAMPLE.replace("\"192.0.2.0/24\"", "\"192.0.2.0/33\""), "regions[0].client_cidrs[0]"),
            (SAMPLE.replace("disc-mtl-1\"", "disc-tor-1\""), "regions[1].discovery[0].id"),
            (SAMPLE.replace("name = \"van\"", "name = \"api\""), "regions[2].name"),
            (SAMPLE.replace("mtl = 6", "sea = 6"), "distance.tor"),
            (SAMPLE.replace("zone = \"edge.example.net.\"", "zone = \"Edge..net\""), "zone"),
            (format!("{SAMPLE}\n[answers]\ncount = 0\n"), "answers.count"),
            (format!("{SAMPLE}\n[ttl]\nchanging_s = 60\n"), "ttl.changing_s"),
            (SAMPLE.replace("id = \"rtr-tor-1\"", "id = \"mtl\""), "regions"),
            (
                format!(
                    "{SAMPLE}\n[geoip]\nmmdb = \"x.mmdb\"\ncountry_to_region = {{ CA = \"sea\" }}\n"
                ),
                "geoip.country_to_region.CA",
            ),
            (
                format!(
                    "{SAMPLE}\n[geoip]\nmmdb = \"x.mmdb\"\ncountry_to_region = {{ CAN = \"tor\" }}\n"
                ),
                "geoip.country_to_region.CAN",
            ),
        ];
        for (text, key) in cases {
            let e = DnsConfig::from_toml(&text).unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
        let e = DnsConfig::from_toml(&format!("{SAMPLE}\nbogus = 1\n")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        // A database that cannot be read is an error at start, naming the file.
        let cfg =
            DnsConfig::from_toml(&format!("{SAMPLE}\n[geoip]\nmmdb = \"/nonexistent.mmdb\"\n"))
                .unwrap();
        let e = cfg.locator().unwrap_err().to_string();
        assert!(e.contains("`geoip.mmdb`") && e.contains("/nonexistent.mmdb"), "{e}");
    }

    #[test]
    fn the_geo_database_places_clients_the_tables_do_not() {
        let dir = std::env::temp_dir().join(format!("edgeroute-dns-mmdb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("regions.mmdb");
        std::fs::write(&path, crate::mmdb::tests::test_mmdb()).unwrap();
        let text = format!(
            "{SAMPLE}\n[geoip]\nmmdb = {:?}\ncountry_to_region = {{ CA = \"mtl\" }}\n",
            path.display().to_string()
        );
        let cfg = DnsConfig::from_toml(&text).unwrap();
        let locator = cfg.locator().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        // 2001:db8:3::/48 is in no table; the database says van.
        let ecs = crate::geo::Ecs { addr: "2001:db8:3:9::".parse().unwrap(), source: 56 };
        let at = locator.locate("10.0.0.1".parse().unwrap(), Some(ecs));
        assert_eq!((cfg.regions[at.region].name.as_str(), at.why), ("van", crate::Why::EcsDb));
        // 203.0.113.0/24 is in van's table: the table wins over the database's country (CA → mtl).
        let ecs = crate::geo::Ecs { addr: "203.0.113.1".parse().unwrap(), source: 24 };
        let at = locator.locate("10.0.0.1".parse().unwrap(), Some(ecs));
        assert_eq!((cfg.regions[at.region].name.as_str(), at.why), ("van", crate::Why::Ecs));
    }
}
