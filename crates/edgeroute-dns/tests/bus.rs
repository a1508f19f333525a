//! The topology bus as an input (a real `nats-server` on a free port): a region whose nodes
//! the bus shows, none serving, ranks after the regions that serve — seen through `dig` —
//! and comes back first when a model is ready there again; a dead bus demotes nothing.
#![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use edgeroute_bus::{Bus, BusConfig, NodeIdentity, Publisher, PublisherOptions, system_clock};
use edgeroute_dns::DnsConfig;
use edgeroute_proto::topology::EventKind;
use edgeroute_test_util::nats::NatsServer;

mod common;

use common::{health_stub, short};

fn node(bus: &Bus, id: &str, region: &str) -> Publisher {
    let identity = NodeIdentity {
        node_id: id.into(),
        region: region.into(),
        url: format!("http://{id}.test"),
        epoch: 1_700_000_000_000,
    };
    let options = PublisherOptions::from_config(bus.config());
    Publisher::spawn(bus.clone(), identity, options, system_clock()).unwrap()
}

fn ready(p: &Publisher) {
    p.publish(EventKind::ModelReady { model: "m".into(), gpu: None, version: None });
}

/// Polls `dig` from tor's subnet until the first answer is `first` (within 5 s).
async fn first_becomes(port: u16, first: &str, why: &str) -> Duration {
    let t = Instant::now();
    loop {
        let got =
            tokio::task::spawn_blocking(move || short(port, "192.0.2.0/24", &[])).await.unwrap();
        if got.first().map(String::as_str) == Some(first) {
            return t.elapsed();
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{why}: still {got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_with_no_serving_node_on_the_bus_is_demoted_never_withdrawn() {
    let mut nats = NatsServer::start();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (health, _stub) = health_stub(any).await;
    let mut text = String::from(
        "zone = \"edge.test\"\ndefault_region = \"tor\"\n\
         [health]\ninterval_ms = 100\ntimeout_ms = 200\n\
         [distance.tor]\nmtl = 6\nvan = 60\n[distance.mtl]\nvan = 65\n",
    );
    for (name, net, n) in
        [("tor", "192.0.2.0/24", 1), ("mtl", "198.51.100.0/24", 2), ("van", "203.0.113.0/24", 3)]
    {
        text.push_str(&format!(
            "[[regions]]\nname = \"{name}\"\nclient_cidrs = [\"{net}\"]\n\
             discovery = [{{ id = \"disc-{name}\", addr = \"127.0.{n}.1\", port = 7070, health = \"http://{health}/health\" }}]\n"
        ));
    }
    let mut cfg = DnsConfig::from_toml(&text).unwrap();
    let mut bus_cfg = BusConfig::nats(nats.url());
    bus_cfg.expire_ms = 60_000; // no heartbeats in this test: nodes must not expire
    cfg.bus = Some(bus_cfg.clone());
    let dns = edgeroute_dns::start(cfg, any).await.unwrap();
    let port = dns.addr.port();
    first_becomes(port, "127.0.1.1", "tor is nearest").await;

    // tor's node is loading (nothing ready), mtl's serves: tor's clients go to mtl first, and
    // tor is still in the answer.
    let bus = Bus::connect(&bus_cfg).await.unwrap();
    let tor = node(&bus, "tor-node", "tor");
    tor.publish(EventKind::ModelLoading { model: "m".into(), gpu: None, version: None });
    let mtl = node(&bus, "mtl-node", "mtl");
    ready(&mtl);
    let took = first_becomes(port, "127.0.2.1", "tor not demoted").await;
    let got = tokio::task::spawn_blocking(move || short(port, "192.0.2.0/24", &[])).await.unwrap();
    assert!(got.iter().any(|a| a == "127.0.1.1"), "demoted, never withdrawn: {got:?}");
    // A model ready in tor: tor first again.
    ready(&tor);
    first_becomes(port, "127.0.1.1", "tor still demoted").await;

    // tor demoted again, then the bus dies: nothing is demoted on a dead bus's word.
    tor.publish(EventKind::ModelUnloaded { model: "m".into(), gpu: None });
    first_becomes(port, "127.0.2.1", "tor not demoted (2)").await;
    nats.stop();
    first_becomes(port, "127.0.1.1", "a dead bus still demotes").await;
    eprintln!("demoted {took:?} after the bus said so");
}
