//! The issue's sentences, each as a policy and a fleet.
#![allow(clippy::unwrap_used)]

use edgeroute_policy::*;

fn node(id: &str, region: &str, model: &str, version: &str) -> NodeFacts {
    let mut n = NodeFacts::new(id, region);
    n.models.push(Served::new(model, version));
    n.ttft_p50_ms = 20.0;
    n.ttft_p99_ms = 40.0;
    n.capacity = 8;
    n
}

const REGISTRY: &str = r#"
[jurisdictions]
eu = ["fra", "ams"]
us = ["nyc", "sfo"]

[[models]]
name = "llama-3.1-8b"
default_version = "v1"
[[models.versions]]
id = "v1"
revision = "8c22764a7e3675c50d4c7c9a4edb474456022b16"
quant = "q4"
hardware = ["gpu"]
[[models.versions]]
id = "v2"

[[models]]
name = "llama-3.1-nemotron-8b"
[[models.versions]]
id = "v1"
"#;

fn policy(rest: &str) -> Policy {
    let text = format!("version = \"2026-12-03.1\"\n{REGISTRY}\n{rest}");
    Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn claims(sub: &str) -> Claims {
    Claims { sub: sub.into(), ..Claims::default() }
}

/// "EU tenants never leave EU regions, whatever their client sends".
#[test]
fn eu_tenants_never_leave_eu_regions() {
    let p = policy(
        r#"
[[tenants]]
sub = "acme-eu"
jurisdictions = ["eu"]
"#,
    );
    let fleet = Fleet::new(
        &p,
        vec![
            node("nyc-1", "nyc", "llama-3.1-8b", "v1"),
            node("fra-1", "fra", "llama-3.1-8b", "v1"),
            node("ams-1", "ams", "llama-3.1-8b", "v1"),
        ],
    );
    let c = claims("acme-eu");
    let asked = vec!["nyc".to_owned()];
    let mut req = Request::new(&c, "llama-3.1-8b");
    req.client_region = Some("nyc");
    let d = p.decide(&req, &fleet, &mut p.new_state(), true);
    assert_eq!(d.outcome, Outcome::Routed);
    let ids: Vec<&str> = d.nodes.iter().map(|x| fleet.node(x.node).unwrap().id.as_str()).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| *id != "nyc-1"), "{ids:?}");
    let ex = d.explain.unwrap();
    assert!(
        ex.drops.iter().any(|x| x.filter == Filter::Residency && x.reason == Reason::Residency)
    );
    // The client asking for a US region gets nothing rather than a US node.
    req.regions = &asked;
    let d = p.decide(&req, &fleet, &mut p.new_state(), false);
    assert_eq!(d.outcome, Outcome::NoEligible);
    assert!(d.nodes.is_empty());
    // The token's own claim is enough, without a policy entry.
    let t =
        Claims { sub: "other".into(), jurisdictions: Some(vec!["eu".into()]), ..Claims::default() };
    let d = p.decide(&Request::new(&t, "llama-3.1-8b"), &fleet, &mut p.new_state(), false);
    assert_eq!(d.nodes.len(), 2);
    assert!(p.residency_allows(&c, "fra", None));
    assert!(!p.residency_allows(&c, "nyc", None));
}

/// "95 % of llama-3.1-8b traffic on v1, 5 % on v2".
#[test]
fn canary_95_5() {
    let p = policy(
        r#"
[[rules]]
id = "llama-canary"
match.models = ["llama-3.1-8b"]
versions = { v1 = 95, v2 = 5 }
"#,
    );
    let fleet = Fleet::new(
        &p,
        vec![
            node("fra-1", "fra", "llama-3.1-8b", "v1"),
            node("fra-2", "fra", "llama-3.1-8b", "v2"),
        ],
    );
    let c = claims("t");
    let mut v2 = 0;
    for i in 0..10_000 {
        let s = format!("session-{i}");
        let mut req = Request::new(&c, "llama-3.1-8b");
        req.session = Some(&s);
        let d = p.decide(&req, &fleet, &mut p.new_state(), false);
        assert_eq!(d.rule.as_deref(), Some("llama-canary"));
        let ver = d.version.unwrap();
        let served_by = &fleet.node(d.nodes[0].node).unwrap().id;
        assert_eq!(served_by, if &*ver == "v1" { "fra-1" } else { "fra-2" });
        if &*ver == "v2" {
            v2 += 1;
        }
    }
    assert!((300..=700).contains(&v2), "v2 share {v2}/10000");
    // The header names the version served.
    let s = "session-1".to_owned();
    let mut req = Request::new(&c, "llama-3.1-8b");
    req.session = Some(&s);
    let d = p.decide(&req, &fleet, &mut p.new_state(), false);
    assert_eq!(
        d.header(),
        format!("v=2026-12-03.1;rule=llama-canary;tier=edge;ver={}", d.version.unwrap())
    );
    // A pinned version is served as asked.
    req.version = Some("v2");
    let d = p.decide(&req, &fleet, &mut p.new_state(), false);
    assert_eq!(d.version.as_deref(), Some("v2"));
}

