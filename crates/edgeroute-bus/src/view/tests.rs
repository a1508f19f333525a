//! The bus view's tests: snapshots, gaps and resyncs, model states.

use edgeroute_proto::models::ModelState;
use edgeroute_proto::topology::EventKind;
use proptest::prelude::*;

use super::*;

/// The wall clock the tests' views are given (Unix ms): epochs up to it plus the default skew
/// are accepted, and the tests' epochs are small.
const WALL: u64 = 1_000_000;

fn ev(seq: u64, epoch: u64, kind: EventKind) -> TopologyEvent {
    TopologyEvent { node_id: "n1".into(), region: "r".into(), epoch, seq, at_ms: seq * 10, kind }
}

fn up(seq: u64, epoch: u64) -> TopologyEvent {
    ev(seq, epoch, EventKind::NodeUp { url: "http://n1".into() })
}

fn ready(seq: u64, model: &str) -> TopologyEvent {
    ev(seq, 1, EventKind::ModelReady { model: model.into(), gpu: None, version: None })
}

/// A view that holds n1 as its publisher starts (`NodeSnapshot::new`, seq 0), heard at
/// `now`: as after reading the store. Its `NodeUp` (seq 1) then folds.
fn announced(epoch: u64, now: u64) -> FleetView {
    let mut view = FleetView::new();
    let start = NodeSnapshot::new("n1", "r", "http://n1", epoch);
    assert_eq!(view.apply_snapshot(start, now, WALL), SnapshotApplied::Replaced);
    view
}

/// The states a publisher goes through for `events` (index k = after k events).
fn truth(events: &[TopologyEvent]) -> Vec<NodeSnapshot> {
    let mut snap = NodeSnapshot::new("n1", "r", "http://n1", events[0].epoch);
    let mut states = vec![snap.clone()];
    for e in events {
        snap.apply(e);
        states.push(snap.clone());
    }
    states
}

#[test]
fn next_events_fold_and_the_first_event_reproduces_the_publisher_state() {
    let events = [up(1, 1), ready(2, "m")];
    let states = truth(&events);
    let mut view = announced(1, 0);
    assert_eq!(view.apply_event(&events[0], 0, WALL), Applied::Folded);
    assert_eq!(view.node("n1"), Some(&states[1]));
    assert_eq!(view.apply_event(&events[1], 0, WALL), Applied::Folded);
    assert_eq!(view.node("n1"), Some(&states[2]));
    assert_eq!(view.node("n1").map(|n| n.models[0].state), Some(ModelState::Ready));
    assert_eq!(view.counters().applied, 2);
}

#[test]
fn duplicates_and_old_events_are_stale() {
    let mut view = announced(2, 0);
    let model = ev(2, 2, EventKind::ModelReady { model: "m".into(), gpu: None, version: None });
    assert_eq!(view.apply_event(&up(1, 2), 0, WALL), Applied::Folded);
    assert_eq!(view.apply_event(&model, 0, WALL), Applied::Folded);
    let before = view.node("n1").cloned();
    assert_eq!(view.apply_event(&model, 0, WALL), Applied::Stale);
    assert_eq!(view.apply_event(&up(1, 2), 0, WALL), Applied::Stale);
    // An event of an older process run of the node.
    assert_eq!(view.apply_event(&up(1, 1), 0, WALL), Applied::Stale);
    assert_eq!(view.node("n1").cloned(), before);
    assert_eq!(view.counters().stale, 3);
}

#[test]
fn a_gap_asks_for_a_resync_that_a_newer_snapshot_completes() {
    let events = [up(1, 1), ready(2, "a"), ready(3, "b"), ready(4, "c")];
    let states = truth(&events);
    let mut view = announced(1, 0);
    view.apply_event(&events[0], 0, WALL);
    assert_eq!(view.apply_event(&events[2], 0, WALL), Applied::NeedsResync("n1".into()));
    assert!(view.needs_resync("n1"));
    assert_eq!(view.node("n1"), Some(&states[1]), "nothing folded across the gap");
    // An older snapshot does not clear the flag.
    assert_eq!(view.apply_snapshot(states[0].clone(), 0, WALL), SnapshotApplied::Older);
    assert!(view.needs_resync("n1"));
    assert_eq!(view.apply_snapshot(states[3].clone(), 0, WALL), SnapshotApplied::Replaced);
    assert!(!view.needs_resync("n1"));
    assert_eq!(view.apply_event(&events[2], 0, WALL), Applied::Stale);
    assert_eq!(view.apply_event(&events[3], 0, WALL), Applied::Folded);
    assert_eq!(view.node("n1"), Some(&states[4]));
    let c = view.counters();
    assert_eq!((c.gaps, c.resyncs, c.applied, c.stale), (1, 1, 2, 1));
}

