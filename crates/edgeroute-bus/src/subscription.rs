//! A subscriber's stream of fleet updates, kept in order and repaired when messages go missing.
//!
//! [`Subscription`] is a [`Stream`] of [`FleetUpdate`]s driven entirely by its consumer's polls:
//! no task is spawned, and [`Subscription::view`] borrows the state directly. Internally:
//!
//! 1. it subscribes to the events *first*, then reads every stored snapshot, so nothing
//!    published in between is missed (events it already covers come out as stale);
//! 2. each event is checked against the [`FleetView`]; a gap (or a node restarted mid-stream)
//!    fetches that node's stored snapshot, and the events held meanwhile are replayed on it;
//! 3. a lagged in-process receiver, or a NATS reconnection, rereads every snapshot, since
//!    any node may have changed unseen;
//! 4. a timer expires nodes that fell silent (no heartbeat for `expire_ms`), except while the
//!    subscriber's own connection is down: then the silence is its own, not the nodes'; nodes
//!    silent for `forget_ms` more are dropped;
//! 5. the view's limits ([`crate::ViewLimits`], from [`BusConfig`]) apply to every message:
//!    epochs are checked against the wall clock the subscription is given, and a node the view
//!    does not hold gets in only through its stored snapshot.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use edgeroute_core::clock::WallClock;
use edgeroute_proto::topology::{NodeSnapshot, TopologyEvent};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, Stream};
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, WatchStream};

use crate::BusError;
use crate::config::BusConfig;
use crate::inprocess::InProcessBus;
use crate::nats::NatsBus;
use crate::view::{Applied, FleetView, SnapshotApplied};
use crate::wire::{self, Rejected};

/// Events held per node while its snapshot is being fetched; beyond this the oldest go (the
/// snapshot covers them anyway).
const MAX_HELD_PER_NODE: usize = 256;
const RETRY_MIN: Duration = Duration::from_millis(50);

/// One change to the fleet, in the order the subscriber should apply it.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetUpdate {
    /// A node's full state: initially for every known node, later after a resync. Replaces
    /// whatever was known of the node.
    Snapshot(NodeSnapshot),
    /// The next event of its node (already ordering-checked and folded into the view).
    Event(TopologyEvent),
    /// The node fell silent past `expire_ms`; the view now shows it down.
    Expired(String),
}

/// A stream of [`FleetUpdate`]s and the [`FleetView`] they add up to.
pub struct Subscription {
    core: Core,
    source: Source,
    expiry: Interval,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("nodes", &self.core.view.len())
            .field("counters", &self.core.view.counters())
            .finish()
    }
}

/// The transport-independent part: the view, and what is waiting to be yielded.
struct Core {
    view: FleetView,
    ready: VecDeque<FleetUpdate>,
    /// Events of nodes whose snapshot is being fetched, replayed once it arrives.
    held: BTreeMap<String, Vec<TopologyEvent>>,
    started: Instant,
    /// Unix ms, for the epoch cap only (liveness runs on `started`'s monotonic clock).
    clock: WallClock,
    expire_ms: u64,
    synced: bool,
}

enum Source {
    InProcess { bus: InProcessBus, events: BroadcastStream<Arc<TopologyEvent>> },
    Nats(Box<NatsSource>),
}

/// One node's stored snapshot, if any, decoded or rejected.
type Fetched = Result<Option<Result<NodeSnapshot, Rejected>>, BusError>;
/// Every stored snapshot.
type FetchedAll = Result<Vec<Result<NodeSnapshot, Rejected>>, BusError>;

struct NatsSource {
    bus: NatsBus,
    events: async_nats::Subscriber,
    connections: WatchStream<u64>,
    /// Reading every stored snapshot; while it runs, events wait in the subscriber's buffer.
    full_sync: Option<BoxFuture<'static, FetchedAll>>,
    /// When the last failed full sync is retried.
    retry: Option<Pin<Box<Sleep>>>,
    retry_delay: Duration,
    retry_max: Duration,
    fetches: FuturesUnordered<BoxFuture<'static, (String, Fetched)>>,
    fetching: BTreeSet<String>,
}

impl Core {
    fn new(cfg: &BusConfig, clock: WallClock) -> Self {
        Core {
            view: FleetView::with_limits(cfg.view_limits()),
            ready: VecDeque::new(),
            held: BTreeMap::new(),
            started: Instant::now(),
            clock,
            expire_ms: cfg.expire_ms,
            synced: false,
        }
    }

