//! CEL expressions (`--features cel`).
#![cfg(feature = "cel")]
#![allow(clippy::unwrap_used)]

use edgeroute_policy::*;

const DOC: &str = r#"
version = "1"
[[models]]
name = "m"
[[models.versions]]
id = "v1"
[[rules]]
id = "r"
constraints.expr = "node.gpu_util < 0.5 && node.region == 'fra' && class == 'interactive'"
"#;

#[test]
fn cel_expressions_filter_nodes() {
    let p = Policy::parse(DOC).unwrap();
    let mut a = NodeFacts::new("a", "fra");
    a.models.push(Served::new("m", "v1"));
    let mut b = a.clone();
    b.id = "b".into();
    b.gpu_util = 0.9;
    let mut c = a.clone();
    c.id = "c".into();
    c.region = "ams".into();
    let fleet = Fleet::new(&p, vec![a, b, c]);
    let claims = Claims::default();
    let d = p.decide(&Request::new(&claims, "m"), &fleet, &mut p.new_state(), true);
    assert_eq!(d.nodes.len(), 1);
    assert_eq!(fleet.node(d.nodes[0].node).unwrap().id, "a");
    assert_eq!(
        d.explain.unwrap().drops.iter().filter(|x| x.reason == Reason::ExprFalse).count(),
        2
    );
    assert!(
        Policy::parse(&DOC.replace("< 0.5", "<<")).is_err(),
        "a bad expression refuses the policy"
    );
}
