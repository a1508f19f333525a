//! `edgeroute dns`'s server against a real client: `dig` (Debian's bind9-dnsutils, installed
//! by `scripts/test.sh`) with `+subnet=` from three regions' address ranges gets each
//! region's replicas first; a region's discovery replica killed (its `/health` gone) is
//! withdrawn from `dig`'s answers within 2 s and returns only after its hold; TCP answers
//! as UDP does.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgeroute_dns::DnsConfig;

mod common;

use common::{dig, health_stub, short};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_from_each_region_gets_its_replicas_and_a_dead_region_is_withdrawn_within_2s() {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut stubs = Vec::new();
    for _ in 0..3 {
        stubs.push(health_stub(any).await);
    }
    let target = |id: &str, addr: &str, health: SocketAddr| {
        format!(
            "{{ id = \"{id}\", addr = \"{addr}\", port = 7070, health = \"http://{health}/health\" }}"
        )
    };
    let region = |name: &str, net: &str, n: u8, health: SocketAddr| {
        format!(
            "[[regions]]\nname = \"{name}\"\nclient_cidrs = [\"{net}\"]\ndiscovery = [{}]\n",
            target(&format!("disc-{name}"), &format!("127.0.{n}.1"), health)
        )
    };
    let text = format!(
        "zone = \"edge.test\"\ndefault_region = \"tor\"\n\
         [health]\ninterval_ms = 100\ntimeout_ms = 200\ndown_after = 2\nup_probes = 3\nup_after_ms = 1000\n\
         [distance.tor]\nmtl = 6\nvan = 60\n[distance.mtl]\nvan = 65\n{}{}{}",
        region("tor", "192.0.2.0/24", 1, stubs[0].0),
        region("mtl", "198.51.100.0/24", 2, stubs[1].0),
        region("van", "203.0.113.0/24", 3, stubs[2].0),
    );
    let dns = edgeroute_dns::start(DnsConfig::from_toml(&text).unwrap(), any).await.unwrap();
    let port = dns.addr.port();
    let port_blocking = move |subnet: &'static str, extra: &'static [&'static str]| {
        tokio::task::spawn_blocking(move || short(port, subnet, extra))
    };

    for (subnet, first) in [
        ("192.0.2.0/24", "127.0.1.1"),
        ("198.51.100.0/24", "127.0.2.1"),
        ("203.0.113.0/24", "127.0.3.1"),
    ] {
        let got = port_blocking(subnet, &[]).await.unwrap();
        assert_eq!(got.first().map(String::as_str), Some(first), "{subnet}: {got:?}");
        assert_eq!(got.len(), 3, "{subnet}: {got:?}");
        let tcp = port_blocking(subnet, &["+tcp"]).await.unwrap();
        assert_eq!(tcp, got, "TCP answers as UDP does");
    }
    let full = tokio::task::spawn_blocking(move || {
        dig(port, &["+subnet=198.51.100.7/32", "discovery.edge.test", "A"])
    })
    .await
    .unwrap();
    assert!(full.contains("CLIENT-SUBNET: 198.51.100.7/32/24"), "{full}");
    assert!(full.contains("flags: qr aa"), "authoritative: {full}");

    // Montreal's discovery replica dies: gone from dig's answers within 2 s.
    let mtl_health = stubs[1].0;
    stubs[1].1.abort();
    let killed = Instant::now();
    loop {
        let got = port_blocking("198.51.100.0/24", &[]).await.unwrap();
        if !got.iter().any(|a| a == "127.0.2.1") {
            assert_eq!(got.first().map(String::as_str), Some("127.0.1.1"), "next nearest: {got:?}");
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(2), "still answered after 2 s: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let withdrawn_after = killed.elapsed();
    // It comes back, but only after its hold (3 good probes over 1 s here).
    let _revived = health_stub(mtl_health).await;
    let revived = Instant::now();
    loop {
        let got = port_blocking("198.51.100.0/24", &[]).await.unwrap();
        if got.first().map(String::as_str) == Some("127.0.2.1") {
            break;
        }
        assert!(revived.elapsed() < Duration::from_secs(5), "never returned: {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back_after = revived.elapsed();
    assert!(back_after >= Duration::from_millis(1000), "back after {back_after:?}: no hold");
    eprintln!("withdrawn after {withdrawn_after:?}, back after {back_after:?}");
}
