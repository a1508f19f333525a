//! The embedded bus end to end, on a paused clock: heartbeats and expiry run in virtual time,
//! so the timing assertions are exact and the tests take milliseconds.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{flushed, next};
use edgeroute_bus::{
    Bus, BusConfig, BusError, FleetUpdate, NodeIdentity, Publisher, PublisherOptions,
};
use edgeroute_proto::topology::{EventKind, NodeLiveness, NodeSnapshot, TopologyEvent};
use futures_util::StreamExt;
use tokio::time::Instant;

const WITHIN: Duration = Duration::from_secs(60);

fn config() -> BusConfig {
    BusConfig::embedded()
}

fn identity(node: &str, epoch: u64) -> NodeIdentity {
    NodeIdentity {
        node_id: node.into(),
        region: "eu_west".into(),
        url: format!("http://{node}.test"),
        epoch,
    }
}

fn spawn(bus: &Bus, node: &str, epoch: u64) -> Publisher {
    let clock = Arc::new(|| 1_700_000_000_000);
    Publisher::spawn(
        bus.clone(),
        identity(node, epoch),
        PublisherOptions::from_config(bus.config()),
        clock,
    )
    .unwrap()
}

fn ready(model: &str) -> EventKind {
    EventKind::ModelReady { model: model.into(), gpu: Some("gpu1".into()), version: None }
}

#[tokio::test(start_paused = true)]
async fn a_late_subscriber_gets_the_whole_fleet_at_once() {
    let bus = Bus::embedded(&config()).unwrap();
    let a = spawn(&bus, "a", 1);
    let b = spawn(&bus, "b", 1);
    a.publish(ready("llama"));
    b.publish(EventKind::ModelLoading { model: "whisper".into(), gpu: None, version: None });
    b.publish(EventKind::NodeDraining { deadline_ms: 30_000, to: Some("a".into()) });
    flushed(&a, WITHIN).await;
    flushed(&b, WITHIN).await;

    let mut sub = bus.subscribe().await.unwrap();
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Snapshot(a.snapshot()));
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Snapshot(b.snapshot()));
    assert_eq!(sub.view().len(), 2);
    assert_eq!(sub.view().node("b").map(|n| n.liveness), Some(NodeLiveness::Draining));
    // Then it follows live events.
    let ev = a.publish(EventKind::ModelUnloaded { model: "llama".into(), gpu: None });
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Event(ev));
    assert_eq!(sub.view().node("a"), Some(&a.snapshot()));
}

#[tokio::test(start_paused = true)]
async fn publisher_events_arrive_in_order_and_add_up_to_its_snapshot() {
    let bus = Bus::embedded(&config()).unwrap();
    let mut sub = bus.subscribe().await.unwrap();
    let p = spawn(&bus, "n1", 1);
    for i in 0..200 {
        p.publish(if i % 2 == 0 { ready(&format!("m{i}")) } else { EventKind::Heartbeat });
    }
    // A node enters the view by its stored snapshot (never by an event: a heartbeat carries no
    // URL), then its events follow in order.
    let mut first = None;
    let mut seqs = Vec::new();
    loop {
        let seq = match next(&mut sub, WITHIN).await {
            FleetUpdate::Snapshot(snap) if first.is_none() => {
                first = Some(snap.seq);
                snap.seq
            }
            FleetUpdate::Event(ev) if first.is_some() => {
                seqs.push(ev.seq);
                ev.seq
            }
            other => panic!("unexpected {other:?}"),
        };
        if seq == 201 {
            break;
        }
    }
    let from = first.unwrap();
    assert_eq!(seqs, (from + 1..=201).collect::<Vec<_>>());
    assert_eq!(sub.view().node("n1"), Some(&p.snapshot()));
    let c = sub.view().counters();
    assert_eq!((c.unknown_nodes, c.gaps, c.resyncs), (1, 0, 0));
    assert_eq!(c.applied, 201 - from);
    assert_eq!(p.stats().published, 201);
}

#[tokio::test(start_paused = true)]
async fn a_lagged_subscriber_resyncs_from_the_snapshots() {
    let cfg = BusConfig { channel_capacity: 4, ..config() };
    let bus = Bus::embedded(&cfg).unwrap();
    let mut sub = bus.subscribe().await.unwrap();
    // 20 events while the subscriber is not polled: the channel keeps only the last 4.
    let mut snap = NodeSnapshot::new("n1", "eu_west", "http://n1.test", 1);
    let mut last = None;
    for seq in 1..=20 {
        let kind = if seq == 1 {
            EventKind::NodeUp { url: snap.url.clone() }
        } else {
            ready(&format!("m{seq}"))
        };
        let ev = TopologyEvent {
            node_id: "n1".into(),
            region: "eu_west".into(),
            epoch: 1,
            seq,
            at_ms: seq,
            kind,
        };
        snap.apply(&ev);
        bus.publish(&ev, &snap).await.unwrap();
        last = Some(ev);
    }
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Snapshot(snap.clone()));
    let c = sub.view().counters();
    assert_eq!(c.lagged, 1);
    // The 4 events still in the channel are covered by the snapshot: they come out stale.
    assert!(tokio::time::timeout(Duration::from_millis(1), sub.next()).await.is_err());
    assert_eq!(sub.view().counters().stale, 4);
    let mut next_ev = last.unwrap();
    next_ev.seq = 21;
    next_ev.kind = EventKind::Heartbeat;
    snap.apply(&next_ev);
    bus.publish(&next_ev, &snap).await.unwrap();
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Event(next_ev));
    assert_eq!(sub.view().counters().lagged, 1, "no second lag");
    assert_eq!(sub.view().node("n1"), Some(&snap));
}