#[test]
fn a_resync_that_finds_nothing_newer_still_clears_the_flag() {
    let events = [up(1, 1), ready(2, "a")];
    let states = truth(&events);
    let mut view = announced(1, 0);
    view.apply_event(&events[0], 0, WALL);
    view.apply_event(&events[1], 0, WALL);
    // An event the store has never seen (forged, or from a broken publisher).
    assert_eq!(view.apply_event(&ready(9, "x"), 0, WALL), Applied::NeedsResync("n1".into()));
    assert_eq!(view.apply_snapshot(states[2].clone(), 0, WALL), SnapshotApplied::Unchanged);
    assert!(!view.needs_resync("n1"));
    assert_eq!(view.node("n1"), Some(&states[2]));
    assert_eq!(view.counters().resyncs, 1);
}

#[test]
fn an_unknown_node_mid_stream_needs_its_snapshot() {
    let mut view = FleetView::new();
    assert_eq!(view.apply_event(&ready(7, "m"), 0, WALL), Applied::NeedsResync("n1".into()));
    assert!(view.is_empty(), "no state is invented from a partial stream");
    assert_eq!(view.counters().unknown_nodes, 1);
}

#[test]
fn a_restarted_node_replaces_its_old_state() {
    let mut view = announced(1, 0);
    view.apply_event(&up(1, 1), 0, WALL);
    view.apply_event(&ready(2, "m"), 0, WALL);
    // Its first event of a new run starts over: the old models are gone.
    assert_eq!(view.apply_event(&up(1, 2), 0, WALL), Applied::Folded);
    assert_eq!(view.node("n1").map(|n| (n.epoch, n.seq, n.models.len())), Some((2, 1, 0)));
    // A later event of a newer run asks for the snapshot, which replaces.
    let later = ev(5, 3, EventKind::Heartbeat);
    assert_eq!(view.apply_event(&later, 0, WALL), Applied::NeedsResync("n1".into()));
    let mut snap = NodeSnapshot::new("n1", "r", "http://n1", 3);
    snap.seq = 5;
    assert_eq!(view.apply_snapshot(snap.clone(), 0, WALL), SnapshotApplied::Replaced);
    assert_eq!(view.node("n1"), Some(&snap));
    assert_eq!(view.counters().new_epochs, 2);
}

#[test]
fn silent_nodes_expire_once_and_revive_when_they_speak() {
    let mut view = announced(1, 1_000);
    view.apply_event(&up(1, 1), 1_000, WALL);
    assert!(view.expire(7_000, 6_000).is_empty(), "exactly the timeout is not yet silent");
    assert_eq!(view.expire(7_001, 6_000), vec!["n1".to_owned()]);
    assert_eq!(view.node("n1").map(|n| n.liveness), Some(NodeLiveness::Down));
    assert!(view.is_expired("n1"));
    assert!(view.expire(60_000, 6_000).is_empty(), "reported once per silence");
    // Re-reading the same stored state is no sign of life.
    let same = truth(&[up(1, 1)])[1].clone();
    assert_eq!(view.apply_snapshot(same, 60_000, WALL), SnapshotApplied::Unchanged);
    assert_eq!(view.node("n1").map(|n| n.liveness), Some(NodeLiveness::Down));
    // A heartbeat is.
    view.apply_event(&ev(2, 1, EventKind::Heartbeat), 61_000, WALL);
    assert_eq!(view.node("n1").map(|n| n.liveness), Some(NodeLiveness::Up));
    assert!(!view.is_expired("n1"));
    assert_eq!(view.counters().expired, 1);
}

#[test]
fn touching_all_nodes_postpones_expiry_but_keeps_expired_nodes_down() {
    let mut view = announced(1, 0);
    view.apply_event(&up(1, 1), 0, WALL);
    view.apply_snapshot(NodeSnapshot::new("n2", "r", "u", 1), 0, WALL);
    assert_eq!(view.expire(7_000, 6_000).len(), 2);
    view.apply_event(&ev(2, 1, EventKind::Heartbeat), 8_000, WALL);
    // The subscriber was cut off from 9 s to 20 s: nobody's silence counts.
    view.touch_all(20_000);
    assert!(view.expire(26_000, 6_000).is_empty());
    assert_eq!(view.expire(26_001, 6_000), vec!["n1".to_owned()]);
    assert!(view.is_expired("n2"), "touching revives nobody");
}

