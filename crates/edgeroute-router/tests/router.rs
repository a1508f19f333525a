//! The regional router in sync mode, over real simulator nodes and a discovery replica on
//! loopback: the tenant's own token carries every request (the router has none), the callers
//! who may not are refused, a tenant over its rate is told when to come back, and a spike is
//! buffered in the tenant's bounded queue rather than shed — until the queue is full or the
//! wait too long, each refused with what happened and a `Retry-After`.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgeroute_auth::Scope;
use edgeroute_router::{RouterConfig, RouterService};
use edgeroute_test_util::node::{mint_hs256, mint_hs256_fleet};
use edgeroute_test_util::{get, post_json, spawn_router, stream};

mod common;

struct Lab {
    _fleet: common::Fleet,
    _router: edgeroute_test_util::ServerGuard,
    addr: SocketAddr,
}

/// Two simulator nodes at `tokens_per_s`, discovery over them, and a router with `limits`
/// (TOML lines of `[limits]`).
async fn lab(tag: &str, tokens_per_s: f64, limits: &str) -> Lab {
    let fleet = common::Fleet::start(tag, tokens_per_s, (100, 80)).await;
    let text = fleet.router_config("router-tor", &format!("[limits]\n{limits}"));
    let router = RouterService::build(RouterConfig::from_toml(&text).unwrap()).unwrap();
    let server = spawn_router(router.routes()).await;
    let addr = server.addr;
    Lab { _fleet: fleet, _router: server, addr }
}

fn chat(max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": "sim-llama", "max_tokens": max_tokens, "stream": stream,
        "messages": [{"role": "user", "content": "hello"}]
    })
    .to_string()
}

fn tenant(name: &str) -> String {
    mint_hs256(name, &[Scope::Inference], 600)
}

#[tokio::test]
async fn a_tenant_is_served_with_its_own_token_and_the_callers_who_may_not_are_refused() {
    let lab = lab("serve", 2000.0, "").await;
    let acme = tenant("acme");
    let r = post_json(lab.addr, "/v1/chat/completions", Some(&acme), &[], chat(4, false)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(!r.json()["choices"][0]["message"]["content"].as_str().unwrap().is_empty());
    // The nodes require a token and the router has none: the tenant's own reached them.
    assert!(["tor-1", "mtl-1"].contains(&r.header("x-edgeroute-node").unwrap()));
    assert_eq!(r.header("x-edgeroute-router"), Some("router-tor"));
    assert_eq!(r.header("x-edgeroute-tier"), Some("edge"), "no policy: the edge served");
    let s = stream(lab.addr, Some(&acme), &[], chat(8, true)).await;
    assert_eq!(s.status, 200);
    assert!(s.done() && !s.text().is_empty(), "a whole stream, [DONE] included");
    assert_eq!(s.headers.get("x-edgeroute-tier").map(|v| v.to_str().unwrap()), Some("edge"));

    // No token, a bad one, a token without the inference scope.
    let none = post_json(lab.addr, "/v1/chat/completions", None, &[], chat(4, false)).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let forged =
        post_json(lab.addr, "/v1/chat/completions", Some("x.y.z"), &[], chat(4, false)).await;
    assert_eq!(forged.status, 401);
    let admin = mint_hs256_fleet("operator", &[Scope::Admin], 600);
    let r = post_json(lab.addr, "/v1/chat/completions", Some(&admin), &[], chat(4, false)).await;
    assert_eq!(r.status, 403, "an admin token is not a tenant's");
    // /metrics: admin only; /health: anyone, and it names no tenant.
    assert_eq!(get(lab.addr, "/metrics", Some(&acme)).await.status, 403);
    assert_eq!(get(lab.addr, "/metrics", None).await.status, 401);
    let m = get(lab.addr, "/metrics", Some(&admin)).await;
    assert_eq!(m.status, 200);
    assert!(String::from_utf8_lossy(&m.body).contains("edgeroute_router_requests_total 5"));
    let h = get(lab.addr, "/health", None).await;
    assert_eq!((h.status.as_u16(), h.json()["router"].as_str()), (200, Some("router-tor")));
    assert!(!String::from_utf8_lossy(&h.body).contains("acme"));
    // A bad priority is the caller's error.
    let r = post_json(
        lab.addr,
        "/v1/chat/completions",
        Some(&acme),
        &[("x-edgeroute-priority", "urgent")],
        chat(4, false),
    )
    .await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (400, "invalid_header"));
}

