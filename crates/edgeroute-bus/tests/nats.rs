//! The NATS bus against a real `nats-server` each test starts on a free loopback port
//! (`apt-get install nats-server`). Real time here, so every wait is bounded by a deadline.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{NatsServer, drive_until, flushed, nats_config, next};
use edgeroute_bus::{
    Bus, BusConfig, FleetUpdate, NodeIdentity, Publisher, PublisherOptions, Subscription,
    Transport, system_clock,
};
use edgeroute_proto::topology::{EventKind, NodeSnapshot, TopologyEvent};
use tokio::time::Instant;

const WITHIN: Duration = Duration::from_secs(10);

fn identity(node: &str) -> NodeIdentity {
    NodeIdentity {
        node_id: node.into(),
        region: "us_east".into(),
        url: format!("http://{node}.test"),
        epoch: 1_700_000_000_000,
    }
}

fn spawn(bus: &Bus, node: &str) -> Publisher {
    let options = PublisherOptions::from_config(bus.config());
    Publisher::spawn(bus.clone(), identity(node), options, system_clock()).unwrap()
}

fn ready(model: &str) -> EventKind {
    EventKind::ModelReady { model: model.into(), gpu: Some("gpu0".into()), version: None }
}

fn raw_client(bus: &Bus) -> async_nats::Client {
    match bus.transport() {
        Transport::Nats(nats) => nats.client().clone(),
        Transport::InProcess(_) => unreachable!("a NATS bus"),
    }
}

/// Polls until the subscription has read the store once.
async fn synced(sub: &mut Subscription) {
    let deadline = Instant::now() + WITHIN;
    while !sub.is_synced() {
        assert!(Instant::now() < deadline, "never synced: {:?}", sub.view().counters());
        let _ = tokio::time::timeout(Duration::from_millis(20), futures_util::StreamExt::next(sub))
            .await;
    }
}

#[tokio::test]
async fn a_subscriber_started_after_the_events_gets_the_snapshot() {
    let server = NatsServer::start().await;
    let cfg = nats_config(&server.url());
    let node_bus = Bus::connect(&cfg).await.unwrap();
    let p = spawn(&node_bus, "n1");
    p.publish(EventKind::ModelLoading { model: "llama".into(), gpu: None, version: None });
    p.publish(ready("llama"));
    flushed(&p, WITHIN).await;

    let discovery_bus = Bus::connect(&cfg).await.unwrap();
    let mut sub = discovery_bus.subscribe().await.unwrap();
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Snapshot(p.snapshot()));
    assert!(sub.is_synced());
    let ev = p.publish(EventKind::ModelUnloaded { model: "llama".into(), gpu: None });
    let updates = drive_until(&mut sub, WITHIN, "the unload", |v| {
        v.node("n1").is_some_and(|n| n.seq >= ev.seq)
    })
    .await;
    assert!(updates.contains(&FleetUpdate::Event(ev)), "{updates:?}");
    assert_eq!(sub.view().node("n1"), Some(&p.snapshot()));
    assert_eq!(sub.view().counters().gaps, 0);
}