#[test]
fn nodes_that_said_goodbye_are_not_expired_again() {
    let mut view = announced(1, 0);
    view.apply_event(&up(1, 1), 0, WALL);
    view.apply_event(&ev(2, 1, EventKind::NodeDown), 0, WALL);
    assert!(view.expire(100_000, 6_000).is_empty());
    assert!(!view.is_expired("n1"));
}

#[test]
fn expiry_keeps_a_draining_node_draining_once_it_speaks_again() {
    let mut view = announced(1, 0);
    view.apply_event(&up(1, 1), 0, WALL);
    view.apply_event(&ev(2, 1, EventKind::NodeDraining { deadline_ms: 5, to: None }), 0, WALL);
    view.expire(10_000, 6_000);
    view.apply_event(&ev(3, 1, EventKind::Heartbeat), 10_000, WALL);
    assert_eq!(view.node("n1").map(|n| n.liveness), Some(NodeLiveness::Draining));
}

#[test]
fn rejected_messages_and_lags_are_counted() {
    let mut view = FleetView::new();
    view.note_rejected(Rejected::Malformed);
    view.note_rejected(Rejected::Malformed);
    view.note_rejected(Rejected::Oversized);
    view.note_lagged();
    let c = view.counters();
    assert_eq!((c.malformed, c.oversized, c.lagged), (2, 1, 1));
}

#[test]
fn nodes_iterate_in_id_order() {
    let mut view = FleetView::new();
    for id in ["c", "a", "b"] {
        view.apply_snapshot(NodeSnapshot::new(id, "r", "u", 1), 0, WALL);
    }
    let ids: Vec<_> = view.nodes().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
}

fn kind() -> impl Strategy<Value = EventKind> {
    let model = prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_owned);
    prop_oneof![
        Just(EventKind::Heartbeat),
        Just(EventKind::NodeReady),
        (0u64..100).prop_map(|d| EventKind::NodeDraining { deadline_ms: d, to: None }),
        model.clone().prop_map(|m| EventKind::ModelLoading { model: m, gpu: None, version: None }),
        model.clone().prop_map(|m| EventKind::ModelReady {
            model: m,
            gpu: Some("gpu0".into()),
            version: None
        }),
        model.clone().prop_map(|m| EventKind::ModelFailed {
            model: m,
            gpu: None,
            reason: "oom".into()
        }),
        (model.clone(), 0u64..100).prop_map(|(m, d)| EventKind::ModelDraining {
            model: m,
            gpu: None,
            deadline_ms: d
        }),
        model.clone().prop_map(|m| EventKind::ModelUnloading { model: m, gpu: None }),
        model.prop_map(|m| EventKind::ModelUnloaded { model: m, gpu: None }),
    ]
}

/// A node's true event stream: `NodeUp` then `kinds`, numbered from 1.
fn stream(kinds: Vec<EventKind>) -> Vec<TopologyEvent> {
    std::iter::once(EventKind::NodeUp { url: "http://n1".into() })
        .chain(kinds)
        .enumerate()
        .map(|(i, k)| ev(i as u64 + 1, 1, k))
        .collect()
}

proptest! {
    /// Every event delivered at least once, in any order, with duplicates: resyncing from the
    /// stored (final) snapshot whenever asked, the view ends exactly at the node's final state.
    #[test]
    fn reordered_duplicated_delivery_converges(
        kinds in prop::collection::vec(kind(), 0..25),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..15),
        seed in any::<u64>(),
    ) {
        let events = stream(kinds);
        let states = truth(&events);
        let last = states[states.len() - 1].clone();
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.extend(dups.iter().map(|i| i.index(events.len())));
        shuffle(&mut order, seed);
        let mut view = FleetView::new();
        for i in order {
            if let Applied::NeedsResync(id) = view.apply_event(&events[i], 0, WALL) {
                prop_assert_eq!(id.as_str(), "n1");
                view.apply_snapshot(last.clone(), 0, WALL);
            }
        }
        prop_assert_eq!(view.node("n1"), Some(&last));
        prop_assert!(!view.needs_resync("n1"));
    }

    /// With losses too, and resync fetches that may fail, the view only ever holds a state the
    /// node really had.
    #[test]
    fn lossy_delivery_never_invents_a_state(
        kinds in prop::collection::vec(kind(), 0..25),
        picks in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 0..40),
        resync_lag in 0usize..5,
    ) {
        let events = stream(kinds);
        let states = truth(&events);
        let mut view = FleetView::new();
        let mut newest_sent = 0;
        for (pick, fetch_works) in picks {
            let i = pick.index(events.len());
            // The store is written before an event is sent, so it is at least as new.
            newest_sent = newest_sent.max(i + 1);
            let stored = (newest_sent + resync_lag).min(events.len());
            if let Applied::NeedsResync(_) = view.apply_event(&events[i], 0, WALL) {
                prop_assert!(view.node("n1").is_none() || view.needs_resync("n1"));
                if fetch_works {
                    view.apply_snapshot(states[stored].clone(), 0, WALL);
                    prop_assert!(!view.needs_resync("n1"));
                }
            }
            if let Some(held) = view.node("n1") {
                prop_assert_eq!(held, &states[held.seq as usize]);
            }
        }
    }
}

