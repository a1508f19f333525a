//! Data residency: where a tenant's requests may be processed. Enforced whatever the client
//! sends: its token's claims and the policy's `[[tenants]]` entry decide, and the client's own
//! `regions` can only narrow that.

use crate::types::Claims;

/// Whether lists of allowed jurisdictions and regions (`None`: no restriction) allow a node.
/// A node of unknown jurisdiction fails any jurisdiction list.
pub(crate) fn lists_allow(
    jurisdictions: Option<&[String]>,
    regions: Option<&[String]>,
    node_region: &str,
    node_jurisdiction: Option<&str>,
) -> bool {
    jurisdictions.is_none_or(|js| node_jurisdiction.is_some_and(|nj| js.iter().any(|j| j == nj)))
        && regions.is_none_or(|rs| rs.iter().any(|r| r == node_region))
}

/// The pure check a node makes on its own, from the verified token's claims alone: may this
/// tenant's request be processed here? (Discovery applies the policy's tenant table too:
/// [`crate::Policy::residency_allows`].)
pub fn residency_allows(
    claims: &Claims,
    node_region: &str,
    node_jurisdiction: Option<&str>,
) -> bool {
    lists_allow(
        claims.jurisdictions.as_deref(),
        claims.regions.as_deref(),
        node_region,
        node_jurisdiction,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eu() -> Claims {
        Claims { sub: "acme".into(), jurisdictions: Some(vec!["eu".into()]), ..Claims::default() }
    }

    #[test]
    fn claims_decide_and_unknown_jurisdictions_fail_closed() {
        assert!(residency_allows(&eu(), "fra", Some("eu")));
        assert!(!residency_allows(&eu(), "nyc", Some("us")));
        assert!(!residency_allows(&eu(), "fra", None));
        assert!(residency_allows(&Claims::default(), "nyc", None));
        let nothing = Claims { jurisdictions: Some(vec![]), ..Claims::default() };
        assert!(!residency_allows(&nothing, "fra", Some("eu")));
        let regions = Claims { regions: Some(vec!["fra".into()]), ..eu() };
        assert!(residency_allows(&regions, "fra", Some("eu")));
        assert!(!residency_allows(&regions, "ams", Some("eu")));
    }
}