#[tokio::test(start_paused = true)]
async fn a_gap_resyncs_that_node_from_its_stored_snapshot() {
    let bus = Bus::embedded(&config()).unwrap();
    let mut sub = bus.subscribe().await.unwrap();
    let mut snap = NodeSnapshot::new("n1", "eu_west", "http://n1.test", 1);
    let mut events = Vec::new();
    for seq in 1..=4 {
        let kind = if seq == 1 {
            EventKind::NodeUp { url: snap.url.clone() }
        } else {
            ready(&format!("m{seq}"))
        };
        let ev = TopologyEvent {
            node_id: "n1".into(),
            region: "eu_west".into(),
            epoch: 1,
            seq,
            at_ms: 0,
            kind,
        };
        snap.apply(&ev);
        events.push((ev, snap.clone()));
    }
    bus.publish(&events[0].0, &events[0].1).await.unwrap();
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Snapshot(events[0].1.clone()));
    // Event 2 is lost on the way: only the store saw it. Event 3 reveals the gap.
    bus.publish_batch(&[], &events[1].1).await.unwrap();
    bus.publish(&events[2].0, &events[2].1).await.unwrap();
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Snapshot(events[2].1.clone()));
    bus.publish(&events[3].0, &events[3].1).await.unwrap();
    assert_eq!(next(&mut sub, WITHIN).await, FleetUpdate::Event(events[3].0.clone()));
    let c = sub.view().counters();
    assert_eq!((c.gaps, c.resyncs), (1, 1));
    assert_eq!(sub.view().node("n1"), Some(&snap));
}

#[tokio::test(start_paused = true)]
async fn a_silent_node_expires_and_a_clean_shutdown_does_not() {
    let bus = Bus::embedded(&config()).unwrap(); // heartbeat 2 s, expiry 6 s
    let mut sub = bus.subscribe().await.unwrap();
    let silent = spawn(&bus, "silent", 1);
    let polite = spawn(&bus, "polite", 1);

    // 21 s of heartbeats (at 2, 4, .., 20 s): nobody expires.
    let until = Instant::now() + Duration::from_secs(21);
    let mut heartbeats = 0;
    while let Ok(Some(update)) = tokio::time::timeout_at(until, sub.next()).await {
        match update {
            FleetUpdate::Event(TopologyEvent { kind: EventKind::Heartbeat, .. }) => heartbeats += 1,
            // Each node enters the view by its stored snapshot.
            FleetUpdate::Event(_) | FleetUpdate::Snapshot(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(heartbeats, 20, "one every 2 s from each node");

    assert!(polite.shutdown(Duration::from_secs(1)).await);
    let down = next(&mut sub, WITHIN).await;
    assert!(matches!(&down, FleetUpdate::Event(ev) if ev.kind == EventKind::NodeDown), "{down:?}");

    // The other dies without a word: its last heartbeat was at most 2 s ago.
    let died = Instant::now();
    drop(silent);
    let expired = loop {
        match next(&mut sub, WITHIN).await {
            FleetUpdate::Expired(node) => break node,
            FleetUpdate::Event(ev) => assert_ne!(ev.node_id, "silent", "it is dead"),
            other => panic!("unexpected {other:?}"),
        }
    };
    let after = died.elapsed();
    assert_eq!(expired, "silent");
    // Noticed within the 6 s timeout plus one expiry check (1 s) after its last beat.
    assert!(after > Duration::from_secs(4) && after <= Duration::from_secs(7), "{after:?}");
    assert_eq!(sub.view().node("silent").map(|n| n.liveness), Some(NodeLiveness::Down));
    assert!(sub.view().is_expired("silent"));
    // The node that said goodbye is down but was never "expired".
    assert!(!sub.view().is_expired("polite"));
    assert!(
        tokio::time::timeout(Duration::from_secs(30), sub.next()).await.is_err(),
        "nothing more"
    );
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_starts_over() {
    let bus = Bus::embedded(&config()).unwrap();
    let mut sub = bus.subscribe().await.unwrap();
    let first = spawn(&bus, "n1", 100);
    first.publish(ready("llama"));
    common::drive_until(&mut sub, WITHIN, "llama ready", |v| {
        v.node("n1").is_some_and(|n| n.ready_models().count() == 1)
    })
    .await;
    drop(first);
    let second = spawn(&bus, "n1", 200);
    flushed(&second, WITHIN).await;
    common::drive_until(&mut sub, WITHIN, "the new run", |v| {
        v.node("n1").is_some_and(|n| n.epoch == 200)
    })
    .await;
    assert_eq!(sub.view().node("n1"), Some(&second.snapshot()));
    assert!(sub.view().node("n1").unwrap().models.is_empty(), "the old run's models are gone");
}

#[tokio::test(start_paused = true)]
async fn invalid_tokens_are_rejected_at_publish() {
    let bus = Bus::embedded(&config()).unwrap();
    let bad = NodeIdentity { node_id: "tor.1".into(), ..identity("x", 1) };
    let err = Publisher::spawn(
        bus.clone(),
        bad,
        PublisherOptions::from_config(bus.config()),
        Arc::new(|| 0),
    )
    .unwrap_err();
    assert!(matches!(err, BusError::InvalidToken { .. }), "{err}");
    let snap = NodeSnapshot::new("n1", "eu west", "u", 1);
    let ev = TopologyEvent {
        node_id: "n1".into(),
        region: "eu west".into(),
        epoch: 1,
        seq: 1,
        at_ms: 0,
        kind: EventKind::Heartbeat,
    };
    assert!(matches!(bus.publish(&ev, &snap).await, Err(BusError::InvalidToken { .. })));
}
