//! The node's side: owns its topology state and feeds the bus without ever blocking on it.
//!
//! [`Publisher::publish`] is synchronous and O(1): it numbers the event, folds it into the
//! node's [`NodeSnapshot`] and queues it, all under a short lock. A background task sends the
//! queue (snapshot first, then the events it covers) and deals with the bus being slow or
//! gone: it retries with capped exponential backoff, keeps at most `max_buffered_events`
//! events (dropping the oldest, counted: subscribers resync from the snapshot, so a drop loses
//! detail, never the final state), and after a reconnection republishes the full snapshot.
//! Inference never waits for the bus.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use edgeroute_proto::topology::{EventKind, NodeSnapshot, TopologyEvent};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::BusError;
use crate::bus::Bus;
use crate::config::BusConfig;
use crate::wire::check_node;

/// Most events sent under one snapshot write.
const MAX_BATCH: usize = 64;
const RETRY_MIN: Duration = Duration::from_millis(50);

/// Unix milliseconds, for the informative `at_ms` of events: the one wall-clock seam
/// (`edgeroute_core::clock`), injected so tests control it.
pub use edgeroute_core::clock::{WallClock as Clock, system as system_clock};

/// Who the node is on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `[A-Za-z0-9_-]+`, unique in the fleet.
    pub node_id: String,
    /// `[A-Za-z0-9_-]+`.
    pub region: String,
    /// Where clients reach the node.
    pub url: String,
    /// This process run (e.g. its start time in Unix ms): must grow across restarts, so
    /// subscribers tell a restarted node from a replayed old one.
    pub epoch: u64,
}

/// Publisher timing and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherOptions {
    pub heartbeat: Duration,
    pub max_buffered_events: usize,
    /// Longest wait between two attempts while the bus is failing.
    pub retry_max: Duration,
    /// Longest a single send may take before it counts as failed.
    pub send_timeout: Duration,
}

impl PublisherOptions {
    pub fn from_config(cfg: &BusConfig) -> Self {
        PublisherOptions {
            heartbeat: cfg.heartbeat(),
            max_buffered_events: cfg.max_buffered_events,
            retry_max: cfg.reconnect_max(),
            send_timeout: cfg.op_timeout() * 2,
        }
    }
}

/// Counters of one publisher.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Events handed to the bus successfully.
    pub published: u64,
    /// Events dropped unsent (buffer full while the bus was away, or rejected by it).
    pub dropped: u64,
    /// Times sending resumed after the bus had been unavailable (the full state was
    /// republished each time).
    pub reconnects: u64,
    /// Failed send attempts.
    pub failures: u64,
    /// Events queued now.
    pub queued: usize,
}

/// The node's topology publisher. Dropping it stops the background task without a goodbye
/// (subscribers notice by expiry); call [`Publisher::shutdown`] to say `NodeDown`.
pub struct Publisher {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("stats", &self.stats()).finish()
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    clock: Clock,
    published: AtomicU64,
    reconnects: AtomicU64,
    failures: AtomicU64,
}

/// The node's state and its unsent events.
#[derive(Debug)]
struct State {
    snapshot: NodeSnapshot,
    queue: VecDeque<TopologyEvent>,
    capacity: usize,
    dropped: u64,
    closing: bool,
}

impl State {
    fn new(snapshot: NodeSnapshot, capacity: usize) -> Self {
        State {
            snapshot,
            queue: VecDeque::new(),
            capacity: capacity.max(1),
            dropped: 0,
            closing: false,
        }
    }

    /// Numbers, folds and queues the node's next event.
    fn push(&mut self, kind: EventKind, at_ms: u64) -> TopologyEvent {
        let ev = TopologyEvent {
            node_id: self.snapshot.node_id.clone(),
            region: self.snapshot.region.clone(),
            epoch: self.snapshot.epoch,
            seq: self.snapshot.seq + 1,
            at_ms,
            kind,
        };
        self.snapshot.apply(&ev);
        self.queue.push_back(ev.clone());
        while self.queue.len() > self.capacity {
            self.queue.pop_front();
            self.dropped += 1;
        }
        ev
    }

