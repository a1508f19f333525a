//! Every TOML block of docs/policy.md is a valid policy.
#![allow(clippy::unwrap_used)]

#[test]
fn every_example_in_the_docs_parses() {
    let doc = include_str!("../../../docs/policy.md");
    let blocks: Vec<&str> =
        doc.split("```toml\n").skip(1).map(|b| b.split("```").next().unwrap()).collect();
    assert!(blocks.len() >= 6, "{}", blocks.len());
    for b in blocks {
        if let Err(e) = edgeroute_policy::Policy::parse(b) {
            panic!("{e}\n{b}");
        }
    }
}