#[tokio::test]
async fn a_nats_restart_mid_stream_ends_in_the_right_state() {
    let mut server = NatsServer::start().await;
    // Short liveness timings, so the outage below outlasts the expiry timeout.
    let cfg = BusConfig { heartbeat_ms: 200, expire_ms: 1_000, ..nats_config(&server.url()) };
    let node_cfg = BusConfig { max_buffered_events: 4, ..cfg.clone() };
    let node_bus = Bus::connect(&node_cfg).await.unwrap();
    let p = spawn(&node_bus, "n1");
    p.publish(ready("a"));
    let discovery_bus = Bus::connect(&cfg).await.unwrap();
    let mut sub = discovery_bus.subscribe().await.unwrap();
    drive_until(&mut sub, WITHIN, "model a", |v| {
        v.node("n1").is_some_and(|n| n.ready_models().count() == 1)
    })
    .await;

    server.kill();
    let deadline = Instant::now() + WITHIN;
    while node_bus.is_connected() {
        assert!(Instant::now() < deadline, "the client never noticed the server died");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The node keeps going: publishing never waits for the bus.
    let started = Instant::now();
    for i in 0..10 {
        p.publish(ready(&format!("m{i}")));
    }
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "publish blocked: {:?}",
        started.elapsed()
    );
    // 1.5 s down, longer than expire_ms: the subscriber must not blame the node for the
    // silence of its own connection.
    let mut during = collect_for(&mut sub, Duration::from_millis(1_500)).await;
    let down = p.stats();
    assert!(down.dropped >= 6, "10 events into a 4-event buffer: {down:?}");
    assert!(down.failures >= 1, "{down:?}");

    server.spawn().await;
    during.extend(
        drive_until(&mut sub, WITHIN, "the state after the restart", |v| {
            v.node("n1") == Some(&p.snapshot())
        })
        .await,
    );
    during.extend(collect_for(&mut sub, Duration::from_millis(300)).await);
    assert!(!during.iter().any(|u| matches!(u, FleetUpdate::Expired(_))), "{during:?}");
    assert_eq!(sub.view().node("n1").unwrap().ready_models().count(), 11);
    let c = sub.view().counters();
    assert!(c.resyncs >= 1, "the subscriber repaired from the store: {c:?}");
    let deadline = Instant::now() + WITHIN;
    while p.stats().reconnects == 0 {
        assert!(Instant::now() < deadline, "no republish: {:?}", p.stats());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Everything the subscription yields during `period`.
async fn collect_for(sub: &mut Subscription, period: Duration) -> Vec<FleetUpdate> {
    let until = Instant::now() + period;
    let mut seen = Vec::new();
    while let Ok(Some(update)) =
        tokio::time::timeout_at(until, futures_util::StreamExt::next(sub)).await
    {
        seen.push(update);
    }
    seen
}

#[tokio::test]
async fn a_skipped_sequence_resyncs_from_the_kv_store() {
    let server = NatsServer::start().await;
    let cfg = nats_config(&server.url());
    let node_bus = Bus::connect(&cfg).await.unwrap();
    let discovery_bus = Bus::connect(&cfg).await.unwrap();
    let mut sub = discovery_bus.subscribe().await.unwrap();
    synced(&mut sub).await;

    // A hand-driven node, so the test decides what the subject carries.
    let mut snap = NodeSnapshot::new("n1", "us_east", "http://n1.test", 5);
    let event = |seq: u64, kind: EventKind, snap: &mut NodeSnapshot| {
        let ev = TopologyEvent {
            node_id: "n1".into(),
            region: "us_east".into(),
            epoch: 5,
            seq,
            at_ms: 0,
            kind,
        };
        snap.apply(&ev);
        ev
    };
    let e1 = event(1, EventKind::NodeUp { url: "http://n1.test".into() }, &mut snap);
    node_bus.publish(&e1, &snap).await.unwrap();
    // A node enters the view by its stored snapshot, fetched when its first event arrives.
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Snapshot(snap.clone()));

    // Events 2 and 3 reach the store but not the subject; event 3 is injected raw.
    let _e2 = event(2, ready("a"), &mut snap);
    let e3 = event(
        3,
        EventKind::ModelLoading { model: "b".into(), gpu: None, version: None },
        &mut snap,
    );
    node_bus.publish_batch(&[], &snap).await.unwrap();
    let client = raw_client(&node_bus);
    client
        .publish("edgeroute.topology.us_east.n1", serde_json::to_vec(&e3).unwrap().into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Snapshot(snap.clone()));
    let c = sub.view().counters();
    assert_eq!((c.gaps, c.resyncs), (1, 1), "{c:?}");
    let e4 = event(4, ready("b"), &mut snap);
    node_bus.publish(&e4, &snap).await.unwrap();
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Event(e4));
    assert_eq!(sub.view().node("n1"), Some(&snap));
}

