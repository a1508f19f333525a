//! Refusals with precise errors, warnings against a fleet, and shadow-mode differences.
#![allow(clippy::unwrap_used)]

use edgeroute_policy::*;

const BASE: &str = r#"
version = "2026-12-03.1"
[jurisdictions]
eu = ["fra"]
[[models]]
name = "m"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"
[[models]]
name = "n"
[[models.versions]]
id = "v1"
"#;

fn refused(extra: &str) -> PolicyError {
    Policy::parse(&format!("{BASE}\n{extra}")).unwrap_err()
}

fn invalid_at(e: &PolicyError) -> (Option<&str>, &str) {
    match e {
        PolicyError::Invalid { rule, field, .. } => (rule.as_deref(), field.as_str()),
        other => panic!("not Invalid: {other}"),
    }
}

#[test]
fn unknown_fields_are_refused_with_their_line() {
    let extra = "[[rules]]\nid = \"r\"\n[rules.constraints]\njurisdictons = [\"eu\"]\n";
    let text = format!("{BASE}\n{extra}");
    let e = Policy::parse(&text).unwrap_err();
    let PolicyError::Syntax { line, column, message } = &e else { panic!("{e}") };
    assert!(message.contains("jurisdictons"), "{message}");
    let expected = text.lines().position(|l| l.starts_with("jurisdictons")).unwrap() + 1;
    assert_eq!((*line, *column), (expected, 1), "{e}");
    assert!(matches!(
        refused("[[rules]]\nid = \"r\"\nstrategy = \"fastest\"\n"),
        PolicyError::Syntax { .. }
    ));
    assert!(
        matches!(Policy::parse("models = []"), Err(PolicyError::Syntax { .. })),
        "version is required"
    );
}

#[test]
fn errors_name_the_rule_and_the_field() {
    let e = refused(
        "[[rules]]\nid = \"a\"\n[[rules]]\nid = \"canary\"\nmatch.models = [\"m\"]\nversions = { v1 = 90, v3 = 10 }\n",
    );
    assert_eq!(invalid_at(&e), (Some("canary"), "rules[1].versions"));
    assert!(e.to_string().contains("rule `canary`") && e.to_string().contains("v3"), "{e}");
    let e = refused("[[rules]]\nid = \"r\"\nmatch.models = [\"nope\"]\n");
    assert_eq!(invalid_at(&e), (Some("r"), "rules[0].match.models"));
    let e = refused("[[rules]]\nid = \"r\"\ntiers = [\"edge\", \"mars\"]\n");
    assert_eq!(invalid_at(&e), (Some("r"), "rules[0].tiers"));
    let e = refused("[[rules]]\nid = \"r\"\nconstraints.jurisdictions = [\"eux\"]\n");
    assert_eq!(invalid_at(&e), (Some("r"), "rules[0].constraints.jurisdictions"));
    let e = refused("[[rules]]\nid = \"r\"\nconstraints.below = { gpu_util = -1 }\n");
    assert_eq!(invalid_at(&e), (Some("r"), "rules[0].constraints.below.gpu_util"));
    let e = refused("[[rules]]\nid = \"r\"\n[[rules]]\nid = \"r\"\n");
    assert_eq!(invalid_at(&e), (Some("r"), "rules[1].id"));
    let e = refused("[[rules]]\nid = \"r\"\nversions = { v1 = 1 }\n");
    assert_eq!(invalid_at(&e), (Some("r"), "rules[0].versions"), "a split needs one model");
    // Without the `cel` feature no engine compiles expressions: the policy is refused.
    if !cfg!(feature = "cel") {
        let e = refused("[[rules]]\nid = \"r\"\nconstraints.expr = \"node.gpu_util < 0.5\"\n");
        assert_eq!(invalid_at(&e).1, "rules[0].constraints.expr");
    }
    let e = refused(
        "[[pools]]\nname = \"c\"\ntier = \"edge\"\nendpoint = \"https://x\"\nregion = \"fra\"\nserves = {}\n",
    );
    assert_eq!(invalid_at(&e), (None, "pools[0].tier"));
}

