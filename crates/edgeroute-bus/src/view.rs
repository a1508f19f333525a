//! The fleet as one subscriber knows it: pure state, no I/O, no clock reads.
//!
//! [`FleetView`] holds the latest [`NodeSnapshot`] per node and folds events into it after
//! checking their order with [`classify`]. It never fetches anything itself: when it cannot
//! apply an event (a gap, or a node restarted mid-stream) it says so with
//! [`Applied::NeedsResync`], and the transport fetches the node's stored snapshot and hands it to
//! [`FleetView::apply_snapshot`]. Time comes in as `now_ms` (any monotonic millisecond clock the
//! caller keeps), so liveness expiry is testable without waiting.

use std::collections::BTreeMap;

use edgeroute_proto::topology::{NodeLiveness, NodeSnapshot, Ordering, TopologyEvent, classify};

use crate::wire::Rejected;

/// What [`FleetView::apply_event`] did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The next event of its node: folded into the node's snapshot.
    Folded,
    /// Already seen, or older than the held state: ignored.
    Stale,
    /// Events are missing (or the node restarted mid-stream): fetch this node's stored snapshot
    /// and pass it to [`FleetView::apply_snapshot`].
    NeedsResync(String),
}

/// What [`FleetView::apply_snapshot`] did with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotApplied {
    /// Newer than (or different from) the held state, which it replaced.
    Replaced,
    /// The state already held.
    Unchanged,
    /// Older than the held state: ignored.
    Older,
}

/// Running totals, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetCounters {
    /// Events folded.
    pub applied: u64,
    /// Duplicate or out-of-date events ignored.
    pub stale: u64,
    /// Events that revealed missing events.
    pub gaps: u64,
    /// Events from a new process run of a node.
    pub new_epochs: u64,
    /// Snapshots that repaired a known node's state (after a gap, a restart, a lag or a
    /// reconnection).
    pub resyncs: u64,
    /// Nodes marked down for silence.
    pub expired: u64,
    /// Messages that were not valid JSON of the expected shape (kept out; last good state kept).
    pub malformed: u64,
    /// Messages over [`crate::MAX_MESSAGE_BYTES`] (rejected unparsed).
    pub oversized: u64,
    /// Times the subscriber fell behind its transport and resynced every node.
    pub lagged: u64,
}

#[derive(Debug, Clone)]
struct NodeEntry {
    /// What consumers see: the node's published state, except that `liveness` is `Down`
    /// while the node is expired.
    snapshot: NodeSnapshot,
    last_seen_ms: u64,
    needs_resync: bool,
    /// The published liveness, kept while expiry overrides it, so a node that speaks again
    /// gets it back.
    expired_from: Option<NodeLiveness>,
}

impl NodeEntry {
    fn new(snapshot: NodeSnapshot, now_ms: u64) -> Self {
        NodeEntry { snapshot, last_seen_ms: now_ms, needs_resync: false, expired_from: None }
    }

    fn revive(&mut self) {
        if let Some(liveness) = self.expired_from.take() {
            self.snapshot.liveness = liveness;
        }
    }

    /// The state as published, without the local expiry override.
    fn published(&self) -> NodeSnapshot {
        let mut snap = self.snapshot.clone();
        if let Some(liveness) = self.expired_from {
            snap.liveness = liveness;
        }
        snap
    }
}

/// The latest state of every node one subscriber has heard of, in node-id order.
#[derive(Debug, Clone, Default)]
pub struct FleetView {
    nodes: BTreeMap<String, NodeEntry>,
    counters: FleetCounters,
}

/// The state a node has after its first event of an epoch (`seq == 1`): the publisher starts
/// from exactly this (see [`crate::Publisher`]), so folding from here reproduces its snapshot.
fn fresh(ev: &TopologyEvent) -> NodeSnapshot {
    let mut snap =
        NodeSnapshot::new(ev.node_id.clone(), ev.region.clone(), String::new(), ev.epoch);
    snap.apply(ev);
    snap
}

impl FleetView {
    pub fn new() -> Self {
        FleetView::default()
    }