#[tokio::test]
async fn malformed_and_oversized_messages_are_counted_and_ignored() {
    let server = NatsServer::start().await;
    let cfg = nats_config(&server.url());
    let node_bus = Bus::connect(&cfg).await.unwrap();
    let p = spawn(&node_bus, "n1");
    p.publish(ready("a"));
    let discovery_bus = Bus::connect(&cfg).await.unwrap();
    let mut sub = discovery_bus.subscribe().await.unwrap();
    drive_until(&mut sub, WITHIN, "model a", |v| {
        v.node("n1").is_some_and(|n| n.ready_models().count() == 1)
    })
    .await;
    let good = p.snapshot();

    let client = raw_client(&node_bus);
    let subject = "edgeroute.topology.us_east.n1";
    let impostor = TopologyEvent {
        node_id: "n2".into(),
        region: "us_east".into(),
        epoch: 1,
        seq: 1,
        at_ms: 0,
        kind: EventKind::NodeDown,
    };
    let mut huge = serde_json::to_vec(&impostor).unwrap();
    huge.extend(std::iter::repeat_n(b' ', 70 * 1024));
    for payload in [
        b"not json".to_vec(),
        br#"{"seq": 99}"#.to_vec(),
        serde_json::to_vec(&impostor).unwrap(), // valid, but on another node's subject
        huge,
    ] {
        client.publish(subject, payload.into()).await.unwrap();
    }
    client.flush().await.unwrap();
    drive_until(&mut sub, WITHIN, "the rejections", |v| {
        let c = v.counters();
        c.malformed == 3 && c.oversized == 1
    })
    .await;
    assert_eq!(sub.view().node("n1"), Some(&good), "the last good state is kept");
    assert_eq!(sub.view().len(), 1);

    // The stream still works, and a garbage store entry is counted by a new subscriber.
    let ev = p.publish(ready("b"));
    drive_until(&mut sub, WITHIN, "model b", |v| v.node("n1").is_some_and(|n| n.seq >= ev.seq))
        .await;
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value("edgeroute_nodes").await.unwrap();
    kv.put("junk", "{not a snapshot".into()).await.unwrap();
    let mut late = discovery_bus.subscribe().await.unwrap();
    drive_until(&mut late, WITHIN, "the late sync", |v| {
        v.counters().malformed == 1 && v.node("n1").is_some()
    })
    .await;
    assert_eq!(late.view().len(), 1);
}

#[tokio::test]
async fn a_node_started_while_nats_is_down_serves_and_catches_up() {
    let mut server = NatsServer::reserve();
    let cfg = nats_config(&server.url());
    let started = Instant::now();
    let node_bus = Bus::connect(&cfg).await.unwrap();
    let discovery_bus = Bus::connect(&cfg).await.unwrap();
    let mut sub = discovery_bus.subscribe().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1), "connect waited for the server");
    assert!(!node_bus.is_connected());

    let p = spawn(&node_bus, "n1");
    let ev = p.publish(ready("llama"));
    assert_eq!(ev.seq, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = p.stats();
    assert_eq!(before.published, 0, "{before:?}");
    assert!(before.failures >= 1, "{before:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), futures_util::StreamExt::next(&mut sub))
            .await
            .is_err()
    );
    assert!(!sub.is_synced());

    server.spawn().await;
    drive_until(&mut sub, WITHIN, "the node after NATS came up", |v| {
        v.node("n1") == Some(&p.snapshot())
    })
    .await;
    assert!(sub.is_synced());
    let after = p.stats();
    assert!(after.published >= 2 && after.reconnects >= 1, "{after:?}");
    assert!(server.log().contains("Server is ready"), "{}", server.log());
}

#[tokio::test]
async fn shutdown_says_node_down() {
    let server = NatsServer::start().await;
    let cfg = nats_config(&server.url());
    let bus = Bus::connect(&cfg).await.unwrap();
    let mut sub = bus.subscribe().await.unwrap();
    let p = spawn(&bus, "n1");
    drive_until(&mut sub, WITHIN, "node up", |v| v.node("n1").is_some()).await;
    assert!(p.shutdown(WITHIN).await);
    drive_until(&mut sub, WITHIN, "node down", |v| {
        v.node("n1").is_some_and(|n| n.liveness == edgeroute_proto::topology::NodeLiveness::Down)
    })
    .await;
    assert!(!sub.view().is_expired("n1"));
}
