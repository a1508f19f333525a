//! Bus configuration: which transport, where it is, who we are on it, and the limits of what a
//! subscriber holds.
//!
//! A plain serde struct: the binary reads it (e.g. the `[bus]` table of a node's or discovery's
//! TOML) and hands it in. Unknown keys are errors so a typo is caught at start-up instead of
//! silently falling back to a default. Credentials are given as file paths (read by
//! [`crate::NatsBus::connect`]), never inline, so neither the config nor its `Debug` carries a
//! secret.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::BusError;
use crate::wire::check_token;

/// The ceiling of `max_policy_bytes` (NATS warns above an 8 MiB `max_payload`).
pub const MAX_POLICY_LIMIT: usize = 8 << 20;

/// Which transport carries the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BusKind {
    /// In process (tokio broadcast + a shared map): no external service, one process only.
    #[default]
    Embedded,
    /// NATS: core subjects for events, a JetStream KV bucket for the latest state per node.
    Nats,
}

/// `[bus]` settings. Every field has a default, given as "default: …".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// `embedded` or `nats` (default: `embedded`).
    pub kind: BusKind,
    /// NATS server URL (default: `nats://127.0.0.1:4222`).
    pub nats_url: String,
    /// JetStream KV bucket holding the latest snapshot per node, key = node id
    /// (default: `edgeroute_nodes`). Created with history 1 if missing.
    pub bucket: String,
    /// Events go to `<subject_prefix>.<region>.<node_id>` (default: `edgeroute.topology`).
    pub subject_prefix: String,
    /// A publisher sends a `heartbeat` event this often (default: 2000).
    pub heartbeat_ms: u64,
    /// A subscriber marks a node down after this long without hearing from it
    /// (default: 6000). Must exceed `heartbeat_ms`, with room for a lost heartbeat or two.
    pub expire_ms: u64,
    /// Events a publisher keeps while the bus is unavailable; the oldest are dropped beyond it.
    /// Subscribers resync from the snapshot, so a drop costs detail, never correctness
    /// (default: 1024).
    pub max_buffered_events: usize,
    /// Timeout of one connection attempt to NATS (default: 2000).
    pub connect_timeout_ms: u64,
    /// Timeout of one KV read or write (default: 2000).
    pub op_timeout_ms: u64,
    /// Longest wait between reconnection or republish attempts (default: 2000).
    pub reconnect_max_ms: u64,
    /// Events an embedded subscriber may fall behind before it resyncs from the snapshots
    /// (default: 4096).
    pub channel_capacity: usize,
    /// NATS: an NKey user seed file (`SU…`, one line; keep it mode 0600), as written by
    /// `edgeroute bus credentials` (default: none).
    pub nkey_seed_file: Option<PathBuf>,
    /// NATS: a `.creds` file (user JWT + seed, for decentralised auth) instead of
    /// `nkey_seed_file` (default: none). At most one of the two.
    pub creds_file: Option<PathBuf>,
    /// NATS: a PEM file of the CA(s) that sign the server's certificate (default: none: the
    /// system roots, and only if the server offers TLS or `require_tls` is set).
    pub tls_ca_file: Option<PathBuf>,
    /// NATS: client certificate (PEM) for mutual TLS; needs `tls_key_file` (default: none).
    pub tls_cert_file: Option<PathBuf>,
    /// NATS: the client certificate's private key (PEM) (default: none).
    pub tls_key_file: Option<PathBuf>,
    /// NATS: refuse to talk to the server without TLS (default: false; set it whenever the bus
    /// leaves the host).
    pub require_tls: bool,
    /// NATS: messages the client buffers per subscription before it drops them as a slow
    /// consumer (async-nats default: 65,536). A dropped event costs a resync, never a wrong
    /// state (default: 1024; at most 64 MiB at the 64 KiB message cap).
    pub subscription_capacity: usize,
    /// NATS: commands (publishes, subscriptions) the client queues for the connection
    /// (async-nats default: 2048) (default: 256).
    pub client_capacity: usize,
    /// Subscriber: most nodes one view holds. An announced node id beyond it is refused and
    /// counted, however many ids the bus carries (default: 4096).
    pub max_nodes: usize,
    /// Subscriber: most models in one node's snapshot. A bigger snapshot (or an event that
    /// would grow one past it) is refused and counted (default: 256).
    pub max_models_per_node: usize,
    /// Subscriber: how far ahead of its own wall clock an epoch (a node's start time, Unix ms)
    /// may be. A later one is refused and counted: it would pin the node's state until every
    /// subscriber restarts (default: 300000, five minutes of clock skew).
    pub max_epoch_skew_ms: u64,
    /// Subscriber: a node silent for `expire_ms` plus this long is dropped from the view; it
    /// comes back through its stored snapshot when it speaks again (default: 600000).
    pub forget_ms: u64,
    /// JetStream KV bucket holding the routing policy pushed by an admin (`edgeroute policy
    /// push`), key `current` (default: `edgeroute_policy`). See [`crate::policy`].
    pub policy_bucket: String,
    /// Replicas acknowledge each policy text on `<policy_status_prefix>.<replica>`
    /// (default: `edgeroute.policy.status`).
    pub policy_status_prefix: String,
    /// Largest policy text put or accepted, bytes (default: 1048576, 1 MiB; at most 8 MiB,
    /// and the NATS server's `max_payload` must exceed it).
    pub max_policy_bytes: usize,
    /// Policy texts the bucket keeps per key, the current one included (default: 5; 1-64).
    pub policy_history: u8,
    /// JetStream KV bucket holding each model rollout's state (`edgeroute rollout`), key = the
    /// model (default: `edgeroute_rollouts`). See [`crate::rollout`].
    pub rollout_bucket: String,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            kind: BusKind::Embedded,
            nats_url: "nats://127.0.0.1:4222".to_owned(),
            bucket: "edgeroute_nodes".to_owned(),
            subject_prefix: "edgeroute.topology".to_owned(),
            heartbeat_ms: 2000,
            expire_ms: 6000,
            max_buffered_events: 1024,
            connect_timeout_ms: 2000,
            op_timeout_ms: 2000,
            reconnect_max_ms: 2000,
            channel_capacity: 4096,
            nkey_seed_file: None,
            creds_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            require_tls: false,
            subscription_capacity: 1024,
            client_capacity: 256,
            max_nodes: 4096,
            max_models_per_node: 256,
            max_epoch_skew_ms: 300_000,
            forget_ms: 600_000,
            policy_bucket: "edgeroute_policy".to_owned(),
            policy_status_prefix: "edgeroute.policy.status".to_owned(),
            max_policy_bytes: 1 << 20,
            policy_history: 5,
            rollout_bucket: "edgeroute_rollouts".to_owned(),
        }
    }
}

