//! Topology events: what the fleet's routing must learn when placement changes.
//!
//! Each node numbers its events with a monotonic sequence (`seq`, starting at 1 for a node's
//! process lifetime, identified by `epoch`) so a subscriber can tell a gap (it missed
//! something: resync from the snapshot) from a stale or duplicate delivery (ignore it).
//! The latest full state of every node ([`NodeSnapshot`]) is kept by the bus, so a subscriber
//! that starts late gets the whole fleet at once.

use serde::{Deserialize, Serialize};

use crate::models::ModelState;

/// One change on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopologyEvent {
    pub node_id: String,
    pub region: String,
    /// Identifies one run of the node process (e.g. its start time in ms); a new epoch resets
    /// `seq`.
    pub epoch: u64,
    /// Per node and epoch, strictly increasing by one.
    pub seq: u64,
    /// When the change happened, Unix milliseconds (node's clock; informative).
    pub at_ms: u64,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The node started serving at `url`.
    NodeUp {
        url: String,
    },
    /// The node stopped (clean shutdown). Silent deaths are noticed by missing heartbeats.
    NodeDown,
    /// The node refuses new sessions until `deadline_ms` from `at_ms`.
    NodeDraining {
        deadline_ms: u64,
        to: Option<String>,
    },
    /// The node serves new sessions again (a drain was cancelled).
    NodeReady,
    /// Liveness, every few seconds; carries nothing else.
    Heartbeat,
    ModelLoading {
        model: String,
        gpu: Option<String>,
        /// The model registry's version of what loads under `model` (the load's `version`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    ModelReady {
        model: String,
        gpu: Option<String>,
        /// The model registry's version now served under `model`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    ModelFailed {
        model: String,
        gpu: Option<String>,
        reason: String,
    },
    /// An unload started: the model is served only to what is in flight or pinned until its
    /// last request ends or `deadline_ms` (from `at_ms`) passes; no new session may be sent.
    ModelDraining {
        model: String,
        gpu: Option<String>,
        deadline_ms: u64,
    },
    /// The drain is over and the backend is unloading the model: not served any more.
    ModelUnloading {
        model: String,
        gpu: Option<String>,
    },
    ModelUnloaded {
        model: String,
        gpu: Option<String>,
    },
}

/// Whether a node takes work, as the bus knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeLiveness {
    Up,
    Draining,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPlacement {
    pub model: String,
    pub gpu: Option<String>,
    pub state: ModelState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The registry version served under `model`, as the node's load named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The latest full state of one node: what a late subscriber starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSnapshot {
    pub node_id: String,
    pub region: String,
    pub url: String,
    pub epoch: u64,
    /// The `seq` of the last event folded into this snapshot.
    pub seq: u64,
    pub at_ms: u64,
    pub liveness: NodeLiveness,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_deadline_ms: Option<u64>,
    pub models: Vec<ModelPlacement>,
}

impl NodeSnapshot {
    pub fn new(
        node_id: impl Into<String>,
        region: impl Into<String>,
        url: impl Into<String>,
        epoch: u64,
    ) -> Self {
        NodeSnapshot {
            node_id: node_id.into(),
            region: region.into(),
            url: url.into(),
            epoch,
            seq: 0,
            at_ms: 0,
            liveness: NodeLiveness::Up,
            drain_deadline_ms: None,
            models: Vec::new(),
        }
    }

    /// Folds one event of this node into the snapshot. The caller checks ordering first.
    pub fn apply(&mut self, ev: &TopologyEvent) {
        self.seq = ev.seq;
        self.epoch = ev.epoch;
        self.at_ms = ev.at_ms;
        // `version`: `Some` from the events that name one (loading, ready); the others keep
        // what the placement holds.
        let mut set = |model: &str,
                       gpu: &Option<String>,
                       state: ModelState,
                       reason: Option<String>,
                       version: Option<&Option<String>>| {
            match self.models.iter_mut().find(|m| m.model == model) {
                Some(m) => {
                    m.gpu = gpu.clone();
                    m.state = state;
                    m.reason = reason;
                    if let Some(v) = version {
                        m.version = v.clone();
                    }
                }
                None => self.models.push(ModelPlacement {
                    model: model.to_owned(),
                    gpu: gpu.clone(),
                    state,
                    reason,
                    version: version.cloned().flatten(),
                }),
            }
        };
        match &ev.kind {
            EventKind::NodeUp { url } => {
                self.url = url.clone();
                self.liveness = NodeLiveness::Up;
                self.drain_deadline_ms = None;
            }
            EventKind::NodeDown => self.liveness = NodeLiveness::Down,
            EventKind::NodeDraining { deadline_ms, .. } => {
                self.liveness = NodeLiveness::Draining;
                self.drain_deadline_ms = Some(*deadline_ms);
            }
            EventKind::NodeReady => {
                self.liveness = NodeLiveness::Up;
                self.drain_deadline_ms = None;
            }
            EventKind::Heartbeat => {}
            EventKind::ModelLoading { model, gpu, version } => {
                set(model, gpu, ModelState::Loading, None, Some(version))
            }
            EventKind::ModelReady { model, gpu, version } => {
                set(model, gpu, ModelState::Ready, None, Some(version))
            }
            EventKind::ModelFailed { model, gpu, reason } => {
                set(model, gpu, ModelState::Failed, Some(reason.clone()), None)
            }
            EventKind::ModelDraining { model, gpu, .. } => {
                set(model, gpu, ModelState::Draining, None, None)
            }
            EventKind::ModelUnloading { model, gpu } => {
                set(model, gpu, ModelState::Unloading, None, None)
            }
            EventKind::ModelUnloaded { model, .. } => self.models.retain(|m| &m.model != model),
        }
        self.models.sort_by(|a, b| a.model.cmp(&b.model));
    }

