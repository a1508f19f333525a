//! The bus's one error type, classified by whether trying again later can help.

use std::time::Duration;

/// Why a bus operation failed.
///
/// [`BusError::is_retryable`] separates transport trouble (retry with backoff; the node keeps
/// serving meanwhile) from mistakes in what was sent (retrying would fail the same way).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A node id, region, bucket or subject token outside `[A-Za-z0-9_-]`.
    #[error("invalid {what} {value:?}: only [A-Za-z0-9_-] is allowed, and it must not be empty")]
    InvalidToken { what: &'static str, value: String },
    /// A message larger than the bus accepts.
    #[error("{what} is {bytes} bytes, more than the {limit}-byte limit")]
    TooLarge { what: &'static str, bytes: usize, limit: usize },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Events handed over with the snapshot of another node.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("invalid bus configuration: {0}")]
    Config(String),
    /// Not connected right now; the client reconnects in the background.
    #[error("the bus is not connected")]
    Unavailable,
    #[error("{op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// A compare-and-set lost: the value changed since it was read (another writer).
    #[error("{what} changed since it was read (revision {expected:?}): another writer holds it")]
    Conflict { what: &'static str, expected: Option<u64> },
    /// Any other failure reported by the NATS client or server.
    #[error("nats {op} failed: {source}")]
    Nats {
        op: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

impl BusError {
    /// Whether the same operation may succeed later (the transport failed, not the content).
    pub fn is_retryable(&self) -> bool {
        matches!(self, BusError::Unavailable | BusError::Timeout { .. } | BusError::Nats { .. })
    }

    pub(crate) fn nats(op: &'static str, source: impl Into<async_nats::Error>) -> Self {
        BusError::Nats { op, source: source.into() }
    }
}