/// "if no edge node has TTFT p99 < 50 ms and GPU < 80 %, use the regional cloud pool".
#[test]
fn slow_edge_falls_back_to_the_regional_cloud_pool() {
    let p = policy(
        r#"
[[pools]]
name = "eu-cloud"
tier = "cloud"
endpoint = "https://eu.cloud.example/v1"
region = "fra"
serves = { "llama-3.1-8b" = "v1" }
price_in_per_1k = 0.5
price_out_per_1k = 1.5

[[rules]]
id = "edge-then-cloud"
match.models = ["llama-3.1-8b"]
tiers = ["edge", "eu-cloud"]
constraints.below = { ttft_p99_ms = 50, gpu_util = 0.8 }
"#,
    );
    let mut slow = node("fra-1", "fra", "llama-3.1-8b", "v1");
    slow.ttft_p99_ms = 60.0;
    let mut hot = node("fra-2", "fra", "llama-3.1-8b", "v1");
    hot.gpu_util = 0.85;
    let c = claims("t");
    let req = Request::new(&c, "llama-3.1-8b");
    let fleet = Fleet::new(&p, vec![slow.clone(), hot.clone()]);
    let d = p.decide(&req, &fleet, &mut p.new_state(), true);
    assert_eq!(d.outcome, Outcome::Routed);
    assert_eq!(d.tier.as_deref(), Some("eu-cloud"));
    assert_eq!(d.pool.as_ref().unwrap().endpoint, "https://eu.cloud.example/v1");
    assert!(d.nodes.is_empty());
    let ex = d.explain.unwrap();
    assert_eq!(ex.attempts.len(), 2);
    assert!(
        ex.drops
            .iter()
            .any(|x| matches!(x.reason, Reason::NotBelow { figure: Figure::TtftP99Ms, .. }))
    );
    assert!(
        ex.drops
            .iter()
            .any(|x| matches!(x.reason, Reason::NotBelow { figure: Figure::GpuUtil, .. }))
    );
    // One good edge node and the edge serves.
    let mut good = node("fra-3", "fra", "llama-3.1-8b", "v1");
    good.gpu_util = 0.5;
    let fleet = Fleet::new(&p, vec![slow, hot, good]);
    let d = p.decide(&req, &fleet, &mut p.new_state(), false);
    assert_eq!(d.tier.as_deref(), Some("edge"));
    assert_eq!(fleet.node(d.nodes[0].node).unwrap().id, "fra-3");
    assert!(d.header().ends_with(";tier=edge;ver=v1"));
}

/// "if the Nemotron variant is down, answer with the general Llama".
#[test]
fn nemotron_down_cascades_to_llama() {
    let p = policy(
        r#"
[[rules]]
id = "nemotron"
match.models = ["llama-3.1-nemotron-8b"]
cascade = ["llama-3.1-8b"]
"#,
    );
    let mut down = node("fra-1", "fra", "llama-3.1-nemotron-8b", "v1");
    down.available = false;
    let fleet = Fleet::new(&p, vec![down, node("fra-2", "fra", "llama-3.1-8b", "v1")]);
    let c = claims("t");
    let d = p.decide(&Request::new(&c, "llama-3.1-nemotron-8b"), &fleet, &mut p.new_state(), true);
    assert_eq!(d.outcome, Outcome::Routed);
    assert_eq!(d.model.as_deref(), Some("llama-3.1-8b"));
    assert_eq!(d.cascade_step, 1);
    assert_eq!(d.rule.as_deref(), Some("nemotron"));
    assert_eq!(fleet.node(d.nodes[0].node).unwrap().id, "fra-2");
    assert!(d.header().ends_with(";step=1"));
    let ex = d.explain.unwrap();
    assert!(ex.drops.iter().any(|x| x.filter == Filter::Health));
    // A cascade back to nemotron would loop: refused.
    let text = format!(
        "version = \"x\"\n{REGISTRY}\n[[rules]]\nid = \"a\"\nmatch.models = [\"llama-3.1-nemotron-8b\"]\ncascade = [\"llama-3.1-8b\"]\n[[rules]]\nid = \"b\"\nmatch.models = [\"llama-3.1-8b\"]\ncascade = [\"llama-3.1-nemotron-8b\"]\n"
    );
    let e = Policy::parse(&text).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
}