#[tokio::test]
async fn a_tenant_over_its_rate_is_told_when_to_come_back_and_others_are_not_affected() {
    let lab = lab("rate", 2000.0, "rate_limit_per_s = 1\nrate_limit_burst = 2").await;
    let acme = tenant("acme");
    for _ in 0..2 {
        let r = post_json(lab.addr, "/v1/chat/completions", Some(&acme), &[], chat(2, false)).await;
        assert_eq!(r.status, 200);
    }
    let r = post_json(lab.addr, "/v1/chat/completions", Some(&acme), &[], chat(2, false)).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (429, "rate_limit_exceeded"));
    assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().unwrap() >= 1));
    let other =
        post_json(lab.addr, "/v1/chat/completions", Some(&tenant("beta")), &[], chat(2, false))
            .await;
    assert_eq!(other.status, 200, "the limit is per tenant");
}

#[tokio::test]
async fn a_spike_waits_in_the_tenants_queue_and_past_its_bounds_is_told_why() {
    // 64 tokens at 40 tokens/s: a long answer holds its place for about 1.6 s.
    let limits = "tenant_in_flight = 1\ntenant_queue = 1\nqueue_timeout_ms = 3000";
    let lab = lab("spike", 40.0, limits).await;
    let acme = tenant("acme");
    let addr = lab.addr;
    let long = {
        let t = acme.clone();
        tokio::spawn(async move { stream(addr, Some(&t), &[], chat(64, true)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The second waits for the first to end, then runs: buffered, not shed.
    let t0 = Instant::now();
    let waiter = {
        let t = acme.clone();
        tokio::spawn(async move {
            post_json(addr, "/v1/chat/completions", Some(&t), &[], chat(2, false)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The third finds the queue full.
    let r = post_json(addr, "/v1/chat/completions", Some(&acme), &[], chat(2, false)).await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (429, "tenant_queue_full"));
    assert!(r.header("retry-after").is_some());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("waiting"));
    // Another tenant is not held behind acme.
    let beta =
        post_json(addr, "/v1/chat/completions", Some(&tenant("beta")), &[], chat(2, false)).await;
    assert_eq!(beta.status, 200);
    let w = waiter.await.unwrap();
    assert_eq!(w.status, 200, "{}", String::from_utf8_lossy(&w.body));
    assert!(t0.elapsed() > Duration::from_millis(500), "it waited for the long answer");
    assert!(long.await.unwrap().done());
    let admin = mint_hs256_fleet("operator", &[Scope::Admin], 600);
    let m = String::from_utf8_lossy(&get(addr, "/metrics", Some(&admin)).await.body).into_owned();
    assert!(m.contains("edgeroute_router_waited_total 1"), "{m}");
    assert!(m.contains("edgeroute_router_in_flight 0"), "every place given back: {m}");
}

#[tokio::test]
async fn a_wait_past_the_deadline_is_a_503_with_retry_after() {
    let limits = "tenant_in_flight = 1\ntenant_queue = 4\nqueue_timeout_ms = 300";
    let lab = lab("timeout", 40.0, limits).await;
    let acme = tenant("acme");
    let addr = lab.addr;
    let long = {
        let t = acme.clone();
        tokio::spawn(async move { stream(addr, Some(&t), &[], chat(64, true)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = post_json(
        addr,
        "/v1/chat/completions",
        Some(&acme),
        &[("x-edgeroute-priority", "batch")],
        chat(2, false),
    )
    .await;
    assert_eq!((r.status.as_u16(), r.error_code().as_str()), (503, "router_busy"));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("batch"));
    assert!(long.await.unwrap().done());
}