/// A small deterministic Fisher-Yates shuffle (splitmix64), so the case is fully given by the
/// proptest inputs.
fn shuffle(v: &mut [usize], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        v.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

// --- Attacks on what the bus announces (issue 14). ---

fn limits() -> ViewLimits {
    ViewLimits {
        max_nodes: 100,
        max_models_per_node: 3,
        max_epoch_skew_ms: 1_000,
        forget_ms: 60_000,
    }
}

/// Epochs are process start times in Unix ms: one from the far future would pin the node's
/// state (every real event afterwards is "older") until every replica restarts.
#[test]
fn an_epoch_beyond_the_cap_is_refused_and_counted() {
    let mut view = FleetView::new();
    view.apply_snapshot(NodeSnapshot::new("n1", "r", "http://n1", 1), 0, WALL);
    let pin = ev(1, u64::MAX, EventKind::NodeUp { url: "http://evil".into() });
    assert_eq!(view.apply_event(&pin, 0, WALL), Applied::Refused(Refusal::FutureEpoch));
    let mut snap = NodeSnapshot::new("n1", "r", "http://evil", u64::MAX);
    snap.seq = 1;
    assert_eq!(view.apply_snapshot(snap, 0, WALL), SnapshotApplied::Refused(Refusal::FutureEpoch));
    assert_eq!(view.node("n1").map(|n| (n.epoch, n.url.as_str())), Some((1, "http://n1")));
    // The real node goes on being heard.
    assert_eq!(view.apply_event(&ev(1, 1, EventKind::Heartbeat), 0, WALL), Applied::Folded);
    assert_eq!(view.counters().future_epochs, 2);
    // The cap is the caller's wall clock plus the skew: exactly at it is accepted, past it not.
    let mut view = FleetView::with_limits(limits());
    let at_cap = NodeSnapshot::new("a", "r", "u", WALL + 1_000);
    assert_eq!(view.apply_snapshot(at_cap, 0, WALL), SnapshotApplied::Replaced);
    let past = NodeSnapshot::new("b", "r", "u", WALL + 1_001);
    assert_eq!(view.apply_snapshot(past, 0, WALL), SnapshotApplied::Refused(Refusal::FutureEpoch));
    // An unknown node's future event is refused before it can even ask for a resync.
    let far = TopologyEvent { node_id: "c".into(), ..ev(3, WALL + 1_001, EventKind::Heartbeat) };
    assert_eq!(view.apply_event(&far, 0, WALL), Applied::Refused(Refusal::FutureEpoch));
}

/// A heartbeat (any event) as the first thing heard of a node must not invent a state with an
/// empty URL: the view asks for the node's stored snapshot instead.
#[test]
fn a_first_event_of_an_unknown_node_creates_no_entry() {
    let mut view = FleetView::new();
    for first in [
        ev(1, 1, EventKind::Heartbeat),
        ev(1, 1, EventKind::NodeUp { url: "http://n1".into() }),
        ev(1, 1, EventKind::ModelReady { model: "m".into(), gpu: None, version: None }),
    ] {
        assert_eq!(view.apply_event(&first, 0, WALL), Applied::NeedsResync("n1".into()));
        assert!(view.node("n1").is_none() && view.is_empty());
    }
    assert_eq!(view.counters().unknown_nodes, 3);
    assert_eq!(view.counters().applied, 0);
    // Nor does a heartbeat starting a new process run of a known node blank its URL.
    view.apply_snapshot(NodeSnapshot::new("n1", "r", "http://n1", 1), 0, WALL);
    let beat = ev(1, 2, EventKind::Heartbeat);
    assert_eq!(view.apply_event(&beat, 0, WALL), Applied::NeedsResync("n1".into()));
    assert_eq!(view.node("n1").map(|n| n.url.as_str()), Some("http://n1"));
}

/// Nodes silent long past their expiry are forgotten; until then they are held (down).
#[test]
fn long_silent_nodes_are_pruned() {
    let mut view = FleetView::with_limits(limits());
    view.apply_snapshot(NodeSnapshot::new("n1", "r", "http://n1", 1), 0, WALL);
    view.apply_snapshot(NodeSnapshot::new("n2", "r", "http://n2", 1), 50_000, WALL);
    assert_eq!(view.expire(7_000, 6_000), vec!["n1".to_owned()]);
    assert!(view.expire(66_000, 6_000).contains(&"n2".to_owned()));
    assert!(view.is_expired("n1"), "within expiry + forget_ms it is kept, down");
    view.expire(66_001, 6_000);
    assert!(view.node("n1").is_none(), "forgotten after expiry + forget_ms");
    assert!(view.node("n2").is_some());
    assert_eq!(view.counters().forgotten, 1);
    // A node that said goodbye is forgotten too.
    view.apply_event(
        &TopologyEvent { node_id: "n2".into(), ..ev(1, 1, EventKind::NodeDown) },
        70_000,
        WALL,
    );
    view.expire(24 * 3_600_000, 6_000);
    assert!(view.is_empty(), "still held after a day of silence");
    assert_eq!(view.counters().forgotten, 2);
}

/// Even with no time to forget in, a node is reported expired before it is dropped.
#[test]
fn a_node_is_reported_expired_before_it_is_forgotten() {
    let mut view = FleetView::with_limits(ViewLimits { forget_ms: 0, ..limits() });
    view.apply_snapshot(NodeSnapshot::new("n1", "r", "http://n1", 1), 0, WALL);
    assert_eq!(view.expire(100_000, 6_000), vec!["n1".to_owned()]);
    assert!(view.is_expired("n1"));
    assert!(view.expire(100_001, 6_000).is_empty());
    assert!(view.is_empty());
}

/// 10,000 announced fake node ids: the view stays within its cap, and the nodes it already
/// held are still served.
#[test]
fn ten_thousand_announced_nodes_stay_within_the_cap() {
    let mut view = FleetView::with_limits(limits());
    view.apply_snapshot(NodeSnapshot::new("real", "r", "https://real", 1), 0, WALL);
    for i in 0..10_000u64 {
        let id = format!("fake-{i}");
        let beat = TopologyEvent { node_id: id.clone(), ..ev(i + 1, 1, EventKind::Heartbeat) };
        view.apply_event(&beat, 0, WALL);
        view.apply_snapshot(NodeSnapshot::new(id, "r", "http://x", 1), 0, WALL);
    }
    assert_eq!(view.len(), 100);
    assert!(view.node("real").is_some());
    let c = view.counters();
    // Each fake beyond the cap: its event and its snapshot refused.
    assert_eq!(c.over_node_cap, 2 * (10_000 - 99));
    // Default limits: bounded by the default cap.
    let mut view = FleetView::new();
    for i in 0..10_000 {
        view.apply_snapshot(NodeSnapshot::new(format!("fake-{i}"), "r", "http://x", 1), 0, WALL);
    }
    assert_eq!(view.len(), ViewLimits::default().max_nodes);
}

/// Models per node are capped: a bigger snapshot is refused whole, an event that would add one
/// more model is refused; known models still change state.
#[test]
fn models_per_node_are_capped() {
    let mut view = FleetView::with_limits(limits());
    let mut snap = NodeSnapshot::new("n1", "r", "http://n1", 1);
    for m in ["a", "b", "c", "d"] {
        snap.apply(&ev(
            snap.seq + 1,
            1,
            EventKind::ModelReady { model: m.into(), gpu: None, version: None },
        ));
    }
    assert_eq!(
        view.apply_snapshot(snap, 0, WALL),
        SnapshotApplied::Refused(Refusal::TooManyModels)
    );
    assert!(view.is_empty());
    view.apply_snapshot(NodeSnapshot::new("n1", "r", "http://n1", 1), 0, WALL);
    for (seq, m) in [(1, "a"), (2, "b"), (3, "c")] {
        let e = ev(seq, 1, EventKind::ModelReady { model: m.into(), gpu: None, version: None });
        assert_eq!(view.apply_event(&e, 0, WALL), Applied::Folded);
    }
    let fourth = ev(4, 1, EventKind::ModelLoading { model: "d".into(), gpu: None, version: None });
    assert_eq!(view.apply_event(&fourth, 0, WALL), Applied::Refused(Refusal::TooManyModels));
    let known = ev(4, 1, EventKind::ModelUnloading { model: "a".into(), gpu: None });
    assert_eq!(view.apply_event(&known, 0, WALL), Applied::Folded);
    assert_eq!(view.node("n1").map(|n| n.models.len()), Some(3));
    assert_eq!(view.counters().over_model_cap, 2);
}