    /// Folds `ev` if it is the next event of its node, received at `now_ms`.
    ///
    /// A node's first event of an epoch (`seq == 1`) starts it from scratch, whether the node
    /// was unknown or ran an older epoch; any other unexplained event asks for a resync.
    pub fn apply_event(&mut self, ev: &TopologyEvent, now_ms: u64) -> Applied {
        let held = self.nodes.get(&ev.node_id).map(|e| (e.snapshot.epoch, e.snapshot.seq));
        match classify(held, ev) {
            Ordering::Next => {
                match self.nodes.get_mut(&ev.node_id) {
                    Some(entry) => {
                        entry.revive();
                        entry.snapshot.apply(ev);
                        entry.last_seen_ms = now_ms;
                    }
                    None => {
                        self.nodes.insert(ev.node_id.clone(), NodeEntry::new(fresh(ev), now_ms));
                    }
                }
                self.counters.applied += 1;
                Applied::Folded
            }
            Ordering::Stale => {
                // Not a sign of life: a stale message may have been delayed for a long time.
                self.counters.stale += 1;
                Applied::Stale
            }
            Ordering::NewEpoch if ev.seq == 1 => {
                self.counters.new_epochs += 1;
                self.counters.applied += 1;
                self.nodes.insert(ev.node_id.clone(), NodeEntry::new(fresh(ev), now_ms));
                Applied::Folded
            }
            kind @ (Ordering::Gap | Ordering::NewEpoch) => {
                if kind == Ordering::Gap {
                    self.counters.gaps += 1;
                } else {
                    self.counters.new_epochs += 1;
                }
                if let Some(entry) = self.nodes.get_mut(&ev.node_id) {
                    entry.needs_resync = true;
                    entry.last_seen_ms = now_ms;
                }
                Applied::NeedsResync(ev.node_id.clone())
            }
        }
    }

    /// Replaces a node's state with `snap` unless `snap` is older (by epoch, then seq).
    pub fn apply_snapshot(&mut self, snap: NodeSnapshot, now_ms: u64) -> SnapshotApplied {
        let Some(entry) = self.nodes.get_mut(&snap.node_id) else {
            self.nodes.insert(snap.node_id.clone(), NodeEntry::new(snap, now_ms));
            return SnapshotApplied::Replaced;
        };
        let held = (entry.snapshot.epoch, entry.snapshot.seq);
        let offered = (snap.epoch, snap.seq);
        if offered < held {
            return SnapshotApplied::Older;
        }
        let was_behind = std::mem::replace(&mut entry.needs_resync, false);
        if offered == held && entry.published() == snap {
            // The same state: it says nothing about whether the node is alive now, so expiry
            // stands.
            if was_behind {
                self.counters.resyncs += 1;
            }
            return SnapshotApplied::Unchanged;
        }
        self.counters.resyncs += 1;
        *entry = NodeEntry::new(snap, now_ms);
        SnapshotApplied::Replaced
    }

    /// Marks every node not heard from for more than `timeout_ms` as down and returns their ids
    /// (each once per silence: a node stays expired until it speaks again).
    pub fn expire(&mut self, now_ms: u64, timeout_ms: u64) -> Vec<String> {
        let mut expired = Vec::new();
        for (id, entry) in &mut self.nodes {
            let silent = now_ms.saturating_sub(entry.last_seen_ms) > timeout_ms;
            if silent
                && entry.expired_from.is_none()
                && entry.snapshot.liveness != NodeLiveness::Down
            {
                entry.expired_from = Some(entry.snapshot.liveness);
                entry.snapshot.liveness = NodeLiveness::Down;
                expired.push(id.clone());
            }
        }
        self.counters.expired += expired.len() as u64;
        expired
    }

    /// Restarts every node's silence clock at `now_ms`. For when the subscriber itself could
    /// not hear (its own connection was down): silence then says nothing about the nodes, and
    /// expiring the whole fleet for it would turn a bus outage into a routing outage.
    pub fn touch_all(&mut self, now_ms: u64) {
        for entry in self.nodes.values_mut() {
            entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
        }
    }

    /// Counts a message the transport rejected before it reached the view.
    pub fn note_rejected(&mut self, why: Rejected) {
        match why {
            Rejected::Malformed => self.counters.malformed += 1,
            Rejected::Oversized => self.counters.oversized += 1,
        }
    }

    /// Counts a transport lag (the subscriber then resyncs every node).
    pub fn note_lagged(&mut self) {
        self.counters.lagged += 1;
    }

    pub fn node(&self, node_id: &str) -> Option<&NodeSnapshot> {
        self.nodes.get(node_id).map(|e| &e.snapshot)
    }

    /// Every node, in node-id order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeSnapshot> {
        self.nodes.values().map(|e| &e.snapshot)
    }

    /// Whether the node's state is known to be behind (waiting for a snapshot).
    pub fn needs_resync(&self, node_id: &str) -> bool {
        self.nodes.get(node_id).is_some_and(|e| e.needs_resync)
    }

    /// Whether the node is marked down for silence (rather than by its own `NodeDown`).
    pub fn is_expired(&self, node_id: &str) -> bool {
        self.nodes.get(node_id).is_some_and(|e| e.expired_from.is_some())
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn counters(&self) -> FleetCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests;
