//! Messages from the topology bus as a subscriber receives them: events on
//! `<prefix>.<region>.<node_id>` and stored snapshots under a node id, decoded by
//! `edgeroute_bus::wire` and folded into a [`FleetView`].
//!
//! Input: lines, one message each (time advances 1 s per line):
//! - `e <subject> <json>`: an event received on `subject`;
//! - `s <key> <json>`: a snapshot stored under `key`;
//! - `x <timeout_ms>`: expire nodes silent for longer than that;
//! - `t`: the subscriber reconnected (`touch_all`).
//!
//! Properties: nothing panics; a decoded message names valid tokens and matches its subject or
//! key; a folded event moves its node to exactly that (epoch, seq); a replacing snapshot is
//! held as given; stale input changes nothing.

#![no_main]

use edgeroute_bus::wire::{decode_event, decode_snapshot, event_subject};
use edgeroute_bus::{Applied, FleetView, SnapshotApplied};
use edgeroute_proto::names::is_name;
use libfuzzer_sys::fuzz_target;

const PREFIX: &str = "edgeroute.topology";
/// The wall clock the view is handed (Unix ms): epochs beyond it plus the skew are refused.
const WALL_MS: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut view = FleetView::new();
    let mut now = 0u64;
    for line in text.lines() {
        now += 1000;
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        match tag {
            "e" => {
                let (subject, payload) = rest.split_once(' ').unwrap_or((rest, ""));
                match decode_event(PREFIX, subject, payload.as_bytes()) {
                    Ok(ev) => {
                        assert!(is_name(&ev.node_id) && is_name(&ev.region));
                        assert_eq!(subject, event_subject(PREFIX, &ev.region, &ev.node_id));
                        let before = view.node(&ev.node_id).cloned();
                        match view.apply_event(&ev, now, WALL_MS) {
                            Applied::Folded => {
                                let n = view.node(&ev.node_id).expect("folded into a node");
                                assert_eq!((n.epoch, n.seq), (ev.epoch, ev.seq));
                                assert_eq!(n.node_id, ev.node_id);
                            }
                            Applied::Stale => {
                                assert_eq!(view.node(&ev.node_id), before.as_ref());
                            }
                            Applied::NeedsResync(id) => {
                                assert_eq!(id, ev.node_id);
                                if before.is_some() {
                                    assert!(view.needs_resync(&id));
                                }
                            }
                            Applied::Refused(_) => {
                                assert_eq!(view.node(&ev.node_id), before.as_ref());
                            }
                        }
                    }
                    Err(why) => view.note_rejected(why),
                }
            }
            "s" => {
                let (key, payload) = rest.split_once(' ').unwrap_or((rest, ""));
                match decode_snapshot(key, payload.as_bytes()) {
                    Ok(snap) => {
                        assert_eq!(snap.node_id, key);
                        assert!(is_name(&snap.node_id) && is_name(&snap.region));
                        let before = view.node(key).cloned();
                        match view.apply_snapshot(snap.clone(), now, WALL_MS) {
                            SnapshotApplied::Replaced => {
                                assert_eq!(view.node(key), Some(&snap));
                                assert!(!view.needs_resync(key));
                            }
                            SnapshotApplied::Older => {
                                assert_eq!(view.node(key), before.as_ref());
                            }
                            SnapshotApplied::Unchanged => {
                                assert!(!view.needs_resync(key));
                            }
                            SnapshotApplied::Refused(_) => {
                                assert_eq!(view.node(key), before.as_ref());
                            }
                        }
                    }
                    Err(why) => view.note_rejected(why),
                }
            }
            "x" => {
                let timeout = rest.trim().parse().unwrap_or(5000);
                for id in view.expire(now, timeout) {
                    assert!(view.is_expired(&id));
                }
            }
            "t" => view.touch_all(now),
            _ => {}
        }
        for n in view.nodes() {
            assert_eq!(view.node(&n.node_id), Some(n));
        }
    }
    let c = view.counters();
    assert!(c.applied + c.stale + c.malformed + c.oversized <= text.lines().count() as u64 * 2);
});