    /// The oldest queued events and the snapshot that covers them (and everything queued).
    fn batch(&self) -> (Vec<TopologyEvent>, NodeSnapshot) {
        (self.queue.iter().take(MAX_BATCH).cloned().collect(), self.snapshot.clone())
    }

    /// Forgets sent events, up to `seq`. Events dropped while the send was in flight may
    /// have shifted the queue, hence by sequence rather than by count.
    fn ack(&mut self, seq: u64) {
        while self.queue.front().is_some_and(|e| e.seq <= seq) {
            self.queue.pop_front();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // State changes are single assignments and pushes: a panic cannot leave them torn.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, kind: EventKind) -> TopologyEvent {
        let at_ms = (self.clock)();
        let ev = self.lock().push(kind, at_ms);
        self.wake.notify_one();
        ev
    }
}

impl Publisher {
    /// Starts publishing for `node`: queues its `NodeUp` (seq 1) and spawns the sender on the
    /// current tokio runtime. Fails only for an invalid node id or region, never because the
    /// bus is down.
    pub fn spawn(
        bus: Bus,
        node: NodeIdentity,
        options: PublisherOptions,
        clock: Clock,
    ) -> Result<Publisher, BusError> {
        check_node(&node.node_id, &node.region)?;
        // Subscribers rebuild a node from its first event alone, so the publisher starts from
        // the same empty state (no models) and says everything else with events.
        let snapshot = NodeSnapshot::new(node.node_id, node.region, node.url.clone(), node.epoch);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(snapshot, options.max_buffered_events)),
            wake: Notify::new(),
            clock,
            published: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        shared.publish(EventKind::NodeUp { url: node.url });
        let task = tokio::spawn(run(shared.clone(), bus, options));
        Ok(Publisher { shared, task: Some(task) })
    }

    /// Records a change of this node and queues it for the bus. Never blocks on the bus.
    pub fn publish(&self, kind: EventKind) -> TopologyEvent {
        self.shared.publish(kind)
    }

    /// The node's current state (what the bus will store).
    pub fn snapshot(&self) -> NodeSnapshot {
        self.shared.lock().snapshot.clone()
    }

    pub fn stats(&self) -> PublisherStats {
        let (dropped, queued) = {
            let state = self.shared.lock();
            (state.dropped, state.queue.len())
        };
        PublisherStats {
            published: self.shared.published.load(Ordering::Relaxed),
            dropped,
            reconnects: self.shared.reconnects.load(Ordering::Relaxed),
            failures: self.shared.failures.load(Ordering::Relaxed),
            queued,
        }
    }