impl BusConfig {
    /// The embedded bus with defaults.
    pub fn embedded() -> Self {
        BusConfig::default()
    }

    /// NATS at `url` with defaults.
    pub fn nats(url: impl Into<String>) -> Self {
        BusConfig { kind: BusKind::Nats, nats_url: url.into(), ..BusConfig::default() }
    }

    /// Checks what serde cannot: token syntax and the relations between timings.
    pub fn validate(&self) -> Result<(), BusError> {
        check_token("bucket", &self.bucket)?;
        for token in self.subject_prefix.split('.') {
            check_token("subject_prefix token", token)?;
        }
        check_token("policy_bucket", &self.policy_bucket)?;
        if self.policy_bucket == self.bucket {
            return Err(BusError::Config(
                "policy_bucket must differ from bucket (the topology's)".to_owned(),
            ));
        }
        check_token("rollout_bucket", &self.rollout_bucket)?;
        if [&self.bucket, &self.policy_bucket].contains(&&self.rollout_bucket) {
            return Err(BusError::Config(
                "rollout_bucket must differ from bucket and policy_bucket".to_owned(),
            ));
        }
        for token in self.policy_status_prefix.split('.') {
            check_token("policy_status_prefix token", token)?;
        }
        if !(1..=MAX_POLICY_LIMIT).contains(&self.max_policy_bytes) {
            return Err(BusError::Config(format!(
                "max_policy_bytes must be between 1 and {MAX_POLICY_LIMIT}"
            )));
        }
        if !(1..=64).contains(&self.policy_history) {
            return Err(BusError::Config("policy_history must be between 1 and 64".to_owned()));
        }
        let positive = [
            ("heartbeat_ms", self.heartbeat_ms),
            ("expire_ms", self.expire_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("op_timeout_ms", self.op_timeout_ms),
            ("reconnect_max_ms", self.reconnect_max_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(BusError::Config(format!("{name} must be positive")));
            }
        }
        if self.expire_ms <= self.heartbeat_ms {
            return Err(BusError::Config(format!(
                "expire_ms ({}) must exceed heartbeat_ms ({}), or live nodes expire between beats",
                self.expire_ms, self.heartbeat_ms
            )));
        }
        let sizes = [
            ("max_buffered_events", self.max_buffered_events),
            ("channel_capacity", self.channel_capacity),
            ("subscription_capacity", self.subscription_capacity),
            ("client_capacity", self.client_capacity),
            ("max_nodes", self.max_nodes),
            ("max_models_per_node", self.max_models_per_node),
        ];
        for (name, value) in sizes {
            if value == 0 {
                return Err(BusError::Config(format!("{name} must be positive")));
            }
        }
        if self.nkey_seed_file.is_some() && self.creds_file.is_some() {
            return Err(BusError::Config("set nkey_seed_file or creds_file, not both".to_owned()));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(BusError::Config(
                "tls_cert_file and tls_key_file go together (mutual TLS)".to_owned(),
            ));
        }
        Ok(())
    }

    /// The limits a subscriber's [`crate::FleetView`] keeps.
    pub fn view_limits(&self) -> crate::ViewLimits {
        crate::ViewLimits {
            max_nodes: self.max_nodes,
            max_models_per_node: self.max_models_per_node,
            max_epoch_skew_ms: self.max_epoch_skew_ms,
            forget_ms: self.forget_ms,
        }
    }

    pub(crate) fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub(crate) fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.op_timeout_ms)
    }

    pub(crate) fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let cfg: BusConfig = toml::from_str("").unwrap();
        assert_eq!(cfg, BusConfig::default());
        cfg.validate().unwrap();
        assert_eq!((cfg.heartbeat_ms, cfg.expire_ms, cfg.max_buffered_events), (2000, 6000, 1024));
    }

    #[test]
    fn parses_nats_and_rejects_unknown_keys() {
        let cfg: BusConfig =
            toml::from_str("kind = \"nats\"\nnats_url = \"nats://10.0.0.1:4222\"").unwrap();
        assert_eq!(cfg.kind, BusKind::Nats);
        let err = toml::from_str::<BusConfig>("heartbeat = 5").unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn validation_catches_bad_tokens_and_timings() {
        let bad = |f: fn(&mut BusConfig)| {
            let mut cfg = BusConfig::default();
            f(&mut cfg);
            cfg.validate().is_err()
        };
        assert!(bad(|c| c.bucket = "a.b".into()));
        assert!(bad(|c| c.subject_prefix = "edgeroute..topology".into()));
        assert!(bad(|c| c.subject_prefix = "edgeroute.*".into()));
        assert!(bad(|c| c.expire_ms = c.heartbeat_ms));
        assert!(bad(|c| c.heartbeat_ms = 0));
        assert!(bad(|c| c.max_buffered_events = 0));
        assert!(bad(|c| c.subscription_capacity = 0));
        assert!(bad(|c| c.max_nodes = 0));
        assert!(bad(|c| {
            c.nkey_seed_file = Some("a".into());
            c.creds_file = Some("b".into());
        }));
        assert!(bad(|c| c.tls_cert_file = Some("cert.pem".into())));
        assert!(bad(|c| c.policy_bucket = "a.b".into()));
        assert!(bad(|c| c.policy_bucket = c.bucket.clone()));
        assert!(bad(|c| c.policy_status_prefix = "edgeroute.>".into()));
        assert!(bad(|c| c.max_policy_bytes = 0));
        assert!(bad(|c| c.max_policy_bytes = MAX_POLICY_LIMIT + 1));
        assert!(bad(|c| c.policy_history = 0));
        assert!(bad(|c| c.policy_history = 65));
    }

    #[test]
    fn credentials_and_tls_parse_from_toml() {
        let cfg: BusConfig = toml::from_str(
            "kind = \"nats\"\nnkey_seed_file = \"/etc/edgeroute/bus.nk\"\n\
             tls_ca_file = \"/etc/edgeroute/ca.pem\"\nrequire_tls = true",
        )
        .unwrap();
        assert_eq!(
            cfg.nkey_seed_file.as_deref(),
            Some(std::path::Path::new("/etc/edgeroute/bus.nk"))
        );
        assert!(cfg.require_tls);
        cfg.validate().unwrap();
        assert_eq!((cfg.subscription_capacity, cfg.client_capacity), (1024, 256));
    }
}
