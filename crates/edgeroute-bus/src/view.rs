//! The fleet as one subscriber knows it: pure state, no I/O, no clock reads.
//!
//! [`FleetView`] holds the latest [`NodeSnapshot`] per node and folds events into it after
//! checking their order with [`classify`]. It never fetches anything itself: when it cannot
//! apply an event (a gap, or a node restarted mid-stream) it says so with
//! [`Applied::NeedsResync`], and the transport fetches the node's stored snapshot and hands it to
//! [`FleetView::apply_snapshot`]. Time comes in as `now_ms` (any monotonic millisecond clock the
//! caller keeps), so liveness expiry is testable without waiting.
//!
//! What the bus announces is held bounded ([`ViewLimits`]), since anyone who can publish on it
//! could otherwise grow or pin it:
//! - an epoch (a node's start time, Unix ms) beyond the caller's wall clock (`wall_ms`, passed
//!   in) plus `max_epoch_skew_ms` is refused: it would make every real event "older";
//! - an event is never the first thing the view holds of a node: an event of an unknown node
//!   (a heartbeat, say, which carries no URL) asks for the node's stored snapshot instead, and
//!   a new process run is started from its `NodeUp` (which carries the URL) or a snapshot;
//! - at most `max_nodes` nodes, and `max_models_per_node` models per node; beyond, refused;
//! - a node silent for the expiry timeout plus `forget_ms` is dropped.
//!
//! Every refusal is counted in [`FleetCounters`].

use std::collections::BTreeMap;

use edgeroute_proto::topology::{
    EventKind, NodeLiveness, NodeSnapshot, Ordering, TopologyEvent, classify,
};

use crate::wire::Rejected;

/// The bounds of one view. Defaults are [`crate::BusConfig`]'s (see its fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewLimits {
    /// Most nodes held; a new node id beyond it is refused.
    pub max_nodes: usize,
    /// Most models in one node's state; a snapshot or event beyond it is refused.
    pub max_models_per_node: usize,
    /// How far past the caller's wall clock an epoch may be.
    pub max_epoch_skew_ms: u64,
    /// How long past its expiry a silent node is kept before it is dropped.
    pub forget_ms: u64,
}

impl Default for ViewLimits {
    fn default() -> Self {
        crate::BusConfig::default().view_limits()
    }
}

/// Why the view refused a message (each counted in [`FleetCounters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its epoch is beyond the wall clock plus the allowed skew.
    FutureEpoch,
    /// A new node while the view holds `max_nodes`.
    TooManyNodes,
    /// More than `max_models_per_node` models.
    TooManyModels,
}

/// What [`FleetView::apply_event`] did with an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The next event of its node: folded into the node's snapshot.
    Folded,
    /// Already seen, or older than the held state: ignored.
    Stale,
    /// Events are missing (or the node restarted mid-stream): fetch this node's stored snapshot
    /// and pass it to [`FleetView::apply_snapshot`]. Also the answer for a node the view does
    /// not hold yet: its first state comes from its snapshot, never from an event.
    NeedsResync(String),
    /// Outside the view's limits: ignored (and counted).
    Refused(Refusal),
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
    /// Outside the view's limits: ignored (and counted).
    Refused(Refusal),
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
    /// Events of nodes the view did not hold (answered with a resync, never an entry).
    pub unknown_nodes: u64,
    /// Events and snapshots refused for an epoch beyond the wall clock plus the allowed skew.
    pub future_epochs: u64,
    /// New node ids refused because the view held `max_nodes`.
    pub over_node_cap: u64,
    /// Snapshots and events refused for more than `max_models_per_node` models.
    pub over_model_cap: u64,
    /// Nodes dropped after `forget_ms` of silence past their expiry.
    pub forgotten: u64,
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
    limits: ViewLimits,
}

/// The state a node has after its first event of an epoch (`seq == 1`): the publisher starts
/// from exactly this (see [`crate::Publisher`]), so folding from here reproduces its snapshot.
fn fresh(ev: &TopologyEvent) -> NodeSnapshot {
    let mut snap =
        NodeSnapshot::new(ev.node_id.clone(), ev.region.clone(), String::new(), ev.epoch);
    snap.apply(ev);
    snap
}

/// Whether folding `ev` would take `snap` past `max_models` models (only an event naming a
/// model the node does not list yet can).
fn grows_past(snap: &NodeSnapshot, ev: &TopologyEvent, max_models: usize) -> bool {
    let model = match &ev.kind {
        EventKind::ModelLoading { model, .. }
        | EventKind::ModelReady { model, .. }
        | EventKind::ModelFailed { model, .. }
        | EventKind::ModelDraining { model, .. }
        | EventKind::ModelUnloading { model, .. } => model,
        // An unload removes a model: never growth.
        _ => return false,
    };
    snap.models.len() >= max_models && !snap.models.iter().any(|m| &m.model == model)
}

