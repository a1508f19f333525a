//! Where an admin token is valid: its audience names a node, a region or the whole fleet.
//!
//! An `admin`-scope token must carry at least one of these in `aud`:
//!
//! - `edgeroute:node:<node_id>`: that node only;
//! - `edgeroute:region:<region>`: every node of that region;
//! - `edgeroute:fleet`: every node.
//!
//! A node refuses an admin token that names none of them for itself (`403
//! admin_token_not_for_this_node`): a token minted to drain node A cannot drain node B.
//!
//! How this meets `auth.audience` (the inference audience): the verifier accepts a token when
//! its `aud` satisfies the configured audience rule, as before; or, failing that, when it holds
//! the `admin` scope and names at least one admin audience. A token accepted the second way is
//! an admin token only: its `inference` scope is dropped, so an admin audience never stands in
//! for the inference audience.

/// The audience valid on every node.
pub const FLEET_AUDIENCE: &str = "edgeroute:fleet";
const NODE_PREFIX: &str = "edgeroute:node:";
const REGION_PREFIX: &str = "edgeroute:region:";

/// The audience naming node `id`.
pub fn node_audience(id: &str) -> String {
    format!("{NODE_PREFIX}{id}")
}

/// The audience naming every node of `region`.
pub fn region_audience(region: &str) -> String {
    format!("{REGION_PREFIX}{region}")
}

/// Whether `aud` is one of the admin audiences (whatever node or region it names).
pub fn is_admin_audience(aud: &str) -> bool {
    aud == FLEET_AUDIENCE
        || aud.strip_prefix(NODE_PREFIX).is_some_and(|s| !s.is_empty())
        || aud.strip_prefix(REGION_PREFIX).is_some_and(|s| !s.is_empty())
}

/// Whether the audiences `aud` make an admin token valid on node `node_id` of `region`.
pub fn admin_audience_covers(aud: &[String], node_id: &str, region: &str) -> bool {
    aud.iter().any(|a| {
        a == FLEET_AUDIENCE
            || a.strip_prefix(NODE_PREFIX) == Some(node_id)
            || a.strip_prefix(REGION_PREFIX) == Some(region)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_token_names_its_node_its_region_or_the_fleet() {
        assert!(admin_audience_covers(&v(&["edgeroute:node:tor-1"]), "tor-1", "toronto"));
        assert!(admin_audience_covers(&v(&["edgeroute:region:toronto"]), "tor-1", "toronto"));
        assert!(admin_audience_covers(&v(&["x", "edgeroute:fleet"]), "tor-1", "toronto"));
        assert!(!admin_audience_covers(&v(&["edgeroute:node:tor-2"]), "tor-1", "toronto"));
        assert!(!admin_audience_covers(&v(&["edgeroute:node:tor-10"]), "tor-1", "toronto"));
        assert!(!admin_audience_covers(&v(&["edgeroute:region:montreal"]), "tor-1", "toronto"));
        assert!(!admin_audience_covers(&v(&["edgeroute:node:toronto"]), "tor-1", "toronto"));
        assert!(!admin_audience_covers(&v(&["edgeroute:region:tor-1"]), "tor-1", "toronto"));
        assert!(!admin_audience_covers(&v(&["edgeroute:fleet:x", "tor-1"]), "tor-1", "toronto"));
        assert!(!admin_audience_covers(&[], "tor-1", "toronto"));
    }

    #[test]
    fn admin_audiences_are_recognised_exactly() {
        for a in ["edgeroute:fleet", "edgeroute:node:a", "edgeroute:region:r"] {
            assert!(is_admin_audience(a), "{a}");
        }
        for a in ["edgeroute:node:", "edgeroute:region:", "edgeroute:fleets", "api", ""] {
            assert!(!is_admin_audience(a), "{a}");
        }
        assert_eq!(node_audience("a"), "edgeroute:node:a");
        assert_eq!(region_audience("r"), "edgeroute:region:r");
    }
}