#[test]
fn cascades_that_could_loop_are_refused() {
    // Self.
    let e = refused("[[rules]]\nid = \"r\"\nmatch.models = [\"m\"]\ncascade = [\"m\"]\n");
    assert_eq!(invalid_at(&e).0, Some("r"));
    // A catch-all rule falls back from its fallback too.
    let e = refused("[[rules]]\nid = \"any\"\ncascade = [\"n\"]\n");
    assert!(e.to_string().contains("loop"), "{e}");
    // Through two rules, however far apart.
    let e = refused(
        "[[rules]]\nid = \"a\"\nmatch.models = [\"m\"]\ncascade = [\"n\"]\n[[rules]]\nid = \"b\"\nmatch.models = [\"n\"]\ncascade = [\"m\"]\n",
    );
    assert!(e.to_string().contains("loop"), "{e}");
    // A chain is fine.
    assert!(
        Policy::parse(&format!(
            "{BASE}\n[[rules]]\nid = \"a\"\nmatch.models = [\"m\"]\ncascade = [\"n\"]\n"
        ))
        .is_ok()
    );
}

#[derive(Debug)]
struct GpuBelow(f64);
impl expr::Expression for GpuBelow {
    fn eval(&self, i: &expr::ExprInput<'_>) -> Result<bool, String> {
        Ok(i.node.gpu_util < self.0)
    }
}
struct Tiny;
impl expr::ExpressionEngine for Tiny {
    fn compile(&self, src: &str) -> Result<std::sync::Arc<dyn expr::Expression>, String> {
        let x = src.strip_prefix("gpu < ").ok_or("only `gpu < X`")?;
        Ok(std::sync::Arc::new(GpuBelow(x.parse().map_err(|_| "not a number")?)))
    }
}

#[test]
fn expressions_go_through_the_engine_trait() {
    let text = format!("{BASE}\n[[rules]]\nid = \"r\"\nconstraints.expr = \"gpu < 0.5\"\n");
    let p = Policy::parse_with(&text, &Tiny).unwrap();
    assert!(Policy::parse_with(&text.replace("gpu <", "gpu >"), &Tiny).is_err());
    let mut busy = NodeFacts::new("a", "fra");
    busy.models.push(Served::new("m", "v1"));
    busy.gpu_util = 0.9;
    let mut idle = busy.clone();
    idle.id = "b".into();
    idle.gpu_util = 0.1;
    let fleet = Fleet::new(&p, vec![busy, idle]);
    let c = Claims::default();
    let d = p.decide(&Request::new(&c, "m"), &fleet, &mut p.new_state(), true);
    assert_eq!(d.nodes.len(), 1);
    assert_eq!(fleet.node(d.nodes[0].node).unwrap().id, "b");
    let ex = d.explain.unwrap();
    assert_eq!(ex.drops.len(), 1);
    assert_eq!((ex.drops[0].filter, &ex.drops[0].reason), (Filter::Expr, &Reason::ExprFalse));
}

fn node(id: &str, region: &str, model: &str, version: &str) -> NodeFacts {
    let mut n = NodeFacts::new(id, region);
    n.models.push(Served::new(model, version));
    n
}