    fn wall_ms(&self) -> u64 {
        (self.clock)()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Applies one received event; returns the node whose snapshot must be fetched, if any.
    fn on_event(&mut self, ev: TopologyEvent) -> Option<String> {
        if let Some(held) = self.held.get_mut(&ev.node_id) {
            // A fetch for this node is in flight: replay after it.
            if held.len() >= MAX_HELD_PER_NODE {
                held.remove(0);
            }
            held.push(ev);
            return None;
        }
        match self.view.apply_event(&ev, self.now_ms(), self.wall_ms()) {
            Applied::Folded => {
                self.ready.push_back(FleetUpdate::Event(ev));
                None
            }
            Applied::Stale | Applied::Refused(_) => None,
            // Fetches in flight are bounded like the view: at most one per node it may hold.
            Applied::NeedsResync(_) if self.held.len() >= self.view.limits().max_nodes => None,
            Applied::NeedsResync(node) => {
                self.held.insert(node.clone(), vec![ev]);
                Some(node)
            }
        }
    }

    /// Applies a fetched snapshot of `node` (or the lack of one) and replays the held events.
    fn on_fetched(&mut self, node: &str, fetched: Fetched) {
        match fetched {
            Ok(Some(Ok(snap))) => self.on_snapshot(snap),
            Ok(Some(Err(why))) => self.view.note_rejected(why),
            Ok(None) => tracing::debug!(node, "no stored snapshot to resync from"),
            Err(error) => tracing::debug!(node, %error, "resync fetch failed"),
        }
        let mut held = self.held.remove(node).unwrap_or_default();
        held.sort_by_key(|e| (e.epoch, e.seq));
        let (now, wall) = (self.now_ms(), self.wall_ms());
        for ev in held {
            // Whatever still does not fit is dropped: the store is always at least as new as
            // any event sent, so a remaining gap is a lost fetch, and the node's next event
            // (a heartbeat at the latest) asks again.
            if self.view.apply_event(&ev, now, wall) == Applied::Folded {
                self.ready.push_back(FleetUpdate::Event(ev));
            }
        }
    }

    fn on_snapshot(&mut self, snap: NodeSnapshot) {
        let node = snap.node_id.clone();
        if self.view.apply_snapshot(snap, self.now_ms(), self.wall_ms())
            == SnapshotApplied::Replaced
            && let Some(current) = self.view.node(&node)
        {
            self.ready.push_back(FleetUpdate::Snapshot(current.clone()));
        }
    }

    fn on_full_sync(&mut self, snapshots: Vec<Result<NodeSnapshot, Rejected>>) {
        for snap in snapshots {
            match snap {
                Ok(snap) => self.on_snapshot(snap),
                Err(why) => self.view.note_rejected(why),
            }
        }
        self.synced = true;
    }

    /// The expiry check. `hearing` says whether our own transport is up: while it is not,
    /// nodes' silence is ours, so their clocks are restarted instead of expired.
    fn on_tick(&mut self, hearing: bool) {
        let now = self.now_ms();
        if !hearing {
            self.view.touch_all(now);
            return;
        }
        for node in self.view.expire(now, self.expire_ms) {
            tracing::info!(node = %node, "topology: node silent, marked down");
            self.ready.push_back(FleetUpdate::Expired(node));
        }
    }
}

impl Subscription {
    fn with_source(cfg: &BusConfig, core: Core, source: Source) -> Self {
        // Expiry is checked a few times per timeout: a silent node is noticed within
        // `expire_ms` plus a sixth of it.
        let period = Duration::from_millis((cfg.expire_ms / 6).max(10));
        let mut expiry = tokio::time::interval_at(Instant::now() + period, period);
        expiry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Subscription { core, source, expiry }
    }

    pub(crate) fn in_process(bus: InProcessBus, cfg: &BusConfig, clock: WallClock) -> Self {
        let mut core = Core::new(cfg, clock);
        // Receiver first, then the map: an event sent in between is both in the map and in
        // the receiver, and comes out stale; never missing.
        let events = BroadcastStream::new(bus.receiver());
        core.on_full_sync(bus.snapshots().into_iter().map(Ok).collect());
        Self::with_source(cfg, core, Source::InProcess { bus, events })
    }

    pub(crate) async fn nats(
        bus: NatsBus,
        cfg: &BusConfig,
        clock: WallClock,
    ) -> Result<Self, BusError> {
        // Subscribe first: the KV reads that follow travel on the same connection, so the
        // server registers the subscription before it answers them.
        let events = bus.subscribe_events().await?;
        let mut connections = bus.connections();
        connections.mark_unchanged();
        let mut source = NatsSource {
            bus,
            events,
            connections: WatchStream::from_changes(connections),
            full_sync: None,
            retry: None,
            retry_delay: RETRY_MIN,
            retry_max: cfg.reconnect_max(),
            fetches: FuturesUnordered::new(),
            fetching: BTreeSet::new(),
        };
        source.start_full_sync();
        Ok(Self::with_source(cfg, Core::new(cfg, clock), Source::Nats(Box::new(source))))
    }

    /// The fleet as of the updates processed so far (it may run ahead of the stream by the
    /// updates queued to be yielded).
    pub fn view(&self) -> &FleetView {
        &self.core.view
    }

    /// Whether a read of every stored snapshot has completed. Until then the view may lack
    /// nodes (NATS down at start-up, say); it fills in once the store can be read.
    pub fn is_synced(&self) -> bool {
        self.core.synced
    }
}

impl NatsSource {
    fn start_full_sync(&mut self) {
        let bus = self.bus.clone();
        self.retry = None;
        self.full_sync = Some(async move { bus.fetch_all().await }.boxed());
    }