/// "batch tenants take the cheapest node under $0.20 per 1k tokens".
#[test]
fn batch_takes_the_cheapest_node_under_the_ceiling() {
    let p = policy(
        r#"
[[rules]]
id = "batch-cheap"
match.class = "batch"
strategy = "cost_optimized"
constraints.below = { price_per_1k = 0.20 }
"#,
    );
    let priced = |id: &str, price: f64, p50: f64| {
        let mut n = node(id, "fra", "llama-3.1-8b", "v1");
        n.price = Some(Price { input_per_1k: price, output_per_1k: price });
        n.ttft_p50_ms = p50;
        n
    };
    let fleet = Fleet::new(
        &p,
        vec![priced("dear", 0.30, 5.0), priced("cheap", 0.10, 90.0), priced("mid", 0.15, 10.0), {
            let mut n = node("unpriced", "fra", "llama-3.1-8b", "v1");
            n.price = None;
            n
        }],
    );
    let c = claims("t");
    let mut req = Request::new(&c, "llama-3.1-8b");
    req.class = Class::Batch;
    req.streamed = false;
    let d = p.decide(&req, &fleet, &mut p.new_state(), true);
    let ids: Vec<&str> = d.nodes.iter().map(|x| fleet.node(x.node).unwrap().id.as_str()).collect();
    assert_eq!(ids, ["cheap", "mid"]);
    let ex = d.explain.unwrap();
    assert!(
        ex.drops
            .iter()
            .any(|x| matches!(x.reason, Reason::NotBelow { figure: Figure::PricePer1k, .. }))
    );
    assert!(ex.drops.iter().any(|x| x.reason == Reason::Unknown(Figure::PricePer1k)));
    // Interactive traffic is not that rule's: latency first, every node.
    req.class = Class::Interactive;
    let d = p.decide(&req, &fleet, &mut p.new_state(), false);
    assert_eq!(d.rule, None);
    assert_eq!(fleet.node(d.nodes[0].node).unwrap().id, "dear");
}

/// The node's load API: placement constraints of the registry.
#[test]
fn placement_is_checked_per_version() {
    let p = policy("");
    assert_eq!(p.check_placement("llama-3.1-8b", "v1", "fra", None, Hardware::Gpu), Ok(()));
    assert_eq!(
        p.check_placement("llama-3.1-8b", "v1", "fra", None, Hardware::Cpu),
        Err(PlacementError::Hardware { model: "llama-3.1-8b".into(), hardware: Hardware::Cpu })
    );
    assert!(p.check_placement("llama-3.1-8b", "v2", "fra", None, Hardware::Cpu).is_ok());
    assert!(matches!(
        p.check_placement("llama-3.1-8b", "v9", "fra", None, Hardware::Gpu),
        Err(PlacementError::UnknownVersion { .. })
    ));
    let eu_only = Policy::parse(
        "version = \"1\"\n[jurisdictions]\neu = [\"fra\"]\n[[models]]\nname = \"m\"\njurisdictions = [\"eu\"]\n[[models.versions]]\nid = \"v1\"\n",
    )
    .unwrap();
    assert!(eu_only.check_placement("m", "v1", "fra", None, Hardware::Cpu).is_ok());
    assert!(matches!(
        eu_only.check_placement("m", "v1", "nyc", None, Hardware::Cpu),
        Err(PlacementError::Jurisdiction { .. })
    ));
}
