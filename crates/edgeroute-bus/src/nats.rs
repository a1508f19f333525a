//! The NATS bus: core subjects for events, a JetStream KV bucket for the latest state per node.
//!
//! Layout:
//! - events: `<subject_prefix>.<region>.<node_id>`, one JSON [`TopologyEvent`] per message,
//!   core pub/sub (at most once, lowest latency);
//! - state: KV bucket `<bucket>` (history 1), key = node id, value = JSON [`NodeSnapshot`].
//!
//! A publisher writes the KV entry before it publishes the events the entry covers, so whoever
//! notices a gap finds a snapshot at least as new in the bucket. Lost core messages therefore
//! cost a resync, never a wrong state.
//!
//! The client connects in the background (`retry_on_initial_connect`) and reconnects forever:
//! [`NatsBus::connect`] never fails because the server is down, only for a bad URL, so a node
//! with a dead bus still starts and serves. Operations fail fast with
//! [`BusError::Unavailable`] while disconnected instead of waiting out their timeouts.
//!
//! Identity and transport security come from [`BusConfig`]: an NKey seed file or a `.creds`
//! file (read here, once, at connect; a missing or malformed file is a configuration error, not
//! a background retry), a CA file, a client certificate for mutual TLS, and `require_tls`.
//! The client's buffers are bounded by `subscription_capacity` and `client_capacity`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::{ConnectOptions, Event};
use edgeroute_proto::topology::{NodeSnapshot, TopologyEvent};
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::{OnceCell, watch};

use crate::BusError;
use crate::config::BusConfig;
use crate::inprocess::check_batch;
use crate::policy::{PolicyStatus, PolicyStatuses, PolicyWatch};
use crate::wire::{self, MAX_MESSAGE_BYTES, Rejected};

/// How many snapshots a full sync reads at once.
const FETCH_CONCURRENCY: usize = 16;

/// A cheap handle (clone it) to one NATS connection and its KV bucket.
#[derive(Clone)]
pub struct NatsBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("bucket", &self.inner.bucket)
            .field("connected", &self.is_connected())
            .finish()
    }
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    /// Opened (or created) on first use, since the server may be down at start-up.
    store: OnceCell<kv::Store>,
    /// The routing policy's bucket, opened (or, by an admin's push, created) on first use.
    policy_store: OnceCell<kv::Store>,
    /// The rollouts' bucket (`crate::rollout`), opened or created by the admin on first use.
    rollout_store: OnceCell<kv::Store>,
    bucket: String,
    prefix: String,
    op_timeout: Duration,
    /// Counts connections made (1 after the first); a change means "reconnected".
    connections: watch::Receiver<u64>,
}

/// The stream a KV bucket is made of (what async-nats's `create_key_value` would create):
/// `history` values per key, each at most `max_message` bytes; deletes refused.
fn kv_stream(bucket: &str, description: &str, history: i64, max_message: usize) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: history,
        max_message_size: i32::try_from(max_message).unwrap_or(i32::MAX),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..stream::Config::default()
    }
}

/// The connect options `cfg`'s credentials and TLS settings give.
async fn identity(cfg: &BusConfig) -> Result<ConnectOptions, BusError> {
    let mut options = ConnectOptions::new().require_tls(cfg.require_tls);
    if let Some(path) = &cfg.nkey_seed_file {
        let seed = read_secret("nkey_seed_file", path)?;
        crate::credentials::check_user_seed(&seed)
            .map_err(|e| BusError::Config(format!("nkey_seed_file {}: {e}", path.display())))?;
        options = options.nkey(seed);
    }
    if let Some(path) = &cfg.creds_file {
        // Read (and checked) now, so a wrong path fails at start-up.
        read_secret("creds_file", path)?;
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| BusError::Config(format!("creds_file {}: {e}", path.display())))?;
    }
    if let Some(ca) = &cfg.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.tls_cert_file, &cfg.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// Reads a secret file (trimmed), warning when others may read it too.
fn read_secret(what: &str, path: &std::path::Path) -> Result<String, BusError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BusError::Config(format!("{what} {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(file = %path.display(), "{what} is readable by others: chmod 600 it");
        }
    }
    Ok(text.trim().to_owned())
}