    fn start_fetch(&mut self, node: String) {
        if self.fetching.insert(node.clone()) {
            let bus = self.bus.clone();
            self.fetches.push(
                async move {
                    let fetched = bus.fetch(&node).await;
                    (node, fetched)
                }
                .boxed(),
            );
        }
    }

    /// Polls everything this source waits on once; `Ready(true)` if something happened,
    /// `Ready(false)` when the event stream has ended for good.
    fn poll(&mut self, cx: &mut Context<'_>, core: &mut Core) -> Poll<bool> {
        let mut progressed = false;
        // A reconnection: anything may have changed unseen, so read everything again.
        while let Poll::Ready(Some(_)) = Pin::new(&mut self.connections).poll_next(cx) {
            // We heard nothing while cut off: give every node a full timeout to speak again.
            let now = core.now_ms();
            core.view.touch_all(now);
            self.retry_delay = RETRY_MIN;
            self.start_full_sync();
            progressed = true;
        }
        if let Some(retry) = &mut self.retry
            && retry.as_mut().poll(cx).is_ready()
        {
            self.start_full_sync();
            progressed = true;
        }
        if let Some(sync) = &mut self.full_sync
            && let Poll::Ready(result) = sync.as_mut().poll(cx)
        {
            self.full_sync = None;
            progressed = true;
            match result {
                Ok(snapshots) => {
                    self.retry_delay = RETRY_MIN;
                    core.on_full_sync(snapshots);
                }
                Err(error) => {
                    let retry_in = self.retry_delay;
                    tracing::debug!(%error, ?retry_in, "topology full sync failed");
                    self.retry = Some(Box::pin(tokio::time::sleep(self.retry_delay)));
                    self.retry_delay = (self.retry_delay * 2).min(self.retry_max);
                }
            }
        }
        while let Poll::Ready(Some((node, fetched))) = Pin::new(&mut self.fetches).poll_next(cx) {
            self.fetching.remove(&node);
            core.on_fetched(&node, fetched);
            progressed = true;
        }
        // Events wait (buffered by the client) while a full sync is in flight, so they are
        // checked against the stored state rather than each asking for its own fetch. Not
        // while a failed one waits for its retry: the stream keeps flowing, degraded.
        if self.full_sync.is_none() {
            match Pin::new(&mut self.events).poll_next(cx) {
                Poll::Ready(Some(msg)) => {
                    progressed = true;
                    match wire::decode_event(self.bus.prefix(), msg.subject.as_str(), &msg.payload)
                    {
                        Ok(ev) => {
                            if let Some(node) = core.on_event(ev) {
                                // Polled on the next round, which `progressed` guarantees.
                                self.start_fetch(node);
                            }
                        }
                        Err(why) => {
                            let subject = msg.subject.as_str();
                            tracing::debug!(subject, ?why, "rejected topology message");
                            core.view.note_rejected(why);
                        }
                    }
                }
                Poll::Ready(None) => return Poll::Ready(false),
                Poll::Pending => {}
            }
        }
        if progressed { Poll::Ready(true) } else { Poll::Pending }
    }
}

impl Stream for Subscription {
    type Item = FleetUpdate;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FleetUpdate>> {
        let this = self.get_mut();
        loop {
            if let Some(update) = this.core.ready.pop_front() {
                return Poll::Ready(Some(update));
            }
            let mut progressed = false;
            if this.expiry.poll_tick(cx).is_ready() {
                let hearing = match &this.source {
                    Source::InProcess { .. } => true,
                    Source::Nats(source) => source.bus.is_connected(),
                };
                this.core.on_tick(hearing);
                progressed = true;
            }
            let polled = match &mut this.source {
                Source::InProcess { bus, events } => {
                    poll_in_process(bus, events, cx, &mut this.core)
                }
                Source::Nats(source) => source.poll(cx, &mut this.core),
            };
            match polled {
                Poll::Ready(true) => progressed = true,
                Poll::Ready(false) => {
                    // The transport is gone for good; still hand out what was queued.
                    return Poll::Ready(this.core.ready.pop_front());
                }
                Poll::Pending => {}
            }
            if !progressed && this.core.ready.is_empty() {
                return Poll::Pending;
            }
        }
    }
}

fn poll_in_process(
    bus: &InProcessBus,
    events: &mut BroadcastStream<Arc<TopologyEvent>>,
    cx: &mut Context<'_>,
    core: &mut Core,
) -> Poll<bool> {
    match Pin::new(events).poll_next(cx) {
        Poll::Ready(Some(Ok(ev))) => {
            if let Some(node) = core.on_event(TopologyEvent::clone(&ev)) {
                // The map is in this process: the "fetch" completes at once.
                let fetched = Ok(bus.snapshot(&node).map(Ok));
                core.on_fetched(&node, fetched);
            }
            Poll::Ready(true)
        }
        Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
            // The receiver skipped `missed` events of unknown nodes: reread every snapshot.
            tracing::warn!(missed, "topology subscriber lagged; resyncing from snapshots");
            core.view.note_lagged();
            core.on_full_sync(bus.snapshots().into_iter().map(Ok).collect());
            Poll::Ready(true)
        }
        Poll::Ready(None) => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    }
}
