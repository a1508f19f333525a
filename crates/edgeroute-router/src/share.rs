//! Router replicas share what they learn of the nodes (issue 16): each replica's own
//! ejections — nodes its one shared [`Client`] ejected after failures it saw — and recoveries
//! travel over the topology bus, and every replica treats a node another one ejected as
//! ejected until the time it was given ([`Client::apply_remote_ejection`]: never tried first
//! unless every candidate is ejected, never longer than the client's own longest backoff,
//! never touching its own failure counts). Each replica still answers from its local state:
//! nothing here is on the request path, and a dead bus only stops the sharing.
//!
//! On the wire: one JSON [`ShareMessage`] per event on [`SUBJECT`] (NATS core pub/sub: at
//! most once, which suits soft state that expires on its own within `eject_backoff.max`).
//! Every message carries its format version (`v`, [`WIRE_VERSION`]); a message of another
//! version, over [`MAX_MESSAGE_BYTES`], malformed, naming a node or replica that is not a
//! valid name, from this replica itself, or whose `until` has passed (or lies absurdly far
//! ahead) is ignored and counted. A replica that starts late learns only later ejections.
//!
//! Transports: a NATS [`Bus`] publishes and subscribes on the subject with its own client.
//! The embedded bus (one process: tests, the lab) has no subject of its own for this: the
//! replicas that hold clones of one embedded `Bus` share an in-process channel, found by
//! that bus's identity.
//!
//! NATS permissions: the router's user (`edgeroute bus credentials --router NAME`) may
//! publish and subscribe on [`SUBJECT`] and the job wake-up subjects, nothing else.
//!
//! The routing policy's version travels the same way: when a replica's discovery answers
//! name a new version, the others mark every list decided under another for revalidation at
//! its next use ([`Client::apply_remote_policy_version`]), so a pushed policy reaches every
//! replica's callers within a request, not within a list's TTL. Replicas converge on what
//! their own discovery says: a message only prompts the question.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use edgeroute_bus::{Bus, BusConfig, Transport};
use edgeroute_client::{Client, EjectionEvent};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Where replicas announce ejections and recoveries.
pub const SUBJECT: &str = edgeroute_bus::credentials::ROUTER_SHARE_SUBJECT;

/// The format of [`ShareMessage`] this version writes and reads.
pub const WIRE_VERSION: u32 = 1;

/// Largest message read or written.
pub const MAX_MESSAGE_BYTES: usize = 2048;

/// A reason longer than this is cut.
pub const MAX_REASON_BYTES: usize = 256;

/// A policy version longer than this is not shared (nor taken in).
pub const MAX_POLICY_VERSION_BYTES: usize = 128;

/// What a replica concluded about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Ejected after failures this replica saw, until `until_unix_ms`.
    Ejected,
    /// Served this replica again after an ejection.
    Rejoined,
    /// Discovery now answers this replica under routing policy `policy_version` (`node` is
    /// empty).
    Policy,
}

/// One replica's word about one node (JSON on [`SUBJECT`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareMessage {
    /// [`WIRE_VERSION`].
    pub v: u32,
    /// The replica that says it (`[router] id`).
    pub replica: String,
    pub node: String,
    pub verdict: Verdict,
    /// Until when the node is ejected (Unix ms); 0 for a recovery.
    #[serde(default)]
    pub until_unix_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// With [`Verdict::Policy`]: the routing policy's version.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub policy_version: String,
}

