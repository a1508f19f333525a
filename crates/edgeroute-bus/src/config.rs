//! Bus configuration: which transport, where it is, and the timing of liveness.
//!
//! A plain serde struct: the binary reads it (e.g. the `[bus]` table of a node's or discovery's
//! TOML) and hands it in; nothing here reads files or the environment. Unknown keys are errors
//! so a typo is caught at start-up instead of silently falling back to a default.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::BusError;
use crate::wire::check_token;

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
        if self.max_buffered_events == 0 || self.channel_capacity == 0 {
            return Err(BusError::Config(
                "max_buffered_events and channel_capacity must be positive".to_owned(),
            ));
        }
        Ok(())
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
    }
}
