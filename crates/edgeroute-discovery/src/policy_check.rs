//! `POST /v1/policy/check` (admin scope, fleet audience): a dry run of a candidate policy
//! against this replica's fleet, for `edgeroute policy check FILE --discovery URL`. Nothing is
//! applied: the candidate is parsed, checked against the current nodes (warnings), and a set
//! of sample requests is decided under the policy in force and under the candidate; the
//! answer lists where they differ.
//!
//! The samples: every model either registry names × every region of the fleet (and no
//! region) × `SESSIONS` sessions, so a canary's new split shows as the sessions that move.

use std::collections::BTreeSet;

use edgeroute_policy::{Claims, Difference, NodeFacts, Policy, Sample, Summary};
use serde::Serialize;

/// Sessions per (model, region): enough for a 5 % canary to show.
pub const SESSIONS: usize = 40;
/// Most samples a check decides (each is two decisions).
pub const MAX_SAMPLES: usize = 20_000;
/// Largest candidate text accepted.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// The answer.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub object: &'static str,
    /// Whether the candidate parses and validates (a refused text would never be applied).
    pub valid: bool,
    /// Why it is refused (line and column, or rule and field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The version in force on this replica (`None`: it applies no policy).
    pub live_version: Option<String>,
    pub nodes: usize,
    pub warnings: Vec<String>,
    pub samples: usize,
    pub differences: Vec<DifferenceJson>,
}

#[derive(Debug, Serialize)]
pub struct DifferenceJson {
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_region: Option<String>,
    pub session: String,
    pub live: SummaryJson,
    pub candidate: SummaryJson,
}

#[derive(Debug, Serialize)]
pub struct SummaryJson {
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    pub cascade_step: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl From<&Summary> for SummaryJson {
    fn from(s: &Summary) -> Self {
        let text = |v: &Option<std::sync::Arc<str>>| v.as_deref().map(str::to_owned);
        SummaryJson {
            outcome: format!("{:?}", s.outcome),
            rule: text(&s.rule),
            model: text(&s.model),
            version: text(&s.version),
            tier: text(&s.tier),
            cascade_step: s.cascade_step,
            node: s.node.clone(),
        }
    }
}

/// The samples for `live` and `candidate` over `nodes` (pure).
pub fn samples(live: Option<&Policy>, candidate: &Policy, nodes: &[NodeFacts]) -> Vec<Sample> {
    let mut models = BTreeSet::new();
    for p in live.into_iter().chain(Some(candidate)) {
        models.extend(p.registry().models().iter().map(|m| m.name.to_string()));
    }
    let regions: BTreeSet<Option<String>> =
        nodes.iter().map(|n| Some(n.region.clone())).chain(Some(None)).collect();
    let mut out = Vec::new();
    'all: for model in &models {
        for region in &regions {
            for s in 0..SESSIONS {
                if out.len() == MAX_SAMPLES {
                    break 'all;
                }
                out.push(Sample {
                    claims: Claims { sub: "policy-check".into(), ..Claims::default() },
                    model: model.clone(),
                    version: None,
                    class: Default::default(),
                    streamed: true,
                    client_region: region.clone(),
                    regions: Vec::new(),
                    session: Some(format!("check-{s}")),
                    rtt_ms: Vec::new(),
                    tokens: None,
                    k: edgeroute_policy::DEFAULT_K,
                });
            }
        }
    }
    out
}

/// Checks `text` against `nodes` and the policy in force (`live`). Pure.
pub fn check(text: &str, live: Option<&Policy>, nodes: &[NodeFacts]) -> CheckReport {
    let mut report = CheckReport {
        object: "edgeroute.policy_check",
        valid: false,
        error: None,
        version: None,
        live_version: live.map(|p| p.version().to_owned()),
        nodes: nodes.len(),
        warnings: Vec::new(),
        samples: 0,
        differences: Vec::new(),
    };
    let candidate = match Policy::parse(text) {
        Ok(p) => p,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    report.valid = true;
    report.version = Some(candidate.version().to_owned());
    report.warnings = candidate.validate_against(nodes).iter().map(|w| format!("{w:?}")).collect();
    let samples = samples(live, &candidate, nodes);
    report.samples = samples.len();
    // Without a policy in force, the comparison is with an empty one: every registered
    // model's answer is new.
    let empty;
    let live = match live {
        Some(p) => p,
        None => match Policy::parse("version = \"none\"") {
            Ok(p) => {
                empty = p;
                &empty
            }
            Err(_) => return report,
        },
    };
    report.differences = edgeroute_policy::diff(live, &candidate, &samples, nodes)
        .iter()
        .filter_map(|d: &Difference| {
            let s = samples.get(d.sample)?;
            Some(DifferenceJson {
                model: s.model.clone(),
                client_region: s.client_region.clone(),
                session: s.session.clone().unwrap_or_default(),
                live: (&d.live).into(),
                candidate: (&d.candidate).into(),
            })
        })
        .collect();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"
version = "p1"
[[models]]
name = "llama"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"
[[rules]]
id = "canary"
match.models = ["llama"]
versions = { v1 = 95, v2 = 5 }
"#;

    fn fleet() -> Vec<NodeFacts> {
        let mut a = NodeFacts::new("a-1", "toronto");
        a.models = vec![edgeroute_policy::Served::new("llama", "v1")];
        let mut b = NodeFacts::new("b-1", "montreal");
        b.models = vec![edgeroute_policy::Served::new("llama", "v2")];
        vec![a, b]
    }

    #[test]
    fn a_wider_canary_moves_sessions_and_a_broken_text_is_invalid() {
        let live = Policy::parse(V1).unwrap();
        let same = check(V1, Some(&live), &fleet());
        assert!(same.valid);
        assert!(same.differences.is_empty(), "the same policy changes nothing");
        assert_eq!(same.samples, 3 * SESSIONS, "one model, two regions and none");

        let wider = V1.replace("v1 = 95, v2 = 5", "v1 = 50, v2 = 50").replace("p1", "p2");
        let r = check(&wider, Some(&live), &fleet());
        assert_eq!(r.version.as_deref(), Some("p2"));
        assert_eq!(r.live_version.as_deref(), Some("p1"));
        assert!(!r.differences.is_empty());
        assert!(r.differences.iter().all(|d| d.candidate.version.as_deref() == Some("v2")));
        // A share near 45 % of the sessions moves to v2.
        let moved = r.differences.len() as f64 / r.samples as f64;
        assert!((0.25..0.65).contains(&moved), "{moved}");

        let bad = check("version = ", Some(&live), &fleet());
        assert!(!bad.valid && bad.error.unwrap().contains("line"));
    }

    #[test]
    fn without_a_live_policy_every_registered_answer_is_new() {
        let r = check(V1, None, &fleet());
        assert!(r.valid && r.live_version.is_none());
        assert_eq!(r.differences.len(), r.samples);
    }
}