impl ShareMessage {
    /// This replica's `event`, for the wire.
    pub fn of(replica: &str, event: &EjectionEvent) -> ShareMessage {
        match event {
            EjectionEvent::Ejected(e) => ShareMessage {
                v: WIRE_VERSION,
                replica: replica.to_owned(),
                node: e.node_id.clone(),
                verdict: Verdict::Ejected,
                until_unix_ms: e.until_unix_ms,
                reason: cut(&e.reason, MAX_REASON_BYTES),
                policy_version: String::new(),
            },
            EjectionEvent::Rejoined { node_id } => ShareMessage {
                v: WIRE_VERSION,
                replica: replica.to_owned(),
                node: node_id.clone(),
                verdict: Verdict::Rejoined,
                until_unix_ms: 0,
                reason: String::new(),
                policy_version: String::new(),
            },
            EjectionEvent::PolicyVersion { version } => ShareMessage {
                v: WIRE_VERSION,
                replica: replica.to_owned(),
                node: String::new(),
                verdict: Verdict::Policy,
                until_unix_ms: 0,
                reason: String::new(),
                policy_version: cut(version, MAX_POLICY_VERSION_BYTES),
            },
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A node id or replica id: a subject-safe token of at most [`MAX_NAME`] bytes (the fleet's
/// rule for names).
fn is_name(s: &str) -> bool {
    s.len() <= MAX_NAME && edgeroute_bus::wire::check_token("name", s).is_ok()
}

/// Longest node or replica id.
pub const MAX_NAME: usize = 64;

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// What became of one message off the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The node is now treated as ejected here until then.
    Ejected { node: String, until_unix_ms: u64 },
    /// The remote ejection of the node ended here.
    Rejoined { node: String },
    /// Another replica's discovery answers come from policy `version`: `expired` lists here
    /// decided under another are asked for again at their next use.
    Policy { version: String, expired: usize },
    /// This replica's own message, echoed back.
    Own,
    /// An ejection whose time has passed (or lies further ahead than `max_ahead`).
    Stale,
    /// Another format version.
    OtherVersion(u32),
    /// Oversized, not JSON of the format, or an invalid node or replica name.
    Malformed,
}

/// Settings of [`run`]; every field has a default.
#[derive(Debug, Clone)]
pub struct ShareOptions {
    /// The subject on NATS. Default [`SUBJECT`].
    pub subject: String,
    /// An ejection further ahead than this is refused as bogus (the client caps what it
    /// applies at its own `eject_backoff.max` in any case). Default 10 minutes.
    pub max_ahead: Duration,
    /// A NATS publish that takes longer is given up (the bus is down). Default 2 s.
    pub publish_timeout: Duration,
    /// Messages buffered between the embedded bus's replicas. Default 1024.
    pub channel_capacity: usize,
}

impl Default for ShareOptions {
    fn default() -> Self {
        ShareOptions {
            subject: SUBJECT.to_owned(),
            max_ahead: Duration::from_secs(600),
            publish_timeout: Duration::from_secs(2),
            channel_capacity: 1024,
        }
    }
}

/// Counts of what the sharing did (for `/metrics`).
#[derive(Debug, Default)]
pub struct ShareCounters {
    pub published: AtomicU64,
    pub publish_failures: AtomicU64,
    pub applied_ejections: AtomicU64,
    pub applied_rejoins: AtomicU64,
    /// Policy versions other replicas announced (each marking the lists decided under
    /// another for revalidation).
    pub applied_policy_versions: AtomicU64,
    pub ignored_stale: AtomicU64,
    pub ignored_malformed: AtomicU64,
    pub ignored_other_version: AtomicU64,
    /// Local events a slow publisher missed, or messages a slow reader missed (embedded).
    pub lagged: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("replica id `{0}` is not a valid name ([A-Za-z0-9_-], at most 64 bytes)")]
    ReplicaId(String),
    #[error("subscribing to {subject}: {error}")]
    Subscribe { subject: String, error: String },
}

/// Applies one message off the bus to `client`; `now_unix_ms` is this machine's wall clock.
pub fn handle(
    client: &Client,
    replica: &str,
    payload: &[u8],
    now_unix_ms: u64,
    max_ahead: Duration,
) -> Handled {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Handled::Malformed;
    }
    #[derive(Deserialize)]
    struct Versioned {
        v: u32,
    }
    match serde_json::from_slice::<Versioned>(payload) {
        Ok(Versioned { v }) if v != WIRE_VERSION => return Handled::OtherVersion(v),
        Ok(_) => {}
        Err(_) => return Handled::Malformed,
    }
    let Ok(m) = serde_json::from_slice::<ShareMessage>(payload) else { return Handled::Malformed };
    if !is_name(&m.replica) {
        return Handled::Malformed;
    }
    if m.verdict == Verdict::Policy {
        let v = &m.policy_version;
        if v.is_empty() || v.len() > MAX_POLICY_VERSION_BYTES || v.chars().any(char::is_control) {
            return Handled::Malformed;
        }
    } else if !is_name(&m.node) {
        return Handled::Malformed;
    }
    if m.replica == replica {
        return Handled::Own;
    }
    match m.verdict {
        Verdict::Policy => {
            let expired = client.apply_remote_policy_version(&m.policy_version);
            Handled::Policy { version: m.policy_version, expired }
        }
        Verdict::Ejected => {
            let too_far = now_unix_ms.saturating_add(max_ahead.as_millis() as u64);
            if m.until_unix_ms <= now_unix_ms || m.until_unix_ms > too_far {
                return Handled::Stale;
            }
            if !client.apply_remote_ejection(&m.node, m.until_unix_ms) {
                return Handled::Stale;
            }
            Handled::Ejected { node: m.node, until_unix_ms: m.until_unix_ms }
        }
        Verdict::Rejoined => {
            client.clear_remote_ejection(&m.node);
            Handled::Rejoined { node: m.node }
        }
    }
}

/// Shares `client`'s ejections with the other replicas on `bus` and applies theirs, until the
/// client's event channel or the bus subscription closes. Spawn it beside the router.
pub async fn run(
    bus: Bus,
    client: Client,
    replica_id: String,
    opts: ShareOptions,
    counters: Arc<ShareCounters>,
) -> Result<(), ShareError> {
    if !is_name(&replica_id) {
        return Err(ShareError::ReplicaId(replica_id));
    }
    // Before anything else: no local ejection is missed while the link comes up.
    let local = client.ejections();
    match bus.transport() {
        Transport::Nats(nats) => {
            let nc = nats.client().clone();
            let subject = opts.subject.clone();
            let sub = nc.subscribe(subject.clone()).await.map_err(|e| ShareError::Subscribe {
                subject: subject.clone(),
                error: e.to_string(),
            })?;
            let incoming = sub.map(|m| m.payload.to_vec());
            let timeout = opts.publish_timeout;
            let publish = move |bytes: Vec<u8>| {
                let (nc, subject) = (nc.clone(), subject.clone());
                async move {
                    match tokio::time::timeout(timeout, nc.publish(subject, bytes.into())).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".to_owned()),
                    }
                }
            };
            pump(incoming, publish, local, &client, &replica_id, &opts, &counters).await;
        }
        Transport::InProcess(_) => {
            let hub = local_hub(&bus, opts.channel_capacity);
            let incoming = in_process(hub.subscribe(), counters.clone());
            let sender = hub.clone();
            let publish = move |bytes: Vec<u8>| {
                // No receiver: no other replica to tell.
                let _ = sender.send(Arc::from(bytes));
                std::future::ready(Ok::<(), String>(()))
            };
            // `hub` and `bus` live until this returns: the hub's entry stays this bus's.
            pump(incoming, publish, local, &client, &replica_id, &opts, &counters).await;
        }
    }
    Ok(())
}