/// The delay before reconnection attempt `attempts`: quick at first, then capped, so a fleet
/// does not hammer a restarting server yet finds it again within `max`.
pub(crate) fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX).min(16);
    Duration::from_millis(25u64.saturating_mul(1 << exp)).min(max)
}

impl NatsBus {
    /// Starts connecting to `cfg.nats_url` and returns at once, connected or not. Fails for an
    /// unreadable or invalid credentials file.
    pub async fn connect(cfg: &BusConfig) -> Result<NatsBus, BusError> {
        let (connections_tx, connections) = watch::channel(0u64);
        let connections_tx = Arc::new(connections_tx);
        let max = cfg.reconnect_max();
        let client = identity(cfg)
            .await?
            .name("edgeroute-bus")
            .subscription_capacity(cfg.subscription_capacity)
            .client_capacity(cfg.client_capacity)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .request_timeout(Some(cfg.op_timeout()))
            .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, max))
            .event_callback(move |event| {
                let connections_tx = connections_tx.clone();
                async move {
                    match event {
                        Event::Connected => {
                            connections_tx.send_modify(|n| *n += 1);
                            tracing::info!("topology bus connected to nats");
                        }
                        Event::Disconnected => tracing::warn!("topology bus lost nats"),
                        other => tracing::debug!(event = %other, "nats event"),
                    }
                }
            })
            .connect(cfg.nats_url.as_str())
            .await
            .map_err(|e| BusError::nats("connect", e))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.op_timeout());
        Ok(NatsBus {
            inner: Arc::new(Inner {
                client,
                js,
                store: OnceCell::new(),
                policy_store: OnceCell::new(),
                rollout_store: OnceCell::new(),
                bucket: cfg.bucket.clone(),
                prefix: cfg.subject_prefix.clone(),
                op_timeout: cfg.op_timeout(),
                connections,
            }),
        })
    }

    /// Opens (creating it if missing) the KV bucket now rather than on first use.
    pub async fn ensure_bucket(&self) -> Result<(), BusError> {
        self.store().await.map(|_| ())
    }

    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// The underlying client (e.g. for tests that publish raw messages).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    pub(crate) fn connections(&self) -> watch::Receiver<u64> {
        self.inner.connections.clone()
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn ensure_connected(&self) -> Result<(), BusError> {
        if self.is_connected() { Ok(()) } else { Err(BusError::Unavailable) }
    }

    async fn timed<T, E>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, BusError>
    where
        E: Into<async_nats::Error>,
    {
        match tokio::time::timeout(self.inner.op_timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(BusError::nats(op, e)),
            Err(_) => Err(BusError::Timeout { op, after: self.inner.op_timeout }),
        }
    }

    /// The KV bucket, opened or created on first use.
    async fn store(&self) -> Result<&kv::Store, BusError> {
        self.ensure_connected()?;
        self.inner.store.get_or_try_init(|| self.open_or_create()).await
    }

    async fn open_or_create(&self) -> Result<kv::Store, BusError> {
        let js = &self.inner.js;
        if let Ok(store) = self.timed("kv open", js.get_key_value(self.inner.bucket.as_str())).await
        {
            return Ok(store);
        }
        // The stream a KV bucket is made of, created directly: async-nats's
        // `create_key_value` first reads account info in a shape nats-server 2.9 (Debian's)
        // does not send, and fails. This is the same stream config it would create.
        let bucket = &self.inner.bucket;
        let config =
            kv_stream(bucket, "edgeroute: latest topology snapshot per node", 1, MAX_MESSAGE_BYTES);
        // Creating an identical stream is idempotent, so racing creators both succeed.
        self.timed("kv create", js.create_stream(config)).await?;
        self.timed("kv open", js.get_key_value(bucket.as_str())).await
    }

    /// The policy bucket: opened, or created when `create` (the pusher; a replica may not
    /// create it and waits for the first push instead).
    async fn policy_store(&self, cfg: &BusConfig, create: bool) -> Result<&kv::Store, BusError> {
        self.ensure_connected()?;
        self.inner.policy_store.get_or_try_init(|| self.open_policy(cfg, create)).await
    }

    async fn open_policy(&self, cfg: &BusConfig, create: bool) -> Result<kv::Store, BusError> {
        let js = &self.inner.js;
        let bucket = cfg.policy_bucket.as_str();
        match self.timed("policy kv open", js.get_key_value(bucket)).await {
            Ok(store) => return Ok(store),
            Err(e) if !create => return Err(e),
            Err(_) => {}
        }
        // Created directly, as the topology's bucket is (see `open_or_create`). A value holds
        // one whole text: the stream's message limit is the text's plus room for headers.
        let max_message = cfg.max_policy_bytes.saturating_add(4096);
        let config = kv_stream(
            bucket,
            "edgeroute: the routing policy in force (key current)",
            i64::from(cfg.policy_history),
            max_message,
        );
        self.timed("policy kv create", js.create_stream(config)).await?;
        self.timed("policy kv open", js.get_key_value(bucket)).await
    }

    /// Puts a policy text (creating the bucket if it is missing) and returns its revision.
    pub async fn put_policy(&self, text: &str, cfg: &BusConfig) -> Result<u64, BusError> {
        crate::policy::check_size(text, cfg.max_policy_bytes)?;
        let store = self.policy_store(cfg, true).await?;
        let value = bytes::Bytes::copy_from_slice(text.as_bytes());
        self.timed("policy kv put", store.put(crate::policy::POLICY_KEY, value)).await
    }

    /// Watches the policy key with history: the current text first, then each update.
    pub async fn watch_policy(&self, cfg: &BusConfig) -> Result<PolicyWatch, BusError> {
        let store = self.policy_store(cfg, false).await?;
        let watch = self
            .timed("policy kv watch", store.watch_with_history(crate::policy::POLICY_KEY))
            .await?;
        Ok(PolicyWatch::nats(watch, cfg.max_policy_bytes))
    }

    /// The rollouts' bucket: opened, or created (only the admin role may use it at all).
    async fn rollout_store(&self, cfg: &BusConfig) -> Result<&kv::Store, BusError> {
        self.ensure_connected()?;
        self.inner.rollout_store.get_or_try_init(|| self.open_rollouts(cfg)).await
    }

    async fn open_rollouts(&self, cfg: &BusConfig) -> Result<kv::Store, BusError> {
        let js = &self.inner.js;
        let bucket = cfg.rollout_bucket.as_str();
        if let Ok(store) = self.timed("rollout kv open", js.get_key_value(bucket)).await {
            return Ok(store);
        }
        let max_message = crate::rollout::MAX_ROLLOUT_BYTES.saturating_add(4096);
        let config =
            kv_stream(bucket, "edgeroute: model rollouts' state (key: the model)", 1, max_message);
        self.timed("rollout kv create", js.create_stream(config)).await?;
        self.timed("rollout kv open", js.get_key_value(bucket)).await
    }

    /// The rollout state under `key` and its revision.
    pub async fn rollout_get(
        &self,
        key: &str,
        cfg: &BusConfig,
    ) -> Result<Option<(u64, Vec<u8>)>, BusError> {
        crate::wire::check_token("rollout key", key)?;
        let store = self.rollout_store(cfg).await?;
        let entry = self.timed("rollout kv get", store.entry(key)).await?;
        Ok(entry
            .filter(|e| matches!(e.operation, kv::Operation::Put))
            .map(|e| (e.revision, e.value.to_vec())))
    }

    /// Compare-and-set: writes only if the key's revision is still `expected` (`None`: absent).
    pub async fn rollout_put(
        &self,
        key: &str,
        value: &[u8],
        expected: Option<u64>,
        cfg: &BusConfig,
    ) -> Result<u64, BusError> {
        crate::rollout::check(key, value)?;
        let store = self.rollout_store(cfg).await?;
        let bytes = bytes::Bytes::copy_from_slice(value);
        let conflict = BusError::Conflict { what: "rollout state", expected };
        let put = async {
            match expected {
                None => store.create(key, bytes).await.map_err(|e| {
                    if e.kind() == kv::CreateErrorKind::AlreadyExists {
                        None
                    } else {
                        Some(async_nats::Error::from(e))
                    }
                }),
                Some(rev) => store.update(key, bytes, rev).await.map_err(|e| {
                    if e.kind() == kv::UpdateErrorKind::WrongLastRevision {
                        None
                    } else {
                        Some(async_nats::Error::from(e))
                    }
                }),
            }
        };
        match tokio::time::timeout(self.inner.op_timeout, put).await {
            Ok(Ok(rev)) => Ok(rev),
            Ok(Err(None)) => Err(conflict),
            Ok(Err(Some(e))) => Err(BusError::nats("rollout kv put", e)),
            Err(_) => Err(BusError::Timeout { op: "rollout kv put", after: self.inner.op_timeout }),
        }
    }

    /// Publishes a replica's acknowledgement (core, at most once) and flushes it.
    pub async fn publish_policy_status(
        &self,
        status: &PolicyStatus,
        cfg: &BusConfig,
    ) -> Result<(), BusError> {
        let payload = status.encode()?;
        self.ensure_connected()?;
        let subject = format!("{}.{}", cfg.policy_status_prefix, status.replica);
        let client = &self.inner.client;
        self.timed("publish policy status", client.publish(subject, payload.into())).await?;
        self.timed("flush", client.flush()).await
    }

    /// Subscribes to every replica's acknowledgements.
    pub async fn policy_statuses(&self, cfg: &BusConfig) -> Result<PolicyStatuses, BusError> {
        self.ensure_connected()?;
        let sub = self
            .inner
            .client
            .subscribe(format!("{}.*", cfg.policy_status_prefix))
            .await
            .map_err(|e| BusError::nats("subscribe", e))?;
        // The subscription is registered with the server before anything is pushed.
        self.timed("flush", self.inner.client.flush()).await?;
        Ok(PolicyStatuses::nats(sub, &cfg.policy_status_prefix))
    }

    /// Stores `snapshot` in the bucket, then publishes `events` (all of the snapshot's node).
    pub async fn publish_batch(
        &self,
        events: &[TopologyEvent],
        snapshot: &NodeSnapshot,
    ) -> Result<(), BusError> {
        check_batch(events, snapshot)?;
        let state = wire::encode("snapshot", snapshot)?;
        let subject = wire::event_subject(&self.inner.prefix, &snapshot.region, &snapshot.node_id);
        let payloads =
            events.iter().map(|e| wire::encode("event", e)).collect::<Result<Vec<_>, _>>()?;
        let store = self.store().await?;
        self.timed("kv put", store.put(snapshot.node_id.as_str(), state.into())).await?;
        for payload in payloads {
            self.timed("publish", self.inner.client.publish(subject.clone(), payload.into()))
                .await?;
        }
        Ok(())
    }

    /// Subscribes to every node's events.
    pub(crate) async fn subscribe_events(&self) -> Result<async_nats::Subscriber, BusError> {
        self.inner
            .client
            .subscribe(wire::all_events_subject(&self.inner.prefix))
            .await
            .map_err(|e| BusError::nats("subscribe", e))
    }

    /// The stored snapshot of one node (`None` if it has none).
    pub async fn fetch(
        &self,
        node_id: &str,
    ) -> Result<Option<Result<NodeSnapshot, Rejected>>, BusError> {
        let store = self.store().await?;
        let entry = self.timed("kv get", store.entry(node_id)).await?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| wire::decode_snapshot(&e.key, &e.value)))
    }

    /// Every stored snapshot (each decoded or rejected).
    pub async fn fetch_all(&self) -> Result<Vec<Result<NodeSnapshot, Rejected>>, BusError> {
        let store = self.store().await?;
        let keys = self.timed("kv keys", store.keys()).await?;
        let keys: Vec<String> = self.timed("kv keys", keys.try_collect()).await?;
        let fetched: Vec<_> = futures_util::stream::iter(keys)
            .map(|key| async move { self.fetch(&key).await })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        let mut snapshots = Vec::with_capacity(fetched.len());
        for item in fetched {
            // A key deleted between listing and reading is simply gone.
            if let Some(snap) = item? {
                snapshots.push(snap);
            }
        }
        Ok(snapshots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_delay_grows_then_caps() {
        let max = Duration::from_millis(2000);
        assert_eq!(reconnect_delay(0, max), Duration::from_millis(25));
        assert_eq!(reconnect_delay(1, max), Duration::from_millis(25));
        assert_eq!(reconnect_delay(3, max), Duration::from_millis(100));
        assert_eq!(reconnect_delay(1000, max), max);
    }
}
