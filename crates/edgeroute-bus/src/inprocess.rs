//! The embedded bus: one process, no external service.
//!
//! Events fan out through a tokio broadcast channel; the latest snapshot of every node sits in a
//! shared map. A publisher writes the map before it sends the event, so a subscriber that
//! missed events (a lagged broadcast receiver) always finds a snapshot at least as new as
//! anything it was sent, and resyncs from the map instead of losing state.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use edgeroute_proto::topology::{NodeSnapshot, TopologyEvent};
use tokio::sync::broadcast;

use crate::BusError;
use crate::policy::InProcessPolicy;
use crate::rollout::InProcessRollouts;
use crate::wire::check_node;

/// A cheap handle (clone it) to one in-process bus. Every handle of one bus sees the same
/// events and snapshots; two `InProcessBus::new` calls make two unrelated buses.
#[derive(Clone)]
pub struct InProcessBus {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for InProcessBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessBus").field("nodes", &self.lock().len()).finish()
    }
}

struct Shared {
    events: broadcast::Sender<Arc<TopologyEvent>>,
    snapshots: Mutex<BTreeMap<String, NodeSnapshot>>,
    /// The routing policy pushed on this bus and the replicas' acknowledgements.
    policy: InProcessPolicy,
    /// Rollout states (`crate::rollout`).
    rollouts: InProcessRollouts,
}

impl InProcessBus {
    /// A bus whose subscribers may fall `capacity` events behind before they resync.
    pub fn new(capacity: usize) -> Self {
        let (events, _) = broadcast::channel(capacity.max(1));
        InProcessBus {
            shared: Arc::new(Shared {
                events,
                snapshots: Mutex::new(BTreeMap::new()),
                policy: InProcessPolicy::new(capacity),
                rollouts: InProcessRollouts::default(),
            }),
        }
    }

    pub(crate) fn policy(&self) -> &InProcessPolicy {
        &self.shared.policy
    }

    pub(crate) fn rollouts(&self) -> &InProcessRollouts {
        &self.shared.rollouts
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, NodeSnapshot>> {
        // The map is only ever replaced entry by entry, so a panic elsewhere cannot leave it
        // half-written: recovering from poisoning is safe.
        self.shared.snapshots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores `snapshot` (unless the map holds a newer one of that node) and then sends
    /// `events`, which must all belong to the snapshot's node.
    pub fn publish_batch(
        &self,
        events: &[TopologyEvent],
        snapshot: &NodeSnapshot,
    ) -> Result<(), BusError> {
        check_batch(events, snapshot)?;
        {
            let mut map = self.lock();
            let newer = map
                .get(&snapshot.node_id)
                .is_none_or(|held| (held.epoch, held.seq) <= (snapshot.epoch, snapshot.seq));
            if newer {
                map.insert(snapshot.node_id.clone(), snapshot.clone());
            }
        }
        for ev in events {
            // An error only means nobody is subscribed right now, which is fine: the snapshot
            // is stored for whoever subscribes later.
            let _ = self.shared.events.send(Arc::new(ev.clone()));
        }
        Ok(())
    }

    /// The stored snapshot of one node.
    pub fn snapshot(&self, node_id: &str) -> Option<NodeSnapshot> {
        self.lock().get(node_id).cloned()
    }

    /// Every stored snapshot, in node-id order.
    pub fn snapshots(&self) -> Vec<NodeSnapshot> {
        self.lock().values().cloned().collect()
    }

    /// A receiver of every event sent from now on. Take it before reading the snapshots, so
    /// nothing falls between the two.
    pub(crate) fn receiver(&self) -> broadcast::Receiver<Arc<TopologyEvent>> {
        self.shared.events.subscribe()
    }
}

/// Both transports accept a batch only if it is one node's, with valid tokens.
pub(crate) fn check_batch(
    events: &[TopologyEvent],
    snapshot: &NodeSnapshot,
) -> Result<(), BusError> {
    check_node(&snapshot.node_id, &snapshot.region)?;
    match events.iter().find(|e| e.node_id != snapshot.node_id || e.region != snapshot.region) {
        Some(e) => Err(BusError::InvalidBatch(format!(
            "event of {}/{} sent with the snapshot of {}/{}",
            e.region, e.node_id, snapshot.region, snapshot.node_id
        ))),
        None => Ok(()),
    }
}
