//! Which question a name asks, relative to the fleet's zone.
//!
//! Names the server answers from the fleet's state (`<zone>` = e.g. `edge.example.net`):
//! `discovery.<zone>` and `api.<zone>` (the nearest healthy discovery replicas, regional
//! routers), `<label>.discovery.<zone>` and `<label>.api.<zone>` (a region's, pinned, when
//! `label` is a region; one target's own address when it is a target's id), and the same
//! prefixed with `_edgeroute._tcp.` for SRV. Comparison ignores ASCII case (DNS names are
//! case-insensitive; the question goes back as asked).

use crate::decide::Kind;

/// What a name in a query asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Question {
    /// The zone's apex (SOA, NS).
    Apex,
    /// `[<label>.]<kind>.<zone>`, `srv` when prefixed with `_edgeroute._tcp.`.
    Fleet { kind: Kind, label: Option<String>, srv: bool },
    /// Inside the zone, but no name the server knows (NXDOMAIN).
    Unknown,
    /// Outside the zone (REFUSED: the server is authoritative for its zone only).
    Outside,
}

/// The SRV service and protocol labels.
pub const SRV_PREFIX: &str = "_edgeroute._tcp.";

/// `name` (trailing dot optional) relative to `zone` (likewise).
pub fn parse_name(name: &str, zone: &str) -> Question {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let zone = zone.strip_suffix('.').unwrap_or(zone).to_ascii_lowercase();
    if name == zone {
        return Question::Apex;
    }
    let Some(rel) = name.strip_suffix(&zone).and_then(|r| r.strip_suffix('.')) else {
        return Question::Outside;
    };
    if rel.is_empty() {
        return Question::Outside;
    }
    let (rel, srv) = match rel.strip_prefix(SRV_PREFIX) {
        Some(r) => (r, true),
        None => (rel, false),
    };
    let mut labels = rel.rsplit('.');
    let kind = match labels.next() {
        Some("discovery") => Kind::Discovery,
        Some("api") => Kind::Api,
        _ => return Question::Unknown,
    };
    let label = labels.next().map(str::to_owned);
    if labels.next().is_some() || label.as_deref().is_some_and(|l| !is_label(l)) {
        return Question::Unknown;
    }
    Question::Fleet { kind, label, srv }
}

/// A DNS label this server names things with: 1–63 of `[a-z0-9-]`, not starting or ending
/// with `-`.
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = "edge.example.net.";

    fn fleet(kind: Kind, label: Option<&str>, srv: bool) -> Question {
        Question::Fleet { kind, label: label.map(str::to_owned), srv }
    }

    #[test]
    fn the_fleet_names_parse_in_any_case_with_or_without_the_dot() {
        let p = |n| parse_name(n, ZONE);
        assert_eq!(p("edge.example.net"), Question::Apex);
        assert_eq!(p("EDGE.example.NET."), Question::Apex);
        assert_eq!(p("discovery.edge.example.net."), fleet(Kind::Discovery, None, false));
        assert_eq!(p("Api.Edge.Example.Net"), fleet(Kind::Api, None, false));
        assert_eq!(p("tor.discovery.edge.example.net"), fleet(Kind::Discovery, Some("tor"), false));
        assert_eq!(p("_edgeroute._tcp.api.edge.example.net"), fleet(Kind::Api, None, true));
        assert_eq!(
            p("_edgeroute._tcp.mtl.discovery.edge.example.net."),
            fleet(Kind::Discovery, Some("mtl"), true)
        );
    }

    #[test]
    fn other_names_are_unknown_or_outside() {
        let p = |n| parse_name(n, ZONE);
        assert_eq!(p("www.edge.example.net"), Question::Unknown);
        assert_eq!(p("a.b.discovery.edge.example.net"), Question::Unknown);
        assert_eq!(p("_x._tcp.api.edge.example.net"), Question::Unknown);
        assert_eq!(p("under_score.api.edge.example.net"), Question::Unknown);
        assert_eq!(p("example.net"), Question::Outside);
        assert_eq!(p("discovery.other.net"), Question::Outside);
        assert_eq!(p("xedge.example.net"), Question::Outside, "a suffix is not a subdomain");
        assert_eq!(p("."), Question::Outside);
    }

    #[test]
    fn labels_follow_the_host_name_rules() {
        assert!(is_label("tor") && is_label("disc-tor-1") && is_label("a1"));
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!is_label(bad), "{bad}");
        }
    }
}