impl FleetView {
    /// A view with the default [`ViewLimits`].
    pub fn new() -> Self {
        FleetView::default()
    }

    pub fn with_limits(limits: ViewLimits) -> Self {
        FleetView { limits, ..FleetView::default() }
    }

    pub fn limits(&self) -> ViewLimits {
        self.limits
    }

    /// Refuses (and counts) an epoch beyond `wall_ms` plus the allowed skew.
    fn epoch_refused(&mut self, epoch: u64, wall_ms: u64) -> bool {
        let refused = epoch > wall_ms.saturating_add(self.limits.max_epoch_skew_ms);
        if refused {
            self.counters.future_epochs += 1;
        }
        refused
    }

    /// Refuses (and counts) a new node while the view is full.
    fn node_cap_refused(&mut self) -> bool {
        let refused = self.nodes.len() >= self.limits.max_nodes;
        if refused {
            self.counters.over_node_cap += 1;
        }
        refused
    }

    /// Folds `ev` if it is the next event of a node the view holds, received at `now_ms`
    /// (monotonic) when the caller's wall clock read `wall_ms` (Unix ms).
    ///
    /// A node's first event of a new epoch starts it from scratch if it is its `NodeUp`
    /// (`seq == 1`, which carries the URL); any other unexplained event, and any event of a
    /// node not held, asks for a resync.
    pub fn apply_event(&mut self, ev: &TopologyEvent, now_ms: u64, wall_ms: u64) -> Applied {
        if self.epoch_refused(ev.epoch, wall_ms) {
            return Applied::Refused(Refusal::FutureEpoch);
        }
        let Some(entry) = self.nodes.get(&ev.node_id) else {
            if self.node_cap_refused() {
                return Applied::Refused(Refusal::TooManyNodes);
            }
            self.counters.unknown_nodes += 1;
            return Applied::NeedsResync(ev.node_id.clone());
        };
        let held = Some((entry.snapshot.epoch, entry.snapshot.seq));
        match classify(held, ev) {
            Ordering::Next => {
                let max_models = self.limits.max_models_per_node;
                let Some(entry) = self.nodes.get_mut(&ev.node_id) else {
                    return Applied::Stale;
                };
                if grows_past(&entry.snapshot, ev, max_models) {
                    self.counters.over_model_cap += 1;
                    return Applied::Refused(Refusal::TooManyModels);
                }
                entry.revive();
                entry.snapshot.apply(ev);
                entry.last_seen_ms = now_ms;
                self.counters.applied += 1;
                Applied::Folded
            }
            Ordering::Stale => {
                // Not a sign of life: a stale message may have been delayed for a long time.
                self.counters.stale += 1;
                Applied::Stale
            }
            Ordering::NewEpoch if ev.seq == 1 && matches!(ev.kind, EventKind::NodeUp { .. }) => {
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

    /// Replaces a node's state with `snap` unless `snap` is older (by epoch, then seq) or
    /// outside the view's limits; `now_ms` and `wall_ms` as for [`FleetView::apply_event`].
    pub fn apply_snapshot(
        &mut self,
        snap: NodeSnapshot,
        now_ms: u64,
        wall_ms: u64,
    ) -> SnapshotApplied {
        if self.epoch_refused(snap.epoch, wall_ms) {
            return SnapshotApplied::Refused(Refusal::FutureEpoch);
        }
        if snap.models.len() > self.limits.max_models_per_node {
            self.counters.over_model_cap += 1;
            return SnapshotApplied::Refused(Refusal::TooManyModels);
        }
        if !self.nodes.contains_key(&snap.node_id) && self.node_cap_refused() {
            return SnapshotApplied::Refused(Refusal::TooManyNodes);
        }
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
    /// (each once per silence: a node stays expired until it speaks again). Nodes silent for
    /// more than `timeout_ms` plus the view's `forget_ms` are dropped (counted in `forgotten`).
    pub fn expire(&mut self, now_ms: u64, timeout_ms: u64) -> Vec<String> {
        let forget_after = timeout_ms.saturating_add(self.limits.forget_ms);
        let before = self.nodes.len();
        // Only nodes already reported down (expired, or said goodbye) go: a consumer always
        // hears `Expired` before the view lets a node go.
        self.nodes.retain(|_, entry| {
            let reported =
                entry.expired_from.is_some() || entry.snapshot.liveness == NodeLiveness::Down;
            !reported || now_ms.saturating_sub(entry.last_seen_ms) <= forget_after
        });
        self.counters.forgotten += (before - self.nodes.len()) as u64;
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