    /// Models ready on this node.
    pub fn ready_models(&self) -> impl Iterator<Item = &str> {
        self.models.iter().filter(|m| m.state == ModelState::Ready).map(|m| m.model.as_str())
    }
}

/// How an incoming event relates to what a subscriber holds for its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// The next event: apply it.
    Next,
    /// Already seen (or older): ignore it.
    Stale,
    /// Events are missing between the held state and this one: resync from the snapshot.
    Gap,
    /// A new process run of the node: its snapshot replaces what is held.
    NewEpoch,
}

/// Classifies `ev` against the held `(epoch, seq)` of its node (`None` if the node is unknown).
pub fn classify(held: Option<(u64, u64)>, ev: &TopologyEvent) -> Ordering {
    match held {
        None if ev.seq == 1 => Ordering::Next,
        None => Ordering::Gap,
        Some((epoch, _)) if ev.epoch > epoch => Ordering::NewEpoch,
        Some((epoch, _)) if ev.epoch < epoch => Ordering::Stale,
        Some((_, seq)) if ev.seq <= seq => Ordering::Stale,
        Some((_, seq)) if ev.seq == seq + 1 => Ordering::Next,
        Some(_) => Ordering::Gap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, epoch: u64, kind: EventKind) -> TopologyEvent {
        TopologyEvent { node_id: "n".into(), region: "r".into(), epoch, seq, at_ms: seq, kind }
    }

    #[test]
    fn ordering_detects_next_stale_gap_and_restart() {
        let e = |s, ep| ev(s, ep, EventKind::Heartbeat);
        assert_eq!(classify(None, &e(1, 5)), Ordering::Next);
        assert_eq!(classify(None, &e(3, 5)), Ordering::Gap);
        assert_eq!(classify(Some((5, 2)), &e(3, 5)), Ordering::Next);
        assert_eq!(classify(Some((5, 2)), &e(2, 5)), Ordering::Stale);
        assert_eq!(classify(Some((5, 2)), &e(1, 5)), Ordering::Stale);
        assert_eq!(classify(Some((5, 2)), &e(4, 5)), Ordering::Gap);
        assert_eq!(classify(Some((5, 9)), &e(1, 6)), Ordering::NewEpoch);
        assert_eq!(classify(Some((6, 1)), &e(9, 5)), Ordering::Stale);
    }

    #[test]
    fn snapshot_folds_model_and_drain_events() {
        let mut s = NodeSnapshot::new("n", "r", "http://n", 5);
        let gpu = Some("gpu0".to_owned());
        s.apply(&ev(
            1,
            5,
            EventKind::ModelLoading { model: "m".into(), gpu: gpu.clone(), version: None },
        ));
        assert_eq!(s.models[0].state, ModelState::Loading);
        let v2 = Some("v2".to_owned());
        s.apply(&ev(
            2,
            5,
            EventKind::ModelReady { model: "m".into(), gpu: gpu.clone(), version: v2.clone() },
        ));
        assert_eq!(s.ready_models().collect::<Vec<_>>(), vec!["m"]);
        assert_eq!(s.models[0].version, v2, "the version served is kept with the placement");
        s.apply(&ev(3, 5, EventKind::NodeDraining { deadline_ms: 100, to: None }));
        assert_eq!((s.liveness, s.drain_deadline_ms), (NodeLiveness::Draining, Some(100)));
        let draining =
            EventKind::ModelDraining { model: "m".into(), gpu: gpu.clone(), deadline_ms: 9 };
        s.apply(&ev(4, 5, draining));
        assert_eq!(s.models[0].state, ModelState::Draining);
        assert_eq!(s.models[0].version, v2, "a drain keeps it");
        assert_eq!(s.ready_models().count(), 0, "a draining model is not ready");
        s.apply(&ev(5, 5, EventKind::ModelUnloading { model: "m".into(), gpu: gpu.clone() }));
        assert_eq!(s.models[0].state, ModelState::Unloading);
        s.apply(&ev(6, 5, EventKind::ModelUnloaded { model: "m".into(), gpu }));
        assert!(s.models.is_empty());
        assert_eq!(s.seq, 6);
        let json = serde_json::to_string(&ev(
            1,
            5,
            EventKind::ModelReady { model: "m".into(), gpu: None, version: None },
        ))
        .unwrap();
        assert!(json.contains("\"type\":\"model_ready\""), "{json}");
        assert!(!json.contains("version"), "an absent version is not sent: {json}");
        // An older node's event (no version) still parses.
        let old = r#"{"type":"model_ready","model":"m","gpu":null}"#;
        let kind: EventKind = serde_json::from_str(old).unwrap();
        assert_eq!(kind, EventKind::ModelReady { model: "m".into(), gpu: None, version: None });
    }
}
