//! Data residency enforced where the request lands: a node refuses a tenant whose token's
//! residency claims exclude its jurisdiction or region, from the token alone (no central
//! call), whatever route the client took to reach it.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use edgeroute_node::config::NodeConfig;
use edgeroute_test_util::node::mint_hs256_resident;
use edgeroute_test_util::{TestNode, post_json};

const CHAT: &str = r#"{"model":"sim-llama","messages":[{"role":"user","content":"hi"}]}"#;

async fn node(id: &str, region: &str, jurisdiction: Option<&str>) -> TestNode {
    let mut cfg = NodeConfig::new(id, region);
    cfg.node.jurisdiction = jurisdiction.map(str::to_owned);
    TestNode::start_config(cfg, None).await
}

async fn chat(n: &TestNode, token: &str) -> edgeroute_test_util::Reply {
    post_json(n.addr, "/v1/chat/completions", Some(token), &[], CHAT).await
}

#[tokio::test]
async fn an_eu_tenants_token_is_refused_by_a_node_outside_the_eu() {
    let fra = node("fra-1", "frankfurt", Some("eu")).await;
    let tor = node("tor-1", "toronto", Some("ca")).await;
    let undeclared = node("x-1", "somewhere", None).await;
    let eu = mint_hs256_resident("acme-eu", Some(&["eu"]), None);

    let r = chat(&fra, &eu).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let r = chat(&tor, &eu).await;
    assert_eq!(r.status, 403);
    let e = r.json();
    assert_eq!(e["error"]["code"], "residency_violation", "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("tor-1"));
    let metrics = edgeroute_test_util::get(tor.addr, "/metrics", None).await;
    assert!(
        String::from_utf8_lossy(&metrics.body).contains("reason=\"residency\""),
        "refusals are counted by reason"
    );

    // A node that does not say its jurisdiction fails closed for a confined tenant, and
    // serves an unconfined one.
    assert_eq!(chat(&undeclared, &eu).await.status, 403);
    assert_eq!(chat(&undeclared, &undeclared.token()).await.status, 200);
    assert_eq!(chat(&tor, &tor.token()).await.status, 200);
}

#[tokio::test]
async fn region_claims_narrow_within_a_jurisdiction() {
    let fra = node("fra-1", "frankfurt", Some("eu")).await;
    let ams = node("ams-1", "amsterdam", Some("eu")).await;
    let only_fra = mint_hs256_resident("acme-de", Some(&["eu"]), Some(&["frankfurt"]));
    assert_eq!(chat(&fra, &only_fra).await.status, 200);
    assert_eq!(chat(&ams, &only_fra).await.status, 403);
    // Every inference route says so, not only chat: this node is not for this tenant.
    let models = edgeroute_test_util::get(ams.addr, "/v1/models", Some(&only_fra)).await;
    assert_eq!(models.status, 403);
}