#[test]
fn validate_against_warns_of_dead_rules_and_unknown_models() {
    let p = Policy::parse(&format!(
        "{BASE}\n[[rules]]\nid = \"all-m\"\nmatch.models = [\"m\"]\n[[rules]]\nid = \"shadowed\"\nmatch.models = [\"m\"]\nmatch.class = \"batch\"\n[[rules]]\nid = \"n-nowhere\"\nmatch.models = [\"n\"]\n[[rules]]\nid = \"m-in-eu\"\nmatch.tenants = [\"t\"]\nmatch.models = [\"m\"]\nconstraints.jurisdictions = [\"eu\"]\n"
    ))
    .unwrap();
    let nodes = vec![
        node("nyc-1", "nyc", "m", "v1"),
        node("nyc-2", "nyc", "llama-x", "v1"),
        node("nyc-3", "nyc", "m", "v7"),
    ];
    let w = p.validate_against(&nodes);
    let has = |x: Warning| assert!(w.contains(&x), "{x:?} not in {w:?}");
    has(Warning::Shadowed { rule: "shadowed".into(), by: "all-m".into() });
    has(Warning::Shadowed { rule: "m-in-eu".into(), by: "all-m".into() });
    has(Warning::NoNodeServes { rule: "n-nowhere".into() });
    has(Warning::UnknownModel { node: "nyc-2".into(), model: "llama-x".into() });
    has(Warning::UnknownVersion { node: "nyc-3".into(), model: "m".into(), version: "v7".into() });
    has(Warning::NoJurisdiction { node: "nyc-1".into() });
    let p = Policy::parse(&format!(
        "{BASE}\n[[rules]]\nid = \"m-in-eu\"\nmatch.models = [\"m\"]\nconstraints.jurisdictions = [\"eu\"]\n"
    ))
    .unwrap();
    assert!(
        p.validate_against(&nodes)
            .contains(&Warning::ConstraintsMatchNoNode { rule: "m-in-eu".into() })
    );
}

#[test]
fn diff_lists_the_samples_decided_differently() {
    let live = Policy::parse(BASE).unwrap();
    let candidate = Policy::parse(&format!(
        "{}\n[[rules]]\nid = \"pin-v2\"\nmatch.tenants = [\"beta\"]\nmatch.models = [\"m\"]\nversions = {{ v2 = 1 }}\n",
        BASE.replace("2026-12-03.1", "2026-12-04.1")
    ))
    .unwrap();
    let nodes = vec![node("a", "fra", "m", "v1"), node("b", "fra", "m", "v2")];
    let sample = |sub: &str| Sample {
        claims: Claims { sub: sub.into(), ..Claims::default() },
        model: "m".into(),
        ..Sample::default()
    };
    let samples = vec![sample("alpha"), sample("beta"), sample("gamma")];
    assert!(diff(&live, &live, &samples, &nodes).is_empty());
    let d = diff(&live, &candidate, &samples, &nodes);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].sample, 1);
    assert_eq!(d[0].live.version.as_deref(), Some("v1"));
    assert_eq!(d[0].candidate.version.as_deref(), Some("v2"));
    assert_eq!(d[0].candidate.node.as_deref(), Some("b"));
    assert_eq!(d[0].candidate.rule.as_deref(), Some("pin-v2"));
}

#[test]
fn a_fleet_built_for_another_policy_is_refused() {
    let a = Policy::parse(BASE).unwrap();
    let b = Policy::parse(&BASE.replace("2026-12-03.1", "other")).unwrap();
    let fleet = Fleet::new(&a, vec![node("a", "fra", "m", "v1")]);
    let c = Claims::default();
    let d = b.decide(&Request::new(&c, "m"), &fleet, &mut b.new_state(), false);
    assert_eq!(d.outcome, Outcome::StaleFleet);
    assert_eq!(
        a.decide(&Request::new(&c, "x"), &fleet, &mut a.new_state(), false).outcome,
        Outcome::UnknownModel
    );
    let mut r = Request::new(&c, "m");
    r.version = Some("v9");
    assert_eq!(a.decide(&r, &fleet, &mut a.new_state(), false).outcome, Outcome::UnknownVersion);
}

#[test]
fn round_robin_state_is_the_callers() {
    let p = Policy::parse(&format!(
        "{BASE}\n[[rules]]\nid = \"rr\"\nstrategy = \"round_robin\"\nk = 1\n"
    ))
    .unwrap();
    let fleet = Fleet::new(
        &p,
        vec![node("a", "fra", "m", "v1"), node("b", "fra", "m", "v1"), node("c", "fra", "m", "v1")],
    );
    let c = Claims::default();
    let mut st = p.new_state();
    let firsts: Vec<String> = (0..4)
        .map(|_| {
            fleet
                .node(p.decide(&Request::new(&c, "m"), &fleet, &mut st, false).nodes[0].node)
                .unwrap()
                .id
                .clone()
        })
        .collect();
    assert_eq!(firsts, ["a", "b", "c", "a"]);
    // A fresh state starts over: nothing hidden.
    let d = p.decide(&Request::new(&c, "m"), &fleet, &mut p.new_state(), false);
    assert_eq!(fleet.node(d.nodes[0].node).unwrap().id, "a");
}