    /// Says `NodeDown` and waits up to `timeout` for everything queued to go out. Returns
    /// whether it did; either way the background task is stopped.
    pub async fn shutdown(mut self, timeout: Duration) -> bool {
        self.publish(EventKind::NodeDown);
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        let Some(mut task) = self.task.take() else { return false };
        match tokio::time::timeout(timeout, &mut task).await {
            Ok(_) => self.shared.lock().queue.is_empty(),
            Err(_) => {
                task.abort();
                false
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits for the next connection count; never resolves for a bus that does not reconnect.
async fn next_connection(connections: &mut Option<watch::Receiver<u64>>) -> Option<u64> {
    match connections {
        Some(rx) => rx.changed().await.ok().map(|()| *rx.borrow_and_update()),
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The sender: drains the queue to the bus, heartbeats, and recovers from outages.
async fn run(shared: Arc<Shared>, bus: Bus, options: PublisherOptions) {
    let mut heartbeat =
        tokio::time::interval_at(Instant::now() + options.heartbeat, options.heartbeat);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut connections = bus.connections();
    if let Some(rx) = &mut connections {
        // The connection we may already be on is not news; the next one is.
        rx.borrow_and_update();
    }
    let mut delay = RETRY_MIN;
    let mut retry_at: Option<Instant> = None;
    // Set when the bus was unavailable (or reconnected) since the last successful send.
    let mut resumed = false;
    let mut republish = false;
    loop {
        let (events, snapshot, closing) = {
            let state = shared.lock();
            let (events, snapshot) = state.batch();
            (events, snapshot, state.closing)
        };
        if retry_at.is_none() && (!events.is_empty() || republish) {
            let sent =
                tokio::time::timeout(options.send_timeout, bus.publish_batch(&events, &snapshot));
            let result = match sent.await {
                Ok(result) => result,
                Err(_) => Err(BusError::Timeout { op: "publish", after: options.send_timeout }),
            };
            let last_seq = events.last().map_or(0, |e| e.seq);
            match result {
                Ok(()) => {
                    shared.lock().ack(last_seq);
                    shared.published.fetch_add(events.len() as u64, Ordering::Relaxed);
                    if resumed {
                        shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(
                            node = %snapshot.node_id,
                            "topology bus back: full state republished"
                        );
                    }
                    (resumed, republish, delay) = (false, false, RETRY_MIN);
                }
                Err(error) if !error.is_retryable() => {
                    // Sending it again would fail the same way: drop it, loudly.
                    tracing::error!(
                        node = %snapshot.node_id,
                        %error,
                        "topology events rejected, dropped"
                    );
                    let mut state = shared.lock();
                    let before = state.queue.len();
                    state.ack(last_seq);
                    state.dropped += (before - state.queue.len()) as u64;
                    republish = false;
                }
                Err(error) => {
                    tracing::debug!(
                        node = %snapshot.node_id,
                        %error,
                        retry_in = ?delay,
                        "topology publish failed"
                    );
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    resumed = true;
                    retry_at = Some(Instant::now() + delay);
                    delay = (delay * 2).min(options.retry_max);
                }
            }
            continue;
        }
        if closing && events.is_empty() && !republish {
            return;
        }
        tokio::select! {
            () = shared.wake.notified(), if retry_at.is_none() => {}
            () = sleep_until(retry_at), if retry_at.is_some() => retry_at = None,
            _ = heartbeat.tick(), if !closing => {
                shared.publish(EventKind::Heartbeat);
            }
            connected = next_connection(&mut connections) => match connected {
                Some(count) => {
                    // A (re)connection: store the full state now rather than at the next
                    // backoff step, so subscribers that resync find it.
                    resumed |= count > 1;
                    republish = true;
                    retry_at = None;
                    delay = RETRY_MIN;
                }
                None => connections = None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(capacity: usize) -> State {
        State::new(NodeSnapshot::new("n", "r", "http://n", 7), capacity)
    }

    #[test]
    fn events_are_numbered_and_folded() {
        let mut s = state(8);
        let a = s.push(EventKind::NodeUp { url: "http://n".into() }, 1);
        let b = s.push(EventKind::ModelReady { model: "m".into(), gpu: None, version: None }, 2);
        assert_eq!((a.seq, b.seq, b.epoch, b.at_ms), (1, 2, 7, 2));
        assert_eq!(s.snapshot.seq, 2);
        assert_eq!(s.snapshot.ready_models().collect::<Vec<_>>(), ["m"]);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_and_counts() {
        let mut s = state(3);
        for _ in 0..5 {
            s.push(EventKind::Heartbeat, 0);
        }
        let seqs: Vec<u64> = s.queue.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(s.dropped, 2);
        assert_eq!(s.snapshot.seq, 5, "the snapshot keeps everything");
    }

    #[test]
    fn ack_forgets_by_sequence_even_after_drops() {
        let mut s = state(3);
        for _ in 0..3 {
            s.push(EventKind::Heartbeat, 0);
        }
        let (batch, snap) = s.batch();
        assert_eq!((batch.len(), snap.seq), (3, 3));
        // Two more arrive while the batch is in flight; one old event is dropped.
        s.push(EventKind::Heartbeat, 0);
        s.push(EventKind::Heartbeat, 0);
        s.ack(batch.last().map_or(0, |e| e.seq));
        let seqs: Vec<u64> = s.queue.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [4, 5]);
    }
}