async fn pump<S, P, Fut>(
    mut incoming: S,
    mut publish: P,
    mut local: broadcast::Receiver<EjectionEvent>,
    client: &Client,
    replica: &str,
    opts: &ShareOptions,
    counters: &ShareCounters,
) where
    S: Stream<Item = Vec<u8>> + Unpin,
    P: FnMut(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let add = |c: &AtomicU64| {
        c.fetch_add(1, Ordering::Relaxed);
    };
    loop {
        tokio::select! {
            ev = local.recv() => match ev {
                Ok(ev) => {
                    let bytes = ShareMessage::of(replica, &ev).encode();
                    match publish(bytes).await {
                        Ok(()) => add(&counters.published),
                        Err(e) => {
                            add(&counters.publish_failures);
                            tracing::debug!(error = %e, "router share: publish failed");
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    counters.lagged.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            payload = incoming.next() => {
                let Some(payload) = payload else { return };
                let now = edgeroute_core::clock::unix_ms();
                match handle(client, replica, &payload, now, opts.max_ahead) {
                    Handled::Ejected { node, until_unix_ms } => {
                        add(&counters.applied_ejections);
                        tracing::info!(%node, until_unix_ms, "router share: node ejected by another replica");
                    }
                    Handled::Rejoined { .. } => add(&counters.applied_rejoins),
                    Handled::Policy { version, expired } => {
                        add(&counters.applied_policy_versions);
                        tracing::info!(%version, expired, "router share: routing policy version from another replica");
                    }
                    Handled::Own => {}
                    Handled::Stale => add(&counters.ignored_stale),
                    Handled::OtherVersion(_) => add(&counters.ignored_other_version),
                    Handled::Malformed => add(&counters.ignored_malformed),
                }
            }
        }
    }
}

type Hub = broadcast::Sender<Arc<[u8]>>;

/// The in-process channel of the replicas sharing one embedded `bus`. Clones of a `Bus`
/// share its configuration's allocation: its address names the bus. An entry is live only
/// while some replica holds its hub, and a replica holds its bus as long as its hub, so a
/// live entry's address cannot have been reused by another bus.
fn local_hub(bus: &Bus, capacity: usize) -> Arc<Hub> {
    static HUBS: OnceLock<Mutex<HashMap<usize, Weak<Hub>>>> = OnceLock::new();
    let key = std::ptr::from_ref::<BusConfig>(bus.config()).addr();
    let mut hubs =
        HUBS.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
    hubs.retain(|_, h| h.strong_count() > 0);
    if let Some(hub) = hubs.get(&key).and_then(Weak::upgrade) {
        return hub;
    }
    let hub = Arc::new(broadcast::channel(capacity.max(1)).0);
    hubs.insert(key, Arc::downgrade(&hub));
    hub
}

/// An in-process receiver as a stream of payloads (a lag is counted and skipped).
fn in_process(
    rx: broadcast::Receiver<Arc<[u8]>>,
    counters: Arc<ShareCounters>,
) -> impl Stream<Item = Vec<u8>> + Unpin {
    Box::pin(futures_util::stream::unfold((rx, counters), |(mut rx, counters)| async move {
        loop {
            match rx.recv().await {
                Ok(p) => return Some((p.to_vec(), (rx, counters))),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    counters.lagged.fetch_add(n, Ordering::Relaxed);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Tests: a panic is a failed assertion.

    use super::*;
    use edgeroute_client::{ClientConfig, ClientError};
    use edgeroute_proto::discovery::DiscoverResponse;

    /// A directory of this test's own.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("edgeroute-share-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A client whose list for `m` (fresh, from its cache file) names two nodes that refuse
    /// connections, ejected at their first failure.
    fn client_with_dead_nodes(dir: &std::path::Path, name: &str) -> Client {
        let dead = |id: &str, region: &str| {
            serde_json::json!({
                "id": id, "region": region, "url": "http://127.0.0.1:1", "health": "ready",
                "models": ["m"], "queue_depth": 0, "in_flight": 0, "capacity": 4,
                "ttft_p50_ms": 20.0, "ttft_p99_ms": 40.0, "error_rate": 0.0,
                "cost_per_1k": 0.0, "score_ms": 20.0
            })
        };
        let answer: DiscoverResponse = serde_json::from_value(serde_json::json!({
            "model": "m", "strategy": "latency_first", "regions": [], "ttl_ms": 600_000,
            "stale_ok_ms": 600_000, "generation": 1, "generated_at_ms": 0, "replica": "d",
            "candidates": [dead("tor-1", "toronto"), dead("mtl-1", "montreal")]
        }))
        .unwrap();
        let path = dir.join(format!("{name}.json"));
        let mut cache = edgeroute_client::cache::ListCache::default();
        let key = edgeroute_client::cache::key("m", None, &[]);
        cache.put(key, answer, edgeroute_core::clock::unix_ms());
        cache.save(&path).unwrap();
        Client::new(ClientConfig {
            discovery: vec!["http://127.0.0.1:1".into()],
            cache_file: Some(path),
            eject_after: 1,
            probe_deadline: Duration::from_millis(50),
            seed: Some(1),
            ..ClientConfig::default()
        })
        .unwrap()
    }

    fn start(bus: &Bus, client: &Client, id: &str) -> Arc<ShareCounters> {
        let counters = Arc::new(ShareCounters::default());
        let (bus, client, id, c) = (bus.clone(), client.clone(), id.to_owned(), counters.clone());
        tokio::spawn(async move { run(bus, client, id, ShareOptions::default(), c).await });
        counters
    }

    async fn within(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let t = tokio::time::Instant::now();
        while t.elapsed() < limit {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        f()
    }

    #[tokio::test]
    async fn an_ejection_in_one_replica_shows_up_in_the_other() {
        let dir = scratch("eject");
        let bus = Bus::embedded(&BusConfig::default()).unwrap();
        let (a, b) = (client_with_dead_nodes(&dir, "a"), client_with_dead_nodes(&dir, "b"));
        let ca = start(&bus, &a, "router-tor");
        let cb = start(&bus, &b, "router-mtl");
        // A second, unrelated embedded bus: its replica hears nothing of the first's.
        let other_bus = Bus::embedded(&BusConfig::default()).unwrap();
        let c = client_with_dead_nodes(&dir, "c");
        start(&other_bus, &c, "router-van");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!b.is_ejected("tor-1") && !b.is_ejected("mtl-1"));

        // Replica A's requests fail on both nodes: it ejects them.
        let session = a.session("m").await.unwrap();
        let req = edgeroute_proto::ChatCompletionRequest::new(
            "m",
            vec![edgeroute_proto::ChatMessage::new(edgeroute_proto::Role::User, "hi")],
        );
        let e = session.chat(&req).await.unwrap_err();
        assert!(matches!(e, ClientError::Exhausted(_)), "{e}");
        assert!(a.is_ejected("tor-1") && a.is_ejected("mtl-1"));

        // Replica B treats them as ejected within the bound, without a request of its own.
        let bound = Duration::from_secs(2);
        assert!(within(bound, || b.is_ejected("tor-1") && b.is_ejected("mtl-1")).await);
        assert_eq!(ca.published.load(Ordering::Relaxed), 2);
        assert_eq!(cb.applied_ejections.load(Ordering::Relaxed), 2);
        // A ignored its own echo; the other bus's replica heard nothing.
        assert_eq!(ca.applied_ejections.load(Ordering::Relaxed), 0);
        assert!(!c.is_ejected("tor-1"));
        // B's session starts on them only because every candidate is ejected (fail open),
        // and B publishes nothing: a remote ejection is not B's own.
        assert_eq!(cb.published.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn own_stale_foreign_and_bogus_messages_are_ignored_and_a_rejoin_clears() {
        let dir = scratch("handle");
        let client = client_with_dead_nodes(&dir, "x");
        let now = edgeroute_core::clock::unix_ms();
        let ahead = Duration::from_secs(600);
        let msg = |replica: &str, node: &str, verdict, until| {
            ShareMessage {
                v: WIRE_VERSION,
                replica: replica.into(),
                node: node.into(),
                verdict,
                until_unix_ms: until,
                reason: "2 consecutive failures".into(),
                policy_version: String::new(),
            }
            .encode()
        };
        let h = |p: &[u8]| handle(&client, "me", p, now, ahead);
        assert_eq!(h(&msg("me", "tor-1", Verdict::Ejected, now + 5_000)), Handled::Own);
        assert!(!client.is_ejected("tor-1"));
        assert_eq!(h(&msg("peer", "tor-1", Verdict::Ejected, now - 1)), Handled::Stale);
        assert_eq!(h(&msg("peer", "tor-1", Verdict::Ejected, now + 3_600_000)), Handled::Stale);
        assert!(!client.is_ejected("tor-1"));
        assert_eq!(h(&msg("peer", "tor 1", Verdict::Ejected, now + 5_000)), Handled::Malformed);
        assert_eq!(h(b"{\"v\":2,\"anything\":true}"), Handled::OtherVersion(2));
        assert_eq!(h(b"not json"), Handled::Malformed);
        assert_eq!(h(&vec![b' '; MAX_MESSAGE_BYTES + 1]), Handled::Malformed);
        let extra = br#"{"v":1,"replica":"peer","node":"tor-1","verdict":"ejected","until_unix_ms":1,"x":1}"#;
        assert_eq!(h(extra), Handled::Malformed);

        let until = now + 5_000;
        assert_eq!(
            h(&msg("peer", "tor-1", Verdict::Ejected, until)),
            Handled::Ejected { node: "tor-1".into(), until_unix_ms: until }
        );
        assert!(client.is_ejected("tor-1"));
        assert_eq!(
            h(&msg("peer", "tor-1", Verdict::Rejoined, 0)),
            Handled::Rejoined { node: "tor-1".into() }
        );
        assert!(!client.is_ejected("tor-1"));
    }

    #[tokio::test]
    async fn a_policy_version_from_another_replica_marks_the_lists_for_revalidation() {
        let dir = scratch("policy");
        let client = client_with_dead_nodes(&dir, "p");
        let now = edgeroute_core::clock::unix_ms();
        let ahead = Duration::from_secs(600);
        let policy = |replica: &str, version: &str| {
            ShareMessage::of(replica, &EjectionEvent::PolicyVersion { version: version.into() })
                .encode()
        };
        let h = |p: &[u8]| handle(&client, "me", p, now, ahead);
        assert_eq!(h(&policy("me", "p2")), Handled::Own);
        assert_eq!(h(&policy("peer", "")), Handled::Malformed);
        assert_eq!(h(&policy("peer", "a\nb")), Handled::Malformed);
        // The cached list (decided under no policy) is marked once.
        assert_eq!(h(&policy("peer", "p2")), Handled::Policy { version: "p2".into(), expired: 1 });
        assert_eq!(h(&policy("peer", "p2")), Handled::Policy { version: "p2".into(), expired: 0 });
        // What this replica reports stays what its own discovery said.
        assert_eq!(client.policy_version(), None);
    }

    #[test]
    fn messages_round_trip_and_long_reasons_are_cut() {
        let e = EjectionEvent::Ejected(edgeroute_client::Ejection {
            node_id: "tor-1".into(),
            until_unix_ms: 42,
            reason: "é".repeat(MAX_REASON_BYTES),
        });
        let m = ShareMessage::of("router-tor", &e);
        assert!(m.reason.len() <= MAX_REASON_BYTES && m.reason.chars().all(|c| c == 'é'));
        let back: ShareMessage = serde_json::from_slice(&m.encode()).unwrap();
        assert_eq!(back, m);
        assert!(m.encode().len() <= MAX_MESSAGE_BYTES);
        let r =
            ShareMessage::of("router-tor", &EjectionEvent::Rejoined { node_id: "tor-1".into() });
        assert_eq!((r.verdict, r.until_unix_ms), (Verdict::Rejoined, 0));
    }
}