#[test]
fn weighted_and_least_connections() {
    let p = Policy::parse(&format!(
        "{BASE}\n[[rules]]\nid = \"w\"\nmatch.models = [\"m\"]\nstrategy = \"weighted\"\nweights = {{ a = 3, fra = 1 }}\nk = 1\n[[rules]]\nid = \"lc\"\nmatch.models = [\"n\"]\nstrategy = \"least_connections\"\n"
    ))
    .unwrap();
    let mut nodes =
        vec![node("a", "fra", "m", "v1"), node("b", "fra", "m", "v1"), node("c", "nyc", "m", "v1")];
    for (i, id) in ["x", "y", "z"].iter().enumerate() {
        let mut n = node(id, "fra", "n", "v1");
        n.in_flight = 5 - i as u32;
        nodes.push(n);
    }
    let fleet = Fleet::new(&p, nodes);
    let c = Claims::default();
    let mut st = p.new_state();
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..4000 {
        let d = p.decide(&Request::new(&c, "m"), &fleet, &mut st, false);
        *counts.entry(fleet.node(d.nodes[0].node).unwrap().id.clone()).or_insert(0) += 1;
    }
    assert!(!counts.contains_key("c"), "weight 0: {counts:?}");
    assert!((2800..3200).contains(&counts["a"]), "{counts:?}");
    let d = p.decide(&Request::new(&c, "n"), &fleet, &mut st, false);
    assert_eq!(fleet.node(d.nodes[0].node).unwrap().id, "z");
}

#[test]
fn sticky_per_tenant_keeps_a_tenants_sessions_together() {
    let p = Policy::parse(&format!(
        "{BASE}\n[[rules]]\nid = \"split\"\nmatch.models = [\"m\"]\nversions = {{ v1 = 50, v2 = 50 }}\nsticky = \"tenant\"\n"
    ))
    .unwrap();
    let fleet = Fleet::new(&p, vec![node("a", "fra", "m", "v1"), node("b", "fra", "m", "v2")]);
    let mut per_tenant = std::collections::BTreeSet::new();
    for t in 0..40 {
        let c = Claims { sub: format!("tenant-{t}"), ..Claims::default() };
        let versions: std::collections::BTreeSet<_> = (0..20)
            .map(|s| {
                let s = format!("s{s}");
                let mut r = Request::new(&c, "m");
                r.session = Some(&s);
                p.decide(&r, &fleet, &mut p.new_state(), false).version.unwrap()
            })
            .collect();
        assert_eq!(versions.len(), 1, "tenant-{t}: {versions:?}");
        per_tenant.extend(versions);
    }
    assert_eq!(per_tenant.len(), 2, "40 tenants on a 50/50 split land on both versions");
}

#[test]
fn names_that_travel_in_the_header_cannot_forge_it() {
    let e = Policy::parse(&BASE.replace("2026-12-03.1", "1;rule=x")).unwrap_err();
    assert_eq!(invalid_at(&e), (None, "version"));
    let e = refused("[[rules]]\nid = \"a;tier=edge\"\n");
    assert_eq!(invalid_at(&e).1, "rules[0].id");
    let e = refused(
        "[[pools]]\nname = \"c;ver=v9\"\ntier = \"cloud\"\nendpoint = \"https://x\"\nregion = \"fra\"\nserves = {}\n",
    );
    assert_eq!(invalid_at(&e), (None, "pools[0].name"));
    let e = Policy::parse(&BASE.replace("id = \"v2\"", "id = \"v2 \"")).unwrap_err();
    assert_eq!(invalid_at(&e), (None, "models[0].versions"));
}
