//! `Bus`: the one handle the node and discovery hold, whatever the transport.
//!
//! An enum rather than a trait object or a generic: two transports are all there is, and the
//! callers keep plain types (`Bus`, `Subscription`, `Publisher`) without type parameters leaking
//! through their own APIs.

use std::sync::Arc;

use edgeroute_core::clock::WallClock;
use edgeroute_proto::topology::{NodeSnapshot, TopologyEvent};
use tokio::sync::watch;

use crate::BusError;
use crate::config::{BusConfig, BusKind};
use crate::inprocess::InProcessBus;
use crate::nats::NatsBus;
use crate::policy::{PolicyStatus, PolicyStatuses, PolicyWatch};
use crate::subscription::Subscription;

/// The topology bus. Cheap to clone; clones share the transport.
#[derive(Debug, Clone)]
pub struct Bus {
    transport: Transport,
    config: Arc<BusConfig>,
}

/// Which transport a [`Bus`] uses.
#[derive(Debug, Clone)]
pub enum Transport {
    InProcess(InProcessBus),
    Nats(NatsBus),
}

impl Bus {
    /// Builds the bus `cfg` describes. For NATS this returns at once even when the server is
    /// down (it connects in the background): a node must start and serve with a dead bus. It
    /// fails only for an invalid configuration.
    pub async fn connect(cfg: &BusConfig) -> Result<Bus, BusError> {
        cfg.validate()?;
        let transport = match cfg.kind {
            BusKind::Embedded => Transport::InProcess(InProcessBus::new(cfg.channel_capacity)),
            BusKind::Nats => Transport::Nats(NatsBus::connect(cfg).await?),
        };
        Ok(Bus { transport, config: Arc::new(cfg.clone()) })
    }

    /// A new embedded bus (`cfg.kind` is ignored).
    pub fn embedded(cfg: &BusConfig) -> Result<Bus, BusError> {
        cfg.validate()?;
        let transport = Transport::InProcess(InProcessBus::new(cfg.channel_capacity));
        Ok(Bus {
            transport,
            config: Arc::new(BusConfig { kind: BusKind::Embedded, ..cfg.clone() }),
        })
    }

    pub fn config(&self) -> &BusConfig {
        &self.config
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Whether sends can go out now (always, in process).
    pub fn is_connected(&self) -> bool {
        match &self.transport {
            Transport::InProcess(_) => true,
            Transport::Nats(nats) => nats.is_connected(),
        }
    }

    /// Publishes `ev` and stores `snapshot`, the node's full state including `ev`.
    pub async fn publish(
        &self,
        ev: &TopologyEvent,
        snapshot: &NodeSnapshot,
    ) -> Result<(), BusError> {
        self.publish_batch(std::slice::from_ref(ev), snapshot).await
    }

    /// Stores `snapshot` and then publishes `events` in order (all of the snapshot's node,
    /// none newer than it). With no events, it only (re)stores the snapshot.
    pub async fn publish_batch(
        &self,
        events: &[TopologyEvent],
        snapshot: &NodeSnapshot,
    ) -> Result<(), BusError> {
        match &self.transport {
            Transport::InProcess(bus) => bus.publish_batch(events, snapshot),
            Transport::Nats(bus) => bus.publish_batch(events, snapshot).await,
        }
    }

    /// Follows the whole fleet: every node's stored state first, then ordered events. Epochs
    /// are checked against the system's wall clock.
    pub async fn subscribe(&self) -> Result<Subscription, BusError> {
        self.subscribe_with_clock(edgeroute_core::clock::system()).await
    }

    /// [`Bus::subscribe`] with the wall clock (Unix ms) that caps epochs given.
    pub async fn subscribe_with_clock(&self, clock: WallClock) -> Result<Subscription, BusError> {
        match &self.transport {
            Transport::InProcess(bus) => {
                Ok(Subscription::in_process(bus.clone(), &self.config, clock))
            }
            Transport::Nats(bus) => Subscription::nats(bus.clone(), &self.config, clock).await,
        }
    }

    /// Puts a routing policy text (an admin's act: on NATS only the admin role may) and
    /// returns its revision. Nothing is parsed here; a text over `max_policy_bytes` is refused.
    pub async fn put_policy(&self, text: &str) -> Result<u64, BusError> {
        match &self.transport {
            Transport::InProcess(bus) => bus.policy().put(text, self.config.max_policy_bytes),
            Transport::Nats(bus) => bus.put_policy(text, &self.config).await,
        }
    }

    /// Follows the policy texts: the current one first (a replica that starts late gets it at
    /// once), then each new one. On NATS the bucket must exist (the first push creates it):
    /// until then this fails and the caller retries.
    pub async fn watch_policy(&self) -> Result<PolicyWatch, BusError> {
        match &self.transport {
            Transport::InProcess(bus) => Ok(bus.policy().watch()),
            Transport::Nats(bus) => bus.watch_policy(&self.config).await,
        }
    }

    /// The rollout state stored under `key` (a model) and its revision, if any
    /// ([`crate::rollout`]).
    pub async fn rollout_get(&self, key: &str) -> Result<Option<(u64, Vec<u8>)>, BusError> {
        match &self.transport {
            Transport::InProcess(bus) => bus.rollouts().get(key),
            Transport::Nats(bus) => bus.rollout_get(key, &self.config).await,
        }
    }

    /// Writes the rollout state under `key` if its revision is still `expected` (`None`: only
    /// if there is none yet), and returns the new revision; else [`BusError::Conflict`].
    pub async fn rollout_put(
        &self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
    ) -> Result<u64, BusError> {
        match &self.transport {
            Transport::InProcess(bus) => bus.rollouts().put(key, value, expected),
            Transport::Nats(bus) => bus.rollout_put(key, value, expected, &self.config).await,
        }
    }

    /// Acknowledges a policy text on `<policy_status_prefix>.<replica>`.
    pub async fn publish_policy_status(&self, status: &PolicyStatus) -> Result<(), BusError> {
        match &self.transport {
            Transport::InProcess(bus) => bus.policy().publish_status(status),
            Transport::Nats(bus) => bus.publish_policy_status(status, &self.config).await,
        }
    }

    /// Every replica's acknowledgements from now on (subscribe before putting).
    pub async fn policy_statuses(&self) -> Result<PolicyStatuses, BusError> {
        match &self.transport {
            Transport::InProcess(bus) => Ok(bus.policy().statuses()),
            Transport::Nats(bus) => bus.policy_statuses(&self.config).await,
        }
    }

    /// Changes each time the transport (re)connects; `None` for the embedded bus, which never
    /// disconnects.
    pub(crate) fn connections(&self) -> Option<watch::Receiver<u64>> {
        match &self.transport {
            Transport::InProcess(_) => None,
            Transport::Nats(bus) => Some(bus.connections()),
        }
    }
}
